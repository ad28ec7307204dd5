"""benchmarks/perf.py runs on the tiny shape set and reports every figure (so the benchmark cannot rot)."""
import importlib
import json

import pytest

from tiny import make_tiny_model_dir


def load_perf():
    return importlib.import_module("benchmarks.perf")


@pytest.mark.slow
def test_tiny_tables(tmp_path, capsys):
    perf = load_perf()
    res = perf.main(["--sizes", "tiny", "--repeats", "2", "--warmup", "1", "--vector-shares", "0.028", "0.1",
                     "--rss-model", "none", "--out", str(tmp_path / "perf")])
    out = capsys.readouterr().out
    tiny = res["sizes"]["tiny"]
    assert [s["kind"] for s in tiny["steps"]] == ["language", "task"]
    for s in tiny["steps"]:
        assert s["full_median_s"] > 0 and s["sparse_median_s"] > 0 and s["ratio_of_medians"] > 0
        assert 0 < s["k"] < s["maskable"]
        # phase-2 optimizer state is a small fraction of the dense AdamW state
        assert s["sparse_adamw_state_bytes"] < 0.5 * s["dense_adamw_state_bytes"]
    # state for the masked entries is two float32 moments per entry (8 B) + the step counters: proportional to k
    for o in tiny["optimizer_vs_k"]:
        assert 8.0 <= o["masked_state_bytes_per_k"] < 9.0
    v = {r["share"]: r for r in tiny["vectors"]}
    assert v[0.1]["k"] > v[0.028]["k"] and v[0.1]["file_bytes"] > v[0.028]["file_bytes"]
    assert tiny["denoise"]["denoise_s"] > 0
    for line in ("| tiny | language | 16 × 64 |", "| tiny | task | 16 × 64 |", "### Optimizer state",
                 "bytes / entry", "| tiny | 7,296 |"):
        assert line in out, line
    assert (tmp_path / "perf.md").read_text() in out


@pytest.mark.slow
def test_whole_language_sft_peak_rss(tmp_path):
    perf = load_perf()
    model = make_tiny_model_dir(tmp_path / "tiny")
    r = perf.language_sft_rss(str(model), ["--full-steps", "6", "--sparse-steps", "6", "--logging-steps", "2"])
    assert 50 * 2 ** 20 < r["max_rss_bytes"] < 8 * 2 ** 30
    assert "vector saved" in r["log"] and r["wall_s"] > 0
    assert set(r["phase_step_s"]) == {"full", "sparse"} and all(0 < v < 60 for v in r["phase_step_s"].values())


def test_phase_step_times_from_a_metrics_log(tmp_path):
    rows = [("full", 2, 10.0), ("full", 4, 11.0), ("full", 6, 14.0), ("full", 8, 15.0),  # 0.5, 1.5, 0.5 s/step
            ("sparse", 10, 20.0), ("sparse", 12, 22.0)]  # 1.0 s/step
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"phase": p, "step": s, "time": t, "loss": 1.0}) + "\n"
                                              for p, s, t in rows))
    assert load_perf().phase_step_times(tmp_path / "m.jsonl") == {"full": 0.5, "sparse": 1.0}


def test_unknown_size_is_refused():
    with pytest.raises(SystemExit):
        load_perf().main(["--sizes", "huge"])
