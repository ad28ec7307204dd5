"""benchmarks/baselines.py: the dense baseline trains in the precision of the SFT it is compared with."""
import pytest

from benchmarks.baselines import dense_trainer
from deftx_engine.training.config import TrainConfig
from tiny import ASSETS, make_tiny_model_dir


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_dense_trainer_runs_in_the_configs_precision(tmp_path, precision):
    cfg = TrainConfig(kind="task", data=str(ASSETS / "source_task_en.csv"), language="en",
                      base_model=str(make_tiny_model_dir(tmp_path / "tiny")), full_steps=1, sparse_steps=1,
                      batch_size=4, max_length=16, precision=precision)
    args = dense_trainer(cfg, tmp_path / "dense").args
    assert (args.bf16, args.fp16) == (precision == "bf16", False)
