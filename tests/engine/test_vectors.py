import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deftx_engine.vectors as vmod
from deftx_engine.denoise import DenoiseConfig
from deftx_engine.errors import VectorError
from deftx_engine.vectors import (CONFIG_FILE, FORMAT, MAX_ABS_VALUE, WEIGHTS_FILE, SparseVector, VectorMeta,
                                  base_fingerprint, compose, read_json)
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


# ---- hand-made vectors: no model, milliseconds each ------------------------------------------------------
def hand_config(**over):
    """A valid task vector config: w (2x5) and b (5) diffs, a 3-label classifier head (4 inputs)."""
    cfg = {"format": FORMAT, "kind": "task", "base_model": "m", "base_fingerprint": "fp", "language": "xx",
           "label_names": ["a", "b", "c"], "method": "deftx", "denoise": DenoiseConfig().to_dict(), "k": 3,
           "engine_version": "0", "extra": {"note": 1},
           "shapes": {"w": [2, 5], "b": [5], "classifier.weight": [3, 4], "classifier.bias": [3]}}
    cfg.update(over)
    return cfg


def hand_tensors():
    return {"w.idx": torch.tensor([1, 7], dtype=torch.int32), "w.val": torch.tensor([0.5, -0.25]),
            "b.idx": torch.tensor([4], dtype=torch.int32), "b.val": torch.tensor([2.0]),
            "classifier.weight.head": torch.full((3, 4), 0.1), "classifier.bias.head": torch.zeros(3)}


def lang_config(**over):
    cfg = hand_config(kind="language", label_names=[], shapes={"w": [2, 5], "b": [5]})
    cfg.update(over)
    return cfg


def lang_tensors():
    return {k: v for k, v in hand_tensors().items() if not k.endswith(".head")}


def write_vector(folder, config=None, tensors=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(hand_config() if config is None else config))
    save_file(hand_tensors() if tensors is None else tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    return folder


def mem(kind="language", entries=None, shapes=None, **meta):
    """An in-memory vector: entries {param: {flat index: value}} (default w[1] = 0.5, w[7] = -0.25)."""
    entries = {"w": {1: 0.5, 7: -0.25}} if entries is None else entries
    shapes = shapes or {"w": (2, 5), "b": (5,)}
    v = SparseVector(VectorMeta(kind=kind, **{"base_model": "m", "base_fingerprint": "fp", **meta}))
    for name, d in entries.items():
        v.indices[name] = torch.tensor(sorted(d), dtype=torch.int32)
        v.values[name] = torch.tensor([d[i] for i in sorted(d)], dtype=torch.float32)
        v.shapes[name] = shapes[name]
    if kind == "task":
        v.meta.label_names = meta.get("label_names", ["a", "b", "c"])
        v.heads = {"classifier.weight": torch.full((3, 4), 0.1), "classifier.bias": torch.zeros(3)}
        v.shapes.update({"classifier.weight": (3, 4), "classifier.bias": (3,)})
    v.meta.k = v.nnz
    return v


def test_hand_made_vectors_load_and_save_back_unchanged(tmp_path):
    vec = SparseVector.load(write_vector(tmp_path / "v"))
    assert vec.meta == VectorMeta(**{k: v for k, v in hand_config().items() if k not in ("format", "shapes")})
    assert vec.shapes == {"w": (2, 5), "b": (5,), "classifier.weight": (3, 4), "classifier.bias": (3,)}
    vec.save(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": FORMAT}
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text()) == hand_config()
    assert {k: t.tolist() for k, t in load_file(str(tmp_path / "again" / WEIGHTS_FILE)).items()} == \
        {k: t.tolist() for k, t in hand_tensors().items()}
    lang = SparseVector.load(write_vector(tmp_path / "l", lang_config(), lang_tensors()))
    assert lang.meta.label_names == [] and not lang.heads


# ---- issue 20, "vectors that lie" -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e38, -1000.5])
@pytest.mark.parametrize("key", ["w.val", "classifier.weight.head"])
def test_values_nan_infinite_or_beyond_the_bound_are_refused(tmp_path, bad, key):
    """3e38 is finite, but theta0 + 3e38 gives inf logits and a "nan%" prediction."""
    t = hand_tensors()
    t[key].view(-1)[0] = bad
    with pytest.raises(VectorError, match=r"has values that are NaN, infinite or beyond ±1000"):
        SparseVector.load(write_vector(tmp_path / "v", tensors=t))


def test_values_at_the_bound_load_and_an_edit_beyond_it_is_caught_before_save_and_apply(tmp_path, tiny_cls_model):
    t = hand_tensors()
    t["w.val"][0], t["classifier.weight.head"][0, 0] = -MAX_ABS_VALUE, MAX_ABS_VALUE
    vec = SparseVector.load(write_vector(tmp_path / "v", tensors=t))
    assert vec.values["w"][0] == -1000 and vec.heads["classifier.weight"][0, 0] == 1000
    vec.heads["classifier.weight"][0, 1] = 1e6
    with pytest.raises(VectorError, match="head parameter 'classifier.weight' has values"):
        vec.save(tmp_path / "w")
    task = make_vector(tiny_cls_model)
    task.values[next(iter(task.values))][0] = 3e38
    before = state(tiny_cls_model)
    with pytest.raises(VectorError, match="beyond"):
        task.apply(tiny_cls_model)
    assert all(torch.equal(before[n], t) for n, t in state(tiny_cls_model).items())


def test_an_emptied_weights_file_with_its_config_unchanged_is_refused(tmp_path):
    with pytest.raises(VectorError, match=r"sft_config.json: field 'k' says 3 entries, but the tensors hold 0"):
        SparseVector.load(write_vector(tmp_path / "v", tensors={}))
    with pytest.raises(VectorError, match="field 'shapes' lists 'w', which has no tensors"):
        SparseVector.load(write_vector(tmp_path / "v0", hand_config(k=0), tensors={}))
    t = hand_tensors()
    del t["b.idx"], t["b.val"]
    with pytest.raises(VectorError, match="field 'k' says 3 entries, but the tensors hold 2"):
        SparseVector.load(write_vector(tmp_path / "v1", tensors=t))
    with pytest.raises(VectorError, match="field 'shapes' lists 'b', which has no tensors"):
        SparseVector.load(write_vector(tmp_path / "v2", hand_config(k=2), tensors=t))
    vec = mem("task")
    vec.meta.k = 5
    with pytest.raises(VectorError, match="field 'k' says 5"):
        vec.save(tmp_path / "v3")


@pytest.mark.parametrize("labels, says", [
    ([], "must hold 1 to 1,000 distinct names, found 0 "),
    ([f"l{i}" for i in range(100_000)], "found 100,000 "),
    ([f"l{i}" for i in range(1001)], "found 1,001 "),
    (["a", "b", "a"], r"found 3 \(2 distinct\)"),
    (["a", "b", "c", "d"], r"4 label names, but no classifier weight among the heads has 4 outputs \(found \[3\]\)"),
    (["a", "b"], "2 label names"),
])
def test_label_names_must_fit_the_classifier_head(tmp_path, labels, says):
    """A task vector with 0 or 100,000 labels was pulled, then failed in Predict."""
    with pytest.raises(VectorError, match=says):
        SparseVector.load(write_vector(tmp_path / "v", hand_config(label_names=labels)))
    vec = mem("task", label_names=labels)
    with pytest.raises(VectorError, match=says):
        vec.save(tmp_path / "w")


def test_labels_need_a_classifier_head_outside_the_pooler(tmp_path):
    cfg = hand_config(shapes={"w": [2, 5], "b": [5], "bert.pooler.dense.weight": [3, 4]})
    t = {**lang_tensors(), "bert.pooler.dense.weight.head": torch.zeros(3, 4)}
    with pytest.raises(VectorError, match=r"no classifier weight .* \(found no classifier head\)"):
        SparseVector.load(write_vector(tmp_path / "v", cfg, t))
    with pytest.raises(VectorError, match="found 0"):  # a task vector without labels or heads
        SparseVector.load(write_vector(tmp_path / "t", lang_config(kind="task"), lang_tensors()))
    with pytest.raises(VectorError, match="1 label names"):  # labels on a vector without a head
        SparseVector.load(write_vector(tmp_path / "l", lang_config(label_names=["x"]), lang_tensors()))
    labels = [f"l{i}" for i in range(1000)]  # the bound itself
    cfg = hand_config(label_names=labels, shapes={"w": [2, 5], "b": [5], "classifier.weight": [1000, 4]})
    t = {**lang_tensors(), "classifier.weight.head": torch.zeros(1000, 4)}
    assert SparseVector.load(write_vector(tmp_path / "m", cfg, t)).meta.label_names == labels
    composed = lang_config(kind="composed")  # a composition without a task vector: no labels, no head
    assert SparseVector.load(write_vector(tmp_path / "c", composed, lang_tensors())).meta.kind == "composed"


def test_compose_refuses_vectors_that_cannot_be_added(tmp_path):
    task = mem("task")
    with pytest.raises(VectorError, match=r"compose\(\): parameter 'w' has shape \(5, 2\) in the language vector "
                                          r"but \(2, 5\) in another one"):
        compose([task, mem(shapes={"w": (5, 2)})])
    with pytest.raises(VectorError, match=r"different base models \(task:m, language:other\)"):
        compose([task, mem(base_model="other")])  # same fingerprint, another base model named
    with pytest.raises(VectorError, match="different base models"):
        compose([task, mem(base_fingerprint="other")])
    with pytest.raises(VectorError, match="a composed vector cannot be composed again"):
        compose([task, compose([mem()])])
    with pytest.raises(VectorError, match="more than one task vector"):
        compose([task, mem("task")])
    with pytest.raises(VectorError, match="needs at least one vector"):
        compose([])
    with pytest.raises(VectorError, match="2 vectors but 1 scales"):
        compose([task, mem()], scales=[1.0])
    unnamed = compose([task, mem(base_model="", entries={"b": {0: 1.0}})])  # no name: the fingerprint decides
    assert unnamed.meta.base_model == "m" and unnamed.indices["b"].tolist() == [0]
    assert compose([mem(base_model=""), task]).meta.base_model == ""  # the first vector's name


# ---- reading JSON ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, says", [
    ("[" * 200_000 + "]" * 200_000, "nested more than 32 deep"),
    ("[" * 33 + "]" * 33, "nested more than 32 deep"),
    ('{"a": ' * 33 + "1" + "}" * 33, "nested more than 32 deep"),
    ("[" + "9" * 5000 + "]", "not valid JSON"),
    ("{not json", "not valid JSON"),
])
def test_read_json_refuses_what_would_crash_a_reader(tmp_path, text, says):
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(VectorError, match=f"c.json: {says}"):
        read_json(tmp_path / "c.json")


def test_read_json_limits(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text("[" * 32 + "]" * 32)
    assert read_json(path) == eval("[" * 32 + "]" * 32)
    path.write_text("null")
    assert read_json(path) is None
    path.write_bytes(b'"\xff"')
    with pytest.raises(VectorError, match="not valid JSON"):
        read_json(path)
    path.write_text('{"x": "' + "y" * 91 + '"}')
    monkeypatch.setattr(vmod, "MAX_CONFIG_BYTES", 100)
    assert path.stat().st_size == 100 and read_json(path) == {"x": "y" * 91}  # exactly the bound
    path.write_text('{"x": "' + "y" * 92 + '"}')
    with pytest.raises(VectorError, match=r"more than 100 bytes, more than a vector config can hold"):
        read_json(path)
    with pytest.raises(VectorError, match="not a regular file"):
        read_json(tmp_path)
    os.mkfifo(tmp_path / "fifo")  # opening it would block
    with pytest.raises(VectorError, match="fifo: not a regular file"):
        read_json(tmp_path / "fifo")
    with pytest.raises(VectorError, match="cannot be read"):
        read_json(tmp_path / "missing.json")
