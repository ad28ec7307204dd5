"""Shared fixtures: tiny models built in-process (no downloads), seeded; helpers live in tiny.py."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tiny import require_nusax, tiny_bert_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# fitted MLM heads and built models go to a per-session cache, never the user's (inherited by subprocesses)
os.environ["DEFTX_CACHE"] = tempfile.mkdtemp(prefix="deftx-test-cache-")

NUSAX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nusax"


@pytest.fixture
def tiny_cls_model():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()


@pytest.fixture
def mlm_model():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config()).eval()


@pytest.fixture
def hub_server(monkeypatch, tmp_path_factory):
    """The local Hub (hub_server.py) with the real ``huggingface_hub`` client pointed at it: the client reads
    ``constants.ENDPOINT``/``HF_HUB_OFFLINE`` at call time; ``HF_ENDPOINT`` carries it into child processes."""
    from hub_server import HubServer, point_client_at

    with HubServer() as hub:
        point_client_at(monkeypatch, hub, tmp_path_factory.mktemp("hf-cache"))
        yield hub


@pytest.fixture
def nusax_dir():
    """The real NusaX data; skipped with the reason when it is absent, but a failure in CI (CI=true)."""
    return require_nusax(NUSAX)
