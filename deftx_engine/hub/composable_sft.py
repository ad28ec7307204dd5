"""Import composable-sft (Ansell et al., 2022) vectors: ``pytorch_diff.bin`` -> a DeFT-X vector folder.

The file is a torch pickle; it is read with ``torch.load(weights_only=True)`` so that a malicious pickle
cannot run code. ``hub.pull_vector`` calls ``convert_composable_sft`` when a pulled folder holds one.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import VectorError
from ..method.params import ParameterRoles, parameter_roles
from ..method.vector_meta import VectorMeta, read_json
from ..method.vectors import SparseVector, base_fingerprint

logger = logging.getLogger(__name__)

CSFT_FILE = "pytorch_diff.bin"  # composable-sft's weights file (a torch pickle)
HEAD_PREFIXES = ("lm_head", "cls.", "classifier")  # outside the encoder when no model tells us


def _numpy_scalar_globals() -> list:
    """What a numpy integer scalar unpickles through, under both of numpy's module names: composable-sft's
    ``encode_sparse_tensor`` stores each diff's first index step as a numpy int64 (``[indices[0]] + steps``).
    Rebuilding a scalar from a dtype and raw bytes runs no code, so ``weights_only`` loading may allow it."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    # a dtype is rebuilt as np.dtype, then its state is set on the instance, whose class is np.dtypes.Int64DType
    int_dtypes = [getattr(np.dtypes, f"{c}{b}DType") for c in ("Int", "UInt") for b in (8, 16, 32, 64)]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *int_dtypes]


def _load_csft(path: Path) -> Any:
    """torch.load with weights_only=True: only tensors, plain containers and numpy integer scalars; never runs
    pickled code."""
    if not path.is_file():
        raise VectorError(f"{path}: file not found (a composable-sft vector holds {CSFT_FILE})")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_scalar_globals()):
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- UnpicklingError, RuntimeError, EOFError, ... all mean "refused"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        why = why.split(" In PyTorch 2.6")[0][:300]
        raise VectorError(f"{path}: cannot be read as a composable-sft vector; only tensors are accepted, so "
                          f"the file was refused without running it ({type(e).__name__}: {why})") from None


def _row_major(coords: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Row-major flat indices of (ndim, nnz) coordinates."""
    flat = torch.zeros(coords.shape[-1], dtype=torch.long)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        flat += coords[d].long() * stride
        stride *= int(shape[d])
    return flat


def _size(name: str, size: Any, where: Path) -> tuple[int, ...]:
    """A diff's 'size': at most 8 whole numbers >= 0 (a float or negative size is refused, not rounded)."""
    items = size.tolist() if isinstance(size, Tensor) else size
    if not (isinstance(items, (list, tuple, torch.Size)) and len(items) <= 8
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items)):
        raise VectorError(f"{where}: parameter {name!r}: 'size' must be a list of at most 8 whole numbers >= 0")
    return tuple(items)


def _numbers(name: str, what: str, obj: Any, where: Path, *, integer: bool) -> Tensor:
    """A field of a diff as a tensor of whole numbers (``integer``) or real numbers; complex, boolean or
    (for indices) fractional values are refused, never truncated. An empty list (a parameter the mask left
    untouched: composable-sft stores it as ``[]``) is an empty tensor of whole numbers."""
    if isinstance(obj, (list, tuple)) and not obj:
        return torch.zeros(0, dtype=torch.long if integer else torch.float32)
    try:
        t = obj if isinstance(obj, Tensor) else torch.as_tensor(obj)
    except (TypeError, ValueError, RuntimeError) as e:
        raise VectorError(f"{where}: parameter {name!r}: {what!r} is not a list of numbers ({e})") from None
    if t.layout != torch.strided or t.dtype == torch.bool or t.is_complex() or (integer and t.is_floating_point()):
        kind = "whole numbers" if integer else "real numbers"
        raise VectorError(f"{where}: parameter {name!r}: {what!r} must hold {kind}, found {t.dtype}")
    return t


def _within(name: str, coords: Tensor, shape: tuple[int, ...], where: Path) -> Tensor:
    """Coordinates each within its dimension: one past a row's end would alias an entry of the next row."""
    for d, s in enumerate(shape):
        if coords.shape[1] and (int(coords[d].min()) < 0 or int(coords[d].max()) >= s):
            raise VectorError(f"{where}: parameter {name!r} has coordinates outside its shape {shape}")
    return coords


def _sparse_entries(name: str, obj: Any, where: Path) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(sorted row-major flat indices, values, shape) of one composable-sft diff, zeros dropped."""
    if isinstance(obj, Tensor):
        if obj.is_complex() or obj.dtype == torch.bool:
            raise VectorError(f"{where}: parameter {name!r} must hold real numbers, found {obj.dtype}")
        shape = tuple(obj.shape)
        if obj.layout == torch.sparse_coo:
            sp = obj.coalesce()
            flat, val = _row_major(_within(name, sp.indices(), shape, where), shape), sp.values().reshape(-1)
        elif obj.layout == torch.strided:
            dense = obj.reshape(-1)
            flat = torch.nonzero(dense, as_tuple=False).reshape(-1)
            val = dense[flat]
        else:
            raise VectorError(f"{where}: parameter {name!r} has unsupported tensor layout {obj.layout}")
    elif isinstance(obj, Mapping) and "size" in obj and "values" in obj and ("indices" in obj or "index_steps" in obj):
        shape = _size(name, obj["size"], where)
        val = _numbers(name, "values", obj["values"], where, integer=False).reshape(-1)
        numel = int(torch.Size(shape).numel())
        if "indices" in obj:  # older composable-sft: COO coordinate lists, one per dimension
            coords = _numbers(name, "indices", obj["indices"], where, integer=True)
            if coords.dim() != 2 or coords.shape[0] != len(shape):
                raise VectorError(f"{where}: parameter {name!r}: 'indices' must be {len(shape)} rows of coordinates "
                                  f"(one per dimension of {shape}), found shape {tuple(coords.shape)}")
            flat = _row_major(_within(name, coords, shape, where), shape)
        else:  # newer: deltas of column-major flat indices (first dimension fastest)
            steps = _numbers(name, "index_steps", obj["index_steps"], where, integer=True)
            if steps.dim() != 1 or (steps.numel() and int(steps.min()) < 0):
                raise VectorError(f"{where}: parameter {name!r}: 'index_steps' must be a 1-D list of steps >= 0")
            colmajor = torch.cumsum(steps.long(), 0)
            if colmajor.numel() and int(colmajor[-1]) >= numel:  # would wrap around silently below
                raise VectorError(f"{where}: parameter {name!r} has indices outside its shape {shape}")
            coords, rest = [], colmajor
            for s in shape:
                coords.append(rest % s)
                rest = rest // s
            flat = _row_major(torch.stack(coords) if coords else colmajor[None], shape)
    else:
        raise VectorError(f"{where}: parameter {name!r} is a {type(obj).__name__}, not a diff tensor")
    if flat.numel() != val.numel():
        raise VectorError(f"{where}: parameter {name!r} has {flat.numel()} indices but {val.numel()} values")
    numel = int(torch.Size(shape).numel())
    if numel >= 2 ** 31:
        raise VectorError(f"{where}: parameter {name!r} has {numel} entries, more than int32 indices can address")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel):
        raise VectorError(f"{where}: parameter {name!r} has indices outside its shape {shape}")
    val = val.float()
    keep = val != 0
    flat, val = flat[keep], val[keep]
    order = torch.argsort(flat)
    flat, val = flat[order], val[order]
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise VectorError(f"{where}: parameter {name!r} has repeated indices")
    return flat.to(torch.int32), val.contiguous(), shape


def guess_from_name(text: str) -> tuple[str | None, str | None]:
    """(kind, language) from a composable-sft repo name such as 'cambridgeltl/mbert-lang-sft-bxr-small'."""
    low = text.lower().rsplit("/", 1)[-1]
    m = re.search(r"lang-sft-([a-z]{2,3}(?:_[a-z]+)?)(?=[-_.]|$)", low)
    if m:
        return "language", m.group(1)
    if "task-sft" in low:
        return "task", None
    return None, None


def _model_config(src: Path) -> dict:
    """The pulled folder's config.json, or {} if there is none or it cannot be read (it only fills in names)."""
    try:
        data = read_json(src / "config.json", "a model config")
    except VectorError:
        return {}
    return data if isinstance(data, dict) else {}


def _base_model_from_config(config: dict) -> str:
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and name and not os.path.isabs(name) else ""


def _label_names(config: Mapping, heads: Mapping[str, Tensor]) -> list[str]:
    """A task head's label names: the config's ``id2label`` (the model's, or the pulled config.json's) when it
    names every output of the head, else transformers' own default names ``LABEL_0``, ``LABEL_1``, ... for the
    outputs of the head's one classifier weight (none if that is ambiguous: the save then says so)."""
    outputs = {int(t.shape[0]) for n, t in heads.items() if t.dim() == 2 and ".pooler." not in n}
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping):
        names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
        if names and len(names) in outputs and all(isinstance(x, str) for x in names):
            return names
    return [f"LABEL_{i}" for i in range(outputs.pop())] if len(outputs) == 1 else []


def _diff_sections(path: Path) -> tuple[Mapping, Mapping]:
    """(parameter diffs, whole heads) of the file, whichever of its three layouts it has."""
    raw = _load_csft(path)
    if not isinstance(raw, Mapping):
        raise VectorError(f"{path}: expected a dict of parameter diffs, found a {type(raw).__name__}")
    sections = next((s for s in (("diffs", "abs"), ("body", "head")) if isinstance(raw.get(s[0]), Mapping)), None)
    if sections is not None:
        body, head = raw[sections[0]], raw.get(sections[1]) or {}
    else:
        body, head = raw, {}
    if not isinstance(head, Mapping):
        raise VectorError(f"{path}: {sections[1]!r} is a {type(head).__name__}, expected a dict of tensors")
    return body, head


def _encoder_rule(path: Path, model: nn.Module | None, roles: ParameterRoles | None) -> Callable[[str], bool]:
    """Whether a diff's parameter is the encoder's (kept) or a head's (skipped): by ``roles`` when a model is
    given, where a name the model lacks is an error, else by the name prefixes."""
    # the frozen LayerNorms include the MLM head's (cls.predictions.transform.LayerNorm, lm_head.layer_norm):
    # encoder only within the base model, or a language vector would not fit a classifier
    prefix = getattr(model, "base_model_prefix", "") or ""
    encoder = None if roles is None else set(roles.maskable) | {
        n for n in roles.frozen if not (prefix and hasattr(model, prefix)) or n.startswith(prefix + ".")}

    def in_encoder(name: str) -> bool:
        if encoder is None:
            return not name.startswith(HEAD_PREFIXES)
        if name in encoder:
            return True
        if name in roles.heads or name in roles.frozen or name.startswith(HEAD_PREFIXES):
            return False
        raise VectorError(f"{path}: parameter {name!r} is not in the given model (was the vector made for "
                          f"another model class or base model?)")

    return in_encoder


def _add_encoder_diffs(vec: SparseVector, body: Mapping, in_encoder: Callable[[str], bool], path: Path) -> list[str]:
    """The encoder's nonzero diffs into ``vec``; returns the names of the parameters skipped as heads'."""
    skipped: list[str] = []
    for name, obj in body.items():
        if not isinstance(name, str):
            raise VectorError(f"{path}: parameter names must be strings, found {name!r}")
        if not in_encoder(name):
            skipped.append(name)
            continue
        idx, val, shape = _sparse_entries(name, obj, path)
        vec.shapes[name] = shape
        if idx.numel():
            vec.indices[name], vec.values[name] = idx, val
    return skipped


def _add_heads(vec: SparseVector, head: Mapping, roles: ParameterRoles | None, path: Path) -> list[str]:
    """A task vector's whole head tensors into ``vec`` (one is required); returns the names skipped because the
    given model has no such head."""
    skipped: list[str] = []
    head_names = set(roles.heads) if roles is not None else None
    for name, t in head.items():
        if not isinstance(t, Tensor) or t.layout != torch.strided or t.is_complex() or t.dtype == torch.bool:
            raise VectorError(f"{path}: head parameter {name!r} is not a dense tensor of real numbers")
        if head_names is not None and name not in head_names:
            skipped.append(name)
            continue
        vec.heads[name] = t.detach().float().cpu().clone()
        vec.shapes[name] = tuple(t.shape)
    if not vec.heads:
        raise VectorError(f"{path}: a task vector needs its classification head, and the file has none (no "
                          "'head' section): without it the model would predict from a random head")
    return skipped


def convert_composable_sft(src: str | Path, dest: str | Path, *, base_model: str = "", kind: str = "language",
                           language: str = "", model: nn.Module | None = None,
                           label_names: Sequence[str] = ()) -> SparseVector:
    """Convert a composable-sft vector folder (``pytorch_diff.bin``) into a DeFT-X vector saved at ``dest``.

    Reads the released layout ``{'diffs': {param: encoded diff}, 'abs': {param: whole tensor}}``
    (composable-sft's ``SFT.save``), ``{param: dense diff}`` and ``{'body': {...}, 'head': {...}}``, with sparse
    COO tensors and the coordinate-list encodings, with ``weights_only=True``. Encoder diffs are kept under
    their HF names, LayerNorm diffs included (composable-sft trains them by default). Parameters outside
    the encoder (MLM / classification head diffs) are skipped: decided by ``parameter_roles(model)`` if a
    model is given, else by the name prefixes lm_head / cls. / classifier. Whole heads (an 'abs' or 'head'
    section) are kept for task vectors only, with ``label_names`` in head order (the file does not hold them;
    none given: the model's or the pulled config.json's ``id2label``, else ``LABEL_0``, ``LABEL_1``, ...).
    With ``model`` the vector gets its fingerprint and is validated.
    """
    src, dest = Path(src), Path(dest)
    path = src / CSFT_FILE
    body, head = _diff_sections(path)
    roles = parameter_roles(model) if model is not None else None
    in_encoder = _encoder_rule(path, model, roles)
    if not base_model and model is not None:
        base_model = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    config = _model_config(src)
    meta = VectorMeta(kind=kind, base_model=base_model or _base_model_from_config(config),
                      base_fingerprint=base_fingerprint(model) if model is not None else "",
                      language=language, label_names=list(label_names), method="lt-sft", denoise=None,
                      converted_from="composable-sft")
    vec = SparseVector(meta)
    skipped = _add_encoder_diffs(vec, body, in_encoder, path)
    if kind == "task":
        skipped += _add_heads(vec, head, roles, path)
        if not meta.label_names:  # none given: the model's (or the pulled config.json's) names, else LABEL_i
            meta.label_names = _label_names(model.config.to_dict() if model is not None else config, vec.heads)
    else:
        skipped += [str(n) for n in head]
    vec.shapes = {n: s for n, s in vec.shapes.items() if n in vec.indices or n in vec.heads}
    if not vec.indices and not vec.heads:
        raise VectorError(f"{path}: no nonzero encoder diffs found (skipped: {', '.join(skipped) or 'none'})")
    if skipped:
        meta.skipped_parameters = skipped
    meta.k = vec.nnz
    if model is not None:
        vec.validate(model, where=str(path))
    vec.save(dest)
    logger.info("converted %s (%d entries, %d skipped parameters) into %s", path, meta.k, len(skipped), dest)
    return vec
