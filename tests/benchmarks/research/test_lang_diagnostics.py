"""benchmarks/research/lang_diagnostics.py: the pure math on hand-made tensors, the data checks, and one run end
to end on a tiny model with random vectors and a NusaX-MT-shaped valid.csv."""
import csv
import importlib
import json
from pathlib import Path

import pytest
import torch

from tiny import ASSETS, make_tiny_model_dir, make_vector


def bench():
    return importlib.import_module("benchmarks.research.lang_diagnostics")


# ---- the math ----------------------------------------------------------------------------------------------
def test_movement_identical_opposite_orthogonal():
    d = bench()
    a = torch.randn(5, 8)
    assert d.movement(a, a.clone()) == pytest.approx(1.0)
    assert d.movement(a, 3 * a) == pytest.approx(1.0)  # cosine ignores length
    assert d.movement(a, -a) == pytest.approx(-1.0)
    e = torch.eye(4)
    assert d.movement(e, e[[1, 2, 3, 0]]) == pytest.approx(0.0)
    assert d.movement(e[:2], torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])) == pytest.approx(0.5)


def test_layer_movement_is_per_layer():
    d = bench()
    a = torch.randn(3, 4, 6)
    b = a.clone()
    b[1] = -b[1]
    assert d.layer_movement(a, b) == pytest.approx([1.0, -1.0, 1.0])


def test_retrieval_identical_is_100_and_permuted_known():
    d = bench()
    x = torch.randn(10, 16)
    assert d.retrieval_top1(x, x) == 100.0
    e = torch.eye(4)
    assert d.retrieval_top1(e, e[[1, 0, 2, 3]]) == 50.0  # rows 0 and 1 find each other's translation
    assert d.retrieval_top1(e, e[[1, 2, 3, 0]]) == 0.0


def test_margin_sign_and_values():
    d = bench()
    e = torch.eye(4)
    m = d.pair_margin(e, e)
    assert m == pytest.approx({"pair_cos": 1.0, "nonpair_cos": 0.0, "margin": 1.0})
    swapped = d.pair_margin(e, e[[1, 0, 3, 2]])  # every translation orthogonal, two non-pairs identical
    assert swapped["pair_cos"] == pytest.approx(0.0)
    assert swapped["nonpair_cos"] == pytest.approx(4 / 12)
    assert swapped["margin"] < 0
    same = torch.ones(3, 2)  # everything identical: no margin
    assert d.pair_margin(same, same)["margin"] == pytest.approx(0.0)
    a = d.alignment(e, e)
    assert a["top1"] == 100.0 and a["margin"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        d.pair_margin(e[:1], e[:1])


def test_mean_pool_ignores_padding():
    d = bench()
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(d.mean_pool(h, mask), torch.tensor([[2.0, 3.0]]))
    stacked = torch.stack([h, 2 * h])  # [L, N, T, H]
    assert torch.allclose(d.mean_pool(stacked, mask), torch.tensor([[[2.0, 3.0]], [[4.0, 6.0]]]))


# ---- data and options ---------------------------------------------------------------------------------------
def write_valid(root: Path, n: int = 12, blank_row: int | None = None) -> Path:
    """A NusaX-MT-shaped valid.csv: indonesian example sentences, a 'javanese' column of the words reversed."""
    lines = [l.strip() for l in (ASSETS / "target_corpus_id.txt").read_text(encoding="utf-8").splitlines()
             if l.strip()][:n]
    (root / "mt").mkdir(parents=True)
    with (root / "mt" / "valid.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "indonesian", "javanese"])
        for i, line in enumerate(lines):
            w.writerow([i, line, "" if i == blank_row else " ".join(reversed(line.split()))])
    return root


def test_read_parallel_checks_file_and_columns(tmp_path):
    d = bench()
    with pytest.raises(SystemExit, match=r"mt/valid.csv is missing"):
        d.read_parallel(tmp_path, "indonesian", ["javanese"])
    data = write_valid(tmp_path / "nusax", n=6, blank_row=2)
    with pytest.raises(SystemExit, match=r"no column 'balinese' \(columns: indonesian, javanese\)"):
        d.read_parallel(data, "indonesian", ["balinese"])
    text = d.read_parallel(data, "indonesian", ["javanese"])
    assert len(text.source) == 6 and text.rows["javanese"] == [0, 1, 3, 4, 5]  # the blank row is left out
    assert text.targets["javanese"][2] == " ".join(reversed(text.source[3].split()))


def test_parse_langs():
    d = bench()
    assert d.parse_langs(["javanese=/a/b"], "indonesian") == {"javanese": Path("/a/b")}
    for bad, msg in ((["javanese"], "TARGET=PATH"), (["indonesian=/x"], "source"),
                     (["javanese=/x", "javanese=/y"], "twice"), ([], "at least one")):
        with pytest.raises(SystemExit, match=msg):
            d.parse_langs(bad, "indonesian")


# ---- end to end on a tiny model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from deftx_engine.models.loading import load_cls_model, load_mlm_model

    root = tmp_path_factory.mktemp("diag")
    base = str(make_tiny_model_dir(root / "model"))
    task = make_vector(load_cls_model(base, ["negative", "neutral", "positive"]), "task", k=3000, base_model=base)
    task.save(root / "task")
    # a language vector as training makes them: from the masked-LM model, its MLM head stored whole
    lang = make_vector(load_mlm_model(base), "language", k=3000, seed=1, heads=True, base_model=base)
    assert any(n.startswith("cls.") for n in lang.heads)
    lang.save(root / "lang")
    return root, base, write_valid(root / "nusax", n=12)


def test_end_to_end_tiny(tiny_setup, tmp_path):
    from deftx_engine.outputs.inference import composed_model

    d = bench()
    root, base, data = tiny_setup
    prefix = tmp_path / "diag"
    result = d.main(["--model", base, "--data", str(data), "--task", str(root / "task"),
                     "--lang", f"javanese={root / 'lang'}", "--out", str(prefix), "--batch-size", "5"])
    saved = json.loads(prefix.with_name("diag.json").read_text())
    assert saved["targets"].keys() == {"javanese"}
    r = saved["targets"]["javanese"]
    assert r["n"] == 12
    assert -1 <= r["movement"]["mean_pooled"] < 1  # a random vector moves the sentences
    assert len(r["movement"]["per_layer"]) == 3  # embeddings + 2 layers
    assert r["movement"]["per_layer"][-1] == pytest.approx(r["movement"]["mean_pooled"])
    assert set(r["alignment"]) == {"base", "lang", "task", "composed"}
    for a in r["alignment"].values():
        assert 0 <= a["top1"] <= 100 and a["margin"] == pytest.approx(a["pair_cos"] - a["nonpair_cos"])
    ci = r["classifier_input"]
    assert sum(ci["labels_task_only"].values()) == sum(ci["labels_composed"].values()) == 12
    assert 0 <= ci["predictions_changed_pct"] <= 100
    assert saved["wall_seconds"] == pytest.approx(result["wall_seconds"])

    # the classifier-input cosine is that of the engine's own composed models (composed_model)
    text = d.read_parallel(data, "indonesian", ["javanese"]).targets["javanese"]
    task_only = d.encode(*composed_model(root / "task"), text, batch_size=4)
    composed = d.encode(*composed_model(root / "task", [root / "lang"]), text, batch_size=7)
    assert ci["head_input"] == pytest.approx(d.movement(task_only.head_input, composed.head_input), abs=1e-5)
    assert ci["mean_pooled"] == pytest.approx(d.movement(task_only.mean, composed.mean), abs=1e-5)
    assert ci["first_token"] == pytest.approx(d.movement(task_only.first, composed.first), abs=1e-5)

    md = prefix.with_name("diag.md").read_text()
    assert "| javanese | 12 | " in md and "retrieval top-1 %" in md and "task-only→composed" in md


def test_encode_batches_agree_and_model_is_theta0_afterwards(tiny_setup):
    from deftx_engine.method.vectors import SparseVector
    from deftx_engine.models.loading import load_cls_model, load_tokenizer

    d = bench()
    root, base, data = tiny_setup
    model = load_cls_model(base, ["negative", "neutral", "positive"]).eval()
    tok = load_tokenizer(base)
    text = d.read_parallel(data, "indonesian", ["javanese"])
    one, many = d.encode(model, tok, text.source, batch_size=1), d.encode(model, tok, text.source, batch_size=5)
    assert torch.allclose(one.mean, many.mean, atol=1e-5) and torch.allclose(one.layers, many.layers, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = d.encode_states(model, tok, text, SparseVector.load(root / "task"),
                         {"javanese": SparseVector.load(root / "lang")}, batch_size=4)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # reverted bit-exactly
    assert d.movement(st.base_src.mean, many.mean) == pytest.approx(1.0)
    assert d.movement(st.base_src.mean, st.lang_src["javanese"].mean) < 1  # the control moves too (random vector)


def test_no_task_vector_reports_movement_and_alignment_only(tiny_setup, tmp_path):
    d = bench()
    root, base, data = tiny_setup
    result = d.main(["--model", base, "--data", str(data), "--lang", f"javanese={root / 'lang'}",
                     "--out", str(tmp_path / "x")])
    r = result["targets"]["javanese"]
    assert "classifier_input" not in r and set(r["alignment"]) == {"base", "lang"}
    assert "| javanese | 12 | " in (tmp_path / "x.md").read_text()


def test_wrong_vector_kind_is_refused(tiny_setup, tmp_path):
    d = bench()
    root, base, data = tiny_setup
    with pytest.raises(SystemExit, match="is a task vector, expected a language vector"):
        d.main(["--model", base, "--data", str(data), "--lang", f"javanese={root / 'task'}",
                "--out", str(tmp_path / "x")])
