"""Share vectors on the Hugging Face Hub.

- ``push_vector``: upload a vector folder with a generated model card (README.md);
- ``pull_vector``: download (or take a local folder), validate, and place a vector atomically in ``dest``;
  composable-sft folders (``pytorch_diff.bin``) are converted on the way (``composable_sft.py``).

A Hugging Face token is never written to a file, a log line or an exception message.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from torch import nn

from ..errors import DeftxError, VectorError
from ..fileio import check_replaceable, replace_dir, sibling_tempdir
from ..method.vector_meta import FORMAT, VectorMeta, heldout_line, read_json
from ..method.vectors import CONFIG_FILE, WEIGHTS_FILE, SparseVector
from .composable_sft import CSFT_FILE, convert_composable_sft, guess_from_name
from .contact import hub_error_words, pushed_tags
from .secrets import scrub

logger = logging.getLogger(__name__)
# the HTTP transports' DEBUG lines quote request and response headers, and a careless server or proxy echoes the
# token in them: whatever level the app or CLI logs at, these lines are never written
for _name in ("httpcore", "httpcore2", "httpx", "httpx2", "urllib3"):
    if logging.getLogger(_name).level < logging.INFO:
        logging.getLogger(_name).setLevel(logging.INFO)

README_FILE = "README.md"
PULL_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, README_FILE, CSFT_FILE, "config.json"]
NO_TOKEN_MESSAGE = "pushing needs a Hugging Face token: set HF_TOKEN or pass --token"
LIBRARY_NAME = "deftx"
BASE_TAGS = ["deftx", "sparse-fine-tuning", "cross-lingual-transfer"]


# ---- tokens and errors ----------------------------------------------------------------------------
def _resolve_token(token: str | None) -> str | None:
    token = (token or "").strip() or (os.environ.get("HF_TOKEN") or "").strip()
    return token or None


def _describe(exc: BaseException, token: str | None) -> str:
    """A failed Hub call in words (``contact.hub_error_words``), else its first line; without the token."""
    words = hub_error_words(exc)
    if words:
        return words
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return scrub(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, token)


# ---- model card -----------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _flatten_metrics(metrics: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten_metrics(value, f"{name} / "))
        else:
            rows.append((name, value))
    return rows


def _density_lines(vec: SparseVector) -> list[str]:
    k = vec.meta.k or vec.nnz
    lines = [f"- **k** (nonzero entries): {k:,}"]
    n_maskable = vec.meta.n_maskable
    if n_maskable:
        lines.append(f"- **density**: {k / n_maskable:.4%} of the {int(n_maskable):,} maskable encoder parameters")
    touched = sum(int(torch.Size(vec.shapes[n]).numel()) for n in vec.indices)
    if touched:
        lines.append(f"- **density within the {len(vec.indices)} parameter tensors touched**: "
                     f"{k / touched:.4%} of {touched:,} entries")
    return lines


def _denoise_lines(meta: VectorMeta) -> list[str]:
    d = meta.denoise
    if not d:
        return ["- **denoising**: none (plain LT-SFT mask over the dense fine-tuning delta)"]
    policy = d.get("rank_policy", "?")
    if policy == "energy":
        rank = f"energy — smallest r whose cumulative σ² reaches τ = {_fmt(d.get('energy'))}"
    elif policy == "fixed":
        rank = f"fixed — r = {d.get('rank')} (clipped to the matrix)"
    else:
        rank = _fmt(policy)
    return [f"- **SVD denoising rank policy**: {rank}",
            f"- **ρ** (share of each matrix's higher-order residual kept): {_fmt(d.get('residual_share'))}"]


def build_model_card(vec: SparseVector, repo_id: str, metrics: Mapping | None = None) -> ModelCard:
    """The README.md of a pushed vector: YAML front matter for the Hub, then what it is and how to use it."""
    meta = vec.meta
    languages = [x for x in meta.language.split("+") if x] if meta.language else []
    # the gallery finds pushed vectors by these tags and reads base_model and language back from the card data
    tags = list(dict.fromkeys(BASE_TAGS + pushed_tags(meta.kind, languages) + [t for t in (meta.kind, meta.method)
                                                                                if t]))
    data = ModelCardData(base_model=meta.base_model or None,
                         language=(languages[0] if len(languages) == 1 else languages) or None,
                         library_name=LIBRARY_NAME, license=meta.license or None, tags=tags)

    name = repo_id.rsplit("/", 1)[-1]
    base = meta.base_model or "<base model>"
    what = {"language": f"a **language** sparse fine-tuning{f' for `{meta.language}`' if meta.language else ''}, "
                        "learned from unlabelled text",
            "task": "a **task** sparse fine-tuning, learned from labelled source-language data",
            "composed": "a **composition** of sparse fine-tunings (task + language)"}.get(
        meta.kind, f"a **{meta.kind}** sparse fine-tuning")
    body = [f"# {name}", "",
            f"This is {what} of [`{base}`]({'https://huggingface.co/' + meta.base_model if meta.base_model else '#'}),"
            + (f" converted from {_fmt(meta.converted_from)} by" if meta.converted_from else
               " made with") + f" DeFT-X Studio (`deftx_engine` {meta.engine_version}). Adding it to the pretrained "
            "weights (θ = θ0 + φ) adapts the model; a language vector and a task vector made for the same base model "
            "compose by addition (θ = θ0 + φ_task + φ_language), which gives zero-shot cross-lingual transfer.",
            "", "## What it holds", "",
            f"- **kind**: {meta.kind}",
            f"- **method**: {meta.method}" + (" (SVD-denoised sparse fine-tuning, Simon & Jyothi 2025)"
                                              if meta.method == "deftx" else
                                              " (lottery-ticket sparse fine-tuning, Ansell et al. 2022)"
                                              if meta.method == "lt-sft" else ""),
            f"- **base model**: `{base}`" + (f" (parameter fingerprint `{meta.base_fingerprint}`)"
                                             if meta.base_fingerprint else ""),
            ]
    if meta.language:
        body.append(f"- **language**: {meta.language}")
    body += _density_lines(vec)
    body += _denoise_lines(meta)
    if meta.label_names:
        body.append("- **labels**: " + ", ".join(f"`{_fmt(x)}`" for x in meta.label_names))
    if vec.heads:
        body.append("- **heads stored whole**: " + ", ".join(f"`{n}`" for n in vec.heads))
    if meta.converted_from:
        body.append(f"- **converted from**: {_fmt(meta.converted_from)}")

    if heldout_line(meta.heldout_mlm):
        body.append(f"- **did it learn its language?** {_fmt(heldout_line(meta.heldout_mlm))}")

    metrics = metrics if metrics is not None else meta.metrics
    if isinstance(metrics, Mapping) and metrics:
        body += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        body += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in _flatten_metrics(metrics)]

    auto = "AutoModelForSequenceClassification" if meta.kind in ("task", "composed") else "AutoModelForMaskedLM"
    load_kw = f", num_labels={len(meta.label_names)}" if meta.label_names else ""
    body += ["", "## How to use it", "",
             "Download it with the `deftx` command line:", "", "```bash",
             f"deftx pull {repo_id} --output-dir vectors/{name}", "```", "",
             "and apply it in Python (this checks that the vector fits the model first):", "", "```python",
             "from transformers import " + auto,
             "from deftx_engine.method.vectors import SparseVector", "",
             f'model = {auto}.from_pretrained("{base}"{load_kw})',
             f'SparseVector.load("vectors/{name}").apply(model)   # θ0 + φ in place, after checking it fits',
             "```", "",
             f'`deftx_engine.hub.transfer.pull_vector("{repo_id}", "vectors/{name}")` downloads it from Python. '
             "`apply` remembers the entries it changed, so `revert(model)` on the same vector object undoes it "
             "bit-exactly.",
             "",
             "To transfer a task to a new language, compose a task vector with a language vector of the same "
             "base model: `deftx_engine.method.vectors.compose([task, language]).apply(model)`.", "",
             "The folder holds `sft_config.json` (metadata) and `sft_model.safetensors` (sorted int32 flat "
             "indices and values per parameter, whole heads): no pickle, so loading never runs code.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# ---- push -----------------------------------------------------------------------------------------
def _public(value: Any, depth: int = 0) -> Any:
    """``value`` with every local path (absolute, ``~``, ``./``, ``../``) cut to its last part: what is pushed
    says which file a vector was trained on, not where it lies on the machine that trained it."""
    if depth > 100:
        raise VectorError(f"{CONFIG_FILE}: nested too deeply to be a vector config")
    if isinstance(value, dict):
        return {k: _public(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v, depth + 1) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "./", "../", "\\"))
                                   or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return Path(value.replace("\\", "/")).name or "."
    return value


def _strip_local_paths(config_file: Path) -> None:
    """Rewrite a staged sft_config.json without local paths (see ``_public``)."""
    try:
        config = read_json(config_file)
    except VectorError:
        return  # SparseVector.load reports it
    config_file.write_text(json.dumps(_public(config), indent=2), encoding="utf-8")


def push_vector(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                metrics: dict | None = None, api=None) -> str:
    """Upload the vector in ``folder`` (plus a generated README.md) to the model repo ``repo_id``.

    The token comes from ``token`` or else the HF_TOKEN environment variable; without one a ``DeftxError``
    is raised before anything is contacted. ``folder`` is never modified: the upload is staged in a
    temporary folder. ``private`` applies when the repo is created (an existing repo keeps its visibility).
    Returns the repo URL.
    """
    token = _resolve_token(token)
    if token is None:
        raise DeftxError(NO_TOKEN_MESSAGE)
    folder = Path(folder)
    error: str | None = None
    url = None
    with tempfile.TemporaryDirectory(prefix="deftx-push-") as staging:
        stage = Path(staging)
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / fname).is_file():
                raise VectorError(f"{folder / fname}: file not found "
                                  f"(a vector folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
            shutil.copy2(folder / fname, stage / fname)
        _strip_local_paths(stage / CONFIG_FILE)
        vec = SparseVector.load(stage)  # validates exactly the bytes that will be uploaded
        build_model_card(vec, repo_id, metrics).save(stage / README_FILE)

        logger.info("pushing %s vector to %s", vec.meta.kind, repo_id)
        try:
            hub = api if api is not None else HfApi(token=token)
            url = hub.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
            hub.upload_folder(repo_id=repo_id, folder_path=str(stage), repo_type="model", token=token,
                              commit_message=f"Upload DeFT-X {vec.meta.kind} vector ({vec.meta.method}, "
                                             f"k={vec.meta.k})")
        except Exception as e:  # noqa: BLE001 -- every Hub failure becomes a user message without the token
            error = _describe(e, token)
    if error is not None:  # raised outside the except block: no chained exception that could hold the token
        raise DeftxError(f"pushing to Hugging Face repo {scrub(repo_id, token)!r} failed: {error}")
    return str(url) if url else f"https://huggingface.co/{repo_id}"


# ---- pull -----------------------------------------------------------------------------------------
def _is_ours(folder: Path) -> bool:
    """A DeFT-X folder: its config, unless a composable-sft file beside it and a config that is not ours (then
    the composable-sft file is converted). Without one, SparseVector.load reports whatever is wrong."""
    if not (folder / CONFIG_FILE).is_file():
        return False
    if not (folder / CSFT_FILE).is_file():
        return True
    try:
        data = read_json(folder / CONFIG_FILE)
    except VectorError:
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def pull_vector(repo_id_or_path: str, dest: str | Path, *, token: str | None = None,
                revision: str | None = None, api=None, base_model: str = "", kind: str | None = None,
                language: str | None = None, model: nn.Module | None = None,
                label_names: Sequence[str] = ()) -> Path:
    """Fetch a vector into ``dest`` (a Hub repo id, or a local folder: then nothing is downloaded).

    A DeFT-X folder (``sft_config.json``) is validated (also against ``model`` if given) and moved into
    place atomically, bytes unchanged; a composable-sft folder (``pytorch_diff.bin``) is converted
    (``base_model``/``kind``/``language``/``model``/``label_names`` are passed to ``convert_composable_sft``;
    kind and language default to a guess from the repo name, else "language").
    ``dest`` is either the complete new vector or untouched: work happens in a hidden sibling folder that
    is removed at the end, also on failure.
    """
    dest = Path(dest)
    local = Path(repo_id_or_path).expanduser()
    is_local = local.is_dir()
    text = str(repo_id_or_path)
    if not is_local and (local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
                         or "\\" in text):
        raise VectorError(f"{local}: not a folder (give a vector folder or a Hub repo id such as 'user/name')")
    check_replaceable(dest, CONFIG_FILE)  # before anything is downloaded
    if is_local:
        links = [f for f in PULL_PATTERNS if (local / f).is_symlink()]
        if links:
            raise VectorError(f"{local}: {', '.join(links)} is a symbolic link; links are not followed, copy the "
                              "file itself into the folder")
    work = sibling_tempdir(dest, "pull-")
    try:
        if is_local:
            snap = local
        else:
            token = _resolve_token(token)
            snap = work / "snapshot"
            error: str | None = None
            try:
                kwargs = dict(repo_type="model", revision=revision, local_dir=str(snap), token=token,
                              allow_patterns=list(PULL_PATTERNS))
                if api is not None:
                    api.snapshot_download(repo_id_or_path, **kwargs)
                else:
                    snapshot_download(repo_id_or_path, **kwargs)
            except Exception as e:  # noqa: BLE001 -- Hub errors become user messages without the token
                error = _describe(e, token)
            if error is not None:
                raise DeftxError(f"downloading Hugging Face repo {scrub(repo_id_or_path, token)!r}"
                                 f"{f' at revision {revision!r}' if revision else ''} failed: {error}")
        where = str(local) if is_local else f"Hugging Face repo {repo_id_or_path!r}"
        if _is_ours(snap):
            vec = SparseVector.load(snap)  # validates (errors name the user's folder, not the work folder)
            if model is not None:
                vec.validate(model, where=where)
            out = work / "vector"  # the files are moved or copied, never re-serialized: bit-exact
            out.mkdir()
            for fname in (CONFIG_FILE, WEIGHTS_FILE, README_FILE):
                if (snap / fname).is_file():
                    (shutil.copy2 if is_local else shutil.move)(str(snap / fname), str(out / fname))
            replace_dir(out, dest, CONFIG_FILE)
        elif (snap / CSFT_FILE).is_file():
            g_kind, g_lang = guess_from_name(str(repo_id_or_path) if not is_local else local.name)
            convert_composable_sft(snap, dest, base_model=base_model, kind=kind or g_kind or "language",
                                   language=language if language is not None else (g_lang or ""), model=model,
                                   label_names=label_names)
        else:
            raise VectorError(f"{where} holds neither a DeFT-X vector ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
                              f"composable-sft vector ({CSFT_FILE})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("pulled %s into %s", repo_id_or_path, dest)
    return dest
