"""DeFT-X Studio: the Gradio Blocks app (tabs Start, Data, Train, Runs, Analyze, Predict, Hub).

A thin layer over the engine's public API. Training runs are CLI processes (``python -m deftx_engine.cli
train-language|train-task``) queued in the job registry (``webapp.jobs``); the app only reads their run
folders (``deftx_engine.training.runs.RunDir``). Every event has a stable ``api_name`` so ``gradio_client`` can drive
the app. Errors a user can act on (``DeftxError``) are shown inline and as a toast, never as a traceback.

``build_app`` only builds the page: the services (scheduler, recovery, warm-up) are started by
``Studio.start()``, which ``app.py`` calls. torch / transformers are imported lazily (first prediction, first
Start, or the warm-up thread), so the page is served quickly.
"""
from __future__ import annotations

import gradio as gr

from .components import UI
from .state import Studio
from .tabs import analyze, data, hub, predict, runs, start, train
from .tabs.data import CHECK_INPUTS, validate_data
from .tabs.pickers import PICKER_INPUTS, vector_lists

TABS = (("Start", start), ("Data", data), ("Train", train), ("Runs", runs), ("Analyze", analyze), ("Predict", predict),
        ("Hub", hub))
HEADER = ("<div class='dx-header'><h1>DeFT-X Studio</h1><p>Zero-shot cross-lingual transfer with composable, "
          "SVD-denoised sparse fine-tunings: train a <b>language</b> SFT on unlabelled target-language text and a "
          "<b>task</b> SFT on labelled source-language data, then add both to the base model.</p></div>")


def build_app(studio: Studio) -> gr.Blocks:
    """The DeFT-X Studio Blocks over ``studio`` (its services are not started here)."""
    ui = UI(studio)
    with gr.Blocks(title="DeFT-X Studio", fill_width=False) as demo:
        gr.HTML(HEADER, js_on_load=None)
        with gr.Tabs() as tabs:
            for title, module in TABS:
                with gr.Tab(title, id=module.__name__.rsplit(".", 1)[-1]) as tab:
                    module.layout(ui)
                ui.add(tab.id, tab=tab)
        # the guided demo opens Predict; its timer is outside the tabs, which Gradio mounts only once opened
        ui.add("app", tabs=tabs, timer=gr.Timer(2.0))
        for _, module in TABS:
            module.wire(ui)
        loaded = ui.on(demo.load, runs.page_loaded, api_visibility="private")
        ui.on(demo.load, start.demo_reloaded, api_visibility="private")
        checked = ui.on(loaded.then, validate_data, CHECK_INPUTS, api_visibility="private")
        ui.on(checked.then, vector_lists, PICKER_INPUTS, api_visibility="private")
    demo.queue(default_concurrency_limit=4)
    return demo
