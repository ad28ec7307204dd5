"""The gallery: from the local Hub (tests/hub_server.py) through the real ``huggingface_hub`` client, from the
shipped catalogue when the Hub does not answer (offline, unreachable, too slow), the base check, the CLI."""
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deftx_engine.cli import main
from deftx_engine.errors import DeftxError
from deftx_engine.hub.gallery import (
    NEEDS_HUB,
    GalleryEntry,
    base_key,
    catalogue_gallery,
    check_same_base,
    load_gallery,
    pull_entries,
)
from deftx_engine.method.vectors import SparseVector
from tiny import make_vector, write_released_sft

ROOT = Path(__file__).resolve().parents[3]
# facts from composable-sft's MODELS.md, written out here independently of catalogue.json
XLMR_ONLY = {"ace", "ban", "bjn", "jav", "mad", "min", "sun", "quy"}
BOTH = {"wol", "yor", "swa", "en"}
MBERT_ONLY = {"bxr", "mt", "fo"}


def released_repos(hub, folder: Path, mlm_model, cls_model) -> None:
    """Released SFTs on the local Hub (only two hold real files), plus repos the gallery must not list."""
    write_released_sft(mlm_model, folder / "lang", kind="language", seed=1)
    write_released_sft(cls_model, folder / "task", kind="task", seed=2)
    hub.add_repo("cambridgeltl/xlmr-lang-sft-jav-small", folder / "lang")
    hub.add_repo("cambridgeltl/xlmr-task-sft-nusax_senti", folder / "task")
    for repo_id in ("cambridgeltl/mbert-lang-sft-bxr-small", "cambridgeltl/xlmr-task-sft-squadv1-ms",
                    "cambridgeltl/mbert-lang-sft-wol-small", "cambridgeltl/xlmr-lang-sft-sun-large",  # not "-small"
                    "cambridgeltl/other-lang-sft-jav-small", "someone/xlmr-lang-sft-jav-small"):
        hub.add_repo(repo_id, {"pytorch_diff.bin": b"x"})


# ---- the catalogue --------------------------------------------------------------------------------
def test_catalogue_holds_the_released_vectors():
    g = catalogue_gallery("test")
    ids = {e.id for e in g.entries}
    assert len(g.entries) == len(ids)
    langs = {(e.base_model, e.language) for e in g.entries if e.kind == "language"}
    xlmr, mbert = "FacebookAI/xlm-roberta-base", "google-bert/bert-base-multilingual-cased"
    assert {(xlmr, c) for c in XLMR_ONLY | BOTH} <= langs and {(mbert, c) for c in MBERT_ONLY | BOTH} <= langs
    assert not {(mbert, c) for c in XLMR_ONLY} & langs and not {(xlmr, c) for c in MBERT_ONLY} & langs
    assert len({c for _, c in langs}) >= 60
    for e in g.entries:
        base = {"xlmr": xlmr, "mbert": mbert}[e.id.split("/")[1].split("-")[0]]
        assert e.base_model == base and e.source == "catalogue" and e.note == NEEDS_HUB
        if e.kind == "language":
            assert e.id == f"cambridgeltl/{e.id.split('/')[1].split('-')[0]}-lang-sft-{e.language}-small"
            assert e.language_name
    senti = g.find("cambridgeltl/xlmr-task-sft-nusax_senti")
    assert (senti.task, senti.task_type, senti.labels) == ("sentiment", "sequence-classification",
                                                           ("negative", "neutral", "positive"))
    assert g.find("cambridgeltl/mbert-task-sft-pos").predicts is False
    assert not g.hub_answered and "the Hub did not answer (test)" in g.status


def test_select_by_base_kind_and_language():
    g = catalogue_gallery("test")
    jav = g.select(base="xlm-roberta-base", kind="language", language="Javanese").entries
    assert [e.id for e in jav] == ["cambridgeltl/xlmr-lang-sft-jav-small"]
    assert g.select(base="xlmr", language="JAV").entries == jav
    assert g.select(base="mbert", language="jav").entries == ()
    tasks = g.select(kind="task", base="FacebookAI/xlm-roberta-base").entries
    assert tasks and all(e.kind == "task" and e.id.startswith("cambridgeltl/xlmr-task-sft-") for e in tasks)
    with pytest.raises(DeftxError, match="not in the gallery"):
        g.find("me/nothing")


# ---- the Hub --------------------------------------------------------------------------------------
def test_gallery_from_the_hub(hub_server, mlm_model, tiny_cls_model, tmp_path):
    released_repos(hub_server, tmp_path, mlm_model, tiny_cls_model)
    g = load_gallery(timeout=10)
    assert g.hub_answered and g.reason == "" and hub_server.url in g.status
    assert [e.id for e in g.entries] == ["cambridgeltl/xlmr-lang-sft-jav-small",
                                         "cambridgeltl/xlmr-task-sft-nusax_senti",
                                         "cambridgeltl/xlmr-task-sft-squadv1-ms",
                                         "cambridgeltl/mbert-lang-sft-bxr-small",
                                         "cambridgeltl/mbert-lang-sft-wol-small"]
    jav = g.find("cambridgeltl/xlmr-lang-sft-jav-small")
    assert (jav.source, jav.kind, jav.language, jav.language_name, jav.note) == (
        "hub", "language", "jav", "Javanese", "")
    senti = g.find("cambridgeltl/xlmr-task-sft-nusax_senti")
    assert senti.labels == ("negative", "neutral", "positive") and senti.predicts  # from the catalogue
    assert "Predict runs sequence classification only" in g.find("cambridgeltl/xlmr-task-sft-squadv1-ms").note
    assert [m for m, _ in hub_server.requests if _.startswith("/api/models?")] == ["GET", "GET"]


def test_pick_and_pull_a_task_and_a_language_vector(hub_server, mlm_model, tiny_cls_model, tmp_path):
    """gallery -> pick task + language on one base -> pull both -> vectors that compose on a classifier."""
    released_repos(hub_server, tmp_path, mlm_model, tiny_cls_model)
    g = load_gallery(timeout=10)
    task = g.select(kind="task", task="sentiment").entries[0]
    lang = g.select(base=task.base_model, kind="language", language="jav").entries[0]
    task_dir, lang_dir = pull_entries([task, lang], tmp_path / "vectors")
    tv, lv = SparseVector.load(task_dir), SparseVector.load(lang_dir)
    assert tv.meta.label_names == ["negative", "neutral", "positive"]
    assert (tv.meta.base_model, lv.meta.base_model) == (task.base_model, task.base_model)
    assert (lv.meta.kind, lv.meta.language) == ("language", "jav")
    assert check_same_base(tv, lv) == "FacebookAI/xlm-roberta-base"
    tv.apply(tiny_cls_model)
    lv.apply(tiny_cls_model)  # the MLM head's diffs were left out: it fits the classifier


def test_mismatched_bases_are_refused_before_any_download(hub_server, tmp_path):
    g = catalogue_gallery("test")
    task, lang = g.find("cambridgeltl/xlmr-task-sft-nusax_senti"), g.find("cambridgeltl/mbert-lang-sft-wol-small")
    with pytest.raises(DeftxError, match="mbert-lang-sft-wol-small was made for google-bert/bert-base-multilingual"
                                         "-cased, but the task vector cambridgeltl/xlmr-task-sft-nusax_senti for "
                                         "FacebookAI/xlm-roberta-base"):
        pull_entries([task, lang], tmp_path / "v")
    assert hub_server.requests == [] and not (tmp_path / "v").exists()


def test_check_same_base_on_vectors_and_names(tiny_cls_model):
    a = make_vector(tiny_cls_model, base_model="xlm-roberta-base")
    b = make_vector(tiny_cls_model, kind="language", base_model="FacebookAI/xlm-roberta-base")
    assert check_same_base(a, b, "xlmr") == "xlm-roberta-base"
    assert base_key("FacebookAI/XLM-RoBERTa-base") == base_key("xlmr") != base_key("mbert")
    with pytest.raises(DeftxError, match=r"the language vector \(xx\) was made for tiny"):
        check_same_base(a, make_vector(tiny_cls_model, kind="language", base_model="tiny"))
    with pytest.raises(DeftxError, match="does not say which base model"):
        check_same_base(a, GalleryEntry("me/v", "language", "", "pushed"))


# ---- when the Hub does not answer -----------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_mode_answers_from_the_catalogue(hub_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    g = load_gallery(timeout=10)
    assert not g.hub_answered and g.reason == "offline mode: HF_HUB_OFFLINE is set" and hub_server.requests == []
    assert len(g.entries) == len(catalogue_gallery("x").entries)
    assert all(e.source == "catalogue" and "needs the Hub" in e.note for e in g.entries)


def test_unreachable_endpoint_answers_from_the_catalogue_at_once(hub_server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    g = load_gallery(timeout=10)
    assert time.monotonic() - start < 2  # not the client's retries (~30 s)
    assert not g.hub_answered and "cannot connect" in g.reason and g.entries


def test_a_hub_slower_than_the_timeout_is_not_waited_for(hub_server):
    hub_server.delay = 3.0
    start = time.monotonic()
    g = load_gallery(timeout=0.5)
    assert time.monotonic() - start < 2
    assert not g.hub_answered and "no answer within 0.5 s" in g.reason and g.entries


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_gallery_from_the_hub(hub_server, mlm_model, tiny_cls_model, tmp_path, capsys):
    released_repos(hub_server, tmp_path, mlm_model, tiny_cls_model)
    assert main(["gallery", "--base", "xlmr", "--kind", "language"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"from the Hub at {hub_server.url}")
    assert re.match(r"cambridgeltl/xlmr-lang-sft-jav-small +language +FacebookAI/xlm-roberta-base +jav Javanese$",
                    out[2])
    assert len(out) == 4 and out[3] == "1 vector"
    assert main(["gallery", "--json", "--kind", "task"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hub_answered"] is True
    assert [e["id"] for e in data["entries"]] == ["cambridgeltl/xlmr-task-sft-nusax_senti",
                                                  "cambridgeltl/xlmr-task-sft-squadv1-ms"]


def test_cli_gallery_offline_in_a_fresh_process(tmp_path):
    """As a user runs it with no network: an endpoint that refuses connections; quick, no traceback."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "deftx_engine.cli", "gallery", "--language", "jav"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert time.monotonic() - start < 20  # an import of the CLI, not the Hub client's retries
    lines = done.stdout.splitlines()
    assert lines[0].startswith("the Hub did not answer (cannot connect to 127.0.0.1")
    assert "cambridgeltl/xlmr-lang-sft-jav-small" in done.stdout and "needs the Hub" in lines[2]
    assert lines[-1] == "1 vector; downloading any needs the Hub"


def test_cli_from_the_gallery_to_a_prediction(hub_server, tmp_path, capsys):
    """The issue's path through the CLI, over HTTP to the local Hub: gallery -> pull the released task and
    language vectors -> predict with both (the base model itself fetched from the Hub)."""
    from tiny import RELEASED, XLMR, publish_tiny_release

    publish_tiny_release(hub_server, tmp_path / "release")
    assert main(["gallery", "--base", "xlmr"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("from the Hub") and RELEASED["language"] in listed and RELEASED["task"] in listed
    for kind in ("task", "language"):
        assert main(["pull", RELEASED[kind], "--output-dir", str(tmp_path / kind)]) == 0
    capsys.readouterr()
    assert main(["predict", "--task", str(tmp_path / "task"), "--language", str(tmp_path / "language"),
                 "--text", "apik tenan"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and "apik tenan" in rows[1]  # a header and one prediction
    assert any(r[1].startswith(f"/{XLMR}/resolve/") for r in hub_server.requests)  # the base came over HTTP
