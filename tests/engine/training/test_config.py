"""The config contract: help in the field metadata, the CLI generated from the types, preset < --config < flags,
one planned-steps count, and errors that carry their setting as data."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deftx_engine.cli import build_parser
from deftx_engine.errors import ConfigError, DataError, option
from deftx_engine.models.presets import preset
from deftx_engine.training.config import FIELDS, TrainConfig, read_config_file, resolve


def test_config_module_loads_no_torch():
    code = ("import sys, deftx_engine.training.config; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_field_has_help_and_the_cli_shows_it(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no line breaks inside a help text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-task", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, f in FIELDS.items():
        assert f.metadata["help"], name
        if name != "kind":
            assert option(name) in text and " ".join(f.metadata["help"].split()) in text, name


def test_help_says_theta_and_phi_and_prints_on_an_ascii_console():
    """θ0, φ, ρ and σ² as the paper and README write them (the help said theta0, phi, rho, sigma^2); a console
    that cannot show them gets escapes, never a UnicodeEncodeError."""
    texts = " ".join(f.metadata["help"] for f in FIELDS.values())
    assert "θ0 + φ" in texts and "ρ:" in texts and "σ²" in texts and "theta" not in texts and "rho" not in texts
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(root), "COLUMNS": "10000"}
    res = subprocess.run([sys.executable, "-m", "deftx_engine.cli", "compose", "--help"], capture_output=True,
                         text=True, env=env, cwd=root, timeout=120)
    assert res.returncode == 0 and "sum = \\u03b80 + the vectors" in res.stdout, res.stderr[-500:]


def test_options_have_the_fields_types():
    p = build_parser()
    args = p.parse_args(["train-language", "--output-dir", "o", "--k", "0.1", "--batch-size", "4",
                         "--fit-head", "false", "--sparse-phase", "yes", "--mlm-layer", "2", "--method", "lt-sft"])
    assert (args.k, args.batch_size, args.fit_head, args.sparse_phase, args.mlm_layer, args.method) == \
        (0.1, 4, False, True, 2, "lt-sft")
    assert not hasattr(args, "lr")  # not given: the preset, config file or default decides
    for bad in (["--fit-head", "maybe"], ["--method", "svd"], ["--batch-size", "1.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(["train-task", "--output-dir", "o", *bad])


def test_flags_win_over_the_file_and_the_file_over_the_preset(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"kind": "task", "data": "d.csv", "lr": 1e-3, "full_steps": 7, "fit_head": False}))
    cfg = resolve("task", preset_name="cpu-demo", file=file, values={"full_steps": 3})
    assert (cfg.lr, cfg.full_steps, cfg.fit_head) == (1e-3, 3, False)
    assert cfg.max_length == preset("cpu-demo", "task")["max_length"]  # what the file leaves out
    assert resolve("task", file=file).to_dict() == TrainConfig(**json.loads(file.read_text())).to_dict()


@pytest.mark.parametrize("content,says,field", [
    ({"lr": "fast"}, "lr must be float or int, got 'fast'", "lr"),
    ({"batch_size": 2.5}, "batch_size must be int", "batch_size"),
    ({"fit_head": 1}, "fit_head must be bool", "fit_head"),
    ({"method": "svd"}, "method must be one of 'deftx', 'lt-sft'", "method"),
    ({"epochs": 3}, "unknown settings: epochs", "epochs"),
    ({"kind": "language"}, "is for a language SFT, not a task SFT", "kind"),
    ([1, 2], "must hold a JSON object", "config"),
])
def test_bad_config_files_name_the_setting(tmp_path, content, says, field):
    file = tmp_path / "run.json"
    file.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=says) as e:
        resolve("task", file=file, values={"data": "d.csv"})
    assert e.value.field == field


def test_no_data_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no training data\. Pass --data\.") as e:
        resolve("task")
    assert e.value.field == "data"
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        read_config_file(tmp_path / "x.json")


def test_validation_errors_carry_their_field():
    with pytest.raises(ConfigError, match="lr must be a finite number > 0") as e:
        TrainConfig(kind="task", data="d.csv", lr=0)
    assert e.value.field == "lr"
    with pytest.raises(ConfigError, match="energy must be in") as e:
        TrainConfig(kind="task", data="d.csv", energy=2.0)
    assert e.value.field == "energy"


def test_planned_steps():
    cfg = TrainConfig(kind="task", data="d.csv", batch_size=8, full_epochs=3, sparse_steps=5)
    assert cfg.steps_per_epoch(300) == 38 and cfg.planned_steps(300) == (114, 5)
    assert cfg.planned_steps(300, world=2) == (57, 5)
    assert dataclasses.replace(cfg, sparse_phase=False).planned_steps(300) == (114, 0)
    assert TrainConfig(kind="task", data="d.csv", full_epochs=0.01).planned_steps(10)[0] == 1  # at least one step


def test_errors_render_a_setting_in_each_front_ends_words():
    e = DataError("t.csv has no column 'x'.", field="text_column", hint="{Set} {text_column} (and {pair_column}).")
    assert str(e) == "t.csv has no column 'x'. Pass --text-column (and --pair-column)."
    rendered = e.render(lambda f: f"the {f.upper()}", "set")
    assert rendered == "t.csv has no column 'x'. Set the TEXT_COLUMN (and the PAIR_COLUMN)."
    assert str(ConfigError("plain")) == "plain" and ConfigError("plain").field is None


@pytest.mark.parametrize("field, value", [
    ("full_steps", 10 ** 30), ("full_steps", 2.5), ("sparse_steps", -1), ("seed", 2 ** 40), ("seed", -1),
    ("seed", 1e20), ("k", float("nan")), ("k", float("inf")), ("k", 1.5), ("k", True), ("lr", float("inf")),
    ("lr", 5.0), ("full_epochs", 1e30), ("batch_size", 0), ("mlm_probability", 1.0)])
def test_every_number_is_checked_at_the_one_boundary(field, value):
    """A value that passes TrainConfig cannot fail later (job, SQLite row, Trainer): the field is named."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(kind="task", data="x.csv", **{field: value})
    assert e.value.field == field


def test_epochs_times_examples_beyond_the_step_limit_is_refused():
    cfg = TrainConfig(kind="task", data="x.csv", full_epochs=10_000, batch_size=1)
    with pytest.raises(ConfigError, match="more than 1,000,000,000") as e:
        cfg.planned_steps(10 ** 6)
    assert e.value.field == "full_epochs"


@pytest.mark.parametrize("groups", ["", "ffn,ffn", "heads", "all,ffn", "embeddings;ffn"])
def test_param_groups_are_checked(groups):
    with pytest.raises(ConfigError, match="param_groups") as e:
        TrainConfig(kind="language", data="x.txt", param_groups=groups)
    assert e.value.field == "param_groups"


# ---- config files and values that used to hang, exhaust memory or fail after acceptance --------------------
@pytest.mark.parametrize("make,message", [
    (lambda p: os.mkfifo(p), "not a regular file"),  # opening a FIFO would block until a writer comes
    (lambda p: os.symlink("/dev/zero", p), "not a regular file"),  # reading would never end
    (lambda p: p.write_bytes(b'{"seed": ' + b"7" * 5000 + b"}"), "not JSON"),  # over Python's 4,300 digits
    (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply|not JSON"),
    (lambda p: p.write_bytes(b" " * (2 << 20) + b"{}"), "larger than 1,048,576 bytes"),
])
def test_config_files_that_cannot_be_configs_are_refused_at_once(tmp_path, make, message):
    import time

    from deftx_engine.training.config import read_config_file

    path = tmp_path / "run.json"
    make(path)
    t = time.time()
    with pytest.raises(ConfigError, match=message) as e:
        read_config_file(path)
    assert e.value.field == "config" and time.time() - t < 5


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors may start a UTF-8 file with a BOM; the file is still the same JSON."""
    path = tmp_path / "run.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"seed": 3, "language": "jv"}).encode())
    assert read_config_file(path) == {"seed": 3, "language": "jv"}


@pytest.mark.parametrize("values,field", [({"logging_steps": 0}, "logging_steps"),
                                          ({"language": "x" * 101}, "language"), ({"data": "d" * 5000}, "data")])
def test_values_that_would_fail_later_are_refused_by_train_config(values, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{"kind": "language", "data": "c.txt", **values})
    assert e.value.field == field


def test_the_model_is_checked_before_the_run_folder_is_claimed(tmp_path, capsys):
    """A base model that is a folder but not a model, a max_length beyond the model's positions and a head
    corpus that is not a file are refused with the setting's option before anything is written."""
    from deftx_engine.cli import main
    from tiny import ASSETS, make_tiny_model_dir

    corpus = str(ASSETS / "target_corpus_id.txt")
    assert main(["train-language", "--data", corpus, "--base-model", str(tmp_path),
                 "--output-dir", str(tmp_path / "a")]) != 0
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    tiny = str(make_tiny_model_dir(tmp_path / "tiny"))  # 128 positions
    assert main(["train-language", "--data", corpus, "--base-model", tiny, "--max-length", "129",
                 "--output-dir", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "max_length 129 is more than" in err and "(128 tokens)" in err
    assert main(["train-language", "--data", corpus, "--base-model", tiny, "--head-corpus", "/dev/zero",
                 "--output-dir", str(tmp_path / "c")]) != 0  # the head's text is read before, not during, the run
    assert "/dev/zero is not a file" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abc")


@pytest.mark.parametrize("offline", [False, True])
def test_an_uncached_hub_model_without_a_hub_is_said_at_once(tmp_path, monkeypatch, capsys, offline):
    """A Hub id that is not in the download cache, with no Hub to reach (a closed local port) or HF_HUB_OFFLINE
    set: one line naming the model and the cure within seconds, not the client's five retries (~25-40 s)."""
    import socket
    import time

    from huggingface_hub import constants

    from deftx_engine.cli import main
    from deftx_engine.models.loading import resolve_model
    from tiny import ASSETS

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    t = time.monotonic()
    with pytest.raises(ConfigError, match="someone/some-encoder"):
        resolve_model("someone/some-encoder")
    assert time.monotonic() - t < 5
    assert main(["train-language", "--data", str(ASSETS / "target_corpus_id.txt"), "--base-model",
                 "someone/some-encoder", "--output-dir", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "someone/some-encoder" in err and "not in the local" in err and "local model folder" in err
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in err
    assert not (tmp_path / "run").exists()
