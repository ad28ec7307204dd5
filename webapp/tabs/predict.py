"""Predict tab: a task vector plus a language vector (or none) composed with the base model (built once and
cached): one text -> label probabilities; a file -> a CSV of predictions; a labelled file -> macro-F1,
accuracy and confusion matrix (recorded for the model card)."""
from __future__ import annotations

import csv
import html
import time
from pathlib import Path

import gradio as gr

from deftx_engine.data import load_corpus, load_task_data
from deftx_engine.errors import DeftxError
from deftx_engine.fileio import atomic_open

from .. import DATA_SUFFIXES, EXAMPLE
from ..components import UI, Updates, handler
from ..render import ok
from ..settings import max_lines
from ..state import Studio
from .pickers import refresh_on_open


def layout(ui: UI) -> None:
    with gr.Row():
        task = gr.Dropdown([], label="Task vector", scale=1, allow_custom_value=True, elem_id="dx-task-vector")
        lang = gr.Dropdown([("none", "")], value="", label="Language vector", scale=1, allow_custom_value=True,
                           info="θ = θ0 + φ_task + φ_language")
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
            spec = gr.Textbox(str(EXAMPLE["eval"]), label="…or a path / Hub dataset")
            with gr.Row():
                batch = gr.Button("Predict every row → CSV")
                score = gr.Button("Score a labelled file", variant="primary")
            file_status = gr.Markdown(elem_classes="dx-status")
            csv_file = gr.File(label="Predictions (CSV)", interactive=False, visible=False)
        with gr.Column(scale=1):
            confusion = gr.Plot(label="Confusion matrix", show_label=False)
    ui.add("predict", task=task, lang=lang, text=text, pair=pair, button=button, status=status, plot=plot,
           file=file, spec=spec, batch=batch, score=score, file_status=file_status, csv=csv_file,
           confusion=confusion, lang_touched=gr.State(False))  # the user picked a language vector (or none)


def composed(studio: Studio, task_run: str | None, language_run: str | None):
    """((model, tokenizer, label names), cached) for the chosen vectors."""
    return studio.composed(studio.run_vector_dir(task_run, "task vector"),
                           studio.run_vector_dir(language_run, "language vector") if language_run else None)


@handler("predict.status", "predict.plot")
def predict(studio: Studio, task_run, language_run, text, pair) -> Updates:
    """Label probabilities of one text (pair) under θ0 + task (+ language); returns (message, figure)."""
    from deftx_engine.evaluate import predict_proba
    from deftx_engine.plots import probabilities_figure

    text = (text or "").strip()
    if not text:
        raise DeftxError("type a text to classify")
    t0 = time.perf_counter()
    (model, tok, names), cached = composed(studio, task_run, language_run)
    pair = (pair or "").strip()
    probs = predict_proba(model, tok, [text], [pair] if pair else None)[0].tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    ms = (time.perf_counter() - t0) * 1000
    note = "" if cached else " (composed model built and cached)"
    return {"predict.status": f"**{html.escape(names[best])}** ({probs[best]:.1%}) · {ms:.0f} ms{note}",
            "predict.plot": probabilities_figure(names, probs)}


@handler("predict.file_status", "predict.csv")
def predict_file(studio: Studio, task_run, language_run, file, spec, text_column, pair_column) -> Updates:
    """Predict every row of a file; returns (message, CSV path)."""
    from deftx_engine.evaluate import predict_proba

    source, shown = studio.resolve_source(file, spec)
    (model, tok, names), _ = composed(studio, task_run, language_run)
    text_column = (text_column or "").strip() or None
    pairs = None
    try:  # a labelled file (or one with premise/hypothesis columns) keeps its layout
        td = load_task_data(source, text_column=text_column, pair_column=(pair_column or "").strip() or None,
                            label_names=names, max_rows=max_lines())
        texts, pairs = td.texts, td.text_pairs
    except DeftxError:
        texts = load_corpus(source, text_column, max_lines=max_lines())
    probs = predict_proba(model, tok, texts, pairs).tolist()
    out = studio.outputs / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}-{Path(shown).stem[:40]}.csv"
    with atomic_open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"] + (["second_text"] if pairs else []) + ["prediction"] + [f"p_{n}" for n in names])
        for i, row in enumerate(probs):
            best = max(range(len(row)), key=row.__getitem__)
            w.writerow([texts[i]] + ([pairs[i]] if pairs else []) + [names[best]] + [f"{p:.4f}" for p in row])
    return {"predict.file_status": ok(f"{len(texts):,} rows of **{html.escape(shown)}** predicted: download the CSV "
                                      "below."),
            "predict.csv": gr.update(value=str(out), visible=True)}


@handler("predict.file_status", "predict.confusion")
def evaluate_file(studio: Studio, task_run, language_run, file, spec, text_column, pair_column,
                  label_column) -> Updates:
    """Macro-F1, accuracy and confusion matrix on a labelled file; returns (message, figure)."""
    from deftx_engine.evaluate import evaluate_task_data
    from deftx_engine.plots import confusion_figure

    source, shown = studio.resolve_source(file, spec)
    (model, tok, names), _ = composed(studio, task_run, language_run)
    td = load_task_data(source, text_column=(text_column or "").strip() or None,
                        pair_column=(pair_column or "").strip() or None,
                        label_column=(label_column or "").strip() or "label", label_names=names, max_rows=max_lines())
    m = evaluate_task_data(model, tok, td)
    key = Path(shown).name + (" (task + language vector)" if language_run else " (task vector alone)")
    summary = {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4), "n": m["n"]}
    for rid in filter(None, (task_run, language_run)):  # shown in the model card when pushed
        row = studio.registry.get(rid)
        studio.registry.update_config(rid, metrics={**(row["config"].get("metrics") or {}), key: summary})
    f1 = ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in m["f1"].items())
    return {"predict.file_status": ok(f"**{html.escape(shown)}** ({m['n']:,} examples): macro-F1 "
                                      f"**{m['macro_f1']:.3f}**, accuracy **{m['accuracy']:.3f}** · "
                                      f"F1 per label: {f1}"),
            "predict.confusion": confusion_figure(m)}


@handler("predict.lang_touched", status=None)
def language_touched(studio: Studio) -> Updates:
    return {"predict.lang_touched": True}


def wire(ui: UI) -> None:
    one = ["predict.task", "predict.lang", "predict.text", "predict.pair"]
    ui.on(ui["predict.button"].click, predict, one, api_name="predict")
    ui.on(ui["predict.text"].submit, predict, one, api_visibility="private")
    whole = ["predict.task", "predict.lang", "predict.file", "predict.spec", "data.text", "data.pair"]
    ui.on(ui["predict.batch"].click, predict_file, whole, api_name="predict_file")
    ui.on(ui["predict.score"].click, evaluate_file, whole + ["data.label"], api_name="evaluate")
    ui.on(ui["predict.lang"].input, language_touched, api_visibility="private")
    refresh_on_open(ui, "predict")
