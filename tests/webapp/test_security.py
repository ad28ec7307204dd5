"""Issue 6, security of the web app.

- Uploaded file names cannot escape DEFTX_HOME/uploads (`Studio.store_upload`: `../../x`, absolute paths,
  NUL bytes, 250-byte names, symlinks, FIFOs, folders, a symlink planted in uploads/), and typed paths cannot
  leave the allowed folders (`Studio.check_path`: traversal, `~`, symlinks out of DEFTX_HOME, FIFOs).
- The running app serves only its own download folder (DEFTX_HOME/outputs): `/gradio_api/file=` refuses
  /etc/passwd, the registry, uploads, run folders, `..` and a symlink out of outputs/.
- Tokens never appear in the page, returned values, logs, run folders or the registry, even when the Hub
  error quotes them (the local Hub of tests/hub_server.py answers 401 quoting the credentials it got).
- A vector folder cannot execute code on load: the app's pull refuses a pickle payload without running it
  (the engine-level proof is tests/engine/hub/test_transfer.py::test_malicious_pickle_is_refused_without_running;
  vectors are safetensors + JSON only, tests/engine/method/test_vectors.py).
- DEFTX_AUTH: without a login every route is refused; a malformed value stops the app, never runs it open.
"""
import http.client
import logging
import os
import pickle
import re
import sqlite3
import stat
import urllib.parse
from pathlib import Path
from unittest import mock

import pytest

from tiny import ASSETS

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
TOKEN = "hf_TopSecretToken0123456789abcdefXYZ"
PLAIN = "my-plain-secret-4242"  # a token without the hf_ shape: only exact-match scrubbing catches it


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFTX_MAX_UPLOAD_MB", raising=False)
    from webapp.state import Studio

    return Studio(tmp_path / "home")  # no scheduler thread: only the file handling is used


@pytest.fixture
def launched(tmp_path, monkeypatch, launch_app):
    """A launched app on 127.0.0.1 with the launch() settings app.py uses."""
    monkeypatch.setenv("DEFTX_WARMUP", "0")
    from webapp.settings import launch_kwargs

    apps = []

    def launch(home=None):
        home = home or tmp_path / "home"
        demo, studio = launch_app(home, **launch_kwargs(home))
        apps.append((demo, studio))
        return demo, studio

    yield launch
    for demo, studio in apps:
        studio.registry.shutdown(cancel_running=True)
        demo.close()


def get(url: str, path: str, headers=None) -> tuple[int, bytes]:
    """A raw GET (no client-side normalisation of `..` or %-escapes)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# ---- uploads and typed paths ---------------------------------------------------------------------------
NAMES = ["..%2F..%2Fx.txt", "....txt", "...", "a\\..\\..\\x.txt", ".bashrc", "x" * 246 + ".txt", "ünï<>|:*?\".csv",
         "\n.txt", "name.TXT", "-rf .txt", "CON", "x.txt.exe", " .txt", "$(reboot).txt", "%00.txt", "a;b&c`d`.tsv"]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_upload_names_never_become_paths(studio, tmp_path, name):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    src.write_bytes(b"hello\nworld\n")
    dest = studio.store_upload(str(src))
    assert dest.parent == studio.uploads and dest.resolve().parent == studio.uploads.resolve()
    assert re.fullmatch(r"[0-9a-f]{12}-[A-Za-z0-9._-]{1,60}(\.[a-z0-9]{1,8})?", dest.name), dest.name
    assert dest.read_bytes() == b"hello\nworld\n" and stat.S_ISREG(os.lstat(dest).st_mode)
    assert sorted(p.name for p in studio.uploads.iterdir()) == [dest.name]  # no temporary file left


def test_upload_sources_outside_the_upload_area_are_refused(studio, tmp_path):
    from deftx_engine.errors import DeftxError

    secret = Path("/etc/passwd")
    (tmp_path / "a" / "b").mkdir(parents=True)
    traversal = str(tmp_path / "a" / "b" / ".." / ".." / ".." / ".." / ".." / ".." / "etc" / "passwd")
    link = tmp_path / "link.txt"
    link.symlink_to(secret)
    inner_link = tmp_path / "inner.txt"
    inner_link.symlink_to(tmp_path / "a")
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    cases = {traversal: "not an uploaded file", str(secret): "not an uploaded file",
             str(tmp_path / "x\x00.txt"): "NUL", str(link): "symbolic link", str(inner_link): "symbolic link",
             str(fifo): "not a regular file", str(tmp_path / "a"): "not a regular file",
             str(tmp_path / ("y" * 300 + ".txt")): "cannot be read", str(tmp_path / "missing.txt"): "cannot be read"}
    for path, reason in cases.items():
        with pytest.raises(DeftxError, match=reason):
            studio.store_upload(path)
    assert not [p for p in studio.uploads.iterdir()], "nothing may be stored"


def test_a_symlink_planted_in_uploads_is_replaced_not_followed(studio, tmp_path):
    import hashlib

    body = b"Saya suka makan nasi goreng.\n"
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("SECRET\n")
    planted = studio.uploads / f"{hashlib.sha256(body).hexdigest()[:12]}-corpus.txt"
    planted.symlink_to(outside)  # where this upload will be stored
    src = tmp_path / "up" / "corpus.txt"
    src.parent.mkdir()
    src.write_bytes(body)
    dest = studio.store_upload(str(src))
    assert dest == planted and not dest.is_symlink() and dest.read_bytes() == body
    assert outside.read_text() == "SECRET\n"


def test_typed_paths_stay_in_the_allowed_folders(studio, tmp_path, monkeypatch):
    from deftx_engine.errors import DeftxError

    home = studio.home
    (home / "data.txt").write_text("ok\n")
    (home / "link.txt").symlink_to("/etc/passwd")
    (home / "etc").symlink_to("/etc")
    os.mkfifo(home / "fifo.txt")
    monkeypatch.chdir(home)
    allowed = [str(ASSETS / "target_corpus_id.txt"), str(home / "data.txt"), "data.txt", str(home / "vectors")]
    for spec in allowed:
        assert studio.check_path(spec).is_relative_to(home) or "examples" in spec
    refused = {"../../../../../../etc/passwd": "only reads", "/etc/passwd": "only reads",
               str(home / ".." / "secret.txt"): "only reads", str(home / "link.txt"): "only reads",
               str(home / "etc" / "passwd"): "only reads", "~/.bashrc": "only reads", "~root/.ssh": "only reads",
               "~nosuchuser42/x": "not a usable path", "x\x00y": "NUL", "a" * 5000: "too long",
               str(home / "fifo.txt"): "not a regular file", str(ASSETS / ".." / ".." / "README.md"): "only reads"}
    for spec, reason in refused.items():
        with pytest.raises(DeftxError, match=reason):
            studio.check_path(spec)


# ---- what the running app serves -----------------------------------------------------------------------
def test_the_app_serves_only_its_outputs_folder(launched):
    demo, studio = launched()
    home = studio.home
    url = demo.local_url
    outputs = home / "outputs"
    (outputs / "predictions.csv").write_text("text,prediction\nx,positive\n")
    (outputs / "leak.txt").symlink_to("/etc/passwd")
    (home / "uploads" / "someone-else.csv").write_text("private,data\n")
    q = urllib.parse.quote
    status, body = get(url, f"/gradio_api/file={q(str(outputs / 'predictions.csv'))}")
    assert status == 200 and body.startswith(b"text,prediction")
    refused = ["/etc/passwd", "/proc/self/environ", str(home / "registry.sqlite3"),
               str(home / "uploads/someone-else.csv"),
               str(home / "runs"), str(outputs / "leak.txt"), str(outputs) + "/../registry.sqlite3",
               str(outputs) + "/%2e%2e/registry.sqlite3", str(ASSETS / "target_corpus_id.txt"),
               str(Path(__file__).resolve()), "file:///etc/passwd", "//etc/passwd"]
    for path in refused:
        for prefix in ("/gradio_api/file=", "/file="):
            status, body = get(url, prefix + (path if "%2e" in path else q(path, safe="/:")))
            assert status in (403, 404), (prefix, path, status)
            assert b"root:" not in body and b"private,data" not in body and b"SQLite" not in body


# ---- tokens --------------------------------------------------------------------------------------------
def _make_vector(home: Path) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    from tiny import make_vector, tiny_bert_config

    torch.manual_seed(0)
    vec = make_vector(BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval(), k=50)
    return vec.save(home / "vectors" / "seeded")


def test_the_browser_keeps_no_run_history(launched):
    """Gradio's run history would keep each call's inputs (a Hub token typed in the Hub tab too) in the browser,
    and its footer link "Runs" reads as this app's Runs tab: both are off in the page config the browser gets."""
    import json

    demo, _ = launched()
    status, body = get(demo.local_url, "/config")
    assert status == 200
    config = json.loads(body)
    assert config["run_history"] is False and "runs" not in config["footer_links"], config.get("footer_links")
    assert "api" in config["footer_links"]


def test_tokens_never_appear_anywhere(launched, caplog, monkeypatch, hub_server):
    from gradio_client import Client

    from webapp.processes import child_env

    caplog.set_level(logging.DEBUG)
    demo, studio = launched()
    home = studio.home
    vdir = _make_vector(home)
    run_id = studio.registry.add_vector("seeded", "task", vdir, config={"base_model": "tiny"})
    c = Client(demo.local_url, verbose=False)
    returned = []
    # the local Hub (tests/hub_server.py) refuses these tokens with a 401 that quotes the credentials it got
    hub_server.add_repo("me/private-vector", {"sft_config.json": b"{}"}, private=True)

    def call(*args, api_name):
        returned.append(c.predict(*args, api_name=api_name))

    monkeypatch.delenv("HF_TOKEN", raising=False)
    call(run_id, "me/deftx-x", False, TOKEN, api_name="/push")  # token in the field
    call(run_id, "me/deftx-x", True, PLAIN, api_name="/push")  # a token without the hf_ shape
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # token from the environment
    call(run_id, "me/deftx-x", False, "", api_name="/push")
    monkeypatch.delenv("HF_TOKEN")
    with mock.patch("deftx_engine.hub.transfer.push_vector", side_effect=RuntimeError(f"boom {PLAIN}")):
        call(run_id, "me/deftx-x", False, PLAIN, api_name="/push")  # an unexpected error (our code, not the client)
    call("me/private-vector", "", "", "", TOKEN, api_name="/pull")
    call("me/private-vector", "", "", "", PLAIN, api_name="/pull")
    with mock.patch("deftx_engine.hub.transfer.pull_vector", side_effect=ValueError(f"odd {PLAIN}")):
        call("me/private-vector", "", "", "", PLAIN, api_name="/pull")
    assert "me/deftx-x" not in hub_server.repos  # every push was refused
    assert sum(1 for r in hub_server.requests if r[0] == "POST") >= 3  # ... by the server, over HTTP
    assert len(returned) == 7
    for msg, token_field in returned:
        assert "failed" in msg or "unexpected error" in msg, msg
        assert token_field == ""  # the token field is cleared
    assert "the Hub refused the token (HTTP 401)" in returned[0][0]  # the error is said in words, no token

    env = child_env()  # training processes never get the token
    assert "HF_TOKEN" not in env and TOKEN not in repr(env)

    texts = {"returned values": repr(returned), "logs": caplog.text}
    for route in ("/", "/config", "/gradio_api/info", "/gradio_api/info?all_endpoints=true"):
        texts[f"page {route}"] = get(demo.local_url, route)[1].decode("utf-8", "replace")
    with sqlite3.connect(home / "registry.sqlite3") as db:
        texts["registry"] = repr(list(db.iterdump()))
    for f in home.rglob("*"):
        if f.is_file() and not f.is_symlink():
            texts[str(f)] = f.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 8
    for where, text in texts.items():
        for secret in (TOKEN, PLAIN, TOKEN[3:15]):
            assert secret not in text, f"token found in {where}"


def test_scrubbing_hides_secrets_not_words(studio, api, monkeypatch):
    """A push without a token says how to give one: the word after "token:" is not taken for a secret."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run_id = studio.registry.add_vector("seeded", "task", _make_vector(studio.home), config={"base_model": "tiny"})
    msg, token_field = api(studio)["push"](run_id, "me/deftx-x", False, "")
    assert "needs a Hugging Face token: paste one (write access) in the token field" in msg, msg
    assert "***" not in msg and token_field == ""


# ---- code execution on load ----------------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pulling_a_pickle_payload_runs_nothing(launched, tmp_path):
    from gradio_client import Client

    demo, studio = launched()
    home = studio.home
    marker = tmp_path / "pwned"
    evil = home / "evil"
    evil.mkdir()
    with open(evil / "pytorch_diff.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Evil(marker)}, f)
    real = _make_vector(home)  # and a valid DeFT-X config whose "safetensors" file is a pickle
    real.rename(home / "evil2")
    with open(home / "evil2" / "sft_model.safetensors", "wb") as f:
        pickle.dump(Evil(marker), f)
    c = Client(demo.local_url, verbose=False)
    for folder, says in ((evil, "refused without running it"), (home / "evil2", "sft_model.safetensors")):
        msg, _ = c.predict(str(folder), "", "", "", "", api_name="/pull")
        assert "dx-err" in msg and says in msg and "unexpected error" not in msg, msg
    assert not marker.exists()
    assert not list((home / "vectors").iterdir())  # nothing half-pulled
    assert all(r["state"] != "done" for r in studio.registry.list())


# ---- login ---------------------------------------------------------------------------------------------
def test_auth_refuses_requests_without_a_login(launched, monkeypatch, tmp_path):
    from gradio_client import Client

    monkeypatch.setenv("DEFTX_AUTH", "alice:pa:ss,bob:other")
    demo, studio = launched()
    home = studio.home
    url = demo.local_url
    for path in ("/config", "/gradio_api/info", f"/gradio_api/file={home / 'outputs'}/x.csv"):
        status, _ = get(url, path)
        assert status in (401, 403), (path, status)
    (home / "outputs" / "x.csv").write_text("a\n")
    status, _ = get(url, f"/gradio_api/file={home / 'outputs'}/x.csv")
    assert status in (401, 403)
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(url).port, timeout=30)
    conn.request("POST", "/gradio_api/call/list_runs", body="{\"data\": []}",
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status in (401, 403)
    conn.close()
    with pytest.raises(Exception):
        Client(url, verbose=False)
    with pytest.raises(Exception):
        Client(url, verbose=False, auth=("alice", "wrong"))
    c = Client(url, verbose=False, auth=("alice", "pa:ss"))  # a password may contain ':'
    table = c.predict(api_name="/list_runs")
    assert table["headers"][0] == "run"
    assert Client(url, verbose=False, auth=("bob", "other")).predict(api_name="/list_runs")["headers"][0] == "run"


def test_logins_are_throttled_per_client_through_the_app(launched, monkeypatch):
    """Through the running app (on a Space, where the client is the proxy's X-Forwarded-For entry): a client
    that guesses is refused, the real user from another address logs in."""
    import httpx

    from webapp.settings import LoginThrottle

    monkeypatch.setenv("DEFTX_AUTH", "alice:right")
    monkeypatch.setenv("SPACE_ID", "someone/space")
    monkeypatch.setattr(LoginThrottle, "DELAY", 0.0)
    demo, _ = launched()

    def login(password, client):
        return httpx.post(demo.local_url + "login", data={"username": "alice", "password": password},
                          headers={"X-Forwarded-For": f"1.2.3.4, {client}"}, timeout=30).status_code

    assert [login(f"guess{i}", "10.0.0.66") for i in range(LoginThrottle.FAILURES + 1)] == [400] * 6
    assert login("right", "10.0.0.66") == 400
    assert login("right", "10.0.0.7") == 200


@pytest.mark.parametrize("value", ["alice", "alice:", ":pw", "alice:pw,", "alice:pw,bob"])
def test_a_malformed_auth_setting_stops_the_app(value, monkeypatch, tmp_path, capsys):
    import app as app_module
    from deftx_engine.errors import ConfigError
    from webapp.settings import auth_from_env
    from webapp.state import Studio

    monkeypatch.setenv("DEFTX_AUTH", value)
    monkeypatch.setenv("DEFTX_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="DEFTX_AUTH"):
        auth_from_env()
    with pytest.raises(ConfigError, match="DEFTX_AUTH"):
        Studio(tmp_path / "home")
    with pytest.raises(SystemExit) as e:
        app_module.main()  # one line naming the variable (never the password), nothing launched
    assert "DEFTX_AUTH" in str(e.value) and "pw" not in str(e.value)
