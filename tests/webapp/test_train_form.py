"""The Train tab's form (webapp/tabs/train_form.py): its fields are the /start_training API's parameters, each
wired to its control, and it reads into one TrainConfig."""
import inspect
from dataclasses import fields

import pytest

from deftx_engine.errors import DeftxError

# the parameters of /start_training, as gradio_client callers name them (before TrainForm, and ever since)
API = ["kind", "base_model", "data", "language", "name", "method", "rank_policy", "energy", "rank", "residual_share",
       "k_percent", "full_steps", "sparse_steps", "epochs", "lr", "batch_size", "max_length", "seed", "text_column",
       "pair_column", "label_column", "preset", "k_exact_value", "source_language_vector"]


def test_the_form_is_the_api_and_every_field_has_its_control():
    from webapp.components import bind
    from webapp.tabs import train
    from webapp.tabs.train_form import FORM_COMPONENTS, TrainForm

    params = inspect.signature(bind(train.start_training, None)).parameters
    assert list(params) == API == [f.name for f in fields(TrainForm)] == list(FORM_COMPONENTS)
    assert params["source_language_vector"].default is None
    assert all(p.default is inspect.Parameter.empty for n, p in params.items() if n != "source_language_vector")


def form(**over):
    from webapp.tabs.train_form import TrainForm

    values = dict(kind="task", base_model="minilm", data="hub:org/data", language="en", name="", method="deftx",
                  rank_policy="energy", energy=0.9, rank=100, residual_share=0.05, k_percent=2.0, full_steps=10,
                  sparse_steps=0, epochs=2, lr=1e-4, batch_size=8, max_length=64, seed=3, text_column=" text ",
                  pair_column="", label_column="", preset="custom", k_exact_value=None)
    return TrainForm(**{**values, **over})


class FakeStudio:
    def check_base_model(self, name):
        return name

    def check_path(self, path):
        raise AssertionError("a hub: spec is not a path")


def test_a_form_reads_into_one_train_config(monkeypatch):
    monkeypatch.delenv("DEFTX_MAX_LINES", raising=False)
    cfg = form().config(FakeStudio())
    assert (cfg.kind, cfg.data, cfg.k, cfg.full_steps, cfg.sparse_steps, cfg.sparse_epochs) == \
        ("task", "hub:org/data", 0.02, 10, 0, 2.0)
    assert cfg.text_column == "text" and cfg.pair_column is None and cfg.label_column == "label"
    assert form(k_percent=0.5, k_exact_value=[0.5, 1234]).config(FakeStudio()).k == 1234  # a preset's exact count
    with pytest.raises(DeftxError, match="batch size must be at least 1"):
        form(batch_size=0).config(FakeStudio())
    with pytest.raises(DeftxError, match="epochs per phase must be > 0"):
        form(epochs=0).config(FakeStudio())
    with pytest.raises(DeftxError, match="choose the kind of SFT"):
        form(kind="both").config(FakeStudio())
