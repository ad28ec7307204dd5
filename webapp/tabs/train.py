"""Train tab: the settings of a run (filled by presets and by the Data tab), Start / Cancel / Resume. The
progress of the shown run is polled by ``tabs.runs``."""
from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

import gradio as gr

from deftx_engine.constants import METHODS as METHOD_NAMES
from deftx_engine.errors import DeftxError
from deftx_engine.models import presets as engine_presets
from deftx_engine.training.config import MAX_NAME_CHARS, TrainConfig, defaults
from deftx_engine.training.data import load_corpus, load_task_data

from .. import EXAMPLE, EXAMPLE_LANG
from ..components import FIELD_LABELS, UI, Updates, handler, takes
from ..files import bounded
from ..render import ok, run_choices
from ..render import text as shown_text
from ..rundb import QueueFull, Submission
from ..settings import max_lines, max_queue, max_steps
from ..state import Studio
from .train_checks import language_for_data
from .train_form import CUSTOM, FORM_COMPONENTS, TrainForm

BASE_MODELS = ["multilingual-e5-small", "minilm", "FacebookAI/xlm-roberta-base", "FacebookAI/xlm-roberta-large"]
PRESETS = list(engine_presets.PRESETS)  # cpu-demo, paper-xlmr-base
MAX_RUN_NAME = 100  # characters of a run name
METHOD_LABELS = {"deftx": "DeFT-X (SVD-denoised)", "lt-sft": "LT-SFT (no denoising)"}
METHODS = [(METHOD_LABELS[m], m) for m in METHOD_NAMES]  # the engine's list, labelled
# xlm-roberta-base's maskable entries (every encoder parameter but LayerNorm; benchmarks/core.py). Only used
# to show the paper preset's k, which is a count, as a share on the k slider.
XLMR_BASE_MASKABLE = 277_414_656
# the controls a preset fills, in the order of apply_preset's values
PRESET_FIELDS = ["base", "method", "policy", "energy", "rank", "rho", "k", "full", "sparse", "epochs", "lr", "bs",
                 "maxlen", "seed"]


def layout(ui: UI) -> None:
    init = engine_presets.preset("cpu-demo", "language")
    model0 = ui.studio.shown_model()  # the page holds no server path
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, elem_classes="dx-panel"):
            with gr.Row():
                preset = gr.Dropdown(PRESETS + [CUSTOM], value="cpu-demo", label="Preset",
                                     info="fills the settings below", scale=1)
                kind = gr.Radio([("Language SFT", "language"), ("Task SFT", "task")], value="language",
                                label="Kind", scale=1, elem_id="dx-kind")
            base = gr.Dropdown(list(dict.fromkeys([model0] + BASE_MODELS)), value=model0,
                               allow_custom_value=True, label=FIELD_LABELS["base_model"],
                               info="multilingual-e5-small and minilm (English only) work offline; or any Hub id / "
                                    "local model folder")
            with gr.Row():
                data = gr.Textbox(ui.studio.shown_path(EXAMPLE["corpus"]), label=FIELD_LABELS["data"], scale=3,
                                  elem_id="dx-data", info="set from the Data tab (or type a path / hub: spec)")
                lang = gr.Textbox(EXAMPLE_LANG["language"], label=FIELD_LABELS["language"], scale=1,
                                  max_length=MAX_NAME_CHARS,
                                  info="the data's language, stored in the vector (from the file name)")
            # any run id is taken (the API has no per-session choices); start_training checks it
            srclang = gr.Dropdown([("none", "")], value="", label="Source-language vector", visible=False,
                                  allow_custom_value=True,
                                  info="optional: train the task SFT on top of θ0 + a language vector of the task "
                                       "data's language (LT-SFT's protocol); same base model only")
            name = gr.Textbox("", label="Run name (optional)", placeholder="e.g. id-language-demo",
                              max_length=MAX_RUN_NAME)
            method = gr.Radio(METHODS, value="deftx", label="Method")
            with gr.Group(visible=True) as denoise:
                with gr.Row():
                    policy = gr.Radio([("energy τ", "energy"), ("fixed rank r", "fixed")],
                                      value="energy", label="Rank policy", scale=1)
                    energy = gr.Slider(0.5, 1.0, value=init["energy"], step=0.01,
                                       label="τ — share of σ² energy kept", scale=2)
                    rank = gr.Slider(1, 768, value=100, step=1, label="r — rank kept", visible=False, scale=2)
                rho = gr.Slider(0.0, 0.2, value=init["residual_share"], step=0.005,
                                label="ρ — share of each matrix's residual kept")
            k = gr.Slider(0.1, 20.0, value=round(init["k"] * 100, 2), step=0.1,
                          label="k — % of the maskable parameters trained")
            with gr.Accordion("Training length and optimiser", open=False):
                with gr.Row():
                    full = gr.Number(init.get("full_steps", 0), precision=0, minimum=0, label="Phase-1 steps",
                                     info="0 = use epochs", elem_id="dx-full-steps")
                    sparse = gr.Number(init.get("sparse_steps", 0), precision=0, minimum=0, label="Phase-2 steps",
                                       info="0 = use epochs", elem_id="dx-sparse-steps")
                    epochs = gr.Number(1.0, minimum=0.01, label="Epochs per phase", info="when steps are 0")
                with gr.Row():
                    lr = gr.Number(init["lr"], label="Learning rate", minimum=0)
                    bs = gr.Number(init["batch_size"], precision=0, minimum=1, label="Batch size")
                    maxlen = gr.Number(init["max_length"], precision=0, minimum=8, label="Max tokens")
                    seed = gr.Number(init["seed"], precision=0, label="Seed")
            with gr.Accordion("Data columns", open=False):
                with gr.Row():
                    textcol = gr.Textbox("", label=FIELD_LABELS["text_column"], placeholder="auto")
                    paircol = gr.Textbox("", label=FIELD_LABELS["pair_column"], placeholder="auto")
                    labelcol = gr.Textbox("label", label=FIELD_LABELS["label_column"])
        with gr.Column(scale=6):
            with gr.Row():
                start = gr.Button("▶ Start training", variant="primary", elem_id="dx-start", scale=3)
                cancel = gr.Button("■ Cancel", variant="stop", elem_id="dx-cancel", scale=1)
                resume = gr.Button("↻ Resume", elem_id="dx-resume", scale=1)
            status = gr.Markdown(elem_classes="dx-status", elem_id="dx-train-status")
            watch = gr.Dropdown([], value=None, label="Run shown", allow_custom_value=True)
            progress = gr.HTML(ui.studio.progress(None), elem_id="dx-progress", js_on_load=None)
            loss = gr.Plot(label="Loss", show_label=False)
            log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_classes="dx-log",
                             autoscroll=True)
            with gr.Accordion("Status details", open=False):
                details = gr.JSON(label="status", elem_id="dx-details")
    ui.add("train", preset=preset, kind=kind, base=base, data=data, lang=lang, name=name, method=method,
           denoise=denoise, policy=policy, energy=energy, rank=rank, rho=rho, k=k, full=full, sparse=sparse,
           epochs=epochs, lr=lr, bs=bs, maxlen=maxlen, seed=seed, textcol=textcol, paircol=paircol,
           labelcol=labelcol, start=start, cancel=cancel, resume=resume, status=status, watch=watch,
           progress=progress, loss=loss, log=log, details=details, timer=gr.Timer(2.0),
           run_id=gr.Textbox(visible=False), status_button=gr.Button(visible=False), srclang=srclang,
           stopping=gr.State(""),  # the run the status says is stopping: the poll replaces the message once it has
           k_exact=gr.State(None))  # (shown %, exact count) when a preset's k is a count


def preset_values(studio: Studio, name: str, kind: str) -> dict[str, Any]:
    """Control values for a preset (explicit engine defaults for what the preset leaves out)."""
    v = {**defaults(), **engine_presets.preset(name, kind)}
    if name == "cpu-demo":  # DEFTX_DEFAULT_MODEL replaces the preset's offline model
        v["base_model"] = studio.shown_model()
    return v


@handler(*(f"train.{f}" for f in PRESET_FIELDS), "train.k_exact", "train.data", "train.lang", "train.textcol",
         "train.paircol", "train.labelcol", "train.status", status=-1)
def apply_preset(studio: Studio, name, kind, corpus, task) -> Updates:
    """Fill the controls from a preset (and the data checked in the Data tab for this kind)."""
    src = corpus if kind == "language" else task
    example = studio.shown_path(EXAMPLE["corpus" if kind == "language" else "task"])
    out = {"train.data": src["data"], "train.textcol": src["text"], "train.paircol": src["pair"],
           "train.labelcol": src["label"], "train.status": ""}
    if src["data"] == example:
        out["train.lang"] = EXAMPLE_LANG[kind]
    if name == CUSTOM or not name:
        return {**out, "train.k_exact": None}
    v = preset_values(studio, name, kind)
    k = v["k"]
    if 0 < k < 1:
        k_pct, exact = round(k * 100, 2), None
    else:
        k_pct = round(100 * k / XLMR_BASE_MASKABLE, 2)
        exact = [k_pct, int(k)]
    epochs = v["full_epochs"] if not v["full_steps"] else v.get("sparse_epochs", 1.0)
    values = [gr.update(value=v["base_model"]), v["method"], v["rank_policy"], v["energy"], v["rank"],
              v["residual_share"], k_pct, v["full_steps"], v["sparse_steps"], epochs, v["lr"], v["batch_size"],
              v["max_length"], v["seed"]]
    return {**out, **{f"train.{f}": x for f, x in zip(PRESET_FIELDS, values, strict=True)}, "train.k_exact": exact}


@handler("train.srclang", status=None)
def source_choices(studio: Studio, kind, base_model, current) -> Updates:
    """The Source-language vector picker: shown for task SFTs, offering the language vectors of the chosen base
    model (a vector of another base cannot be composed with it)."""
    base = (base_model or "").strip()
    try:  # as the vectors' configs name it (the page shows a local folder by shown_path)
        base = studio.check_base_model(base, reachable=False)
    except DeftxError:
        pass
    langs = [r for r in studio.vector_runs("language") if r["config"].get("base_model") == base]
    ids = [r["id"] for r in langs]
    return {"train.srclang": gr.update(visible=kind == "task", choices=[("none", "")] + run_choices(langs),
                                       value=current if current in ids else "")}


@handler("train.denoise", status=None)
def method_changed(studio: Studio, method) -> Updates:
    return {"train.denoise": gr.update(visible=method == "deftx")}


@handler("train.energy", "train.rank", status=None)
def policy_changed(studio: Studio, policy) -> Updates:
    return {"train.energy": gr.update(visible=policy == "energy"), "train.rank": gr.update(visible=policy == "fixed")}


@handler("train.preset", status=None)
def mark_custom(studio: Studio) -> Updates:
    """A control changed by hand: the settings are no longer a preset's."""
    return {"train.preset": CUSTOM}


@handler("train.status", "train.run_id", "train.progress", "train.watch", "train.stopping")
@takes(TrainForm)
def start_training(studio: Studio, form: TrainForm) -> Updates:
    """Validate the settings (``TrainForm.config``) and the data, then queue the run of that ``TrainConfig``.
    Returns (message, run id, progress, shown-run dropdown). ``source_language_vector`` (a run id) is a task
    SFT's starting point."""
    cfg = form.config(studio)
    kind = cfg.kind
    # a name another run has gets -2, -3… (in the queueing transaction): every run is found by its name
    name = bounded(form.name, "run name", MAX_RUN_NAME) or f"{cfg.language}-{kind}-{cfg.method}"
    run_id = queue_run(studio, cfg, name)
    row = wait_until_started(studio, run_id)
    pos = studio.registry.queue_position(run_id)
    what = "started" if row["state"] == "running" else (f"queued (#{pos})" if pos else "queued")
    shown = shown_run(studio, row)
    renamed = f" ({shown_text(name)} is taken)" if row["name"] != name else ""
    return {"train.status": ok(f"Run **{shown_text(row['name'])}**{renamed} {what}. Progress appears on the right."),
            "train.run_id": run_id, "train.progress": studio.progress(shown),
            "train.watch": gr.update(choices=run_choices(studio.registry.list()), value=shown["id"]),
            "train.stopping": ""}


def shown_run(studio: Studio, row: dict) -> dict:
    """The run the progress panel shows after ``row`` was queued: the run that is running while ``row`` waits
    (the panel lists ``row`` below it, and follows it when it starts), else ``row``."""
    if row["state"] == "queued":
        running = studio.registry.list(states=["running"])
        if running:
            return running[0]
    return row


def queue_run(studio: Studio, cfg: TrainConfig, name: str) -> str:
    """Check ``cfg`` (``job``), then queue it under ``name`` (``-2``, ``-3``… added if another run has it);
    returns the run id."""
    try:
        return studio.registry.submit_group(None, [job(cfg, name)], max_queued=max_queue(), distinct=True)[0]
    except QueueFull as e:
        raise DeftxError(queue_full(e)) from None


def queue_full(e: QueueFull) -> str:
    return f"the queue is full: {e} (DEFTX_MAX_QUEUE); try again when a run has finished, or cancel one of yours"


def job(cfg: TrainConfig, name: str) -> Submission:
    """Check ``cfg`` against this server's limits and its data (line and field): the run of it, ready to queue."""
    kind, data, full_steps, sparse_steps = cfg.kind, cfg.data, cfg.full_steps, cfg.sparse_steps
    lines_limit, steps_limit = max_lines(), max_steps()
    if steps_limit and (full_steps > steps_limit or sparse_steps > steps_limit):
        raise DeftxError(f"at most {steps_limit:,} steps per phase on this server (DEFTX_MAX_STEPS)")
    if steps_limit and (not full_steps or not sparse_steps) and data.startswith("hub:"):
        raise DeftxError(f"this server allows at most {steps_limit:,} steps per phase (DEFTX_MAX_STEPS): "
                         "give the phase-1 and phase-2 steps (not epochs) for a Hub dataset")
    n_examples = None
    if not data.startswith("hub:"):  # fail now, with line and field, rather than in the job
        if kind == "language":
            n_examples = len(load_corpus(data, cfg.text_column, max_lines=lines_limit))
        else:
            n_examples = len(load_task_data(data, text_column=cfg.text_column, pair_column=cfg.pair_column,
                                            label_column=cfg.label_column, max_rows=lines_limit))
    if steps_limit and n_examples:
        per_epoch = cfg.steps_per_epoch(n_examples)
        planned = zip(("phase 1", "phase 2"), cfg.planned_steps(n_examples), (cfg.full_epochs, cfg.sparse_epochs))
        for what, need, ep in planned:
            if need > steps_limit:
                raise DeftxError(f"{what} would take {need:,} steps ({ep:g} epochs of {per_epoch:,}); this "
                                 f"server allows at most {steps_limit:,} per phase (DEFTX_MAX_STEPS)")
    return Submission(name, kind, config=cfg)


def wait_until_started(studio: Studio, run_id: str) -> dict:
    """The run's row once the scheduler thread started it (within a poll if a slot is free; 1 s at most)."""
    row = studio.registry.get(run_id)
    for _ in range(20):
        if row["state"] != "queued":
            break
        time.sleep(0.05)
        row = studio.registry.get(run_id)
    return row


@handler("train.status", "train.progress", "train.stopping")
def cancel_run(studio: Studio, run_id) -> Updates:
    """Cancel a queued or running run; returns (message, progress)."""
    if not run_id:
        raise DeftxError("no run selected")
    row = studio.registry.get(run_id)
    if row is None:
        raise DeftxError(f"unknown run {str(run_id)[:80]!r}")
    state = studio.registry.cancel(run_id)
    row = studio.registry.get(run_id)
    if state == "cancelled":
        msg = ok(f"Run **{shown_text(row['name'])}** cancelled before it started.")
    elif state == "running":
        msg = ok(f"Stopping **{shown_text(row['name'])}**: it saves a checkpoint and stops within seconds.")
    else:
        msg = f"Run **{shown_text(row['name'])}** is already {state}."
    return {"train.status": msg, "train.progress": studio.progress(row),
            "train.stopping": run_id if state == "running" else ""}


@handler("train.status", "train.progress", "train.stopping")
def resume_run(studio: Studio, run_id) -> Updates:
    """Continue an interrupted, cancelled or failed run from its last checkpoint: the same run (id and
    folder) is queued again with ``--resume``. Returns (message, progress)."""
    if not run_id:
        raise DeftxError("no run selected")
    try:
        studio.registry.resume(run_id, max_queued=max_queue())
    except KeyError:
        raise DeftxError(f"unknown run {str(run_id)[:80]!r}") from None
    except ValueError as e:
        raise DeftxError(str(e)) from None
    except QueueFull as e:
        raise DeftxError(queue_full(e)) from None
    row = wait_until_started(studio, run_id)
    pos = studio.registry.queue_position(run_id)
    what = "resumed" if row["state"] == "running" else (f"queued to resume (#{pos})" if pos else "queued")
    return {"train.status": ok(f"Run **{shown_text(row['name'])}** {what}: it continues from its last checkpoint."),
            "train.progress": studio.progress(row), "train.stopping": ""}


def wire(ui: UI) -> None:
    preset_inputs = ["train.preset", "train.kind", "data.corpus", "data.task"]
    ui.on(ui["train.preset"].input, apply_preset, preset_inputs, api_name="apply_preset")
    ui.on(ui["train.kind"].input, apply_preset, preset_inputs, api_visibility="private")
    ui.on(ui["train.method"].change, method_changed, ["train.method"], api_visibility="private")
    ui.on(ui["train.policy"].change, policy_changed, ["train.policy"], api_visibility="private")
    for trigger in (ui["train.kind"].change, ui["train.base"].change, ui["train.tab"].select):
        ui.on(trigger, source_choices, ["train.kind", "train.base", "train.srclang"], api_visibility="private")
    for field in PRESET_FIELDS[1:]:
        ui.on(ui[f"train.{field}"].input, mark_custom, api_visibility="private")
    ui.on(ui["train.data"].change, language_for_data, ["train.data"], api_visibility="private")
    ui.on(ui["train.start"].click, start_training, [FORM_COMPONENTS[f.name] for f in fields(TrainForm)],
          api_name="start_training", concurrency_limit=2)
    ui.on(ui["train.cancel"].click, cancel_run, ["train.watch"], api_name="cancel_run")
    ui.on(ui["train.resume"].click, resume_run, ["train.watch"], api_name="resume_run")
