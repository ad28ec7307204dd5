"""The Hub tab's gallery: released (composable-sft) and pushed language and task vectors, from the Hub when it
answers, else from the catalogue shipped with DeFT-X (``deftx_engine.hub.gallery``), beside the vectors on this
server, by base model, kind and language. One button goes from a pick ("sentiment in Javanese": a task vector
and a language vector on one base model) to Predict with that composition chosen: mismatched bases are
refused before anything is downloaded, what is not here yet is pulled and listed as a run, and the composed
model is built (its base model fetched from the Hub on first use)."""
from __future__ import annotations

import time

import gradio as gr

from deftx_engine.errors import DeftxError
from deftx_engine.hub.contact import hub_off_words, hub_unavailable
from deftx_engine.hub.gallery import (
    Gallery,
    GalleryEntry,
    base_key,
    check_same_base,
    language_name,
    pull_entry,
)

from ..components import UI, Updates, handler
from ..files import bounded
from ..render import ok, run_choices, text
from ..state import Studio

BASES = [("any", ""), ("xlmr · FacebookAI/xlm-roberta-base", "xlmr"),
         ("mbert · google-bert/bert-base-multilingual-cased", "mbert")]
KINDS = [("any", ""), ("language", "language"), ("task", "task")]
COLUMNS = ["vector", "kind", "base model", "language", "task", "source", "note"]
SOURCE_WORDS = {"hub": "released · Hub", "pushed": "pushed with DeFT-X", "catalogue": "released · catalogue"}


def layout(ui: UI) -> None:
    gr.Markdown("### Gallery\nReleased language and task vectors (composable-sft's, for XLM-R and mBERT) and vectors "
                "pushed with DeFT-X, beside the ones on this server. Pick a task vector and a language vector made "
                "for the same base model: **Use in Predict** pulls what is not here yet and opens Predict with "
                "θ0 + φ_task + φ_language.")
    status = gr.Markdown(elem_classes="dx-status", elem_id="dx-hub-status")
    with gr.Row():
        base = gr.Dropdown(BASES, value="", label="Base model", allow_custom_value=True, scale=2)
        kind = gr.Radio(KINDS, value="", label="Kind", scale=1)
        lang = gr.Textbox("", label="Language", placeholder="code or name: jav, Javanese", scale=1,
                          info="language vectors for it (task vectors transfer to any language)",
                          elem_id="dx-gallery-language")
        refresh = gr.Button("Ask the Hub again", scale=0, min_width=160)
    table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, wrap=True, max_height=320,
                         elem_id="dx-gallery", show_label=False)
    with gr.Row(equal_height=True):
        task = gr.Dropdown([], label="Task vector", allow_custom_value=True, scale=2, elem_id="dx-gallery-task")
        language = gr.Dropdown([("none", "")], value="", label="Language vector", allow_custom_value=True, scale=2,
                               elem_id="dx-gallery-lang")
        use = gr.Button("Use in Predict", variant="primary", scale=1, elem_id="dx-gallery-use")
    use_status = gr.Markdown(elem_classes="dx-status", elem_id="dx-gallery-status")
    ui.add("hub", hub_status=status, g_base=base, g_kind=kind, g_lang=lang, g_refresh=refresh, gallery=table,
           g_task=task, g_language=language, g_use=use, g_status=use_status)


# ---- what is listed -------------------------------------------------------------------------------
def here_entries(studio: Studio) -> tuple[list[GalleryEntry], dict[str, dict]]:
    """The task and language vectors on this server as gallery entries (id: the run id; source "here"), and
    their registry rows by run id."""
    rows = {r["id"]: r for r in studio.vector_runs() if r["kind"] in ("task", "language")}
    entries = []
    for r in rows.values():
        code = str(r["config"].get("language") or "")
        entries.append(GalleryEntry(id=r["id"], kind=r["kind"], base_model=str(r["config"].get("base_model") or ""),
                                    source="here", language=code, language_name=language_name(code)))
    return entries, rows


def hub_line(g: Gallery, n_here: int) -> str:
    """Whether the Hub answered, in words; when it did not, that the catalogue is shown and needs the Hub."""
    here = f"{n_here} vector{'s' * (n_here != 1)} on this server"
    if g.hub_answered:
        pushed = sum(e.source == "pushed" for e in g.entries)
        return ok(f"The Hugging Face Hub answered: {len(g.entries) - pushed} released vectors, {pushed} pushed with "
                  f"DeFT-X; {here}.")
    why = hub_off_words(g.reason)
    return (f"<span class='dx-warn'>⚠</span> **{text(why[:1].upper() + why[1:])}.** Shown instead: the catalogue "
            f"shipped with DeFT-X ({len(g.entries)} released vectors), each of which needs the Hub to download; "
            f"{here}, usable without it.")


def source_word(e: GalleryEntry, rows: dict[str, dict]) -> str:
    if e.source == "here":
        return "pulled here" if rows[e.id]["config"].get("source") else "trained here"
    return SOURCE_WORDS.get(e.source, e.source)


def shown_language(e: GalleryEntry) -> str:
    return f"{e.language} ({e.language_name})" if e.language and e.language_name else e.language


def listing(studio: Studio, g: Gallery, base: str, kind: str, language: str, task_cur: str,
            lang_cur: str) -> Updates:
    """The table and the two pickers for the filters (task vectors are listed whatever the language: they
    transfer); a pick still listed is kept, else the first task vector, and the first language vector for the
    language asked for on the task vector's base model."""
    here, rows = here_entries(studio)
    both = Gallery(tuple(here) + g.entries, g.hub_answered, g.status, g.reason)
    tasks = [e for e in both.select(base=base or None, kind="task").entries if e.predicts]
    langs = list(both.select(base=base or None, kind="language", language=language or None).entries)
    shown = (tasks if kind != "language" else []) + (langs if kind != "task" else [])
    table = [[rows[e.id]["name"] if e.source == "here" else e.id, e.kind, studio.shown_path(e.base_model),
              shown_language(e), e.task, source_word(e, rows), e.note] for e in shown]

    def choices(entries: list[GalleryEntry]) -> list[tuple[str, str]]:
        mine = {run_id: label for label, run_id in run_choices([rows[e.id] for e in entries if e.source == "here"])}
        return [(f"{mine[e.id]} · {source_word(e, rows)}" if e.source == "here" else
                 f"{e.id} · {e.base_model.split('/')[-1]}", e.id) for e in entries]

    task_val = task_cur if any(e.id == task_cur for e in tasks) else (tasks[0].id if tasks else None)
    task_base = next((e.base_model for e in tasks if e.id == task_val), "")
    lang_val = lang_cur if any(e.id == lang_cur for e in langs) else ""
    if not lang_val and language:
        same = [e for e in langs if base_key(e.base_model) == base_key(task_base)]
        lang_val = (same or langs or [GalleryEntry("", "language", "", "here")])[0].id
    return {"hub.hub_status": hub_line(g, len(here)), "hub.gallery": table,
            "hub.g_task": gr.update(choices=choices(tasks), value=task_val),
            "hub.g_language": gr.update(choices=[("none", "")] + choices(langs), value=lang_val)}


@handler("hub.hub_status", "hub.gallery", "hub.g_task", "hub.g_language")
def gallery(studio: Studio, base="", kind="", language="", task="", language_vector="") -> Updates:
    """Ask the Hub (within the gallery's timeout, else the shipped catalogue) and list the vectors for the filters
    (base model, kind, language); returns (Hub status, table, task vector pick, language vector pick)."""
    return listing(studio, studio.gallery(refresh=True), *filters(base, kind, language), task, language_vector)


@handler("hub.hub_status", "hub.gallery", "hub.g_task", "hub.g_language")
def gallery_filtered(studio: Studio, base="", kind="", language="", task="", language_vector="") -> Updates:
    """The last gallery asked of the Hub, listed for new filters (asks the Hub nothing)."""
    return listing(studio, studio.gallery(), *filters(base, kind, language), task, language_vector)


def filters(base, kind, language) -> tuple[str, str, str]:
    base, language = bounded(base, "base model", 300), bounded(language, "language", 50)
    if kind not in ("", None, "task", "language"):
        raise DeftxError(f"kind must be task, language or empty (any), got {str(kind)[:40]!r}")
    return base, kind or "", language


# ---- from a pick to Predict -----------------------------------------------------------------------
def here_run(studio: Studio, choice: str, kind: str) -> str | None:
    """The run id on this server for ``choice``: the run itself, or a vector pulled from that repository before
    (so it is not downloaded again); None if it is not here."""
    row = studio.registry.get(choice)
    if row is None:
        row = next((r for r in studio.vector_runs(kind) if r["config"].get("source") == choice), None)
    if row is None:
        return None
    if row["kind"] != kind:
        raise DeftxError(f"{row['name']} is a {row['kind']} vector: choose it as the {row['kind']} vector")
    studio.run_vector_dir(row["id"], f"{kind} vector")  # done, with its folder
    return row["id"]


def gallery_entry(studio: Studio, choice: str, kind: str) -> GalleryEntry:
    entry = studio.gallery().find(choice)
    if entry.kind != kind:
        raise DeftxError(f"{choice} is a {entry.kind} vector: choose it as the {entry.kind} vector")
    if not entry.predicts:
        raise DeftxError(f"{choice}: {entry.note}")
    return entry


def base_model(studio: Studio, name: str, labels) -> object:
    """The base model ``name`` with a head for ``labels`` (fetched from the Hub on first use), to convert released
    vectors with: they then carry its fingerprint and compose with vectors trained here."""
    from deftx_engine.models.loading import load_cls_model

    studio.check_base_model(name, "the base model")
    try:
        return load_cls_model(name, list(labels) or ["0", "1"])
    except OSError as e:  # a Hub model that cannot be downloaded: one line, no server path
        raise DeftxError(f"base model {name!r} could not be loaded ({type(e).__name__}); is the Hugging Face Hub "
                         "reachable from this server?") from None


@handler("hub.g_status", "app.tabs", "predict.task", "predict.lang", "predict.lang_touched", "predict.scale",
         "predict.merge", "predict.status", "hub.run")
def use_vectors(studio: Studio, task, language_vector="") -> Updates:
    """Predict with a task vector and a language vector (or none), each a run here, a repository pulled before or a
    gallery entry: their base models are checked first (before any download), what is not here is pulled and
    listed as a run, and the composed model is built (its base model fetched on first use). Returns (message,
    the open tab, Predict's task vector, its language vector, …)."""
    from .predict import composed

    start = time.perf_counter()
    task, language_vector = bounded(task, "task vector", 300), bounded(language_vector, "language vector", 300)
    if not task:
        raise DeftxError("choose a task vector (released, pulled or trained here)")
    picks = [(task, "task")] + ([(language_vector, "language")] if language_vector else [])
    runs: dict[str, str] = {}  # kind -> run id here
    items, missing = [], []  # what check_same_base compares (in pick order); the entries to pull
    for choice, kind in picks:
        run_id = here_run(studio, choice, kind)
        if run_id:
            runs[kind] = run_id
            items.append(studio.vector(studio.run_vector_dir(run_id)))
        else:
            entry = gallery_entry(studio, choice, kind)
            items.append(entry)
            missing.append(entry)
    base = check_same_base(*items)  # before anything is downloaded
    if missing:
        why = hub_unavailable()
        if why:
            needed = " and ".join(e.id for e in missing)
            off = hub_off_words(why)
            raise DeftxError(f"{off[:1].upper()}{off[1:]}: pulling {needed} needs it. Vectors trained here, or "
                             "pulled before, can be used without it.")

    released = [e for e in missing if e.source != "pushed"]  # composable-sft's: converted with the base model
    labels = items[0].labels if isinstance(items[0], GalleryEntry) else items[0].meta.label_names
    model = base_model(studio, released[0].base_model, labels) if released else None
    for entry in missing:  # a released task vector whose labels are not known is converted without the model
        fits = entry in released and (entry.kind == "language" or bool(entry.labels))
        run_id = studio.registry.new_id()
        pull_entry(entry, studio.registry.vectors_root / run_id, model=model if fits else None)
        studio.register_pulled(studio.registry.vectors_root / run_id, run_id, entry.id, entry.id)
        runs[entry.kind] = run_id
    _, cached = composed(studio, runs["task"], runs.get("language"))  # the base model is fetched on first use
    pulled = f"pulled {' and '.join(text(e.id) for e in missing)}; " if missing else ""
    built = "" if cached else f"composed on <code>{text(studio.shown_path(base))}</code>; "
    vecs = studio.vector_runs()
    langs = [r for r in vecs if r["kind"] == "language"]
    what = "θ0 + φ_task + φ_language" if "language" in runs else "the task vector alone"
    return {"hub.g_status": ok(f"{pulled}{built}Predict is open with {what} ({time.perf_counter() - start:.1f} s)."),
            "app.tabs": gr.Tabs(selected="predict"),
            "predict.task": gr.update(choices=run_choices([r for r in vecs if r["kind"] == "task"]),
                                      value=runs["task"]),
            "predict.lang": gr.update(choices=[("none", "")] + run_choices(langs), value=runs.get("language", "")),
            "predict.lang_touched": True, "predict.scale": 1.0, "predict.merge": "sum",
            "predict.status": "Type a text and press **Predict**, or score a labelled file below (with and without "
                              "the language vector).",
            "hub.run": gr.update(choices=run_choices(vecs))}


def wire(ui: UI) -> None:
    shown = ["hub.g_base", "hub.g_kind", "hub.g_lang", "hub.g_task", "hub.g_language"]
    ui.on(ui["hub.g_refresh"].click, gallery, shown, api_name="gallery")
    ui.on(ui["hub.tab"].select, gallery, shown, api_visibility="private")
    for elem in ("hub.g_base", "hub.g_kind"):
        ui.on(ui[elem].change, gallery_filtered, shown, api_visibility="private")
    ui.on(ui["hub.g_lang"].submit, gallery_filtered, shown, api_visibility="private")
    ui.on(ui["hub.g_lang"].blur, gallery_filtered, shown, api_visibility="private")
    ui.on(ui["hub.g_use"].click, use_vectors, ["hub.g_task", "hub.g_language"], api_name="use_vectors")
