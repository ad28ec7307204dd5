"""Exceptions a user can act on: each names the file, line, field or parameter that is wrong."""
from __future__ import annotations

from collections.abc import Callable


def option(field: str) -> str:
    """The command-line option of a setting (a ``TrainConfig`` field): ``text_column`` -> ``--text-column``."""
    return "--" + field.replace("_", "-")


class _Words(dict):
    """The words a hint template is completed with: ``{set}``/``{Set}`` the verb, any other key a setting."""

    def __init__(self, name: Callable[[str], str], verb: str):
        super().__init__(set=verb, Set=verb.capitalize())
        self.name = name

    def __missing__(self, field: str) -> str:
        return self.name(field)


class DeftxError(Exception):
    """Base class: the message is meant for the user, not a traceback.

    ``field`` is the setting (a ``TrainConfig`` field) the error concerns, as data, so each front end can name
    it its own way. ``hint`` says what to do, as a template: ``{text_column}`` (any setting) becomes that
    front end's name for it and ``{set}`` / ``{Set}`` its verb for giving a value. ``str(error)`` is the
    command line's wording ("Pass --text-column."); the web app renders "Set the Text column." with ``render``.
    """

    def __init__(self, message: str, *, field: str | None = None, hint: str = ""):
        self.message, self.field, self.hint = message, field, hint
        super().__init__(self.render(option, "pass"))

    def render(self, name: Callable[[str], str], verb: str) -> str:
        """The message with the hint in a front end's words: ``name(field)`` names a setting."""
        return f"{self.message} {self.hint.format_map(_Words(name, verb))}" if self.hint else self.message


class DataError(DeftxError, ValueError):
    """A corpus or task file cannot be used (missing, empty, wrong encoding, wrong columns, bad labels)."""


class VectorError(DeftxError, ValueError):
    """A sparse vector folder is missing, corrupted, or does not fit the model it is applied to."""


class ConfigError(DeftxError, ValueError):
    """A setting is out of range or contradicts another (e.g. k larger than the maskable parameters)."""


MAX_MESSAGE_CHARS = 1000  # a few paths of any sensible length; a 100,000-character argument is not echoed back


def clipped(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut in the middle to at most about ``limit`` characters: its start (what went wrong, where)
    and its end (the reason, e.g. "File name too long") stay."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 3
    return f"{message[:head]} [... {len(message) - head - tail:,} characters left out ...] {message[-tail:]}"
