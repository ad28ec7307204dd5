"""The Hub tab's gallery through gradio_client, against the local Hub (tests/hub_server.py) the real
``huggingface_hub`` client talks to over HTTP: released vectors listed by base model and language beside the
ones on this server; a pick (released, pulled or trained here) to a prediction, the base model fetched from the
Hub on first use; mismatched bases refused before any download; push -> listed; and, with the Hub off or out of
reach, the tab saying so in words (gallery, pick, push, pull), never the client's text."""
import html
import socket
import time

import pytest

from tiny import ASSETS, RELEASED, XLMR, make_vector

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
LABELS = ["negative", "neutral", "positive"]
CLIENT_TEXT = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "HF_HUB_OFFLINE environment",
               "Traceback", "unexpected error")


@pytest.fixture(scope="module")
def app(released_hub, tmp_path_factory, launch_app):
    """An app on the local Hub, with a task vector "trained here" for the released base model."""
    from deftx_engine.models.loading import load_cls_model

    hub, base = released_hub
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFTX_WARMUP", "0")
        demo, studio = launch_app(tmp_path_factory.mktemp("home"))
        vec = make_vector(load_cls_model(str(base), LABELS), kind="task", base_model=XLMR, seed=5)
        vec.meta.label_names, vec.meta.language = LABELS, "en"
        run_id = studio.registry.new_id()
        vec.save(studio.registry.vectors_root / run_id)
        studio.registry.add_vector("mine-en-task", "task", studio.registry.vectors_root / run_id, run_id=run_id,
                                   config={"base_model": XLMR, "language": "en"})
        yield demo, studio, run_id
        studio.registry.shutdown(cancel_running=True)
        demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0].local_url, verbose=False)


def call(client, *args, api_name):
    """An endpoint's values: its messages as a reader sees them (the page escapes markup characters)."""
    out = client.predict(*args, api_name=api_name)
    return [html.unescape(v) if isinstance(v, str) else v for v in (out if isinstance(out, tuple) else (out,))]


def use(client, task, language):
    """/use_vectors: (message, Predict's task vector, its language vector), the two run ids chosen there."""
    msg, task_pick, lang_pick, *_ = call(client, task, language, api_name="/use_vectors")  # (the tab: page only)
    return msg, (task_pick or {}).get("value"), (lang_pick or {}).get("value")


def rows_of(table) -> dict[str, list]:
    return {r[0]: r for r in table["data"]}


def downloads(hub, repo_id: str) -> list[str]:
    return [p for m, p in hub.requests if p.startswith(f"/{repo_id}/resolve/")]


def test_gallery_lists_released_vectors_beside_ours(client, app):
    status, table, task, lang = call(client, "xlmr", "", "Javanese", "", "", api_name="/gallery")
    assert "The Hugging Face Hub answered: 3 released vectors, 0 pushed with DeFT-X; 1 vector on this server" in status
    rows = rows_of(table)
    assert set(rows) == {RELEASED["task"], RELEASED["language"], "mine-en-task"}  # mBERT's: another base
    assert rows[RELEASED["language"]][1:6] == ["language", XLMR, "jav (Javanese)", "", "released · Hub"]
    assert rows[RELEASED["task"]][4:6] == ["sentiment", "released · Hub"]
    assert rows["mine-en-task"][5] == "trained here"
    assert [v for _, v in task["choices"]] == [app[2], RELEASED["task"]]
    assert task["value"] == app[2]  # ours first; the language asked for, on the task vector's base model:
    assert lang["value"] == RELEASED["language"]
    _, table, task, lang = call(client, "", "language", "sun", RELEASED["task"], "", api_name="/gallery")
    assert table["data"] == [] and lang["value"] == ""  # no Sundanese vector on this Hub; no task rows
    assert task["value"] == RELEASED["task"]  # a pick still listed is kept


def test_pick_to_prediction_pulls_once_and_fetches_the_base_model(client, app, released_hub):
    """gallery -> pick a released task and language vector -> Predict: pulled, listed, composed on the base model
    fetched from the Hub; predicting and scoring as Predict does; a second pick downloads nothing."""
    hub, _ = released_hub
    demo, studio, _ = app
    start = time.perf_counter()
    msg, task_run, lang_run = use(client, RELEASED["task"], RELEASED["language"])
    label, _ = call(client, task_run, lang_run, "Makanannya enak sekali!", "", 1.0, "sum", api_name="/predict")
    seconds = time.perf_counter() - start
    print(f"pick to first prediction: {seconds:.2f} s")  # the README's measured number (-s shows it)
    assert "pulled cambridgeltl/xlmr-task-sft-nusax_senti and cambridgeltl/xlmr-lang-sft-jav-small" in msg, msg
    assert f"composed on <code>{XLMR}</code>" in msg and "Predict is open with θ0 + φ_task + φ_language" in msg
    assert "%" in label and any(name in label for name in LABELS), label
    assert downloads(hub, XLMR) and any(p.endswith("/config.json") for p in downloads(hub, XLMR))  # first use
    rows = {r["id"]: r for r in studio.vector_runs()}
    assert (rows[task_run]["name"], rows[task_run]["kind"], rows[task_run]["config"]["source"]) == (
        RELEASED["task"], "task", RELEASED["task"])
    assert (rows[lang_run]["kind"], rows[lang_run]["config"]["language"]) == ("language", "jav")
    assert studio.vector(rows[task_run]["vector_dir"]).meta.label_names == LABELS

    score, _ = call(client, task_run, lang_run, None, str(ASSETS / "target_eval_id.csv"), "", "", "label", 1.0,
                              "sum", api_name="/evaluate")
    assert "with the language vector: macro-F1" in score and "task only" in score  # as Predict does today

    before = len(hub.requests)
    msg, again_task, again_lang = use(client, RELEASED["task"], RELEASED["language"])
    assert (again_task, again_lang) == (task_run, lang_run) and "pulled" not in msg
    assert not [p for _, p in hub.requests[before:] if "/resolve/" in p]  # nothing downloaded again


def test_a_vector_trained_here_composes_with_a_released_one(client, app):
    _, _, mine = app
    msg, task_run, lang_run = use(client, mine, RELEASED["language"])
    assert task_run == mine and "Predict is open with θ0 + φ_task + φ_language" in msg, msg
    label, _ = call(client, task_run, lang_run, "Makanannya enak sekali!", "", 1.0, "sum", api_name="/predict")
    assert "%" in label


def test_mismatched_bases_are_refused_before_any_download(client, app, released_hub):
    hub, _ = released_hub
    runs_before = len(app[1].vector_runs())
    call(client, "", "", "", "", "", api_name="/gallery")
    msg, *_ = call(client, RELEASED["task"], RELEASED["other base"], api_name="/use_vectors")
    assert ("the language vector cambridgeltl/mbert-lang-sft-wol-small was made for google-bert/bert-base-"
            "multilingual-cased, but the task vector") in msg and "for FacebookAI/xlm-roberta-base" in msg, msg
    assert not downloads(hub, RELEASED["other base"]) and len(app[1].vector_runs()) == runs_before
    msg, *_ = call(client, RELEASED["language"], "", api_name="/use_vectors")
    assert "is a language vector: choose it as the language vector" in msg


def test_a_pushed_vector_appears_in_the_gallery(client, app, released_hub):
    hub, _ = released_hub
    _, _, mine = app
    msg, _ = call(client, mine, "me/deftx-en-task", False, hub.token, api_name="/push")
    assert "Pushed to me/deftx-en-task" in msg, msg
    status, table, *_ = call(client, "xlmr", "task", "", "", "", api_name="/gallery")
    assert "1 pushed with DeFT-X" in status
    assert rows_of(table)["me/deftx-en-task"][1:6] == ["task", XLMR, "en (English)", "", "pushed with DeFT-X"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hub_state", ["off", "unreachable"])
def test_without_the_hub_the_tab_says_so_in_words(client, app, hub_state, monkeypatch):
    from huggingface_hub import constants

    if hub_state == "off":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        said = "The Hugging Face Hub is switched off on this server (HF_HUB_OFFLINE is set)"
    else:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        said = "cannot be reached from this server (cannot connect to 127.0.0.1"
    start = time.perf_counter()
    status, table, *_ = call(client, "xlmr", "language", "sun", "", "", api_name="/gallery")
    assert said in status and "Shown instead: the catalogue shipped with DeFT-X" in status, status
    assert [r[0] for r in table["data"]] == ["cambridgeltl/xlmr-lang-sft-sun-small"]
    assert "needs the Hub" in table["data"][0][6] and table["data"][0][5] == "released · catalogue"

    msg, *_ = call(client, app[2], "cambridgeltl/xlmr-lang-sft-sun-small", api_name="/use_vectors")
    assert said.lower() in msg.lower() and "pulling cambridgeltl/xlmr-lang-sft-sun-small needs it" in msg, msg
    msg, _ = call(client, "someone/vector", "", "", "", "", api_name="/pull")
    assert "downloading hugging face repo 'someone/vector' failed: the hugging face hub" in msg.lower(), msg
    assert said.lower() in msg.lower(), msg
    msg, _ = call(client, app[2], "me/deftx-x", False, "hf_abc", api_name="/push")
    assert "pushing to hugging face repo 'me/deftx-x' failed: the hugging face hub" in msg.lower(), msg
    assert said.lower() in msg.lower(), msg
    for text in (status, msg):
        assert not any(raw in text for raw in CLIENT_TEXT), text
    assert time.perf_counter() - start < 20  # no client retries waited for
