"""Hub push/pull (composable-sft folders are converted on the way), through the real ``huggingface_hub`` client
over HTTP to the local Hub of tests/hub_server.py (the ``hub_server`` fixture); nothing replaces the client."""
import hashlib
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from deftx_engine.errors import DeftxError, VectorError
from deftx_engine.hub.gallery import load_gallery
from deftx_engine.hub.transfer import pull_vector, push_vector
from deftx_engine.method.vectors import CONFIG_FILE, WEIGHTS_FILE, SparseVector
from tiny import assert_same_vector, make_vector, write_composable_sft, write_released_sft

TOKEN = "hf_SuperSecretToken1234567890abcdef"
OUR_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def saved(hub, repo_id: str, folder: Path) -> Path:
    """The files the Hub holds for ``repo_id``, written into ``folder``."""
    folder.mkdir(parents=True)
    for name, data in hub.repos[repo_id].files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def vector_dir(tiny_cls_model, tmp_path):
    vec = make_vector(tiny_cls_model, k=150, seed=3)
    vec.meta.denoise = {"rank_policy": "energy", "energy": 0.9, "rank": 100, "residual_share": 0.05}
    vec.meta.n_maskable = 10_000
    return vec.save(tmp_path / "vec")


@pytest.fixture
def no_env_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


def error_chain(e: BaseException) -> list[BaseException]:
    chain, cur = [], e
    while cur is not None:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


# ---- push -----------------------------------------------------------------------------------------
def test_push_uploads_vector_and_card(hub_server, vector_dir, tmp_path, no_env_token, caplog):
    before = digest(vector_dir)
    with caplog.at_level(logging.DEBUG):
        url = push_vector(vector_dir, "me/tiny-xx", token=hub_server.token, private=True,
                          metrics={"f1": 0.81234, "accuracy": 0.9})
    assert url == f"{hub_server.url}/me/tiny-xx"
    repo = hub_server.repos["me/tiny-xx"]
    assert repo.private is True and repo.commits == 1
    assert set(repo.files) == OUR_FILES
    assert digest(vector_dir) == before  # the source folder is untouched (no README.md added)
    uploaded = saved(hub_server, "me/tiny-xx", tmp_path / "uploaded")
    assert_same_vector(SparseVector.load(uploaded), SparseVector.load(vector_dir))
    assert all(hub_server.token.encode() not in data for data in repo.files.values())
    assert hub_server.token not in caplog.text
    assert [r for r in hub_server.requests if r[0] == "POST"] == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/me/tiny-xx/preupload/main"), ("POST", "/api/models/me/tiny-xx/commit/main")]

    card = ModelCard.load(uploaded / "README.md")
    assert card.data.base_model == "tiny"
    assert card.data.library_name == "deftx"
    assert card.data.language == "xx"
    assert {"deftx", "sparse-fine-tuning", "cross-lingual-transfer", "task"} <= set(card.data.tags)
    assert {"deftx-kind-task", "deftx-lang-xx"} <= set(card.data.tags)  # what the gallery filters on
    text = card.text
    assert "**k** (nonzero entries): 150" in text
    assert "**method**: deftx" in text
    assert "1.5000% of the 10,000 maskable" in text
    assert "energy" in text and "0.9" in text and "0.05" in text  # rank policy and rho
    assert "`neg`, `neu`, `pos`" in text
    assert "| f1 | 0.8123 |" in text and "| accuracy | 0.9 |" in text
    assert 'SparseVector.load("vectors/tiny-xx").apply(model)' in text
    assert "deftx pull me/tiny-xx --output-dir vectors/tiny-xx" in text


def test_pushed_vector_is_pulled_back_equal_and_listed_by_the_gallery(hub_server, tiny_cls_model, tmp_path):
    """push -> the Hub's listing (tag filter, card data) -> the gallery entry -> pull: the same vector."""
    vec = make_vector(tiny_cls_model, kind="language", seed=4, heads=False, base_model="FacebookAI/xlm-roberta-base")
    vec.meta.language = "jav"
    push_vector(vec.save(tmp_path / "jav"), "me/jav-language")  # the token from HF_TOKEN
    listed = list(HfApi().list_models(filter=["deftx", "deftx-kind-language", "deftx-lang-jav"]))
    assert [m.id for m in listed] == ["me/jav-language"]
    assert list(HfApi().list_models(filter=["deftx", "deftx-kind-task"])) == []

    gallery = load_gallery(timeout=10)
    assert gallery.hub_answered and hub_server.url in gallery.status
    entry = gallery.find("me/jav-language")
    assert (entry.source, entry.kind, entry.language, entry.language_name) == ("pushed", "language", "jav", "Javanese")
    assert entry.base_model == "FacebookAI/xlm-roberta-base" and entry.note == ""
    assert gallery.select(base="xlmr", kind="language", language="Javanese").entries == (entry,)
    assert gallery.select(base="mbert").entries == ()

    dest = pull_vector(entry.id, tmp_path / "pulled")
    assert {p.name for p in dest.iterdir()} == OUR_FILES
    assert_same_vector(SparseVector.load(dest), SparseVector.load(tmp_path / "jav"))
    assert digest(dest)[WEIGHTS_FILE] == digest(tmp_path / "jav")[WEIGHTS_FILE]


def test_push_to_an_existing_repo_adds_a_commit(hub_server, vector_dir):
    push_vector(vector_dir, "me/v", token=hub_server.token)
    url = push_vector(vector_dir, "me/v", token=hub_server.token)  # 409 on creation is "exists": fine
    assert url == f"{hub_server.url}/me/v" and hub_server.repos["me/v"].commits == 2


def test_push_takes_token_from_env(hub_server, vector_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)  # the server refuses a push without it
    vec = SparseVector.load(vector_dir)
    vec.meta.metrics = {"sw": {"f1": 0.5}}
    vec.meta.language = ""
    vec.save(vector_dir)
    push_vector(vector_dir, "me/v")
    card = ModelCard.load(saved(hub_server, "me/v", tmp_path / "up") / "README.md")
    assert card.data.get("language") is None  # no language in the meta: none in the card
    assert not any(t.startswith("deftx-lang-") for t in card.data.tags)
    assert "| sw / f1 | 0.5 |" in card.text  # metrics from meta.metrics when none are passed


def test_push_without_token_fails_before_any_call(hub_server, vector_dir, no_env_token):
    with pytest.raises(DeftxError, match="needs a Hugging Face token: set HF_TOKEN or pass --token"):
        push_vector(vector_dir, "me/v")
    assert hub_server.requests == []


def test_push_invalid_vector_fails_before_any_call(hub_server, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VectorError, match=CONFIG_FILE):
        push_vector(tmp_path / "empty", "me/v", token=TOKEN)
    assert hub_server.requests == []


def test_push_error_never_shows_the_token(hub_server, vector_dir, caplog):
    """The server's 401 quotes the Authorization header it got; the error the user sees hides the token."""
    with caplog.at_level(logging.DEBUG), pytest.raises(DeftxError) as info:
        push_vector(vector_dir, "me/v", token=TOKEN)
    e = info.value
    assert "me/v" in str(e) and "401" in str(e)
    chain = error_chain(e)  # neither the message nor any chained exception carries the token
    assert all(TOKEN not in str(x) and TOKEN not in repr(x) for x in chain)
    assert len(chain) == 1
    # our log lines (the HTTP library's own debug trace quotes the server's headers verbatim)
    assert not any(TOKEN in r.getMessage() for r in caplog.records if r.name.startswith("deftx_engine"))
    assert "me/v" not in hub_server.repos


# ---- pull: our format -----------------------------------------------------------------------------
def test_pull_downloads_our_format_bit_exactly(hub_server, vector_dir, tmp_path, no_env_token):
    (vector_dir / "README.md").write_text("card")
    repo = hub_server.add_repo("me/tiny-xx", {**{p.name: p.read_bytes() for p in vector_dir.iterdir()},
                                              "notes.txt": b"not a vector file"})
    dest = pull_vector("me/tiny-xx", tmp_path / "out" / "v", revision=repo.sha)
    assert ("GET", f"/api/models/me/tiny-xx/tree/{repo.sha}?recursive=true&expand=false") in hub_server.requests
    assert not any("notes.txt" in path for _, path in hub_server.requests)  # only the vector's files
    assert {p.name for p in dest.iterdir()} == OUR_FILES  # no .cache, nothing else
    assert digest(dest) == digest(vector_dir)
    assert_same_vector(SparseVector.load(dest), SparseVector.load(vector_dir))
    assert [p.name for p in dest.parent.iterdir()] == ["v"]  # the work folder is gone


def test_pull_through_api_and_replaces_existing_dest(hub_server, vector_dir, tiny_cls_model, tmp_path):
    dest = make_vector(tiny_cls_model, seed=9).save(tmp_path / "dest")
    hub_server.add_repo("me/v", vector_dir)
    pull_vector("me/v", dest, api=HfApi())
    assert_same_vector(SparseVector.load(dest), SparseVector.load(vector_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "vec"]


def test_pull_local_folder_does_not_download_or_modify(hub_server, vector_dir, tmp_path):
    before = digest(vector_dir)
    dest = pull_vector(str(vector_dir), tmp_path / "copy")
    assert digest(vector_dir) == before
    assert_same_vector(SparseVector.load(dest), SparseVector.load(vector_dir))
    assert hub_server.requests == []


def test_pull_validates_against_a_given_model(vector_dir, tmp_path, tiny_cls_model, mlm_model):
    pull_vector(str(vector_dir), tmp_path / "ok", model=tiny_cls_model)
    with pytest.raises(VectorError, match="the model has no parameter"):  # no pooler, no classifier in an MLM model
        pull_vector(str(vector_dir), tmp_path / "bad", model=mlm_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "vec"]


def test_pull_download_error_is_scrubbed_and_leaves_nothing(hub_server, vector_dir, tmp_path):
    """A private repo and a wrong token: the server's 401 quotes the token; the error hides it, nothing is left."""
    hub_server.add_repo("me/v", vector_dir, private=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DeftxError, match="me/v") as info:
        pull_vector("me/v", out / "v", token=TOKEN)
    assert all(TOKEN not in str(x) and TOKEN not in repr(x) for x in error_chain(info.value))
    assert info.value.__context__ is None
    with pytest.raises(DeftxError, match="no/such-repo"):
        pull_vector("no/such-repo", out / "v")
    assert list(out.iterdir()) == []
    pull_vector("me/v", out / "v")  # with the right token (HF_TOKEN): fine
    assert_same_vector(SparseVector.load(out / "v"), SparseVector.load(vector_dir))


# ---- pull: composable-sft (the conversion itself: test_composable_sft.py) ----------------------------
def test_pull_converts_composable_sft(hub_server, mlm_model, tmp_path):
    src = tmp_path / "csft"
    diffs = write_composable_sft(mlm_model, src)
    hub_server.add_repo("cambridgeltl/tiny-lang-sft-sw-small", src)
    dest = pull_vector("cambridgeltl/tiny-lang-sft-sw-small", tmp_path / "v")

    vec = SparseVector.load(dest)
    assert vec.meta.kind == "language" and vec.meta.language == "sw" and vec.meta.method == "lt-sft"
    assert vec.meta.base_model == "tiny-bert" and vec.meta.base_fingerprint == ""
    assert vec.meta.converted_from == "composable-sft"
    assert vec.heads == {} and not any(n.startswith("cls.") for n in vec.indices)
    assert all(i.dtype == torch.int32 for i in vec.indices.values())
    assert vec.meta.k == vec.nnz == sum(int((d != 0).sum()) for n, d in diffs.items() if n.startswith("bert."))

    theta0 = {n: p.detach().clone() for n, p in mlm_model.named_parameters()}
    vec.apply(mlm_model)
    for name, p in mlm_model.named_parameters():
        if name.startswith("bert."):
            assert torch.equal(p.detach(), theta0[name] + diffs[name]), name
        else:
            assert torch.equal(p.detach(), theta0[name]), name  # MLM head untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pull_converts_released_composable_sft_layout(hub_server, mlm_model, tiny_cls_model, tmp_path):
    """A language and a task SFT as composable-sft's SFT.save writes the released ones ({'diffs', 'abs'}, index
    steps led by a numpy int64), served over HTTP (pytorch_diff.bin through the CDN redirect): pulled, they
    compose on a classifier to theta0 + the diffs, with the task's head and labels."""
    lang_diffs, _ = write_released_sft(mlm_model, tmp_path / "lang", kind="language", seed=0)
    task_diffs, task_abs = write_released_sft(tiny_cls_model, tmp_path / "task", kind="task", seed=2)
    assert lang_diffs["cls.predictions.transform.LayerNorm.weight"].any()  # a head diff that must be left out
    assert any(not d.any() for d in lang_diffs.values())  # and an empty diff ("index_steps": [])
    hub_server.add_repo("cambridgeltl/xlmr-lang-sft-jav-small", tmp_path / "lang")
    hub_server.add_repo("cambridgeltl/xlmr-task-sft-nusax_senti", tmp_path / "task")
    lang = SparseVector.load(pull_vector("cambridgeltl/xlmr-lang-sft-jav-small", tmp_path / "jav", model=mlm_model))
    task = SparseVector.load(pull_vector("cambridgeltl/xlmr-task-sft-nusax_senti", tmp_path / "senti",
                                         label_names=["negative", "neutral", "positive"]))
    assert any(path.startswith("/blobs/") for _, path in hub_server.requests)  # the LFS-style download
    assert (lang.meta.kind, lang.meta.language, task.meta.kind) == ("language", "jav", "task")
    assert task.meta.label_names == ["negative", "neutral", "positive"]
    assert set(task.heads) == set(task_abs)

    model = tiny_cls_model
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    task.apply(model)
    lang.apply(model)
    for name, p in model.named_parameters():
        want = task_abs[name] if name in task_abs else theta0[name] + task_diffs[name] + (
            lang_diffs[name] if name in lang_diffs else 0)
        assert torch.allclose(p.detach(), want, atol=1e-7), name


BIAS = "bert.encoder.layer.0.output.dense.bias"


@pytest.mark.parametrize("content", ["garbage", "non-tensor", "bad-shape"])
def test_failed_conversion_leaves_no_partial_dest(content, tmp_path, tiny_cls_model, mlm_model):
    old = make_vector(tiny_cls_model, seed=5).save(tmp_path / "out" / "old")
    before = digest(old)
    src = tmp_path / "csft"
    src.mkdir()
    if content == "garbage":
        (src / "pytorch_diff.bin").write_bytes(b"\x80\x02not a pickle at all")
    elif content == "non-tensor":
        torch.save({BIAS: "hello"}, src / "pytorch_diff.bin")
    else:  # loads fine, but does not fit the model given: fails at validation, after conversion
        torch.save({BIAS: torch.ones(7)}, src / "pytorch_diff.bin")
    why = {"garbage": "refused without running", "non-tensor": "is a str", "bad-shape": "has shape"}[content]
    with pytest.raises(VectorError, match=why):
        pull_vector(str(src), tmp_path / "out" / "new", model=mlm_model)
    with pytest.raises(VectorError, match="pytorch_diff.bin"):
        pull_vector(str(src), old, model=mlm_model)  # an existing dest stays as it was
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old"]
    assert digest(old) == before


def test_pull_of_unknown_folder_is_a_vector_error(hub_server, tmp_path):
    with pytest.raises(VectorError, match="not a folder"):
        pull_vector(str(tmp_path / "missing"), tmp_path / "dest")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(VectorError, match="neither a DeFT-X vector"):
        pull_vector(str(tmp_path / "src"), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert hub_server.requests == []  # a path is never taken for a repo id
