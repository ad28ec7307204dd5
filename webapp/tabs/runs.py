"""Runs tab (every run, shared by all browser tabs) and the watching of runs: the Train tab's progress card, loss
curve and log tail of the shown run, polled every 2 s, and the ``run_status`` / ``list_runs`` API."""
from __future__ import annotations

import json
import time

import gradio as gr

from deftx_engine.constants import KINDS
from deftx_engine.runs import RunDir

from ..components import UI, Updates, handler
from ..render import run_choices
from ..state import Studio

STATUS_OUTPUTS = ("train.progress", "train.loss", "train.log", "train.details", "runs.watch_sig")


def layout(ui: UI) -> None:
    with gr.Row():
        gr.Markdown("Every run on this machine, newest first — also runs started from other browser "
                    "tabs and before the app was restarted.", elem_classes="dx-help")
        refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
    table = gr.Dataframe(ui.studio.runs_table(), interactive=False, wrap=True, max_height=560, elem_id="dx-runs",
                         column_widths=["190px", "150px", "80px", "95px", "95px", "340px", "130px", "95px", "320px",
                                        "260px"])
    ui.add("runs", refresh=refresh, table=table, watch_sig=gr.State(""), runs_sig=gr.State(""))


@handler(*STATUS_OUTPUTS, status=None)
def status_of(studio: Studio, run_id, sig) -> Updates:
    """Progress of one run: (progress html, loss figure, log tail, status dict, signature). Unchanged outputs
    are left out, so polling is cheap."""
    row = studio.registry.get(run_id) if run_id else None
    if row is None:
        if sig == "none":
            return {}
        return {"train.progress": studio.progress(None), "train.loss": None, "train.log": "", "train.details": {},
                "runs.watch_sig": "none"}
    rd = RunDir(row["run_dir"])
    st = rd.status() if row["kind"] in KINDS else {}
    try:
        msize = rd.metrics_file.stat().st_size
    except OSError:
        msize = 0
    try:
        lsize = rd.log_file.stat().st_size
    except OSError:
        lsize = 0
    new_sig = json.dumps([run_id, row["state"], row["step"], row["message"], st.get("updated"), msize, lsize,
                          int(time.time() // 10) if row["state"] in ("running", "queued") else 0])
    if new_sig == sig:
        return {}
    out = {}
    old = json.loads(sig) if sig and sig.startswith("[") else [None] * 7
    if old[0] != run_id or old[5] != msize:
        from deftx_engine.plots import loss_figure

        metrics = rd.metrics()
        out["train.loss"] = loss_figure(metrics) if metrics else None
    log_text = rd.log_tail(30) if lsize else ""
    if row["state"] == "failed" and not log_text:
        log_text = row["message"]
    details = {"run": row["id"], "name": row["name"], "kind": row["kind"], "state": row["state"],
               "phase": st.get("phase") or row["phase"], "step": st.get("step", row["step"]),
               "total_steps": st.get("total_steps", row["total_steps"]), "loss": st.get("loss"),
               "eta_seconds": st.get("eta_seconds"), "message": studio.pretty(row["message"] or ""),
               "vector": studio.shown_path(row["vector_dir"]) if row["state"] == "done" else None,
               "queue_position": studio.registry.queue_position(row["id"])}
    return {**out, "train.progress": studio.progress(row), "train.log": studio.pretty(log_text),
            "train.details": details, "runs.watch_sig": new_sig}


@handler(*STATUS_OUTPUTS, status=None)
def show_run(studio: Studio, run_id) -> Updates:
    """Another run chosen in "Run shown": everything about it, drawn afresh."""
    return status_of(studio, run_id, "")


@handler("train.details", status=None)
def run_status(studio: Studio, run_id) -> Updates:
    """Status of one run as a dict: state, phase, step, total_steps, loss, eta_seconds, message, vector."""
    return {"train.details": status_of(studio, run_id, "")["train.details"]}


@handler("runs.table", status=None)
def list_runs(studio: Studio) -> Updates:
    """All runs in the registry, newest first (a table)."""
    return {"runs.table": studio.runs_table()}


@handler(*STATUS_OUTPUTS, "runs.table", "train.watch", "runs.runs_sig", status=None)
def poll(studio: Studio, run_id, sig, rsig) -> Updates:
    """Timer tick: the shown run's progress and, when the set of runs changed, the tables/lists."""
    out = status_of(studio, run_id, sig)
    rows = studio.registry.list()
    new_rsig = json.dumps([(r["id"], r["state"], r["step"], r["message"]) for r in rows])
    if new_rsig == rsig:
        return out
    watch = gr.update(choices=run_choices(rows))
    if not run_id and rows:
        watch = gr.update(choices=run_choices(rows), value=rows[0]["id"])
    return {**out, "runs.table": studio.runs_table(), "train.watch": watch, "runs.runs_sig": new_rsig}


@handler("train.watch", "runs.table", status=None)
def page_loaded(studio: Studio) -> Updates:
    """A new page shows the running (or queued, or newest) run and every run."""
    rows = studio.registry.list()
    active = [r for r in rows if r["state"] in ("running", "queued")]
    value = active[0]["id"] if active else (rows[0]["id"] if rows else None)
    return {"train.watch": gr.update(choices=run_choices(rows), value=value), "runs.table": studio.runs_table()}


def wire(ui: UI) -> None:
    ui.on(ui["train.watch"].change, show_run, ["train.watch"], api_visibility="private", show_progress="hidden")
    ui.on(ui["train.status_button"].click, run_status, ["train.run_id"], api_name="run_status")
    ui.on(ui["runs.refresh"].click, list_runs, api_name="list_runs")
    ui.on(ui["train.timer"].tick, poll, ["train.watch", "runs.watch_sig", "runs.runs_sig"], api_visibility="private",
          show_progress="hidden", queue=False)
