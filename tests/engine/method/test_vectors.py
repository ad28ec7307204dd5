import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deftx_engine.method.vector_meta as vector_meta
from deftx_engine.errors import VectorError
from deftx_engine.method.denoise import DenoiseConfig
from deftx_engine.method.vectors import (
    CONFIG_FILE,
    FORMAT,
    MAX_ABS_VALUE,
    WEIGHTS_FILE,
    SparseVector,
    VectorMeta,
    base_fingerprint,
    compose,
    read_json,
)
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
    import deftx_engine.method.vectors as vmod

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
    # written back in the current schema: the same fields, the typed ones that schema 1 kept in "extra" unset
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text()) == {
        **hand_config(), "schema_version": 2, "train": None, "n_maskable": None, "heldout_mlm": None,
        "mlm_head": None, "metrics": None, "components": [], "ties": None, "converted_from": "",
        "skipped_parameters": [], "license": ""}
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
    one = hand_config(label_names=["yes"], shapes={"w": [2, 5], "b": [5], "classifier.weight": [1, 4]})
    t = {**lang_tensors(), "classifier.weight.head": torch.zeros(1, 4)}
    assert SparseVector.load(write_vector(tmp_path / "one", one, t)).meta.label_names == ["yes"]
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
    monkeypatch.setattr(vector_meta, "MAX_CONFIG_BYTES", 100)
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


# ---- issue 18: what the mutation run found unchecked ----------------------------------------------------
def test_from_diff_stores_theta_minus_theta0_at_the_mask_and_copies_the_heads(tiny_cls_model):
    params = dict(tiny_cls_model.named_parameters())
    name, empty = "bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight"
    theta0 = {name: params[name].detach() - 1.0, empty: params[empty].detach()}
    mask = {name: torch.tensor([0, 3, 7]), empty: torch.tensor([], dtype=torch.long)}
    vec = SparseVector.from_diff(VectorMeta(kind="task", base_model="m", base_fingerprint="fp"), theta0,
                                 tiny_cls_model, mask, ["classifier.bias"])
    assert vec.values[name].tolist() == [1.0, 1.0, 1.0] and vec.values[name].dtype == torch.float32
    assert vec.indices[name].tolist() == [0, 3, 7] and vec.indices[name].dtype == torch.int32
    assert vec.shapes == {name: (16, 16), "classifier.bias": (3,)} and set(vec.indices) == {name}
    assert torch.equal(vec.heads["classifier.bias"], params["classifier.bias"].detach()) and vec.meta.k == 3
    with torch.no_grad():
        params["classifier.bias"].add_(1.0)
    assert not torch.equal(vec.heads["classifier.bias"], params["classifier.bias"].detach())  # a copy
    assert vec.mask()[name].dtype == torch.long and vec.mask()[name].tolist() == [0, 3, 7]


def test_the_fingerprint_is_the_encoders_alone(tiny_cls_model, mlm_model):
    from transformers import BertForSequenceClassification

    fp = base_fingerprint(tiny_cls_model)
    assert fp == base_fingerprint(mlm_model) and len(fp) == 16 and int(fp, 16) >= 0
    other = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=1))
    assert base_fingerprint(other) != fp
    assert len(base_fingerprint(torch.nn.Linear(2, 2))) == 16  # a module without base_model_prefix


def test_compose_metadata_dtypes_and_sums():
    task = mem("task", {"w": {1: 0.5}}, language="xx", method="lt-sft")
    lang = mem("language", {"w": {1: 0.25, 3: 1.0}, "b": {0: -1.0}}, language="yy", method="deftx")
    lang.indices["w"] = lang.indices["w"].long()  # int64 indices (allowed at load)
    lang.values["b"] = lang.values["b"].double()
    both = compose([task, lang], scales=[1.0, 2.0])
    assert both.meta == VectorMeta(
        kind="composed", base_model="m", base_fingerprint="fp", language="xx+yy", label_names=["a", "b", "c"],
        method="lt-sft", denoise=None, k=3,
        extra={"components": [{"kind": "task", "language": "xx", "method": "lt-sft", "scale": 1.0},
                              {"kind": "language", "language": "yy", "method": "deftx", "scale": 2.0}]})
    assert {n: (i.tolist(), both.values[n].tolist()) for n, i in both.indices.items()} == {
        "w": ([1, 3], [1.0, 2.0]), "b": ([0], [-2.0])}
    assert all(i.dtype == torch.int32 for i in both.indices.values()) and both.values["b"].dtype == torch.float64
    assert both.heads.keys() == task.heads.keys() and both.shapes == {**task.shapes, "b": (5,)}
    assert compose([mem(language="")]).meta.language == "" and compose([lang]).heads == {}


def _tensors(**edit):
    t = hand_tensors()
    for key, value in edit.items():
        key = key.replace("__", ".")
        if value is None:
            del t[key]
        else:
            t[key] = value
    return t


@pytest.mark.parametrize("config, tensors, says", [
    (hand_config(format="deftx-sft/2"), None, "not a DeFT-X vector config"),
    ([hand_config()], None, "not a DeFT-X vector config"),
    (hand_config(surprise=1), None, "unknown field 'surprise'"),
    (hand_config(kind="lang"), None, "field 'kind' must be 'language' or 'task' or 'composed', found 'lang'"),
    (hand_config(base_model=7), None, "field 'base_model' must be a string, found 7"),
    ({k: v for k, v in hand_config().items() if k != "base_fingerprint"}, None,
     "field 'base_fingerprint' must be a string, found nothing"),
    (hand_config(language=5), None, "field 'language' must be a string"),
    (hand_config(method=5), None, "field 'method' must be a string"),
    (hand_config(engine_version=5), None, "field 'engine_version' must be a string"),
    (hand_config(label_names="abc"), None, "field 'label_names' must be a list of strings"),
    (hand_config(label_names=["a", 1, "c"]), None, "field 'label_names' must be a list of strings"),
    (hand_config(k=-1), None, "field 'k' must be a whole number >= 0"),
    (hand_config(k=2.5), None, "field 'k' must be a whole number >= 0"),
    (hand_config(k=True), None, "field 'k' must be a whole number >= 0"),
    (hand_config(denoise="abc"), None, "field 'denoise' must be null or an object"),
    (hand_config(denoise={"rank": [1]}), None, "field 'denoise' must be null or an object"),
    (hand_config(extra=5), None, "field 'extra' must be an object, found 5"),
    (hand_config(shapes=[1]), None, "field 'shapes' must be an object of parameter shapes, found list"),
    (hand_config(shapes={**hand_config()["shapes"], "w": [-1, 5]}), None, "'shapes' of 'w' must be a list"),
    (hand_config(shapes={**hand_config()["shapes"], "w": [2.5]}), None, "'shapes' of 'w' must be a list"),
    (hand_config(shapes={**hand_config()["shapes"], "w": [True, 10]}), None, "'shapes' of 'w' must be a list"),
    (hand_config(shapes={**hand_config()["shapes"], "w": "2x5"}), None, "'shapes' of 'w' must be a list"),
    (hand_config(shapes={**hand_config()["shapes"], "w": [1] * 8 + [10]}), None, "'shapes' of 'w' must be a list"),
    (hand_config(shapes={**hand_config()["shapes"], "w": [2 ** 16, 2 ** 15]}), None, "more entries than int32"),
    (None, _tensors(w__idx=torch.tensor([1.0, 7.0])), "tensor 'w.idx' must be 1-D int32 indices, found 1-D"),
    (None, _tensors(w__idx=torch.tensor([1, 7], dtype=torch.int16)), "tensor 'w.idx' must be 1-D int32"),
    (None, _tensors(w__idx=torch.tensor([[1], [7]], dtype=torch.int32)), "tensor 'w.idx' must be 1-D int32"),
    (None, _tensors(w__val=torch.tensor([1, 2], dtype=torch.int32)), "tensor 'w.val' must be 1-D real floats"),
    (None, _tensors(w__val=torch.tensor([[0.5, -0.25]])), "tensor 'w.val' must be 1-D real floats, found 2-D"),
    (None, _tensors(classifier__bias__head=torch.zeros(3, dtype=torch.int64)),
     "tensor 'classifier.bias.head' must hold real floats"),
    (None, _tensors(w__foo=torch.zeros(1)), "unexpected tensor 'w.foo'"),
    (None, _tensors(q__val=torch.zeros(1)), "unexpected tensor 'q.val'"),
    (None, _tensors(b__idx=None), "tensor 'b.val' has no 'b.idx'"),
    (None, _tensors(b__val=None), "parameter 'b' has indices but no values or shape"),
    (None, _tensors(b__val=torch.tensor([1.0, 2.0])), "parameter 'b' has 1 indices but 2 values"),
    (None, _tensors(classifier__bias__head=torch.zeros(4)),
     r"head 'classifier.bias' has shape \(4,\), config says \(3,\)"),
])
def test_a_vector_file_that_breaks_the_format_is_one_vector_error_naming_it(tmp_path, config, tensors, says):
    folder = write_vector(tmp_path / "v", config, tensors)
    with pytest.raises(VectorError, match=says) as e:
        SparseVector.load(folder)
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("config, tensors", [
    ({k: v for k, v in lang_config().items() if k not in ("label_names", "language", "method", "engine_version",
                                                           "denoise", "extra")}, lang_tensors()),
    (hand_config(denoise=None), None),
    (hand_config(k=3, shapes={**hand_config()["shapes"], "w": [1] * 7 + [10]}), None),  # 8 dimensions
    (hand_config(shapes={**hand_config()["shapes"], "z": [0, 5]}),
     _tensors(z__idx=torch.zeros(0, dtype=torch.int32), z__val=torch.zeros(0))),  # an empty parameter
    (hand_config(shapes={**hand_config()["shapes"], "w": [2 ** 31 - 1]}), None),
    (None, _tensors(w__idx=torch.tensor([1, 7]), w__val=torch.tensor([0.5, -0.25], dtype=torch.float64))),
    (None, _tensors(w__val=torch.tensor([0.5, -0.25], dtype=torch.float16),
                    classifier__bias__head=torch.zeros(3, dtype=torch.bfloat16))),
])
def test_every_variant_the_format_allows_loads(tmp_path, config, tensors):
    vec = SparseVector.load(write_vector(tmp_path / "v", config, tensors))
    assert vec.nnz == vec.meta.k and vec.values["w"].tolist() == [0.5, -0.25]


@pytest.mark.parametrize("indices, says", [
    ([2, 10], r"indices outside \[0, 10\) for shape \(2, 5\)"), ([-1, 3], "indices outside"),
    ([3, 1], "unsorted or repeated"), ([2, 2], "unsorted or repeated"), ([1, 5, 3], "unsorted or repeated"),
])
def test_check_refuses_indices_out_of_range_unsorted_or_repeated(indices, says):
    vec = mem(entries={"w": {0: 1.0}})
    vec.indices["w"] = torch.tensor(indices, dtype=torch.int32)
    vec.values["w"] = torch.ones(len(indices))
    with pytest.raises(VectorError, match=f"vector: parameter 'w' has {says}"):
        vec.check()
    vec.indices["w"] = torch.tensor([0, 1, 9], dtype=torch.int32)  # the last entry of (2, 5)
    vec.values["w"] = torch.ones(3)
    vec.check()
    del vec.shapes["w"]
    with pytest.raises(VectorError, match="has indices but no values or shape"):
        vec.check()


def _wrong_head(model):
    vec = make_vector(model)
    vec.heads["classifier.weight"], vec.shapes["classifier.weight"] = torch.zeros(4, 16), (4, 16)
    return vec


def test_validate_checks_heads_unless_told_not_to(tiny_cls_model):
    vec = _wrong_head(tiny_cls_model)
    with pytest.raises(VectorError, match=r"vector: parameter 'classifier.weight' has shape \(4, 16\) in the vector "
                                          r"but \(3, 16\) in the model"):
        vec.validate(tiny_cls_model)
    vec.validate(tiny_cls_model, heads=False)
    before = state(tiny_cls_model)
    with pytest.raises(VectorError, match="classifier.weight"):
        vec.apply(tiny_cls_model)
    assert all(torch.equal(before[n], t) for n, t in state(tiny_cls_model).items())  # nothing added first
    vec.apply(tiny_cls_model, heads=False)
    assert torch.equal(state(tiny_cls_model)["classifier.weight"], before["classifier.weight"])
    vec.revert(tiny_cls_model)
    name = next(iter(vec.indices))
    shape = vec.shapes[name]
    vec.shapes[name] = (int(torch.Size(shape).numel()),)
    with pytest.raises(VectorError, match=f"parameter '{name}' has shape"):
        vec.validate(tiny_cls_model, heads=False)
    vec.shapes[name] = shape
    vec.indices["nope"], vec.values["nope"], vec.shapes["nope"] = vec.indices[name], vec.values[name], (2,)
    with pytest.raises(VectorError, match="the model has no parameter 'nope'"):
        vec.validate(tiny_cls_model, heads=False)


def test_validate_checks_again_after_an_edit_in_memory(tiny_cls_model):
    vec = make_vector(tiny_cls_model)
    vec.check()
    name = next(iter(vec.values))
    vec.values[name] = torch.full_like(vec.values[name], float("nan"))  # a new tensor, same _version
    with pytest.raises(VectorError, match=f"parameter '{name}' has values that are NaN"):
        vec.validate(tiny_cls_model)
    vec = make_vector(tiny_cls_model)
    vec.check()
    vec.values[name][0] = float("nan")  # the same tensor, edited in place
    with pytest.raises(VectorError, match="NaN"):
        vec.validate(tiny_cls_model)


def test_apply_scales_casts_to_the_models_dtype_and_times_its_steps(tiny_cls_model):
    vec = make_vector(tiny_cls_model)
    before = state(tiny_cls_model)
    times = {}
    vec.apply(tiny_cls_model, scale=0.5, times=times)
    assert set(times) == {"validate", "save", "add", "heads"} and all(v >= 0 for v in times.values())
    after = state(tiny_cls_model)
    for n, idx in vec.indices.items():
        diff = (after[n] - before[n]).reshape(-1)[idx.long()]
        assert torch.allclose(diff, 0.5 * vec.values[n], atol=1e-7), n
    assert all(torch.equal(after[n], t) for n, t in vec.heads.items())  # heads set whole, not scaled
    times = {}
    vec.revert(tiny_cls_model, times=times)
    assert set(times) == {"heads", "indices", "write back"}
    assert all(torch.equal(before[n], t) for n, t in state(tiny_cls_model).items())
    half = tiny_cls_model.to(torch.bfloat16)
    vec.apply(half, heads=False)
    got = state(half)
    name = next(iter(vec.indices))
    assert got[name].dtype == torch.bfloat16
    expected = before[name].to(torch.bfloat16).reshape(-1).index_add(0, vec.indices[name].long(),
                                                                      vec.values[name].to(torch.bfloat16))
    assert torch.equal(got[name].reshape(-1), expected)
    vec.revert(half)
    tiny_cls_model.float()


def test_save_writes_int32_indices_and_the_format_whatever_it_holds(tmp_path):
    vec = mem("task")
    vec.indices["w"] = vec.indices["w"].long()
    vec.save(tmp_path / "v")
    with safe_open(str(tmp_path / "v" / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": FORMAT} and f.get_tensor("w.idx").dtype == torch.int32
    cfg = json.loads((tmp_path / "v" / CONFIG_FILE).read_text())
    assert cfg["format"] == FORMAT and cfg["shapes"]["w"] == [2, 5] and cfg["k"] == 2


def test_a_config_of_exactly_the_size_bound_loads(tmp_path, monkeypatch):
    folder = write_vector(tmp_path / "v")
    size = (folder / CONFIG_FILE).stat().st_size
    monkeypatch.setattr(vector_meta, "MAX_CONFIG_BYTES", size)
    SparseVector.load(folder)
    monkeypatch.setattr(vector_meta, "MAX_CONFIG_BYTES", size - 1)
    with pytest.raises(VectorError, match="more than a vector config can hold"):
        SparseVector.load(folder)


def test_apply_and_revert_move_indices_and_values_to_the_parameters_device(monkeypatch):
    """A model on another device than the vector's CPU tensors (here torch's shape-only "meta" device, so no GPU
    is needed): apply and revert move the indices and the values to each parameter's device, or index_add_ /
    index_copy_ refuse the mix."""
    model = torch.nn.Linear(5, 2)
    vec = SparseVector(VectorMeta(kind="language", base_model="m", base_fingerprint="fp", language="jv"))
    vec.indices["weight"] = torch.tensor([1, 7], dtype=torch.int32)
    vec.values["weight"] = torch.tensor([0.5, -0.5])
    vec.shapes["weight"] = (2, 5)
    monkeypatch.setattr(SparseVector, "validate", lambda self, model, **kw: None)  # it reads values: not on meta
    model.to("meta")
    vec.apply(model)
    assert model.weight.device.type == "meta"
    vec.revert(model)
    assert model.weight.device.type == "meta"


def test_reading_a_vector_config_is_bounded_whatever_the_files_size(tmp_path, monkeypatch):
    """A config over the limit (here 1 MiB; the file a sparse 64 MiB, no disk used) is refused after reading at
    most the limit + 1 bytes, not read whole first."""
    import tracemalloc

    monkeypatch.setattr(vector_meta, "MAX_CONFIG_BYTES", 1 << 20)
    path = tmp_path / "sft_config.json"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(VectorError, match="larger|too large|bytes"):
            read_json(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
