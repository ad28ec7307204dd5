"""Start tab: the guided first run. "Run the demo" queues a language SFT on the Indonesian example text and a
task SFT on the English example data (the ``cpu-demo`` preset on the default base model), shows each step as
it progresses, and when both are done opens Predict with the two vectors chosen and the Indonesian example
file scored (with and without the language vector)."""
from __future__ import annotations

import html
import re

import gradio as gr

from deftx_engine.constants import KINDS
from deftx_engine.errors import DeftxError
from deftx_engine.training.config import resolve
from deftx_engine.training.runs import RunDir

from .. import EXAMPLE, EXAMPLE_LANG
from ..components import UI, Updates, handler
from ..render import PHASES, STATE_COLORS, evidence_html, ok, run_choices
from ..rundb import GroupBusy, QueueFull
from ..settings import default_model, max_lines, max_queue
from ..state import Studio
from .predict import composition, evaluate_file, side_by_side
from .train import job, queue_full


def intro(studio: Studio) -> str:
    """The Start tab's opening text, naming the base model the demo will use (DEFTX_DEFAULT_MODEL)."""
    return ("**New here?** One click trains the two vectors of a cross-lingual transfer and scores the result: a "
            "**language** SFT on 400 unlabelled Indonesian sentences, a **task** SFT on 300 labelled English "
            "sentiment sentences, then θ0 + φ_task + φ_language classifies Indonesian test sentences. It uses the "
            f"`cpu-demo` preset on `{studio.shown_model()}`: a few minutes on 2 CPU cores for the offline default, "
            "plus a one-time build of the model and fit of its MLM head (each a few minutes, cached). Your own data "
            "and settings: the **Data** and **Train** tabs.")
# the steps of each run, in order, as status.json phases (a base with its own MLM head skips the head fit)
STEPS = {"language": [("head-fit", "fit the MLM head (once per base model and text; cached)"),
                      ("full", PHASES["full"]), ("denoise", PHASES["denoise"]), ("sparse", PHASES["sparse"])],
         "task": [("full", PHASES["full"]), ("denoise", PHASES["denoise"]), ("sparse", PHASES["sparse"])]}
TITLES = {"language": "Language SFT on Indonesian text (target_corpus_id.txt, unlabelled)",
          "task": "Task SFT on English sentiment data (source_task_en.csv, labelled)"}
ORDER = ["head-fit", "full", "denoise", "sparse", "save", "done"]
NAMES = {kind: f"demo-{EXAMPLE_LANG[kind]}-{kind}" for kind in KINDS}  # the demo's runs' names (-2, -3… added)
DEMO = "demo"  # the registry group of the demo's runs (RunDB.submit_group)
STOPPED = ("The demo stopped: a run did not finish (see its step below, and the Train tab's log). Press **Run the "
           "demo** to try again.")


def layout(ui: UI) -> None:
    gr.Markdown(intro(ui.studio), elem_classes="dx-help")
    with gr.Row():
        run = gr.Button("▶ Run the demo", variant="primary", elem_id="dx-demo", scale=0, min_width=220)
        status = gr.Markdown(elem_classes="dx-status", elem_id="dx-demo-status")
    steps = gr.HTML(steps_html(None, {}), elem_id="dx-demo-steps", js_on_load=None)
    ui.add("start", run=run, status=status, steps=steps, demo=gr.State({}))


@handler("start.status", "start.steps", "start.demo", "train.watch")
def run_demo(studio: Studio) -> Updates:
    """Queue the demo's language SFT and task SFT (cpu-demo preset, default base model, example files) as one
    group: refused while a demo is under way (checked in the transaction that queues them, so two sessions
    pressing at once queue one demo); returns (message, steps, the demo's run ids, the Train tab's shown run)."""
    base = studio.check_base_model(default_model())
    runs = []
    for kind, role in (("language", "corpus"), ("task", "task")):
        cfg = resolve(kind, preset_name="cpu-demo", values={"data": str(EXAMPLE[role]), "base_model": base,
                                                            "language": EXAMPLE_LANG[kind], "max_lines": max_lines()})
        runs.append(job(cfg, NAMES[kind]))
    try:
        ids = dict(zip(("language", "task"), studio.registry.submit_group(DEMO, runs, max_queued=max_queue(),
                                                                          distinct=True), strict=True))
    except GroupBusy:
        raise DeftxError("the demo is already under way: its steps are below (cancel one of its runs in the Train "
                         "tab to stop it)") from None
    except QueueFull as e:
        raise DeftxError(queue_full(e)) from None
    rows = studio.registry.list()
    return {"start.status": ok("The demo is queued: the two runs below train one after the other. Predict opens "
                               "when both are done."),
            "start.steps": steps_html(studio, ids), "start.demo": ids,
            "train.watch": gr.update(choices=run_choices(rows), value=ids["language"])}


def current_demo(studio: Studio) -> tuple[dict[str, str], str] | None:
    """(the run ids of the demo, its state): the demo under way, else the newest one ("done" when both vectors
    are, else "stopped"); None if there is none, or a run of it was deleted. The demo's runs are found by their
    group in the registry, never by their names (a Train run may be named like them)."""
    rows = studio.registry.group(DEMO)
    ids = {r["kind"]: r["id"] for r in rows}
    if set(ids) != set(KINDS) or len(rows) != len(KINDS):
        return None
    states = {r["state"] for r in rows}
    if states == {"done"}:
        return ids, "done"
    if states & {"running", "queued"} and not states & {"failed", "cancelled", "interrupted"}:
        return ids, "under way"
    return ids, "stopped"


@handler("start.demo", "start.steps", "start.status", status=None)
def demo_reloaded(studio: Studio) -> Updates:
    """A page opened (or reloaded) shows the demo as the page that started it does: one under way is followed,
    a finished one shows its steps and the score recorded for it."""
    found = current_demo(studio)
    if not found:
        return {}
    ids, state = found
    if state == "under way":
        return {"start.demo": ids, "start.steps": steps_html(studio, ids),
                "start.status": ok("The demo is under way: Predict opens when both runs are done.")}
    if state == "stopped":
        return {"start.demo": {**ids, "finished": True}, "start.steps": steps_html(studio, ids),
                "start.status": STOPPED}
    score = recorded_score(studio, ids)
    return {"start.demo": {**ids, "finished": True}, "start.steps": steps_html(studio, ids, score),
            "start.status": ok("The demo is done: its two vectors are in the Predict tab" +
                               ("." if score else "; score the example file there (Score a labelled file)."))}


def recorded_score(studio: Studio, demo: dict) -> str:
    """The example file's score recorded for the demo's vectors (task + language vector beside the task vector
    alone), in Predict's words; "" if it was not scored."""
    row = studio.registry.get(demo["task"])
    key = f"{EXAMPLE['eval'].name} ({composition(demo['language'], 1.0, 'sum')})"
    both = (row["config"].get("metrics") or {}).get(key) if row else None
    if not isinstance(both, dict) or "task_only_macro_f1" not in both:
        return ""
    try:
        return side_by_side({"macro_f1": float(both["macro_f1"])}, {"macro_f1": float(both["task_only_macro_f1"])})
    except (TypeError, ValueError):
        return ""


@handler("start.steps", "start.demo", "start.status", "app.tabs", "predict.task", "predict.lang",
         "predict.lang_touched", "predict.spec", "predict.scale", "predict.merge", status=None)
def demo_progress(studio: Studio, demo) -> Updates:
    """Timer tick: the demo's steps; once both runs are done, Predict with the two vectors chosen (the scoring
    follows, ``score_demo``). Nothing is updated without a demo in progress."""
    if not demo or demo.get("finished"):
        return {}
    rows = {kind: studio.registry.get(demo[kind]) for kind in KINDS}
    out = {"start.steps": steps_html(studio, demo)}
    if any(r is None or r["state"] in ("failed", "cancelled", "interrupted") for r in rows.values()):
        return {**out, "start.demo": {**demo, "finished": True}, "start.status": STOPPED}
    if any(r["state"] != "done" for r in rows.values()):
        return out
    langs = studio.vector_runs("language")
    return {**out, "start.demo": {**demo, "finished": True, "scored": True},
            "start.status": ok("Both vectors are ready: Predict scores the Indonesian example file with and "
                               "without the language vector."),
            "app.tabs": gr.Tabs(selected="predict"),
            "predict.task": gr.update(choices=run_choices(studio.vector_runs("task")), value=demo["task"]),
            "predict.lang": gr.update(choices=[("none", "")] + run_choices(langs), value=demo["language"]),
            "predict.lang_touched": True, "predict.spec": studio.shown_path(EXAMPLE["eval"]), "predict.scale": 1.0,
            "predict.merge": "sum"}


@handler("predict.file_status", "predict.confusion", "start.steps", status=None)
def score_demo(studio: Studio, demo, request: gr.Request | None = None) -> Updates:
    """Once the demo's vectors are done: score the Indonesian example file with and without the language vector
    (Predict's "Score a labelled file"), and show the result as the demo's last step too."""
    if not demo or not demo.get("scored"):
        return {}
    out = evaluate_file(studio, demo["task"], demo["language"], None, str(EXAMPLE["eval"]), "", "", "label", 1.0,
                        "sum", request)
    return {**out, "start.steps": steps_html(studio, demo, out["predict.file_status"])}


def steps_html(studio: Studio | None, demo: dict, score: str = "") -> str:
    """The demo's steps: each run's sub-steps (done, running with its step, waiting), then the scoring."""
    if not demo:
        return "<div class='dx-progress dx-empty'>The demo's steps appear here once it is queued.</div>"
    parts = []
    for n, kind in enumerate(("language", "task"), 1):
        row = studio.registry.get(demo[kind]) if studio else None
        parts.append(run_steps(studio, n, kind, row))
    bold = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", score)  # Predict's Markdown message, as HTML
    scored = f"<div class='dx-sub'>{bold}</div>" if score else ""
    mark = "✔" if score else "○"
    parts.append(f"<li>{mark} <b>3. Score target_eval_id.csv</b> (90 labelled Indonesian sentences) in Predict: "
                 f"with and without the language vector{scored}</li>")
    return f"<div class='dx-progress'><ul class='dx-steps'>{''.join(parts)}</ul></div>"


def run_steps(studio: Studio, n: int, kind: str, row: dict | None) -> str:
    """One run of the demo: its state badge, and each sub-step done (✔), running (●, with its step) or waiting."""
    if row is None:
        return f"<li>✖ <b>{n}. {TITLES[kind]}</b>: the run is gone from the registry</li>"
    state = row["state"]
    status = RunDir(row["run_dir"]).status()
    phase = "done" if state == "done" else (status.get("phase") or row["phase"] or "")
    now = ORDER.index(phase) if phase in ORDER else -1
    step, total = int(status.get("step") or row["step"] or 0), int(status.get("total_steps") or row["total_steps"] or 0)
    subs = []
    for name, label in STEPS[kind]:
        i = ORDER.index(name)
        if state == "done" or (now > i and state == "running"):
            mark = "✔"
        elif now == i and state == "running":
            mark, label = "●", label + (f" · step {step} / {total}" if total else " …")
        elif now == i and state != "queued":
            mark = "✖"
        else:
            mark = "○"
        subs.append(f"<div class='dx-sub'>{mark} {html.escape(label)}</div>")
    evidence = studio.evidence(row)
    badge = f"<span class='dx-badge' style='background:{STATE_COLORS.get(state, '#6b7280')}'>{state}</span>"
    held = f"<div class='dx-sub'>{evidence_html(*evidence)}</div>" if evidence else ""
    return f"<li>{badge} <b>{n}. {TITLES[kind]}</b>{''.join(subs)}{held}</li>"


# once Predict shows the demo's scores, bring them into view (the tab opens at its top, the scores are further down)
SHOW_SCORE_JS = ("() => { const e = document.getElementById('dx-predict-file-status');"
                 " if (e && e.offsetParent && e.textContent.includes('macro-F1'))"
                 " e.scrollIntoView({block: 'center'}); }")


def wire(ui: UI) -> None:
    ui.on(ui["start.run"].click, run_demo, api_name="run_demo")
    ui.on(ui["app.timer"].tick, demo_progress, ["start.demo"], api_visibility="private", show_progress="hidden")
    scored = ui.on(ui["start.demo"].change, score_demo, ["start.demo"], api_visibility="private")
    scored.then(None, js=SHOW_SCORE_JS)  # the demo's result, not below the fold
