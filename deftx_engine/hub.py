"""Share vectors on the Hugging Face Hub, and import composable-sft vectors.

- ``push_vector``: upload a vector folder with a generated model card (README.md);
- ``pull_vector``: download (or take a local folder), validate, and place a vector atomically in ``dest``;
  composable-sft folders (``pytorch_diff.bin``) are converted on the way;
- ``convert_composable_sft``: composable-sft (Ansell et al., 2022) ``pytorch_diff.bin`` -> our format,
  read with ``torch.load(weights_only=True)`` so that a malicious pickle cannot run code.

A Hugging Face token is never written to a file, a log line or an exception message.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from torch import Tensor, nn

from .errors import DeftxError, VectorError
from .params import parameter_roles
from .vectors import CONFIG_FILE, FORMAT, WEIGHTS_FILE, SparseVector, VectorMeta, base_fingerprint

logger = logging.getLogger(__name__)

README_FILE = "README.md"
CSFT_FILE = "pytorch_diff.bin"  # composable-sft's weights file (a torch pickle)
CSFT_CONFIG_FILES = ("config.json", "sft_config.json")
PULL_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, README_FILE, CSFT_FILE, "config.json"]
HEAD_PREFIXES = ("lm_head", "cls.", "classifier")  # outside the encoder when no model tells us
NO_TOKEN_MESSAGE = "pushing needs a Hugging Face token: set HF_TOKEN or pass --token"
LIBRARY_NAME = "deftx"
BASE_TAGS = ["deftx", "sparse-fine-tuning", "cross-lingual-transfer"]


# ---- tokens and errors ----------------------------------------------------------------------------
def _resolve_token(token: str | None) -> str | None:
    token = (token or "").strip() or (os.environ.get("HF_TOKEN") or "").strip()
    return token or None


_TOKEN_PATTERNS = (re.compile(r"hf_[A-Za-z0-9]{8,}"), re.compile(r"(?i)(bearer\s+)\S+"))


def _scrub(text: str, token: str | None) -> str:
    """``text`` without the token (and without anything that looks like a Hub token or bearer header)."""
    if token:
        text = text.replace(token, "***")
    text = _TOKEN_PATTERNS[0].sub("hf_***", text)
    return _TOKEN_PATTERNS[1].sub(r"\1***", text)


def _describe(exc: BaseException, token: str | None) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return _scrub(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, token)


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
    n_maskable = vec.meta.extra.get("n_maskable") if isinstance(vec.meta.extra, dict) else None
    if isinstance(n_maskable, (int, float)) and n_maskable > 0:
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
    tags = list(dict.fromkeys(BASE_TAGS + [t for t in (meta.kind, meta.method) if t]))
    extra = meta.extra if isinstance(meta.extra, dict) else {}
    license_ = extra.get("license") if isinstance(extra.get("license"), str) else None
    data = ModelCardData(base_model=meta.base_model or None,
                         language=(languages[0] if len(languages) == 1 else languages) or None,
                         library_name=LIBRARY_NAME, license=license_, tags=tags)

    name = repo_id.rsplit("/", 1)[-1]
    base = meta.base_model or "<base model>"
    what = {"language": f"a **language** sparse fine-tuning{f' for `{meta.language}`' if meta.language else ''}, "
                        "learned from unlabelled text",
            "task": "a **task** sparse fine-tuning, learned from labelled source-language data",
            "composed": "a **composition** of sparse fine-tunings (task + language)"}.get(
        meta.kind, f"a **{meta.kind}** sparse fine-tuning")
    body = [f"# {name}", "",
            f"This is {what} of [`{base}`]({'https://huggingface.co/' + meta.base_model if meta.base_model else '#'}),"
            + (f" converted from {_fmt(extra['converted_from'])} by" if extra.get("converted_from") else
               " made with") + f" DeFT-X Studio (`deftx_engine` {meta.engine_version}). Adding it to the pretrained weights "
            "(θ = θ0 + φ) adapts the model; a language vector and a task vector made for the same base model "
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
    if extra.get("converted_from"):
        body.append(f"- **converted from**: {_fmt(extra['converted_from'])}")

    metrics = metrics if metrics is not None else extra.get("metrics")
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
             "from deftx_engine.vectors import SparseVector", "",
             f'model = {auto}.from_pretrained("{base}"{load_kw})',
             f'SparseVector.load("vectors/{name}").apply(model)   # θ0 + φ in place, after checking it fits',
             "```", "",
             f'`deftx_engine.hub.pull_vector("{repo_id}", "vectors/{name}")` downloads it from Python. '
             "`apply` remembers the entries it changed, so `revert(model)` on the same vector object undoes it "
             "bit-exactly.",
             "",
             "To transfer a task to a new language, compose a task vector with a language vector of the same "
             "base model: `deftx_engine.vectors.compose([task, language]).apply(model)`.", "",
             "The folder holds `sft_config.json` (metadata) and `sft_model.safetensors` (sorted int32 flat "
             "indices and values per parameter, whole heads): no pickle, so loading never runs code.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# ---- push -----------------------------------------------------------------------------------------
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
        raise DeftxError(f"pushing to Hugging Face repo {_scrub(repo_id, token)!r} failed: {error}")
    return str(url) if url else f"https://huggingface.co/{repo_id}"


# ---- composable-sft conversion ------------------------------------------------------------------------
def _load_csft(path: Path) -> Any:
    """torch.load with weights_only=True: only tensors and plain containers; never runs pickled code."""
    if not path.is_file():
        raise VectorError(f"{path}: file not found (a composable-sft vector holds {CSFT_FILE})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- UnpicklingError, RuntimeError, EOFError, ... all mean "refused"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        why = why.split(" In PyTorch 2.6")[0][:300]
        raise VectorError(f"{path}: cannot be read as a composable-sft vector; only tensors are accepted, so "
                          f"the file was refused without running it ({type(e).__name__}: {why})") from None


def _row_major(coords: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Row-major flat indices of (ndim, nnz) coordinates."""
    flat = torch.zeros(coords.shape[-1], dtype=torch.long)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        flat += coords[d].long() * stride
        stride *= int(shape[d])
    return flat


def _sparse_entries(name: str, obj: Any, where: Path) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(sorted row-major flat indices, values, shape) of one composable-sft diff, zeros dropped."""
    if isinstance(obj, Tensor):
        shape = tuple(obj.shape)
        if obj.layout == torch.sparse_coo:
            sp = obj.coalesce()
            flat, val = _row_major(sp.indices(), shape), sp.values().reshape(-1)
        elif obj.layout == torch.strided:
            dense = obj.reshape(-1)
            flat = torch.nonzero(dense, as_tuple=False).reshape(-1)
            val = dense[flat]
        else:
            raise VectorError(f"{where}: parameter {name!r} has unsupported tensor layout {obj.layout}")
    elif isinstance(obj, Mapping) and "size" in obj and "values" in obj and ("indices" in obj or "index_steps" in obj):
        shape = tuple(int(s) for s in obj["size"])
        val = torch.as_tensor(obj["values"]).reshape(-1)
        if "indices" in obj:  # older composable-sft: COO coordinate lists, one per dimension
            coords = torch.as_tensor(obj["indices"], dtype=torch.long).reshape(len(shape), -1)
            flat = _row_major(coords, shape)
        else:  # newer: deltas of column-major flat indices (first dimension fastest)
            colmajor = torch.cumsum(torch.as_tensor(obj["index_steps"], dtype=torch.long).reshape(-1), 0)
            coords, rest = [], colmajor
            for s in shape:
                coords.append(rest % s)
                rest = rest // s
            flat = _row_major(torch.stack(coords) if coords else colmajor[None], shape)
    else:
        raise VectorError(f"{where}: parameter {name!r} is a {type(obj).__name__}, not a diff tensor")
    if flat.numel() != val.numel():
        raise VectorError(f"{where}: parameter {name!r} has {flat.numel()} indices but {val.numel()} values")
    numel = int(torch.Size(shape).numel())
    if numel >= 2 ** 31:
        raise VectorError(f"{where}: parameter {name!r} has {numel} entries, more than int32 indices can address")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel):
        raise VectorError(f"{where}: parameter {name!r} has indices outside its shape {shape}")
    val = val.float()
    keep = val != 0
    flat, val = flat[keep], val[keep]
    order = torch.argsort(flat)
    flat, val = flat[order], val[order]
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise VectorError(f"{where}: parameter {name!r} has repeated indices")
    return flat.to(torch.int32), val.contiguous(), shape


def _guess_from_name(text: str) -> tuple[str | None, str | None]:
    """(kind, language) from a composable-sft repo name such as 'cambridgeltl/mbert-lang-sft-bxr-small'."""
    low = text.lower().rsplit("/", 1)[-1]
    m = re.search(r"lang-sft-([a-z]{2,3}(?:_[a-z]+)?)(?=[-_.]|$)", low)
    if m:
        return "language", m.group(1)
    if "task-sft" in low:
        return "task", None
    return None, None


def _base_model_from_config(src: Path) -> str:
    cfg = src / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    name = data.get("_name_or_path") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name and not os.path.isabs(name) else ""


def convert_composable_sft(src: str | Path, dest: str | Path, *, base_model: str = "", kind: str = "language",
                           language: str = "", model: nn.Module | None = None) -> SparseVector:
    """Convert a composable-sft vector folder (``pytorch_diff.bin``) into a DeFT-X vector saved at ``dest``.

    Reads ``{param: dense diff}`` (also the later ``{'body': {...}, 'head': {...}}`` layout, sparse COO
    tensors and the coordinate-list encodings) with ``weights_only=True``. Encoder diffs are kept under
    their HF names, LayerNorm diffs included (composable-sft trains them by default). Parameters outside
    the encoder (MLM / classification head diffs) are skipped: decided by ``parameter_roles(model)`` if a
    model is given, else by the name prefixes lm_head / cls. / classifier. Whole heads from a 'head' section
    are kept for task vectors only. With ``model`` the vector gets its fingerprint and is validated.
    """
    src, dest = Path(src), Path(dest)
    path = src / CSFT_FILE
    raw = _load_csft(path)
    if not isinstance(raw, Mapping):
        raise VectorError(f"{path}: expected a dict of parameter diffs, found a {type(raw).__name__}")
    if "body" in raw and isinstance(raw.get("body"), Mapping):
        body, head = raw["body"], raw.get("head") or {}
    else:
        body, head = raw, {}
    if not isinstance(head, Mapping):
        raise VectorError(f"{path}: 'head' is a {type(head).__name__}, expected a dict of tensors")

    roles = parameter_roles(model) if model is not None else None
    encoder = set(roles.maskable + roles.frozen) if roles is not None else None

    def in_encoder(name: str) -> bool:
        if encoder is None:
            return not name.startswith(HEAD_PREFIXES)
        if name in encoder:
            return True
        if name in roles.heads or name.startswith(HEAD_PREFIXES):
            return False
        raise VectorError(f"{path}: parameter {name!r} is not in the given model (was the vector made for "
                          f"another model class or base model?)")

    if not base_model and model is not None:
        base_model = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    meta = VectorMeta(kind=kind, base_model=base_model or _base_model_from_config(src),
                      base_fingerprint=base_fingerprint(model) if model is not None else "",
                      language=language, method="lt-sft", denoise=None,
                      extra={"converted_from": "composable-sft"})
    vec = SparseVector(meta)
    skipped: list[str] = []
    for name, obj in body.items():
        if not isinstance(name, str):
            raise VectorError(f"{path}: parameter names must be strings, found {name!r}")
        if not in_encoder(name):
            skipped.append(name)
            continue
        idx, val, shape = _sparse_entries(name, obj, path)
        vec.shapes[name] = shape
        if idx.numel():
            vec.indices[name], vec.values[name] = idx, val
    if kind == "task":
        head_names = set(roles.heads) if roles is not None else None
        for name, t in head.items():
            if not isinstance(t, Tensor) or t.layout != torch.strided:
                raise VectorError(f"{path}: head parameter {name!r} is not a dense tensor")
            if head_names is not None and name not in head_names:
                skipped.append(name)
                continue
            vec.heads[name] = t.detach().float().cpu().clone()
            vec.shapes[name] = tuple(t.shape)
    else:
        skipped += [str(n) for n in head]
    vec.shapes = {n: s for n, s in vec.shapes.items() if n in vec.indices or n in vec.heads}
    if not vec.indices and not vec.heads:
        raise VectorError(f"{path}: no nonzero encoder diffs found (skipped: {', '.join(skipped) or 'none'})")
    if skipped:
        meta.extra["skipped_parameters"] = skipped
    meta.k = vec.nnz
    if model is not None:
        vec.validate(model, where=str(path))
    vec.save(dest)
    logger.info("converted %s (%d entries, %d skipped parameters) into %s", path, meta.k, len(skipped), dest)
    return vec


# ---- pull -----------------------------------------------------------------------------------------
def _is_ours(folder: Path) -> bool:
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return not (folder / CSFT_FILE).is_file()  # let SparseVector.load report the broken config
    return (isinstance(data, dict) and data.get("format") == FORMAT) or not (folder / CSFT_FILE).is_file()


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` onto ``dest`` (same parent), replacing an existing ``dest`` as SparseVector.save does."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pull_vector(repo_id_or_path: str, dest: str | Path, *, token: str | None = None,
                revision: str | None = None, api=None, base_model: str = "", kind: str | None = None,
                language: str | None = None, model: nn.Module | None = None) -> Path:
    """Fetch a vector into ``dest`` (a Hub repo id, or a local folder: then nothing is downloaded).

    A DeFT-X folder (``sft_config.json``) is validated (also against ``model`` if given) and moved into
    place atomically, bytes unchanged; a composable-sft
    folder (``pytorch_diff.bin``) is converted (``base_model``/``kind``/``language``/``model`` are passed to
    ``convert_composable_sft``; kind and language default to a guess from the repo name, else "language").
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
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
                raise DeftxError(f"downloading Hugging Face repo {_scrub(repo_id_or_path, token)!r}"
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
            _replace_dir(out, dest)
        elif (snap / CSFT_FILE).is_file():
            g_kind, g_lang = _guess_from_name(str(repo_id_or_path) if not is_local else local.name)
            convert_composable_sft(snap, dest, base_model=base_model, kind=kind or g_kind or "language",
                                   language=language if language is not None else (g_lang or ""), model=model)
        else:
            raise VectorError(f"{where} holds neither a DeFT-X vector ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
                              f"composable-sft vector ({CSFT_FILE})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("pulled %s into %s", repo_id_or_path, dest)
    return dest
