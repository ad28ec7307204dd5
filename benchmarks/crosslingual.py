"""Cross-lingual transfer benchmark on NusaX (issue 5): DeFT-X against LT-SFT, plain fine-tuning and the
paper's ablations, on the same splits and seeds.

Usage::

    python -m benchmarks.crosslingual                     # the default run (MiniLM; see "Default" below)
    python -m benchmarks.crosslingual --dry-run           # plan and expected time only
    python -m benchmarks.crosslingual --model ~/.cache/deftx/e5-small --seeds 1   # multilingual encoder
    python -m benchmarks.crosslingual --help              # every option with its default

Task: 3-way sentiment (negative / neutral / positive) of NusaX. A task vector is trained on the source
language's sentiment train split (500 rows); a language vector per target on the target column of NusaX-MT's
train split (500 unlabelled sentences, translations of the *train* texts, so no test text is seen). Every
method is evaluated zero-shot on the target's sentiment test split (400 rows), and on the source's test split.

Methods (``--methods``, all by default):

==========================  =================================================================================
``deftx``                   task SFT + language SFT, both SVD-denoised before masking, composed by a sum
``lt-sft``                  the same without denoising (plain magnitude mask; Ansell et al., 2022)
``task-only``               the deftx task SFT alone on the target language (no language vector)
``full-ft``                 a dense fine-tune of the whole model on the source task, as many steps as one
                            SFT phase: the deliberate baseline no user runs (``baselines.dense_trainer``:
                            HF ``Trainer``, LayerNorm included, the engine's phase-1 settings)
``ties``                    the deftx task and language vectors merged with TIES (``deftx_engine/method/merge.py``:
                            trim to the top ``--ties-density`` of each vector's entries, elect sign by
                            summed mass, disjoint mean) instead of a sum
``deftx-no-retrain``        ablation: the vectors are the masked denoised phase-1 deltas
                            (``TrainConfig.sparse_phase=False``), no sparse phase
``deftx-matrix``            DeFT-X with the earlier denoising: rho counted over every entry of a matrix
                            (``residual_scope="matrix"``), so a row-sparse delta such as the word
                            embeddings' keeps its whole residual (``deftx_engine/method/denoise.py``)
``deftx-drop-residual``     ablation: rho = 0, the residual S dropped entirely (only the low-rank part)
``deftx-fixed-rank``        ablation: rank policy fixed, r = ``--fixed-rank`` (100, clipped to the matrix)
                            instead of energy 0.90
==========================  =================================================================================

Reuse and caching: a task vector is trained once per (variant, seed) and reused for every target; a language
vector once per (target, variant, seed) and reused by every method that shares it (``deftx``, ``task-only``
and ``ties`` share the deftx vectors). Runs live under ``--work-dir`` (default ``benchmarks/out/crosslingual``,
gitignored) in folders named by a hash of their full configuration, so re-running the same command reuses
finished runs and evaluations, continues an interrupted run from its last checkpoint, and a changed setting
trains anew. Checkpoints are deleted once a vector is saved (``--keep-checkpoints`` keeps them). Phase 1 (the full
fine-tune) is the same for every variant of a seed and target -- only the mask choice and phase 2 differ --
so the first variant writes its phase-1 delta to ``<work-dir>/<model>/phase1/`` and the others read it
(``train_sft(phase1_cache=...)``; tests/engine/training/test_phase1.py shows the vectors equal those trained alone).

Reported (``--out``, default ``<work-dir>/<model>/results.{json,md,html}``): macro-F1 x 100, mean +/- std
(sample std) over the seeds, per target and averaged over the targets (mean over seeds of the per-seed average);
the source-language F1 of the method's task component without a language vector (for ``ties``: the trimmed
task vector; for ``full-ft``: the dense model); the overlap between each language vector's entries and the
task vector's (share of the language vector's entries that the task vector also touches, and Jaccard); for
methods whose vectors are not LT-SFT's, the share of their task / language mask entries that LT-SFT's mask of
the same seed (and target) also has -- how much denoising changed what gets trained; wall
time per method: training time of every vector the method uses (a shared vector counts for each method that
uses it: "what this method costs alone") plus its evaluation time.

Default (fits 60 minutes on 2 CPU cores, measured in benchmarks/RESULTS.md): MiniLM, source indonesian,
targets javanese sundanese balinese, 3 seeds, every phase ``--task-steps`` / ``--lang-steps`` steps of batch
``--batch-size`` x ``--max-length`` tokens (training; evaluation reads up to 128 tokens, the engine's default),
k = 5.2 % (task) / 2.8 % (language) of the maskable parameters as in the paper. Before training the script
measures a training step, the denoise + mask time and an evaluation batch on this machine and prints the
expected time of the remaining work.

Notes. Weights a checkpoint lacks are initialised from the global RNG by ``load_cls_model``; the engine
stores the ones it knows of whole (classification head, pooler: ``params.py``). As a second line of defence
every evaluation seeds the RNG with the task vector's seed before ``evaluate.composed_model``, exactly as
``train_sft`` does before loading, so any other such weight starts from the same value as in training.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/crosslingual.py` finds deftx_engine and benchmarks

import torch  # noqa: E402

from benchmarks.baselines import dense_trainer  # noqa: E402
from benchmarks.common import OtherCpu, machine_info, prefixed, wait_quiet  # noqa: E402
from deftx_engine.constants import DEFAULT_K, PRECISIONS, TIES_DENSITY, TIES_LAMBDA  # noqa: E402
from deftx_engine.errors import DeftxError  # noqa: E402
from deftx_engine.fileio import atomic_dir, atomic_write_text, write_json_atomic  # noqa: E402
from deftx_engine.method.masks import overlap  # noqa: E402
from deftx_engine.method.merge import ties_merge  # noqa: E402
from deftx_engine.method.vectors import SparseVector  # noqa: E402
from deftx_engine.outputs.inference import composed_model, evaluate_task_data  # noqa: E402
from deftx_engine.training.config import settings_key  # noqa: E402
from deftx_engine.training.data import TaskData, load_task_data  # noqa: E402
from deftx_engine.training.runs import RunDir, read_json  # noqa: E402
from deftx_engine.training.train import TrainConfig, train_sft  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nusax"
DEFAULT_WORK = ROOT / "benchmarks" / "out" / "crosslingual"
DEFAULT_TARGETS = ("javanese", "sundanese", "balinese")


# ---- methods and the vectors they need ----------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    task: str  # task-vector variant ("full-ft": a dense model instead)
    lang: str | None  # language-vector variant, None: no language vector
    merge: str = "sum"  # "sum" (compose), "ties", "dense"


METHODS = {m.name: m for m in (
    Method("deftx", "deftx", "deftx"),
    Method("lt-sft", "lt-sft", "lt-sft"),
    Method("task-only", "deftx", None),
    Method("full-ft", "full-ft", None, "dense"),
    Method("ties", "deftx", "deftx", "ties"),
    Method("deftx-matrix", "deftx-matrix", "deftx-matrix"),
    Method("deftx-no-retrain", "no-retrain", "no-retrain"),
    Method("deftx-drop-residual", "drop-residual", "drop-residual"),
    Method("deftx-fixed-rank", "fixed-rank", "fixed-rank"),
    Method("deftx-src", "deftx-src", "deftx"),
    Method("lt-sft-src", "lt-sft-src", "lt-sft"),
)}
# LT-SFT's protocol (opt-in): the task SFT trains on theta0 + this variant's source-language vector
SRC_VARIANTS = {"deftx-src": "deftx", "lt-sft-src": "lt-sft"}


def variant_overrides(variant: str, fixed_rank: int) -> dict:
    """TrainConfig fields that make a vector variant (everything else is shared)."""
    return {"deftx": dict(method="deftx"),
            "lt-sft": dict(method="lt-sft"),
            "deftx-matrix": dict(method="deftx", residual_scope="matrix"),
            "no-retrain": dict(method="deftx", sparse_phase=False),
            "drop-residual": dict(method="deftx", residual_share=0.0),
            "fixed-rank": dict(method="deftx", rank_policy="fixed", rank=fixed_rank),
            "deftx-src": dict(method="deftx"),
            "lt-sft-src": dict(method="lt-sft")}[variant]


# ---- data -----------------------------------------------------------------------------------------------------
@dataclass
class Paths:
    source_train: Path
    source_test: Path
    corpus: Path  # NusaX-MT train split, one column per language
    target_test: dict[str, Path]


def nusax_paths(data: Path, source: str, targets: list[str]) -> Paths:
    """Every file the run needs, checked up front; a missing one is an error naming it and what exists."""
    data = Path(data).expanduser()
    sent = data / "sentiment"
    if not sent.is_dir():
        raise SystemExit(f"error: {sent} not found: --data must be the NusaX folder holding sentiment/ and mt/")
    have = sorted(p.name for p in sent.iterdir() if p.is_dir())
    if source in targets:
        raise SystemExit(f"error: the source language {source!r} is also a target")
    for lang in [source, *targets]:
        for split in (["train", "test"] if lang == source else ["test"]):
            f = sent / lang / f"{split}.csv"
            if not f.is_file():
                raise SystemExit(f"error: {f} is missing (sentiment languages present in {sent}: {', '.join(have)})")
    corpus = data / "mt" / "train.csv"
    if not corpus.is_file():
        raise SystemExit(f"error: {corpus} is missing (NusaX-MT train split: the unlabelled target text)")
    with corpus.open(encoding="utf-8", newline="") as f:
        columns = next(csv.reader(f))
    for t in targets:
        if t not in columns:
            raise SystemExit(f"error: {corpus} has no column {t!r} (columns: {', '.join(c for c in columns if c)})")
    return Paths(sent / source / "train.csv", sent / source / "test.csv", corpus,
                 {t: sent / t / "test.csv" for t in targets})


def head_corpus(choice: str, paths: Paths, work: Path) -> str | None:
    """The MLM-head fitting text: ``mt`` writes NusaX-MT train (all languages) minus the lines every language
    SFT holds out (``mlm_head.split_heldout`` on a column), so held-out scores stay held out."""
    if choice == "own":
        return None
    if choice != "mt":
        return choice
    from deftx_engine.models.mlm_head import split_heldout

    with paths.corpus.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    columns = [c for c in rows[0] if c]
    lines = []
    for i, name in enumerate(rows[0]):
        if name in columns:
            lines += split_heldout([r[i] for r in rows[1:] if r[i].strip()], TrainConfig.heldout_share)[0]
    out = work / "head-corpus-mt.txt"
    text = "\n".join(line.replace("\n", " ") for line in lines) + "\n"
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        atomic_write_text(out, text)
    return str(out)


# ---- settings -------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    model: str
    source: str
    targets: list[str]
    seeds: list[int]
    methods: list[str]
    task_steps: int
    lang_steps: int
    batch_size: int
    max_length: int
    task_lr: float
    lang_lr: float
    lang_fit_head: bool
    lang_mlm_layer: int | None
    head_corpus: str | None
    lang_scale: float
    lang_groups: str
    task_k: float
    lang_k: float
    energy: float
    residual_share: float
    fixed_rank: int
    ties_density: float
    ties_lambda: float
    eval_batch_size: int
    precision: str = "fp32"


def _common(s: Settings, seed: int) -> dict:
    return dict(base_model=s.model, batch_size=s.batch_size, max_length=s.max_length, seed=seed,
                method="deftx", energy=s.energy, residual_share=s.residual_share, save_steps=10 ** 6,
                logging_steps=10, precision=s.precision)


def task_config(s: Settings, variant: str, seed: int, paths: Paths, source_vector: Path | None = None) -> TrainConfig:
    over = {} if variant == "full-ft" else variant_overrides(variant, s.fixed_rank)
    if source_vector is not None:  # LT-SFT's protocol: the task SFT trains on theta0 + phi_source-language
        over["source_language_vector"] = str(source_vector)
    return TrainConfig(kind="task", data=str(paths.source_train), language=s.source, k=s.task_k,
                       full_steps=s.task_steps, sparse_steps=s.task_steps, lr=s.task_lr,
                       **{**_common(s, seed), **over})


def lang_config(s: Settings, variant: str, seed: int, target: str, paths: Paths) -> TrainConfig:
    return TrainConfig(kind="language", data=str(paths.corpus), text_column=target, language=target,
                       k=s.lang_k, full_steps=s.lang_steps, sparse_steps=s.lang_steps, lr=s.lang_lr,
                       fit_head=s.lang_fit_head, mlm_layer=s.lang_mlm_layer, head_corpus=s.head_corpus,
                       param_groups=s.lang_groups,
                       **{**_common(s, seed), **variant_overrides(variant, s.fixed_rank)})


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def model_tag(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name or model)[:40] or "model"


# ---- training jobs --------------------------------------------------------------------------------------------
@dataclass
class Job:
    kind: str  # "task" | "language" | "full-ft"
    variant: str
    seed: int
    target: str | None
    cfg: TrainConfig
    folder: Path
    phase1: Path | None = None  # phase-1 delta shared by the variants of this seed (and target)

    @property
    def label(self) -> str:
        what = f"language {self.target}" if self.kind == "language" else self.kind
        return f"{what} {self.variant} seed {self.seed}"

    @property
    def done(self) -> bool:
        return (self.folder / "bench.json").is_file()

    @property
    def steps(self) -> int:
        return self.cfg.full_steps + (self.cfg.sparse_steps if self.cfg.sparse_phase and self.kind != "full-ft" else 0)

    def seconds(self) -> float:
        return float((read_json(self.folder / "bench.json", {}) or {}).get("train_seconds", 0.0))


def _phase1_file(work: Path, cfg: TrainConfig) -> Path:
    key = _hash(settings_key(cfg.phase1_settings()))
    return work / "phase1" / f"{cfg.kind}-{cfg.language}-seed{cfg.seed}-{key}.safetensors"


def plan_jobs(s: Settings, paths: Paths, work: Path) -> list[Job]:
    """Every training run the chosen methods need, seed-major (a finished seed is a complete result)."""
    jobs: dict[tuple, Job] = {}
    for seed in s.seeds:
        for name in s.methods:
            m = METHODS[name]
            if m.task == "full-ft":
                cfg = task_config(s, "full-ft", seed, paths)
                key = ("full-ft", "full-ft", seed, None)
                folder = work / "full-ft" / f"seed{seed}-{_hash(['full-ft', settings_key(cfg.to_dict())])}"
                jobs.setdefault(key, Job("full-ft", "full-ft", seed, None, cfg, folder))
            else:
                src = None
                if m.task in SRC_VARIANTS:  # the source-language vector first: the task SFT trains on top of it
                    lcfg = lang_config(s, SRC_VARIANTS[m.task], seed, s.source, paths)
                    src = jobs.setdefault(("language", SRC_VARIANTS[m.task], seed, s.source), Job(
                        "language", SRC_VARIANTS[m.task], seed, s.source, lcfg, work / "language" / s.source /
                        SRC_VARIANTS[m.task] / f"seed{seed}-{_hash(settings_key(lcfg.to_dict()))}",
                        _phase1_file(work, lcfg))).folder / "vector"
                cfg = task_config(s, m.task, seed, paths, src)
                folder = work / "task" / m.task / f"seed{seed}-{_hash(settings_key(cfg.to_dict()))}"
                jobs.setdefault(("task", m.task, seed, None),
                                Job("task", m.task, seed, None, cfg, folder, _phase1_file(work, cfg)))
        for target in s.targets:
            for name in s.methods:
                m = METHODS[name]
                if m.lang:
                    cfg = lang_config(s, m.lang, seed, target, paths)
                    jobs.setdefault(("language", m.lang, seed, target), Job(
                        "language", m.lang, seed, target, cfg,
                        work / "language" / target / m.lang / f"seed{seed}-{_hash(settings_key(cfg.to_dict()))}",
                        _phase1_file(work, cfg)))
    return list(jobs.values())


@contextlib.contextmanager
def _captured(path: Path, quiet: bool):
    """Send the trainer's progress bars and logs to ``path`` (keeps the console readable)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    path.parent.mkdir(parents=True, exist_ok=True)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its handler holds the original stderr: silence it instead
    try:
        with path.open("a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
    finally:
        hf_logging.set_verbosity(level)


def run_sft(job: Job, keep_checkpoints: bool, quiet: bool) -> float:
    """Train (or continue) one SFT with the engine; returns its wall time."""
    t = time.perf_counter()
    # beside the run folder, not in it: the engine claims only folders that hold nothing but its own run
    with _captured(job.folder.with_name(job.folder.name + ".console.txt"), quiet), OtherCpu() as other:
        train_sft(job.cfg, RunDir(job.folder), resume=True, keep_checkpoints=keep_checkpoints,
                  phase1_cache=job.phase1)
    secs = time.perf_counter() - t
    write_json_atomic(job.folder / "bench.json", {"train_seconds": secs, "finished": time.time(),
                                                  "other_cores": other.cores})
    return secs


def run_full_ft(job: Job, quiet: bool) -> float:
    """The ``full-ft`` method: the deliberate dense baseline no user runs (``baselines.dense_trainer``)."""
    cfg = job.cfg
    t = time.perf_counter()
    with _captured(job.folder / "console.txt", quiet), OtherCpu() as other:
        trainer = dense_trainer(cfg, job.folder / "trainer")
        trainer.train()
        with atomic_dir(job.folder / "model", "config.json") as tmp:  # complete or absent, never half a model
            trainer.model.save_pretrained(tmp)
    secs = time.perf_counter() - t
    shutil.rmtree(job.folder / "trainer", ignore_errors=True)
    write_json_atomic(job.folder / "bench.json", {"train_seconds": secs, "finished": time.time(),
                                                  "other_cores": other.cores, "config": cfg.to_dict()})
    return secs


# ---- evaluation -----------------------------------------------------------------------------------------------
def sorted_task_data(path: Path, label_names: list[str]) -> TaskData:
    """The labelled file, rows sorted by text length: batches pad less (the scores do not depend on the
    order)."""
    td = load_task_data(path, label_names=label_names)
    order = sorted(range(len(td)), key=lambda i: len(td.texts[i]))
    return TaskData(texts=[td.texts[i] for i in order], labels=[td.labels[i] for i in order],
                    label_names=td.label_names, source=td.source,
                    text_pairs=[td.text_pairs[i] for i in order] if td.text_pairs else None)


class Evaluator:
    """Scores models on labelled files; caches results on disk keyed by everything they depend on."""

    def __init__(self, s: Settings, paths: Paths, work: Path, quiet: bool):
        self.s, self.paths, self.quiet = s, paths, quiet
        self.cache = work / "evals"
        self._data: dict[str, object] = {}
        self._vectors: dict[Path, SparseVector] = {}

    def vector(self, job: Job) -> SparseVector:
        path = job.folder / "vector"
        if path not in self._vectors:
            self._vectors[path] = SparseVector.load(path)
        return self._vectors[path]

    def share_in(self, job: Job, ref: Job) -> float:
        """Share of ``job``'s mask entries that ``ref``'s mask (same kind, seed and target) also has: how
        far denoising moved the mask away from LT-SFT's plain top-k."""
        return overlap(self.vector(job).mask(), self.vector(ref).mask())["overall"]["share_of_a"]

    def _task_data(self, path: Path, label_names: list[str]):
        if str(path) not in self._data:
            self._data[str(path)] = sorted_task_data(path, label_names)
        return self._data[str(path)]

    def _score(self, model, tok, path: Path) -> dict:
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return evaluate_task_data(model, tok, self._task_data(path, names), batch_size=self.s.eval_batch_size,
                                  precision=self.s.precision)

    def evaluate(self, method: Method, seed: int, where: str, task: Job, lang: Job | None) -> dict:
        """macro-F1 etc. of ``method`` on ``where`` ("source" or a target), cached on disk by what the
        model is made of (so deftx and task-only share the source evaluation of their common task vector)."""
        test = self.paths.source_test if where == "source" else self.paths.target_test[where]
        key = _hash([method.merge, str(task.folder), str(lang.folder) if lang else None,
                     self.s.lang_scale if lang and self.s.lang_scale != 1.0 else None,
                     [self.s.ties_density, self.s.ties_lambda] if method.merge == "ties" else None,
                     str(test), test.stat().st_size]
                    + ([self.s.precision] if self.s.precision != "fp32" else []))  # fp32: as recorded before
        cache = self.cache / f"{where}-seed{seed}-{key}.json"
        hit = read_json(cache)
        if hit:
            return {**hit, "method": method.name, "cached": True}
        from transformers import set_seed

        t = time.perf_counter()
        with _captured(self.cache / "console.txt", self.quiet):
            if method.merge == "dense":
                from transformers import AutoModelForSequenceClassification

                from deftx_engine.models.loading import device, load_tokenizer

                model = AutoModelForSequenceClassification.from_pretrained(task.folder / "model").to(device()).eval()
                tok = load_tokenizer(self.s.model)
            else:
                tvec = self.vector(task)
                lvecs = [self.vector(lang)] if lang else []
                set_seed(task.cfg.seed)  # same init as training for any weight the checkpoint lacks
                if method.merge == "ties":
                    model, tok = composed_model(ties_merge([tvec, *lvecs], self.s.ties_density, self.s.ties_lambda))
                else:
                    model, tok = composed_model(tvec, lvecs, [1.0] + [self.s.lang_scale] * len(lvecs))
            metrics = self._score(model, tok, test)
        result = {"method": method.name, "seed": seed, "where": where, "key": cache.stem,
                  "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"], "n": metrics["n"],
                  "confusion": metrics["confusion"],
                  "eval_seconds": time.perf_counter() - t}
        if lang is not None:
            held = self.vector(lang).meta.heldout_mlm
            if held:  # did the language vector learn its language? (masked-token loss on held-out text)
                result["lang_mlm"] = {k: held[k]["loss"] for k in ("theta0", "theta0+phi", "encoder_only")}
            o = overlap(self.vector(lang).mask(), self.vector(task).mask())["overall"]
            result["overlap"] = {"shared": o["shared"], "share_of_language": o["share_of_a"],
                                 "share_of_task": o["share_of_b"], "jaccard": o["jaccard"]}
        write_json_atomic(cache, result)
        return {**result, "cached": False}


# ---- the expected time ----------------------------------------------------------------------------------------
def probe_batches(cfg: TrainConfig, tok, n: int) -> tuple[list[dict], list[str] | None]:
    """``n`` batches of a run's data as its phase 1 gets them (the engine's examples and collator; rows reused
    from the start when the data holds fewer), and the label names."""
    from deftx_engine.method.embedding_rows import used_rows
    from deftx_engine.training.train import data_collator, load_examples

    dataset, labels = load_examples(cfg, tok)
    collate = data_collator(cfg, tok, used_rows(dataset.rows, tok))
    rows, b = dataset.rows, cfg.batch_size
    return [collate([rows[(i * b + j) % len(rows)] for j in range(b)]) for i in range(n)], labels


def calibrate(s: Settings, paths: Paths, probe_steps: int = 3) -> dict:
    """Measure on this machine: a full-phase training step (task and MLM, median of ``probe_steps`` after one
    warm-up; the engine's batches, and the step as phase 1 takes it: ``perf.Phases``), model load, denoise + mask
    of a real (few-step) task delta, and one evaluation batch."""
    from benchmarks.perf import Phases
    from deftx_engine.method.denoise import DenoiseConfig, choose_mask
    from deftx_engine.models.loading import load_cls_model, load_mlm_model, load_tokenizer

    def step_time(ph: Phases, batches: list[dict]) -> float:
        return statistics.median([ph.full_step(b) for b in batches][1:])  # the first warms up

    out: dict[str, float] = {}
    t = time.perf_counter()
    tok = load_tokenizer(s.model)
    td = load_task_data(paths.source_train)
    out["load_tokenizer"] = time.perf_counter() - t
    batches, labels = probe_batches(task_config(s, "deftx", s.seeds[0], paths), tok, probe_steps + 1)
    t = time.perf_counter()
    model = load_cls_model(s.model, labels)
    out["load_model"] = time.perf_counter() - t
    ph = Phases(model, "task")
    theta0 = {n: ph.params[n].detach().clone() for n in ph.roles.maskable}
    out["task_step"] = step_time(ph, batches)
    deltas = {n: ph.params[n].detach() - theta0[n] for n in ph.roles.maskable}
    del theta0
    t = time.perf_counter()
    choose_mask(deltas, s.task_k, DenoiseConfig("energy", s.energy, s.fixed_rank, s.residual_share))
    out["denoise_mask"] = time.perf_counter() - t
    del deltas
    model.eval()
    enc = tok(td.texts[:s.eval_batch_size], truncation=True, max_length=128, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        model(**enc)
        t = time.perf_counter()
        model(**enc)
        out["eval_batch"] = time.perf_counter() - t
    del model, ph
    lang = lang_config(s, "deftx", s.seeds[0], s.targets[0], paths)
    batches, _ = probe_batches(lang, tok, probe_steps + 1)
    out["lang_step"] = step_time(Phases(load_mlm_model(s.model, lang.mlm_layer), "language"), batches)
    return out


def expected_seconds(job: Job, cal: dict, s: Settings, phase1_reused: bool = False) -> float:
    """Expected wall time of one training run from the calibration (sparse steps costed as full steps)."""
    step = cal["lang_step"] if job.kind == "language" else cal["task_step"]
    fixed = cal["load_tokenizer"] + cal["load_model"] + 2.0  # + trainer set-up, end-of-phase checkpoints
    if job.kind == "full-ft":
        return fixed + job.cfg.full_steps * step
    return fixed + (job.steps - job.cfg.full_steps * phase1_reused) * step + cal["denoise_mask"]


def phase1_reuse(todo: list[Job]) -> dict[int, bool]:
    """Which runs will find their phase 1 done by an earlier run (or an earlier invocation)."""
    seen: set[Path] = set()
    out = {}
    for j in todo:
        out[id(j)] = j.phase1 is not None and (j.phase1 in seen or j.phase1.is_file())
        if j.phase1 is not None:
            seen.add(j.phase1)
    return out


def eval_count(s: Settings) -> int:
    """Evaluations per run: every method on every target, and one source evaluation per distinct task model."""
    sources = {(METHODS[m].task, METHODS[m].merge) for m in s.methods}
    return len(s.seeds) * (len(s.methods) * len(s.targets) + len(sources))


def expected_eval_seconds(s: Settings, cal: dict, n_rows: int = 400) -> float:
    per = cal["load_model"] + cal["load_tokenizer"] + cal["eval_batch"] * math.ceil(n_rows / s.eval_batch_size)
    return per


# ---- reporting ------------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> tuple[float, float]:
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def quiet_projection(jobs: list[Job], evals: list[dict], threshold: float = 0.25) -> dict:
    """Wall time the trained runs would take on a machine of our own: a run during which other processes used
    >= ``threshold`` cores is costed at the median time of the quiet runs of the same kind and variant (its
    own time when there is none). Evaluations (cached ones too) are counted as measured."""
    info = {id(j): read_json(j.folder / "bench.json", {}) or {} for j in jobs}
    quiet: dict[tuple, list[float]] = {}
    for j in jobs:
        c = info[id(j)].get("other_cores")
        if c is not None and c < threshold and "train_seconds" in info[id(j)]:
            quiet.setdefault((j.kind, j.variant), []).append(info[id(j)]["train_seconds"])
    total = contended = 0.0
    n_contended = 0
    for j in jobs:
        d = info[id(j)]
        if "train_seconds" not in d:
            continue
        c = d.get("other_cores")
        if c is not None and c >= threshold and quiet.get((j.kind, j.variant)):
            total += statistics.median(quiet[(j.kind, j.variant)])
            contended += d["train_seconds"]
            n_contended += 1
        else:
            total += d["train_seconds"]
    evals_s = sum({e.get("key", id(e)): e["eval_seconds"] for e in evals}.values())  # shared ones once
    return {"train_seconds": total, "eval_seconds": evals_s, "total_seconds": total + evals_s,
            "contended_runs": n_contended, "contended_runs_measured_seconds": contended,
            "quiet_runs": sum(len(v) for v in quiet.values())}


def summarize(s: Settings, evals: list[dict], jobs: list[Job]) -> dict:
    """Per method: F1 mean/std per target, average, source; overlap; wall time."""
    by = {(e["method"], e["seed"], e["where"]): e for e in evals}
    out = {}
    for name in s.methods:
        m = METHODS[name]
        row: dict = {"targets": {}, "n_seeds": 0}
        seeds = [sd for sd in s.seeds if all((name, sd, w) in by for w in [*s.targets, "source"])]
        row["n_seeds"] = len(seeds)
        for t in s.targets:
            row["targets"][t] = _ms([100 * by[(name, sd, t)]["macro_f1"] for sd in seeds])
        row["average"] = _ms([statistics.mean(100 * by[(name, sd, t)]["macro_f1"] for t in s.targets) for sd in seeds])
        row["source"] = _ms([100 * by[(name, sd, "source")]["macro_f1"] for sd in seeds])
        if m.lang:
            row["overlap_share_of_language"] = _ms([100 * by[(name, sd, t)]["overlap"]["share_of_language"]
                                                    for sd in seeds for t in s.targets])
            row["overlap_jaccard"] = _ms([100 * by[(name, sd, t)]["overlap"]["jaccard"]
                                          for sd in seeds for t in s.targets])
        mlm = [by[(name, sd, t)]["lang_mlm"] for sd in seeds for t in s.targets if "lang_mlm" in by[(name, sd, t)]]
        if mlm:
            row["lang_mlm"] = {k: statistics.mean(x[k] for x in mlm) for k in mlm[0]}
        task_in = [100 * by[(name, sd, "source")]["mask_in_lt_sft"] for sd in seeds
                   if "mask_in_lt_sft" in by[(name, sd, "source")]]
        lang_in = [100 * by[(name, sd, t)]["mask_in_lt_sft"] for sd in seeds for t in s.targets
                   if "mask_in_lt_sft" in by[(name, sd, t)]]
        if task_in:
            row["task_mask_in_lt_sft"] = _ms(task_in)
        if lang_in:
            row["lang_mask_in_lt_sft"] = _ms(lang_in)
        used = [j for j in jobs if j.seed in seeds and (
            (j.kind in ("task", "full-ft") and j.variant == m.task) or
            (j.kind == "language" and j.variant == m.lang))]
        row["train_seconds"] = sum(j.seconds() for j in used)
        row["eval_seconds"] = sum(by[(name, sd, w)]["eval_seconds"] for sd in seeds for w in [*s.targets, "source"])
        out[name] = row
    return out


def _fmt(ms: tuple[float, float]) -> str:
    m, sd = ms
    return "–" if math.isnan(m) else f"{m:.1f} ± {sd:.1f}"


def markdown(s: Settings, summary: dict, meta: dict) -> str:
    lines = [f"Macro-F1 × 100, mean ± std over {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))}); "
             f"source {s.source}, model `{s.model}`.", "",
             "| method | " + " | ".join(s.targets) + " | avg | source | lang∩task (% of lang) | Jaccard % "
             "| task / lang mask also in LT-SFT's (%) | held-out MLM loss θ0 → θ0+φ (encoder only) | train s "
             "| eval s |",
             "|---" * (len(s.targets) + 9) + "|"]
    for name, r in summary.items():
        ov = _fmt(r["overlap_share_of_language"]) if "overlap_share_of_language" in r else "–"
        jac = _fmt(r["overlap_jaccard"]) if "overlap_jaccard" in r else "–"
        seeds = "" if r["n_seeds"] == len(s.seeds) else f" ({r['n_seeds']} seeds)"
        lines.append(f"| {name}{seeds} | " + " | ".join(_fmt(r["targets"][t]) for t in s.targets) +
                     f" | **{_fmt(r['average'])}** | {_fmt(r['source'])} | {ov} | {jac} | "
                     f"{_fmt(r['task_mask_in_lt_sft']) if 'task_mask_in_lt_sft' in r else '–'} / "
                     f"{_fmt(r['lang_mask_in_lt_sft']) if 'lang_mask_in_lt_sft' in r else '–'} | "
                     + (f"{r['lang_mlm']['theta0']:.2f} → {r['lang_mlm']['theta0+phi']:.2f} "
                        f"({r['lang_mlm']['encoder_only']:.2f})" if "lang_mlm" in r else "–") +
                     f" | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    other = meta.get("other_cores_mean")
    expected = (f"expected {meta['expected_seconds'] / 60:.1f} min for the work that was not cached"
                if meta.get("calibration") else "no time estimate: nothing left to train, or --no-calibrate")
    lines += ["", f"Wall time of this invocation: {meta['wall_seconds'] / 60:.1f} min ({expected}); "
                  f"{meta['trained']} runs trained, {meta['reused']} reused; other processes used "
                  + ("n/a" if other is None else f"{other:.2f}") + " cores on average meanwhile."]
    q = meta.get("quiet_projection")
    if q and q["contended_runs"]:
        measured = q["contended_runs_measured_seconds"] / 60
        lines += ["", f"On a machine of our own (projection): {q['total_seconds'] / 60:.1f} min -- "
                      f"{q['contended_runs']} runs during which other processes used >= 0.25 cores "
                      f"(measured {measured:.1f} min) costed at the median of the {q['quiet_runs']} quiet runs of "
                      "the same kind and variant, plus training runs and evaluations as measured."]
    return "\n".join(lines) + "\n"


def html_report(s: Settings, summary: dict, path: Path) -> None:
    import plotly.graph_objects as go

    cols = [*s.targets, "average"]
    f1 = go.Figure()
    for name, r in summary.items():
        vals = [r["targets"][t] for t in s.targets] + [r["average"]]
        f1.add_trace(go.Bar(name=name, x=cols, y=[v[0] for v in vals],
                            error_y=dict(type="data", array=[v[1] for v in vals])))
    f1.update_layout(barmode="group", title=f"Zero-shot macro-F1 ({s.source} → targets, {len(s.seeds)} seeds, "
                                            f"model {model_tag(s.model)})", yaxis_title="macro-F1 × 100")
    names = list(summary)
    f2 = go.Figure([go.Bar(name="training", x=names, y=[summary[n]["train_seconds"] / 60 for n in names]),
                    go.Bar(name="evaluation", x=names, y=[summary[n]["eval_seconds"] / 60 for n in names])])
    f2.update_layout(barmode="stack", title="Wall time per method (shared vectors counted for each method)",
                     yaxis_title="minutes")
    f3 = go.Figure(go.Bar(x=[n for n in names if "overlap_jaccard" in summary[n]],
                          y=[summary[n]["overlap_share_of_language"][0] for n in names
                             if "overlap_jaccard" in summary[n]]))
    f3.update_layout(title="Language-vector entries also in the task vector (%)", yaxis_title="%")
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate((f1, f2, f3))]
    atomic_write_text(path, "<!doctype html><html><head><meta charset='utf-8'><title>DeFT-X cross-lingual "
                      "benchmark</title></head><body>" + "\n".join(parts) + "</body></html>")


# ---- the command ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="NusaX folder (sentiment/<lang>/*.csv, mt/train.csv)")
    p.add_argument("--source", default="indonesian", help="source language (labelled task data)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="target languages")
    p.add_argument("--model", default="minilm", help="base model: 'minilm', a local folder or a Hub id")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seeds 1..N)")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in SRC_VARIANTS],
                   choices=list(METHODS), help="methods to run (deftx-src, lt-sft-src: opt-in)")
    p.add_argument("--task-steps", type=int, default=40, help="steps per phase of a task SFT (and of full-ft)")
    p.add_argument("--lang-steps", type=int, default=24, help="steps per phase of a language SFT")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--max-length", type=int, default=64, help="training tokens per example (truncated)")
    p.add_argument("--task-lr", type=float, default=3e-4, help="task SFT / full-ft learning rate")
    p.add_argument("--lang-lr", type=float, default=3e-4, help="language SFT learning rate")
    p.add_argument("--no-lang-fit-head", dest="lang_fit_head", action="store_false",
                   help="language SFTs start from a new (random) MLM head instead of a fitted one")
    p.add_argument("--lang-mlm-layer", type=int, default=None,
                   help="language SFTs: the MLM head reads this layer (TrainConfig.mlm_layer; default: the last)")
    p.add_argument("--head-corpus", default="mt",
                   help="text the MLM head is fitted on: 'mt' = NusaX-MT train, all 12 languages, without the "
                        "lines the language SFTs hold out (one head for every target); 'own' = each run's "
                        "corpus; or a path")
    p.add_argument("--lang-groups", default="all",
                   help="parameter groups a language vector may change: all, or a comma list of embeddings, "
                        "attention, ffn")
    p.add_argument("--lang-scale", type=float, default=1.0, help="scale of the language vector in composition")
    p.add_argument("--task-k", type=float, default=DEFAULT_K["task"],
                   help="task k (share of maskable parameters or a count)")
    p.add_argument("--lang-k", type=float, default=DEFAULT_K["language"], help="language k")
    p.add_argument("--energy", type=float, default=0.90, help="energy share for the rank policy 'energy'")
    p.add_argument("--residual-share", type=float, default=0.05, help="rho for deftx (ablation drop-residual: 0)")
    p.add_argument("--fixed-rank", type=int, default=100, help="r for the deftx-fixed-rank ablation")
    p.add_argument("--ties-density", type=float, default=TIES_DENSITY, help="TIES: share of each vector's entries kept")
    p.add_argument("--ties-lambda", type=float, default=TIES_LAMBDA, help="TIES: scale of the merged vector")
    p.add_argument("--eval-batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="training and scoring precision (TrainConfig.precision); fp32, as every recorded result, "
                        "so the cached runs and tables stay comparable; auto to measure what users get")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK), help="run cache (re-running reuses finished runs)")
    p.add_argument("--out", help="results prefix (default: <work-dir>/<model>/results)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before starting, wait up to SECONDS for other processes to use < 0.15 cores")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the expected time, train nothing")
    p.add_argument("--no-calibrate", action="store_true", help="skip the timing probe (no expected time)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep phase checkpoints after a run")
    p.add_argument("--verbose", action="store_true", help="show the trainer's progress bars and logs")
    return p


def settings_from(args: argparse.Namespace) -> tuple[Settings, Paths, Path]:
    """The run's settings, data files and work folder from the command line (also read by mask_anatomy.py,
    so the same command line finds the same runs)."""
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    paths = nusax_paths(Path(args.data), args.source, args.targets)
    s = Settings(model=args.model, source=args.source, targets=list(args.targets),
                 seeds=list(range(1, args.seeds + 1)), methods=list(args.methods), task_steps=args.task_steps,
                 lang_steps=args.lang_steps, batch_size=args.batch_size, max_length=args.max_length,
                 task_lr=args.task_lr, lang_lr=args.lang_lr,
                 lang_fit_head=args.lang_fit_head, lang_mlm_layer=args.lang_mlm_layer,
                 head_corpus=head_corpus(args.head_corpus, paths, Path(args.work_dir).expanduser()),
                 lang_scale=args.lang_scale, lang_groups=args.lang_groups,
                 task_k=args.task_k, lang_k=args.lang_k,
                 energy=args.energy, residual_share=args.residual_share, fixed_rank=args.fixed_rank,
                 ties_density=args.ties_density, ties_lambda=args.ties_lambda,
                 eval_batch_size=args.eval_batch_size, precision=args.precision)
    return s, paths, Path(args.work_dir).expanduser() / model_tag(s.model)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    s, paths, work = settings_from(args)
    out = Path(args.out) if args.out else work / "results"
    jobs = plan_jobs(s, paths, work)
    todo = [j for j in jobs if not j.done]
    quiet = not args.verbose
    print(f"crosslingual: {s.source} -> {', '.join(s.targets)}, model {s.model}, seeds {s.seeds}", flush=True)
    print(f"  {len(jobs)} training runs ({len(jobs) - len(todo)} cached), "
          f"{eval_count(s)} evaluations; task {s.task_steps}+{s.task_steps} steps, language "
          f"{s.lang_steps}+{s.lang_steps} steps, batch {s.batch_size} x {s.max_length} tokens", flush=True)
    expected = 0.0
    cal = None
    reuse = phase1_reuse(todo)
    if todo and not args.dry_run:
        t_start += wait_quiet(args.wait_quiet, "starting")[0]  # the wall time excludes the wait
    whole = OtherCpu().__enter__()
    if not args.no_calibrate and (todo or args.dry_run):
        with _captured(work / "calibration.txt", quiet):
            cal = calibrate(s, paths)
        expected = (sum(expected_seconds(j, cal, s, reuse[id(j)]) for j in todo)
                    + eval_count(s) * expected_eval_seconds(s, cal))
        print("  measured: " + ", ".join(f"{k} {v:.2f}s" for k, v in cal.items()), flush=True)
        print(f"  expected time: {expected / 60:.1f} min (training {len(todo)} runs + evaluations; cached "
              "evaluations are skipped, so this is an upper bound)", flush=True)
    if args.dry_run:
        for j in jobs:
            shared = " (phase 1 shared)" if reuse.get(id(j)) else ""
            print(f"    {'cached ' if j.done else 'train  '} {j.label}: {j.steps} steps{shared} -> {j.folder}")
        return {"jobs": len(jobs), "todo": len(todo), "expected_seconds": expected, "calibration": cal}

    evaluator = Evaluator(s, paths, work, quiet)
    by_key = {(j.kind if j.kind != "full-ft" else "task", j.variant, j.seed, j.target): j for j in jobs}
    evals: list[dict] = []
    trained = 0
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine_info("torch", "transformers"), "calibration": cal, "expected_seconds": expected}

    def write_results() -> dict:
        whole.__exit__(None, None, None)
        meta.update(wall_seconds=time.perf_counter() - t_start, trained=trained, reused=len(jobs) - len(todo),
                    other_cores_mean=whole.cores, quiet_projection=quiet_projection(jobs, evals))
        summary = summarize(s, evals, jobs)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"settings": asdict(s), "meta": meta, "summary": summary, "evaluations": evals,
                  "runs": [{"kind": j.kind, "variant": j.variant, "seed": j.seed, "target": j.target,
                            "steps": j.steps, "train_seconds": j.seconds(), "folder": str(j.folder)} for j in jobs]}
        write_json_atomic(prefixed(out, ".json"), result)
        atomic_write_text(prefixed(out, ".md"), markdown(s, summary, meta))
        html_report(s, summary, prefixed(out, ".html"))
        return result

    n_done = 0
    for seed in s.seeds:
        for j in [j for j in jobs if j.seed == seed]:
            n_done += 1
            if j.done:
                continue
            est = f"expected {expected_seconds(j, cal, s, reuse[id(j)]):.0f}s" if cal else "not calibrated"
            print(f"  [{n_done}/{len(jobs)}] train {j.label} ({est}) ...", end="", flush=True)
            try:
                secs = run_full_ft(j, quiet) if j.kind == "full-ft" else run_sft(j, args.keep_checkpoints, quiet)
            except DeftxError as e:
                print(f" failed: {e}")
                raise SystemExit(2)
            trained += 1
            print(f" {secs:.0f}s", flush=True)
        for name in s.methods:
            m = METHODS[name]
            task = by_key[("task", m.task, seed, None)]
            for where in ["source", *s.targets]:
                lang = by_key[("language", m.lang, seed, where)] if m.lang and where != "source" else None
                e = evaluator.evaluate(m, seed, where, task, lang)
                mine, ref = (task, ("task", "lt-sft", seed, None)) if where == "source" else \
                    (lang, ("language", "lt-sft", seed, where))
                if mine is not None and mine.kind != "full-ft" and mine.variant != "lt-sft" and ref in by_key:
                    e["mask_in_lt_sft"] = evaluator.share_in(mine, by_key[ref])
                evals.append(e)
            print(f"  seed {seed} {name}: " + ", ".join(
                f"{e['where']} {100 * e['macro_f1']:.1f}" for e in evals[-len(s.targets) - 1:]), flush=True)
        result = write_results()
    print(markdown(s, result["summary"], meta))
    print(f"results: {prefixed(out, '.json')}, {prefixed(out, '.md')}, {prefixed(out, '.html')}")
    return result


if __name__ == "__main__":
    main()
