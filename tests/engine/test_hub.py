"""Hub push/pull (composable-sft folders are converted on the way). Nothing contacts the Hub: HfApi and
snapshot_download are fakes."""
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import deftx_engine.hub as hub
from deftx_engine.errors import DeftxError, VectorError
from deftx_engine.hub import pull_vector, push_vector
from deftx_engine.vectors import CONFIG_FILE, WEIGHTS_FILE, SparseVector
from tiny import assert_same_vector, make_vector, write_composable_sft

TOKEN = "hf_SuperSecretToken1234567890abcdef"
OUR_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}


# ---- fakes ----------------------------------------------------------------------------------------
class FakeApi:
    """Records create_repo / upload_folder / snapshot_download; copies uploads to ``store``."""

    def __init__(self, store: Path, fail_with: Exception | None = None, snapshot_from: Path | None = None):
        self.store, self.fail_with, self.snapshot_from = store, fail_with, snapshot_from
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", (repo_id,), kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", (), kw))
        if self.fail_with is not None:
            raise self.fail_with
        shutil.copytree(kw["folder_path"], self.store / "uploaded")
        return "commit"

    def snapshot_download(self, repo_id, **kw):
        self.calls.append(("snapshot_download", (repo_id,), kw))
        return fake_snapshot(self.snapshot_from, kw["local_dir"])


def fake_snapshot(src: Path, local_dir) -> str:
    """What snapshot_download(local_dir=...) leaves: the repo files plus its .cache metadata folder."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / ".cache" / "huggingface").mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy2(f, local_dir / f.name)
    return str(local_dir)


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def vector_dir(tiny_cls_model, tmp_path):
    vec = make_vector(tiny_cls_model, k=150, seed=3)
    vec.meta.denoise = {"rank_policy": "energy", "energy": 0.9, "rank": 100, "residual_share": 0.05}
    vec.meta.extra = {"n_maskable": 10_000}
    return vec.save(tmp_path / "vec")


@pytest.fixture
def no_env_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


# ---- push -----------------------------------------------------------------------------------------
def test_push_uploads_vector_and_card(vector_dir, tmp_path, no_env_token, caplog):
    before = digest(vector_dir)
    api = FakeApi(tmp_path)
    with caplog.at_level(logging.DEBUG):
        url = push_vector(vector_dir, "me/tiny-xx", token=TOKEN, private=True, api=api,
                          metrics={"f1": 0.81234, "accuracy": 0.9})
    assert url == "https://huggingface.co/me/tiny-xx"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    _, args, kw = api.calls[0]
    assert args == ("me/tiny-xx",)
    assert kw["private"] is True and kw["exist_ok"] is True and kw["repo_type"] == "model"
    up = api.calls[1][2]
    assert up["repo_id"] == "me/tiny-xx" and up["repo_type"] == "model"
    assert Path(up["folder_path"]) != vector_dir and not Path(up["folder_path"]).exists()  # staged, cleaned up

    uploaded = tmp_path / "uploaded"
    assert {p.name for p in uploaded.iterdir()} == OUR_FILES
    assert digest(vector_dir) == before  # the source folder is untouched (no README.md added)
    assert_same_vector(SparseVector.load(uploaded), SparseVector.load(vector_dir))
    for p in uploaded.iterdir():
        assert TOKEN.encode() not in p.read_bytes()
    assert TOKEN not in caplog.text

    card = ModelCard.load(uploaded / "README.md")
    assert card.data.base_model == "tiny"
    assert card.data.library_name == "deftx"
    assert card.data.language == "xx"
    assert {"deftx", "sparse-fine-tuning", "cross-lingual-transfer", "task"} <= set(card.data.tags)
    text = card.text
    assert "**k** (nonzero entries): 150" in text
    assert "**method**: deftx" in text
    assert "1.5000% of the 10,000 maskable" in text
    assert "energy" in text and "0.9" in text and "0.05" in text  # rank policy and rho
    assert "`neg`, `neu`, `pos`" in text
    assert "| f1 | 0.8123 |" in text and "| accuracy | 0.9 |" in text
    assert 'SparseVector.load("vectors/tiny-xx").apply(model)' in text
    assert "deftx pull me/tiny-xx --output-dir vectors/tiny-xx" in text


def test_push_takes_token_from_env_and_builds_hfapi_with_it(vector_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    made = []

    def fake_hfapi(**kw):
        made.append(kw)
        return FakeApi(tmp_path)

    monkeypatch.setattr(hub, "HfApi", fake_hfapi)
    vec = SparseVector.load(vector_dir)
    vec.meta.extra["metrics"] = {"sw": {"f1": 0.5}}
    vec.meta.language = ""
    vec.save(vector_dir)
    push_vector(vector_dir, "me/v")
    assert made == [{"token": TOKEN}]
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.get("language") is None  # no language in the meta: none in the card
    assert "| sw / f1 | 0.5 |" in card.text  # metrics from meta.extra when none are passed


def test_push_without_token_fails_before_any_call(vector_dir, tmp_path, monkeypatch, no_env_token):
    api = FakeApi(tmp_path)
    monkeypatch.setattr(hub, "HfApi", lambda **kw: pytest.fail("HfApi must not be built without a token"))
    with pytest.raises(DeftxError, match="needs a Hugging Face token: set HF_TOKEN or pass --token"):
        push_vector(vector_dir, "me/v", api=api)
    with pytest.raises(DeftxError, match="HF_TOKEN"):
        push_vector(vector_dir, "me/v")
    assert api.calls == []


def test_push_invalid_vector_fails_before_any_call(tmp_path):
    api = FakeApi(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VectorError, match=CONFIG_FILE):
        push_vector(tmp_path / "empty", "me/v", token=TOKEN, api=api)
    assert api.calls == []


def test_push_error_never_shows_the_token(vector_dir, tmp_path, caplog):
    err = RuntimeError(f"401 Unauthorized for token {TOKEN} (Authorization: Bearer {TOKEN})")
    api = FakeApi(tmp_path, fail_with=err)
    with caplog.at_level(logging.DEBUG), pytest.raises(DeftxError) as info:
        push_vector(vector_dir, "me/v", token=TOKEN, api=api)
    e = info.value
    assert "me/v" in str(e) and "401 Unauthorized" in str(e)
    chain, cur = [], e
    while cur is not None:  # neither the message nor any chained exception carries the token
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    assert all(TOKEN not in str(x) and TOKEN not in repr(x) for x in chain)
    assert len(chain) == 1
    assert TOKEN not in caplog.text


# ---- pull: our format -----------------------------------------------------------------------------
def test_pull_downloads_our_format_bit_exactly(vector_dir, tmp_path, monkeypatch, no_env_token):
    (vector_dir / "README.md").write_text("card")
    seen = {}

    def fake_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return fake_snapshot(vector_dir, kw["local_dir"])

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    dest = pull_vector("me/tiny-xx", tmp_path / "out" / "v", token=TOKEN, revision="abc123")
    assert seen["repo_id"] == "me/tiny-xx" and seen["revision"] == "abc123" and seen["token"] == TOKEN
    assert {CONFIG_FILE, WEIGHTS_FILE, "README.md", "pytorch_diff.bin"} <= set(seen["allow_patterns"])
    assert {p.name for p in dest.iterdir()} == OUR_FILES  # no .cache, nothing else
    assert digest(dest)[WEIGHTS_FILE] == digest(vector_dir)[WEIGHTS_FILE]
    assert_same_vector(SparseVector.load(dest), SparseVector.load(vector_dir))
    assert [p.name for p in dest.parent.iterdir()] == ["v"]  # the work folder is gone


def test_pull_through_api_and_replaces_existing_dest(vector_dir, tiny_cls_model, tmp_path):
    dest = make_vector(tiny_cls_model, seed=9).save(tmp_path / "dest")
    api = FakeApi(tmp_path, snapshot_from=vector_dir)
    pull_vector("me/v", dest, api=api)
    assert api.calls[0][0] == "snapshot_download"
    assert_same_vector(SparseVector.load(dest), SparseVector.load(vector_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "vec"]


def test_pull_local_folder_does_not_download_or_modify(vector_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("a local folder is not downloaded"))
    before = digest(vector_dir)
    dest = pull_vector(str(vector_dir), tmp_path / "copy")
    assert digest(vector_dir) == before
    assert_same_vector(SparseVector.load(dest), SparseVector.load(vector_dir))


def test_pull_validates_against_a_given_model(vector_dir, tmp_path, tiny_cls_model, mlm_model):
    pull_vector(str(vector_dir), tmp_path / "ok", model=tiny_cls_model)
    with pytest.raises(VectorError, match="the model has no parameter"):  # no pooler, no classifier in an MLM model
        pull_vector(str(vector_dir), tmp_path / "bad", model=mlm_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "vec"]


def test_pull_download_error_is_scrubbed_and_leaves_nothing(tmp_path, monkeypatch):
    def failing(repo_id, **kw):
        Path(kw["local_dir"]).mkdir(parents=True)
        (Path(kw["local_dir"]) / CONFIG_FILE).write_text("{half")
        raise OSError(f"connection reset while sending token={TOKEN}")

    monkeypatch.setattr(hub, "snapshot_download", failing)
    with pytest.raises(DeftxError, match="me/v") as info:
        pull_vector("me/v", tmp_path / "out", token=TOKEN)
    assert TOKEN not in str(info.value) and info.value.__context__ is None
    assert list(tmp_path.iterdir()) == []


# ---- pull: composable-sft (the conversion itself: test_composable_sft.py) ----------------------------
def test_pull_converts_composable_sft(mlm_model, tmp_path, monkeypatch):
    src = tmp_path / "csft"
    diffs = write_composable_sft(mlm_model, src)
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: fake_snapshot(src, kw["local_dir"]))
    dest = pull_vector("cambridgeltl/tiny-lang-sft-sw-small", tmp_path / "v")

    vec = SparseVector.load(dest)
    assert vec.meta.kind == "language" and vec.meta.language == "sw" and vec.meta.method == "lt-sft"
    assert vec.meta.base_model == "tiny-bert" and vec.meta.base_fingerprint == ""
    assert vec.meta.extra["converted_from"] == "composable-sft"
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


def test_pull_of_unknown_folder_is_a_vector_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("a path is not a repo id"))
    with pytest.raises(VectorError, match="not a folder"):
        pull_vector(str(tmp_path / "missing"), tmp_path / "dest")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(VectorError, match="neither a DeFT-X vector"):
        pull_vector(str(tmp_path / "src"), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_calls_match_the_installed_huggingface_hub_signatures(vector_dir, tmp_path):
    """The real HfApi with its methods autospec'ed: a wrong keyword would raise TypeError here."""
    from unittest import mock

    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    def download(self, repo_id, **kw):
        return fake_snapshot(vector_dir, kw["local_dir"])

    with mock.patch.object(HfApi, "create_repo", autospec=True,
                           return_value=RepoUrl("https://huggingface.co/me/v")) as cr, \
            mock.patch.object(HfApi, "upload_folder", autospec=True) as uf, \
            mock.patch.object(HfApi, "snapshot_download", autospec=True, side_effect=download) as sd:
        assert push_vector(vector_dir, "me/v", token=TOKEN) == "https://huggingface.co/me/v"
        pull_vector("me/v", tmp_path / "pulled", api=HfApi(token=TOKEN))
    assert cr.call_count == uf.call_count == sd.call_count == 1
    assert cr.call_args.args[0].token == TOKEN  # HfApi(token=...) was built with the token
    assert_same_vector(SparseVector.load(tmp_path / "pulled"), SparseVector.load(vector_dir))
