"""Plotly figures shared by the CLI report (``deftx inspect``) and the web app."""
from __future__ import annotations

from typing import Mapping, Sequence

import plotly.graph_objects as go

from ..method.masks import densities
from ..method.params import layer_of, module_type

TOOLBAR_PX = 34  # the height of Plotly's toolbar, which shows on hover at the top right of a figure


def titled(fig: go.Figure, title: str, top: int = 80) -> go.Figure:
    """``fig`` with ``title`` at its top left, below the band of the hover toolbar (which would cover a title in
    that band), and a top margin of ``top`` px that leaves room for both."""
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left", xref="container", y=1, yref="container",
                                 yanchor="top", pad=dict(t=TOOLBAR_PX)), margin_t=top)
    return fig


def _spectrum_traces(record: Mapping, visible: bool = True) -> list[go.Scatter]:
    sigma = list(record["singular_values"])
    power = [s * s for s in sigma]
    total = sum(power) or 1.0
    cum, acc = [], 0.0
    for p in power:
        acc += p
        cum.append(acc / total)
    x = list(range(1, len(sigma) + 1))
    return [go.Scatter(x=x, y=sigma, name="singular value σ", mode="lines", visible=visible),
            go.Scatter(x=x, y=cum, name="cumulative energy (σ²)", mode="lines", yaxis="y2", visible=visible)]


def _rank_marker(record: Mapping) -> tuple[list[dict], list[dict]]:
    """The chosen rank as a dashed line with a label (layout shapes and annotations)."""
    r = max(record["rank"], 1)
    return ([dict(type="line", x0=r, x1=r, yref="paper", y0=0, y1=1, line=dict(dash="dash", width=1))],
            [dict(x=r, yref="paper", y=1.0, text=f"rank {record['rank']} ({record['energy_retained']:.0%} energy)",
                  showarrow=False, xanchor="left", yanchor="bottom")])


_SPECTRUM_AXES = dict(xaxis_title="index", yaxis=dict(type="log", title="σ", exponentformat="power"),
                      yaxis2=dict(type="linear", overlaying="y", side="right", range=[0, 1.02], tickformat=".0%",
                                  tickmode="linear", tick0=0, dtick=0.2,  # own ticks, not synced to the log axis
                                  title="cumulative energy", showgrid=False),
                      legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="right", x=1.0),
                      margin=dict(t=80, l=60, r=60, b=60))


def spectrum_figure(record: Mapping, title: str = "") -> go.Figure:
    """Singular values (log scale), the chosen rank, and cumulative energy on a second (linear) axis."""
    fig = go.Figure(_spectrum_traces(record))
    shapes, notes = _rank_marker(record)
    fig.update_layout(shapes=shapes, annotations=notes, **_SPECTRUM_AXES)
    return titled(fig, title or record.get("name", ""))


def spectra_picker_figure(records: Mapping[str, Mapping]) -> go.Figure:
    """Every matrix's spectrum in one figure, with a menu to pick the matrix (the standalone report)."""
    names = list(records)
    fig = go.Figure([t for i, n in enumerate(names) for t in _spectrum_traces(records[n], visible=i == 0)])
    buttons = []
    for i, n in enumerate(names):
        shapes, notes = _rank_marker(records[n])
        buttons.append(dict(label=n, method="update",
                            args=[{"visible": [j // 2 == i for j in range(2 * len(names))]},
                                  {"title.text": f"Spectrum of the phase-1 delta: {n}", "shapes": shapes,
                                   "annotations": notes}]))
    shapes, notes = _rank_marker(records[names[0]]) if names else ([], [])
    fig.update_layout(title=f"Spectrum of the phase-1 delta: {names[0]}" if names else "No spectra",
                      shapes=shapes, annotations=notes,
                      updatemenus=[dict(buttons=buttons, x=0.0, xanchor="left", y=1.22, yanchor="top")],
                      **{**_SPECTRUM_AXES, "margin": dict(t=130, l=60, r=60, b=60)})
    return fig


def density_heatmap(mask: Mapping, shapes: Mapping[str, Sequence[int]], title: str = "Mask density") -> go.Figure:
    """Share of entries selected, per layer (rows) and module type (columns)."""
    shapes = {n: s for n, s in shapes.items() if n in mask}
    per = densities(mask, shapes, lambda n: f"{layer_of(n)}|{module_type(n)}")
    layers = sorted({k.split("|")[0] for k in per}, key=_layer_key)
    mods = sorted({k.split("|")[1] for k in per}, key=_module_key)
    z = [[per.get(f"{l}|{m}") for m in mods] for l in layers]
    top = max((v for row in z for v in row if v is not None), default=1.0)
    digits = 0 if top >= 0.1 else 1 if top >= 0.01 else 2  # enough for distinct ticks (not "1%, 1%, 0%, 0%")
    fig = go.Figure(go.Heatmap(z=z, x=mods, y=layers, colorscale="Viridis",
                               colorbar=dict(title="density", tickformat=f".{digits}%"),
                               hovertemplate="%{y} %{x}: %{z:.2%}<extra></extra>"))
    fig.update_layout(margin=dict(l=90, r=20, b=40))
    return titled(fig, title)


def overlap_heatmap(report: Mapping, title: str = "Overlap") -> go.Figure:
    """Jaccard overlap of two masks per layer (rows) and module type (columns), overall figures in the title."""
    cells = report["per_layer_module"]
    layers = sorted({k.split("|")[0] for k in cells}, key=_layer_key)
    mods = sorted({k.split("|")[1] for k in cells}, key=_module_key)
    z = [[cells[f"{l}|{m}"]["jaccard"] if f"{l}|{m}" in cells else None for m in mods] for l in layers]
    o = report["overall"]
    fig = go.Figure(go.Heatmap(z=z, x=mods, y=layers, colorscale="Magma", colorbar=dict(title="Jaccard"),
                               hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(margin=dict(l=90, r=20, b=40))
    return titled(fig, f"{title}: Jaccard {o['jaccard']:.3f}, shared {o['shared']:,} "
                       f"({o['share_of_a']:.1%} of A, {o['share_of_b']:.1%} of B)")


def loss_figure(metrics: Sequence[Mapping]) -> go.Figure:
    """Loss per logged step, a line per phase; steps are whole numbers, so the axis never ticks 0.5 steps."""
    fig = go.Figure()
    for phase in dict.fromkeys(m.get("phase", "") for m in metrics):
        pts = [m for m in metrics if m.get("phase", "") == phase and m.get("loss") is not None]
        fig.add_trace(go.Scatter(x=[m["step"] for m in pts], y=[m["loss"] for m in pts], name=phase or "loss",
                                 mode="lines+markers"))
    steps = [m["step"] for m in metrics if m.get("loss") is not None]
    few = bool(steps) and max(steps) - min(steps) < 10  # Plotly would tick in fractions of a step
    fig.update_xaxes(tickformat="d", **({"dtick": 1, "tick0": 0} if few else {}))
    fig.update_layout(xaxis_title="step", yaxis_title="loss", margin=dict(l=50, r=20, b=40))
    return titled(fig, "Training loss")


def probabilities_figure(labels: Sequence[str], probs: Sequence[float]) -> go.Figure:
    """Horizontal bars with their percentage, never rotated (in a narrow bar it goes beside it)."""
    fig = go.Figure(go.Bar(x=list(probs), y=list(labels), orientation="h", text=[f"{p:.1%}" for p in probs],
                           textangle=0, textposition="auto", cliponaxis=False))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%"), margin=dict(l=90, r=30, b=40))
    return titled(fig, "Label probabilities")


def confusion_figure(metrics: Mapping) -> go.Figure:
    labels = metrics["labels"]
    fig = go.Figure(go.Heatmap(z=metrics["confusion"], x=labels, y=labels, colorscale="Blues",
                               text=metrics["confusion"], texttemplate="%{text}"))
    fig.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed",
                      margin=dict(l=90, r=20, b=40))
    return titled(fig, f"Confusion matrix — macro-F1 {metrics['macro_f1']:.3f}, accuracy {metrics['accuracy']:.3f}")


_MODULE_ORDER = ("embeddings", "attn.Q", "attn.K", "attn.V", "attn.O", "ffn")


def _module_key(name: str) -> tuple:
    """Module types in model order (embeddings, Q, K, V, O, FFN), anything else after them."""
    return (_MODULE_ORDER.index(name) if name in _MODULE_ORDER else len(_MODULE_ORDER), name)


def _layer_key(name: str):
    if name.startswith("layer."):
        return (1, int(name.split(".")[1]))
    return (0 if name == "embeddings" else 2, name)
