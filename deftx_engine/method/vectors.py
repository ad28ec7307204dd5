"""Sparse fine-tuning vectors: phi = theta2 - theta0 on a few entries, plus whole heads.

A vector is a folder with two files, so that loading never runs code:
- ``sft_config.json``: metadata (base model, kind, language, labels, method, denoising, k, version) and the
  shape of every parameter the vector touches;
- ``sft_model.safetensors``: per maskable parameter ``<name>.idx`` (sorted row-major flat int32 indices)
  and ``<name>.val`` (the diffs), and per head parameter ``<name>.head`` (the whole trained tensor).
"""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import VectorError
from ..fileio import atomic_dir
from ..timing import Times, step
from .params import parameter_roles

# FORMAT and read_json are found here too (the "as" marks them re-exported), where they were before vector_meta
from .vector_meta import FORMAT as FORMAT
from .vector_meta import Component, VectorMeta, config_of, meta_from_config
from .vector_meta import read_json as read_json

CONFIG_FILE = "sft_config.json"
WEIGHTS_FILE = "sft_model.safetensors"


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the encoder's parameter names and shapes (pooler excluded: MLM models have none).

    A vector applied to a model with another fingerprint was made for another base model.
    """
    roles = parameter_roles(model)
    head = set(roles.heads)
    items = sorted((n, tuple(p.shape)) for n, p in model.named_parameters()
                   if n not in head and ".pooler." not in n and not _outside_encoder(model, n))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _outside_encoder(model: nn.Module, name: str) -> bool:
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and hasattr(model, prefix) and not name.startswith(prefix + ".")


@dataclass
class SparseVector:
    """One sparse fine-tuning: ``indices``/``values`` per maskable parameter, whole ``heads``."""

    meta: VectorMeta
    indices: dict[str, Tensor] = field(default_factory=dict)  # int32, sorted, unique
    values: dict[str, Tensor] = field(default_factory=dict)
    heads: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _checked: tuple | None = field(default=None, repr=False, compare=False)

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def from_diff(cls, meta: VectorMeta, theta0: Mapping[str, Tensor], model: nn.Module,
                  mask: Mapping[str, Tensor], head_names: Iterable[str] = ()) -> "SparseVector":
        """phi = theta(model) - theta0 at the masked entries, and the model's head tensors whole."""
        params = dict(model.named_parameters())
        vec = cls(meta)
        for name, idx in mask.items():
            if idx.numel() == 0:
                continue
            idx = idx.long()
            cur = params[name].detach().reshape(-1)
            vec.indices[name] = idx.to(torch.int32)
            vec.values[name] = (cur[idx] - theta0[name].reshape(-1)[idx]).float().cpu()
            vec.shapes[name] = tuple(params[name].shape)
        for name in head_names:
            vec.heads[name] = params[name].detach().float().cpu().clone()
            vec.shapes[name] = tuple(params[name].shape)
        vec.meta.k = vec.nnz
        return vec

    @property
    def nnz(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    def mask(self) -> dict[str, Tensor]:
        """The index sets, as a mask (for overlap reports)."""
        return {n: i.long() for n, i in self.indices.items()}

    # ---- checking ---------------------------------------------------------------------------------
    def check(self, where: str = "vector") -> None:
        """Internal consistency: sorted in-range indices, matching lengths, values within ``MAX_ABS_VALUE``.

        ``load`` runs it; ``validate`` runs it again only for vectors built or changed in memory.
        """
        for name, idx in self.indices.items():
            val = self.values.get(name)
            shape = self.shapes.get(name)
            if val is None or shape is None:
                raise VectorError(f"{where}: parameter {name!r} has indices but no values or shape")
            if idx.numel() != val.numel():
                raise VectorError(f"{where}: parameter {name!r} has {idx.numel()} indices but {val.numel()} values")
            numel = int(torch.Size(shape).numel())
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise VectorError(f"{where}: parameter {name!r} has indices outside [0, {numel}) for shape {shape}")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise VectorError(f"{where}: parameter {name!r} has unsorted or repeated indices")
            if not _bounded(val):
                raise VectorError(f"{where}: parameter {name!r} has values that are NaN, infinite or beyond "
                                  f"±{MAX_ABS_VALUE:g}")
        for name, t in self.heads.items():
            if not _bounded(t):
                raise VectorError(f"{where}: head parameter {name!r} has values that are NaN, infinite or beyond "
                                  f"±{MAX_ABS_VALUE:g}")
        self._checked = self._fingerprint_of_contents()

    def check_claims(self, where: str = "vector") -> None:
        """What the metadata says of the tensors holds: ``k`` entries, tensors for every shape listed, and (for a
        task vector, or any with labels) 1..``MAX_LABELS`` distinct label names, as many as the classifier head
        has outputs. ``save`` and ``load`` run it, so a file that says otherwise never loads (a config whose
        tensors were emptied would predict from a random head; a label count the head does not have fails in
        Predict)."""
        if self.meta.k != self.nnz:
            raise VectorError(f"{where}: field 'k' says {self.meta.k:,} entries, but the tensors hold {self.nnz:,}")
        unused = [n for n in self.shapes if n not in self.indices and n not in self.heads]
        if unused:
            raise VectorError(f"{where}: field 'shapes' lists {unused[0][:120]!r}, which has no tensors")
        labels = self.meta.label_names
        if not labels and self.meta.kind != "task":
            return
        if not 1 <= len(labels) <= MAX_LABELS or len(set(labels)) != len(labels):
            raise VectorError(f"{where}: field 'label_names' must hold 1 to {MAX_LABELS:,} distinct names, found "
                              f"{len(labels):,} ({len(set(labels)):,} distinct)")
        outputs = {t.shape[0] for n, t in self.heads.items() if t.dim() == 2 and ".pooler." not in n}
        if len(labels) not in outputs:
            raise VectorError(f"{where}: {len(labels):,} label names, but no classifier weight among the heads has "
                              f"{len(labels):,} outputs (found {sorted(outputs) or 'no classifier head'})")

    def _fingerprint_of_contents(self) -> tuple:
        """Cheap identity of the tensors checked: a vector edited in memory is checked again."""
        return tuple((n, id(t), t._version) for d in (self.indices, self.values, self.heads) for n, t in d.items())

    def validate(self, model: nn.Module, *, heads: bool = True, where: str = "vector") -> None:
        """Raise ``VectorError`` if this vector does not fit ``model``; never touches the model."""
        fp = base_fingerprint(model)
        if self.meta.base_fingerprint and self.meta.base_fingerprint != fp:
            raise VectorError(
                f"{where} was made for base model {self.meta.base_model!r} (fingerprint "
                f"{self.meta.base_fingerprint}), but this model's parameters differ (fingerprint {fp})")
        params = dict(model.named_parameters())
        names = list(self.indices) + (list(self.heads) if heads else [])
        for name in names:
            if name not in params:
                raise VectorError(f"{where}: the model has no parameter {name!r}")
            if tuple(params[name].shape) != tuple(self.shapes[name]):
                raise VectorError(f"{where}: parameter {name!r} has shape {tuple(self.shapes[name])} in the "
                                  f"vector but {tuple(params[name].shape)} in the model")
        if self._checked != self._fingerprint_of_contents():
            self.check(where)

    # ---- applying ---------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module, *, scale: float = 1.0, heads: bool = True,
              times: Times | None = None) -> nn.Module:
        """theta += scale * phi in place (and set heads); remembers the old entries for ``revert``.

        ``times`` (see ``timing``) gets the seconds of validate, save (old entries), add and heads.
        """
        with step(times, "validate"):
            self.validate(model, heads=heads)
        params = dict(model.named_parameters())
        saved: dict[str, Tensor] = {}
        for name, idx in self.indices.items():
            flat = params[name].data.view(-1)
            idx = idx.to(flat.device)  # int32 is accepted here: no int64 copy of 14M indices
            with step(times, "save"):
                saved[name] = flat.index_select(0, idx)
            with step(times, "add"):
                flat.index_add_(0, idx, self.values[name].to(flat.device, flat.dtype), alpha=scale)
        with step(times, "heads"):
            if heads:
                for name, t in self.heads.items():
                    saved[name + ".head"] = params[name].data.clone()
                    params[name].data.copy_(t)
        _APPLIED.setdefault(model, []).append((self, saved))
        return model

    @torch.no_grad()
    def revert(self, model: nn.Module, *, times: Times | None = None) -> nn.Module:
        """Undo this vector's ``apply`` on ``model`` bit-exactly (stored old entries are written back, not
        subtracted). Vectors applied on top of each other are undone last first: reverting one that is not the
        last applied to ``model`` would write back entries that the later vectors had already changed, so it is
        refused.

        ``times`` (see ``timing``) gets the seconds of indices (int32 -> int64), write back and heads.
        """
        stack = _APPLIED.get(model, [])
        if not any(vec is self for vec, _ in stack):
            raise VectorError("revert() without a matching apply() on this model")
        if stack[-1][0] is not self:
            last = stack[-1][0].meta
            raise VectorError(f"revert() out of order: the {last.kind} vector ({last.language or 'no language'}) "
                              "was applied to this model after this one; revert it first")
        saved = stack.pop()[1]
        params = dict(model.named_parameters())
        for name, old in saved.items():
            if name.endswith(".head"):
                with step(times, "heads"):
                    params[name[:-5]].data.copy_(old)
            else:
                with step(times, "indices"):  # index_copy_ needs int64
                    idx = self.indices[name].to(old.device, torch.int64)
                with step(times, "write back"):
                    params[name].data.view(-1).index_copy_(0, idx, old)
        return model

    # ---- saving and loading -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically: a temporary sibling is renamed over the target at the end."""
        self.check(str(folder))
        self.check_claims(str(folder))
        folder = Path(folder)
        with atomic_dir(folder, CONFIG_FILE) as tmp:
            tensors = {}
            for name, idx in self.indices.items():
                tensors[f"{name}.idx"] = idx.to(torch.int32).contiguous()
                tensors[f"{name}.val"] = self.values[name].contiguous()
            for name, t in self.heads.items():
                tensors[f"{name}.head"] = t.contiguous()
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            (tmp / CONFIG_FILE).write_text(json.dumps(config_of(self.meta, self.shapes), indent=2), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SparseVector":
        """Read a vector folder; any missing, corrupted or inconsistent file is a ``VectorError``."""
        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise VectorError(f"{p}: file not found (a vector folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        meta, shapes = meta_from_config(read_json(cfg_path), cfg_path)
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise VectorError(f"{w_path}: cannot be read as safetensors ({e})") from None
        vec = cls(meta, shapes=shapes)
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            if part not in ("idx", "val", "head") or name not in shapes:
                raise VectorError(f"{w_path}: unexpected tensor {key!r} (not listed in {CONFIG_FILE})")
            _check_tensor(w_path, key, part, t)
            {"idx": vec.indices, "val": vec.values, "head": vec.heads}[part][name] = t
        for name in vec.values.keys() - vec.indices.keys():
            raise VectorError(f"{w_path}: tensor {name + '.val'!r} has no {name + '.idx'!r}")
        for name, t in vec.heads.items():
            if tuple(t.shape) != shapes[name]:
                raise VectorError(f"{w_path}: head {name!r} has shape {tuple(t.shape)}, config says {shapes[name]}")
        vec.check(str(folder))
        vec.check_claims(str(cfg_path))
        return vec


# per model, the vectors applied to it and the entries each overwrote, last on top (for ``revert``); weak, so
# a model that is dropped takes its record with it
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[SparseVector, dict[str, Tensor]]]]" = \
    weakref.WeakKeyDictionary()
# |value| bound of every diff and head entry. Trained weights and their diffs are far below 1; at 1e3 a few vectors
# composed onto theta0 stay far from float32's 3.4e38, and a BERT-base forward pass with every weight at the bound
# stays finite (LayerNorm's variance peaks near 1e34), whereas 3e38 gives inf logits and NaN probabilities.
MAX_ABS_VALUE = 1e3
MAX_LABELS = 1000  # classes of a task vector's classifier head
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _bounded(t: Tensor) -> bool:
    return bool((t.abs() <= MAX_ABS_VALUE).all())  # False for NaN too


def _check_tensor(where: Path, key: str, part: str, t: Tensor) -> None:
    """Indices: 1-D int32/int64; values: 1-D real floats; heads: real floats (never complex or integer)."""
    if part == "idx" and (t.dtype not in INDEX_DTYPES or t.dim() != 1):
        raise VectorError(f"{where}: tensor {key!r} must be 1-D int32 indices, found {t.dim()}-D {t.dtype}")
    if part == "val" and (t.dtype not in VALUE_DTYPES or t.dim() != 1):
        raise VectorError(f"{where}: tensor {key!r} must be 1-D real floats, found {t.dim()}-D {t.dtype}")
    if part == "head" and t.dtype not in VALUE_DTYPES:
        raise VectorError(f"{where}: tensor {key!r} must hold real floats, found {t.dtype}")


def check_composable(vectors: Sequence[SparseVector], who: str) -> list[SparseVector]:
    """Raise ``VectorError`` (naming ``who``) unless ``vectors`` may be added onto one base model: at least one,
    one fingerprint and one base model name (an empty name is unknown, not another model: two bases of the same
    architecture share a fingerprint), no ``composed`` vector (its heads and scales are already in it), at most
    one task vector (the heads), and one shape per parameter. Returns the task vectors."""
    if not vectors:
        raise VectorError(f"{who} needs at least one vector")
    names = {v.meta.base_model for v in vectors if v.meta.base_model}
    if len({v.meta.base_fingerprint for v in vectors}) > 1 or len(names) > 1:
        bases = ", ".join(f"{v.meta.kind}:{v.meta.base_model}" for v in vectors)
        raise VectorError(f"{who}: the vectors were made for different base models ({bases})")
    if any(v.meta.kind == "composed" for v in vectors):
        raise VectorError(f"{who}: a composed vector cannot be composed again; give its task and language vectors")
    tasks = [v for v in vectors if v.meta.kind == "task"]
    if len(tasks) > 1:
        raise VectorError(f"{who}: more than one task vector; heads would be ambiguous")
    shapes: dict[str, tuple[int, ...]] = {}
    for v in vectors:
        for name, shape in v.shapes.items():
            if shapes.setdefault(name, tuple(shape)) != tuple(shape):
                raise VectorError(f"{who}: parameter {name!r} has shape {tuple(shape)} in the {v.meta.kind} vector "
                                  f"but {shapes[name]} in another one")
    return tasks


# (inverse, values, n) -> (which of the n distinct indices are kept, None: all; their merged values)
Combine = Callable[[Tensor, Tensor, int], tuple[Tensor | None, Tensor]]


def merge_core(vectors: Sequence[SparseVector], entries: Sequence[Mapping[str, tuple[Tensor, Tensor]]],
               combine: Combine, *, kind: str, method: str, scales: Sequence[float | None] | None = None,
               **meta_fields) -> SparseVector:
    """The one merge under ``compose`` and ``ties_merge``: ``entries[i]`` holds input i's (flat indices, values)
    per parameter, as that merge prepared them (scaled, trimmed); per parameter they are gathered, ``combine``
    merges the values of each distinct index (``inverse`` maps each value to its index), and the result takes
    its heads and labels from the task vector among ``vectors`` (checked by ``check_composable``: one at most).
    The metadata names the inputs (``components``, with ``scales``) and gets ``meta_fields``."""
    tasks = [v for v in vectors if v.meta.kind == "task"]
    first = vectors[0].meta
    scales = list(scales) if scales is not None else [None] * len(vectors)
    meta = VectorMeta(kind=kind, base_model=first.base_model, base_fingerprint=first.base_fingerprint,
                      language="+".join(v.meta.language for v in vectors if v.meta.language),
                      label_names=list(tasks[0].meta.label_names) if tasks else [], method=method,
                      components=[Component(v.meta.kind, v.meta.language, v.meta.method, s)
                                  for v, s in zip(vectors, scales, strict=True)], **meta_fields)
    out = SparseVector(meta)
    for name in dict.fromkeys(n for e in entries for n in e):
        parts = [e[name] for e in entries if name in e]
        idx = torch.cat([p[0] for p in parts])
        val = torch.cat([p[1] for p in parts])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        keep, merged = combine(inverse, val, uniq.numel())
        out.indices[name] = (uniq if keep is None else uniq[keep]).to(torch.int32)
        out.values[name] = merged
        out.shapes[name] = next(v.shapes[name] for v in vectors if name in v.shapes)
    if tasks:
        out.heads = dict(tasks[0].heads)
        out.shapes.update({n: tasks[0].shapes[n] for n in tasks[0].heads})
    out.meta.k = out.nnz
    return out


def _sum(inverse: Tensor, val: Tensor, n: int) -> tuple[None, Tensor]:
    return None, torch.zeros(n, dtype=val.dtype).index_add_(0, inverse, val)


def compose(vectors: Sequence[SparseVector], scales: Sequence[float] | None = None) -> SparseVector:
    """One vector whose diffs are the (scaled) sum of the given ones; heads come from the task vector.

    theta0 + compose([task, lang]) == theta0 + phi_task + phi_lang, applied in one pass.
    """
    check_composable(vectors, "compose()")
    scales = list(scales) if scales is not None else [1.0] * len(vectors)
    if len(scales) != len(vectors):
        raise VectorError(f"compose(): {len(vectors)} vectors but {len(scales)} scales")
    entries = [{n: (v.indices[n].long(), v.values[n] * s) for n in v.indices} for v, s in zip(vectors, scales)]
    return merge_core(vectors, entries, _sum, kind="composed", method=vectors[0].meta.method, scales=scales)
