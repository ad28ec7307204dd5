"""The settings of one SFT run: ``TrainConfig``, the one contract between the trainer, the CLI and the web app.

Torch-free, so the web app and ``deftx --help`` import it without loading a model. Each field's help text is
in its metadata (the CLI's options are generated from the fields); ``resolve`` merges a preset, a JSON file
and explicit values; ``planned_steps`` is the one count of optimiser steps (the trainer runs it, the app
checks it against its step limit). The presets themselves are in ``presets.py``.
"""
from __future__ import annotations

import json
import math
import os
import stat
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..constants import DEFAULT_K, KINDS, METHODS, PARAM_GROUPS, PRECISIONS, Kind, Method, Precision
from ..errors import ConfigError
from ..method.denoise_config import DenoiseConfig, RankPolicy, ResidualScope
from ..models.presets import preset
from .tables import MAX_BYTES_DEFAULT


def _help(text: str) -> dict[str, str]:
    return {"help": text}


MAX_TEXT_CHARS = 4096  # a path, a column name, a Hub spec
MAX_NAME_CHARS = 100  # a language name or code
MAX_STEPS = 10 ** 9  # per phase: beyond any real run, and within SQLite's and Trainer's integers
MAX_COUNT = 10 ** 12  # entries of a k given as a count
_INT_RANGES = {"full_steps": (0, MAX_STEPS), "sparse_steps": (0, MAX_STEPS), "save_steps": (0, MAX_STEPS),
               "logging_steps": (1, MAX_STEPS), "batch_size": (1, 1 << 20), "grad_accum": (1, 1 << 20),
               "max_length": (1, 1 << 20), "seed": (0, 2 ** 32 - 1), "rank": (0, 1 << 30),
               "max_lines": (1, MAX_COUNT), "max_bytes": (1, 1 << 50)}


@dataclass
class TrainConfig:
    """One SFT. Defaults are the paper's where it gives them, and small enough for a CPU otherwise."""

    kind: Kind = field(metadata=_help("language (masked LM on unlabelled text) or task (labelled examples)"))
    data: str = field(metadata=_help("training data: a path (.txt/.csv/.tsv/.jsonl) or "
                                     "hub:org/name[:config][@split][#column]"))
    base_model: str = field(default="minilm", metadata=_help(
        "base model: 'multilingual-e5-small' or 'minilm' (offline, built from PyPI packages; minilm is English-only), "
        "a local folder, or a Hub id such as FacebookAI/xlm-roberta-base"))
    language: str = field(default="", metadata=_help("language code or name recorded in the vector (e.g. jav)"))
    text_column: str | None = field(default=None, metadata=_help(
        "column/key holding the text (default: 'text'; for tasks also premise/hypothesis)"))
    pair_column: str | None = field(default=None, metadata=_help("second text column for pair tasks such as NLI"))
    label_column: str = field(default="label", metadata=_help("column/key holding the label"))
    method: Method = field(default="deftx", metadata=_help(
        "deftx = SVD-denoise the phase-1 delta before masking; lt-sft = plain magnitude mask"))
    rank_policy: RankPolicy = field(default="energy", metadata=_help(
        "energy = smallest rank keeping --energy of Σσ²; fixed = --rank"))
    energy: float = field(default=0.90, metadata=_help("share of the spectrum's energy (σ²) the low-rank "
                                                       "part keeps"))
    rank: int = field(default=100, metadata=_help("rank r for --rank-policy fixed (clipped to each matrix)"))
    residual_share: float = field(default=0.05, metadata=_help(
        "ρ: share of each matrix's residual entries kept after the low-rank part (0 drops it)"))
    residual_scope: ResidualScope = field(default="changed", metadata=_help(
        "what ρ is a share of: changed = the rows of the matrix that phase 1 changed (a word-embedding delta "
        "lives in the rows of the corpus's tokens); matrix = all its entries (older runs; such a delta is then "
        "kept whole, not denoised)"))
    k: float | None = field(default=None, metadata=_help(
        "entries to train: a share of the maskable parameters (<1) or a count "
        f"(default: {DEFAULT_K['language']} language, {DEFAULT_K['task']} task)"))
    full_steps: int = field(default=0, metadata=_help("phase-1 (full fine-tuning) steps; 0 = use --full-epochs"))
    full_epochs: float = field(default=1.0, metadata=_help("phase-1 epochs when --full-steps is 0"))
    sparse_steps: int = field(default=0, metadata=_help("phase-2 (sparse fine-tuning) steps; 0 = use "
                                                        "--sparse-epochs"))
    sparse_epochs: float = field(default=1.0, metadata=_help("phase-2 epochs when --sparse-steps is 0"))
    lr: float = field(default=5e-5, metadata=_help("peak learning rate (linear decay)"))
    batch_size: int = field(default=16, metadata=_help("examples per device per step"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    max_length: int = field(default=128, metadata=_help("tokens per example (longer ones are truncated)"))
    mlm_probability: float = field(default=0.15, metadata=_help("share of tokens masked for the masked-LM "
                                                                "objective"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: float = field(default=0.0, metadata=_help("warm-up steps, or a share of each phase's steps "
                                                            "when < 1"))
    seed: int = field(default=42, metadata=_help("random seed (data order, masking, head initialisation)"))
    save_steps: int = field(default=200, metadata=_help("checkpoint every N steps (and when stopped by a signal)"))
    logging_steps: int = field(default=5, metadata=_help("log the loss every N steps"))
    max_lines: int | None = field(default=None, metadata=_help(  # protects shared deployments
        "refuse data with more lines/rows than this (unset: no limit)"))
    max_bytes: int = field(default=MAX_BYTES_DEFAULT, metadata=_help("refuse data files larger than this many "
                                                                     "bytes"))
    source_language_vector: str | None = field(default=None, metadata=_help(
        "task SFT only: train on top of θ0 + this source-language vector (LT-SFT's setting)"))
    sparse_phase: bool = field(default=True, metadata=_help(
        "run phase 2 (false: keep the masked phase-1 delta; an ablation)"))
    fit_head: bool = field(default=True, metadata=_help(
        "language SFT of a base without a pretrained MLM head: first fit the head with the encoder frozen, "
        "until its held-out loss stops falling (cached per base model, layer and text)"))
    head_corpus: str | None = field(default=None, metadata=_help(
        "text the MLM head is fitted on (a path or hub: spec; unset: this run's corpus)"))
    mlm_layer: int | None = field(default=None, metadata=_help(
        "language SFT: the MLM head reads this transformer layer's output (1 = first; unset: the last); "
        "the layers above it are left out of the language vector"))
    param_groups: str = field(default="all", metadata=_help(
        "parameters the vector may change: all, or a comma list of " + ", ".join(PARAM_GROUPS) +
        " (the others stay at θ0; k is a share of the allowed ones)"))
    heldout_share: float = field(default=0.1, metadata=_help(
        "language SFT: share of the corpus held out to score θ0 against θ0 + φ "
        "(masked-token loss and top-1)"))
    precision: Precision = field(default="auto", metadata=_help(
        "number format of the matrix products (both phases, the MLM-head fit, scoring; held-out checks are "
        "float32): auto = bf16 autocast on CUDA (fp16 where the GPU lacks bf16) and on a CPU with bf16 matrix "
        "units (amx_bf16/avx512_bf16), float32 on other CPUs; weights, optimizer state, masks and the saved "
        "vector stay float32"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile (inductor) the model for both phases: fuses the elementwise work between the matrix "
        "products; on a 2-core CPU it took ~50 s to compile and did not speed the step up (benchmarks/RESULTS.md)"))

    def __post_init__(self) -> None:
        # the one boundary every entry point passes (CLI, --config files, the app, Python): a value that gets
        # through here cannot fail later in a job, the scheduler's SQLite row or the Trainer
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if value is None and name == "max_lines":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be a whole number from {low:,} to {high:,}, got {value!r}", field=name)
        for name in ("lr", "full_epochs", "sparse_epochs", "energy", "residual_share", "weight_decay", "warmup_steps",
                     "mlm_probability", "heldout_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}", field=name)
        if self.lr > 1 or max(self.full_epochs, self.sparse_epochs) > 10_000:
            raise ConfigError(f"lr must be <= 1 and epochs <= 10,000, got lr {self.lr}, epochs {self.full_epochs} / "
                              f"{self.sparse_epochs}", field="lr" if self.lr > 1 else "full_epochs")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be between 0 and 1, got {self.mlm_probability}",
                              field="mlm_probability")
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be {' or '.join(map(repr, KINDS))}, got {self.kind!r}", field="kind")
        if self.method not in METHODS:
            raise ConfigError(f"method must be {' or '.join(map(repr, METHODS))}, got {self.method!r}",
                              field="method")
        for name in ("lr", "batch_size", "max_length", "grad_accum", "full_epochs", "sparse_epochs", "max_bytes"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value}", field=name)
        for name in ("full_steps", "sparse_steps", "warmup_steps", "weight_decay", "save_steps", "logging_steps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}", field=name)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}",
                              field="precision")
        if not 0 <= self.heldout_share <= 0.5:
            raise ConfigError(f"heldout_share must be between 0 and 0.5, got {self.heldout_share}",
                              field="heldout_share")
        for f in fields(self):  # a 100 MB string would pass every other check and end up in the vector's config
            value = getattr(self, f.name)
            limit = MAX_NAME_CHARS if f.name == "language" else MAX_TEXT_CHARS
            if isinstance(value, str) and len(value) > limit:
                raise ConfigError(f"{f.name} is {len(value):,} characters long; at most {limit:,} are accepted",
                                  field=f.name)
        if self.mlm_layer is not None and self.mlm_layer < 1:
            raise ConfigError(f"mlm_layer must be >= 1 (the first transformer layer), got {self.mlm_layer}",
                              field="mlm_layer")
        groups = self.param_groups.split(",") if isinstance(self.param_groups, str) else [None]
        if self.param_groups != "all" and (not set(groups) <= set(PARAM_GROUPS) or len(set(groups)) != len(groups)):
            raise ConfigError(f"param_groups must be 'all' or a comma list of {', '.join(PARAM_GROUPS)} (each once), "
                              f"got {self.param_groups!r}", field="param_groups")
        if self.k is None:
            self.k = DEFAULT_K[self.kind]
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not math.isfinite(self.k) or \
                self.k <= 0 or (self.k >= 1 and (self.k != int(self.k) or self.k > MAX_COUNT)):
            raise ConfigError(f"k must be a share of the maskable parameters (0 < k < 1) or a whole count up to "
                              f"{MAX_COUNT:,}, got {self.k!r}", field="k")
        self.denoise_config()  # validates rank policy, energy, rank, residual share

    def denoise_config(self) -> DenoiseConfig:
        return DenoiseConfig(self.rank_policy, self.energy, self.rank, self.residual_share, self.residual_scope)

    def to_dict(self) -> dict:
        return asdict(self)

    def phase1_settings(self) -> dict:
        """The settings phase 1 (the full fine-tune) depends on: runs that agree on them -- DeFT-X, LT-SFT and
        the ablations of one seed -- have the same phase-1 delta, so one can reuse another's
        (``train_sft(phase1_cache=...)``)."""
        return {k: v for k, v in asdict(self).items() if k not in PHASE2_ONLY}

    def steps_per_epoch(self, n_examples: int, world: int = 1) -> int:
        """Optimiser steps of one pass over ``n_examples`` by ``world`` processes."""
        return math.ceil(n_examples / (self.batch_size * self.grad_accum * world))

    def planned_steps(self, n_examples: int, world: int = 1) -> tuple[int, int]:
        """(phase-1, phase-2) optimiser steps: the steps given, else the epochs over ``n_examples`` (at least 1);
        phase 2 is 0 without a sparse phase."""
        per_epoch = self.steps_per_epoch(n_examples, world)

        def steps(given: int, epochs: float, name: str) -> int:
            n = given if given > 0 else max(1, math.ceil(per_epoch * epochs))
            if n > MAX_STEPS:
                raise ConfigError(f"{name} x {n_examples:,} examples makes {n:,} steps, more than {MAX_STEPS:,}",
                                  field=name)
            return n

        return (steps(self.full_steps, self.full_epochs, "full_epochs"),
                steps(self.sparse_steps, self.sparse_epochs, "sparse_epochs") if self.sparse_phase else 0)


# what only the mask choice and phase 2 read (logging changes no weight)
PHASE2_ONLY = frozenset({"method", "rank_policy", "energy", "rank", "residual_share", "residual_scope", "k",
                         "sparse_steps",
                         "sparse_epochs", "sparse_phase", "save_steps", "logging_steps"})
FIELDS: dict[str, Any] = {f.name: f for f in fields(TrainConfig)}


# fields added after run folders, phase-1 files and benchmark caches were first written, each with the value that
# a record written before it means: at that value the field is left out of a recorded config's identity, so what
# was recorded before it still matches (and a run with another value never matches an old record)
# (precision "fp32": records before it ran in float32 on a CPU, where every recorded benchmark ran)
ADDED_LATER: dict[str, Any] = {"param_groups": "all", "residual_scope": "matrix", "precision": "fp32",
                               "compile": False}


def settings_key(settings: dict) -> dict:
    """``settings`` without the ADDED_LATER fields at the value that older records mean: what identifies a run."""
    return {k: v for k, v in settings.items() if not (k in ADDED_LATER and ADDED_LATER[k] == v)}


def same_run(recorded: dict, config: dict) -> bool:
    """Whether a run folder's recorded config is ``config`` (one written before an ADDED_LATER field existed
    holds that field at its default)."""
    return settings_key(recorded) == settings_key(config)


def field_types() -> dict[str, Any]:
    """Each field's type as an object (``int | None``, ``Literal[...]``), not the annotation's text."""
    return typing.get_type_hints(TrainConfig)


def defaults() -> dict[str, Any]:
    """The fields that have a default, with it."""
    return {name: f.default for name, f in FIELDS.items() if f.default is not MISSING}


def _check_value(name: str, value: Any, typ: Any) -> None:
    """A value read from a file has the field's type (an int passes for a float; a bool only for a bool)."""
    if typing.get_origin(typ) is Literal:
        if value not in typing.get_args(typ):
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, typing.get_args(typ)))}, got {value!r}",
                              field=name)
        return
    allowed = typing.get_args(typ) or (typ,)  # X | None: (X, NoneType)
    if float in allowed:
        allowed += (int,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{name} must be {names}, got {value!r}", field=name)


MAX_CONFIG_FILE_BYTES = 1 << 20  # a config of every field is a few kB


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The fields of a JSON config file (``deftx train-* --config``), each checked against its type. Only a
    regular file of at most 1 MiB is read: a FIFO would block and /dev/zero never end."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"the config file {path} is not a regular file", field="config")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}", field="config") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"the config file {path} is larger than {MAX_CONFIG_FILE_BYTES:,} bytes", field="config")
    try:
        values = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark (Windows editors) is no error
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers of over 4,300 digits
        raise ConfigError(f"the config file {path} is not JSON: {str(e)[:200]}", field="config") from None
    except RecursionError:
        raise ConfigError(f"the config file {path} is nested too deeply to be a config", field="config") from None
    if not isinstance(values, dict):
        raise ConfigError(f"the config file {path} must hold a JSON object of settings", field="config")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"the config file {path} has unknown settings: {', '.join(unknown)}", field=unknown[0])
    types = field_types()
    for name, value in values.items():
        _check_value(name, value, types[name])
    return values


def resolve(kind: str, *, preset_name: str | None = None, file: str | Path | None = None,
            values: dict[str, Any] | None = None) -> TrainConfig:
    """The config of a ``kind`` run: ``values`` win over the ``file``, the file over the preset, the preset over
    the defaults."""
    merged = preset(preset_name, kind) if preset_name else {}
    if file:
        from_file = read_config_file(file)
        if from_file.get("kind", kind) != kind:
            raise ConfigError(f"the config file {file} is for a {from_file['kind']} SFT, not a {kind} SFT",
                              field="kind")
        merged.update({k: v for k, v in from_file.items() if k != "kind"})
    merged.update(values or {})
    if "data" not in merged:
        raise ConfigError("no training data.", field="data", hint="{Set} {data}.")
    return TrainConfig(kind=kind, **merged)
