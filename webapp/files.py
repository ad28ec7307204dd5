"""The upload and path policy: which files the app reads and how uploads are stored (README, "Security and
limits"). An upload is copied into DEFTX_HOME/uploads under a content hash and a sanitised name; a typed path is
read only inside DEFTX_HOME, the bundled examples or a DEFTX_DATA_DIRS folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from deftx_engine.errors import DeftxError
from deftx_engine.hub.contact import model_unavailable

from . import EXAMPLES
from .settings import data_dirs, default_model, max_upload_mb

OFFLINE_MODELS = ("minilm", "multilingual-e5-small")  # aliases built from PyPI packages (deftx_engine.models.loading)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}|[A-Za-z0-9][\w.-]{0,95}")


def bounded(value: object, what: str, limit: int) -> str:
    """``value`` as a stripped string of at most ``limit`` characters without NUL bytes, else a ``DeftxError``
    naming the field: no field (run name, pull source, repository id) is echoed, logged or stored unbounded."""
    text = "" if value is None else str(value).strip()
    if len(text) > limit:
        raise DeftxError(f"the {what} is {len(text):,} characters long; at most {limit:,} are allowed")
    if "\0" in text:
        raise DeftxError(f"the {what} contains a NUL byte")
    return text


class FilePolicy:
    """The files of one app: where uploads are stored, the folders typed paths may name, and the names the
    user uploaded (shown instead of the stored paths)."""

    MAX_NAMES = 5000  # display names remembered (oldest forgotten first)

    def __init__(self, home: Path):
        self.home = home
        self.uploads = home / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.display_names: OrderedDict[str, str] = OrderedDict()  # stored upload path -> name uploaded
        self._names_lock = threading.Lock()
        self.read_roots = [home.resolve(), EXAMPLES.resolve(), *data_dirs()]

    def _remember_name(self, stored: Path, shown: str) -> None:
        with self._names_lock:
            self.display_names[str(stored)] = shown
            self.display_names.move_to_end(str(stored))
            while len(self.display_names) > self.MAX_NAMES:
                self.display_names.popitem(last=False)

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
            reason = e.strerror or e
            raise DeftxError(f"{shown}: the uploaded file cannot be read ({reason}); upload it again") from None
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

    def _shown_roots(self) -> list[tuple[Path, str]]:
        return [(self.home.resolve(), "DEFTX_HOME"), (EXAMPLES.resolve(), "examples"),
                *((d, "DEFTX_DATA_DIRS") for d in self.read_roots[2:])]

    def shown_path(self, path: str | Path) -> str:
        """A server path as the page shows it: relative to DEFTX_HOME, the examples or a DEFTX_DATA_DIRS folder
        (named by the variable), never absolute; other text (a Hub id, a hub: spec) is returned as is. Every path
        the page holds is in this form, and ``server_path`` turns it back."""
        text = str(path)
        if not text.startswith("/"):
            return text
        for root, name in self._shown_roots():
            try:
                rel = Path(text).relative_to(root)
            except ValueError:
                continue
            return f"{name}/{rel}" if str(rel) != "." else name
        return Path(text).name

    def server_path(self, spec: str) -> str | None:
        """The server path of a path as ``shown_path`` shows it (``examples/x.csv``, ``DEFTX_HOME/uploads/…``,
        ``DEFTX_DATA_DIRS/…``: the first such folder that has it), else None. Not checked: ``check_path`` is."""
        head, _, rest = spec.partition("/")
        roots = [root for root, name in self._shown_roots() if name == head]
        candidates = [root / rest for root in roots]
        return str(next((c for c in candidates if c.exists()), candidates[0])) if candidates else None

    def shown_model(self) -> str:
        """DEFTX_DEFAULT_MODEL as the page shows it (a local folder by ``shown_path``)."""
        return self.shown_path(default_model())

    def check_base_model(self, name: str | None, where: str = "base model", *, local: bool = True,
                         reachable: bool = True) -> str:
        """A base model the app may load: an offline alias (``minilm``, ``multilingual-e5-small``), the
        operator's DEFTX_DEFAULT_MODEL, a Hub id the Hub (or the model cache) has (checked if ``reachable``;
        a pulled vector's is checked when it is used), or (``local``) a model folder inside the folders typed
        paths may name (a vector pulled from the Hub may name none). Errors never say what a refused path
        holds."""
        name = bounded(name, where, 300) or default_model()
        if name == self.shown_model():
            name = default_model()
        if name in OFFLINE_MODELS or name == default_model():
            return name
        name = self.server_path(name) or name
        looks_local = name.startswith(("/", ".", "~", "\\")) or ".." in name or name.count("/") > 1
        if not looks_local and HUB_ID.fullmatch(name) and not Path(name).exists():
            why = model_unavailable(name, ask_hub=True) if reachable else None
            if why:
                raise DeftxError(f"{where} {name!r} cannot be used: {why}. Use {' or '.join(OFFLINE_MODELS)}, or "
                                 "a model folder under DEFTX_DATA_DIRS")
            return name
        if not local:
            raise DeftxError(f"{where} {self._short(name)!r} is not a Hub id: a pulled vector must name "
                             f"{' or '.join(OFFLINE_MODELS)} or a Hub id (owner/name), never a local folder")
        try:
            real = self.check_path(name)
        except DeftxError:
            raise DeftxError(f"{where} {self._short(name)!r}: the app loads only {', '.join(OFFLINE_MODELS)}, Hub "
                             "ids (owner/name) and model folders under DEFTX_DATA_DIRS") from None
        if not (real / "config.json").is_file():
            raise DeftxError(f"{where} {self._short(name)!r} is not a model folder (no config.json)")
        return str(real)

    def check_path(self, spec: str) -> Path:
        """A typed local path (or one as the page shows it: ``shown_path``) must lie in DEFTX_HOME, the bundled
        examples, or a DEFTX_DATA_DIRS folder (after resolving ``..`` and symlinks), and be a regular file or a
        folder (never a FIFO or device, which could block a reader)."""
        shown = self._short(spec)
        if "\0" in spec:
            raise DeftxError(f"{shown}: a path cannot contain a NUL byte")
        if len(spec) > 4096:
            raise DeftxError(f"{shown}: the path is too long")
        spec = self.server_path(spec) or spec
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
