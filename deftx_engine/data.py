"""Load target-language corpora and labelled task data, failing early with messages a user can act on.

Every loader error is a DataError that names the file, the line (1-based, as an editor shows it; the CSV
header is line 1) and the field, so a typo in a 100k-line file costs seconds instead of a training run.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deftx_engine.errors import DataError

MAX_BYTES_DEFAULT = 50 * 1024 * 1024

_BINARY_SNIFF_BYTES = 8192
_UTF8_BOM = b"\xef\xbb\xbf"
_CORPUS_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")
_TASK_SUFFIXES = (".csv", ".tsv", ".jsonl")
_HUB_PREFIX = "hub:"
_HUB_SYNTAX = "hub:org/name[:config][@split][#column]"
# A Hub dataset id: "name" or "org/name". Anything else (a path, "..", a third "/") could make the datasets
# library read a local folder, so a hub: spec would read what a typed path may not.
_HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
# Tried in order when no text column is given: single-text tasks, then the two common sentence-pair layouts.
_TEXT_COLUMN_CANDIDATES: tuple[tuple[str, str | None], ...] = (
    ("text", None),
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
)
# ASCII only: int() would also accept "1_000" or Arabic-Indic digits, which are labels, not numbers.
_INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub dataset split, so corpora and task data need not be downloaded by hand."""

    dataset: str
    config: str | None = None
    split: str = "train"
    column: str | None = None

    def __str__(self) -> str:
        """The spec string parse_source accepts, so messages show the source as the user writes it."""
        config = f":{self.config}" if self.config else ""
        column = f"#{self.column}" if self.column else ""
        return f"{_HUB_PREFIX}{self.dataset}{config}@{self.split}{column}"


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


@dataclass(frozen=True)
class _Table:
    """Records from any tabular source, each tagged with its location for error messages."""

    name: str  # file path or Hub spec
    header: str  # where the column names come from, e.g. "x.csv line 1 (header)"
    columns: list[str]
    rows: list[tuple[str, dict[str, Any]]]  # (location such as "x.csv line 7", record)


def parse_source(spec: str) -> Path | HubSource:
    """Read a CLI/UI source string: ``hub:org/name[:config][@split][#column]`` or a local path."""
    spec = spec.strip()
    if not spec.startswith(_HUB_PREFIX):
        return Path(spec).expanduser()
    rest, has_column, column = spec[len(_HUB_PREFIX):].partition("#")
    rest, has_split, split = rest.partition("@")
    dataset, has_config, config = rest.partition(":")
    parts = {
        "dataset name": (dataset, True),
        "config": (config, has_config),
        "split": (split, has_split),
        "column": (column, has_column),
    }
    for what, (value, present) in parts.items():
        if present and not value.strip():
            raise DataError(f"'{spec}' has an empty {what}; write it as {_HUB_SYNTAX}, "
                            "e.g. hub:facebook/xnli:sw@test#premise.")
    if not _HUB_DATASET.fullmatch(dataset) or ".." in dataset or Path(dataset).expanduser().exists():
        raise DataError(f"'{spec[:120]}': {dataset[:80]!r} is not a Hub dataset id (owner/name); hub: specs never "
                        "name local folders")
    return HubSource(dataset, config or None, split or "train", column or None)


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
        text = _read_text(src, _CORPUS_SUFFIXES, max_bytes)
        lines = [stripped for line in text.split("\n") if (stripped := line.strip())]
    else:
        table = _load_table(src, _CORPUS_SUFFIXES, max_bytes)
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
    table = _load_table(src, _TASK_SUFFIXES, max_bytes)
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


def _read_text(path: Path, supported: tuple[str, ...], max_bytes: int) -> str:
    """The checks every file loader shares; returns the text without BOM and with '\\n' newlines."""
    if not path.exists():
        hint = "" if path.is_absolute() else f" (relative paths start from {Path.cwd()})"
        raise DataError(f"{path} does not exist. Check the path{hint}.")
    if not path.is_file():
        raise DataError(f"{path} is not a file. Pass the path of a {', '.join(supported)} file.")
    if path.suffix.lower() not in supported:
        raise DataError(
            f"{path} has unsupported extension '{path.suffix or '(none)'}'; supported: {', '.join(supported)}. "
            "Convert or rename the file."
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"{path} is {_format_bytes(size)}, over the limit of {_format_bytes(max_bytes)}.", field="max_bytes",
            hint="Use a smaller file or raise {max_bytes}.",
        )
    raw = path.read_bytes()
    nul = raw.find(b"\0", 0, _BINARY_SNIFF_BYTES)
    if nul != -1:
        raise DataError(
            f"{path} looks like a binary file (NUL byte at byte offset {nul}). "
            "Pass a UTF-8 text file; if it is UTF-16 text, re-save it as UTF-8."
        )
    body_start = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
    try:
        text = raw[body_start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, raw, body_start + exc.start) from None
    if not text.strip():
        raise DataError(f"{path} is empty (no non-blank lines). Add data or pick another file.")
    return _normalize_newlines(text)


def _normalize_newlines(text: str) -> str:
    """Windows and old-Mac newlines must count as one line each, as in an editor."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _utf8_error(path: Path, raw: bytes, offset: int) -> DataError:
    """Locate the first invalid byte by line and column so the user can find it in an editor."""
    lines_before = _normalize_newlines(raw[:offset].decode("utf-8-sig")).split("\n")
    return DataError(
        f"{path} line {len(lines_before)}, column {len(lines_before[-1]) + 1}: invalid UTF-8 byte 0x{raw[offset]:02x} "
        f"(byte offset {offset}). Re-save the file as UTF-8 (it may be Latin-1 or Windows-1252)."
    )


def _format_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MB)" if n >= 2**20 else f"{n:,} bytes"


def _check_limit(name: str, count: int, limit: int | None, unit: str) -> None:
    """Refuse rather than truncate: a silently shortened dataset skews training and evaluation."""
    if limit is not None and count > limit:
        raise DataError(f"{name} has {count} {unit}, more than the limit of {limit}.", field="max_lines",
                        hint="Raise {max_lines} or use a smaller file.")


def _load_table(src: Path | HubSource, supported: tuple[str, ...], max_bytes: int) -> _Table:
    if isinstance(src, HubSource):
        return _hub_table(src)
    text = _read_text(src, supported, max_bytes)
    if src.suffix.lower() == ".jsonl":
        return _jsonl_table(str(src), text)
    return _csv_table(str(src), text, tsv=src.suffix.lower() == ".tsv")


def _csv_table(name: str, text: str, *, tsv: bool) -> _Table:
    """Header on line 1; TSV is read unquoted because corpora such as XNLI contain unbalanced quotes."""
    delimiter, kind = ("\t", "TSV") if tsv else (",", "CSV")
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # a long line is data, not a quoting error
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        header = [cell.strip() for cell in next(reader)]
        if not any(header):
            raise DataError(f"{name} line 1 (header) is blank; the first line must name the columns, "
                            f"e.g. text{delimiter}label.")
        duplicates = sorted(column for column, n in Counter(header).items() if n > 1)
        if duplicates:
            raise DataError(f"{name} line 1 (header) repeats column(s) {', '.join(duplicates)}. "
                            "Rename them so each is unique.")
        next_line = reader.line_num + 1
        for cells in reader:
            start, next_line = next_line, reader.line_num + 1
            if not any(cell.strip() for cell in cells):  # blank lines and spreadsheet ",,," rows
                continue
            if len(cells) != len(header):
                end = reader.line_num
                spans = f" (the record runs on to line {end}; look for an unclosed quote)" if end > start else ""
                raise DataError(
                    f"{name} line {start} has {len(cells)} field{'s' * (len(cells) != 1)} but the header has "
                    f"{len(header)}{spans}. "
                    f"Fix the row{'' if tsv else ' or quote fields that contain commas'}."
                )
            rows.append((f"{name} line {start}", dict(zip(header, cells))))
    except csv.Error as exc:
        raise DataError(f"{name} line {reader.line_num}: malformed {kind} ({exc}). "
                        "Fix the quoting on that line.") from None
    return _Table(name, f"{name} line 1 (header)", header, rows)


def _jsonl_table(name: str, text: str) -> _Table:
    """One JSON object per line; columns are the keys in order of first appearance."""
    rows: list[tuple[str, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}). "
                'Each line must be one JSON object, e.g. {"text": "..."}.'
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f'{where}: expected a JSON object like {{"text": "..."}}, got {_json_type(record)}. '
                "Put one object on each line."
            )
        columns.update(dict.fromkeys(record))
        rows.append((where, record))
    return _Table(name, name, list(columns), rows)


def _hub_table(src: HubSource) -> _Table:
    """Load a Hub split; ClassLabel ints become their names so labels mean the same as in a CSV."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"Loading {src} needs the 'datasets' package. Run: pip install datasets") from None
    try:
        ds = datasets.load_dataset(src.dataset, src.config, split=src.split)
    except Exception as exc:  # network, unknown dataset/config/split: all mean "check the spec"
        raise DataError(
            f"Could not load {src}: {exc}. "
            f"Check the dataset name, config and split at https://huggingface.co/datasets/{src.dataset}."
        ) from exc
    class_names = {column: feature.names for column, feature in ds.features.items()
                   if isinstance(feature, datasets.ClassLabel)}
    rows = [(f"{src} row {i}", _name_class_labels(record, class_names)) for i, record in enumerate(ds, start=1)]
    return _Table(str(src), str(src), list(ds.column_names), rows)


def _name_class_labels(record: dict[str, Any], class_names: dict[str, list[str]]) -> dict[str, Any]:
    """-1 is the Hub's "no label" (e.g. hidden test sets) and becomes missing, which is then reported."""
    named = dict(record)
    for column, names in class_names.items():
        value = named[column]
        named[column] = names[value] if value is not None and value >= 0 else None
    return named


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _require_column(table: _Table, column: str, field: str) -> None:
    if column not in table.columns:
        raise DataError(f"{table.header} has no column '{column}'; columns are: {', '.join(table.columns)}.",
                        field=field, hint=f"{{Set}} {{{field}}}.")


def _corpus_column(table: _Table, column: str | None) -> str:
    """Default to 'text'; a source with a single column needs no name."""
    if column is None and "text" not in table.columns and len(table.columns) == 1:
        return table.columns[0]
    name = column or "text"
    _require_column(table, name, "text_column")
    return name


def _task_columns(table: _Table, text_column: str | None, pair_column: str | None) -> tuple[str, str | None]:
    if text_column is None:
        text_column, detected_pair = _detect_text_columns(table)
        pair_column = pair_column if pair_column is not None else detected_pair
    _require_column(table, text_column, "text_column")
    if pair_column is not None:
        _require_column(table, pair_column, "pair_column")
    return text_column, pair_column


def _detect_text_columns(table: _Table) -> tuple[str, str | None]:
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
        raise DataError(f"{where}: field '{column}' is {_json_type(value)}, expected a string. Quote it.")
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
        raise DataError(f"{where}: field '{column}' is {_json_type(value)}; a label must be a string or an integer.")
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
