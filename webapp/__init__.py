"""DeFT-X Studio web app: a thin Gradio layer over ``deftx_engine`` (see README, section "Web app").

- ``webapp.jobs``: the SQLite job registry and the scheduler that runs training as CLI processes;
- ``webapp.ui``: ``build_app(home)`` -> ``gr.Blocks`` with the Data, Train, Runs, Analyze, Predict, Hub tabs.

Importing this package is cheap: Gradio, torch and transformers are imported only by ``webapp.ui`` and
by the handlers that need them.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"


def env_number(name: str, default: float | None = None, *, integer: bool = True,
               minimum: float | None = None) -> float | int | None:
    """A numeric setting from the environment (empty or unset: ``default``). A value that is not a number,
    or is below ``minimum``, raises ``deftx_engine.errors.ConfigError`` naming the variable, so a typo in a
    deployment's settings is reported in one line instead of a traceback (or silently ignored)."""
    from deftx_engine.errors import ConfigError

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
    return value


def default_home() -> Path:
    """``$DEFTX_HOME``; else ``/data/deftx`` on a Hugging Face Space with persistent storage (``/data``);
    else ``.deftx`` next to app.py."""
    env = os.environ.get("DEFTX_HOME", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    data = Path("/data")
    if os.environ.get("SPACE_ID") and data.is_dir() and os.access(data, os.W_OK):
        return data / "deftx"
    return REPO / ".deftx"


def build_app(home: str | Path | None = None):
    from .ui import build_app as _build

    return _build(home)
