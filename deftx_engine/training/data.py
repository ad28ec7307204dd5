"""Load target-language corpora and labelled task data, failing early with messages a user can act on.

Every loader error is a DataError that names the file, the line (1-based, as an editor shows it; the CSV
header is line 1) and the field, so a typo in a 100k-line file costs seconds instead of a training run.
Reading the files and Hub splits is ``tables``'s job; here the records become sentences, texts and labels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deftx_engine.errors import DataError
from deftx_engine.training.tables import (
    MAX_BYTES_DEFAULT,
    HubSource,
    Table,
    json_type,
    load_table,
    parse_source,
    read_text,
)

_CORPUS_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")
_TASK_SUFFIXES = (".csv", ".tsv", ".jsonl")
# Tried in order when no text column is given: single-text tasks, then the two common sentence-pair layouts.
_TEXT_COLUMN_CANDIDATES: tuple[tuple[str, str | None], ...] = (
    ("text", None),
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
)
# ASCII only: int() would also accept "1_000" or Arabic-Indic digits, which are labels, not numbers.
_INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass
class TaskData:
    """Labelled examples for training or evaluating a classifier; labels are always strings."""

    texts: list[str]
    labels: list[str]
    label_names: list[str]
    text_pairs: list[str] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        """Misaligned lists would silently pair texts with the wrong labels."""
        lengths = [len(self.texts), len(self.labels)] + ([len(self.text_pairs)] if self.text_pairs is not None else [])
        if len(set(lengths)) > 1:
            raise DataError(
                f"TaskData from '{self.source}' has lengths {lengths} (texts, labels[, text pairs]); "
                "they must be equal."
            )

    @property
    def is_pair(self) -> bool:
        """Sentence-pair tasks (NLI, paraphrase) are encoded as two segments."""
        return self.text_pairs is not None

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        """Counts in label_names order with zeros kept, so a class missing from a split is visible."""
        counts = dict.fromkeys(self.label_names, 0)
        counts.update(Counter(self.labels))
        return counts


def load_corpus(
    source: str | Path | HubSource,
    column: str | None = None,
    *,
    max_lines: int | None = None,
    max_bytes: int = MAX_BYTES_DEFAULT,
) -> list[str]:
    """Unlabelled target-language sentences for masked-LM training, stripped, blank ones dropped.

    ``column`` picks the CSV/TSV column or JSONL key (default ``text``; a one-column CSV needs none);
    it is ignored for ``.txt``. ``max_bytes`` applies to local files only.
    """
    src = _as_source(source)
    if isinstance(src, Path) and src.suffix.lower() == ".txt":
        text = read_text(src, _CORPUS_SUFFIXES, max_bytes)
        lines = [stripped for line in text.split("\n") if (stripped := line.strip())]
    else:
        table = load_table(src, _CORPUS_SUFFIXES, max_bytes)
        text_name = _corpus_column(table, _default_column(src, column))
        lines = [text for where, record in table.rows if (text := _cell_text(where, record, text_name))]
        if not lines:
            raise DataError(
                f"{table.name} has no text in column '{text_name}' (every row is blank).", field="text_column",
                hint="Fill it in or {set} {text_column}.",
            )
    _check_limit(str(src), len(lines), max_lines, "lines")
    return lines


def load_task_data(
    source: str | Path | HubSource,
    *,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str = "label",
    label_names: list[str] | None = None,
    max_rows: int | None = None,
    max_bytes: int = MAX_BYTES_DEFAULT,
) -> TaskData:
    """Labelled examples from .csv/.tsv/.jsonl or the Hub.

    Pass the training label_names when loading evaluation data: a label outside them is an error, since
    the classifier cannot predict a class it never saw. Integer labels index label_names unless those
    names are themselves integers (e.g. star ratings "1".."5"), in which case they are matched as text.
    """
    src = _as_source(source)
    table = load_table(src, _TASK_SUFFIXES, max_bytes)
    if not table.rows:
        raise DataError(f"{table.name} has no data rows. Add examples below the header.")
    _check_limit(table.name, len(table.rows), max_rows, "rows")
    text_name, pair_name = _task_columns(table, _default_column(src, text_column), pair_column)
    _require_column(table, label_column, "label_column")
    texts = [_required_text(where, record, text_name) for where, record in table.rows]
    pairs = [_required_text(where, record, pair_name) for where, record in table.rows] if pair_name else None
    raw_labels = [(where, _raw_label(where, record, label_column)) for where, record in table.rows]
    labels, names = _resolve_labels(raw_labels, label_names, label_column)
    return TaskData(texts=texts, labels=labels, label_names=names, text_pairs=pairs, source=table.name)


def describe_corpus(lines: Sequence[str]) -> dict[str, Any]:
    """Summary shown before training so the user can sanity-check what was loaded."""
    n_lines = len(lines)
    n_words = sum(len(line.split()) for line in lines)
    return {
        "n_lines": n_lines,
        "n_chars": sum(len(line) for line in lines),
        "mean_words": round(n_words / n_lines, 2) if n_lines else 0.0,
        "sample": list(lines[:5]),
    }


def describe_task(td: TaskData) -> dict[str, Any]:
    """Summary that exposes class imbalance and pair/single layout before training."""
    return {"n_rows": len(td), "is_pair": td.is_pair, "label_counts": td.label_counts()}


def _as_source(source: str | Path | HubSource) -> Path | HubSource:
    return parse_source(source) if isinstance(source, str) else source


def _default_column(src: Path | HubSource, column: str | None) -> str | None:
    """An explicit argument wins over the ``#column`` of a Hub spec."""
    if column is not None or isinstance(src, Path):
        return column
    return src.column


def _check_limit(name: str, count: int, limit: int | None, unit: str) -> None:
    """Refuse rather than truncate: a silently shortened dataset skews training and evaluation."""
    if limit is not None and count > limit:
        raise DataError(f"{name} has {count} {unit}, more than the limit of {limit}.", field="max_lines",
                        hint="Raise {max_lines} or use a smaller file.")


def _require_column(table: Table, column: str, field: str) -> None:
    if column not in table.columns:
        raise DataError(f"{table.header} has no column '{column}'; columns are: {', '.join(table.columns)}.",
                        field=field, hint=f"{{Set}} {{{field}}}.")


def _corpus_column(table: Table, column: str | None) -> str:
    """Default to 'text'; a source with a single column needs no name."""
    if column is None and "text" not in table.columns and len(table.columns) == 1:
        return table.columns[0]
    name = column or "text"
    _require_column(table, name, "text_column")
    return name


def _task_columns(table: Table, text_column: str | None, pair_column: str | None) -> tuple[str, str | None]:
    if text_column is None:
        text_column, detected_pair = _detect_text_columns(table)
        pair_column = pair_column if pair_column is not None else detected_pair
    _require_column(table, text_column, "text_column")
    if pair_column is not None:
        _require_column(table, pair_column, "pair_column")
    return text_column, pair_column


def _detect_text_columns(table: Table) -> tuple[str, str | None]:
    for text, pair in _TEXT_COLUMN_CANDIDATES:
        if text in table.columns and (pair is None or pair in table.columns):
            return text, pair
    raise DataError(
        f"{table.header}: cannot tell which column holds the text; expected 'text', 'premise'+'hypothesis' or "
        f"'sentence1'+'sentence2', but columns are: {', '.join(table.columns)}.", field="text_column",
        hint="{Set} {text_column} (and {pair_column} for sentence pairs).",
    )


def _cell(where: str, record: dict[str, Any], column: str) -> Any:
    """JSONL lines may each lack a key even when the file as a whole has it."""
    if column not in record:
        raise DataError(f"{where} has no field '{column}'; fields on this line: {', '.join(record) or '(none)'}. "
                        "Add it.")
    return record[column]


def _cell_text(where: str, record: dict[str, Any], column: str) -> str:
    value = _cell(where, record, column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' is {json_type(value)}, expected a string. Quote it.")
    return value.strip()


def _required_text(where: str, record: dict[str, Any], column: str) -> str:
    text = _cell_text(where, record, column)
    if not text:
        raise DataError(f"{where}: field '{column}' is empty. Every row needs text; fill it in or delete the row.")
    return text


def _raw_label(where: str, record: dict[str, Any], column: str) -> str | int:
    """A label as str or int; digit strings count as ints so CSV and JSONL files behave alike."""
    value = _cell(where, record, column)
    if isinstance(value, str):
        value = value.strip()
        if _INT_RE.fullmatch(value):
            return int(value)
    if value is None or value == "":
        raise DataError(f"{where}: field '{column}' is empty. Every row needs a label; fill it in or delete the row.")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field '{column}' is {json_type(value)}; a label must be a string or an integer.")
    return value


def _resolve_labels(
    raw: list[tuple[str, str | int]], label_names: list[str] | None, column: str
) -> tuple[list[str], list[str]]:
    """Map raw labels to strings and fix the label order the classifier head will use."""
    if label_names is None:
        labels = [str(value) for _, value in raw]
        numeric = all(isinstance(value, int) for _, value in raw)
        return labels, sorted(set(labels), key=int if numeric else None)
    index_ints = not any(_INT_RE.fullmatch(name) for name in label_names)
    return [_known_label(where, value, label_names, index_ints, column) for where, value in raw], list(label_names)


def _known_label(where: str, value: str | int, label_names: list[str], index_ints: bool, column: str) -> str:
    allowed = ", ".join(label_names)
    if isinstance(value, int) and index_ints:
        if not 0 <= value < len(label_names):
            raise DataError(
                f"{where}: field '{column}' is {value}, but integer labels index the label names ({allowed}) "
                f"and must be 0..{len(label_names) - 1}. Fix the label or the label names."
            )
        return label_names[value]
    label = str(value)
    if label not in label_names:
        raise DataError(
            f"{where}: label '{label}' in field '{column}' is not one of the known labels: {allowed}. "
            "A label unseen in training cannot be predicted; fix the label or retrain with it."
        )
    return label
