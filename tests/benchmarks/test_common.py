"""benchmarks/common.py: the RESULTS.md section writer, the results-file writer, the CPU meter and the machine
description."""
import json
import os
import time
from types import SimpleNamespace

import pytest

from benchmarks.common import OtherCpu, machine_info, prefixed, wait_quiet, write_outputs, write_results_section

RESULTS = "# Benchmark results\n\n## Web app\n\nold figures\n\n## Engine core\n\nkept | 1 s\n"


def test_a_section_is_replaced_and_the_others_kept_byte_for_byte(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(RESULTS, encoding="utf-8")
    write_results_section("## Web app", "new figures\n", path)
    assert path.read_text(encoding="utf-8") == RESULTS.replace("old figures", "new figures")
    write_results_section("## Engine core", "replaced", path)  # the last section
    assert path.read_text(encoding="utf-8").endswith("## Engine core\n\nreplaced\n")
    write_results_section("## Training and scaling", "appended", path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmark results\n\n## Web app\n\nnew figures\n\n## Engine core\n\nreplaced\n\n")
    assert text.endswith("## Training and scaling\n\nappended\n")


def test_outputs_are_the_json_and_the_tables_under_one_prefix(tmp_path, capsys):
    prefix = tmp_path / "out" / "s09-k0.1"  # a new folder, and a dot the prefix keeps
    write_outputs(prefix, {"n": 1, "where": tmp_path}, "| a |\n")
    assert json.loads((tmp_path / "out" / "s09-k0.1.json").read_text()) == {"n": 1, "where": str(tmp_path)}
    assert (tmp_path / "out" / "s09-k0.1.md").read_text() == "| a |\n"
    assert capsys.readouterr().out == "| a |\n\n"
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["s09-k0.1.json", "s09-k0.1.md"]  # nothing aside


def meter_with(monkeypatch, counters: list, clock: list[float]):
    """OtherCpu reading the given (machine busy, own) jiffy counters and perf_counter values, in order."""
    import benchmarks.common as common

    readings, ticks = iter(counters), iter(clock)
    monkeypatch.setattr(common.OtherCpu, "_counters", staticmethod(lambda: next(readings)))
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_other_cpu_is_the_machine_busy_time_less_our_own_per_wall_second(monkeypatch):
    tck = os.sysconf("SC_CLK_TCK")
    # 2 s of wall: the machine was busy 3 core-seconds, 1 of them ours -> others used 1 core
    meter_with(monkeypatch, [(10_000, 500), (10_000 + 3 * tck, 500 + tck)], [100.0, 102.0])
    with OtherCpu() as meter:
        pass
    assert meter.cores == pytest.approx(1.0)
    # all the busy time was ours -> 0 (and jiffy rounding that makes ours exceed the machine's is 0, not < 0)
    meter_with(monkeypatch, [(0, 0), (2 * tck, 2 * tck), (0, 0), (tck, tck + 1)], [0.0, 4.0, 0.0, 1.0])
    for _ in range(2):
        with OtherCpu() as meter:
            pass
        assert meter.cores == 0.0
    # a block shorter than min_wall, or no counters (off Linux): nothing measured
    meter_with(monkeypatch, [(0, 0), (5 * tck, 0), None, None], [0.0, 1.0, 0.0, 5.0])
    with OtherCpu(min_wall=2.0) as short:
        pass
    assert short.cores is None
    with OtherCpu() as off_linux:
        pass
    assert off_linux.cores is None


def test_other_cpu_reads_the_real_counters():
    """On Linux the counters are /proc/stat's busy jiffies and this process's own, which grow with our CPU time."""
    before = OtherCpu._counters()
    if before is None:
        pytest.skip("no /proc/stat (not Linux)")
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of our own CPU
        pass
    after = OtherCpu._counters()
    own = after[1] - before[1]
    assert own >= 0.2 * os.sysconf("SC_CLK_TCK"), (before, after)
    assert after[0] - before[0] >= own - 2  # the machine's busy time includes ours (give or take a jiffy each)


def test_no_wait_without_a_limit_and_a_machine_header():
    t0 = time.perf_counter()
    waited, cores = wait_quiet(0, "nothing")
    assert waited < 1.0 and cores is None
    assert time.perf_counter() - t0 < 1.0
    info = machine_info("torch")
    assert {"date", "cpu", "nproc", "python", "torch", "torch threads"} <= set(info)
    assert list(info)[-1] == "load average (1/5/15 min) at start"


def test_an_output_prefix_keeps_its_dots(tmp_path):
    """``--out s09-k0.1`` once wrote s09-k0.json (``with_suffix`` cut ``.1``)."""
    assert prefixed(tmp_path / "s09-k0.1", ".json") == tmp_path / "s09-k0.1.json"
    assert prefixed(tmp_path / "results", ".cache.jsonl").name == "results.cache.jsonl"
