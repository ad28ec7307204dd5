"""Plotly figures shared by the CLI report (``deftx inspect``) and the web app."""
from __future__ import annotations

from typing import Mapping, Sequence

import plotly.graph_objects as go

from .masks import densities
from .params import layer_of, module_type


def spectrum_figure(record: Mapping, title: str = "") -> go.Figure:
    """Singular values (log scale), the chosen rank, and cumulative energy on a second axis."""
    sigma = list(record["singular_values"])
    power = [s * s for s in sigma]
    total = sum(power) or 1.0
    cum, acc = [], 0.0
    for p in power:
        acc += p
        cum.append(acc / total)
    x = list(range(1, len(sigma) + 1))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=sigma, name="singular value σ", mode="lines"))
    fig.add_trace(go.Scatter(x=x, y=cum, name="cumulative energy (σ²)", mode="lines", yaxis="y2"))
    fig.add_vline(x=max(record["rank"], 1), line_dash="dash",
                  annotation_text=f"rank {record['rank']} ({record['energy_retained']:.0%} energy)")
    fig.update_layout(title=title or record.get("name", ""), xaxis_title="index", yaxis_type="log",
                      yaxis_title="σ", yaxis2=dict(overlaying="y", side="right", range=[0, 1.02],
                                                   title="cumulative energy"),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
                      margin=dict(t=70, l=50, r=50, b=40))
    return fig


def density_heatmap(mask: Mapping, shapes: Mapping[str, Sequence[int]], title: str = "Mask density") -> go.Figure:
    """Share of entries selected, per layer (rows) and module type (columns)."""
    shapes = {n: s for n, s in shapes.items() if n in mask}
    per = densities(mask, shapes, lambda n: f"{layer_of(n)}|{module_type(n)}")
    layers = sorted({k.split("|")[0] for k in per}, key=_layer_key)
    mods = sorted({k.split("|")[1] for k in per})
    z = [[per.get(f"{l}|{m}") for m in mods] for l in layers]
    fig = go.Figure(go.Heatmap(z=z, x=mods, y=layers, colorscale="Viridis", colorbar=dict(title="density"),
                               hovertemplate="%{y} %{x}: %{z:.2%}<extra></extra>"))
    fig.update_layout(title=title, margin=dict(t=50, l=90, r=20, b=40))
    return fig


def overlap_heatmap(report: Mapping, title: str = "Overlap") -> go.Figure:
    """Jaccard overlap of two masks per layer (rows) and module type (columns), overall figures in the title."""
    cells = report["per_layer_module"]
    layers = sorted({k.split("|")[0] for k in cells}, key=_layer_key)
    mods = sorted({k.split("|")[1] for k in cells})
    z = [[cells[f"{l}|{m}"]["jaccard"] if f"{l}|{m}" in cells else None for m in mods] for l in layers]
    o = report["overall"]
    fig = go.Figure(go.Heatmap(z=z, x=mods, y=layers, colorscale="Magma", colorbar=dict(title="Jaccard"),
                               hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"{title}: Jaccard {o['jaccard']:.3f}, shared {o['shared']:,} "
                            f"({o['share_of_a']:.1%} of A, {o['share_of_b']:.1%} of B)",
                      margin=dict(t=60, l=90, r=20, b=40))
    return fig


def loss_figure(metrics: Sequence[Mapping]) -> go.Figure:
    fig = go.Figure()
    for phase in dict.fromkeys(m.get("phase", "") for m in metrics):
        pts = [m for m in metrics if m.get("phase", "") == phase and m.get("loss") is not None]
        fig.add_trace(go.Scatter(x=[m["step"] for m in pts], y=[m["loss"] for m in pts], name=phase or "loss",
                                 mode="lines+markers"))
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss",
                      margin=dict(t=50, l=50, r=20, b=40))
    return fig


def probabilities_figure(labels: Sequence[str], probs: Sequence[float]) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(probs), y=list(labels), orientation="h", text=[f"{p:.1%}" for p in probs]))
    fig.update_layout(title="Label probabilities", xaxis=dict(range=[0, 1]), margin=dict(t=50, l=90, r=20, b=40))
    return fig


def confusion_figure(metrics: Mapping) -> go.Figure:
    labels = metrics["labels"]
    fig = go.Figure(go.Heatmap(z=metrics["confusion"], x=labels, y=labels, colorscale="Blues",
                               text=metrics["confusion"], texttemplate="%{text}"))
    fig.update_layout(title=f"Confusion matrix — macro-F1 {metrics['macro_f1']:.3f}, "
                            f"accuracy {metrics['accuracy']:.3f}",
                      xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed",
                      margin=dict(t=50, l=90, r=20, b=40))
    return fig


def _layer_key(name: str):
    if name.startswith("layer."):
        return (1, int(name.split(".")[1]))
    return (0 if name == "embeddings" else 2, name)
