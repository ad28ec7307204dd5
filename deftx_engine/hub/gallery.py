"""The gallery: released and pushed language and task vectors, by base model and language.

From the Hub when it answers: composable-sft's releases (author ``cambridgeltl``, ids
``{xlmr,mbert}-lang-sft-{code}-small`` and ``{xlmr,mbert}-task-sft-*``) and the vectors DeFT-X pushed (the
``deftx`` tag; ``contact.pushed_tags`` says what ``transfer.push_vector`` puts in a card and the listing reads
back). When it does not (offline, unreachable, slower than ``timeout``): the catalogue shipped in the package
(``catalogue.json``, composable-sft's MODELS.md as data), every entry saying it needs the Hub.

Torch-free, so the CLI and a web tab answer quickly; every Hub call is bounded by ``timeout``.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DeftxError
from .contact import GALLERY_TAG, HUB_TIMEOUT, KIND_TAG, LANGUAGE_TAG, hub_error_words, hub_unavailable
from .secrets import scrub

RELEASED_AUTHOR = "cambridgeltl"
LIST_LIMIT = 1000  # most repos read per listing
# released and listed by the Hub; pushed by DeFT-X; shipped list only; on this machine (a caller's own entries)
SOURCES = ("hub", "pushed", "catalogue", "here")
NEEDS_HUB = "needs the Hub: the Hub did not answer, so this is the shipped list; downloading it needs the Hub"
_RELEASED = re.compile(r"(?P<base>xlmr|mbert)-(?:lang-sft-(?P<lang>[a-z]{2,3}(?:_[a-z]+)?)-small"
                       r"|task-sft-(?P<task>[\w.-]+))")


# ---- entries --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GalleryEntry:
    """One vector on the Hub (or in the catalogue): what to pull and what it composes with."""

    id: str  # Hub repo id
    kind: str  # "language" | "task"
    base_model: str  # the Hub id of its base model, e.g. FacebookAI/xlm-roberta-base
    source: str  # one of SOURCES
    language: str = ""  # code(s), "+"-joined; for a task vector: the language it was trained on, if known
    language_name: str = ""
    task: str = ""  # task vectors: e.g. sentiment, nli, pos
    task_type: str = ""  # sequence-classification (what Predict runs) | token-classification | ...
    labels: tuple[str, ...] = ()  # class names in head order, when known (a converted task vector needs them)

    @property
    def note(self) -> str:
        """What the user must know before picking it ("" when nothing)."""
        if self.source == "catalogue":
            return NEEDS_HUB
        if self.kind == "task" and not self.predicts:
            return f"a {self.task_type or 'non-classification'} task: Predict runs sequence classification only"
        return ""

    @property
    def predicts(self) -> bool:
        """Whether Predict can score with it: language vectors always; task vectors of sequence classification."""
        return self.kind == "language" or self.task_type in ("", "sequence-classification")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "labels": list(self.labels), "note": self.note}


@dataclass(frozen=True)
class Gallery:
    """The entries and whether the Hub answered; ``status`` says so in one line for the user."""

    entries: tuple[GalleryEntry, ...]
    hub_answered: bool
    status: str
    reason: str = ""  # why the catalogue was used

    def select(self, *, base: str | None = None, kind: str | None = None, language: str | None = None,
               task: str | None = None) -> Gallery:
        """The entries on ``base`` (any alias: xlmr, xlm-roberta-base, FacebookAI/xlm-roberta-base), of ``kind``,
        for ``language`` (a code or a name, any case) and ``task``."""
        lang = (language or "").strip().lower()

        def keep(e: GalleryEntry) -> bool:
            return ((not base or base_key(e.base_model) == base_key(base)) and (not kind or e.kind == kind)
                    and (not lang or lang in e.language.lower().split("+") or lang == e.language_name.lower())
                    and (not task or e.task == task))

        return replace(self, entries=tuple(e for e in self.entries if keep(e)))

    def find(self, repo_id: str) -> GalleryEntry:
        for e in self.entries:
            if e.id == repo_id:
                return e
        raise DeftxError(f"{repo_id!r} is not in the gallery ({self.status})")

    def to_dict(self) -> dict[str, Any]:
        return {"hub_answered": self.hub_answered, "status": self.status, "reason": self.reason,
                "entries": [e.to_dict() for e in self.entries]}


# ---- base models ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _catalogue() -> dict:
    return json.loads(resources.files(__package__).joinpath("catalogue.json").read_text(encoding="utf-8"))


def _aliases() -> dict[str, str]:
    """Short names and legacy ids of the released bases -> their Hub id (lower case)."""
    out = {}
    for short, hub_id in _catalogue()["bases"].items():
        for alias in (short, hub_id, hub_id.split("/")[-1]):
            out[alias.lower()] = hub_id.lower()
    return out


def base_key(name: str) -> str:
    """A base model's name for comparison: xlmr, xlm-roberta-base and FacebookAI/xlm-roberta-base are one."""
    key = str(name).strip().rstrip("/").lower()
    return _aliases().get(key, key)


def _base_of(item: Any) -> tuple[str, str]:
    """(base model, how to name the item in a message) of an entry, vector, vector meta or base name."""
    meta = getattr(item, "meta", item)  # a SparseVector holds a VectorMeta
    if isinstance(item, GalleryEntry):
        return item.base_model, f"the {item.kind} vector {item.id}"
    if hasattr(meta, "base_model") and hasattr(meta, "kind"):
        what = f" ({meta.language})" if getattr(meta, "language", "") else ""
        return meta.base_model, f"the {meta.kind} vector{what}"
    if isinstance(item, (str, Path)):
        return str(item), f"the base model {item}"
    raise TypeError(f"cannot tell the base model of a {type(item).__name__}")


def check_same_base(*items: Any) -> str:
    """The base model ``items`` (gallery entries, vectors, vector metas or base names) share; a ``DeftxError``
    naming the two that differ, or one that does not say, before anything is downloaded or built."""
    first = None
    for item in items:
        base, what = _base_of(item)
        if not base.strip():
            raise DeftxError(f"{what} does not say which base model it was made for; vectors compose only on "
                             "the base model they were made for")
        if first is None:
            first = (base, what)
        elif base_key(base) != base_key(first[0]):
            raise DeftxError(f"{what} was made for {base}, but {first[1]} for {first[0]}: vectors compose only on "
                             f"the same base model; pick one made for {first[0]}")
    if first is None:
        raise DeftxError("no vectors given")
    return first[0]


# ---- the catalogue --------------------------------------------------------------------------------
def language_name(code: str) -> str:
    """The name of a language code the catalogue knows ("" if it does not): a vector trained here says only
    its code, and the gallery is filtered by code or name."""
    return _catalogue()["languages"].get(str(code).strip().lower(), "")


def _catalogue_entries() -> list[GalleryEntry]:
    cat = _catalogue()
    names = cat["languages"]
    return [GalleryEntry(id=e["id"], kind=e["kind"], base_model=cat["bases"][e["base"]], source="catalogue",
                         language=e.get("language", e.get("source_language", "")),
                         language_name=names.get(e.get("language", ""), ""), task=e.get("task", ""),
                         task_type=e.get("task_type", ""), labels=tuple(e.get("labels", ())))
            for e in cat["entries"]]


def catalogue_gallery(reason: str) -> Gallery:
    """The shipped catalogue, saying why the Hub was not used."""
    entries = _catalogue_entries()
    return Gallery(tuple(_sorted(entries)), False, f"the Hub did not answer ({reason}): the catalogue shipped with "
                   f"DeFT-X, {len(entries)} released vectors; downloading any of them needs the Hub", reason)


# ---- the Hub --------------------------------------------------------------------------------------
def _released(models, known: dict[str, GalleryEntry]) -> list[GalleryEntry]:
    """composable-sft's releases among ``models``; what the Hub does not say (labels, language names) comes
    from the catalogue entry of the same id."""
    cat = _catalogue()
    out = []
    for m in models:
        owner, _, name = m.id.partition("/")
        match = _RELEASED.fullmatch(name)
        if owner != RELEASED_AUTHOR or match is None:
            continue
        lang = match["lang"] or ""
        entry = GalleryEntry(id=m.id, kind="language" if lang else "task", base_model=cat["bases"][match["base"]],
                             source="hub", language=lang, language_name=cat["languages"].get(lang, ""),
                             task=match["task"] or "")
        if m.id in known:
            k = known[m.id]
            entry = replace(entry, language=entry.language or k.language, task=k.task or entry.task,
                            task_type=k.task_type, labels=k.labels)
        out.append(entry)
    return out


def _pushed(models) -> list[GalleryEntry]:
    """Vectors DeFT-X pushed, from the tags and card data ``hub.push_vector`` writes."""
    names = _catalogue()["languages"]
    out = []
    for m in models:
        tags = list(m.tags or [])
        card = m.card_data.to_dict() if m.card_data is not None else {}
        kind = next((t[len(KIND_TAG):] for t in tags if t.startswith(KIND_TAG)), "")
        langs = [t[len(LANGUAGE_TAG):] for t in tags if t.startswith(LANGUAGE_TAG)]
        if not langs and card.get("language"):
            langs = [card["language"]] if isinstance(card["language"], str) else list(card["language"])
        base = card.get("base_model") or ""
        base = base[0] if isinstance(base, list) and base else base
        if kind not in ("language", "task") or not isinstance(base, str) or not base:
            continue  # not a language or task vector, or no base model to compose on
        out.append(GalleryEntry(id=m.id, kind=kind, base_model=base, source="pushed", language="+".join(langs),
                                language_name=names.get(langs[0], "") if len(langs) == 1 else "",
                                task_type="sequence-classification" if kind == "task" else ""))
    return out


def _query_hub(token: str | None) -> list[GalleryEntry]:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    known = {e.id: e for e in _catalogue_entries()}
    released = _released(api.list_models(author=RELEASED_AUTHOR, search="-sft-", limit=LIST_LIMIT), known)
    pushed = _pushed(api.list_models(filter=GALLERY_TAG, cardData=True, limit=LIST_LIMIT))
    seen = {e.id for e in released}
    return released + [e for e in pushed if e.id not in seen]


def _sorted(entries: Iterable[GalleryEntry]) -> list[GalleryEntry]:
    return sorted(entries, key=lambda e: (base_key(e.base_model), e.kind, e.language, e.task, e.id))


def load_gallery(*, timeout: float = HUB_TIMEOUT, token: str | None = None) -> Gallery:
    """The gallery from the Hub if it answers within ``timeout`` seconds, else from the catalogue.

    HF_HUB_OFFLINE=1, or an endpoint that refuses connections or has no address, answers from the catalogue
    at once. The Hub client sets no timeout on listings, so the query runs in a daemon thread that is
    abandoned when the time is up: the caller never waits much longer than ``timeout``, and a hung
    connection never keeps the process alive."""
    from huggingface_hub import constants

    start = time.monotonic()
    why = hub_unavailable(timeout)
    if why:
        return catalogue_gallery(why)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["entries"] = _query_hub(token)
        except Exception as e:  # noqa: BLE001 -- any failure means "the Hub did not answer": use the catalogue
            first = (str(e).strip().splitlines() or [""])[0][:300]
            result["error"] = hub_error_words(e) or scrub(f"{type(e).__name__}: {first}" if first
                                                          else type(e).__name__, token)

    worker = threading.Thread(target=run, name="deftx-gallery-hub", daemon=True)
    worker.start()
    worker.join(max(0.0, timeout - (time.monotonic() - start)))
    if "entries" in result:
        entries = _sorted(result["entries"])
        n_pushed = sum(e.source == "pushed" for e in entries)
        return Gallery(tuple(entries), True, f"from the Hub at {constants.ENDPOINT}: {len(entries) - n_pushed} "
                       f"released vectors, {n_pushed} pushed with DeFT-X")
    return catalogue_gallery(result.get("error") or f"no answer within {timeout:g} s")


# ---- pulling --------------------------------------------------------------------------------------
def pull_entries(entries: Sequence[GalleryEntry], folder: str | Path, *, token: str | None = None) -> list[Path]:
    """Download ``entries`` (e.g. a task vector and a language vector) into ``folder``/<owner>--<name>, after
    checking that they share a base model (before anything is downloaded). Returns the vector folders."""
    check_same_base(*entries)
    return [pull_entry(e, Path(folder) / e.id.replace("/", "--"), token=token) for e in entries]


def pull_entry(entry: GalleryEntry, dest: str | Path, *, token: str | None = None, model=None) -> Path:
    """Download one entry into the vector folder ``dest``; a composable-sft release is converted with the entry's
    kind, language, base model and labels, and with ``model`` (the base model with a head for the task's labels)
    if given: the vector is then checked against it and gets its fingerprint, without which it composes only
    with other converted releases, not with vectors trained on that base model."""
    from .transfer import pull_vector

    return pull_vector(entry.id, dest, token=token, kind=entry.kind,
                       language=entry.language if entry.kind == "language" else "", base_model=entry.base_model,
                       label_names=entry.labels, model=model)
