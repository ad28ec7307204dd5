"""Pure rendering for the page: status messages, the progress card, the runs table, run labels and the
label-distribution chart. Nothing here reads files or the registry; callers pass what is shown.
"""
from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping
from typing import Any

PHASES = {"head-fit": "fitting the MLM head (once per base model and text; cached)",
          "full": "phase 1 · full fine-tuning", "denoise": "denoising + choosing the mask",
          "sparse": "phase 2 · sparse fine-tuning", "save": "saving the vector", "done": "finished"}
STATE_COLORS = {"queued": "#6b7280", "running": "#2563eb", "done": "#16a34a", "failed": "#dc2626",
                "cancelled": "#d97706", "interrupted": "#9333ea"}
# the id, then what a user looks for first (name, state, vector, message) on screen; the settings last
RUN_COLUMNS = ["run", "name", "kind", "state", "vector", "message", "progress", "learned its language?", "created",
               "duration", "settings"]


def cut(text: Any, n: int = 300) -> str:
    """A cell of a preview: long texts (a 200 kB line) are shortened, so the page stays light."""
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


MARKUP = str.maketrans({c: f"&#{ord(c)};" for c in "\\`*_{}[]()<>#+!|~&\"'"})


def text(value: Any, n: int = 300) -> str:
    """A value from a file or a user (a vector's metadata, a label, a file name), safe anywhere in Markdown or
    HTML: every markup character becomes an entity (so ``<img src=…>``, ``![x](url)`` and backticks show as
    typed, and fetch nothing), line breaks become spaces, and it is cut to ``n`` characters. Not for code spans,
    which show entities literally: use ``<code>`` around it instead."""
    return cut(" ".join(str(value).split()), n).translate(MARKUP)


def ok(msg: str) -> str:
    return f"<span class='dx-ok'>✔</span> {msg}"


def err(msg: str) -> str:
    return f"<span class='dx-err'>✖</span> {msg.replace('<', '&lt;')}"  # no tags from a message


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def fmt_k(k: Any) -> str:
    try:
        k = float(k)
    except (TypeError, ValueError):
        return "?"
    return f"{k:.1%}" if 0 < k < 1 else f"{int(k):,}"


def run_label(row: dict) -> str:
    """A short dropdown label (long ones are cut under the arrow): name, kind, language and a state not done."""
    lang = row["config"].get("language") or ""
    label = f"{row['name']} · {row['kind']}" + (f" ({lang})" if lang else "")
    return label if row["state"] == "done" else f"{label} · {row['state']}"


def run_choices(rows: list[dict]) -> list[tuple[str, str]]:
    """Dropdown choices (label, run id) for registry rows; a label two runs share gets the run's time."""
    labels = [run_label(r) for r in rows]
    seen = {label: labels.count(label) for label in labels}
    return [(label + (f" · {r['id'][4:15]}" if seen[label] > 1 else ""), r["id"]) for label, r in zip(labels, rows)]


def run_settings(row: dict) -> str:
    """A run's settings in one line (the Runs table's "settings" column)."""
    c = row["config"]
    if not c:
        return ""
    if c.get("source"):
        return f"pulled from {c['source']} · {c.get('method', '')} · {c.get('base_model', '')}"
    parts = [c.get("method", "")]
    if c.get("method") == "deftx":
        parts.append(f"τ={c.get('energy')}" if c.get("rank_policy") == "energy" else f"r={c.get('rank')}")
        parts.append(f"ρ={c.get('residual_share')}")
    parts.append(f"k={fmt_k(c.get('k'))}")
    steps = [f"{c.get('full_steps')}+{c.get('sparse_steps')} steps" if c.get("full_steps") else
             f"{c.get('full_epochs')}+{c.get('sparse_epochs')} epochs"]
    parts += steps + [f"lr={c.get('lr')}", f"bs={c.get('batch_size')}", str(c.get("base_model", ""))]
    return " · ".join(str(p) for p in parts if p not in ("", None))


def heldout_lowered(held: Mapping | None) -> bool | None:
    """Whether a language vector lowered the held-out masked-token loss under theta0's head (the part that
    composition uses; ``deftx_engine.method.vector_meta.heldout_line``'s verdict); None without the evidence."""
    try:
        return float(held["encoder_only"]["loss"]) < float(held["theta0"]["loss"])
    except (TypeError, KeyError, ValueError):
        return None


def heldout_short(held: Mapping | None) -> str:
    """The Runs table's cell: did the language vector lower its held-out masked-token loss?"""
    lowered = heldout_lowered(held)
    if lowered is None:
        return ""
    loss = f"held-out loss {float(held['theta0']['loss']):.3f} → {float(held['encoder_only']['loss']):.3f}"
    return f"yes: {loss}" if lowered else f"NO: {loss}, not lower"


def runs_table(rows: list[dict], queue_positions: Mapping[str, int | None]):
    """The Runs tab's table (a DataFrame) of registry rows, newest first; a row's ``heldout`` is its language
    vector's held-out evidence (if any)."""
    import pandas as pd

    now = time.time()
    out = []
    for r in rows:
        end = r["finished"] or (now if r["state"] == "running" else None)
        progress = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else ""
        if r["state"] == "queued":
            pos = queue_positions.get(r["id"])
            progress = f"#{pos} in queue" if pos else ""
        out.append({"run": r["id"], "name": r["name"], "kind": r["kind"], "state": r["state"], "progress": progress,
                    "learned its language?": heldout_short(r.get("heldout")), "settings": run_settings(r),
                    "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
                    "duration": fmt_duration(end - r["started"]) if r["started"] and end else "",
                    "vector": r["vector_dir"] if r["state"] == "done" else "", "message": r["message"] or ""})
    return pd.DataFrame(out, columns=RUN_COLUMNS)


def _steps(state: str, status: Mapping[str, Any], step: int, total: int) -> str:
    """Where a run is: within its phase while one runs (a phase's steps restart at 1), the run's count beside."""
    number = {"full": 1, "sparse": 2}.get(status.get("phase"))
    inner, of = status.get("phase_step"), status.get("phase_steps")
    if state == "done" or number is None or not isinstance(inner, int) or not isinstance(of, int) or of == total:
        return f"step {step} / {total}"
    return f"step {inner} / {of} of phase {number} ({step} / {total} in all)"


def progress_html(row: dict | None, status: Mapping[str, Any], queue_position: int | None, message: str,
                  evidence: tuple[bool | None, str] | None = None) -> str:
    """The Train tab's progress card of a run: ``status`` is its status.json, ``message`` its message as
    shown to the user, ``evidence`` (lowered, sentence) a language vector's held-out masked-token scores."""
    if row is None:
        return ("<div class='dx-progress dx-empty'>No run selected. Choose settings on the left and press "
                "<b>Start</b>.</div>")
    state = row["state"]
    step = int(status.get("step") or row["step"] or 0)
    total = int(status.get("total_steps") or row["total_steps"] or 0)
    pct = 100.0 if state == "done" else (100.0 * step / total if total else 0.0)
    phase = PHASES.get(status.get("phase") or row["phase"], status.get("phase") or "")
    color = STATE_COLORS.get(state, "#6b7280")
    foot = []
    if state == "queued":
        foot.append(f"waiting for a free slot (#{queue_position} in the queue)" if queue_position else "waiting")
    else:
        if total:
            foot.append(_steps(state, status, step, total))
        if status.get("loss") is not None:
            foot.append(f"loss {status['loss']:.3f}")
        if state == "running":
            eta = status.get("eta_seconds")
            foot.append(f"ETA {fmt_duration(eta)}" if eta is not None else "ETA –")
        if row["started"]:
            end = row["finished"] or time.time()
            foot.append(f"elapsed {fmt_duration(end - row['started'])}")
        if status.get("precision"):  # what the matrix products ran in (TrainConfig.precision)
            foot.append(status["precision"])
    return (f"<div class='dx-progress'>"
            f"<div class='dx-progress-head'><span class='dx-badge' style='background:{color}'>{state}</span>"
            f" <b>{html.escape(row['name'])}</b> <span class='dx-muted'>{html.escape(row['kind'])} SFT · "
            f"{html.escape(phase)}</span></div>"
            f"<div class='dx-bar'><div class='dx-fill' style='width:{pct:.1f}%;background:{color}'></div></div>"
            f"<div class='dx-progress-foot'>{' · '.join(foot)}</div>"
            + (f"<div class='dx-progress-msg'>{html.escape(message)}</div>" if message else "")
            + (evidence_html(*evidence) if evidence else "") + "</div>")


def evidence_html(lowered: bool | None, sentence: str) -> str:
    """A language vector's held-out evidence, marked as a warning when it did not lower the loss."""
    mark = ("<b class='dx-ok'>✔ learned its language</b>" if lowered else
            "<b class='dx-err'>✖ did NOT lower the held-out loss</b>: expect it to add little or to hurt")
    return f"<div class='dx-evidence'>{mark}<br><span class='dx-muted'>{html.escape(sentence)}</span></div>"


def active_runs_html(rows: list[dict], positions: Mapping[str, int | None], shown_id: str | None) -> str:
    """The runs running or waiting besides the one shown: what runs now and what is queued behind it."""
    others = sorted((r for r in rows if r["id"] != shown_id and r["state"] in ("running", "queued")),
                    key=lambda r: (r["state"] != "running", positions.get(r["id"]) or 0))
    if not others:
        return ""
    items = []
    for r in others:
        if r["state"] == "running":
            what = (f"step {r['step']} / {r['total_steps']}" if r["total_steps"] else
                    PHASES.get(r["phase"] or "", "starting"))
        else:
            what = f"#{positions.get(r['id'])} in the queue" if positions.get(r["id"]) else "waiting"
        items.append(f"<li><span class='dx-badge' style='background:{STATE_COLORS[r['state']]}'>{r['state']}</span> "
                     f"<b>{html.escape(r['name'])}</b> <span class='dx-muted'>{html.escape(r['kind'])} SFT · "
                     f"{html.escape(what)}</span></li>")
    return f"<div class='dx-queue'><div class='dx-muted'>Also running or waiting</div><ul>{''.join(items)}</ul></div>"


def label_bar(counts: dict[str, int], title: str):
    """A bar chart (Plotly) of label counts."""
    import plotly.graph_objects as go

    from deftx_engine.outputs.plots import titled

    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), text=list(counts.values()),
                           marker_color="#6366f1", textangle=0, textposition="outside", cliponaxis=False))
    fig.update_layout(xaxis_title="label", yaxis_title="examples", height=320, margin=dict(l=50, r=20, b=40))
    return titled(fig, title)
