"""The vector pickers of the Analyze, Predict and Hub tabs: their choices and sensible defaults, refreshed from
the registry when one of those tabs is opened and when the page loads."""
from __future__ import annotations

import gradio as gr

from ..components import UI, Updates, handler
from ..render import run_choices
from ..state import Studio

PICKERS = ["analyze.run", "analyze.other", "predict.task", "predict.lang", "hub.run"]
PICKER_INPUTS = PICKERS + ["predict.lang_touched"]


@handler(*PICKERS, "analyze.status", "predict.status", status=None)
def vector_lists(studio: Studio, a_cur, b_cur, t_cur, l_cur, h_cur, l_touched=False) -> Updates:
    """Choices (and sensible defaults) of every vector picker, from the registry."""
    vecs = studio.vector_runs()
    allc = run_choices(vecs)
    ids = [r["id"] for r in vecs]
    by_id = {r["id"]: r for r in vecs}

    def base(rid):
        return by_id[rid]["config"].get("base_model") if rid in by_id else None

    a_val = a_cur if a_cur in ids else (ids[0] if ids else None)
    if b_cur in ids or (b_cur == "" and a_cur in ids):
        b_val = b_cur
    else:  # the newest vector of the other kind for the same base model, else any other one
        same = [r for r in vecs if r["id"] != a_val and base(r["id"]) == base(a_val)]
        other_kind = [r for r in same if r["kind"] != by_id[a_val]["kind"]] if a_val else []
        b_val = (other_kind or same or [{"id": ""}])[0]["id"]
    tasks = [r for r in vecs if r["kind"] == "task"]
    t_ids = [r["id"] for r in tasks]
    t_val = t_cur if t_cur in t_ids else (t_ids[0] if t_ids else None)
    langs = [r for r in vecs if r["kind"] == "language"]
    l_ids = [r["id"] for r in langs]
    if l_cur in l_ids or (l_cur == "" and l_touched):
        l_val = l_cur
    else:  # the newest language vector for the task vector's base model
        l_val = next((r["id"] for r in langs if r["config"].get("base_model") == base(t_val)), "")
    hint = "" if vecs else ("No vectors yet: train one in the **Train** tab (or pull one in the **Hub** "
                            "tab); it appears here when it is done.")
    p_hint = "" if tasks else ("No task vector yet: train a **task** SFT in the Train tab (or pull one in the "
                               "Hub tab). A language vector alone cannot classify.")
    return {"analyze.run": gr.update(choices=allc, value=a_val),
            "analyze.other": gr.update(choices=[("none", "")] + allc, value=b_val or ""),
            "predict.task": gr.update(choices=run_choices(tasks), value=t_val),
            "predict.lang": gr.update(choices=[("none", "")] + run_choices(langs), value=l_val),
            "hub.run": gr.update(choices=allc, value=h_cur if h_cur in ids else (ids[0] if ids else None)),
            "analyze.status": hint, "predict.status": p_hint}


def refresh_on_open(ui: UI, tab: str):
    """Refresh every picker when ``tab`` is opened; returns the event (for ``.then``)."""
    return ui.on(ui[f"{tab}.tab"].select, vector_lists, PICKER_INPUTS, api_visibility="private")
