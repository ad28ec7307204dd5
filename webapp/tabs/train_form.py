"""The Train tab's form: what the page (or an API caller of ``/start_training``) sends, as one ``TrainForm``, and
its one reading into the ``TrainConfig`` the registry queues. Each value is checked with a message naming its
control; the engine checks the rest (``TrainConfig.__post_init__``, shown by ``components.error_text``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deftx_engine.constants import KINDS
from deftx_engine.errors import DeftxError
from deftx_engine.models import presets as engine_presets
from deftx_engine.training.config import TrainConfig

from ..render import cut
from ..settings import max_lines
from ..state import Studio
from .train_checks import check_hardware, require_language

CUSTOM = "custom"  # the preset shown once a control was changed by hand


@dataclass(frozen=True)
class TrainForm:
    """The controls of the Train tab, as sent: text and numbers not yet checked. The fields are the parameters of
    the ``/start_training`` endpoint, in its order (``FORM_COMPONENTS`` names each one's control)."""

    kind: Any
    base_model: Any
    data: Any
    language: Any
    name: Any
    method: Any
    rank_policy: Any
    energy: Any
    rank: Any
    residual_share: Any
    k_percent: Any
    full_steps: Any
    sparse_steps: Any
    epochs: Any
    lr: Any
    batch_size: Any
    max_length: Any
    seed: Any
    text_column: Any
    pair_column: Any
    label_column: Any
    preset: Any
    k_exact_value: Any  # (shown %, exact count) when a preset's k is a count
    source_language_vector: Any = None  # a run id: the task SFT's starting point

    def config(self, studio: Studio) -> TrainConfig:
        """The run these settings ask for, checked: its data (a path the server may read, or ``hub:``), base model,
        language, numbers and source-language vector; a ``DeftxError`` names the first setting that is wrong."""
        kind = self.kind
        if kind not in KINDS:
            raise DeftxError("choose the kind of SFT: language or task")
        data = (self.data or "").strip()
        if not data:
            raise DeftxError("no training data: check a file in the Data tab first")
        if not data.startswith("hub:"):
            data = str(studio.check_path(data))
        k, lengths = self.k(), self.lengths()
        check_hardware(self.preset)
        values = dict(data=data, base_model=studio.check_base_model(self.base_model),
                      language=require_language(self.language, kind), method=self.method,
                      rank_policy=self.rank_policy, energy=number(self.energy, "τ"),
                      rank=number(self.rank, "r", integer=True), residual_share=number(self.residual_share, "ρ"),
                      k=k, lr=number(self.lr, "learning rate"),
                      batch_size=number(self.batch_size, "batch size", integer=True, minimum=1),
                      max_length=number(self.max_length, "max tokens", integer=True, minimum=1),
                      seed=number(self.seed, "seed", integer=True, minimum=0, default=0),
                      text_column=(self.text_column or "").strip() or None,
                      pair_column=(self.pair_column or "").strip() or None,
                      label_column=(self.label_column or "").strip() or "label", max_lines=max_lines(),
                      **lengths)
        values["source_language_vector"] = source_vector(studio, self.source_language_vector, kind,
                                                         values["base_model"])
        if self.preset and self.preset != CUSTOM:
            p = engine_presets.preset(self.preset, kind)
            values.update({k: p[k] for k in ("save_steps", "logging_steps") if k in p})
        return TrainConfig(kind=kind, **values)  # ConfigError -> inline message

    def k(self) -> float | int:
        """k as a share of the maskable parameters from the slider's %, or the preset's exact count while the
        slider still shows that preset's value."""
        k_percent = number(self.k_percent, "k")
        if self.k_exact_value and abs(k_percent - float(self.k_exact_value[0])) < 1e-9:
            return int(self.k_exact_value[1])
        if not 0 < k_percent / 100.0 < 1:
            raise DeftxError(f"k must be between 0 and 100 %, got {k_percent}")
        return k_percent / 100.0

    def lengths(self) -> dict[str, float | int]:
        """The phases' steps, and the epochs of each phase given no steps."""
        full_steps = number(self.full_steps, "phase-1 steps", integer=True, minimum=0, default=0)
        sparse_steps = number(self.sparse_steps, "phase-2 steps", integer=True, minimum=0, default=0)
        epochs = number(self.epochs, "epochs per phase", default=1.0)
        if (not full_steps or not sparse_steps) and epochs <= 0:
            raise DeftxError(f"epochs per phase must be > 0 when the steps are 0, got {epochs:g}")
        return {"full_steps": full_steps, "sparse_steps": sparse_steps,
                **({} if full_steps else {"full_epochs": epochs}),
                **({} if sparse_steps else {"sparse_epochs": epochs})}


# the control of each field of TrainForm
FORM_COMPONENTS = {"kind": "train.kind", "base_model": "train.base", "data": "train.data", "language": "train.lang",
                   "name": "train.name", "method": "train.method", "rank_policy": "train.policy",
                   "energy": "train.energy", "rank": "train.rank", "residual_share": "train.rho",
                   "k_percent": "train.k", "full_steps": "train.full", "sparse_steps": "train.sparse",
                   "epochs": "train.epochs",
                   "lr": "train.lr", "batch_size": "train.bs", "max_length": "train.maxlen", "seed": "train.seed",
                   "text_column": "train.textcol", "pair_column": "train.paircol", "label_column": "train.labelcol",
                   "preset": "train.preset", "k_exact_value": "train.k_exact",
                   "source_language_vector": "train.srclang"}


def number(value: Any, what: str, *, integer: bool = False, minimum: float | None = None,
           default: float | None = None) -> float | int:
    """A number from a form field or an API call; empty, NaN, infinite or out-of-range values are refused
    with a message naming the field (never a ValueError from int())."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            raise DeftxError(f"{what}: give a number")
        value = default
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DeftxError(f"{what} must be a number, got {cut(value, 40)!r}") from None
    if math.isnan(x) or math.isinf(x):
        raise DeftxError(f"{what} must be a finite number, got {value}")
    if integer:
        if x != int(x):
            raise DeftxError(f"{what} must be a whole number, got {value}")
        x = int(x)
    if minimum is not None and x < minimum:
        raise DeftxError(f"{what} must be at least {minimum:g}, got {value}")
    return x


def source_vector(studio: Studio, run_id: str | None, kind: str, base_model: str) -> str | None:
    """The vector folder of the chosen source-language run, checked: a done language vector of ``base_model``."""
    if not run_id or kind != "task":
        return None
    folder = studio.run_vector_dir(run_id, "source-language vector")
    row = studio.registry.get(run_id)
    if row["kind"] != "language":
        raise DeftxError(f"the source-language vector must be a language vector; {row['name']} is a {row['kind']} one")
    if row["config"].get("base_model") != base_model:
        raise DeftxError(f"the source-language vector {row['name']} was trained on "
                         f"{studio.shown_path(str(row['config'].get('base_model')))}, not on "
                         f"{studio.shown_path(base_model)}: choose one of the same base model")
    return folder
