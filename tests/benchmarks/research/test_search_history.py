"""The recipe-search history table built from crosslingual results files."""
import json

from benchmarks.research.search_history import table


def _results(path, lang_lr, deftx_avg):
    settings = {"targets": ["jav", "sun"], "lang_steps": 24, "lang_lr": lang_lr, "lang_k": 0.028, "seeds": [1],
                "lang_mlm_layer": None, "lang_fit_head": True, "head_corpus": "/x/head-corpus-mt.txt",
                "lang_scale": 1.0, "task_steps": 40, "task_lr": 3e-4}
    summary = {"task-only": {"targets": {"jav": [70.0, 0], "sun": [60.0, 0]}, "average": [65.0, 0]},
               "deftx": {"targets": {"jav": [deftx_avg + 1, 0], "sun": [deftx_avg - 1, 0]}, "average": [deftx_avg, 0],
                         "lang_mlm": {"theta0": 8.0, "theta0+phi": 7.5, "encoder_only": 7.6}}}
    path.write_text(json.dumps({"settings": settings, "summary": summary}))
    return path


def test_rows_show_what_varies_and_the_gain_over_task_only(tmp_path):
    md = table([_results(tmp_path / "s01.json", 3e-4, 60.0), _results(tmp_path / "s02.json", 1e-4, 66.5)])
    lines = md.splitlines()
    assert lines[0] == ("| run | method | lang_lr | jav | sun | avg | Δ vs task-only | "
                        "held-out MLM loss θ0 → θ0+φ (θ0 head) |")
    assert "| s01 | deftx | 0.0003 | 61.0 | 59.0 | **60.0** | -5.0 | 8.00 → 7.50 (7.60) |" in lines
    assert "| s02 | deftx | 0.0001 | 67.5 | 65.5 | **66.5** | +1.5 | 8.00 → 7.50 (7.60) |" in lines
    assert "| s02 | task-only | 0.0001 | 70.0 | 60.0 | **65.0** | – | – |" in lines
