"""Issue 20, "vectors that lie", through the engine's entry points (pull, compose, TIES, the CLI): each vector
below was accepted before and failed later (a "nan%" prediction, a random head, a failure in Predict, a silent
composition, a RecursionError). Now each is one VectorError when it is read, naming the file or the field.
The unit tests of each rule are in test_vectors.py / test_merge.py (fast, in the mutation selection)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deftx_engine.cli import main
from deftx_engine.errors import VectorError
from deftx_engine.hub.transfer import pull_vector
from deftx_engine.method.merge import ties_merge
from deftx_engine.method.vectors import CONFIG_FILE, WEIGHTS_FILE, SparseVector, compose
from deftx_engine.models.loading import load_cls_model, load_mlm_model
from deftx_engine.outputs.inference import composed_model
from tiny import make_tiny_model_dir, make_vector

LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model folder, a task vector and a language vector made for it."""
    root = tmp_path_factory.mktemp("claims")
    base = str(make_tiny_model_dir(root / "base"))
    task = make_vector(load_cls_model(base, LABELS), k=300, seed=1, base_model=base)
    lang = make_vector(load_mlm_model(base), "language", k=300, seed=2, heads=False, base_model=base)
    return {"root": root, "base": base, "task": task.save(root / "task"), "lang": lang.save(root / "lang")}


def edited(saved, tmp_path, which="task", config=None, tensors=None):
    """A copy of a saved vector with its config and/or tensors edited."""
    folder = tmp_path / f"edited-{which}-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    cfg = json.loads((saved[which] / CONFIG_FILE).read_text())
    ts = load_file(str(saved[which] / WEIGHTS_FILE))
    if config:
        config(cfg)
    if tensors:
        tensors(ts)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    save_file(ts, str(folder / WEIGHTS_FILE), metadata={"format": "deftx-sft/1"})
    return folder


def first_val(ts):
    return next(k for k in ts if k.endswith(".val"))


def huge(ts):
    ts[first_val(ts)][0] = 3e38


def cli(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_a_huge_finite_value_is_refused_by_predict_not_shown_as_nan(saved, tmp_path, capsys):
    folder = edited(saved, tmp_path, tensors=huge)
    rc, err = cli(["predict", "--task", str(folder), "--text", "good"], capsys)
    assert rc == 2 and "has values that are NaN, infinite or beyond ±1000" in err and str(folder) in err
    rc, _ = cli(["predict", "--task", str(saved["task"]), "--text", "good"], capsys)
    assert rc == 0  # the same vector unedited predicts


@pytest.mark.parametrize("lie, says", [
    ("emptied", "field 'k' says 300 entries, but the tensors hold 0"),
    ("no labels", "field 'label_names' must hold 1 to 1,000 distinct names, found 0"),
    ("100,000 labels", "found 100,000"),
    ("huge value", "beyond ±1000"),
    ("deep config", "nested more than 32 deep"),
])
def test_pull_refuses_a_vector_that_lies_and_leaves_no_dest(saved, tmp_path, capsys, lie, says):
    """Each was pulled before and failed in Predict (or predicted from a random head); the deep config gave
    "unexpected error (RecursionError)" in the app."""
    def config(cfg):
        if lie == "no labels":
            cfg["label_names"] = []
        elif lie == "100,000 labels":
            cfg["label_names"] = [f"l{i}" for i in range(100_000)]

    def tensors(ts):
        if lie == "emptied":
            ts.clear()
        elif lie == "huge value":
            huge(ts)
    folder = edited(saved, tmp_path, config=config, tensors=tensors)
    if lie == "deep config":
        (folder / CONFIG_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(VectorError, match=says):
        pull_vector(str(folder), tmp_path / "dest")
    rc, err = cli(["pull", str(folder), "--output-dir", str(tmp_path / "dest")], capsys)
    assert rc == 2 and says.split(",")[0] in err
    assert not (tmp_path / "dest").exists()


def test_a_deep_model_config_beside_a_composable_sft_file_only_loses_the_base_model_name(saved, tmp_path):
    src = tmp_path / "csft"
    src.mkdir()
    vec = SparseVector.load(saved["lang"])
    name = next(iter(vec.indices))
    dense = torch.zeros(vec.shapes[name])
    dense.view(-1)[vec.indices[name].long()] = vec.values[name]
    torch.save({name: dense}, src / "pytorch_diff.bin")
    (src / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    out = SparseVector.load(pull_vector(str(src), tmp_path / "dest"))
    assert out.meta.base_model == "" and torch.equal(out.values[name], vec.values[name])
    (src / "config.json").write_text(json.dumps({"_name_or_path": "org/model"}))
    assert SparseVector.load(pull_vector(str(src), tmp_path / "dest")).meta.base_model == "org/model"


def test_composable_sft_task_vectors_get_the_heads_labels_or_are_refused_without_a_head(tmp_path, tiny_cls_model):
    from deftx_engine.hub.composable_sft import convert_composable_sft

    params = dict(tiny_cls_model.named_parameters())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    body = {name: torch.eye(16) * 0.5}
    head = {n: torch.randn(params[n].shape) * 0.1 for n in ("classifier.weight", "classifier.bias")}
    src = tmp_path / "csft"
    src.mkdir()
    torch.save({"body": body, "head": head}, src / "pytorch_diff.bin")
    (src / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "neu", "2": "pos"}}))
    assert convert_composable_sft(src, tmp_path / "a", kind="task").meta.label_names == LABELS
    (src / "config.json").write_text(json.dumps({"id2label": {"0": "only-one"}}))  # not the head's 3 outputs
    assert convert_composable_sft(src, tmp_path / "b", kind="task").meta.label_names == ["LABEL_0", "LABEL_1",
                                                                                          "LABEL_2"]
    tiny_cls_model.config.id2label = {0: "x", 1: "y", 2: "z"}
    vec = convert_composable_sft(src, tmp_path / "c", kind="task", model=tiny_cls_model)
    assert vec.meta.label_names == SparseVector.load(tmp_path / "c").meta.label_names == ["x", "y", "z"]
    torch.save({"body": body}, src / "pytorch_diff.bin")
    with pytest.raises(VectorError, match="a task vector needs its classification head"):
        convert_composable_sft(src, tmp_path / "d", kind="task")
    assert not (tmp_path / "d").exists()


def test_a_language_vector_for_another_base_or_of_other_shapes_is_refused_by_compose(saved, tmp_path, capsys):
    other_base = edited(saved, tmp_path, "lang", config=lambda c: c.update(base_model="org/other-model"))
    with pytest.raises(VectorError, match="different base models"):
        composed_model(saved["task"], [other_base])  # the same fingerprint: only the name tells
    rc, err = cli(["compose", "--task", str(saved["task"]), "--language", str(other_base), "--merge", "ties",
                   "--output-dir", str(tmp_path / "out")], capsys)
    assert rc == 2 and "ties_merge(): the vectors were made for different base models" in err

    def transposed(cfg):
        name = next(n for n, s in cfg["shapes"].items() if len(s) == 2 and s[0] != s[1])
        cfg["shapes"][name] = cfg["shapes"][name][::-1]
    flipped = edited(saved, tmp_path, "lang", config=transposed)
    with pytest.raises(VectorError, match="in the language vector but"):
        composed_model(saved["task"], [flipped])
    assert not (tmp_path / "out").exists()


def test_ties_refuses_a_composed_vector_as_the_language_vector_as_sum_does(saved, tmp_path, capsys):
    both = compose([SparseVector.load(saved["task"]), SparseVector.load(saved["lang"])]).save(tmp_path / "both")
    for merge in ("sum", "ties"):
        rc, err = cli(["compose", "--task", str(saved["task"]), "--language", str(both), "--merge", merge,
                       "--output-dir", str(tmp_path / merge)], capsys)
        assert rc == 2 and "composed" in err, (merge, err)
        assert not (tmp_path / merge).exists()
    with pytest.raises(VectorError, match=r"ties_merge\(\): a composed vector cannot be composed again"):
        ties_merge([SparseVector.load(saved["task"]), SparseVector.load(both)])
