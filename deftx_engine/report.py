"""``deftx inspect``: what a set of vectors (and a run's denoising) look like, as JSON and Plotly HTML."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

from .masks import densities, overlap
from .params import layer_of, module_type
from .runs import RunDir, read_json
from .vectors import SparseVector


def vector_summary(vec: SparseVector) -> dict:
    shapes = {n: vec.shapes[n] for n in vec.indices}
    mask = vec.mask()
    n_maskable = vec.meta.extra.get("n_maskable")
    return {"kind": vec.meta.kind, "language": vec.meta.language, "method": vec.meta.method,
            "base_model": vec.meta.base_model, "nnz": vec.nnz, "labels": vec.meta.label_names,
            "density_of_maskable": vec.nnz / n_maskable if n_maskable else None,
            "heads": sorted(vec.heads), "denoise": vec.meta.denoise,
            "density_per_layer": densities(mask, shapes, layer_of),
            "density_per_module": densities(mask, shapes, module_type)}


def spectra_summary(run: str | Path) -> dict:
    records = read_json(RunDir(run).spectra_file, {}) or {}
    return {n: {"shape": r["shape"], "rank": r["rank"], "energy_retained": r["energy_retained"],
                "residual_kept": r["residual_kept"], "sigma_max": r["singular_values"][0] if r["singular_values"] else 0}
            for n, r in records.items()}


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
            for name in list(records)[:12]:
                figs.append(plots.spectrum_figure(records[name], f"Spectrum: {name}"))
        parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
        Path(html).write_text("<!doctype html><html><head><meta charset='utf-8'><title>DeFT-X report</title>"
                              "</head><body>" + "\n".join(parts) + "</body></html>", encoding="utf-8")
    return report
