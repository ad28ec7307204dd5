"""Hub tab: the gallery of released and pushed vectors (``gallery``, from a pick to Predict); push a vector with
a generated model card; pull a vector (Hub repo or local folder, composable-sft vectors converted) into the runs
list. A token is used for one call only: never stored, logged or shown, and the field is cleared after each push
or pull."""
from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path

import gradio as gr

from deftx_engine.errors import DeftxError
from deftx_engine.hub.secrets import scrub

from ..components import UI, Updates, handler
from ..files import bounded
from ..render import ok, text
from ..settings import has_env_token, oauth_enabled
from ..state import Studio
from . import gallery
from .pickers import refresh_on_open

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}")


def layout(ui: UI) -> None:
    gallery.layout(ui)
    oauth = oauth_enabled()
    with gr.Row(equal_height=False):
        with gr.Column(elem_classes="dx-panel"):
            gr.Markdown("### Push a vector\nUploads the vector folder with a generated model card "
                        "(base model, language, method, k, rank policy, metrics).")
            run = gr.Dropdown([], label="Vector", allow_custom_value=True)
            repo = gr.Textbox(label="Repository id", placeholder="your-name/deftx-id-language", elem_id="dx-push-repo")
            private = gr.Checkbox(False, label="Private repository")
            if oauth:
                gr.LoginButton()
            fallback = "HF_TOKEN or your login" if oauth else "HF_TOKEN"
            token = gr.Textbox(type="password", label="Hugging Face token",
                               placeholder=f"hf_… (leave empty to use {fallback})",
                               info="for this push (or a private pull) only: never stored, logged or shown")
            push_button = gr.Button("Push", variant="primary", elem_id="dx-push")
            push_status = gr.Markdown(elem_classes="dx-status")
        with gr.Column(elem_classes="dx-panel"):
            gr.Markdown("### Pull a vector\nA Hub repo id or a local folder; composable-sft "
                        "`pytorch_diff.bin` vectors are converted (without unpickling code).")
            source = gr.Textbox(label="Repository id or folder", placeholder="org/name, or a folder under DEFTX_HOME")
            with gr.Accordion("For composable-sft vectors", open=False):
                base = gr.Textbox("", label="Base model", placeholder="e.g. FacebookAI/xlm-roberta-base")
                kind = gr.Radio([("guess from the name", ""), ("language", "language"), ("task", "task")], value="",
                                label="Kind")
                lang = gr.Textbox("", label="Language", placeholder="guess from the name")
            pull_button = gr.Button("Pull", variant="primary")
            pull_status = gr.Markdown(elem_classes="dx-status")
    ui.add("hub", run=run, repo=repo, private=private, token=token, push=push_button, push_status=push_status,
           source=source, base=base, kind=kind, lang=lang, pull=pull_button, pull_status=pull_status)


def scrubbed(e: Exception, token: str | None) -> DeftxError:
    """``e`` as an exception without ``token`` in its text (and with no chained original): a DeftxError
    stays one, anything else becomes a one-line DeftxError (its scrubbed traceback goes to the log)."""
    if isinstance(e, DeftxError):
        return DeftxError(scrub(str(e), token))
    log.error("Hub call failed:\n%s", scrub(traceback.format_exc(), token))
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return DeftxError(scrub(f"unexpected error ({type(e).__name__}): {first}", token))


def call_token(token: str | None, oauth_token: gr.OAuthToken | None) -> str | None:
    """The token of this call: the field, else the Space login (HF_TOKEN is the engine's fallback)."""
    return (token or "").strip() or (oauth_token.token if oauth_token is not None else None) or None


@handler("hub.push_status", "hub.token", on_error={"hub.token": ""})
def push(studio: Studio, run_id, repo_id, private, token, oauth_token: gr.OAuthToken | None = None) -> Updates:
    """Upload a vector with its model card. The token (field, Space login or HF_TOKEN) is used for this
    call only. Returns (message, cleared token field)."""
    from deftx_engine.hub.transfer import push_vector

    vdir = studio.run_vector_dir(run_id, "vector")
    repo_id = bounded(repo_id, "repository id", 200)
    if not REPO_ID.fullmatch(repo_id):
        raise DeftxError("give the repository as owner/name, e.g. your-name/deftx-id-language")
    tok = call_token(token, oauth_token)
    if tok is None and not has_env_token():
        raise DeftxError("pushing needs a Hugging Face token: paste one (write access) in the token field"
                         + (", sign in," if oauth_enabled() else "") + " or set the HF_TOKEN environment variable")
    row = studio.registry.get(run_id)
    metrics = row["config"].get("metrics") if row else None
    try:
        url = push_vector(vdir, repo_id, token=tok, private=bool(private), metrics=metrics)
    except Exception as e:  # noqa: BLE001 -- whatever it says, without the token (even a non-hf_ one)
        raise scrubbed(e, tok) from None
    return {"hub.push_status": ok(f"Pushed to {text(repo_id)}: {text(scrub(str(url), tok))}"),
            "hub.token": ""}


@handler("hub.pull_status", "hub.token", on_error={"hub.token": ""})
def pull(studio: Studio, source, base_model, kind, language, token="",
         oauth_token: gr.OAuthToken | None = None) -> Updates:
    """Download (or copy) a vector into DEFTX_HOME/vectors and list it as a finished run. A private repo
    needs a token (the token field, the Space login or HF_TOKEN). Returns (message, cleared token field)."""
    from deftx_engine.hub.transfer import pull_vector

    source = bounded(source, "repository id or folder", 500)
    if not source:
        raise DeftxError("give a Hub repository id (owner/name) or a folder")
    local = Path(source).expanduser()
    if studio.server_path(source) or local.is_absolute() or source.startswith((".", "~")) or local.exists():
        source = str(studio.check_path(source))
    elif not REPO_ID.fullmatch(source):
        raise DeftxError(f"{source[:100]!r} is neither an existing folder nor a Hub repository id (owner/name)")
    base_model = bounded(base_model, "base model", 300)
    if base_model:
        studio.check_base_model(base_model, local=False, reachable=False)
    language = bounded(language, "language", 50)
    run_id = studio.registry.new_id()
    dest = studio.registry.vectors_root / run_id
    tok = call_token(token, oauth_token)
    try:
        pull_vector(source, dest, token=tok, base_model=base_model, kind=kind or None, language=language or None)
    except Exception as e:  # noqa: BLE001 -- whatever it says, without the token (even a non-hf_ one)
        raise scrubbed(e, tok) from None
    if Path(source).is_dir():
        folder = Path(source)
        name = folder.parent.name if folder.name == "vector" else folder.name  # a run folder's vector/
    else:  # named by its repository (owner/name), as the user typed it
        name = source
    m = studio.register_pulled(dest, run_id, name, source, local=Path(source).is_dir())
    return {"hub.pull_status": ok(f"Pulled **{text(name)}**: a {text(m.kind)} vector"
                                  + (f" ({text(m.language)})" if m.language else "")
                                  + f" for <code>{text(m.base_model)}</code>, {m.k:,} entries. It is listed in the "
                                    "Runs tab."),
            "hub.token": ""}


def wire(ui: UI) -> None:
    pushed = ui.on(ui["hub.push"].click, push, ["hub.run", "hub.repo", "hub.private", "hub.token"], api_name="push")
    gallery.wire(ui)
    ui.on(pushed.then, gallery.gallery, ["hub.g_base", "hub.g_kind", "hub.g_lang", "hub.g_task", "hub.g_language"],
          api_visibility="private")  # a vector pushed shows in the gallery
    ui.on(ui["hub.pull"].click, pull, ["hub.source", "hub.base", "hub.kind", "hub.lang", "hub.token"], api_name="pull")
    refresh_on_open(ui, "hub")
