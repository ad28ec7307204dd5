"""Fuzzed inputs (hypothesis): every reader either accepts its input or raises its own clear error.

Never another exception type, never a hang. Each test checks that its own fuzzer really ran (at least
``MIN_CASES`` cases), whatever else runs and in whatever order; the case counts are printed so
benchmarks/RESULTS.md can quote them (pytest -s shows them).
"""
import json
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deftx_engine.errors import VectorError
from deftx_engine.method.vectors import SparseVector, VectorMeta
from deftx_engine.training.data import DataError, load_corpus, load_task_data

CASES = {"corpus": 0, "task": 0, "vector": 0}  # cases run so far in this process, by reader
MIN_CASES = 100  # of the 150 examples each fuzzer asks hypothesis for
FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

texty = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
lines = st.lists(st.one_of(texty, st.just(""), st.just(" "), st.text(alphabet="a,\"\t\n{}[]:", max_size=40)),
                 max_size=30)
labels = st.sampled_from(["positive", "negative", "neutral", "0", "1", "", " ", "-1", "x" * 200])


def _encode(data, how: str) -> bytes:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if how == "truncate":
        return raw[: max(0, len(raw) // 2 - 1)] + b"\xe2\x82"  # cut inside a multi-byte character
    if how == "latin1":
        return data.encode("latin-1", "replace") if isinstance(data, str) else raw
    if how == "utf16":
        return data.encode("utf-16") if isinstance(data, str) else raw
    if how == "nul":
        return raw + b"\x00\x01binary"
    return raw


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    """Print the case counts of the fuzzers that ran in this module (with pytest -s), after the last one."""
    yield
    print(f"\nfuzzed cases: {CASES}")


def check_ran(fuzz, kind: str) -> None:
    """Run one fuzzer and check that it really ran at least MIN_CASES cases of ``kind`` (counted by the cases
    themselves), so a fuzzer that silently stops generating inputs fails instead of passing on a handful."""
    before = CASES[kind]
    fuzz()
    ran = CASES[kind] - before
    print(f"\n{kind}: {ran} fuzzed cases")
    assert ran >= MIN_CASES, f"the {kind} fuzzer ran only {ran} cases (at least {MIN_CASES} expected)"


def _check(call, kind: str):
    CASES[kind] += 1
    t = time.time()
    try:
        call()
    except DataError as e:
        assert str(e), "an error must say something"
    assert time.time() - t < 2.0


@FUZZ
@given(body=lines, suffix=st.sampled_from([".txt", ".csv", ".tsv", ".jsonl", ".bin", ""]),
       how=st.sampled_from(["plain", "truncate", "latin1", "utf16", "nul"]), huge=st.booleans())
def fuzz_corpus_reader(tmp_path, body, suffix, how, huge):
    text = "\n".join(body) + ("\n" + "w" * 200_000 if huge else "")
    path = tmp_path / f"c{suffix}"
    path.write_bytes(_encode(text, how))
    _check(lambda: load_corpus(path, max_bytes=1_000_000), "corpus")


def test_corpus_reader(tmp_path):
    check_ran(lambda: fuzz_corpus_reader(tmp_path), "corpus")


@FUZZ
@given(rows=st.lists(st.tuples(texty, labels), max_size=20),
       header=st.sampled_from(["text,label", "sentence,label", "text", "premise,hypothesis,label", "", "text,label,"]),
       fmt=st.sampled_from(["csv", "tsv", "jsonl", "jsonl-bad"]), how=st.sampled_from(["plain", "truncate", "nul"]),
       known=st.booleans())
def fuzz_task_reader(tmp_path, rows, header, fmt, how, known):
    if fmt.startswith("jsonl"):
        keys = header.split(",") if header else ["text"]
        out = [json.dumps(dict(zip(keys, [t, l, l]))) for t, l in rows]
        if fmt == "jsonl-bad" and out:
            out[len(out) // 2] = out[len(out) // 2][:-3]
        text, suffix = "\n".join(out), ".jsonl"
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = "\n".join([header.replace(",", sep)] + [f'"{t}"{sep}{l}' for t, l in rows])
        suffix = f".{fmt}"
    path = tmp_path / f"t{suffix}"
    path.write_bytes(_encode(text, how))
    names = ["negative", "neutral", "positive"] if known else None
    _check(lambda: load_task_data(path, label_names=names), "task")


def test_task_reader(tmp_path):
    check_ran(lambda: fuzz_task_reader(tmp_path), "task")


def _vector(seed: int) -> SparseVector:
    g = torch.Generator().manual_seed(seed)
    vec = SparseVector(VectorMeta(kind="language", base_model="m", base_fingerprint="f"))
    for name, shape in (("enc.a.weight", (8, 4)), ("enc.b.bias", (6,))):
        n = int(torch.Size(shape).numel())
        idx = torch.randperm(n, generator=g)[: n // 3].sort().values.to(torch.int32)
        vec.indices[name], vec.values[name], vec.shapes[name] = idx, torch.randn(len(idx), generator=g), shape
    vec.heads["head.w"], vec.shapes["head.w"] = torch.randn(3, 4, generator=g), (3, 4)
    vec.meta.k = vec.nnz  # what every writer records (SparseVector.save refuses another k)
    return vec


@FUZZ
@given(seed=st.integers(0, 5), target=st.sampled_from(["config", "weights"]),
       op=st.sampled_from(["truncate", "flip", "insert", "json-edit", "header-len"]),
       pos=st.floats(0, 1), byte=st.integers(0, 255),
       edit=st.sampled_from([("format", "x"), ("shapes", {}), ("shapes", {"enc.a.weight": [2, 2]}),
                             ("kind", None), ("shapes", {"enc.a.weight": "oops"}), ("extra", [])]))
def fuzz_vector_loader(tmp_path, seed, target, op, pos, byte, edit):
    folder = _vector(seed).save(tmp_path / f"v{CASES['vector']}")
    path = folder / ("sft_config.json" if target == "config" else "sft_model.safetensors")
    raw = bytearray(path.read_bytes())
    at = min(int(pos * len(raw)), len(raw) - 1)
    if op == "truncate":
        raw = raw[:at]
    elif op == "flip":
        raw[at] = byte
    elif op == "insert":
        raw[at:at] = bytes([byte]) * 7
    elif op == "header-len" and target == "weights":
        raw[:8] = struct.pack("<Q", 2**40)
    elif op == "json-edit" and target == "config":
        cfg = json.loads(raw)
        cfg[edit[0]] = edit[1]
        raw = bytearray(json.dumps(cfg).encode())
    path.write_bytes(bytes(raw))
    CASES["vector"] += 1
    try:
        SparseVector.load(folder).check()
    except VectorError as e:
        assert str(folder) in str(e) or path.name in str(e) or "parameter" in str(e)


def test_vector_loader(tmp_path):
    check_ran(lambda: fuzz_vector_loader(tmp_path), "vector")
