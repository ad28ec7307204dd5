"""Names and defaults shared by the trainer, the CLI, the web app and the benchmarks.

Torch-free, so the web app can import it at start-up. The ``Literal`` types are the single source of the
allowed values; the tuples are derived from them.
"""
from __future__ import annotations

from typing import Literal, get_args

Kind = Literal["language", "task"]
Method = Literal["deftx", "lt-sft"]  # deftx: SVD-denoise the phase-1 delta before the top-k; lt-sft: no denoising
# auto: bf16 autocast on CUDA (fp16 where the GPU lacks bf16) and on a CPU with native bf16 matrix units, float32
# elsewhere; see models/precision.py
Precision = Literal["auto", "fp32", "bf16"]

KINDS: tuple[str, ...] = get_args(Kind)
METHODS: tuple[str, ...] = get_args(Method)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# The paper's k: 2.8 % (language) and 5.2 % (task) of the maskable parameters.
DEFAULT_K: dict[str, float] = {"language": 0.028, "task": 0.052}
# How vectors are combined: "sum" adds them (theta0 + phi_task + phi_language); "ties" is TIES merging
# (merge.ties_merge) with these defaults: each vector keeps TIES_DENSITY of its entries, the result is
# scaled by TIES_LAMBDA.
MERGES: tuple[str, ...] = ("sum", "ties")
# Parameter groups a vector may be restricted to (TrainConfig.param_groups; params.param_group names them).
PARAM_GROUPS: tuple[str, ...] = ("embeddings", "attention", "ffn")
TIES_DENSITY = 0.2
TIES_LAMBDA = 1.0
