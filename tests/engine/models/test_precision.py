"""The precision setting: what ``auto`` resolves to, and that bf16 autocast changes the arithmetic only (the
vector stays float32 and reverts bit-exactly; without native bf16 everything runs in float32 as before)."""
import json

import pytest
import torch

from deftx_engine.cli import main
from deftx_engine.errors import ConfigError
from deftx_engine.method.vectors import SparseVector
from deftx_engine.models import precision
from deftx_engine.models.loading import load_cls_model
from tiny import ASSETS, make_tiny_model_dir

TASK = str(ASSETS / "source_task_en.csv")
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
bogomips\t: 4800.00

processor\t: 1
flags\t\t: fpu vme sse sse2
"""


def test_bf16_flags_are_read_from_the_first_flags_line():
    assert precision.bf16_flags(CPUINFO) == ("amx_bf16", "avx512_bf16")
    assert precision.bf16_flags(CPUINFO.replace("avx512_bf16 amx_tile amx_bf16", "amx_tile")) == ()
    assert precision.bf16_flags("processor : 0\n") == ()


@pytest.mark.parametrize("flags", [("amx_bf16",), ("avx512_bf16",), ("amx_bf16", "avx512_bf16"), ()])
def test_auto_on_a_cpu_is_bf16_where_it_has_native_bf16_and_says_why(monkeypatch, flags):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    amp = precision.resolve("auto", "cpu")
    if flags:
        assert amp.dtype is torch.bfloat16 and amp.name == "bf16"
        assert amp.why == f"bf16 autocast (auto: the CPU has {', '.join(flags)})"
    else:
        assert amp.dtype is None and amp.why == "float32 (auto: no native bf16 matrix instructions on this CPU)"


def test_fp32_and_bf16_are_honoured_whatever_the_cpu(monkeypatch):
    for flags in [(), ("amx_bf16",)]:
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda flags=flags: flags)
        assert precision.resolve("fp32", "cpu").dtype is None
        bf16 = precision.resolve("bf16", "cpu")
        assert bf16.dtype is torch.bfloat16 and ("emulated" in bf16.why) == (not flags)
    with pytest.raises(ConfigError) as err:
        precision.resolve("fp16", "cpu")
    assert err.value.field == "precision"


def test_autocast_runs_matmuls_in_bf16_and_fp32_not():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.resolve("bf16", "cpu").autocast():
        assert (a @ b).dtype is torch.bfloat16
    with precision.resolve("fp32", "cpu").autocast():
        assert (a @ b).dtype is torch.float32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def _train(tiny_dir, out, *extra) -> SparseVector:
    assert main(["train-task", "--data", TASK, "--base-model", tiny_dir, "--lr", "1e-3", "--full-steps", "4",
                 "--sparse-steps", "4", "--batch-size", "8", "--max-length", "32", "--output-dir", str(out),
                 *extra]) == 0
    return SparseVector.load(out / "vector")


def _same(a: SparseVector, b: SparseVector) -> bool:
    return (a.indices.keys() == b.indices.keys() and a.heads.keys() == b.heads.keys()
            and all(torch.equal(a.indices[n], b.indices[n]) and torch.equal(a.values[n], b.values[n])
                    for n in a.indices)
            and all(torch.equal(a.heads[n], b.heads[n]) for n in a.heads))


def test_a_bf16_vector_is_float32_reverts_bit_exactly_and_differs_from_fp32(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())  # no native bf16: auto must mean float32
    auto = _train(tiny_dir, tmp_path / "auto")
    fp32 = _train(tiny_dir, tmp_path / "fp32", "--precision", "fp32")
    bf16 = _train(tiny_dir, tmp_path / "bf16", "--precision", "bf16")
    status = {p: json.loads((tmp_path / p / "status.json").read_text())["precision"] for p in ("auto", "fp32", "bf16")}
    assert status == {"auto": "fp32", "fp32": "fp32", "bf16": "bf16"}
    assert "precision: float32 (auto: no native bf16" in (tmp_path / "auto" / "log.txt").read_text()
    assert _same(auto, fp32), "without native bf16, auto must train exactly as float32 did"
    assert not _same(bf16, fp32), "bf16 autocast changed nothing: it was not in effect"
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))  # native bf16: auto means bf16
    native = _train(tiny_dir, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "status.json").read_text())["precision"] == "bf16"
    assert _same(native, bf16), "with native bf16, auto must train exactly as bf16 does"
    assert all(v.dtype == torch.float32 for v in [*bf16.values.values(), *bf16.heads.values()])

    model = load_cls_model(tiny_dir, bf16.meta.label_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bf16.apply(model)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    bf16.revert(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
