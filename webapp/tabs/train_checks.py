"""What the Train tab settles before a run is queued: the language of the data (derived from the file name or
asked for, never left over from the previous file) and whether this server's hardware can run the chosen
preset."""
from __future__ import annotations

import re
from pathlib import PurePath

from deftx_engine.errors import DeftxError

from ..components import Updates, handler
from ..state import Studio

# a language code at the end of a file name: target_corpus_id.txt, wiki-sw.csv, hub:org/name#text (none)
CODE_AT_END = re.compile(r"(?:^|[_.-])([a-z]{2,3})$")
NOT_CODES = {"all", "big", "dev", "new", "old", "out", "raw", "set", "tmp", "val"}  # common file-name words
GPU_PRESETS = {"paper-xlmr-base": "trains xlm-roberta-base for the paper's 100,000 + 100,000 steps (languages) "
                                  "or 5 + 5 epochs (tasks)"}


def language_of(data: str | None) -> str:
    """The language code a file name ends in (``target_corpus_id.txt`` -> ``id``), else "" (to be asked for)."""
    data = (data or "").strip()
    if not data or data.startswith("hub:"):
        return ""
    match = CODE_AT_END.search(PurePath(data).stem.lower())
    return match.group(1) if match and match.group(1) not in NOT_CODES else ""


@handler("train.lang", status=None)
def language_for_data(studio: Studio, data) -> Updates:
    """New training data: the Language field follows it (its code from the file name, else empty, so the Start
    asks for it) instead of keeping the previous file's language and mislabelling the vector."""
    return {"train.lang": language_of(data)}


def require_language(language: str | None, kind: str) -> str:
    """The language code stored in the vector; a run without one is refused rather than stored unlabelled."""
    language = (language or "").strip()
    if not language:
        what = "target language of the text" if kind == "language" else "language of the labelled data"
        raise DeftxError(f"which language is this data in? Set the Language field (the {what}, e.g. id, sw or en): "
                         "it is stored in the vector")
    return language


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_hardware(preset: str | None) -> None:
    """Refuse a preset meant for a GPU on a server without one, before it is queued (it would take days)."""
    if preset in GPU_PRESETS and not has_gpu():
        raise DeftxError(f"the {preset} preset {GPU_PRESETS[preset]}: it needs a GPU, and this server has none. "
                         "Choose the cpu-demo preset, or set fewer steps (the preset becomes custom)")
