"""The component registry and the handler contract (modelled on LLaMA-Factory's ``webui/manager.py``).

Every component a handler reads or updates is registered under a stable id ``<tab>.<name>`` (``data.source``,
``train.data``, ``predict.task``), so one tab wires events to another's components by id, not by variable.

Handlers are module-level functions ``fn(studio, *inputs) -> {id: value}``: they take the app state
explicitly and return updates keyed by component id; ids they leave out are left unchanged. ``@handler``
declares which ids a handler may update (the order is the order of the values an API call returns) and, for
handlers with a status field, turns errors into an inline message and a toast instead of a traceback. ``bind``
makes such a handler an event function of one app.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import gradio as gr

from deftx_engine.errors import DeftxError
from deftx_engine.hub.secrets import scrub

from .render import err
from .state import Studio

log = logging.getLogger(__name__)
Updates = dict[str, Any]
# The labels of the controls that set TrainConfig fields: the layouts use them, and engine errors name a
# setting by them ("Set the Text column.") where the CLI names its option (--text-column).
FIELD_LABELS = {"data": "Training data", "base_model": "Base model", "language": "Language",
                "text_column": "Text column", "pair_column": "Second text column", "label_column": "Label column"}
# Settings that are this server's (DEFTX_*), not the user's: the advice is what the user can do instead.
SERVER_HINTS = {"max_lines": "Use a smaller file (this server's limit, DEFTX_MAX_LINES).",
                "max_bytes": "Use a smaller file."}


def error_text(e: DeftxError) -> str:
    """An engine error in the app's words: the setting it concerns named by its control's label."""
    if e.field in SERVER_HINTS:
        return f"{e.message} {SERVER_HINTS[e.field]}"
    return e.render(lambda field: f"the {FIELD_LABELS.get(field, field.replace('_', ' ') + ' setting')}", "set")


def handler(*outputs: str, status: int | None = 0,
            on_error: Updates | Callable[[str], Updates] | None = None) -> Callable:
    """Declare a handler's outputs (component ids). ``outputs[status]`` is a status field (None: none): a
    ``DeftxError`` is shown there as is, any other exception as one line (its traceback, scrubbed, goes to the
    log), with a toast; ``on_error`` gives more updates on failure (e.g. clearing a token field), or makes them
    from the message shown."""

    def deco(fn: Callable[..., Updates]) -> Callable[..., Updates]:
        if status is None:
            fn.outputs = outputs
            return fn

        @functools.wraps(fn)
        def safe(studio: Studio, *args: Any, **kwargs: Any) -> Updates:
            try:
                return fn(studio, *args, **kwargs)
            except DeftxError as e:
                msg = studio.pretty(error_text(e))
            except Exception as e:  # noqa: BLE001 -- the user sees one line, the server log the traceback
                # the traceback is logged scrubbed: an exception text may quote a token or a header
                log.error("%s failed:\n%s", fn.__name__, scrub(traceback.format_exc()))
                first = (str(e).strip().splitlines() or [""])[0][:300]
                msg = studio.pretty(f"unexpected error ({type(e).__name__}): {first}")
            gr.Warning(msg)
            return {outputs[status]: err(msg), **((on_error(msg) if callable(on_error) else on_error) or {})}

        safe.outputs = outputs
        return safe

    return deco


def takes(form: type) -> Callable:
    """A handler of one form, ``fn(studio, form)``: called with the dataclass ``form``'s fields (positionally, in
    order, or by name), which are also its event's parameters (``bind``) and so its API's."""

    def deco(fn: Callable[..., Updates]) -> Callable[..., Updates]:
        @functools.wraps(fn)
        def call(studio: Studio, *args: Any, **kwargs: Any) -> Updates:
            return fn(studio, form(*args, **kwargs))

        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        call.__signature__ = inspect.Signature([inspect.Parameter("studio", keyword)] + [
            inspect.Parameter(f.name, keyword, default=inspect.Parameter.empty if f.default is dataclasses.MISSING
                              else f.default) for f in dataclasses.fields(form)])
        return call

    return deco


def bind(fn: Callable[..., Updates], studio: Studio) -> Callable:
    """``fn`` as an event function of the app of ``studio``: the same parameters without ``studio`` (they are
    the API's parameter names), returning the values of ``fn.outputs`` in order (``gr.skip()`` for ids not
    updated), as Gradio and an API call see them."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def event(*args: Any, **kwargs: Any) -> Any:
        updates = fn(studio, *args, **kwargs)
        values = tuple(updates.get(o, gr.skip()) for o in fn.outputs)
        return values[0] if len(values) == 1 else values

    event.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return event


class UI:
    """The components of one page by id, and the wiring of handlers to their events."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self._elems: dict[str, gr.components.Component | gr.Tab | gr.Timer] = {}

    def add(self, tab: str, /, **elems: Any) -> None:
        """Register components of ``tab`` as ``<tab>.<name>``."""
        for name, elem in elems.items():
            key = f"{tab}.{name}"
            if key in self._elems:
                raise KeyError(f"component {key} registered twice")
            self._elems[key] = elem

    def __getitem__(self, elem_id: str) -> Any:
        return self._elems[elem_id]

    def on(self, trigger: Callable, fn: Callable[..., Updates], inputs: Iterable[str] = (), **kwargs: Any):
        """Wire ``fn`` to ``trigger`` (e.g. ``ui["train.start"].click``) with inputs given by id; the outputs are
        ``fn.outputs``. Returns the event dependency (for ``.then``)."""
        return trigger(bind(fn, self.studio), inputs=[self[i] for i in inputs],
                       outputs=[self[o] for o in fn.outputs], **kwargs)
