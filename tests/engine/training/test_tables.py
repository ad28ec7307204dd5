"""Source specs: a local path or ``hub:org/name[:config][@split][#column]``. What the readers make of files is
checked through the loaders, in test_data.py."""

from pathlib import Path

import pytest

from deftx_engine.errors import DataError
from deftx_engine.training.tables import HubSource, parse_source


def test_parse_source_local_path():
    assert parse_source("data/corpus.txt") == Path("data/corpus.txt")
    assert parse_source("  ~/c.txt ") == Path.home() / "c.txt"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hub:org/name", HubSource("org/name")),
        ("hub:facebook/xnli:sw", HubSource("facebook/xnli", "sw")),
        ("hub:facebook/xnli:sw@test", HubSource("facebook/xnli", "sw", "test")),
        ("hub:facebook/xnli:sw@test#premise", HubSource("facebook/xnli", "sw", "test", "premise")),
        ("hub:org/name@validation#text", HubSource("org/name", None, "validation", "text")),
        ("hub:org/name#sentence", HubSource("org/name", column="sentence")),
    ],
)
def test_parse_source_hub(spec, expected):
    assert parse_source(spec) == expected


def test_hub_source_str_round_trips():
    src = HubSource("facebook/xnli", "sw", "test", "premise")
    assert str(src) == "hub:facebook/xnli:sw@test#premise"
    assert parse_source(str(src)) == src


@pytest.mark.parametrize(
    ("spec", "what"),
    [("hub:", "dataset name"), ("hub:org/x:@test", "config"), ("hub:org/x@", "split"), ("hub:org/x#", "column")],
)
def test_parse_source_rejects_empty_parts(spec, what):
    with pytest.raises(DataError, match=rf"empty {what}.*hub:org/name\[:config\]"):
        parse_source(spec)
