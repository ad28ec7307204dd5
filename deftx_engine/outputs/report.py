"""``deftx inspect``: what a set of vectors (and a run's denoising) look like, as JSON and Plotly HTML."""
from __future__ import annotations

import itertools
from dataclasses import asdict
from html import escape as html_escape
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import DeftxError
from ..fileio import atomic_write_text
from ..method.masks import densities, overlap
from ..method.params import layer_of, module_type
from ..method.vector_meta import heldout_line
from ..method.vectors import SparseVector
from ..training.runs import RunDir, read_json


def vector_summary(vec: SparseVector) -> dict:
    shapes = {n: vec.shapes[n] for n in vec.indices}
    mask = vec.mask()
    n_maskable = vec.meta.n_maskable
    return {"kind": vec.meta.kind, "language": vec.meta.language, "method": vec.meta.method,
            "base_model": vec.meta.base_model, "nnz": vec.nnz, "labels": vec.meta.label_names,
            "density_of_maskable": vec.nnz / n_maskable if n_maskable else None,
            "heads": sorted(vec.heads), "denoise": vec.meta.denoise,
            "heldout_mlm": vec.meta.heldout_mlm, "mlm_head": asdict(vec.meta.mlm_head) if vec.meta.mlm_head else None,
            "density_per_layer": densities(mask, shapes, layer_of),
            "density_per_module": densities(mask, shapes, module_type)}


def text_summary(report: dict) -> str:
    """What ``deftx inspect`` prints: a few readable lines per vector and per pair (``--json`` for all)."""
    out = []
    for path, v in report["vectors"].items():
        density = f", {v['density_of_maskable']:.2%} of the maskable parameters" if v["density_of_maskable"] else ""
        out.append(f"{path}: {v['kind']} vector ({v['language'] or 'no language'}), method {v['method']}, "
                   f"base {v['base_model']}, {v['nnz']:,} entries{density}")
        order = sorted(v["density_per_layer"], key=lambda k: (
            k.startswith("layer."), int(k[6:]) if k.startswith("layer.") and k[6:].isdigit() else 0, k))
        layers = ", ".join(f"{k} {v['density_per_layer'][k]:.1%}" for k in order)
        out.append(f"  density per layer: {layers}")
        if v["labels"]:
            out.append(f"  labels: {', '.join(v['labels'])}")
        if v["mlm_head"]:
            h = v["mlm_head"]["heldout"]
            out.append(f"  fitted MLM head (layer {v['mlm_head']['layer'] or 'last'}): held-out loss {h['loss']:.3f}, "
                       f"top-1 {h['accuracy']:.1%}")
        if heldout_line(v["heldout_mlm"]):
            out.append("  " + heldout_line(v["heldout_mlm"]))
    for key, o in report["overlap"].items():
        out.append(f"overlap {key}: {o['overall']['shared']:,} shared entries, Jaccard {o['overall']['jaccard']:.3f}")
        out += ["  " + line for line in overlap_by_group(o)]
    if "spectra" in report:
        ranks = [r["rank"] for r in report["spectra"].values()]
        out.append(f"spectra: {len(ranks)} matrices, rank median {sorted(ranks)[len(ranks) // 2]}" if ranks else
                   "spectra: none in this run (an LT-SFT run has none; a DeFT-X run has them once its mask is chosen)")
    return "\n".join(out)


def overlap_by_group(o: Mapping) -> list[str]:
    """Per parameter group: where A's and B's entries are, and how many A shares with B there. Overall overlap
    hides that most entries sit in the embeddings; the paper's reading of overlap is per group."""
    a, b = o["overall"]["a"] or 1, o["overall"]["b"] or 1
    return [f"{g}: {c['a'] / a:.1%} of A's entries, {c['b'] / b:.1%} of B's; shared {c['shared']:,} "
            f"({c['share_of_a']:.1%} of A's there, Jaccard {c['jaccard']:.3f})"
            for g, c in sorted(o["per_group"].items()) if c["a"] or c["b"]]


def spectra_summary(run: str | Path) -> dict:
    """Per matrix of a run's spectra.json: shape, rank, energy and residual kept, largest singular value; {} for a
    run without one (LT-SFT, or before its mask was chosen). A file of another shape is named, never a traceback."""
    file = RunDir(run).spectra_file
    records = read_json(file, {}) or {}
    try:
        return {n: {"shape": r["shape"], "rank": r["rank"], "energy_retained": r["energy_retained"],
                    "residual_kept": r["residual_kept"],
                    "sigma_max": r["singular_values"][0] if r["singular_values"] else 0}
                for n, r in records.items()}
    except (AttributeError, KeyError, TypeError, IndexError):
        raise DeftxError(f"{file} is damaged: it does not hold a spectrum per matrix") from None


def inspect_report(paths: Sequence[str | Path], run: str | Path | None = None, html: str | Path | None = None) -> dict:
    from . import plots

    vecs = {str(p): SparseVector.load(p) for p in paths}
    report = {"vectors": {p: vector_summary(v) for p, v in vecs.items()},
              "overlap": {f"{a} ~ {b}": overlap(vecs[a].mask(), vecs[b].mask())
                          for a, b in itertools.combinations(vecs, 2)}}
    if run:
        report["spectra"] = spectra_summary(run)
    if html:
        figs = []
        for p, v in vecs.items():
            figs.append(plots.density_heatmap(v.mask(), v.shapes, f"Mask density: {p}"))
        for key, o in report["overlap"].items():
            figs.append(plots.overlap_heatmap(o, f"Overlap {key}"))
        if run:
            records = read_json(RunDir(run).spectra_file, {}) or {}
            if records:
                figs.append(plots.spectra_picker_figure(records))
        parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displayModeBar": False})
                 for i, f in enumerate(figs)]
        head = ("<h1>DeFT-X report</h1><pre style='white-space:pre-wrap'>" + html_escape(text_summary(report)) +
                "</pre>")
        atomic_write_text(html, "<!doctype html><html><head><meta charset='utf-8'><title>DeFT-X report</title>"
                                "</head><body style='font-family:sans-serif;max-width:1100px;margin:auto'>" + head +
                          "\n".join(parts) + "</body></html>")
    return report
