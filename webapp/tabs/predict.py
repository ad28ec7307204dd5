"""Predict tab: a task vector plus a language vector (or none) composed with the base model (built once and
cached): one text -> label probabilities; a file -> a CSV of predictions; a labelled file -> macro-F1,
accuracy and confusion matrix (recorded for the model card)."""
from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from deftx_engine.constants import MERGES
from deftx_engine.errors import DeftxError
from deftx_engine.fileio import atomic_open
from deftx_engine.training.data import load_task_data

from .. import DATA_SUFFIXES, EXAMPLE
from ..components import FIELD_LABELS, UI, Updates, handler
from ..render import cut, ok
from ..render import text as shown_text
from ..settings import max_lines, max_score_seconds, max_text_chars
from ..state import Studio
from .pickers import refresh_on_open
from .train_form import number

MAX_SCALE = 4.0  # a language vector scaled further is no longer a composition anyone means


def layout(ui: UI) -> None:
    with gr.Row():
        task = gr.Dropdown([], label="Task vector", scale=1, allow_custom_value=True, elem_id="dx-task-vector")
        lang = gr.Dropdown([("none", "")], value="", label="Language vector", scale=1, allow_custom_value=True,
                           info="θ = θ0 + φ_task + φ_language")
    with gr.Row():
        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Language vector scale", scale=2,
                          info="θ0 + φ_task + scale · φ_language (sum only; 0 = task vector alone)")
        merge = gr.Radio([("sum", "sum"), ("TIES", "ties")], value="sum", label="Merge", scale=1,
                         info="TIES: trim each vector, elect signs, average agreeing entries")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            text = gr.Textbox(label="Text", lines=3, placeholder="Makanannya enak sekali!", elem_id="dx-text")
            pair = gr.Textbox(label="Second text (sentence-pair tasks such as NLI only)", lines=2)
            button = gr.Button("Predict", variant="primary", elem_id="dx-predict")
            status = gr.Markdown(elem_classes="dx-status", elem_id="dx-predict-status")
        with gr.Column(scale=1):
            plot = gr.Plot(label="Label probabilities", elem_id="dx-probs", show_label=False)
    gr.Markdown("### A whole file")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            file = gr.File(label="Upload a file", file_types=DATA_SUFFIXES, type="filepath", height=110)
            spec = gr.Textbox(ui.studio.shown_path(EXAMPLE["eval"]), label="…or a path / Hub dataset")
            with gr.Accordion("Columns of this file", open=False):  # this tab's own: the Data tab's never apply
                with gr.Row():
                    textcol = gr.Textbox("", label=FIELD_LABELS["text_column"], placeholder="auto")
                    paircol = gr.Textbox("", label=FIELD_LABELS["pair_column"], placeholder="auto")
                    labelcol = gr.Textbox("label", label=FIELD_LABELS["label_column"])
            with gr.Row():
                batch = gr.Button("Predict every row → CSV")
                score = gr.Button("Score a labelled file", variant="primary")
                stop = gr.Button("Stop", variant="stop", scale=0, min_width=80)
            file_status = gr.Markdown(elem_classes="dx-status", elem_id="dx-predict-file-status")
            csv_file = gr.File(label="Predictions (CSV)", interactive=False, visible=False)
        with gr.Column(scale=1):
            confusion = gr.Plot(label="Confusion matrix", show_label=False)
    ui.add("predict", task=task, lang=lang, text=text, pair=pair, button=button, status=status, plot=plot,
           file=file, spec=spec, batch=batch, score=score, stop=stop, file_status=file_status, csv=csv_file,
           confusion=confusion, scale=scale, merge=merge, textcol=textcol, paircol=paircol, labelcol=labelcol,
           lang_touched=gr.State(False))  # the user picked a language vector (or none)


def composed(studio: Studio, task_run: str | None, language_run: str | None, scale=1.0, merge="sum"):
    """((model, tokenizer, label names), cached) for the chosen vectors, the language vector's scale and the
    merge (sum or TIES)."""
    if merge not in MERGES:
        raise DeftxError(f"merge must be one of {', '.join(MERGES)}, got {cut(merge, 40)!r}")
    scale = number(scale, "language vector scale", minimum=0.0, default=1.0)
    if scale > MAX_SCALE:
        raise DeftxError(f"the language vector scale must be at most {MAX_SCALE:g}, got {scale:g}")
    return studio.composed(studio.run_vector_dir(task_run, "task vector"),
                           studio.run_vector_dir(language_run, "language vector") if language_run else None,
                           scale, merge)


def composition(language_run: str | None, scale: float, merge: str) -> str:
    """How the vectors were combined, in words (the key of a recorded evaluation)."""
    if not language_run:
        return "task vector alone"
    return "task + language vector, " + ("TIES" if merge == "ties" else f"sum, scale {float(scale):g}")


def check_length(text: str, what: str) -> str:
    """Refuse a text longer than DEFTX_MAX_TEXT_CHARS before it reaches the tokenizer."""
    limit = max_text_chars()
    if len(text) > limit:
        raise DeftxError(f"the {what} is {len(text):,} characters long; this server accepts at most {limit:,} "
                         "(DEFTX_MAX_TEXT_CHARS), and the model reads only the first 128 tokens")
    return text


@contextmanager
def scoring(studio: Studio, request: gr.Request | None) -> Iterator[Callable[[], str | None]]:
    """The stop check of one file scoring: the session's Stop button, or DEFTX_MAX_SCORE_SECONDS passed."""
    limit = max_score_seconds()
    deadline = time.monotonic() + limit
    key = getattr(request, "session_hash", None) or secrets.token_hex(8)
    flag = studio.scoring[key] = threading.Event()

    def stop() -> str | None:
        if flag.is_set():
            return "stopped with the Stop button"
        if time.monotonic() > deadline:
            return f"over this server's limit of {limit:g} s (DEFTX_MAX_SCORE_SECONDS); use a smaller file"
        return None

    try:
        yield stop
    finally:
        if studio.scoring.get(key) is flag:
            del studio.scoring[key]


@handler("predict.file_status")
def stop_scoring(studio: Studio, request: gr.Request | None = None) -> Updates:
    """Stop this session's file prediction or scoring after its current batch."""
    flag = studio.scoring.get(getattr(request, "session_hash", None) or "")
    if flag is None:
        return {"predict.file_status": "Nothing is being scored."}
    flag.set()
    return {"predict.file_status": "Stopping…"}


def output_path(studio: Studio, shown: str) -> Path:
    """An unguessable, unique CSV name per request (128 random bits), so sessions never share or guess one."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(shown).stem)[:40].strip("._-") or "file"
    return studio.outputs / f"predictions-{secrets.token_hex(16)}-{stem}.csv"


@handler("predict.status", "predict.plot", on_error={"predict.plot": None})  # no stale chart beside an error
def predict(studio: Studio, task_run, language_run, text, pair, scale=1.0, merge="sum") -> Updates:
    """Label probabilities of one text (pair) under θ0 + task (+ language); returns (message, figure)."""
    from deftx_engine.outputs.inference import predict_proba
    from deftx_engine.outputs.plots import probabilities_figure

    text = check_length((text or "").strip(), "text")
    pair = check_length((pair or "").strip(), "second text")
    if not text:
        raise DeftxError("type a text to classify")
    t0 = time.perf_counter()
    (model, tok, names), cached = composed(studio, task_run, language_run, scale, merge)
    probs = predict_proba(model, tok, [text], [pair] if pair else None)[0].tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    ms = (time.perf_counter() - t0) * 1000
    note = "" if cached else " (composed model built and cached)"
    return {"predict.status": f"**{shown_text(names[best])}** ({probs[best]:.1%}) · {ms:.0f} ms{note}",
            "predict.plot": probabilities_figure(names, probs)}


@handler("predict.file_status", "predict.csv", on_error={"predict.csv": gr.update(value=None, visible=False)})
def predict_file(studio: Studio, task_run, language_run, file, spec, text_column, pair_column, scale=1.0,
                 merge="sum", label_column="label", request: gr.Request | None = None) -> Updates:
    """Predict every row of a file (at most DEFTX_MAX_LINES rows, stopped by Stop or after
    DEFTX_MAX_SCORE_SECONDS); returns (message, CSV path). The CSV has the file's gold label when it has one."""
    from deftx_engine.outputs.inference import predict_proba, prediction_inputs, write_predictions

    source, shown = studio.resolve_source(file, spec)
    (model, tok, names), _ = composed(studio, task_run, language_run, scale, merge)
    texts, pairs, gold = prediction_inputs(source, (text_column or "").strip() or None,
                                           (pair_column or "").strip() or None,
                                           (label_column or "").strip() or "label", max_rows=max_lines())
    with scoring(studio, request) as stop:
        probs = predict_proba(model, tok, texts, pairs, stop=stop).tolist()
    out = output_path(studio, shown)
    with atomic_open(out, "w", newline="") as f:  # written aside, renamed when complete
        write_predictions(f, names, probs, texts, pairs, gold)
    return {"predict.file_status": ok(f"{len(texts):,} rows of **{shown_text(shown)}** predicted: download the CSV "
                                      "below."),
            "predict.csv": gr.update(value=str(out), visible=True)}


@handler("predict.file_status", "predict.confusion", on_error={"predict.confusion": None})
def evaluate_file(studio: Studio, task_run, language_run, file, spec, text_column, pair_column,
                  label_column, scale=1.0, merge="sum", request: gr.Request | None = None) -> Updates:
    """Macro-F1, accuracy and confusion matrix on a labelled file; returns (message, figure). With a language
    vector the task vector alone is scored too, and both are shown side by side with their difference, so a
    language vector that costs accuracy shows as costing it."""
    from deftx_engine.outputs.inference import evaluate_task_data
    from deftx_engine.outputs.plots import confusion_figure

    source, shown = studio.resolve_source(file, spec)
    (model, tok, names), _ = composed(studio, task_run, language_run, scale, merge)
    td = load_task_data(source, text_column=(text_column or "").strip() or None,
                        pair_column=(pair_column or "").strip() or None,
                        label_column=(label_column or "").strip() or "label", label_names=names, max_rows=max_lines())
    # the task vector alone is built before anything is scored: a run deleted meanwhile by another session
    # (its folder gone) then costs no score computed
    task_only = composed(studio, task_run, None)[0] if language_run else None
    alone = None
    with scoring(studio, request) as stop:
        m = evaluate_task_data(model, tok, td, stop=stop)
        if task_only:
            alone = evaluate_task_data(task_only[0], task_only[1], td, stop=stop)
    name = Path(shown).name
    summary = {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4), "n": m["n"]}
    if alone:  # recorded with its composition, beside the task vector's own score (shown in the model cards)
        summary.update(merge=merge, language_scale=float(scale) if merge == "sum" else None,
                       task_only_macro_f1=round(alone["macro_f1"], 4),
                       difference=round(m["macro_f1"] - alone["macro_f1"], 4))
        studio.registry.add_metrics(task_run, f"{name} (task vector alone)", {
            "macro_f1": round(alone["macro_f1"], 4), "accuracy": round(alone["accuracy"], 4), "n": alone["n"]})
    for rid in filter(None, (task_run, language_run)):
        studio.registry.add_metrics(rid, f"{name} ({composition(language_run, scale, merge)})", summary)
    f1 = per_label_f1(m)
    head = (f"**{shown_text(shown)}** ({m['n']:,} examples), {composition(language_run, scale, merge)}: macro-F1 "
            f"**{m['macro_f1']:.3f}**, accuracy **{m['accuracy']:.3f}**")
    return {"predict.file_status": ok(head) + (side_by_side(m, alone) if alone else "") + f" · F1 per label: {f1}",
            "predict.confusion": confusion_figure(m)}


def per_label_f1(m: dict) -> str:
    """F1 per label, "–" for a label neither true nor predicted in the file (its F1 is undefined, and macro-F1
    leaves it out: said when it does)."""
    covered = m.get("macro_labels", list(m["f1"]))
    cells = ", ".join(f"{shown_text(k)} {v:.3f}" if k in covered else f"{shown_text(k)} –" for k, v in m["f1"].items())
    if len(covered) == len(m["f1"]):
        return cells
    return f"{cells} (macro-F1 over {', '.join(shown_text(k) for k in covered)}: the labels in this file or predicted)"


def side_by_side(m: dict, alone: dict) -> str:
    """The composed model's macro-F1 next to the task vector's alone, and what the language vector adds or costs."""
    from deftx_engine.outputs.inference import language_effect

    diff = m["macro_f1"] - alone["macro_f1"]
    verdict = language_effect(diff)
    if diff:
        verdict = f"<span class='dx-ok'>▲ {verdict}</span>" if diff > 0 else f"<span class='dx-err'>▼ {verdict}</span>"
    return (f"<br>with the language vector: macro-F1 **{m['macro_f1']:.3f}**; task only: "
            f"**{alone['macro_f1']:.3f}**; difference **{diff:+.3f}** — {verdict}")


@handler("predict.scale", status=None)
def merge_changed(studio: Studio, merge) -> Updates:
    """TIES merges at its own lambda: the scale slider applies to a sum only."""
    return {"predict.scale": gr.update(interactive=merge != "ties")}


@handler("predict.lang_touched", status=None)
def language_touched(studio: Studio) -> Updates:
    return {"predict.lang_touched": True}


def wire(ui: UI) -> None:
    one = ["predict.task", "predict.lang", "predict.text", "predict.pair", "predict.scale", "predict.merge"]
    ui.on(ui["predict.button"].click, predict, one, api_name="predict")
    ui.on(ui["predict.text"].submit, predict, one, api_visibility="private")
    whole = ["predict.task", "predict.lang", "predict.file", "predict.spec", "predict.textcol", "predict.paircol"]
    combine = ["predict.scale", "predict.merge"]
    batch = ui.on(ui["predict.batch"].click, predict_file, whole + combine + ["predict.labelcol"],
                  api_name="predict_file")
    score = ui.on(ui["predict.score"].click, evaluate_file, whole + ["predict.labelcol"] + combine,
                  api_name="evaluate")
    ui.on(ui["predict.merge"].change, merge_changed, ["predict.merge"], api_visibility="private")
    ui.on(ui["predict.stop"].click, stop_scoring, api_name="stop_scoring", cancels=[batch, score], queue=False)
    ui.on(ui["predict.lang"].input, language_touched, api_visibility="private")
    refresh_on_open(ui, "predict")
