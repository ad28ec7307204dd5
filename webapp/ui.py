"""DeFT-X Studio: the Gradio Blocks app (tabs Data, Train, Runs, Analyze, Predict, Hub).

A thin layer over the engine's public API. Training runs are CLI processes (``python -m deftx_engine.cli
train-language|train-task``) queued in the job registry (``webapp.jobs``); the app only reads their run
folders (``deftx_engine.runs.RunDir``). Every event has a stable ``api_name`` so ``gradio_client`` can drive
the app. Errors a user can act on (``DeftxError``) are shown inline and as a toast, never as a traceback.

torch / transformers are imported lazily (first prediction, first Start, or a warm-up thread a few
seconds after launch), so the page is served quickly.
"""
import functools
import hashlib
import importlib.util
import html
import json
import logging
import math
import os
import re
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr

from deftx_engine import presets as engine_presets
from deftx_engine.errors import ConfigError, DeftxError
from deftx_engine.runs import RunDir, read_json

from . import EXAMPLES, default_home, env_number
from .jobs import JobRegistry, QueueFull

log = logging.getLogger(__name__)

BASE_MODELS = ["minilm", "FacebookAI/xlm-roberta-base", "FacebookAI/xlm-roberta-large"]
PRESETS = list(engine_presets.PRESETS)  # cpu-demo, paper-xlmr-base
CUSTOM = "custom"
METHODS = [("DeFT-X (SVD-denoised)", "deftx"), ("LT-SFT (no denoising)", "lt-sft")]
DATA_SUFFIXES = [".txt", ".csv", ".tsv", ".jsonl"]
EXAMPLE = {"corpus": EXAMPLES / "target_corpus_id.txt", "task": EXAMPLES / "source_task_en.csv",
           "eval": EXAMPLES / "target_eval_id.csv"}
EXAMPLE_LANG = {"language": "id", "task": "en"}
# xlm-roberta-base's maskable entries (every encoder parameter but LayerNorm; benchmarks/core.py). Only used
# to show the paper preset's k, which is a count, as a share on the k slider.
XLMR_BASE_MASKABLE = 277_414_656
PHASES = {"full": "phase 1 · full fine-tuning", "denoise": "denoising + choosing the mask",
          "sparse": "phase 2 · sparse fine-tuning", "save": "saving the vector", "done": "finished"}
STATE_COLORS = {"queued": "#6b7280", "running": "#2563eb", "done": "#16a34a", "failed": "#dc2626",
                "cancelled": "#d97706", "interrupted": "#9333ea"}
CSS_FILE = Path(__file__).with_name("assets.css")


# ---- configuration from the environment ---------------------------------------------------------------
def default_model() -> str:
    """The base model preselected in the Train tab (and used for the cpu-demo preset)."""
    return os.environ.get("DEFTX_DEFAULT_MODEL", "").strip() or "minilm"


def max_upload_mb() -> float:
    """DEFTX_MAX_UPLOAD_MB (default 50): the largest upload, enforced by Gradio and again when it is stored."""
    return env_number("DEFTX_MAX_UPLOAD_MB", 50.0, integer=False, minimum=1e-6)


def max_lines() -> int | None:
    """DEFTX_MAX_LINES (default: no limit): corpora / task files with more lines (rows) are refused."""
    return env_number("DEFTX_MAX_LINES", None, minimum=1)


def max_steps() -> int | None:
    """DEFTX_MAX_STEPS (default: no limit): runs with more steps in either phase are refused."""
    return env_number("DEFTX_MAX_STEPS", None, minimum=1)


def max_queue() -> int | None:
    """DEFTX_MAX_QUEUE (default: no limit): Start (and Resume) are refused while this many runs wait."""
    return env_number("DEFTX_MAX_QUEUE", None, minimum=1)


def auth_from_env() -> list[tuple[str, str]] | None:
    """DEFTX_AUTH = ``user:password[,user2:password2]`` (a password may contain ':' but not ','): the
    logins of a shared deployment. A malformed value is an error, never silently "no login"."""
    raw = os.environ.get("DEFTX_AUTH", "").strip()
    if not raw:
        return None
    pairs = []
    for i, item in enumerate(raw.split(","), start=1):
        user, sep, password = item.strip().partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(f"DEFTX_AUTH entry {i} is not user:password (write user:password[,user2:password2])")
        pairs.append((user.strip(), password))
    return pairs


def check_settings() -> dict:
    """Read every limit from the environment once at start, so a bad value stops the app with a one-line
    message naming the variable (requests read them again, and report a bad value inline)."""
    return {"DEFTX_MAX_UPLOAD_MB": max_upload_mb(), "DEFTX_MAX_LINES": max_lines(), "DEFTX_MAX_STEPS": max_steps(),
            "DEFTX_MAX_QUEUE": max_queue(), "DEFTX_MAX_JOBS": env_number("DEFTX_MAX_JOBS", 1, minimum=1),
            "DEFTX_AUTH": "set" if auth_from_env() else None}


def launch_kwargs(home: str | Path | None = None) -> dict:
    """The launch() settings app.py uses: theme, CSS, upload limit, login (DEFTX_AUTH), and the only files
    served: those the app writes for download (DEFTX_HOME/outputs). Uploads, run folders, vectors and the
    registry are never served, and Gradio refuses any other path (and symlinks out of outputs/)."""
    home = Path(home) if home else default_home()
    outputs = home / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    return dict(theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate"),
                css=CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.exists() else None,
                allowed_paths=[str(outputs.resolve())], max_file_size=max(1, int(max_upload_mb() * 2 ** 20)),
                show_error=False,
                auth=auth_from_env())


# ---- secrets ------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{20,}")  # Hub tokens; not words like hf_hub_download
_BEARER_RE = re.compile(r"(?i)(bearer\s+|token[=:]\s*)[^\s'\"&,;]+")


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` without the given secrets and without anything shaped like a Hugging Face token or a bearer
    header, for every message shown to a user or written to a log."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _BEARER_RE.sub(lambda m: m.group(1) + "***", _TOKEN_RE.sub("hf_***", text))


# ---- small helpers ------------------------------------------------------------------------------------
def _cut(text: Any, n: int = 300) -> str:
    """A cell of a preview: long texts (a 200 kB line) are shortened, so the page stays light."""
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _ok(msg: str) -> str:
    return f"<span class='dx-ok'>✔</span> {msg}"


def _err(msg: str) -> str:
    return f"<span class='dx-err'>✖</span> {msg.replace('<', '&lt;')}"  # no tags from a message


def _number(value: Any, what: str, *, integer: bool = False, minimum: float | None = None,
            default: float | None = None) -> float | int:
    """A number from a form field or an API call; empty, NaN, infinite or out-of-range values are refused
    with a message naming the field (never a ValueError from int())."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            raise DeftxError(f"{what}: give a number")
        value = default
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DeftxError(f"{what} must be a number, got {_cut(value, 40)!r}") from None
    if math.isnan(x) or math.isinf(x):
        raise DeftxError(f"{what} must be a finite number, got {value}")
    if integer:
        if x != int(x):
            raise DeftxError(f"{what} must be a whole number, got {value}")
        x = int(x)
    if minimum is not None and x < minimum:
        raise DeftxError(f"{what} must be at least {minimum:g}, got {value}")
    return x


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _fmt_k(k: Any) -> str:
    try:
        k = float(k)
    except (TypeError, ValueError):
        return "?"
    return f"{k:.1%}" if 0 < k < 1 else f"{int(k):,}"


class Studio:
    """Shared state of one app: home folder, job registry, caches of vectors and composed models."""

    def __init__(self, home: Path):
        self.home = home
        self.uploads = home / "uploads"
        self.outputs = home / "outputs"
        for d in (self.uploads, self.outputs):
            d.mkdir(parents=True, exist_ok=True)
        self.registry = JobRegistry(home)
        self.display_names: OrderedDict[str, str] = OrderedDict()  # stored upload path -> name uploaded
        self._names_lock = threading.Lock()
        self._models: OrderedDict[tuple, tuple] = OrderedDict()
        self._model_lock = threading.Lock()
        self._vectors: OrderedDict[tuple, Any] = OrderedDict()
        self._vector_lock = threading.Lock()
        self.model_cache_size = env_number("DEFTX_MODEL_CACHE", 2, minimum=1)
        extra = [p for p in os.environ.get("DEFTX_DATA_DIRS", "").split(os.pathsep) if p.strip()]
        self.read_roots = [home.resolve(), EXAMPLES.resolve(), *(Path(p).expanduser().resolve() for p in extra)]

    MAX_NAMES = 5000  # display names remembered (oldest forgotten first)

    # ---- messages -------------------------------------------------------------------------------------
    def pretty(self, msg: str) -> str:
        """A message for the page: stored upload paths replaced by the names the user uploaded, DEFTX_HOME
        by its name, and anything shaped like a token removed."""
        uploads = str(self.uploads)

        def shown(m: re.Match) -> str:
            return self.display_names.get(m.group(0), m.group(1))

        msg = re.sub(re.escape(uploads) + r"/([0-9a-f]{12}-[A-Za-z0-9._-]*)", shown, msg)
        msg = msg.replace("Raise --max-lines or use a smaller file.",  # the CLI's advice; here it is the server's
                          "Use a smaller file (this server's limit, DEFTX_MAX_LINES).")
        msg = msg.replace("Use a smaller file or raise --max-bytes.", "Use a smaller file.")
        for flag, field in (("--text-column", "the Text column"), ("--pair-column", "the Second text column"),
                            ("--label-column", "the Label column")):  # the CLI's options are fields here
            msg = msg.replace(f"pass {flag}", f"set {field}").replace(f"Pass {flag}", f"Set {field}")
            msg = msg.replace(flag, field)
        return scrub(msg.replace(str(self.home), "DEFTX_HOME"))

    def _remember_name(self, stored: Path, shown: str) -> None:
        with self._names_lock:
            self.display_names[str(stored)] = shown
            self.display_names.move_to_end(str(stored))
            while len(self.display_names) > self.MAX_NAMES:
                self.display_names.popitem(last=False)

    # ---- files ----------------------------------------------------------------------------------------
    @staticmethod
    def _short(name: str, n: int = 80) -> str:
        name = name.replace("\0", "\\0")
        return name if len(name) <= n else name[: n - 1] + "…"

    @staticmethod
    def upload_areas() -> list[Path]:
        """Where uploaded files can come from: Gradio's upload folder (and, for in-process callers such as
        tests and scripts, the system temp folder)."""
        areas = [Path(tempfile.gettempdir())]
        try:
            from gradio.utils import get_upload_folder

            areas.insert(0, Path(get_upload_folder()))
        except Exception:  # noqa: BLE001 -- an older/newer Gradio without the helper
            pass
        return [a.resolve() for a in areas]

    def store_upload(self, tmp_path: str) -> Path:
        """Copy an uploaded file into DEFTX_HOME/uploads under ``<content hash>-<sanitised name>``.

        The uploaded name never becomes a path: only ``[A-Za-z0-9._-]`` of its stem (60 at most) and a short
        lowercase suffix are kept, after the hash, so ``../../x``, absolute names, NUL bytes or 4 kB names
        cannot leave uploads/. The source must be a regular file (not a symlink, FIFO or device) inside the
        upload area; it is read once (hashing and copying together), stopping at the size limit."""
        raw = str(tmp_path)
        shown = self._short(raw.replace("\\", "/").rsplit("/", 1)[-1] or "upload")
        if "\0" in raw:
            raise DeftxError(f"{shown}: the file name contains a NUL byte; rename the file and upload it again")
        src = Path(raw)
        try:
            if stat.S_ISLNK(os.lstat(src).st_mode):
                raise DeftxError(f"{shown}: a symbolic link is not an uploaded file; upload the file itself")
            real = src.resolve(strict=True)
        except DeftxError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise DeftxError(f"{shown}: the uploaded file cannot be read ({reason}); upload it again") from None
        if not any(real == a or a in real.parents for a in self.upload_areas()):
            raise DeftxError(f"{shown} is not an uploaded file; upload it, or type its path in the path field")
        limit_mb = max_upload_mb()
        limit = int(limit_mb * 2 ** 20)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise DeftxError(f"{shown}: the uploaded file cannot be read ({e.strerror or e}); upload it again") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            os.close(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DeftxError(f"{shown} is not a regular file; upload a .txt, .csv, .tsv or .jsonl file")
            raise DeftxError(f"{shown} is {st.st_size / 2 ** 20:.1f} MB, over the upload limit of "
                             f"{limit_mb:g} MB (DEFTX_MAX_UPLOAD_MB)")
        tmp = None
        try:
            with os.fdopen(fd, "rb") as f:
                h = hashlib.sha256()
                out_fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=self.uploads)
                size = 0
                with os.fdopen(out_fd, "wb") as out:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        size += len(block)
                        if size > limit:  # the file grew while it was read
                            raise DeftxError(f"{shown} is over the upload limit of {limit_mb:g} MB "
                                             "(DEFTX_MAX_UPLOAD_MB)")
                        h.update(block)
                        out.write(block)
            base = src.name
            stem, dot, ext = base.rpartition(".") if "." in base.lstrip(".") else (base, "", "")
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60].strip("._-") or "upload"
            suffix = f".{ext.lower()}" if dot and re.fullmatch(r"[a-z0-9]{1,8}", ext.lower()) else ""
            dest = self.uploads / f"{h.hexdigest()[:12]}-{stem}{suffix}"
            assert dest.parent == self.uploads and "/" not in dest.name
            try:
                existing = os.lstat(dest)
            except OSError:
                existing = None
            if existing is not None and stat.S_ISREG(existing.st_mode) and existing.st_size == size:
                os.unlink(tmp)  # the same content was uploaded before
            else:  # new, or something that is not our file (e.g. a planted symlink): replace it atomically
                os.replace(tmp, dest)
            tmp = None
        except OSError as e:
            raise DeftxError(f"{shown}: the upload could not be stored ({e.strerror or e})") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self._remember_name(dest, shown)
        return dest

    def resolve_source(self, file: str | None, spec: str | None) -> tuple[str, str]:
        """(source for the engine, name to show) from an upload or a typed path / ``hub:`` spec."""
        if file:
            p = self.store_upload(file)
            return str(p), self.display_names.get(str(p), p.name)
        spec = (spec or "").strip()
        if not spec:
            raise DeftxError("choose a file to upload, or type a path or a hub:org/name spec")
        if spec.startswith("hub:"):
            if "\0" in spec or len(spec) > 500:
                raise DeftxError("that is not a Hub dataset spec: write hub:org/name[:config][@split][#column]")
            return spec, spec
        return str(self.check_path(spec)), self._short(Path(spec).name)

    def check_path(self, spec: str) -> Path:
        """A typed local path must lie in DEFTX_HOME, the bundled examples, or a DEFTX_DATA_DIRS folder
        (after resolving ``..`` and symlinks), and be a regular file or a folder (never a FIFO or device,
        which could block a reader)."""
        shown = self._short(spec)
        if "\0" in spec:
            raise DeftxError(f"{shown}: a path cannot contain a NUL byte")
        if len(spec) > 4096:
            raise DeftxError(f"{shown}: the path is too long")
        try:
            p = Path(spec).expanduser()
            if not p.is_absolute():
                p = (Path.cwd() / p)
            real = p.resolve()
        except (OSError, RuntimeError, ValueError):
            raise DeftxError(f"{shown}: not a usable path (unknown user, a symlink loop or a name too long)") from None
        if not any(real == r or r in real.parents for r in self.read_roots):
            raise DeftxError(f"{shown}: the app only reads files you upload, the bundled examples and folders "
                             "listed in DEFTX_DATA_DIRS; upload the file instead")
        try:
            mode = real.stat().st_mode
        except OSError:
            mode = None  # missing: the loader says so, naming the file
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise DeftxError(f"{shown} is not a regular file")
        return real

    # ---- vectors and models ---------------------------------------------------------------------------
    def vector(self, path: str | Path):
        from deftx_engine.vectors import CONFIG_FILE, SparseVector

        path = Path(path)
        try:
            key = (str(path), (path / CONFIG_FILE).stat().st_mtime_ns)
        except OSError:
            key = (str(path), 0)
        with self._vector_lock:
            if key in self._vectors:
                self._vectors.move_to_end(key)
                return self._vectors[key]
        vec = SparseVector.load(path)
        with self._vector_lock:
            self._vectors[key] = vec
            while len(self._vectors) > 6:
                self._vectors.popitem(last=False)
        return vec

    def composed(self, task_dir: str, language_dir: str | None):
        """The composed classifier for (task, language), built once and cached (LRU)."""
        from deftx_engine.evaluate import composed_model

        key = (task_dir, language_dir or "")
        _torch_threads()
        with self._model_lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], True
            model, tok = composed_model(self.vector(task_dir), [self.vector(language_dir)] if language_dir else [])
            names = [model.config.id2label[i] for i in range(model.config.num_labels)]
            self._models[key] = (model, tok, names)
            while len(self._models) > self.model_cache_size:
                self._models.popitem(last=False)
            return self._models[key], False

    # ---- runs -----------------------------------------------------------------------------------------
    def vector_runs(self, kind: str | None = None) -> list[dict]:
        return [r for r in self.registry.list(states=["done"], kind=kind)
                if r["vector_dir"] and Path(r["vector_dir"]).is_dir()]

    def run_vector_dir(self, run_id: str | None, what: str = "run") -> str:
        if not run_id:
            raise DeftxError(f"choose a {what} first (train one in the Train tab or pull one in the Hub tab)")
        row = self.registry.get(run_id)
        if row is None:
            raise DeftxError(f"unknown run {run_id!r}; refresh the page")
        if row["state"] != "done" or not row["vector_dir"] or not Path(row["vector_dir"]).is_dir():
            raise DeftxError(f"run {row['name']} ({row['state']}) has no vector yet")
        return row["vector_dir"]


def _label(row: dict) -> str:
    cfg = row["config"]
    lang = cfg.get("language") or ""
    bits = [row["name"], row["kind"] + (f" ({lang})" if lang else "")]
    if row["state"] != "done":
        bits.append(row["state"])
    return " · ".join(bits) + f" — {row['id']}"


def _choices(rows: list[dict]) -> list[tuple[str, str]]:
    return [(_label(r), r["id"]) for r in rows]


def _settings(row: dict) -> str:
    c = row["config"]
    if not c:
        return ""
    if c.get("source"):
        return f"pulled from {c['source']} · {c.get('method', '')} · {c.get('base_model', '')}"
    parts = [c.get("method", "")]
    if c.get("method") == "deftx":
        parts.append(f"τ={c.get('energy')}" if c.get("rank_policy") == "energy" else f"r={c.get('rank')}")
        parts.append(f"ρ={c.get('residual_share')}")
    parts.append(f"k={_fmt_k(c.get('k'))}")
    steps = [f"{c.get('full_steps')}+{c.get('sparse_steps')} steps" if c.get("full_steps") else
             f"{c.get('full_epochs')}+{c.get('sparse_epochs')} epochs"]
    parts += steps + [f"lr={c.get('lr')}", f"bs={c.get('batch_size')}", str(c.get("base_model", ""))]
    return " · ".join(str(p) for p in parts if p not in ("", None))


def runs_table(studio: Studio):
    import pandas as pd

    now = time.time()
    rows = []
    for r in studio.registry.list():
        end = r["finished"] or (now if r["state"] == "running" else None)
        progress = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else ""
        if r["state"] == "queued":
            pos = studio.registry.queue_position(r["id"])
            progress = f"#{pos} in queue" if pos else ""
        rows.append({"run": r["id"], "name": r["name"], "kind": r["kind"], "state": r["state"], "progress": progress,
                     "settings": _settings(r), "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
                     "duration": _fmt_duration(end - r["started"]) if r["started"] and end else "",
                     "vector": r["vector_dir"] if r["state"] == "done" else "", "message": r["message"] or ""})
    cols = ["run", "name", "kind", "state", "progress", "settings", "created", "duration", "vector", "message"]
    return pd.DataFrame(rows, columns=cols)


def progress_html(studio: Studio, row: dict | None) -> str:
    if row is None:
        return ("<div class='dx-progress dx-empty'>No run selected. Choose settings on the left and press "
                "<b>Start</b>.</div>")
    st = RunDir(row["run_dir"]).status() if row["kind"] in ("language", "task") else {}
    state = row["state"]
    step = int(st.get("step") or row["step"] or 0)
    total = int(st.get("total_steps") or row["total_steps"] or 0)
    pct = 100.0 if state == "done" else (100.0 * step / total if total else 0.0)
    phase = PHASES.get(st.get("phase") or row["phase"], st.get("phase") or "")
    color = STATE_COLORS.get(state, "#6b7280")
    foot = []
    if state == "queued":
        pos = studio.registry.queue_position(row["id"])
        foot.append(f"waiting for a free slot (#{pos} in the queue)" if pos else "waiting")
    else:
        if total:
            foot.append(f"step {step} / {total}")
        if st.get("loss") is not None:
            foot.append(f"loss {st['loss']:.3f}")
        if state == "running":
            eta = st.get("eta_seconds")
            foot.append(f"ETA {_fmt_duration(eta)}" if eta is not None else "ETA –")
        if row["started"]:
            end = row["finished"] or time.time()
            foot.append(f"elapsed {_fmt_duration(end - row['started'])}")
    msg = row["message"] or ""
    return (f"<div class='dx-progress'>"
            f"<div class='dx-progress-head'><span class='dx-badge' style='background:{color}'>{state}</span>"
            f" <b>{html.escape(row['name'])}</b> <span class='dx-muted'>{html.escape(row['kind'])} SFT · "
            f"{html.escape(phase)}</span></div>"
            f"<div class='dx-bar'><div class='dx-fill' style='width:{pct:.1f}%;background:{color}'></div></div>"
            f"<div class='dx-progress-foot'>{' · '.join(foot)}</div>"
            + (f"<div class='dx-progress-msg'>{html.escape(studio.pretty(msg))}</div>" if msg else "")
            + "</div>")


def _safe(n_outputs: int, status_at: int | None, on_error: dict | None = None):
    """Turn exceptions into an inline message (+ toast): DeftxError text as is, anything else in one line.
    ``on_error`` maps output positions to values set on failure (e.g. clearing a token field)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            studio = wrapper.studio
            try:
                return fn(*args, **kwargs)
            except DeftxError as e:
                msg = studio.pretty(str(e))
            except Exception as e:  # noqa: BLE001 -- the user sees one line, the server log the traceback
                # the traceback is logged scrubbed: an exception text may quote a token or a header
                log.error("%s failed:\n%s", fn.__name__, scrub(traceback.format_exc()))
                first = (str(e).strip().splitlines() or [""])[0][:300]
                msg = studio.pretty(f"unexpected error ({type(e).__name__}): {first}")
            gr.Warning(msg)
            out = [gr.skip()] * n_outputs
            for i, v in (on_error or {}).items():
                out[i] = v
            if status_at is not None:
                out[status_at] = _err(msg)
            return tuple(out) if n_outputs > 1 else out[0]

        return wrapper

    return deco


def _scrubbed(e: Exception, token: str | None) -> Exception:
    """``e`` as an exception without ``token`` in its text (and with no chained original): a DeftxError
    stays one, anything else becomes a one-line DeftxError (its scrubbed traceback goes to the log)."""
    if isinstance(e, DeftxError):
        return DeftxError(scrub(str(e), token))
    log.error("Hub call failed:\n%s", scrub(traceback.format_exc(), token))
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return DeftxError(scrub(f"unexpected error ({type(e).__name__}): {first}", token))


def _bar(counts: dict[str, int], title: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), text=list(counts.values()),
                           marker_color="#6366f1"))
    fig.update_layout(title=title, xaxis_title="label", yaxis_title="examples", height=320,
                      margin=dict(t=50, l=50, r=20, b=40))
    return fig


_threads_set = False


def _torch_threads() -> None:
    """Inference in the app uses few intra-op threads (DEFTX_APP_THREADS, default 1): training jobs run in
    their own processes on the same cores, and a one-sentence forward pass is slower, not faster, when its
    threads wait for busy cores (measured: 46 ms with 2 threads vs 1.7 ms with 1 on a loaded 2-core box)."""
    global _threads_set
    if not _threads_set:
        import torch

        torch.set_num_threads(env_number("DEFTX_APP_THREADS", 1, minimum=1))
        _threads_set = True


def _warm_up() -> None:
    """Import torch/transformers and build one Plotly figure of each kind in the background, so the first
    Start, prediction and chart do not pay for it (the first Plotly figure alone takes ~0.3 s)."""
    time.sleep(2)
    try:
        import deftx_engine.evaluate  # noqa: F401 -- torch + transformers
        import deftx_engine.train  # noqa: F401
        from deftx_engine import plots

        _torch_threads()
        plots.probabilities_figure(["a", "b"], [0.5, 0.5]).to_json()
        plots.loss_figure([{"phase": "full", "step": 1, "loss": 1.0}]).to_json()
        _bar({"a": 1}, "warm-up").to_json()
    except Exception:  # noqa: BLE001
        log.exception("warm-up failed")


# ---- the app ------------------------------------------------------------------------------------------
def build_app(home: str | Path | None = None) -> gr.Blocks:
    """The DeFT-X Studio Blocks. ``home`` defaults to ``webapp.default_home()`` (``$DEFTX_HOME``)."""
    home = Path(home).expanduser().resolve() if home else default_home()
    check_settings()  # a bad DEFTX_* value stops here, with a message naming it
    home.mkdir(parents=True, exist_ok=True)
    studio = Studio(home)
    changed = studio.registry.recover()
    if changed:
        log.info("marked %d run(s) whose process is gone: %s", len(changed), ", ".join(changed))
    studio.registry.start()
    if os.environ.get("DEFTX_WARMUP", "1") != "0":
        threading.Thread(target=_warm_up, name="deftx-warmup", daemon=True).start()

    def safe(n, status_at, on_error=None):
        def deco(fn):
            w = _safe(n, status_at, on_error)(fn)
            w.studio = studio
            return w
        return deco

    init_preset = engine_presets.preset("cpu-demo", "language")
    model0 = default_model()
    on_space = bool(os.environ.get("SPACE_ID"))
    # "Sign in with Hugging Face" only on a Space with hf_oauth (OAUTH_CLIENT_ID set) and gradio[oauth] installed;
    # elsewhere a LoginButton would make Gradio mock OAuth, which needs a logged-in machine.
    oauth = on_space and bool(os.environ.get("OAUTH_CLIENT_ID")) and importlib.util.find_spec("authlib") is not None

    with gr.Blocks(title="DeFT-X Studio", fill_width=False) as demo:
        demo.studio = studio
        gr.HTML("<div class='dx-header'><h1>DeFT-X Studio</h1><p>Zero-shot cross-lingual transfer with "
                "composable, SVD-denoised sparse fine-tunings: train a <b>language</b> SFT on unlabelled "
                "target-language text and a <b>task</b> SFT on labelled source-language data, then add both "
                "to the base model.</p></div>", js_on_load=None)
        runs_sig = gr.State("")
        watch_sig = gr.State("")
        k_exact = gr.State(None)  # (shown %, exact count) when a preset's k is a count

        with gr.Tabs():
            # ================================== Data ==================================
            with gr.Tab("Data", id="data"):
                gr.Markdown("Check a file before training: the preview shows what the trainer will read, and "
                            "errors name the line and field to fix. The example files are preselected.",
                            elem_classes="dx-help")
                with gr.Row():
                    with gr.Column(scale=2):
                        d_role = gr.Radio([("Target-language text (language SFT)", "corpus"),
                                           ("Labelled source task data (task SFT)", "task"),
                                           ("Labelled target-language evaluation data", "eval")],
                                          value="corpus", label="What is this data?")
                        d_file = gr.File(label="Upload a file", file_types=DATA_SUFFIXES,
                                         type="filepath", height=110)
                        d_spec = gr.Textbox(str(EXAMPLE["corpus"]), label="…or a path / Hub dataset",
                                            info=".txt, .csv, .tsv or .jsonl; hub:org/name[:config][@split][#column] "
                                                 "loads a Hub split")
                        with gr.Accordion("Columns", open=False):
                            d_text = gr.Textbox("", label="Text column", placeholder="auto: text / premise+hypothesis")
                            d_pair = gr.Textbox("", label="Second text column (pair tasks)", placeholder="auto")
                            d_label = gr.Textbox("label", label="Label column")
                        d_btn = gr.Button("Check data", variant="primary")
                    with gr.Column(scale=3):
                        d_status = gr.Markdown(elem_classes="dx-status")
                        d_preview = gr.Dataframe(label="Preview (first rows)", interactive=False, max_height=300,
                                                 wrap=True)
                        d_chart = gr.Plot(label="Label distribution", visible=False, show_label=False)
                d_use = gr.Markdown(elem_classes="dx-help")

            # ================================== Train ==================================
            with gr.Tab("Train", id="train"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5, elem_classes="dx-panel"):
                        with gr.Row():
                            t_preset = gr.Dropdown(PRESETS + [CUSTOM], value="cpu-demo", label="Preset",
                                                   info="fills the settings below", scale=1)
                            t_kind = gr.Radio([("Language SFT", "language"), ("Task SFT", "task")], value="language",
                                              label="Kind", scale=1, elem_id="dx-kind")
                        t_base = gr.Dropdown(list(dict.fromkeys([model0] + BASE_MODELS)), value=model0,
                                             allow_custom_value=True, label="Base model",
                                             info="minilm works offline; or any Hub id / local model folder")
                        with gr.Row():
                            t_data = gr.Textbox(str(EXAMPLE["corpus"]), label="Training data", scale=3,
                                                elem_id="dx-data",
                                                info="set from the Data tab (or type a path / hub: spec)")
                            t_lang = gr.Textbox(EXAMPLE_LANG["language"], label="Language", scale=1,
                                                info="code stored in the vector")
                        t_name = gr.Textbox("", label="Run name (optional)", placeholder="e.g. id-language-demo")
                        t_method = gr.Radio(METHODS, value="deftx", label="Method")
                        with gr.Group(visible=True) as t_denoise:
                            with gr.Row():
                                t_policy = gr.Radio([("energy τ", "energy"), ("fixed rank r", "fixed")],
                                                    value="energy", label="Rank policy", scale=1)
                                t_energy = gr.Slider(0.5, 1.0, value=init_preset["energy"], step=0.01,
                                                     label="τ — share of σ² energy kept", scale=2)
                                t_rank = gr.Slider(1, 768, value=100, step=1, label="r — rank kept", visible=False,
                                                   scale=2)
                            t_rho = gr.Slider(0.0, 0.2, value=init_preset["residual_share"], step=0.005,
                                              label="ρ — share of each matrix's residual kept")
                        t_k = gr.Slider(0.1, 20.0, value=round(init_preset["k"] * 100, 2), step=0.1,
                                        label="k — % of the maskable parameters trained")
                        with gr.Accordion("Training length and optimiser", open=False):
                            with gr.Row():
                                t_full = gr.Number(init_preset.get("full_steps", 0), precision=0, minimum=0,
                                                   label="Phase-1 steps", info="0 = use epochs",
                                                   elem_id="dx-full-steps")
                                t_sparse = gr.Number(init_preset.get("sparse_steps", 0), precision=0, minimum=0,
                                                     label="Phase-2 steps", info="0 = use epochs",
                                                     elem_id="dx-sparse-steps")
                                t_epochs = gr.Number(1.0, minimum=0.01, label="Epochs per phase",
                                                     info="when steps are 0")
                            with gr.Row():
                                t_lr = gr.Number(init_preset["lr"], label="Learning rate", minimum=0)
                                t_bs = gr.Number(init_preset["batch_size"], precision=0, minimum=1, label="Batch size")
                                t_maxlen = gr.Number(init_preset["max_length"], precision=0, minimum=8,
                                                     label="Max tokens")
                                t_seed = gr.Number(init_preset["seed"], precision=0, label="Seed")
                        with gr.Accordion("Data columns", open=False):
                            with gr.Row():
                                t_textcol = gr.Textbox("", label="Text column", placeholder="auto")
                                t_paircol = gr.Textbox("", label="Second text column", placeholder="auto")
                                t_labelcol = gr.Textbox("label", label="Label column")
                    with gr.Column(scale=6):
                        with gr.Row():
                            t_start = gr.Button("▶ Start training", variant="primary", elem_id="dx-start", scale=3)
                            t_cancel = gr.Button("■ Cancel", variant="stop", elem_id="dx-cancel", scale=1)
                            t_resume = gr.Button("↻ Resume", elem_id="dx-resume", scale=1)
                        t_status = gr.Markdown(elem_classes="dx-status", elem_id="dx-train-status")
                        t_watch = gr.Dropdown([], value=None, label="Run shown", allow_custom_value=True)
                        t_progress = gr.HTML(progress_html(studio, None), elem_id="dx-progress", js_on_load=None)
                        t_loss = gr.Plot(label="Loss", show_label=False)
                        t_log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False,
                                           elem_classes="dx-log", autoscroll=True)
                        with gr.Accordion("Status details", open=False):
                            t_details = gr.JSON(label="status", elem_id="dx-details")
                timer = gr.Timer(2.0)

            # ================================== Runs ==================================
            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    gr.Markdown("Every run on this machine, newest first — also runs started from other browser "
                                "tabs and before the app was restarted.", elem_classes="dx-help")
                    r_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
                r_table = gr.Dataframe(runs_table(studio), interactive=False, wrap=True, max_height=560,
                                       elem_id="dx-runs",
                                       column_widths=["190px", "150px", "80px", "95px", "95px", "340px", "130px",
                                                      "95px", "320px", "260px"])

            # ================================== Analyze ==================================
            with gr.Tab("Analyze", id="analyze") as tab_analyze:
                with gr.Row():
                    a_run = gr.Dropdown([], label="Vector", scale=3, allow_custom_value=True)
                    a_matrix = gr.Dropdown([], label="Matrix (SVD spectrum)", scale=3, allow_custom_value=True)
                    a_other = gr.Dropdown([], label="Compare with (overlap)", scale=3, allow_custom_value=True)
                    a_btn = gr.Button("Analyze", variant="primary", scale=1)
                a_status = gr.Markdown(elem_classes="dx-status")
                a_summary = gr.Markdown()
                with gr.Row():
                    a_spectrum = gr.Plot(label="Spectrum of the phase-1 delta", show_label=False)
                    a_density = gr.Plot(label="Mask density per layer", show_label=False)
                a_overlap = gr.Plot(label="Overlap", show_label=False)
                with gr.Accordion("Denoising per matrix", open=False):
                    a_table = gr.Dataframe(interactive=False, max_height=360)

            # ================================== Predict ==================================
            with gr.Tab("Predict", id="predict") as tab_predict:
                with gr.Row():
                    p_task = gr.Dropdown([], label="Task vector", scale=1, allow_custom_value=True,
                                         elem_id="dx-task-vector")
                    p_lang = gr.Dropdown([("none", "")], value="", label="Language vector", scale=1,
                                         allow_custom_value=True,
                                         info="θ = θ0 + φ_task + φ_language")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        p_text = gr.Textbox(label="Text", lines=3, placeholder="Makanannya enak sekali!",
                                            elem_id="dx-text")
                        p_pair = gr.Textbox(label="Second text (sentence-pair tasks such as NLI only)", lines=2)
                        p_btn = gr.Button("Predict", variant="primary", elem_id="dx-predict")
                        p_status = gr.Markdown(elem_classes="dx-status", elem_id="dx-predict-status")
                    with gr.Column(scale=1):
                        p_plot = gr.Plot(label="Label probabilities", elem_id="dx-probs", show_label=False)
                gr.Markdown("### A whole file")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        p_file = gr.File(label="Upload a file", file_types=DATA_SUFFIXES,
                                         type="filepath", height=110)
                        p_spec = gr.Textbox(str(EXAMPLE["eval"]), label="…or a path / Hub dataset")
                        with gr.Row():
                            p_batch = gr.Button("Predict every row → CSV")
                            p_eval = gr.Button("Score a labelled file", variant="primary")
                        p_fstatus = gr.Markdown(elem_classes="dx-status")
                        p_csv = gr.File(label="Predictions (CSV)", interactive=False, visible=False)
                    with gr.Column(scale=1):
                        p_conf = gr.Plot(label="Confusion matrix", show_label=False)

            # ================================== Hub ==================================
            with gr.Tab("Hub", id="hub") as tab_hub:
                with gr.Row(equal_height=False):
                    with gr.Column(elem_classes="dx-panel"):
                        gr.Markdown("### Push a vector\nUploads the vector folder with a generated model card "
                                    "(base model, language, method, k, rank policy, metrics).")
                        h_run = gr.Dropdown([], label="Vector", allow_custom_value=True)
                        h_repo = gr.Textbox(label="Repository id", placeholder="your-name/deftx-id-language")
                        h_private = gr.Checkbox(False, label="Private repository")
                        if oauth:
                            gr.LoginButton()
                        h_token = gr.Textbox(type="password", label="Hugging Face token",
                                             placeholder="hf_… (leave empty to use HF_TOKEN"
                                                         + (" or your login" if oauth else "") + ")",
                                             info="for this push (or a private pull) only: never stored, "
                                                  "logged or shown")
                        h_push = gr.Button("Push", variant="primary")
                        h_pstatus = gr.Markdown(elem_classes="dx-status")
                    with gr.Column(elem_classes="dx-panel"):
                        gr.Markdown("### Pull a vector\nA Hub repo id or a local folder; composable-sft "
                                    "`pytorch_diff.bin` vectors are converted (without unpickling code).")
                        h_src = gr.Textbox(label="Repository id or folder",
                                           placeholder="org/name, or a folder under DEFTX_HOME")
                        with gr.Accordion("For composable-sft vectors", open=False):
                            h_base = gr.Textbox("", label="Base model", placeholder="e.g. FacebookAI/xlm-roberta-base")
                            h_kind = gr.Radio([("guess from the name", ""), ("language", "language"),
                                               ("task", "task")], value="", label="Kind")
                            h_lang = gr.Textbox("", label="Language", placeholder="guess from the name")
                        h_pull = gr.Button("Pull", variant="primary")
                        h_lstatus = gr.Markdown(elem_classes="dx-status")

        # ------------------------------------------------------------------ Data events
        @safe(4, 0)
        def validate_data(role, file, spec, text_column, pair_column, label_column):
            """Check a corpus / task file; returns (message, preview table, label chart, source used)."""
            import pandas as pd

            from deftx_engine.data import describe_corpus, describe_task, load_corpus, load_task_data

            source, shown = studio.resolve_source(file, spec)
            text_column = (text_column or "").strip() or None
            pair_column = (pair_column or "").strip() or None
            label_column = (label_column or "").strip() or "label"
            limit = max_lines()
            if role == "corpus":
                lines = load_corpus(source, text_column, max_lines=limit)
                d = describe_corpus(lines)
                df = pd.DataFrame({"line": range(1, min(len(lines), 20) + 1), "text": [_cut(t) for t in lines[:20]]})
                msg = _ok(f"**{html.escape(shown)}**: {d['n_lines']:,} lines, {d['n_chars']:,} characters, "
                          f"{d['mean_words']} words per line on average. Used for language SFTs.")
                return msg, df, gr.update(value=None, visible=False), source
            td = load_task_data(source, text_column=text_column, pair_column=pair_column, label_column=label_column,
                                max_rows=limit)
            d = describe_task(td)
            cols = {"text": [_cut(t) for t in td.texts[:20]]}
            if td.is_pair:
                cols["second text"] = [_cut(t) for t in td.text_pairs[:20]]
            cols["label"] = [_cut(t) for t in td.labels[:20]]
            counts = d["label_counts"]
            use = "task SFTs" if role == "task" else "scoring in the Predict tab"
            names = [html.escape(_cut(k, 40)) for k in list(counts)[:30]] + (["…"] if len(counts) > 30 else [])
            msg = _ok(f"**{html.escape(shown)}**: {d['n_rows']:,} {'sentence pairs' if td.is_pair else 'texts'}, "
                      f"{len(counts)} labels ({', '.join(names)}). Used for {use}.")
            return msg, pd.DataFrame(cols), gr.update(value=_bar(counts, "Label distribution"), visible=True), source

        d_source = gr.State(str(EXAMPLE["corpus"]))
        d_btn.click(validate_data, [d_role, d_file, d_spec, d_text, d_pair, d_label],
                    [d_status, d_preview, d_chart, d_source], api_name="validate_data")
        d_file.upload(validate_data, [d_role, d_file, d_spec, d_text, d_pair, d_label],
                      [d_status, d_preview, d_chart, d_source], api_visibility="private")

        def role_changed(role):
            return str(EXAMPLE[role]), None

        d_role.change(role_changed, d_role, [d_spec, d_file], api_visibility="private").then(
            validate_data, [d_role, d_file, d_spec, d_text, d_pair, d_label], [d_status, d_preview, d_chart, d_source],
            api_visibility="private")

        def use_source(role, source, text_column, pair_column, label_column, kind):
            """After a successful check, the Train (or Predict) tab uses this source."""
            if not source:
                return (gr.skip(),) * 6
            if role == "eval":
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), source, \
                    "The **Predict** tab will score this file."
            want = "language" if role == "corpus" else "task"
            note = (f"The **Train** tab will use this file for {want} SFTs"
                    + ("." if kind == want else f" — switch *Kind* to {want} there."))
            if kind != want:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), note
            return source, text_column, pair_column, label_column or "label", gr.skip(), note

        corpus_src = gr.State({"data": str(EXAMPLE["corpus"]), "text": "", "pair": "", "label": "label"})
        task_src = gr.State({"data": str(EXAMPLE["task"]), "text": "", "pair": "", "label": "label"})

        def remember(role, source, text_column, pair_column, label_column, corpus, task):
            if source and role in ("corpus", "task"):
                entry = {"data": source, "text": text_column or "", "pair": pair_column or "",
                         "label": label_column or "label"}
                return (entry, gr.skip()) if role == "corpus" else (gr.skip(), entry)
            return gr.skip(), gr.skip()

        d_source.change(use_source, [d_role, d_source, d_text, d_pair, d_label, t_kind],
                        [t_data, t_textcol, t_paircol, t_labelcol, p_spec, d_use], api_visibility="private")
        d_source.change(remember, [d_role, d_source, d_text, d_pair, d_label, corpus_src, task_src],
                        [corpus_src, task_src], api_visibility="private")

        # ------------------------------------------------------------------ Train events
        def preset_values(name, kind):
            """Control values for a preset (explicit engine defaults for what the preset leaves out)."""
            import dataclasses

            from deftx_engine.train import TrainConfig

            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                        if f.default is not dataclasses.MISSING}
            v = {**defaults, **engine_presets.preset(name, kind)}
            if v["base_model"] == "minilm":
                v["base_model"] = model0
            return v

        @safe(21, 20)
        def apply_preset(name, kind, corpus, task):
            """Fill the controls from a preset (and the data checked in the Data tab for this kind)."""
            src = corpus if kind == "language" else task
            example = str(EXAMPLE["corpus" if kind == "language" else "task"])
            data_updates = (src["data"], EXAMPLE_LANG[kind] if src["data"] == example else gr.skip(), src["text"],
                            src["pair"], src["label"])
            if name == CUSTOM or not name:
                return (*[gr.skip()] * 14, None, *data_updates, "")
            v = preset_values(name, kind)
            k = v["k"]
            if 0 < k < 1:
                k_pct, exact = round(k * 100, 2), None
            else:
                k_pct = round(100 * k / XLMR_BASE_MASKABLE, 2)
                exact = [k_pct, int(k)]
            epochs = v["full_epochs"] if not v["full_steps"] else v.get("sparse_epochs", 1.0)
            return (gr.update(value=v["base_model"]), v["method"], v["rank_policy"], v["energy"], v["rank"],
                    v["residual_share"], k_pct, v["full_steps"], v["sparse_steps"], epochs, v["lr"], v["batch_size"],
                    v["max_length"], v["seed"], exact, *data_updates, "")

        preset_outputs = [t_base, t_method, t_policy, t_energy, t_rank, t_rho, t_k, t_full, t_sparse, t_epochs, t_lr,
                          t_bs, t_maxlen, t_seed, k_exact, t_data, t_lang, t_textcol, t_paircol, t_labelcol, t_status]
        t_preset.input(apply_preset, [t_preset, t_kind, corpus_src, task_src], preset_outputs, api_name="apply_preset")
        t_kind.input(apply_preset, [t_preset, t_kind, corpus_src, task_src], preset_outputs, api_visibility="private")

        t_method.change(lambda m: gr.update(visible=m == "deftx"), t_method, t_denoise, api_visibility="private")
        t_policy.change(lambda p: (gr.update(visible=p == "energy"), gr.update(visible=p == "fixed")), t_policy,
                        [t_energy, t_rank], api_visibility="private")

        def mark_custom(*_):
            return CUSTOM

        for comp in (t_method, t_policy, t_energy, t_rank, t_rho, t_k, t_full, t_sparse, t_epochs, t_lr, t_bs,
                     t_maxlen, t_seed):
            comp.input(mark_custom, None, t_preset, api_visibility="private")

        @safe(4, 0)
        def start_training(kind, base_model, data, language, name, method, rank_policy, energy, rank, residual_share,
                           k_percent, full_steps, sparse_steps, epochs, lr, batch_size, max_length, seed,
                           text_column, pair_column, label_column, preset, k_exact_value):
            """Validate the settings and the data, then queue a CLI training process. Returns
            (message, run id, progress, shown-run dropdown)."""
            from deftx_engine.data import load_corpus, load_task_data
            from deftx_engine.train import TrainConfig

            if kind not in ("language", "task"):
                raise DeftxError("choose the kind of SFT: language or task")
            data = (data or "").strip()
            if not data:
                raise DeftxError("no training data: check a file in the Data tab first")
            if not data.startswith("hub:"):
                data = str(studio.check_path(data))
            k_percent = _number(k_percent, "k")
            if k_exact_value and abs(k_percent - float(k_exact_value[0])) < 1e-9:
                k = int(k_exact_value[1])
            else:
                k = k_percent / 100.0
                if not 0 < k < 1:
                    raise DeftxError(f"k must be between 0 and 100 %, got {k_percent}")
            full_steps = _number(full_steps, "phase-1 steps", integer=True, minimum=0, default=0)
            sparse_steps = _number(sparse_steps, "phase-2 steps", integer=True, minimum=0, default=0)
            epochs = _number(epochs, "epochs per phase", default=1.0)
            lines_limit, steps_limit = max_lines(), max_steps()
            values = dict(data=data, base_model=(base_model or "").strip() or "minilm",
                          language=(language or "").strip(), method=method, rank_policy=rank_policy,
                          energy=_number(energy, "τ"), rank=_number(rank, "r", integer=True),
                          residual_share=_number(residual_share, "ρ"), k=k,
                          full_steps=full_steps, sparse_steps=sparse_steps, lr=_number(lr, "learning rate"),
                          batch_size=_number(batch_size, "batch size", integer=True, minimum=1),
                          max_length=_number(max_length, "max tokens", integer=True, minimum=1),
                          seed=_number(seed, "seed", integer=True, minimum=0, default=0),
                          text_column=(text_column or "").strip() or None,
                          pair_column=(pair_column or "").strip() or None,
                          label_column=(label_column or "").strip() or "label", max_lines=lines_limit)
            if not full_steps or not sparse_steps:
                if epochs <= 0:
                    raise DeftxError(f"epochs per phase must be > 0 when the steps are 0, got {epochs:g}")
            if not full_steps:
                values["full_epochs"] = epochs
            if not sparse_steps:
                values["sparse_epochs"] = epochs
            if preset and preset != CUSTOM:
                p = engine_presets.preset(preset, kind)
                values.update({k_: p[k_] for k_ in ("save_steps", "logging_steps") if k_ in p})
            cfg = TrainConfig(kind=kind, **values)  # ConfigError -> inline message
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
                per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
                for what, steps, ep in (("phase 1", full_steps, cfg.full_epochs),
                                        ("phase 2", sparse_steps, cfg.sparse_epochs)):
                    need = steps or max(1, math.ceil(per_epoch * ep))
                    if need > steps_limit:
                        raise DeftxError(f"{what} would take {need:,} steps ({ep:g} epochs of {per_epoch:,}); this "
                                         f"server allows at most {steps_limit:,} per phase (DEFTX_MAX_STEPS)")
            argv = [sys.executable, "-m", "deftx_engine.cli", f"train-{kind}", "--output-dir", "{run_dir}"]
            for key, val in cfg.to_dict().items():
                if key == "kind" or val is None:
                    continue
                argv += ["--" + key.replace("_", "-"), str(val)]
            name = (name or "").strip() or f"{cfg.language or kind}-{kind}-{cfg.method}"
            config = {**cfg.to_dict(), "preset": preset if preset != CUSTOM else None,
                      "data_shown": studio.display_names.get(data, Path(data).name if not data.startswith("hub:")
                                                             else data)}
            try:
                run_id = studio.registry.submit(name, kind, argv, config=config, max_queued=max_queue())
            except QueueFull as e:
                raise DeftxError(f"the queue is full: {e} (DEFTX_MAX_QUEUE); try again when a run has "
                                 "finished, or cancel one of yours") from None
            for _ in range(20):  # the scheduler thread starts it within a poll if a slot is free
                row = studio.registry.get(run_id)
                if row["state"] != "queued":
                    break
                time.sleep(0.05)
            pos = studio.registry.queue_position(run_id)
            what = "started" if row["state"] == "running" else (f"queued (#{pos})" if pos else "queued")
            choices = _choices(studio.registry.list())
            return (_ok(f"Run **{html.escape(name)}** {what}. Progress appears on the right."), run_id,
                    progress_html(studio, row), gr.update(choices=choices, value=run_id))

        t_run_id = gr.Textbox(visible=False)
        train_inputs = [t_kind, t_base, t_data, t_lang, t_name, t_method, t_policy, t_energy, t_rank, t_rho, t_k,
                        t_full, t_sparse, t_epochs, t_lr, t_bs, t_maxlen, t_seed, t_textcol, t_paircol, t_labelcol,
                        t_preset, k_exact]
        t_start.click(start_training, train_inputs, [t_status, t_run_id, t_progress, t_watch],
                      api_name="start_training", concurrency_limit=2)

        @safe(2, 0)
        def cancel_run(run_id):
            """Cancel a queued or running run; returns (message, progress)."""
            if not run_id:
                raise DeftxError("no run selected")
            row = studio.registry.get(run_id)
            if row is None:
                raise DeftxError(f"unknown run {run_id!r}")
            state = studio.registry.cancel(run_id)
            row = studio.registry.get(run_id)
            if state == "cancelled":
                msg = _ok(f"Run **{html.escape(row['name'])}** cancelled before it started.")
            elif state == "running":
                msg = _ok(f"Stopping **{html.escape(row['name'])}**: it saves a checkpoint and stops within seconds.")
            else:
                msg = f"Run **{html.escape(row['name'])}** is already {state}."
            return msg, progress_html(studio, row)

        t_cancel.click(cancel_run, t_watch, [t_status, t_progress], api_name="cancel_run")

        @safe(2, 0)
        def resume_run(run_id):
            """Continue an interrupted, cancelled or failed run from its last checkpoint: the same run (id and
            folder) is queued again with ``--resume``. Returns (message, progress)."""
            if not run_id:
                raise DeftxError("no run selected")
            try:
                row = studio.registry.resume(run_id, max_queued=max_queue())
            except KeyError:
                raise DeftxError(f"unknown run {run_id!r}") from None
            except ValueError as e:
                raise DeftxError(str(e)) from None
            except QueueFull as e:
                raise DeftxError(f"the queue is full: {e} (DEFTX_MAX_QUEUE); try again later") from None
            for _ in range(20):  # the scheduler starts it within a poll if a slot is free
                if row["state"] != "queued":
                    break
                time.sleep(0.05)
                row = studio.registry.get(run_id)
            pos = studio.registry.queue_position(run_id)
            what = "resumed" if row["state"] == "running" else (f"queued to resume (#{pos})" if pos else "queued")
            return (_ok(f"Run **{html.escape(row['name'])}** {what}: it continues from its last checkpoint."),
                    progress_html(studio, row))

        t_resume.click(resume_run, t_watch, [t_status, t_progress], api_name="resume_run")

        def status_of(run_id, sig):
            """Progress of one run: (progress html, loss figure, log tail, status dict, signature).
            Unchanged outputs are skipped, so polling is cheap."""
            row = studio.registry.get(run_id) if run_id else None
            if row is None:
                new_sig = "none"
                if sig == new_sig:
                    return (gr.skip(),) * 5
                return progress_html(studio, None), None, "", {}, new_sig
            rd = RunDir(row["run_dir"])
            st = rd.status() if row["kind"] in ("language", "task") else {}
            try:
                msize = rd.metrics_file.stat().st_size
            except OSError:
                msize = 0
            try:
                lsize = rd.log_file.stat().st_size
            except OSError:
                lsize = 0
            new_sig = json.dumps([run_id, row["state"], row["step"], row["message"], st.get("updated"), msize, lsize,
                                  int(time.time() // 10) if row["state"] in ("running", "queued") else 0])
            if new_sig == sig:
                return (gr.skip(),) * 5
            old = json.loads(sig) if sig and sig.startswith("[") else [None] * 7
            if old[0] == run_id and old[5] == msize:
                fig = gr.skip()
            else:
                from deftx_engine.plots import loss_figure

                metrics = rd.metrics()
                fig = loss_figure(metrics) if metrics else None
            log_text = rd.log_tail(30) if lsize else ""
            if row["state"] == "failed" and not log_text:
                log_text = row["message"]
            details = {"run": row["id"], "name": row["name"], "kind": row["kind"], "state": row["state"],
                       "phase": st.get("phase") or row["phase"], "step": st.get("step", row["step"]),
                       "total_steps": st.get("total_steps", row["total_steps"]), "loss": st.get("loss"),
                       "eta_seconds": st.get("eta_seconds"), "message": studio.pretty(row["message"] or ""),
                       "vector": row["vector_dir"] if row["state"] == "done" else None,
                       "queue_position": studio.registry.queue_position(row["id"])}
            return progress_html(studio, row), fig, studio.pretty(log_text), details, new_sig

        status_outputs = [t_progress, t_loss, t_log, t_details, watch_sig]
        t_watch.change(status_of, [t_watch, gr.State("")], status_outputs, api_visibility="private",
                       show_progress="hidden")

        def run_status(run_id):
            """Status of one run as a dict: state, phase, step, total_steps, loss, eta_seconds, message, vector."""
            return status_of(run_id, "")[3]

        gr.Button(visible=False).click(run_status, t_run_id, t_details, api_name="run_status")

        def list_runs():
            """All runs in the registry, newest first (a table)."""
            return runs_table(studio)

        r_refresh.click(list_runs, None, r_table, api_name="list_runs")

        def poll(run_id, sig, rsig):
            """Timer tick: the shown run's progress and, when the set of runs changed, the tables/lists."""
            out = list(status_of(run_id, sig))
            rows = studio.registry.list()
            new_rsig = json.dumps([(r["id"], r["state"], r["step"], r["message"]) for r in rows])
            if new_rsig == rsig:
                return (*out, gr.skip(), gr.skip(), gr.skip())
            watch = gr.update(choices=_choices(rows))
            if not run_id and rows:
                watch = gr.update(choices=_choices(rows), value=rows[0]["id"])
            return (*out, runs_table(studio), watch, new_rsig)

        timer.tick(poll, [t_watch, watch_sig, runs_sig], status_outputs + [r_table, t_watch, runs_sig],
                   api_visibility="private", show_progress="hidden", queue=False)

        # ------------------------------------------------------------------ Analyze events
        def vector_lists(a_cur, b_cur, t_cur, l_cur, h_cur, l_touched=False):
            """Choices (and sensible defaults) of every vector picker, from the registry."""
            vecs = studio.vector_runs()
            allc = _choices(vecs)
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
            return (gr.update(choices=allc, value=a_val), gr.update(choices=[("none", "")] + allc, value=b_val or ""),
                    gr.update(choices=_choices(tasks), value=t_val),
                    gr.update(choices=[("none", "")] + _choices(langs), value=l_val),
                    gr.update(choices=allc, value=h_cur if h_cur in ids else (ids[0] if ids else None)),
                    hint, p_hint)

        lang_touched = gr.State(False)  # the user picked a language vector (or none) themselves
        p_lang.input(lambda: True, None, lang_touched, api_visibility="private")
        list_outputs = [a_run, a_other, p_task, p_lang, h_run]
        list_inputs = list_outputs + [lang_touched]
        list_outputs_all = list_outputs + [a_status, p_status]
        for tab in (tab_predict, tab_hub):
            tab.select(vector_lists, list_inputs, list_outputs_all, api_visibility="private")
        analyze_select = tab_analyze.select(vector_lists, list_inputs, list_outputs_all, api_visibility="private")

        def _spectra(run_id) -> dict:
            row = studio.registry.get(run_id) if run_id else None
            if row is None or row["kind"] not in ("language", "task") or row["config"].get("source"):
                return {}
            return read_json(RunDir(row["run_dir"]).spectra_file, {}) or {}

        def _default_matrix(records: dict) -> str | None:
            names = list(records)
            return next((n for n in names if ".0.attention.self.query" in n), next(
                (n for n in names if "query" in n or "attn" in n), names[0] if names else None))

        @safe(6, 0)
        def spectrum(run_id, matrix):
            """SVD spectrum of one matrix of a run's phase-1 delta; returns (message, figure)."""
            from deftx_engine.plots import spectrum_figure

            records = _spectra(run_id)
            if not records:
                return ("No spectra for this vector (LT-SFT runs and pulled vectors are not denoised).", None,
                        *[gr.skip()] * 4)
            matrix = matrix if matrix in records else _default_matrix(records)
            return "", spectrum_figure(records[matrix], f"Spectrum: {matrix}"), *[gr.skip()] * 4

        @safe(6, 0)
        def analyze(run_id, matrix, other_id):
            """Summary, matrix list, SVD spectrum, per-layer mask density and overlap with another vector.
            Returns (message, summary, matrix dropdown, spectrum, density, overlap, denoising table)."""
            import pandas as pd

            from deftx_engine.masks import overlap
            from deftx_engine.plots import density_heatmap, overlap_heatmap, spectrum_figure
            from deftx_engine.report import spectra_summary, vector_summary

            vdir = studio.run_vector_dir(run_id, "vector")
            vec = studio.vector(vdir)
            s = vector_summary(vec)
            row = studio.registry.get(run_id)
            lines = [f"**{html.escape(row['name'])}** — {s['kind']} vector"
                     + (f" ({html.escape(s['language'])})" if s["language"] else "")
                     + f", method {s['method']}, base model `{s['base_model']}`",
                     f"- entries: **{s['nnz']:,}**"
                     + (f" ({s['density_of_maskable']:.2%} of the maskable parameters)"
                        if s["density_of_maskable"] else ""),
                     f"- heads stored whole: {len(s['heads'])} tensors"]
            if s["denoise"]:
                d = s["denoise"]
                pol = f"energy τ = {d['energy']}" if d["rank_policy"] == "energy" else f"fixed rank r = {d['rank']}"
                lines.append(f"- denoising: {pol}, residual share ρ = {d['residual_share']}")
            records = _spectra(run_id)
            table = None
            spec_fig = None
            mat_update = gr.update(choices=[], value=None)
            if records:
                summ = spectra_summary(row["run_dir"])
                table = pd.DataFrame([{"matrix": n, "shape": "×".join(map(str, r["shape"])), "rank": r["rank"],
                                       "energy kept": round(r["energy_retained"], 4),
                                       "residual entries kept": r["residual_kept"],
                                       "σ max": round(r["sigma_max"], 5)} for n, r in summ.items()])
                ranks = [r["rank"] for r in summ.values()]
                lines.append(f"- SVD: {len(ranks)} matrices, median rank {sorted(ranks)[len(ranks) // 2]}, "
                             f"range {min(ranks)}–{max(ranks)}")
                matrix = matrix if matrix in records else _default_matrix(records)
                mat_update = gr.update(choices=list(records), value=matrix)
                spec_fig = spectrum_figure(records[matrix], f"Spectrum: {matrix}")
            density = density_heatmap(vec.mask(), vec.shapes, f"Mask density: {row['name']}")
            ov_fig = None
            if other_id and other_id != run_id:
                other = studio.vector(studio.run_vector_dir(other_id, "vector to compare with"))
                orow = studio.registry.get(other_id)
                if other.meta.base_fingerprint != vec.meta.base_fingerprint:
                    raise DeftxError(f"{row['name']} and {orow['name']} were made for different base models "
                                     f"({vec.meta.base_model} vs {other.meta.base_model}); their masks cannot be "
                                     "compared")
                o = overlap(vec.mask(), other.mask())
                ov_fig = overlap_heatmap(o, f"{row['name']} (A) vs {orow['name']} (B)")
                ov = o["overall"]
                lines.append(f"- overlap with **{html.escape(orow['name'])}**: {ov['shared']:,} shared entries, "
                             f"Jaccard {ov['jaccard']:.3f} ({ov['share_of_a']:.1%} of A, {ov['share_of_b']:.1%} of B)")
            return "", "\n".join(lines), mat_update, spec_fig, density, ov_fig, table

        analyze_outputs = [a_status, a_summary, a_matrix, a_spectrum, a_density, a_overlap, a_table]
        a_btn.click(analyze, [a_run, a_matrix, a_other], analyze_outputs, api_name="analyze")

        def auto_analyze(run_id, matrix, other_id):
            if not run_id:
                return (gr.skip(),) * 7
            return analyze(run_id, matrix, other_id)

        analyze_select.then(auto_analyze, [a_run, a_matrix, a_other], analyze_outputs, api_visibility="private")
        for comp in (a_run, a_other):
            comp.input(auto_analyze, [a_run, a_matrix, a_other], analyze_outputs, api_visibility="private")
        a_matrix.input(spectrum, [a_run, a_matrix],
                       [a_status, a_spectrum, a_summary, a_density, a_overlap, a_table], api_name="spectrum")

        # ------------------------------------------------------------------ Predict events
        @safe(2, 0)
        def predict(task_run, language_run, text, pair):
            """Label probabilities of one text (pair) under θ0 + task (+ language); returns (message, figure)."""
            from deftx_engine.evaluate import predict_proba
            from deftx_engine.plots import probabilities_figure

            text = (text or "").strip()
            if not text:
                raise DeftxError("type a text to classify")
            t0 = time.perf_counter()
            (model, tok, names), cached = studio.composed(studio.run_vector_dir(task_run, "task vector"),
                                                          studio.run_vector_dir(language_run, "language vector")
                                                          if language_run else None)
            pair = (pair or "").strip()
            probs = predict_proba(model, tok, [text], [pair] if pair else None)[0].tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            ms = (time.perf_counter() - t0) * 1000
            note = "" if cached else " (composed model built and cached)"
            return (f"**{html.escape(names[best])}** ({probs[best]:.1%}) · {ms:.0f} ms{note}",
                    probabilities_figure(names, probs))

        p_btn.click(predict, [p_task, p_lang, p_text, p_pair], [p_status, p_plot], api_name="predict")
        p_text.submit(predict, [p_task, p_lang, p_text, p_pair], [p_status, p_plot], api_visibility="private")

        @safe(2, 0)
        def predict_file(task_run, language_run, file, spec, text_column, pair_column):
            """Predict every row of a file; returns (message, CSV path)."""
            import csv

            from deftx_engine.data import load_corpus, load_task_data
            from deftx_engine.evaluate import predict_proba

            source, shown = studio.resolve_source(file, spec)
            (model, tok, names), _ = studio.composed(studio.run_vector_dir(task_run, "task vector"),
                                                     studio.run_vector_dir(language_run, "language vector")
                                                     if language_run else None)
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
            with open(out, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["text"] + (["second_text"] if pairs else []) + ["prediction"] + [f"p_{n}" for n in names])
                for i, row in enumerate(probs):
                    best = max(range(len(row)), key=row.__getitem__)
                    w.writerow([texts[i]] + ([pairs[i]] if pairs else []) + [names[best]] + [f"{p:.4f}" for p in row])
            return (_ok(f"{len(texts):,} rows of **{html.escape(shown)}** predicted: download the CSV below."),
                    gr.update(value=str(out), visible=True))

        p_batch.click(predict_file, [p_task, p_lang, p_file, p_spec, d_text, d_pair], [p_fstatus, p_csv],
                      api_name="predict_file")

        @safe(2, 0)
        def evaluate_file(task_run, language_run, file, spec, text_column, pair_column, label_column):
            """Macro-F1, accuracy and confusion matrix on a labelled file; returns (message, figure)."""
            from deftx_engine.data import load_task_data
            from deftx_engine.evaluate import evaluate_task_data
            from deftx_engine.plots import confusion_figure

            source, shown = studio.resolve_source(file, spec)
            (model, tok, names), _ = studio.composed(studio.run_vector_dir(task_run, "task vector"),
                                                     studio.run_vector_dir(language_run, "language vector")
                                                     if language_run else None)
            td = load_task_data(source, text_column=(text_column or "").strip() or None,
                                pair_column=(pair_column or "").strip() or None,
                                label_column=(label_column or "").strip() or "label", label_names=names,
                                max_rows=max_lines())
            m = evaluate_task_data(model, tok, td)
            key = Path(shown).name + (" (task + language vector)" if language_run else " (task vector alone)")
            summary = {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4), "n": m["n"]}
            for rid in filter(None, (task_run, language_run)):  # shown in the model card when pushed
                row = studio.registry.get(rid)
                studio.registry.update_config(rid, metrics={**(row["config"].get("metrics") or {}), key: summary})
            f1 = ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in m["f1"].items())
            return (_ok(f"**{html.escape(shown)}** ({m['n']:,} examples): macro-F1 **{m['macro_f1']:.3f}**, "
                        f"accuracy **{m['accuracy']:.3f}** · F1 per label: {f1}"), confusion_figure(m))

        p_eval.click(evaluate_file, [p_task, p_lang, p_file, p_spec, d_text, d_pair, d_label], [p_fstatus, p_conf],
                     api_name="evaluate")

        # ------------------------------------------------------------------ Hub events
        @safe(2, 0, on_error={1: ""})
        def push(run_id, repo_id, private, token, oauth_token: gr.OAuthToken | None = None):
            """Upload a vector with its model card. The token (field, Space login or HF_TOKEN) is used for this
            call only. Returns (message, cleared token field)."""
            from deftx_engine.hub import push_vector

            vdir = studio.run_vector_dir(run_id, "vector")
            repo_id = (repo_id or "").strip()
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
                raise DeftxError("give the repository as owner/name, e.g. your-name/deftx-id-language")
            tok = (token or "").strip() or (oauth_token.token if oauth_token is not None else None) or None
            if tok is None and not os.environ.get("HF_TOKEN", "").strip():
                raise DeftxError("pushing needs a Hugging Face token: paste one (write access) in the token field"
                                 + (", sign in," if oauth else "") + " or set the HF_TOKEN environment variable")
            row = studio.registry.get(run_id)
            metrics = row["config"].get("metrics") if row else None
            try:
                url = push_vector(vdir, repo_id, token=tok, private=bool(private), metrics=metrics)
            except Exception as e:  # noqa: BLE001 -- whatever it says, without the token (even a non-hf_ one)
                raise _scrubbed(e, tok) from None
            return _ok(f"Pushed to [{html.escape(repo_id)}]({html.escape(scrub(str(url), tok))})."), ""

        h_push.click(push, [h_run, h_repo, h_private, h_token], [h_pstatus, h_token], api_name="push")

        @safe(2, 0, on_error={1: ""})
        def pull(source, base_model, kind, language, token="", oauth_token: gr.OAuthToken | None = None):
            """Download (or copy) a vector into DEFTX_HOME/vectors and list it as a finished run. A private repo
            needs a token (the token field, the Space login or HF_TOKEN). Returns (message, cleared token field)."""
            from deftx_engine.hub import pull_vector

            source = (source or "").strip()
            if not source:
                raise DeftxError("give a Hub repository id (owner/name) or a folder")
            local = Path(source).expanduser()
            if local.is_absolute() or source.startswith((".", "~")) or local.exists():
                source = str(studio.check_path(source))
            elif not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
                raise DeftxError(f"{source!r} is neither an existing folder nor a Hub repository id (owner/name)")
            run_id = studio.registry.new_id()
            dest = studio.registry.vectors_root / run_id
            tok = (token or "").strip() or (oauth_token.token if oauth_token is not None else None) or None
            try:
                pull_vector(source, dest, token=tok, base_model=(base_model or "").strip(),
                            kind=kind or None, language=(language or "").strip() or None)
            except Exception as e:  # noqa: BLE001 -- whatever it says, without the token (even a non-hf_ one)
                raise _scrubbed(e, tok) from None
            vec = studio.vector(dest)
            m = vec.meta
            if Path(source).is_dir():
                folder = Path(source)
                name = folder.parent.name if folder.name == "vector" else folder.name  # a run folder's vector/
            else:
                name = source.split("/")[-1]
            cfg = {"source": source, "base_model": m.base_model, "language": m.language, "method": m.method,
                   "k": m.k, "denoise": m.denoise, **({"metrics": m.extra["metrics"]} if "metrics" in m.extra else {})}
            studio.registry.add_vector(name, m.kind, dest, config=cfg, run_id=run_id,
                                       message=f"pulled from {source}")
            return _ok(f"Pulled **{html.escape(name)}**: a {m.kind} vector"
                       + (f" ({html.escape(m.language)})" if m.language else "")
                       + f" for `{html.escape(m.base_model)}`, {m.k:,} entries. It is listed in the Runs tab."), ""

        h_pull.click(pull, [h_src, h_base, h_kind, h_lang, h_token], [h_lstatus, h_token], api_name="pull")

        # ------------------------------------------------------------------ page load
        def on_load():
            rows = studio.registry.list()
            active = [r for r in rows if r["state"] in ("running", "queued")]
            value = active[0]["id"] if active else (rows[0]["id"] if rows else None)
            return gr.update(choices=_choices(rows), value=value), runs_table(studio)

        demo.load(on_load, None, [t_watch, r_table], api_visibility="private").then(
            validate_data, [d_role, d_file, d_spec, d_text, d_pair, d_label], [d_status, d_preview, d_chart, d_source],
            api_visibility="private").then(
            vector_lists, list_inputs, list_outputs_all, api_visibility="private")

    demo.queue(default_concurrency_limit=4)
    return demo
