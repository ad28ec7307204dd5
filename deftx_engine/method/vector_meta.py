"""A vector's metadata: the typed record ``VectorMeta`` and its file, ``sft_config.json``, read and checked once.

Schema 2 (``schema_version`` in the file) holds every field of ``VectorMeta`` at the top level. Schema 1 (files
without ``schema_version``) kept the training settings, metrics, components of a composition and the like in one
free-form object, ``extra``; those keys become their typed fields when such a file is read (or when a caller
still passes them in ``extra``). What ``extra`` holds beyond them -- keys this version does not interpret, such as
a benchmark's note -- is kept in ``extra`` as it is and written back: such files loaded before, and must still.
A file of a newer schema is refused with a message (its fields may mean what this version cannot know), never
half-read.

Torch-free, so the web app reads a vector's metadata without loading torch.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import VectorError

FORMAT = "deftx-sft/1"
SCHEMA_VERSION = 2  # 1: files without the field (known keys in "extra"); 2: typed fields at the top level
MAX_CONFIG_BYTES = 64 * 2 ** 20
MAX_JSON_DEPTH = 32  # a vector config nests 5 deep; deeper JSON would crash the recursive readers of its metadata
KINDS_OF_VECTORS = ("language", "task", "composed")
MAX_SHAPE_DIMS = 8


@dataclass
class Component:
    """One input of a composition (``compose``) or a TIES merge: what it was, and its scale (None for TIES)."""

    kind: str
    language: str = ""
    method: str = ""
    scale: float | None = None


@dataclass
class HeadFit:
    """The MLM head fitted before a language SFT (``mlm_head.py``): its held-out loss and top-1, the steps it
    took, the layer it reads (None: the last) and the corpus lines it was fitted on."""

    heldout: dict[str, float]
    steps: int
    layer: int | None
    n_lines: int


@dataclass
class VectorMeta:
    """Everything needed to reuse a vector later, on another machine or from the Hub."""

    kind: str  # "language" | "task" | "composed"
    base_model: str
    base_fingerprint: str
    language: str = ""
    label_names: list[str] = field(default_factory=list)
    method: str = "deftx"  # "deftx" | "lt-sft" | "ties" | ...
    denoise: dict | None = None  # DenoiseConfig.to_dict() for deftx, None for lt-sft
    k: int = 0
    engine_version: str = __version__
    train: dict[str, Any] | None = None  # TrainConfig.to_dict() of the run that made it (as recorded then)
    n_maskable: int | None = None  # entries the run could choose from (k's denominator)
    heldout_mlm: dict[str, Any] | None = None  # language SFT: masked-token scores on held-out text (report.py)
    mlm_head: HeadFit | None = None
    metrics: dict[str, Any] | None = None  # evaluation scores, shown on the model card
    components: list[Component] = field(default_factory=list)  # of a composition or a TIES merge
    ties: dict[str, float] | None = None  # {"density", "lambda"} of a TIES merge
    converted_from: str = ""  # "composable-sft" for an imported vector
    skipped_parameters: list[str] = field(default_factory=list)  # of an imported vector: not in the encoder
    license: str = ""  # the model card's licence
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not interpret, kept verbatim

    def __post_init__(self) -> None:
        # known keys in ``extra`` are how schema 1 (and callers written for it) spelled these fields
        for key in [k for k in self.extra if k in FROM_EXTRA]:
            setattr(self, key, self.extra[key])
        self.extra = {k: v for k, v in self.extra.items() if k not in FROM_EXTRA}
        if isinstance(self.mlm_head, dict):
            self.mlm_head = HeadFit(**self.mlm_head)
        self.components = [c if isinstance(c, Component) else Component(**c) for c in self.components]


# the fields schema 1 kept in ``extra``
FROM_EXTRA = frozenset({"train", "n_maskable", "heldout_mlm", "mlm_head", "metrics", "components", "ties",
                        "converted_from", "skipped_parameters", "license"})


def config_of(meta: VectorMeta, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The JSON object of ``sft_config.json`` (schema ``SCHEMA_VERSION``)."""
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, **asdict(meta),
            "shapes": {n: list(s) for n, s in shapes.items()}}


# ---- reading ----------------------------------------------------------------------------------------
def _nesting(value: Any) -> int:
    """How deep lists and objects nest in ``value``, found without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: Path, what: str = "a vector config") -> Any:
    """The JSON value in ``path``, read as ``what``: only a regular file of at most ``MAX_CONFIG_BYTES``,
    nested at most ``MAX_JSON_DEPTH`` deep; anything else (a FIFO, /dev/zero, bad UTF-8 or JSON, a
    5,000-digit integer, 200,000 nested lists) is one ``VectorError`` naming the file, never a hang, a
    RecursionError or a reader crashing later."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise VectorError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise VectorError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise VectorError(f"{path}: more than {MAX_CONFIG_BYTES:,} bytes, more than {what} can hold")
    too_deep = VectorError(f"{path}: nested more than {MAX_JSON_DEPTH} deep, too deep to be {what}")
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers of over 4,300 digits
        raise VectorError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise too_deep from None
    if _nesting(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _is_scalar(x) -> bool:
    return x is None or isinstance(x, (str, bool, int, float))


def _strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _head_fit(x) -> bool:
    return (isinstance(x, dict) and x.keys() == {f.name for f in fields(HeadFit)} and isinstance(x["heldout"], dict)
            and all(_is_number(v) for v in x["heldout"].values()) and _is_int(x["steps"]) and _is_int(x["n_lines"])
            and (x["layer"] is None or _is_int(x["layer"])))


def _component(x) -> bool:
    return (isinstance(x, dict) and isinstance(x.get("kind"), str) and x.keys() <= {f.name for f in fields(Component)}
            and all(isinstance(x.get(k, ""), str) for k in ("language", "method"))
            and (x.get("scale") is None or _is_number(x["scale"])))


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


# every field but kind, base_model, base_fingerprint (required) and shapes: (check, what it must be)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "language": (lambda x: isinstance(x, str), "a string"), "method": (lambda x: isinstance(x, str), "a string"),
    "engine_version": (lambda x: isinstance(x, str), "a string"),
    "converted_from": (lambda x: isinstance(x, str), "a string"), "license": (lambda x: isinstance(x, str), "a string"),
    "label_names": (_strings, "a list of strings"), "skipped_parameters": (_strings, "a list of strings"),
    "k": (lambda x: _is_int(x) and x >= 0, "a whole number >= 0"),
    "n_maskable": (_optional(lambda x: _is_int(x) and x >= 0), "null or a whole number >= 0"),
    "denoise": (_optional(lambda x: isinstance(x, dict) and all(_is_scalar(v) for v in x.values())),
                "null or an object of numbers and strings"),
    "train": (_optional(lambda x: isinstance(x, dict)), "null or an object"),
    "heldout_mlm": (_optional(lambda x: isinstance(x, dict)), "null or an object"),
    "metrics": (_optional(lambda x: isinstance(x, dict)), "null or an object"),
    "ties": (_optional(lambda x: isinstance(x, dict) and all(_is_number(v) for v in x.values())),
             "null or an object of numbers"),
    "mlm_head": (_optional(_head_fit), "null or an object of heldout (an object of numbers), steps, layer and "
                                       "n_lines (whole numbers)"),
    "components": (lambda x: isinstance(x, list) and all(_component(c) for c in x),
                   "a list of objects of kind, language, method (strings) and scale (a number or null)"),
    "extra": (lambda x: isinstance(x, dict), "an object"),
}


def _shapes(raw: Any, where: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, shape in raw.items():
        if not (isinstance(shape, list) and len(shape) <= MAX_SHAPE_DIMS and all(_is_int(x) and x >= 0 for x in shape)):
            raise VectorError(f"{where}: field 'shapes' of {name[:120]!r} must be a list of at most {MAX_SHAPE_DIMS} "
                              "whole numbers >= 0")
        if math.prod(shape) >= 2 ** 31:
            raise VectorError(f"{where}: field 'shapes' of {name[:120]!r} has more entries than int32 indices "
                              "can address")
        shapes[name] = tuple(shape)
    return shapes


def meta_from_config(config, where: Path) -> tuple[VectorMeta, dict[str, tuple[int, ...]]]:
    """The metadata and shapes of a vector config (schema 1 or 2), every field checked for its type once, here:
    any error names the file and the field, so a mistyped vector never half-loads or fails later in Analyze or
    Predict."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise VectorError(f"{where}: not a DeFT-X vector config (expected format {FORMAT!r})")

    def bad(name: str, expected: str, value: Any = None, given: bool = True) -> VectorError:
        got = "nothing" if not given else repr(value)[:40] if _is_scalar(value) else type(value).__name__
        return VectorError(f"{where}: field {name!r} must be {expected}, found {got}")

    version = config.get("schema_version", 1)
    if not (_is_int(version) and version >= 1):
        raise bad("schema_version", "a whole number >= 1", version)
    if version > SCHEMA_VERSION:
        raise VectorError(f"{where}: written by a newer DeFT-X (vector schema {version}; this version reads up to "
                          f"{SCHEMA_VERSION}): update deftx_engine to load it")
    known = {f.name for f in fields(VectorMeta)} | {"format", "schema_version", "shapes"}
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise VectorError(f"{where}: unknown field {str(unknown[0])[:80]!r} (a vector config holds "
                          f"{', '.join(sorted(known))})")
    if config.get("kind") not in KINDS_OF_VECTORS:
        raise bad("kind", " or ".join(repr(k) for k in KINDS_OF_VECTORS), config.get("kind"), "kind" in config)
    for name in ("base_model", "base_fingerprint"):
        if not isinstance(config.get(name), str):
            raise bad(name, "a string", config.get(name), name in config)
    extra = config.get("extra", {})
    legacy = {k: v for k, v in extra.items() if k in FROM_EXTRA} if isinstance(extra, dict) else {}
    for name, (check, expected) in CHECKS.items():
        for shown, source in ((name, config), (f"extra.{name}", legacy)):
            if name in source and not check(source[name]):
                raise bad(shown, expected, source[name])
    if not isinstance(config.get("shapes"), dict):
        raise bad("shapes", "an object of parameter shapes", config.get("shapes"), "shapes" in config)
    shapes = _shapes(config["shapes"], where)
    meta = VectorMeta(**{k: v for k, v in config.items() if k not in ("format", "schema_version", "shapes")})
    return meta, shapes


def heldout_line(held: dict | None) -> str | None:
    """One sentence on whether a language vector learned its language (masked-token loss on held-out text)."""
    try:
        a, b, e = held["theta0"], held["theta0+phi"], held["encoder_only"]
        float(a["loss"]), float(b["loss"]), float(e["loss"]), float(a["accuracy"]), float(b["accuracy"])
    except (TypeError, KeyError, ValueError):  # absent (task vectors, older vectors) or not numbers
        return None
    verdict = "lower: it learned its language" if e["loss"] < a["loss"] else "NOT lower: it did not learn its language"
    return (f"held-out masked-token loss ({held['lines']} lines): θ0 {a['loss']:.3f} (top-1 {a['accuracy']:.1%}), "
            f"θ0 + φ {b['loss']:.3f} (top-1 {b['accuracy']:.1%}); with θ0's head {e['loss']:.3f} -- "
            f"{verdict}")
