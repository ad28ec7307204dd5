"""Runs tab (every run, shared by all browser tabs) and the watching of runs: the Train tab's progress card, loss
curve and log tail of the shown run, polled every 2 s, and the ``run_status`` / ``list_runs`` API."""
from __future__ import annotations

import json
import time

import gradio as gr

from deftx_engine.constants import KINDS
from deftx_engine.errors import DeftxError
from deftx_engine.training.runs import RunDir

from ..components import UI, Updates, handler
from ..render import err, ok, run_choices
from ..render import text as shown_text
from ..state import Studio

ACTIVE = ("running", "queued")
STATUS_OUTPUTS = ("train.progress", "train.loss", "train.log", "train.details", "runs.watch_sig")

# a stopped run continues from its last checkpoint: the app's words for it (the CLI says --resume)
RESUME_HINT = "↻ Resume continues it from its last checkpoint."


def layout(ui: UI) -> None:
    with gr.Row():
        gr.Markdown("Every run on this machine, newest first — also runs started from other browser "
                    "tabs and before the app was restarted.", elem_classes="dx-help")
        refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
    # name, kind, state, progress, vector and message fit the page; the rest scrolls sideways
    table = gr.Dataframe(ui.studio.runs_table(), interactive=False, wrap=True, max_height=560, elem_id="dx-runs",
                         column_widths=["165px", "160px", "95px", "95px", "250px", "300px", "95px", "230px", "130px",
                                        "95px", "340px"])
    with gr.Row(equal_height=False):
        pick = gr.Dropdown([], label="Run to delete", scale=3, allow_custom_value=True, elem_id="dx-delete-pick")
        delete = gr.Button("Delete run…", variant="stop", scale=0, min_width=160, elem_id="dx-delete")
    with gr.Row(visible=False) as confirm:
        question = gr.Markdown(elem_id="dx-delete-question")
        yes = gr.Button("Yes, delete it", variant="stop", scale=0, min_width=140, elem_id="dx-delete-yes")
        keep = gr.Button("Keep it", scale=0, min_width=100)
    status = gr.Markdown(elem_classes="dx-status", elem_id="dx-runs-status")
    ui.add("runs", refresh=refresh, table=table, watch_sig=gr.State(""), runs_sig=gr.State(""), pick=pick,
           delete=delete, confirm=confirm, question=question, yes=yes, keep=keep, status=status)


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
    others = [(r["id"], r["state"], r["step"]) for r in studio.registry.list(states=["running", "queued"])]
    new_sig = json.dumps([run_id, row["state"], row["step"], row["message"], st.get("updated"), msize, lsize,
                          int(time.time() // 10) if row["state"] in ("running", "queued") else 0, others])
    if new_sig == sig:
        return {}
    out = {}
    old = json.loads(sig) if sig and sig.startswith("[") else [None] * 8
    if old[0] != run_id or old[5] != msize:
        from deftx_engine.outputs.plots import loss_figure

        metrics = rd.metrics()
        out["train.loss"] = loss_figure(metrics) if metrics else None
    log_text = rd.log_tail(30) if lsize else ""
    if row["state"] == "failed" and not log_text:
        log_text = row["message"]
    details = {"run": row["id"], "name": row["name"], "kind": row["kind"], "state": row["state"],
               "phase": st.get("phase") or row["phase"], "step": st.get("step", row["step"]),
               "total_steps": st.get("total_steps", row["total_steps"]), "loss": st.get("loss"),
               "eta_seconds": st.get("eta_seconds"), "precision": st.get("precision") or None,
               "message": studio.pretty(row["message"] or ""),
               "vector": studio.shown_path(row["vector_dir"]) if row["state"] == "done" else None,
               "queue_position": studio.registry.queue_position(row["id"]), "heldout_mlm": studio.heldout(row)}
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


@handler(*STATUS_OUTPUTS, "runs.table", "train.watch", "runs.runs_sig", "train.status", "train.stopping",
         status=None)
def poll(studio: Studio, run_id, sig, rsig, started=None, stopping=None) -> Updates:
    """Timer tick: the shown run's progress and, when the set of runs changed, the tables/lists. When the shown
    run ends while others run or wait, the panel follows the next one (the one running, else the first queued).
    The Train tab's "Stopping …" is replaced once that run has stopped."""
    follow = next_active(studio) if ended(studio, run_id, sig) else None
    if follow:
        run_id, sig = follow, ""
    out = {**status_of(studio, run_id, sig), **stopped_outcome(studio, stopping)}
    rows = studio.registry.list()
    new_rsig = json.dumps([(r["id"], r["state"], r["step"], r["message"]) for r in rows])
    if new_rsig == rsig and not follow:
        return out
    watch = gr.update(choices=run_choices(rows))
    if (follow or not run_id) and rows:
        watch = gr.update(choices=run_choices(rows), value=run_id or rows[0]["id"])
    outcome = started_outcome(studio, rows, started, rsig)  # the Train tab's "Run … started" does not outlive the run
    return {**out, "runs.table": studio.runs_table(), "train.watch": watch, "runs.runs_sig": new_rsig,
            **({"train.status": outcome} if outcome and "train.stopping" not in out else {})}


def stopped_outcome(studio: Studio, stopping: str | None) -> Updates:
    """The Train tab's message once the run it said was stopping has stopped (or is gone); {} before."""
    if not stopping:
        return {}
    row = studio.registry.get(stopping)
    if row is not None and row["state"] in ACTIVE:
        return {}
    said = f"Run **{shown_text(row['name'])}** {row['state']}." if row else ""
    if row and row["state"] == "cancelled":
        said += f" {RESUME_HINT}"
    return {"train.status": ok(said) if row and row["state"] in ("cancelled", "done") else said,
            "train.stopping": ""}


def started_outcome(studio: Studio, rows: list[dict], started: str | None, rsig: str | None) -> str | None:
    """How the run started from the Train tab ended, once it has ended since the last tick (else None)."""
    try:
        before = {r[0]: r[1] for r in json.loads(rsig)} if started and rsig and rsig.startswith("[") else {}
    except (ValueError, IndexError, TypeError):
        return None
    row = next((r for r in rows if r["id"] == started), None)
    # a run absent from the last tick's list was queued and ended between two ticks
    active = ("running", "queued")
    if row is None or before.get(started, "queued") not in active or row["state"] in active:
        return None
    name = shown_text(row["name"])
    if row["state"] == "done":
        return ok(f"Run **{name}** finished: its vector is listed in the Runs, Analyze and Predict tabs.")
    if row["state"] == "cancelled":  # what the user asked for: no error mark, and the app's word for going on
        return f"Run **{name}** cancelled. {RESUME_HINT}"
    return err(f"Run {name} {row['state']}: {studio.pretty(row['message'] or '') or 'see its log'}")


@handler("runs.confirm", "runs.question", "runs.status", status=2)
def ask_delete(studio: Studio, run_id) -> Updates:
    """Delete, step 1: say what goes (the run and its folder; a running or queued run is cancelled first) and
    ask."""
    row = studio.registry.get(run_id) if run_id else None
    if row is None:
        raise DeftxError("choose the run to delete")
    first = (f" It is {row['state']}: it is cancelled first"
             + (" (with the other run of its group)" if row["grp"] else "") + "." if row["state"] in ACTIVE else "")
    return {"runs.confirm": gr.update(visible=True), "runs.status": "",
            "runs.question": f"Delete **{shown_text(row['name'])}** ({row['kind']}, {row['state']}) with its folder "
                             f"and vector?{first} This cannot be undone."}


@handler("runs.status", "runs.confirm", "runs.table", "runs.pick", "train.watch")
def delete_run(studio: Studio, run_id) -> Updates:
    """Delete, step 2: remove a run's registry row and its folder (vector, checkpoints, log); a running or queued
    run is cancelled first, and deleted once it has stopped (within the cancel's grace period)."""
    reg = studio.registry
    row = reg.get(run_id) if run_id else None
    if row is not None and row["state"] in ACTIVE:
        reg.cancel(run_id)
        try:
            reg.wait(run_id, timeout=reg.grace + 10)
        except TimeoutError:
            raise DeftxError(f"run {row['name']} is still stopping; delete it once it has stopped") from None
    try:
        row = reg.delete(run_id or "")
    except KeyError:
        raise DeftxError(f"unknown run {str(run_id)[:80]!r}; refresh the page") from None
    except ValueError as e:  # resumed by another session meanwhile
        raise DeftxError(f"{e} (Train tab, Cancel)") from None
    rows = reg.list()
    return {"runs.status": ok(f"Run **{shown_text(row['name'])}** and its folder deleted."),
            "runs.confirm": gr.update(visible=False), "runs.table": studio.runs_table(),
            "runs.pick": gr.update(choices=run_choices(rows), value=None),
            "train.watch": gr.update(choices=run_choices(rows))}


@handler("runs.confirm", status=None)
def keep_run(studio: Studio) -> Updates:
    return {"runs.confirm": gr.update(visible=False)}


@handler("runs.table", "runs.pick", status=None)
def runs_opened(studio: Studio, current) -> Updates:
    """The Runs tab opened or refreshed: the table and the runs one may delete."""
    rows = studio.registry.list()
    ids = [r["id"] for r in rows]
    return {"runs.table": studio.runs_table(),
            "runs.pick": gr.update(choices=run_choices(rows), value=current if current in ids else None)}


def ended(studio: Studio, run_id: str | None, sig: str | None) -> bool:
    """The shown run was running or queued at the last tick and is not any more."""
    try:
        was = json.loads(sig)[1] if sig and sig.startswith("[") else None
    except (ValueError, IndexError):
        return False
    row = studio.registry.get(run_id) if run_id else None
    return was in ("running", "queued") and row is not None and row["state"] not in ("running", "queued")


def next_active(studio: Studio) -> str | None:
    """The run the panel shows next: the one running, else the first in the queue."""
    active = studio.registry.list(states=["running", "queued"])
    running = [r for r in active if r["state"] == "running"]
    queued = sorted((r for r in active if r["state"] == "queued"),
                    key=lambda r: studio.registry.queue_position(r["id"]) or 0)
    return (running or queued or [{"id": None}])[0]["id"]


@handler("train.watch", "runs.table", status=None)
def page_loaded(studio: Studio) -> Updates:
    """A new page shows the running (or queued, or newest) run and every run."""
    rows = studio.registry.list()
    value = next_active(studio) or (rows[0]["id"] if rows else None)
    return {"train.watch": gr.update(choices=run_choices(rows), value=value), "runs.table": studio.runs_table()}


def wire(ui: UI) -> None:
    ui.on(ui["train.watch"].change, show_run, ["train.watch"], api_visibility="private", show_progress="hidden")
    ui.on(ui["train.status_button"].click, run_status, ["train.run_id"], api_name="run_status")
    ui.on(ui["runs.refresh"].click, list_runs, api_name="list_runs")
    for trigger in (ui["runs.refresh"].click, ui["runs.tab"].select):
        ui.on(trigger, runs_opened, ["runs.pick"], api_visibility="private")
    ui.on(ui["runs.delete"].click, ask_delete, ["runs.pick"], api_visibility="private")
    ui.on(ui["runs.yes"].click, delete_run, ["runs.pick"], api_name="delete_run")
    ui.on(ui["runs.keep"].click, keep_run, api_visibility="private")
    ui.on(ui["train.timer"].tick, poll, ["train.watch", "runs.watch_sig", "runs.runs_sig", "train.run_id",
                                         "train.stopping"],
          api_visibility="private",
          show_progress="hidden", queue=False)
