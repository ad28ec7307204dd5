import json

import pytest
import torch

from deftx_engine.errors import VectorError
from deftx_engine.vectors import SparseVector, compose
from tiny import make_vector, tiny_bert_config


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_from_diff_shapes_and_k(tiny_cls_model):
    vec = make_vector(tiny_cls_model, k=123)
    assert vec.nnz == vec.meta.k == 123
    assert all(i.dtype == torch.int32 for i in vec.indices.values())
    assert set(vec.heads) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                              "classifier.bias"}


def test_save_load_round_trip_is_bit_exact(tiny_cls_model, tmp_path):
    vec = make_vector(tiny_cls_model)
    vec.save(tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["sft_config.json", "sft_model.safetensors"]
    back = SparseVector.load(tmp_path / "v")
    assert back.meta == vec.meta and back.shapes == vec.shapes
    for d1, d2 in ((vec.indices, back.indices), (vec.values, back.values), (vec.heads, back.heads)):
        assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)


def test_apply_then_revert_is_bit_exact(tiny_cls_model):
    before = state(tiny_cls_model)
    a, b = make_vector(tiny_cls_model, seed=1), make_vector(tiny_cls_model, kind="language", seed=2, heads=False)
    a.apply(tiny_cls_model)
    b.apply(tiny_cls_model, scale=0.7)
    changed = state(tiny_cls_model)
    assert any(not torch.equal(before[n], changed[n]) for n in before)
    b.revert(tiny_cls_model)
    a.revert(tiny_cls_model)
    after = state(tiny_cls_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_apply_touches_only_indexed_entries(tiny_cls_model):
    before = state(tiny_cls_model)
    vec = make_vector(tiny_cls_model, heads=False)
    vec.apply(tiny_cls_model)
    after = state(tiny_cls_model)
    for n in before:
        diff = (after[n] - before[n]).reshape(-1)
        nz = diff.nonzero().squeeze(1)
        expected = vec.indices[n].long() if n in vec.indices else torch.empty(0, dtype=torch.long)
        assert set(nz.tolist()) <= set(expected.tolist())
        if n in vec.indices:
            assert torch.allclose(diff[expected], vec.values[n], atol=1e-7)


def test_compose_equals_sum(tiny_cls_model):
    task, lang = make_vector(tiny_cls_model, seed=3), make_vector(tiny_cls_model, "language", seed=4, heads=False)
    ref = state(tiny_cls_model)
    task.apply(tiny_cls_model)
    lang.apply(tiny_cls_model)
    seq = state(tiny_cls_model)
    lang.revert(tiny_cls_model)
    task.revert(tiny_cls_model)
    both = compose([task, lang])
    assert both.meta.kind == "composed" and both.meta.label_names == task.meta.label_names
    both.apply(tiny_cls_model)
    for n, t in state(tiny_cls_model).items():
        assert torch.allclose(t, seq[n], atol=1e-6), n
    both.revert(tiny_cls_model)
    assert all(torch.equal(ref[n], t) for n, t in state(tiny_cls_model).items())
    scaled = compose([lang, lang], scales=[0.5, 0.5])
    for n in lang.values:
        assert torch.allclose(scaled.values[n], lang.values[n], atol=1e-7)
    with pytest.raises(VectorError, match="more than one task vector"):
        compose([task, task])


def test_compose_rejects_mixed_bases(tiny_cls_model):
    from transformers import BertForSequenceClassification

    other = BertForSequenceClassification(tiny_bert_config(hidden_size=8, intermediate_size=16, num_labels=3))
    with pytest.raises(VectorError, match="different base models"):
        compose([make_vector(tiny_cls_model), make_vector(other, "language", heads=False)])


def test_validate_rejects_other_base_model(tiny_cls_model):
    from transformers import BertForSequenceClassification

    other = BertForSequenceClassification(tiny_bert_config(vocab_size=99, num_labels=3))
    vec = make_vector(tiny_cls_model)
    before = state(other)
    with pytest.raises(VectorError, match="made for base model 'tiny'"):
        vec.apply(other)
    assert all(torch.equal(before[n], t) for n, t in state(other).items())


def test_missing_files(tmp_path, tiny_cls_model):
    with pytest.raises(VectorError, match="sft_config.json: file not found"):
        SparseVector.load(tmp_path)
    make_vector(tiny_cls_model).save(tmp_path / "v")
    (tmp_path / "v" / "sft_model.safetensors").unlink()
    with pytest.raises(VectorError, match="sft_model.safetensors: file not found"):
        SparseVector.load(tmp_path / "v")


def test_corrupted_files(tmp_path, tiny_cls_model):
    folder = make_vector(tiny_cls_model).save(tmp_path / "v")
    w = folder / "sft_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(VectorError, match="cannot be read as safetensors"):
        SparseVector.load(folder)
    (folder / "sft_config.json").write_text("{not json")
    with pytest.raises(VectorError, match="not valid JSON"):
        SparseVector.load(folder)


def _edit_and_save(tmp_path, model, edit):
    vec = make_vector(model)
    vec.save(tmp_path / "v")
    from safetensors.torch import load_file, save_file

    w = tmp_path / "v" / "sft_model.safetensors"
    tensors = load_file(str(w))
    edit(tensors)
    save_file(tensors, str(w), metadata={"format": "deftx-sft/1"})
    return tmp_path / "v"


def test_out_of_range_indices(tmp_path, tiny_cls_model):
    def edit(t):
        key = next(k for k in t if k.endswith(".idx") and t[k].numel())
        t[key][-1] = 10**8
    with pytest.raises(VectorError, match="indices outside"):
        SparseVector.load(_edit_and_save(tmp_path, tiny_cls_model, edit))


def test_nan_values(tmp_path, tiny_cls_model):
    def edit(t):
        key = next(k for k in t if k.endswith(".val") and t[k].numel())
        t[key][0] = float("nan")
    with pytest.raises(VectorError, match="NaN or infinite"):
        SparseVector.load(_edit_and_save(tmp_path, tiny_cls_model, edit))


def test_wrong_shape_against_model(tmp_path, tiny_cls_model):
    folder = make_vector(tiny_cls_model).save(tmp_path / "v")
    cfg = json.loads((folder / "sft_config.json").read_text())
    cfg["base_fingerprint"] = ""  # only the shape check can catch it now
    cfg["shapes"]["classifier.weight"] = [4, 16]
    (folder / "sft_config.json").write_text(json.dumps(cfg))
    with pytest.raises(VectorError, match="classifier.weight"):
        SparseVector.load(folder).apply(tiny_cls_model)


def test_save_is_atomic(tmp_path, tiny_cls_model, monkeypatch):
    folder = make_vector(tiny_cls_model, seed=5).save(tmp_path / "v")
    original = {p.name: p.read_bytes() for p in folder.iterdir()}
    import deftx_engine.vectors as vmod

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(vmod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make_vector(tiny_cls_model, seed=6).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == original
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # no temporary folder left behind


def test_revert_without_apply(tiny_cls_model):
    with pytest.raises(VectorError, match="without a matching apply"):
        make_vector(tiny_cls_model).revert(tiny_cls_model)


def test_revert_out_of_order_is_refused_and_changes_nothing(tiny_cls_model):
    """Two vectors whose entries overlap: reverting the first while the second is applied would write back
    entries the second had changed. It is refused, the model is untouched, and the right order is exact."""
    before = state(tiny_cls_model)
    a, b = make_vector(tiny_cls_model, seed=5), make_vector(tiny_cls_model, kind="language", seed=5, heads=False)
    assert any(torch.isin(a.indices[n], b.indices[n]).any() for n in a.indices)  # same seed: same entries
    a.apply(tiny_cls_model)
    b.apply(tiny_cls_model)
    applied = state(tiny_cls_model)
    with pytest.raises(VectorError, match="out of order"):
        a.revert(tiny_cls_model)
    assert all(torch.equal(applied[n], t) for n, t in state(tiny_cls_model).items())
    b.revert(tiny_cls_model)
    a.revert(tiny_cls_model)
    assert all(torch.equal(before[n], t) for n, t in state(tiny_cls_model).items())


def test_one_vector_on_two_models_reverts_each(tiny_cls_model):
    """apply/revert are recorded per model: the record of one model never restores another's entries."""
    import copy

    other = copy.deepcopy(tiny_cls_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before_a, before_b = state(tiny_cls_model), state(other)
    vec = make_vector(tiny_cls_model, seed=6)
    vec.apply(tiny_cls_model)
    vec.apply(other)
    vec.revert(tiny_cls_model)
    vec.revert(other)
    assert all(torch.equal(before_a[n], t) for n, t in state(tiny_cls_model).items())
    assert all(torch.equal(before_b[n], t) for n, t in state(other).items())
