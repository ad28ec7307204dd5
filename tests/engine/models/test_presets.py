"""Every preset resolves to a valid TrainConfig for both kinds; explicit options win."""
import dataclasses

import pytest

from deftx_engine.constants import DEFAULT_K, KINDS
from deftx_engine.errors import ConfigError
from deftx_engine.models.presets import PRESETS, preset
from deftx_engine.training.train import TrainConfig

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_preset_is_a_valid_config(name, kind):
    values = preset(name, kind)
    assert set(values) <= FIELDS, set(values) - FIELDS
    cfg = TrainConfig(kind=kind, data="data.txt", **values)
    assert cfg.kind == kind and cfg.k > 0
    assert cfg.full_steps or cfg.full_epochs
    assert cfg.sparse_steps or cfg.sparse_epochs


def test_cpu_demo_uses_the_default_k_and_explicit_options_win():
    for kind in KINDS:
        assert preset("cpu-demo", kind)["k"] == DEFAULT_K[kind]
    cfg = TrainConfig(kind="task", data="d.csv", **{**preset("cpu-demo", "task"), "lr": 1e-3})
    assert cfg.lr == 1e-3


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown preset 'gpu'; choose one of: paper-xlmr-base, cpu-demo"):
        preset("gpu", "task")
