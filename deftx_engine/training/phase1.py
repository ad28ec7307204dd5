"""Phase-1 deltas on disk, so runs that share a phase 1 train it once.

DeFT-X, LT-SFT and the paper's ablations differ only in how the mask is chosen from the phase-1 delta
theta1 - theta0 and in phase 2; with the same data, seed and phase-1 settings
(``TrainConfig.phase1_settings``) their phase 1 is the same computation. A benchmark comparing five
variants on one seed thus pays for one phase 1 instead of five.

The file holds the delta of every maskable parameter. A matrix whose rows are mostly untouched (the
embedding matrix, of which phase 1 trains only the rows the data uses) keeps only its changed rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ..errors import DeftxError
from ..fileio import atomic_write_bytes
from .config import same_run

_ROWS, _VALUES = "::rows", "::values"


def save_deltas(path: str | Path, deltas: dict[str, Tensor], settings: dict) -> None:
    """Write ``deltas`` (name -> theta1 - theta0) to ``path`` atomically, with the settings they came from."""
    out: dict[str, Tensor] = {}
    shapes = {}
    for name, d in deltas.items():
        d = d.detach().float().cpu()
        shapes[name] = list(d.shape)
        if d.dim() == 2:
            rows = d.abs().sum(1).nonzero().view(-1)
            if rows.numel() < d.shape[0] // 2:
                out[name + _ROWS], out[name + _VALUES] = rows, d[rows].contiguous()
                continue
        out[name] = d.contiguous()
    meta = {"settings": json.dumps(settings, sort_keys=True, default=str), "shapes": json.dumps(shapes)}
    atomic_write_bytes(path, save(out, metadata=meta))


def load_deltas(path: str | Path, settings: dict, shapes: dict[str, torch.Size]) -> dict[str, Tensor] | None:
    """The deltas saved at ``path``, or None if there is no such file. A file written for other settings or
    other parameters is an error (the caller keyed it wrongly), never silently used."""
    path = Path(path)
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    written = json.loads(json.dumps(settings, default=str))  # the settings as the file holds them
    if not same_run(json.loads(meta.get("settings", "{}")), written):
        raise DeftxError(f"{path}: phase-1 deltas of other settings; delete the file or use another path")
    saved = {n: tuple(s) for n, s in json.loads(meta.get("shapes", "{}")).items()}
    want = {n: tuple(s) for n, s in shapes.items()}
    if saved != want:
        raise DeftxError(f"{path}: phase-1 deltas of other parameters ({len(saved)} saved, {len(want)} expected)")
    tensors = load_file(str(path))
    deltas = {}
    for name, shape in want.items():
        if name in tensors:
            deltas[name] = tensors[name]
        else:
            d = torch.zeros(shape)
            d[tensors[name + _ROWS]] = tensors[name + _VALUES]
            deltas[name] = d
    return deltas
