"""Named settings for ``deftx train-* --preset``. Explicit options always win over a preset."""
from __future__ import annotations

from ..constants import DEFAULT_K
from ..errors import ConfigError

PRESETS: dict[str, dict[str, dict]] = {
    # The paper's setting for xlm-roberta-base on a GPU. k are the paper's counts (2.8 % and 5.2 % of the
    # model); lr 5e-5 (MLM) and 2e-5 (task); energy 0.90, rho 0.05; LayerNorm frozen. Steps follow LT-SFT
    # (Ansell et al., 2022): 100k steps per phase for language SFTs (batch 8, length 256) and 5 epochs per
    # phase for task SFTs (batch 32, length 128).
    "paper-xlmr-base": {
        "common": dict(base_model="FacebookAI/xlm-roberta-base", method="deftx", rank_policy="energy",
                       energy=0.90, residual_share=0.05, seed=42, save_steps=5000, logging_steps=100),
        "language": dict(k=7_667_712, lr=5e-5, full_steps=100_000, sparse_steps=100_000, batch_size=8,
                         max_length=256),
        "task": dict(k=14_155_776, lr=2e-5, full_epochs=5, sparse_epochs=5, batch_size=32, max_length=128),
    },
    # A language + task SFT of the offline multilingual default on a few hundred sentences in a few minutes on
    # 2 CPU cores (English task data -> Indonesian: macro-F1 0.93 on assets/examples/target_eval_id.csv).
    "cpu-demo": {
        "common": dict(base_model="multilingual-e5-small", method="deftx", rank_policy="energy", energy=0.90,
                       residual_share=0.05, seed=42, max_length=64, batch_size=16, save_steps=50,
                       logging_steps=5),
        "language": dict(k=DEFAULT_K["language"], lr=1e-4, full_steps=60, sparse_steps=60),
        "task": dict(k=DEFAULT_K["task"], lr=2e-4, full_epochs=2, sparse_epochs=2),  # 5e-5 underfits 300 examples
    },
}


def preset(name: str, kind: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[name]["common"], **PRESETS[name][kind]}
