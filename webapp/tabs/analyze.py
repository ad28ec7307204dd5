"""Analyze tab: a vector's summary, the SVD spectrum of any matrix of its run's phase-1 delta, mask density per
layer and module type, overlap with another vector, and the per-matrix denoising table."""
from __future__ import annotations

import gradio as gr

from deftx_engine.constants import KINDS
from deftx_engine.errors import DeftxError
from deftx_engine.training.runs import RunDir, read_json

from ..components import UI, Updates, handler
from ..render import text
from ..state import Studio
from .pickers import refresh_on_open

ANALYZE_INPUTS = ["analyze.run", "analyze.matrix", "analyze.other"]
ANALYZE_OUTPUTS = ("analyze.status", "analyze.summary", "analyze.matrix", "analyze.spectrum", "analyze.density",
                   "analyze.overlap", "analyze.table")
NO_SPECTRA = ("Only a DeFT-X run trained here has them: LT-SFT runs are not denoised, and a pulled vector "
              "carries no phase-1 delta.")


def layout(ui: UI) -> None:
    with gr.Row():
        run = gr.Dropdown([], label="Vector", scale=3, allow_custom_value=True)
        matrix = gr.Dropdown([], label="Matrix (SVD spectrum)", scale=3, allow_custom_value=True)
        other = gr.Dropdown([], label="Compare with (overlap)", scale=3, allow_custom_value=True)
        button = gr.Button("Analyze", variant="primary", scale=1)
    status = gr.Markdown(elem_classes="dx-status")
    summary = gr.Markdown(elem_id="dx-analyze-summary")
    with gr.Row():
        spectrum = gr.Plot(label="Spectrum of the phase-1 delta", show_label=False)
        density = gr.Plot(label="Mask density per layer", show_label=False, elem_id="dx-analyze-density")
    overlap = gr.Plot(label="Overlap", show_label=False)
    with gr.Accordion("Denoising per matrix", open=False):
        table = gr.Dataframe(interactive=False, max_height=360)
    ui.add("analyze", run=run, matrix=matrix, other=other, button=button, status=status, summary=summary,
           spectrum=spectrum, density=density, overlap=overlap, table=table)


def spectra(studio: Studio, run_id: str | None) -> dict:
    """The per-matrix SVD records of a trained run (none for pulled vectors)."""
    row = studio.registry.get(run_id) if run_id else None
    if row is None or row["kind"] not in KINDS or row["config"].get("source"):
        return {}
    return read_json(RunDir(row["run_dir"]).spectra_file, {}) or {}


def default_matrix(records: dict) -> str | None:
    names = list(records)
    return next((n for n in names if ".0.attention.self.query" in n), next(
        (n for n in names if "query" in n or "attn" in n), names[0] if names else None))


@handler("analyze.status", "analyze.spectrum", "analyze.summary", "analyze.density", "analyze.overlap",
         "analyze.table")
def spectrum(studio: Studio, run_id, matrix) -> Updates:
    """SVD spectrum of one matrix of a run's phase-1 delta; returns (message, figure)."""
    from deftx_engine.outputs.plots import spectrum_figure

    records = spectra(studio, run_id)
    if not records:
        return {"analyze.status": f"No SVD spectra for this vector. {NO_SPECTRA}",
                "analyze.spectrum": gr.update(value=None, visible=False)}
    matrix = matrix if matrix in records else default_matrix(records)
    return {"analyze.status": "",
            "analyze.spectrum": gr.update(value=spectrum_figure(records[matrix], f"Spectrum: {matrix}"), visible=True)}


@handler(*ANALYZE_OUTPUTS)
def analyze(studio: Studio, run_id, matrix, other_id) -> Updates:
    """Summary, matrix list, SVD spectrum, per-layer mask density and overlap with another vector.
    Returns (message, summary, matrix dropdown, spectrum, density, overlap, denoising table)."""
    import pandas as pd

    from deftx_engine.method.masks import overlap
    from deftx_engine.outputs.plots import density_heatmap, overlap_heatmap, spectrum_figure
    from deftx_engine.outputs.report import overlap_by_group, spectra_summary, vector_summary

    vdir = studio.run_vector_dir(run_id, "vector")
    vec = studio.vector(vdir)
    s = vector_summary(vec)
    row = studio.registry.get(run_id)
    lines = [f"**{text(row['name'])}** — {text(s['kind'])} vector"  # every value from the vector is escaped
             + (f" ({text(s['language'])})" if s["language"] else "")
             + f", method {text(s['method'])}, base model <code>{text(studio.shown_path(s['base_model']))}</code>",
             f"- entries: **{s['nnz']:,}**"
             + (f" ({s['density_of_maskable']:.2%} of the maskable parameters)" if s["density_of_maskable"] else ""),
             f"- heads stored whole: {len(s['heads'])} tensors"]
    if s["denoise"]:
        d = s["denoise"]
        pol = (f"energy τ = {text(d.get('energy'))}" if d.get("rank_policy") == "energy" else
               f"fixed rank r = {text(d.get('rank'))}")
        lines.append(f"- denoising: {pol}, residual share ρ = {text(d.get('residual_share'))}")
    records = spectra(studio, run_id)
    table = None
    spec_fig = gr.update(value=None, visible=False)  # no empty plot box where there is nothing to show
    mat_update = gr.update(choices=[], value=None)
    if not records:
        lines.append(f"- SVD spectra: none. {NO_SPECTRA}")
    else:
        summ = spectra_summary(row["run_dir"])
        table = pd.DataFrame([{"matrix": n, "shape": "×".join(map(str, r["shape"])), "rank": r["rank"],
                               "energy kept": round(r["energy_retained"], 4),
                               "residual entries kept": r["residual_kept"],
                               "σ max": round(r["sigma_max"], 5)} for n, r in summ.items()])
        ranks = [r["rank"] for r in summ.values()]
        lines.append(f"- SVD: {len(ranks)} matrices, median rank {sorted(ranks)[len(ranks) // 2]}, "
                     f"range {min(ranks)}–{max(ranks)}")
        matrix = matrix if matrix in records else default_matrix(records)
        mat_update = gr.update(choices=list(records), value=matrix)
        spec_fig = gr.update(value=spectrum_figure(records[matrix], f"Spectrum: {matrix}"), visible=True)
    density = density_heatmap(vec.mask(), vec.shapes, f"Mask density: {row['name']}")
    ov_fig = gr.update(value=None, visible=False)  # no empty chart without a second vector
    if other_id and other_id == run_id:
        lines.append("- overlap: *Compare with* is this same vector (it overlaps itself entirely); choose another "
                     "vector there to compare the two masks")
    elif other_id:
        other = studio.vector(studio.run_vector_dir(other_id, "vector to compare with"))
        orow = studio.registry.get(other_id)
        if other.meta.base_fingerprint != vec.meta.base_fingerprint:
            raise DeftxError(f"{row['name']} and {orow['name']} were made for different base models "
                             f"({studio.shown_path(vec.meta.base_model)} vs {studio.shown_path(other.meta.base_model)}"
                             "); their masks cannot be compared")
        o = overlap(vec.mask(), other.mask())
        ov_fig = gr.update(value=overlap_heatmap(o, f"{row['name']} (A) vs {orow['name']} (B)"), visible=True)
        ov = o["overall"]
        lines.append(f"- overlap with **{text(orow['name'])}**: {ov['shared']:,} shared entries, "
                     f"Jaccard {ov['jaccard']:.3f} ({ov['share_of_a']:.1%} of A, {ov['share_of_b']:.1%} of B)")
        lines += [f"  - {text(line)}" for line in overlap_by_group(o)]
    return dict(zip(ANALYZE_OUTPUTS, ("", "\n".join(lines), mat_update, spec_fig, density, ov_fig, table),
                    strict=True))


@handler(*ANALYZE_OUTPUTS, status=None)
def auto_analyze(studio: Studio, run_id, matrix, other_id) -> Updates:
    """Analyze as soon as a vector is chosen (nothing without one)."""
    return analyze(studio, run_id, matrix, other_id) if run_id else {}


def wire(ui: UI) -> None:
    ui.on(ui["analyze.button"].click, analyze, ANALYZE_INPUTS, api_name="analyze")
    ui.on(refresh_on_open(ui, "analyze").then, auto_analyze, ANALYZE_INPUTS, api_visibility="private")
    for picker in ("analyze.run", "analyze.other"):
        ui.on(ui[picker].input, auto_analyze, ANALYZE_INPUTS, api_visibility="private")
    ui.on(ui["analyze.matrix"].input, spectrum, ["analyze.run", "analyze.matrix"], api_name="spectrum")
