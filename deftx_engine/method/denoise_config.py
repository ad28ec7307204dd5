"""The settings of denoising (``DenoiseConfig``): torch-free, so the run config, the CLI and the app read and
check them without loading torch; ``denoise.py`` does the work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import ConfigError

RankPolicy = Literal["energy", "fixed"]
ResidualScope = Literal["changed", "matrix"]


@dataclass
class DenoiseConfig:
    """How each weight-matrix delta is split into a low-rank part and a sparse residual (``denoise.py``).

    rank_policy: "energy" -- smallest r whose cumulative sigma^2 reaches ``energy`` (the paper's choice);
                 "fixed"  -- r = ``rank``, clipped to min(m, n).
    energy: share of sum(sigma^2) that L must keep (0.90 as in the paper).
    rank: r for the fixed policy (100 as in the paper's fixed-rank ablation).
    residual_share: rho, share of the residual entries of each matrix kept in S (0.05; 0 drops S).
    residual_scope: what rho is a share of -- "changed": the rows phase 1 changed (a word-embedding delta is
                 nonzero only in the rows of the tokens the corpus uses; see ``denoise.py``); "matrix": every
                 entry of the matrix (before 0.9: such a delta kept its whole residual and was not denoised).
    """

    rank_policy: RankPolicy = "energy"
    energy: float = 0.90
    rank: int = 100
    residual_share: float = 0.05
    residual_scope: ResidualScope = "changed"

    def __post_init__(self) -> None:
        if self.rank_policy not in ("energy", "fixed"):
            raise ConfigError(f"rank_policy must be 'energy' or 'fixed', got {self.rank_policy!r}",
                              field="rank_policy")
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}", field="energy")
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}", field="rank")
        if not 0.0 <= self.residual_share <= 1.0:
            raise ConfigError(f"residual_share must be in [0, 1], got {self.residual_share}", field="residual_share")
        if self.residual_scope not in ("changed", "matrix"):
            raise ConfigError(f"residual_scope must be 'changed' or 'matrix', got {self.residual_scope!r}",
                              field="residual_scope")

    def to_dict(self) -> dict:
        return asdict(self)
