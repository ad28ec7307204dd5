"""TIES merging (deftx_engine/method/merge.py) on small hand-made vectors, and ``deftx compose --merge ties``."""
import pytest
import torch

from deftx_engine.cli import main
from deftx_engine.errors import VectorError
from deftx_engine.method.merge import ties_merge, trim
from deftx_engine.method.vectors import SparseVector, VectorMeta, compose
from deftx_engine.models.loading import load_cls_model
from tiny import make_tiny_model_dir, make_vector


def vec(kind, entries, shapes=None, heads=None, fp="fp", base_model="m"):
    """entries: {param: {flat index: value}}"""
    shapes = shapes or {"w": (2, 5), "b": (5,)}
    v = SparseVector(VectorMeta(kind=kind, base_model=base_model, base_fingerprint=fp, language=kind[:4],
                                label_names=["a", "b"] if kind == "task" else []))
    for name, d in entries.items():
        idx = sorted(d)
        v.indices[name] = torch.tensor(idx, dtype=torch.int32)
        v.values[name] = torch.tensor([d[i] for i in idx], dtype=torch.float32)
        v.shapes[name] = shapes[name]
    for name, t in (heads or {}).items():
        v.heads[name] = t
        v.shapes[name] = tuple(t.shape)
    v.check()
    return v


def as_dict(v):
    return {n: dict(zip(v.indices[n].tolist(), [round(x, 6) for x in v.values[n].tolist()])) for n in v.indices}


def test_trim_keeps_the_top_share_of_each_vector_globally():
    v = vec("task", {"w": {0: 0.1, 3: -5.0, 7: 0.2, 9: 1.0}, "b": {1: -3.0, 4: 0.05}})
    kept = trim(v, 0.5)  # 3 of 6 entries: -5, -3, 1
    assert {n: (i.tolist(), t.tolist()) for n, (i, t) in kept.items()} == {
        "w": ([3, 9], [-5.0, 1.0]), "b": ([1], [-3.0])}
    with pytest.raises(VectorError):
        trim(v, 0.0)


def test_ties_elects_sign_by_mass_and_averages_the_agreeing_values():
    # entry w[0]: +2 (task) and -1 (lang): mass +1 -> only +2 agrees -> 2.0 (a sum would give 1.0)
    # entry w[1]: +1 and +3 -> both agree -> mean 2.0 (a sum would give 4.0)
    # entry w[2]: -4 (task only) -> -4; entry b[0]: +0.5 (lang only) -> 0.5
    # entry w[3]: +1 and -1: mass exactly 0 -> dropped
    task = vec("task", {"w": {0: 2.0, 1: 1.0, 2: -4.0, 3: 1.0}}, heads={"classifier.weight": torch.ones(2, 5)})
    lang = vec("language", {"w": {0: -1.0, 1: 3.0, 3: -1.0}, "b": {0: 0.5}})
    merged = ties_merge([task, lang], density=1.0)
    assert as_dict(merged) == {"w": {0: 2.0, 1: 2.0, 2: -4.0}, "b": {0: 0.5}}
    assert merged.meta.kind == "task" and merged.meta.label_names == ["a", "b"]
    assert torch.equal(merged.heads["classifier.weight"], torch.ones(2, 5))
    assert merged.meta.method == "ties" and merged.nnz == merged.meta.k == 4
    merged.check()
    # lambda scales everything; trimming happens before the election
    assert as_dict(ties_merge([task, lang], density=1.0, lam=0.5))["w"] == {0: 1.0, 1: 1.0, 2: -2.0}
    trimmed = ties_merge([task, lang], density=0.5)  # task keeps -4, 2; lang keeps 3, -1 (first of the ties)
    assert as_dict(trimmed) == {"w": {0: 2.0, 1: 3.0, 2: -4.0}}


def test_ties_on_disjoint_untrimmed_vectors_equals_the_sum():
    task = vec("task", {"w": {0: 1.0, 5: -2.0}})
    lang = vec("language", {"w": {1: 0.5}, "b": {2: -0.25}})
    assert as_dict(ties_merge([task, lang], density=1.0)) == as_dict(compose([task, lang]))


def test_ties_refuses_mixed_base_models_and_two_task_vectors():
    a = vec("task", {"w": {0: 1.0}})
    with pytest.raises(VectorError):
        ties_merge([a, vec("language", {"w": {0: 1.0}}, fp="other")])
    with pytest.raises(VectorError):
        ties_merge([a, vec("task", {"w": {1: 1.0}})])
    with pytest.raises(VectorError):
        ties_merge([])


def test_disjoint_mean_of_three_vectors_ignores_the_minority_sign():
    # w[0]: +1, +3, -2 -> mass +2 -> mean of the positive values (1 + 3) / 2 = 2.0
    # w[1]: -1, -5, +0.5 -> mass -5.5 -> mean of the negative values -3.0
    # w[2]: +2 in one vector only -> 2.0
    a = vec("task", {"w": {0: 1.0, 1: -1.0, 2: 2.0}})
    b = vec("language", {"w": {0: 3.0, 1: -5.0}})
    c = vec("language", {"w": {0: -2.0, 1: 0.5}})
    assert as_dict(ties_merge([a, b, c], density=1.0)) == {"w": {0: 2.0, 1: -3.0, 2: 2.0}}


def test_ties_without_a_task_vector_is_a_composed_vector():
    merged = ties_merge([vec("language", {"w": {0: 1.0}}), vec("language", {"b": {1: -1.0}})], density=1.0)
    assert merged.meta.kind == "composed" and not merged.heads and merged.meta.label_names == []
    assert merged.meta.ties == {"density": 1.0, "lambda": 1.0}


def test_cli_compose_merge_ties_writes_theta0_plus_the_merged_vector(tmp_path):
    base = str(make_tiny_model_dir(tmp_path / "base"))
    labels = ["neg", "neu", "pos"]
    task = make_vector(load_cls_model(base, labels), k=300, seed=1, base_model=base)
    lang = make_vector(load_cls_model(base, labels), "language", k=300, seed=2, heads=False, base_model=base)
    task.save(tmp_path / "task")
    lang.save(tmp_path / "lang")
    assert main(["compose", "--task", str(tmp_path / "task"), "--language", str(tmp_path / "lang"), "--merge", "ties",
                 "--ties-density", "0.5", "--ties-lambda", "0.8", "--output-dir", str(tmp_path / "out")]) == 0
    expected = load_cls_model(base, labels)
    ties_merge([task, lang], 0.5, 0.8).apply(expected)
    written = load_cls_model(str(tmp_path / "out"), labels)
    got = dict(written.named_parameters())
    for name, p in expected.named_parameters():
        assert torch.equal(got[name], p), name
    assert main(["compose", "--task", str(tmp_path / "task"), "--merge", "ties", "--scale", "2",
                 "--output-dir", str(tmp_path / "out2")]) == 2  # --scale belongs to --merge sum


def test_ties_metadata_names_the_parts_and_its_indices_are_int32():
    task = vec("task", {"w": {0: 2.0, 4: 1.0}}, heads={"classifier.weight": torch.ones(2, 5)})
    lang = vec("language", {"w": {0: -1.0}, "b": {1: 0.5}}, base_model="")  # no name: the fingerprint decides
    merged = ties_merge([task, lang], density=1.0, lam=0.5)
    assert merged.meta == VectorMeta(
        kind="task", base_model="m", base_fingerprint="fp", language="task+lang", label_names=["a", "b"],
        method="ties", denoise=None, k=3,
        extra={"ties": {"density": 1.0, "lambda": 0.5},
               "components": [{"kind": "task", "language": "task", "method": "deftx"},
                              {"kind": "language", "language": "lang", "method": "deftx"}]})
    assert all(i.dtype == torch.int32 for i in merged.indices.values())
    assert merged.shapes == {"w": (2, 5), "b": (5,), "classifier.weight": (2, 5)}
    assert ties_merge([lang, task], density=1.0).meta.base_model == ""  # the first vector's name
    alone = ties_merge([task], density=1.0)  # one vector: trimmed and scaled, nothing to elect
    assert as_dict(alone) == {"w": {0: 2.0, 4: 1.0}} and alone.meta.language == "task"
    assert ties_merge([vec("language", {"w": {0: 1.0}}, base_model="")], density=1.0).meta.language == "lang"


def test_ties_refuses_what_compose_refuses():
    task = vec("task", {"w": {0: 1.0}})
    lang = vec("language", {"w": {1: 1.0}})
    cases = [([task, compose([lang])], "a composed vector cannot be composed again"),
             ([task, vec("language", {"w": {1: 1.0}}, base_model="other")], "different base models"),
             ([task, vec("language", {"w": {1: 1.0}}, shapes={"w": (10,), "b": (5,)})],
              r"parameter 'w' has shape \(10,\) in the language vector but \(2, 5\)"),
             ([task, vec("task", {"w": {1: 1.0}})], "more than one task vector"),
             ([], "needs at least one vector")]
    for vectors, says in cases:
        with pytest.raises(VectorError, match=r"ties_merge\(\)(:| needs) .*" + says if vectors else says):
            ties_merge(vectors)


def test_trim_refuses_a_density_outside_0_to_1():
    v = vec("task", {"w": {0: 1.0, 1: 2.0}})
    for bad in (0.0, -0.5, 1.5, 2.0):
        with pytest.raises(VectorError, match=f"TIES density must be in \\(0, 1\\], got {bad}"):
            trim(v, bad)
    assert {n: i.tolist() for n, (i, _) in trim(v, 1.0).items()} == {"w": [0, 1]}
    assert {n: i.tolist() for n, (i, _) in trim(v, 0.5).items()} == {"w": [1]}
