"""Which number format the training steps and scoring run in: bfloat16 autocast, or float32.

Why: most users train on a CPU (a free Space has 2 cores), and recent x86 CPUs carry bfloat16 matrix units
(``amx_bf16``, ``avx512_bf16``) that multiply several times faster than float32. Autocast runs the matrix
products in bf16 and keeps everything else where it was: the master weights, the optimizer state, the deltas,
the denoising, the masks and the saved vectors stay float32, so a vector has the same format whatever trained
it and ``revert`` stays bit-exact.

``auto`` is bf16 on CUDA where the GPU supports it (else fp16), as the trainer always did, and bf16 on a CPU
with native bf16 matrix instructions: measured on multilingual-e5-small (benchmarks/RESULTS.md), it scores 2x
faster and trains 1.3x faster, and on NusaX (5 targets, 2 seeds, the task vector alone and DeFT-X) every average
stayed within 1.0 macro-F1 of float32. Elsewhere ``auto`` is float32 (emulated bf16 is slower). Under autocast an
MLM head runs in float32 but for its frozen decoder's product (``loading.MaskedLMForSFT.head_logits``: in bf16 the
head's small updates were lost and its fit stalled), and the held-out checks are float32.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Literal

import torch

from ..constants import Precision
from ..errors import ConfigError

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix instructions


def bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The native bf16 flags in the text of ``/proc/cpuinfo`` (its first ``flags`` line)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return tuple(f for f in CPU_BF16_FLAGS if f in flags)
    return ()


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """This CPU's native bf16 flags (empty where it has none, or where the OS does not say)."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        return bf16_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ()


@dataclass(frozen=True)
class Amp:
    """A resolved precision: the autocast dtype (None: float32 throughout) on one device type, and why."""

    dtype: torch.dtype | None
    device_type: str
    why: str

    @property
    def name(self) -> Literal["fp32", "bf16", "fp16"]:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> ContextManager:
        """Autocast for forward passes (training steps, the head fit, scoring); a no-op in float32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve(precision: Precision, device: torch.device | str | None = None) -> Amp:
    """``auto`` | ``fp32`` | ``bf16`` on ``device`` (default: CUDA when present, else the CPU) -> an ``Amp``."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                       else "cpu")
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}", field="precision")
    if precision == "fp32":
        return Amp(None, dev.type, "float32 (asked for)")
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Amp(torch.bfloat16, "cuda", "bf16 autocast (" + ("asked for" if precision == "bf16"
                                                                       else "auto: the GPU supports bf16") + ")")
        if precision == "bf16":
            raise ConfigError("precision 'bf16': this GPU does not support bfloat16; use 'auto' (fp16) or 'fp32'",
                              field="precision")
        return Amp(torch.float16, "cuda", "fp16 autocast (auto: the GPU has no bf16)")
    if dev.type != "cpu":
        return Amp(None, dev.type, f"float32 (auto: no bf16 policy for {dev.type})")
    flags = cpu_bf16_flags()
    if precision == "bf16":
        return Amp(torch.bfloat16, "cpu", "bf16 autocast (asked for" +
                   (f"; the CPU has {', '.join(flags)})" if flags else "; no native bf16 on this CPU: emulated, slow)"))
    if flags:
        return Amp(torch.bfloat16, "cpu", f"bf16 autocast (auto: the CPU has {', '.join(flags)})")
    return Amp(None, "cpu", "float32 (auto: no native bf16 matrix instructions on this CPU)")
