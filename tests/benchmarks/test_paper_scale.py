"""The GPU benchmark's script runs end to end on a tiny model on the CPU (so it is ready when a GPU is lent)."""
from benchmarks.paper_scale import main


def test_tiny_cpu_run_measures_both_phases_and_projects_the_preset(tmp_path):
    res = main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "r.json")])
    for kind in ("task", "language"):
        row = res["rows"][kind]
        assert row["k"] > 0 and row["full_step_s"] > 0 and row["sparse_step_s"] > 0 and row["denoise_topk_s"] > 0
    assert res["projection"]["language_hours"] > 0 and res["projection"]["task_hours"] > 0
    assert (tmp_path / "r.json").is_file()
