"""The efficiency benchmark's tiny configuration (so it cannot rot) and its FLOP count."""
import torch

from benchmarks.efficiency import main, step_flops
from deftx_engine.models.precision import resolve
from tiny import tiny_bert_config


def test_step_flops_counts_matrices_attention_and_the_masked_head():
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(tiny_bert_config())  # hidden 16, 2 layers, ffn 32, vocab 120
    ids = torch.zeros(2, 8, dtype=torch.long)
    labels = torch.full((2, 8), -100)
    labels[0, :3] = 1
    matrices = 2 * (4 * 16 * 16 + 2 * 16 * 32)  # Q, K, V, O and the two FFN matrices per layer
    forward = 2 * matrices * 16 + 4 * 2 * 2 * 8 * 8 * 16
    head = 3 * 2 * 3 * 16 * 16 + 2 * 2 * 3 * 16 * 120
    assert step_flops(model, "language", {"input_ids": ids, "labels": labels}) == 3 * forward + head
    assert step_flops(model, "task", {"input_ids": ids, "labels": labels}) == 3 * forward


def test_tiny_run_reports_every_measurement(tmp_path):
    res = main(["--models", "tiny", "--repeats", "1", "--seq", "16", "--whole-steps", "2",
                "--out", str(tmp_path / "results")])
    steps = res["steps"]["tiny"]
    engine = {"full, embedding rows only (engine)", "sparse (engine)"}
    for kind in ("language", "task"):
        fp32 = {r["step"] for r in steps if r["kind"] == kind and r["precision"] == "fp32"}
        bf16 = {r["step"] for r in steps if r["kind"] == kind and r["precision"] == "bf16"}
        assert fp32 == engine | {"full, whole embedding (dense)", "full, embedding frozen"} and bf16 == engine
    assert all(r["median_s"] > 0 and r["gflops"] > 0 and r["share_of_matmul"] > 0 for r in steps)
    assert set(res["matmul_gflops"]) == {"fp32 H=16", "bf16 H=16"} and min(res["matmul_gflops"].values()) > 0
    assert {r["amp"] for r in steps if r["precision"] == "fp32"} == {"fp32"}
    scoring = res["scoring"]["tiny"]
    assert set(scoring["engine"]) == {"fp32", "bf16"} and min(e["speedup"] for e in scoring["engine"].values()) > 0
    assert [f["precision"] for f in res["head_fit"]["tiny"]] == ["fp32", "bf16"]
    assert all(f["seconds"] > 0 and f["steps"] > 0 for f in res["head_fit"]["tiny"])
    assert res["whole"]["tiny"]["ratio"] > 0
    assert res["whole"]["tiny"]["precision"] == resolve("auto").name  # the SFT's and the dense baseline's
    md = (tmp_path / "results.md").read_text()
    assert "Scoring (tiny" in md and "MLM-head fit (tiny" in md and "| sparse (engine) | bf16 (" in md
