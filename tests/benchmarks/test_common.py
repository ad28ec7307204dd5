"""benchmarks/common.py: the RESULTS.md section writer, the CPU meter and the machine description."""
import time

from benchmarks.common import OtherCpu, machine_info, prefixed, wait_quiet, write_results_section

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


def test_other_cpu_needs_a_long_enough_block():
    with OtherCpu(min_wall=10.0) as short:
        pass
    assert short.cores is None
    with OtherCpu() as meter:
        time.sleep(0.05)
    assert meter.cores is None or meter.cores >= 0.0


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
