"""Issue 11 (the app and CLI attacked), engine side: every class below once gave a crash, a traceback, a silent
wrong answer or a broken promise; each now gives one message naming the file, field or option."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from deftx_engine.cli import main
from deftx_engine.errors import DataError, DeftxError, VectorError
from deftx_engine.hub.transfer import pull_vector, push_vector
from deftx_engine.method.vectors import CONFIG_FILE, WEIGHTS_FILE, SparseVector
from deftx_engine.outputs.inference import CHARS_PER_TOKEN, predict_proba
from deftx_engine.training.tables import parse_source
from tiny import make_vector, tiny_bert_config, write_composable_sft


@pytest.fixture(scope="module")
def model():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=3))


@pytest.fixture
def vector_dir(model, tmp_path) -> Path:
    return make_vector(model).save(tmp_path / "vec")


# ---- 1: input sizes before tokenizing -------------------------------------------------------------
class Recorder:
    """A tokenizer stand-in that records the longest text it was given."""

    def __init__(self):
        self.longest = 0

    def __call__(self, texts, pairs=None, **kw):
        self.longest = max([self.longest, *map(len, texts), *map(len, pairs or [])])
        return {"input_ids": [[1, 1, 1, 1]] * len(texts)}

    @staticmethod
    def pad(features, return_tensors=None):
        return Enc(input_ids=torch.tensor(features["input_ids"]))


class Model(torch.nn.Module):
    config = type("C", (), {"num_labels": 2})

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, input_ids):
        return type("O", (), {"logits": self.w.expand(input_ids.shape[0], 2)})


class Enc(dict):
    def to(self, dev):
        return self


def test_texts_are_cut_before_tokenizing_and_scoring_stops_when_asked():
    """A 1 MB pair once took 19 GB in the tokenizer: texts are cut to max_length * CHARS_PER_TOKEN first."""
    tok = Recorder()
    probs = predict_proba(Model(), tok, ["x" * 1_000_000], ["y" * 1_000_000], max_length=128)
    assert probs.shape == (1, 2) and tok.longest == 128 * CHARS_PER_TOKEN
    calls = []
    with pytest.raises(DeftxError, match="stopped after 64 of 100 rows: enough"):
        predict_proba(Model(), tok, ["a"] * 100, batch_size=32,
                      stop=lambda: (calls.append(1), "enough" if len(calls) > 2 else None)[1])


# ---- 3: hub: specs never name local folders -------------------------------------------------------
@pytest.mark.parametrize("spec", ["hub:/etc", "hub:../../etc", "hub:~/x", "hub:a/b/c", "hub:.", "hub:tests"])
def test_hub_specs_never_name_local_folders(spec):
    with pytest.raises(DataError, match="not a Hub dataset id"):
        parse_source(spec)
    assert parse_source("hub:facebook/xnli:sw@test#premise").dataset == "facebook/xnli"


# ---- 9: a vector's whole schema, once, at load ----------------------------------------------------
CONFIG_ATTACKS = {
    "kind": (["task"], "'kind'"), "k": ("12", "'k'"), "language": ({"a": 1}, "'language'"),
    "label_names": ([["a"], "b"], "'label_names'"), "base_model": (7, "'base_model'"),
    "denoise": ({"rank": [1]}, "'denoise'"), "extra": ([1], "'extra'"), "surprise": ("x", "unknown field"),
}


@pytest.mark.parametrize("field", list(CONFIG_ATTACKS))
def test_mistyped_metadata_is_refused_naming_the_field(vector_dir, field):
    value, says = CONFIG_ATTACKS[field]
    cfg = json.loads((vector_dir / CONFIG_FILE).read_text())
    cfg[field] = value
    (vector_dir / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(VectorError, match=says):
        SparseVector.load(vector_dir)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
FIELDS = ["kind", "base_model", "base_fingerprint", "language", "label_names", "method", "denoise", "k",
          "engine_version", "extra", "shapes", "format", "unknown"]


@pytest.fixture(scope="module")
def saved_vector(model, tmp_path_factory) -> Path:
    return make_vector(model).save(tmp_path_factory.mktemp("saved") / "v")


@settings(max_examples=int(200 * float(os.environ.get("DEFTX_FUZZ_SCALE", "1"))), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), value=JSON, drop=st.booleans())
def test_fuzzed_vector_configs_load_whole_or_give_one_message(saved_vector, tmp_path_factory, field, value, drop):
    """Any JSON value in any field (or the field missing): the vector loads and every reader of its metadata
    works (summary, model card), or the load is one VectorError naming the file."""
    from deftx_engine.hub.transfer import build_model_card
    from deftx_engine.outputs.report import vector_summary

    folder = shutil.copytree(saved_vector, tmp_path_factory.mktemp("fz") / "v")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if drop:
        cfg.pop(field, None)
    else:
        cfg[field] = value
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    try:
        vec = SparseVector.load(folder)
    except VectorError as e:
        assert str(folder) in str(e) and "\n" not in str(e)
        return
    vector_summary(vec)
    build_model_card(vec, "user/x")


@pytest.mark.parametrize("attack", ["negative shape", "float shape", "deep json", "2-D indices", "float indices",
                                    "complex values", "int head", "values without indices"])
def test_malformed_shapes_tensors_and_json_are_refused(vector_dir, attack):
    cfg_path, w_path = vector_dir / CONFIG_FILE, vector_dir / WEIGHTS_FILE
    cfg, tensors = json.loads(cfg_path.read_text()), load_file(str(w_path))
    name = next(k[:-4] for k in tensors if k.endswith(".idx"))
    head = next(k for k in tensors if k.endswith(".head"))
    if attack == "negative shape":
        cfg["shapes"][name] = [-1, 4]
    elif attack == "float shape":
        cfg["shapes"][name] = [2.5, 4]
    elif attack == "deep json":
        cfg_path.write_text("[" * 200_000 + "]" * 200_000)
    elif attack == "2-D indices":
        tensors[name + ".idx"] = tensors[name + ".idx"].reshape(1, -1)
    elif attack == "float indices":
        tensors[name + ".idx"] = tensors[name + ".idx"].float()
    elif attack == "complex values":
        tensors[name + ".val"] = tensors[name + ".val"].to(torch.complex64)
    elif attack == "int head":
        tensors[head] = tensors[head].to(torch.int64)
    else:
        del tensors[name + ".idx"]
    if attack != "deep json":
        cfg_path.write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(w_path), metadata={"format": "deftx-sft/1"})
    with pytest.raises(VectorError, match=str(vector_dir)):
        SparseVector.load(vector_dir)


@pytest.mark.parametrize("attack", ["float size", "negative steps", "steps past the end", "float indices",
                                    "complex values", "indices out of a dimension", "odd indices shape"])
def test_composable_sft_encodings_are_checked_not_wrapped(tmp_path, attack):
    from transformers import BertForMaskedLM

    src = tmp_path / "csft"
    diffs = write_composable_sft(BertForMaskedLM(tiny_bert_config()), src)
    name = next(n for n, t in diffs.items() if t.dim() == 2 and "encoder" in n)
    rows, cols = diffs[name].shape
    entry = {"size": [rows, cols], "values": torch.ones(3), "index_steps": torch.tensor([0, 1, 1])}
    if attack == "float size":
        entry["size"] = [rows + 0.5, cols]
    elif attack == "negative steps":
        entry["index_steps"] = torch.tensor([5, -3, 1])
    elif attack == "steps past the end":
        entry["index_steps"] = torch.tensor([rows * cols, 1, 1])
    elif attack == "float indices":
        entry["index_steps"] = torch.tensor([0.0, 1.5, 1.0])
    elif attack == "complex values":
        entry["values"] = torch.ones(3, dtype=torch.complex64)
    else:
        del entry["index_steps"]
        entry["indices"] = (torch.tensor([[0, 0, 1], [0, cols, 1]]) if attack == "indices out of a dimension"
                            else torch.tensor([0, 0, 1, 0, 1, 2]))
    torch.save({**diffs, name: entry}, src / "pytorch_diff.bin")
    with pytest.raises(VectorError, match=f"pytorch_diff.bin: parameter '{name}'"):
        pull_vector(str(src), tmp_path / "out", base_model="tiny")
    assert not (tmp_path / "out").exists()


# ---- 6 and 15: output folders and links -----------------------------------------------------------
def test_pull_replaces_only_a_vector_folder_and_follows_no_link(vector_dir, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for dest in (other, a_file, Path("/")):
        with pytest.raises(DeftxError, match="DeFT-X did not write|not a folder"):
            pull_vector(str(vector_dir), dest)
    assert (other / "notes.txt").read_text() == "keep" and a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine", "vec"]  # no .old-<pid> leftover
    pull_vector(str(vector_dir), tmp_path / "v2")
    pull_vector(str(vector_dir), tmp_path / "v2")  # a vector folder is replaced
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / CONFIG_FILE).symlink_to(vector_dir / CONFIG_FILE)
    shutil.copy2(vector_dir / WEIGHTS_FILE, linked / WEIGHTS_FILE)
    with pytest.raises(VectorError, match="symbolic link"):
        pull_vector(str(linked), tmp_path / "v3")


# ---- 13: nothing local leaves the machine ---------------------------------------------------------
def test_push_strips_local_paths_from_config_and_card(hub_server, model, tmp_path):
    vec = make_vector(model, base_model="/srv/secret-models/tiny-bert")
    vec.meta.train = {"data": "/home/alice/.deftx/uploads/0123abcd-reviews.csv", "seed": 1}
    vec.meta.n_maskable = 10
    folder = vec.save(tmp_path / "vec")
    push_vector(folder, "user/x")  # to the local Hub (tests/hub_server.py), through the real client
    files = hub_server.repos["user/x"].files
    pushed = "".join(data.decode() for name, data in files.items() if name.endswith((".json", ".md")))
    assert "/home/alice" not in pushed and "/srv/secret-models" not in pushed
    assert "0123abcd-reviews.csv" in pushed and "tiny-bert" in pushed
    assert "/home/alice" in (folder / CONFIG_FILE).read_text()  # the local folder itself is unchanged


# ---- 11: one line, not a traceback ----------------------------------------------------------------
def test_cli_output_paths_give_one_line(vector_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    cases = [(["predict", "--task", str(vector_dir), "--text", "x", "--output", str(tmp_path)], "is a folder"),
             (["inspect", str(vector_dir), "--html", str(tmp_path)], "is a folder"),
             (["compose", "--task", str(vector_dir), "--output-dir", str(a_file)], "not a folder"),
             (["compose", "--task", str(vector_dir), "--output-dir", "/"], "DeFT-X did not write"),
             (["pull", str(vector_dir), "--output-dir", "/"], "DeFT-X did not write")]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("deftx: error:") and says in err and len(err.splitlines()) == 1, (argv, err)
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize("argv,says", [
    (["--scale", "nan"], "argument --scale: must be a finite number, got 'nan'"),
    (["--scale", "1", "inf"], "argument --scale: must be a finite number, got 'inf'"),
    (["--scale", "abc"], "argument --scale: must be a number, got 'abc'"),
    (["--merge", "ties", "--ties-lambda", "inf"], "argument --ties-lambda: must be a finite number"),
    (["--merge", "ties", "--ties-density", "nan"], "argument --ties-density: must be a finite number"),
    (["--scale", "1", "2", "3"], "--scale takes one value per vector, the task's first: 3 given for 2 vectors"),
])
def test_compose_numbers_are_checked_naming_the_option(vector_dir, tmp_path, capsys, argv, says):
    """A NaN or infinite scale is refused naming its option, not found later in a parameter's values."""
    from deftx_engine.cli import main

    try:
        rc = main(["compose", "--task", str(vector_dir), "--language", str(vector_dir), "--output-dir",
                   str(tmp_path / "out"), *argv])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_errors_never_echo_a_huge_argument_whole(vector_dir, tmp_path, capsys):
    """A 100,000-character path or repo id came back whole in the one-line error (the app cuts ids to 80
    characters); the CLI keeps the start and the reason of a message and says how much it left out."""
    long_path = "/tmp/" + "/".join(["y" * 200] * 500)
    cases = [(["inspect", str(vector_dir), "--run", long_path], "File name too long"),  # an OSError
             (["inspect", long_path], "File name too long"),
             (["pull", "x" * 100_000, "--output-dir", str(tmp_path / "p")], "File name too long"),
             (["inspect", str(vector_dir), "--run", "/" + "/".join(["z" * 200] * 20)], "does not exist")]  # DeftxError
    for argv, says in cases:
        assert main(argv) == 2, argv[:1]
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert err.startswith("deftx: error:") and says in err and len(err) < 1100, (argv[:1], err[:200], len(err))
        assert "characters left out" in err
