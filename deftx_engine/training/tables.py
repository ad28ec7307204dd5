"""Read tabular sources -- CSV, TSV and JSONL files and Hub dataset splits -- into records tagged with where
each came from, refusing what is not UTF-8 text or is over the size limit.

Locations are 1-based lines as an editor shows them (the CSV header is line 1), so the loaders' messages can
point at the exact line of a 100k-line file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deftx_engine.errors import DataError

MAX_BYTES_DEFAULT = 50 * 1024 * 1024

_BINARY_SNIFF_BYTES = 8192
_UTF8_BOM = b"\xef\xbb\xbf"
_HUB_PREFIX = "hub:"
_HUB_SYNTAX = "hub:org/name[:config][@split][#column]"
# A Hub dataset id: "name" or "org/name". Anything else (a path, "..", a third "/") could make the datasets
# library read a local folder, so a hub: spec would read what a typed path may not.
_HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


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


@dataclass(frozen=True)
class Table:
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


def read_text(path: Path, supported: tuple[str, ...], max_bytes: int) -> str:
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


def load_table(src: Path | HubSource, supported: tuple[str, ...], max_bytes: int) -> Table:
    """One record shape for every source, so the loaders pick columns the same way from a file or the Hub."""
    if isinstance(src, HubSource):
        return _hub_table(src)
    text = read_text(src, supported, max_bytes)
    if src.suffix.lower() == ".jsonl":
        return _jsonl_table(str(src), text)
    return _csv_table(str(src), text, tsv=src.suffix.lower() == ".tsv")


def _csv_table(name: str, text: str, *, tsv: bool) -> Table:
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
    return Table(name, f"{name} line 1 (header)", header, rows)


def _jsonl_table(name: str, text: str) -> Table:
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
                f'{where}: expected a JSON object like {{"text": "..."}}, got {json_type(record)}. '
                "Put one object on each line."
            )
        columns.update(dict.fromkeys(record))
        rows.append((where, record))
    return Table(name, name, list(columns), rows)


def _hub_table(src: HubSource) -> Table:
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
    return Table(str(src), str(src), list(ds.column_names), rows)


def _name_class_labels(record: dict[str, Any], class_names: dict[str, list[str]]) -> dict[str, Any]:
    """-1 is the Hub's "no label" (e.g. hidden test sets) and becomes missing, which is then reported."""
    named = dict(record)
    for column, names in class_names.items():
        value = named[column]
        named[column] = names[value] if value is not None and value >= 0 else None
    return named


def json_type(value: object) -> str:
    """A JSON value's kind in the words a user knows from the file ("a number", "null"), for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
