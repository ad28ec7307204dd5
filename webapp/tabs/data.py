"""Data tab: check a corpus or task file (upload, typed path or Hub split) and hand it to the Train tab (or, for
evaluation data, to the Predict tab)."""
from __future__ import annotations

import gradio as gr

from deftx_engine.training.data import describe_corpus, describe_task, load_corpus, load_task_data

from .. import DATA_SUFFIXES, EXAMPLE
from ..components import FIELD_LABELS, UI, Updates, handler
from ..render import cut, label_bar, ok
from ..render import text as shown_text
from ..settings import max_lines
from ..state import Studio

CHECK_INPUTS = ["data.role", "data.file", "data.spec", "data.text", "data.pair", "data.label"]


def layout(ui: UI) -> None:
    shown = {role: ui.studio.shown_path(path) for role, path in EXAMPLE.items()}  # no server path on the page
    gr.Markdown("Check a file before training: the preview shows what the trainer will read, and "
                "errors name the line and field to fix. The example files are preselected.",
                elem_classes="dx-help")
    with gr.Row():
        with gr.Column(scale=2):
            role = gr.Radio([("Target-language text (language SFT)", "corpus"),
                             ("Labelled source task data (task SFT)", "task"),
                             ("Labelled target-language evaluation data", "eval")],
                            value="corpus", label="What is this data?")
            file = gr.File(label="Upload a file", file_types=DATA_SUFFIXES, type="filepath", height=110)
            spec = gr.Textbox(shown["corpus"], label="…or a path / Hub dataset",
                              info=".txt, .csv, .tsv or .jsonl; hub:org/name[:config][@split][#column] "
                                   "loads a Hub split")
            with gr.Accordion("Columns", open=False):
                text = gr.Textbox("", label=FIELD_LABELS["text_column"], placeholder="auto: text / premise+hypothesis")
                pair = gr.Textbox("", label=f"{FIELD_LABELS['pair_column']} (pair tasks)", placeholder="auto")
                label = gr.Textbox("label", label=FIELD_LABELS["label_column"])
            check = gr.Button("Check data", variant="primary")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_classes="dx-status")
            preview = gr.Dataframe(label="Preview (first rows)", interactive=False, max_height=300, wrap=True)
            chart = gr.Plot(label="Label distribution", visible=False, show_label=False)
    use = gr.Markdown(elem_classes="dx-help")
    ui.add("data", role=role, file=file, spec=spec, text=text, pair=pair, label=label, check=check, status=status,
           preview=preview, chart=chart, use=use, source=gr.State(shown["corpus"]),
           corpus=gr.State({"data": shown["corpus"], "text": "", "pair": "", "label": "label"}),
           task=gr.State({"data": shown["task"], "text": "", "pair": "", "label": "label"}))


def failed_check(msg: str) -> Updates:
    """A file that fails the check leaves no preview, chart or "the Train tab will use this file" of the last one;
    the preview says what is wrong (not an empty table headed 1 2 3)."""
    import pandas as pd

    return {"data.preview": pd.DataFrame({"what is wrong": [msg]}), "data.chart": gr.update(value=None, visible=False),
            "data.source": ""}


@handler("data.status", "data.preview", "data.chart", "data.source", on_error=failed_check)
def validate_data(studio: Studio, role, file, spec, text_column, pair_column, label_column) -> Updates:
    """Check a corpus / task file; returns (message, preview table, label chart, source used: as the page shows
    paths, ``shown_path``)."""
    import pandas as pd

    source, shown = studio.resolve_source(file, spec)
    text_column = (text_column or "").strip() or None
    pair_column = (pair_column or "").strip() or None
    label_column = (label_column or "").strip() or "label"
    limit = max_lines()
    if role == "corpus":
        lines = load_corpus(source, text_column, max_lines=limit)
        d = describe_corpus(lines)
        df = pd.DataFrame({"line": range(1, min(len(lines), 20) + 1), "text": [cut(t) for t in lines[:20]]})
        msg = ok(f"**{shown_text(shown)}**: {d['n_lines']:,} lines, {d['n_chars']:,} characters, "
                 f"{d['mean_words']} words per line on average. Used for language SFTs.")
        return {"data.status": msg, "data.preview": df, "data.chart": gr.update(value=None, visible=False),
                "data.source": studio.shown_path(source)}
    td = load_task_data(source, text_column=text_column, pair_column=pair_column, label_column=label_column,
                        max_rows=limit)
    d = describe_task(td)
    cols = {"text": [cut(t) for t in td.texts[:20]]}
    if td.is_pair:
        cols["second text"] = [cut(t) for t in td.text_pairs[:20]]
    cols["label"] = [cut(t) for t in td.labels[:20]]
    counts = d["label_counts"]
    use = "task SFTs" if role == "task" else "scoring in the Predict tab"
    names = [shown_text(cut(k, 40)) for k in list(counts)[:30]] + (["…"] if len(counts) > 30 else [])
    msg = ok(f"**{shown_text(shown)}**: {d['n_rows']:,} {'sentence pairs' if td.is_pair else 'texts'}, "
             f"{len(counts)} labels ({', '.join(names)}). Used for {use}.")
    return {"data.status": msg, "data.preview": pd.DataFrame(cols),
            "data.chart": gr.update(value=label_bar(counts, "Label distribution"), visible=True),
            "data.source": studio.shown_path(source)}


@handler("data.spec", "data.file", status=None)
def role_changed(studio: Studio, role) -> Updates:
    """A new role preselects its example file."""
    return {"data.spec": studio.shown_path(EXAMPLE[role]), "data.file": None}


@handler("train.data", "train.textcol", "train.paircol", "train.labelcol", "predict.spec", "data.use",
         "predict.textcol", "predict.paircol", "predict.labelcol", status=None)
def use_source(studio: Studio, role, source, text_column, pair_column, label_column, kind) -> Updates:
    """After a successful check, the Train (or Predict) tab uses this source."""
    if not source:  # the last check failed
        return {"data.use": ""}
    if role == "eval":  # with its columns, shown in the Predict tab's own fields
        return {"predict.spec": source, "predict.textcol": text_column, "predict.paircol": pair_column,
                "predict.labelcol": label_column or "label", "data.use": "The **Predict** tab will score this file."}
    want = "language" if role == "corpus" else "task"
    note = (f"The **Train** tab will use this file for {want} SFTs"
            + ("." if kind == want else f" — switch *Kind* to {want} there."))
    if kind != want:
        return {"data.use": note}
    return {"train.data": source, "train.textcol": text_column, "train.paircol": pair_column,
            "train.labelcol": label_column or "label", "data.use": note}


@handler("data.corpus", "data.task", status=None)
def remember(studio: Studio, role, source, text_column, pair_column, label_column) -> Updates:
    """The last checked corpus and task file, for when the Train tab switches kind."""
    if source and role in ("corpus", "task"):
        entry = {"data": source, "text": text_column or "", "pair": pair_column or "", "label": label_column or "label"}
        return {f"data.{role}": entry}
    return {}


def wire(ui: UI) -> None:
    ui.on(ui["data.check"].click, validate_data, CHECK_INPUTS, api_name="validate_data")
    ui.on(ui["data.file"].upload, validate_data, CHECK_INPUTS, api_visibility="private")
    # a cleared upload: the form names the typed path again, so its check replaces the upload's result
    ui.on(ui["data.file"].clear, validate_data, CHECK_INPUTS, api_visibility="private")
    changed = ui.on(ui["data.role"].change, role_changed, ["data.role"], api_visibility="private")
    ui.on(changed.then, validate_data, CHECK_INPUTS, api_visibility="private")
    checked = ["data.role", "data.source", "data.text", "data.pair", "data.label"]
    ui.on(ui["data.source"].change, use_source, checked + ["train.kind"], api_visibility="private")
    ui.on(ui["data.source"].change, remember, checked, api_visibility="private")
