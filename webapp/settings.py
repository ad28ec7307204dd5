"""Every setting of the web app read from the environment (the ``DEFTX_*`` variables, README "Web app") and the
launch settings ``app.py`` uses. Limits are read per request, so a bad value is reported inline, and once at
start (``check_settings``), so it stops the app with one line naming the variable.
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import importlib.util
import os
import threading
import time
from pathlib import Path

from deftx_engine.errors import ConfigError

from . import REPO

CSS_FILE = Path(__file__).with_name("assets.css")


def env_number(name: str, default: float | None = None, *, integer: bool = True,
               minimum: float | None = None, maximum: float | None = None) -> float | int | None:
    """A numeric setting from the environment (empty or unset: ``default``). A value that is not a number,
    or is outside [``minimum``, ``maximum``], raises ``ConfigError`` naming the variable, so a typo in a
    deployment's settings is reported in one line instead of a traceback (or silently ignored)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        what = "a whole number" if integer else "a number"
        raise ConfigError(f"the environment variable {name} must be {what}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or (minimum is not None and value < minimum):
        raise ConfigError(f"the environment variable {name} must be at least {minimum:g}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"the environment variable {name} must be at most {maximum:g}, got {raw!r}")
    return value


def default_home() -> Path:
    """``$DEFTX_HOME``; else ``/data/deftx`` on a Hugging Face Space with persistent storage (``/data``);
    else ``.deftx`` next to app.py."""
    env = os.environ.get("DEFTX_HOME", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    data = Path("/data")
    if on_space() and data.is_dir() and os.access(data, os.W_OK):
        return data / "deftx"
    return REPO / ".deftx"


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def oauth_enabled() -> bool:
    """"Sign in with Hugging Face" only on a Space with hf_oauth (OAUTH_CLIENT_ID set) and gradio[oauth]
    installed; elsewhere a LoginButton would make Gradio mock OAuth, which needs a logged-in machine."""
    return on_space() and bool(os.environ.get("OAUTH_CLIENT_ID")) and importlib.util.find_spec("authlib") is not None


def default_model() -> str:
    """DEFTX_DEFAULT_MODEL: the base model preselected in the Train tab, used by the cpu-demo preset and the guided
    demo (default: the offline multilingual-e5-small, which transfers English task data to Indonesian)."""
    return os.environ.get("DEFTX_DEFAULT_MODEL", "").strip() or "multilingual-e5-small"


def max_upload_mb() -> float:
    """DEFTX_MAX_UPLOAD_MB (default 50): the largest upload, enforced by Gradio and again when it is stored."""
    return env_number("DEFTX_MAX_UPLOAD_MB", 50.0, integer=False, minimum=1e-6)


SHARED_MAX_LINES = 20_000  # DEFTX_MAX_LINES on a shared deployment: ~2 min of CPU to score such a file


def shared_deployment() -> bool:
    """A deployment others reach: a Space, a login (DEFTX_AUTH), or a server listening beyond this machine."""
    name = os.environ.get("GRADIO_SERVER_NAME", "").strip()
    return on_space() or bool(os.environ.get("DEFTX_AUTH", "").strip()) or name not in ("", "127.0.0.1", "localhost",
                                                                                          "::1")


def max_lines() -> int | None:
    """DEFTX_MAX_LINES (default: no limit; 20,000 on a shared deployment): corpora / task files with more lines
    (rows) are refused, also when predicting or scoring a file."""
    return env_number("DEFTX_MAX_LINES", SHARED_MAX_LINES if shared_deployment() else None, minimum=1)


def max_text_chars() -> int:
    """DEFTX_MAX_TEXT_CHARS (default 10,000): the longest text (and second text) Predict accepts. The model
    reads 128 tokens at most, but the tokenizer's memory grows with the square of a pair's length (a 1 MB
    pair took 19 GB), so longer texts are refused before tokenizing."""
    return env_number("DEFTX_MAX_TEXT_CHARS", 10_000, minimum=1)


def max_score_seconds() -> float:
    """DEFTX_MAX_SCORE_SECONDS (default 600): predicting or scoring a file stops (with a message) after this."""
    return env_number("DEFTX_MAX_SCORE_SECONDS", 600.0, integer=False, minimum=1)


def max_steps() -> int | None:
    """DEFTX_MAX_STEPS (default: no limit): runs with more steps in either phase are refused."""
    return env_number("DEFTX_MAX_STEPS", None, minimum=1)


def max_queue() -> int | None:
    """DEFTX_MAX_QUEUE (default: no limit): Start (and Resume) are refused while this many runs wait."""
    return env_number("DEFTX_MAX_QUEUE", None, minimum=1)


def max_jobs() -> int:
    """DEFTX_MAX_JOBS (default 1): training jobs running at once (read when the registry is made)."""
    return env_number("DEFTX_MAX_JOBS", 1, minimum=1)


def model_cache_size() -> int:
    """DEFTX_MODEL_CACHE (default 2): composed models kept in memory for Predict."""
    return env_number("DEFTX_MODEL_CACHE", 2, minimum=1)


def app_threads() -> int:
    """DEFTX_APP_THREADS (default 1): torch threads for predictions in the app process."""
    return env_number("DEFTX_APP_THREADS", 1, minimum=1)


def warmup_enabled() -> bool:
    """DEFTX_WARMUP (default 1): ``0`` skips importing torch/transformers in the background after start."""
    return os.environ.get("DEFTX_WARMUP", "1") != "0"


def data_dirs() -> list[Path]:
    """DEFTX_DATA_DIRS (``:``-separated): extra folders whose files may be typed as paths."""
    return [Path(p).expanduser().resolve() for p in os.environ.get("DEFTX_DATA_DIRS", "").split(os.pathsep)
            if p.strip()]


def has_env_token() -> bool:
    """HF_TOKEN is set: the Hub calls fall back to it when no token is typed (and no Space login)."""
    return bool(os.environ.get("HF_TOKEN", "").strip())


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level() -> str:
    """DEFTX_LOG_LEVEL (default INFO): the app's log level, one of LOG_LEVELS (any case)."""
    level = os.environ.get("DEFTX_LOG_LEVEL", "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"DEFTX_LOG_LEVEL={os.environ['DEFTX_LOG_LEVEL'][:40]!r} is not a log level; use one of "
                          f"{', '.join(LOG_LEVELS)}")
    return level


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
            "DEFTX_MAX_QUEUE": max_queue(), "DEFTX_MAX_JOBS": max_jobs(), "DEFTX_MAX_TEXT_CHARS": max_text_chars(),
            "DEFTX_MAX_SCORE_SECONDS": max_score_seconds(),
            "DEFTX_AUTH": "set" if auth_from_env() else None}


def server_address() -> tuple[str, int]:
    """GRADIO_SERVER_NAME (default 127.0.0.1; 0.0.0.0 on a Space) and GRADIO_SERVER_PORT (default 7860)."""
    name = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space() else "127.0.0.1")
    return name, env_number("GRADIO_SERVER_PORT", 7860, minimum=1, maximum=65535)


def launch_kwargs(home: str | Path | None = None) -> dict:
    """The launch() settings app.py uses: theme, CSS, upload limit, login (DEFTX_AUTH, throttled per client and per
    user: ``LoginThrottle``), and the only files served: those the app writes for download (DEFTX_HOME/outputs).
    Uploads, run folders, vectors and the registry are never served, and Gradio refuses any other path (and
    symlinks out of outputs/)."""
    import gradio as gr
    from starlette.middleware import Middleware

    home = Path(home) if home else default_home()
    outputs = home / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    return dict(theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate"),
                css=CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.exists() else None,
                allowed_paths=[str(outputs.resolve())], max_file_size=max(1, int(max_upload_mb() * 2 ** 20)),
                show_error=False, app_kwargs={"middleware": [Middleware(ClientAddress)]},
                # no browser-side run history: it would keep what was typed (a Hub token too) in the browser, and
                # its footer link "Runs" reads as this app's Runs tab
                run_history=False, footer_links=["api", "gradio", "settings"],
                auth=LoginThrottle(pairs).login if (pairs := auth_from_env()) else None)


CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("deftx_client", default="")


def client_of(scope: dict) -> str:
    """Where an HTTP request comes from: the peer address; on a Space, whose proxy is the peer of every request,
    the last X-Forwarded-For entry (the one that proxy added: a client cannot forge it)."""
    peer = str((scope.get("client") or ("",))[0])
    if on_space():
        forwarded = [v for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
        last = forwarded[-1].decode("latin-1").split(",")[-1].strip() if forwarded else ""
        if last:
            return last[:100]
    return peer


class ClientAddress:
    """ASGI middleware: each HTTP request's client address in ``CLIENT`` while it is handled, for
    ``LoginThrottle`` (Gradio's login check is given the user name and password only)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = CLIENT.set(client_of(scope))
        try:
            return await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)


class LoginThrottle:
    """Gradio's login check for DEFTX_AUTH, throttled so that guessing is slow and nobody can lock a user out:

    - per client (``CLIENT``): after ``FAILURES`` wrong passwords within ``WINDOW`` seconds, every attempt from that
      client (the right password too) is refused for ``LOCK`` seconds, doubling with each lock that follows
      within ``WINDOW`` up to ``MAX_LOCK``: the source is slowed down, never the account;
    - per user: each wrong password waits ``DELAY`` seconds (without blocking the server), doubling with each
      failure beyond ``FAILURES`` for that user within ``WINDOW``, from any client, up to ``MAX_DELAY``; the right
      password from a client that is not locked is accepted at once, however many guesses others made;
    - a successful login clears the failures of that user and of that client, and the client's lock."""

    FAILURES, WINDOW, LOCK, MAX_LOCK, DELAY, MAX_DELAY = 5, 300.0, 30.0, 900.0, 0.5, 8.0
    TABLE = 10_000  # users / clients remembered: guessed names and forged addresses cannot grow the tables unbounded

    def __init__(self, pairs: list[tuple[str, str]], clock=time.monotonic):
        self.passwords = dict(pairs)
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], list[float]] = {}  # ("user"|"client", name) -> times of failures
        self._locked: dict[str, tuple[float, float]] = {}  # client -> (locked until, length of that lock)

    def check(self, username: str, password: str, client: str = "") -> bool:
        """True for a right password from a client that is not locked; records a failure otherwise."""
        user, client = str(username)[:200], str(client)[:100]
        now = self.clock()
        with self._lock:
            until, _ = self._locked.get(client, (0.0, 0.0))
            if now < until:
                return False
            if user in self.passwords and hmac.compare_digest(str(password).encode(), self.passwords[user].encode()):
                self._failures.pop(("user", user), None)
                self._failures.pop(("client", client), None)
                self._locked.pop(client, None)
                return True
            self._fail(("user", user), now)
            if len(self._fail(("client", client), now)) >= self.FAILURES:
                last_until, last = self._locked.get(client, (0.0, 0.0))
                length = min(self.MAX_LOCK, 2 * last) if last and now - last_until < self.WINDOW else self.LOCK
                self._locked[client] = (now + length, length)
                self._failures.pop(("client", client), None)
            if len(self._locked) > self.TABLE:
                self._locked = {c: v for c, v in self._locked.items() if now - v[0] < self.WINDOW}
            return False

    def _fail(self, key: tuple[str, str], now: float) -> list[float]:
        recent = [t for t in self._failures.pop(key, []) if now - t < self.WINDOW][-self.TABLE:] + [now]
        self._failures[key] = recent  # (re)inserted last: the oldest entries go first
        while len(self._failures) > self.TABLE:
            self._failures.pop(next(iter(self._failures)))
        return recent

    def wait(self, username: str) -> float:
        """Seconds the answer to a wrong password for ``username`` waits."""
        now = self.clock()
        with self._lock:
            n = sum(now - t < self.WINDOW for t in self._failures.get(("user", str(username)[:200]), []))
        return min(self.MAX_DELAY, self.DELAY * 2 ** max(0, n - self.FAILURES))

    async def login(self, username: str, password: str) -> bool:
        """Gradio's ``auth`` callable (a coroutine function, so Gradio awaits it); the client is ``CLIENT``, set by
        ``ClientAddress``."""
        ok = self.check(username, password, CLIENT.get())
        if not ok:
            await asyncio.sleep(self.wait(username))
        return ok
