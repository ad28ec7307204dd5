"""The efficiency benchmark's tiny configuration (so it cannot rot) and its FLOP count."""
import torch

from benchmarks.efficiency import main, step_flops
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
    assert {r["step"] for r in steps} == {"full, embedding rows only (engine)", "full, whole embedding (dense)",
                                          "full, embedding frozen", "sparse (engine)"}
    assert all(r["median_s"] > 0 and r["gflops"] > 0 for r in steps) and res["matmul_gflops"] > 0
    assert res["scoring"]["tiny"]["speedup"] > 0 and res["whole"]["tiny"]["ratio"] > 0
    assert "Scoring (tiny" in (tmp_path / "results.md").read_text()
