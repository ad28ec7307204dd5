"""``contact.model_unavailable``: a Hub model id is loadable when cached or when the Hub answers for it, and each
reason it is not is said in a user's words -- over HTTP to the local Hub of tests/hub_server.py."""
import socket

import pytest
from huggingface_hub import constants

from deftx_engine.hub.contact import model_unavailable


def test_a_model_the_hub_has_is_available_and_one_it_lacks_is_named(hub_server):
    hub_server.add_repo("someone/encoder", {"config.json": b"{}"})
    assert model_unavailable("someone/encoder", ask_hub=True) == ""
    assert model_unavailable("someone/no-such-encoder", ask_hub=True) == \
        "the Hugging Face Hub has no such model (or it is private)"
    assert model_unavailable("someone/no-such-encoder") == ""  # without asking: the Hub is reachable, that is all
    assert any("/api/models/someone/no-such-encoder" in r for r in map(str, hub_server.requests))


def test_a_cached_model_needs_no_hub(hub_server, monkeypatch):
    from huggingface_hub import hf_hub_download

    hub_server.add_repo("someone/encoder", {"config.json": b"{}"})
    hf_hub_download("someone/encoder", "config.json")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = len(hub_server.requests)
    assert model_unavailable("someone/encoder", ask_hub=True) == ""
    assert len(hub_server.requests) == asked


@pytest.mark.parametrize("offline", [True, False])
def test_without_a_hub_an_uncached_model_is_refused_with_the_reason(hub_server, monkeypatch, offline):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    why = model_unavailable("someone/encoder", ask_hub=True)
    assert why.startswith("it is not in the local model cache and the Hugging Face Hub ")
    assert ("switched off on this server (HF_HUB_OFFLINE is set)" if offline else
            f"at 127.0.0.1:{port} cannot be reached from this server (cannot connect") in why
