"""The state of one app: the home folder, the job registry, and the caches of vectors and composed models.

``Studio(home)`` opens them without starting anything; ``Studio.start()`` starts the services (reaping runs
whose process is gone, the scheduler thread, the background warm-up). ``app.py`` calls it; tests that only
read files or call handlers do not have to.
"""
from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from deftx_engine.constants import KINDS
from deftx_engine.errors import ConfigError, DeftxError
from deftx_engine.hub.secrets import scrub
from deftx_engine.method.vector_meta import heldout_line, meta_from_config, read_json
from deftx_engine.training.runs import RunDir

from . import render
from .files import FilePolicy
from .jobs import JobRegistry
from .settings import app_threads, check_settings, default_home, model_cache_size, warmup_enabled

log = logging.getLogger(__name__)
VECTOR_CACHE = 6  # loaded vectors kept in memory
VECTOR_CONFIG = "sft_config.json"  # deftx_engine.method.vectors.CONFIG_FILE, named here so the page needs no torch
MAX_META_BYTES = 2 ** 20  # a vector config larger than this is not read for the progress card
_threads_set = False


class Studio(FilePolicy):
    """Shared state of one app: home folder, job registry, caches of vectors and composed models."""

    def __init__(self, home: str | Path | None = None):
        home = Path(home).expanduser().resolve() if home else default_home()
        check_settings()  # a bad DEFTX_* value stops here, with a message naming it
        try:
            home.mkdir(parents=True, exist_ok=True)
            super().__init__(home)
            self.outputs = home / "outputs"
            self.outputs.mkdir(parents=True, exist_ok=True)
            self.registry = JobRegistry(home)
        except (OSError, sqlite3.Error) as e:  # e.g. DEFTX_HOME=/proc/x: one line at start, not a traceback
            raise ConfigError(f"DEFTX_HOME {home} cannot hold the app's data "
                              f"({getattr(e, 'strerror', None) or e}); set DEFTX_HOME to a writable folder") from None
        self.scoring: dict[str, threading.Event] = {}  # browser session -> its file scoring's stop flag
        self._models: OrderedDict[tuple, tuple] = OrderedDict()
        self._model_lock = threading.Lock()
        self._vectors: OrderedDict[tuple, Any] = OrderedDict()
        self._vector_lock = threading.Lock()
        self.model_cache_size = model_cache_size()
        self._gallery = None  # the last gallery asked of the Hub (Studio.gallery)

    def start(self) -> Studio:
        """Start the services: mark runs whose process is gone, run the scheduler, warm up in the background."""
        changed = self.registry.recover()
        if changed:
            log.info("marked %d run(s) whose process is gone: %s", len(changed), ", ".join(changed))
        self.registry.start()
        if warmup_enabled():
            threading.Thread(target=warm_up, name="deftx-warmup", daemon=True).start()
        return self

    # ---- messages -------------------------------------------------------------------------------------
    def pretty(self, msg: str) -> str:
        """A message for the page: stored upload paths replaced by the names the user uploaded, DEFTX_HOME, the
        examples and DEFTX_DATA_DIRS folders by their names (``shown_path``), and anything shaped like a token
        removed. (Engine errors name settings in the app's words
        already: ``components.error_text``.)"""
        uploads = str(self.uploads)

        def shown(m: re.Match) -> str:
            return self.display_names.get(m.group(0), m.group(1))

        msg = re.sub(re.escape(uploads) + r"/([0-9a-f]{12}-[A-Za-z0-9._-]*)", shown, msg)
        for root, name in sorted(self._shown_roots(), key=lambda r: -len(str(r[0]))):  # the deepest folder first
            msg = msg.replace(str(root), name)
        return scrub(msg)

    def progress(self, row: dict | None) -> str:
        """The progress card of a registry row (or of no run), and below it every other run running or queued,
        so queuing a run never hides the one running."""
        active = self.registry.list(states=["running", "queued"])
        positions = {r["id"]: self.registry.queue_position(r["id"]) for r in active if r["state"] == "queued"}
        queue = render.active_runs_html(active, positions, row["id"] if row else None)
        if row is None:
            return render.progress_html(None, {}, None, "") + queue
        status = RunDir(row["run_dir"]).status() if row["kind"] in KINDS else {}
        return render.progress_html(row, status, positions.get(row["id"]), self.pretty(row["message"] or ""),
                                    self.evidence(row)) + queue

    def evidence(self, row: dict) -> tuple[bool | None, str] | None:
        """(lowered, sentence): whether a done language run's vector lowered its held-out masked-token loss, and
        ``deftx_engine.method.vector_meta.heldout_line``; None for other runs."""
        held = self.heldout(row)
        if not held:
            return None

        line = heldout_line(held)
        return (render.heldout_lowered(held), line) if line else None

    def heldout(self, row: dict) -> dict | None:
        """A done language run's held-out masked-token scores (``heldout_mlm`` in its vector's metadata), read from
        the vector's JSON config only; None for other runs, older vectors or an unreadable config."""
        if row["kind"] != "language" or row["state"] != "done" or not row["vector_dir"]:
            return None
        path = Path(row["vector_dir"]) / VECTOR_CONFIG
        try:
            if path.stat().st_size > MAX_META_BYTES:
                return None
            return meta_from_config(read_json(path), path)[0].heldout_mlm
        except (OSError, DeftxError):
            return None

    def runs_table(self):
        """The Runs tab's table of every run."""
        rows = self.registry.list()
        positions = {r["id"]: self.registry.queue_position(r["id"]) for r in rows if r["state"] == "queued"}
        shown = [{**r, "vector_dir": self.shown_path(r["vector_dir"] or ""), "message": self.pretty(r["message"] or ""),
                  "heldout": self.heldout(r),
                  "config": {k: self.shown_path(v) if isinstance(v, str) else v for k, v in r["config"].items()}}
                 for r in rows]
        return render.runs_table(shown, positions)  # no absolute server path in the table

    # ---- vectors and models ---------------------------------------------------------------------------
    def register_pulled(self, dest: Path, run_id: str, name: str, source: str, *, local: bool = False):
        """List the vector just pulled into ``dest`` as the finished run ``run_id`` named ``name``; returns its
        metadata. One naming a base model the app may not load is removed, not listed (one from the Hub may name
        none of this machine's folders: ``local`` is whether ``source`` is a folder here)."""
        try:
            m = self.vector(dest).meta
            if m.base_model:
                self.check_base_model(m.base_model, "the vector's base model", local=local, reachable=False)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        shown = self.shown_path(source)
        cfg = {"source": shown, "base_model": m.base_model, "language": m.language, "method": m.method,
               "k": m.k, "denoise": m.denoise, **({"metrics": m.metrics} if m.metrics is not None else {})}
        self.registry.add_vector(name, m.kind, dest, config=cfg, run_id=run_id, message=f"pulled from {shown}")
        return m

    def vector(self, path: str | Path):
        from deftx_engine.method.vectors import CONFIG_FILE, SparseVector

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
            while len(self._vectors) > VECTOR_CACHE:
                self._vectors.popitem(last=False)
        return vec

    def composed(self, task_dir: str, language_dir: str | None, scale: float = 1.0, merge: str = "sum"):
        """The composed classifier for (task, language, the language vector's scale, sum or TIES), built once and
        cached (LRU). TIES merges at its own lambda, so ``scale`` applies to a sum only."""
        from deftx_engine.outputs.inference import composed_model

        if not language_dir:
            scale, merge = 1.0, "sum"
        key = (task_dir, language_dir or "", float(scale), merge)
        torch_threads()
        with self._model_lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], True
            vectors = [self.vector(task_dir)] + ([self.vector(language_dir)] if language_dir else [])
            for vec in vectors:
                if not vec.meta.base_model:
                    raise DeftxError(f"the {vec.meta.kind} vector names no base model; pull it again with the "
                                     "Base model field filled in")
                self.check_base_model(vec.meta.base_model, f"the {vec.meta.kind} vector's base model")
            try:
                if merge == "ties":
                    from deftx_engine.method.merge import ties_merge

                    model, tok = composed_model(ties_merge(vectors))
                else:
                    model, tok = composed_model(vectors[0], vectors[1:], [1.0] + [scale] * len(vectors[1:]))
            except OSError as e:  # a Hub model that cannot be downloaded: one line, no server path
                raise DeftxError(f"base model {vectors[0].meta.base_model!r} could not be loaded "
                                 f"({type(e).__name__}); is the Hugging Face Hub reachable from this server?") from None
            names = [model.config.id2label[i] for i in range(model.config.num_labels)]
            self._models[key] = (model, tok, names)
            while len(self._models) > self.model_cache_size:
                self._models.popitem(last=False)
            return self._models[key], False

    def gallery(self, refresh: bool = False):
        """The gallery of released and pushed vectors (``deftx_engine.hub.gallery.load_gallery``, from the Hub within
        its timeout, else the shipped catalogue): asked anew when ``refresh`` or never asked, so filtering it or
        picking from it asks the Hub nothing."""
        from deftx_engine.hub.gallery import load_gallery

        if refresh or self._gallery is None:
            self._gallery = load_gallery()
        return self._gallery

    # ---- runs -----------------------------------------------------------------------------------------
    def vector_runs(self, kind: str | None = None) -> list[dict]:
        return [r for r in self.registry.list(states=["done"], kind=kind)
                if r["vector_dir"] and Path(r["vector_dir"]).is_dir()]

    def run_vector_dir(self, run_id: str | None, what: str = "run") -> str:
        if not run_id:
            raise DeftxError(f"choose a {what} first (train one in the Train tab or pull one in the Hub tab)")
        row = self.registry.get(run_id)
        if row is None:
            raise DeftxError(f"unknown run {str(run_id)[:80]!r}; refresh the page")
        if row["state"] != "done" or not row["vector_dir"] or not Path(row["vector_dir"]).is_dir():
            raise DeftxError(f"run {row['name']} ({row['state']}) has no vector yet")
        return row["vector_dir"]


def torch_threads() -> None:
    """Inference in the app uses few intra-op threads (DEFTX_APP_THREADS, default 1): training jobs run in
    their own processes on the same cores, and a one-sentence forward pass is slower, not faster, when its
    threads wait for busy cores (measured: 46 ms with 2 threads vs 1.7 ms with 1 on a loaded 2-core box)."""
    global _threads_set
    if not _threads_set:
        import torch

        torch.set_num_threads(app_threads())
        _threads_set = True


def warm_up() -> None:
    """Import torch/transformers and build one Plotly figure of each kind in the background, so the first
    Start, prediction and chart do not pay for it (the first Plotly figure alone takes ~0.3 s)."""
    time.sleep(2)
    try:
        import deftx_engine.outputs.inference  # noqa: F401 -- torch + transformers
        import deftx_engine.training.train  # noqa: F401
        from deftx_engine.outputs import plots

        torch_threads()
        plots.probabilities_figure(["a", "b"], [0.5, 0.5]).to_json()
        plots.loss_figure([{"phase": "full", "step": 1, "loss": 1.0}]).to_json()
        render.label_bar({"a": 1}, "warm-up").to_json()
    except Exception:  # noqa: BLE001
        log.exception("warm-up failed")
