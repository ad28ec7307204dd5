"""Issue 6, fuzzed uploads through the web app (hypothesis).

The handler behind the `validate_data` API (the Data tab's "Check data" and every upload) gets random,
truncated, wrong-encoding (Latin-1, UTF-16), huge-line (200 kB), wrong-column, binary and empty files under
random names and suffixes, for every role (corpus / task / eval) and random column settings; typed paths get
random strings (traversal, `~user`, NUL, 5 kB, FIFOs, `hub:` garbage); `start_training` gets random numbers
(NaN, infinities, negatives, text). Every case ends in an inline message (✔ or ✖, never "unexpected error",
never a traceback, never raw HTML from a file name) within seconds, run in a watchdog thread so a hang fails
the test instead of blocking it. A few uploads also go through a launched app with gradio_client (real HTTP
uploads). Each test checks that its own cases really ran (``check_ran``), whatever else runs and in whatever
order; the counts are printed (`pytest -s`) for benchmarks/RESULTS.md.
"""
import concurrent.futures
import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
CASES = {"uploads": 0, "typed paths": 0, "training settings": 0, "http uploads": 0}
ACCEPTED = dict.fromkeys(CASES, 0)
SEEN: dict[str, set] = {}  # kinds of refusal seen, to show the variety
REFUSALS = ("queue is full", "binary", "utf-8", "empty", "no column", "no text", "no data rows", "cannot tell which",
            "extension", "fields", "json", "label", "only reads", "limit", "must be", "give a number", "usable path",
            "too long", "does not exist", "not a regular", "nul", "steps", "hub", "k must")
OK, ERR = "<span class='dx-ok'>", "<span class='dx-err'>"
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SCALE = float(os.environ.get("DEFTX_FUZZ_SCALE", "1"))  # e.g. 25 for a long run (~11,500 cases)
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1)
HANG = 15.0  # seconds before a case counts as a hang
SLOWEST = [0.0, 0.0]  # slowest in-process case, slowest HTTP case (seconds)


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    """Print what the tests of this module that ran fuzzed (with pytest -s), after the last one."""
    yield
    total = sum(CASES.values())
    print(f"\nwebapp fuzzed cases: {CASES} (total {total}); accepted {ACCEPTED}; refusals seen: "
          f"{ {k: sorted(v) for k, v in SEEN.items()} }; slowest case {SLOWEST[0]:.2f} s in process, "
          f"{SLOWEST[1]:.2f} s over HTTP")


def check_ran(fuzz, kind: str, minimum: int) -> None:
    """Run one test's cases and check that at least ``minimum`` cases of ``kind`` reached ``check_message``, so
    a fuzzer that silently stops generating inputs (or cases that stop being checked) fails the test."""
    before = CASES[kind]
    fuzz()
    ran = CASES[kind] - before
    print(f"\n{kind}: {ran} fuzzed cases")
    assert ran >= minimum, f"only {ran} {kind} cases ran (at least {minimum} expected)"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app's state, services not started: nothing is trained here, accepted runs just stay queued."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("DEFTX_MAX_LINES", "DEFTX_MAX_STEPS", "DEFTX_MAX_UPLOAD_MB", "DEFTX_MAX_QUEUE"):
            mp.delenv(var, raising=False)
        from webapp.state import Studio

        studio = Studio(tmp_path_factory.mktemp("home"))
        yield studio
        studio.registry.shutdown()


def call(fn, *args, **kw):
    """Run one event function with a watchdog; returns (outputs, seconds)."""
    t = time.time()
    fut = POOL.submit(fn, *args, **kw)
    try:
        out = fut.result(timeout=HANG)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"hang: {fn.__name__}{args!r:.300} took more than {HANG}s") from None
    secs = time.time() - t
    SLOWEST[0] = max(SLOWEST[0], secs)
    return out, secs


def check_message(msg, kind):
    assert isinstance(msg, str), msg
    assert msg.startswith(ERR) or msg.startswith(OK), msg[:300]
    assert "unexpected error" not in msg and "Traceback" not in msg, msg[:500]
    assert "<script" not in msg.lower() and "<img" not in msg.lower(), msg[:300]  # no HTML from a file name
    CASES[kind] += 1
    ok = msg.startswith(OK)
    ACCEPTED[kind] += ok
    if not ok:
        low = msg.lower()
        SEEN.setdefault(kind, set()).add(next((k for k in REFUSALS if k in low), "other: " + msg[len(ERR) + 9:][:60]))
    return ok


# ---- random files --------------------------------------------------------------------------------------
texty = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)
cells = st.one_of(texty, st.sampled_from(["positive", "negative", "neutral", "", " ", "0", "1", "-1", '"', "a,b",
                                          "x" * 300, "<script>alert(1)</script>", "\u202e", "null"]))
headers = st.sampled_from(["text,label", "text", "premise,hypothesis,label", "sentence,label", "label,text",
                           "text,label,extra", "", ",", "text,text", "\ufefftext,label", "TEXT,LABEL"])
names = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                max_size=60).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)
suffixes = st.sampled_from([".txt", ".csv", ".tsv", ".jsonl", ".TXT", ".json", ".bin", ".exe", "", ".csv.gz",
                            ".txt;rm -rf"])


@st.composite
def upload(draw):
    shape = draw(st.sampled_from(["lines", "table", "jsonl", "binary", "empty", "huge"]))
    if shape == "lines":
        text = "\n".join(draw(st.lists(cells, max_size=25)))
    elif shape == "table":
        sep = draw(st.sampled_from([",", "\t", ";"]))
        rows = draw(st.lists(st.lists(cells, min_size=0, max_size=4), max_size=20))
        text = "\n".join([draw(headers).replace(",", sep)] + [sep.join(r) for r in rows])
    elif shape == "jsonl":
        keys = draw(st.lists(st.sampled_from(["text", "label", "premise", "hypothesis", "x"]), max_size=3))
        rows = [json.dumps(dict(zip(keys, draw(st.lists(cells, min_size=len(keys), max_size=len(keys))))))
                for _ in range(draw(st.integers(0, 12)))]
        if rows and draw(st.booleans()):
            rows[len(rows) // 2] = rows[len(rows) // 2][:-2]  # a truncated record
        text = "\n".join(rows + draw(st.lists(st.sampled_from(["[1, 2]", "null", "{", '"s"']), max_size=2)))
    elif shape == "binary":
        return draw(st.binary(min_size=1, max_size=3000)), shape
    elif shape == "empty":
        return draw(st.sampled_from([b"", b"\n\n  \n", b"\xef\xbb\xbf", b"text,label\n"])), shape
    else:
        text = "text,label\n" + "w" * 200_000 + ",positive\n" + "ok,negative"
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "utf-16", "truncated", "nul", "crlf"]))
    if enc == "latin-1":
        raw = text.encode("latin-1", "replace") + b"\xe9\xff"
    elif enc == "utf-16":
        raw = text.encode("utf-16")
    elif enc == "truncated":
        raw = (text + "é€").encode()[:-1]  # cut inside a multi-byte character
    elif enc == "nul":
        raw = text.encode() + b"\x00\x01\x02"
    elif enc == "crlf":
        raw = text.replace("\n", "\r\n").encode()
    else:
        raw = text.encode()
    return raw, f"{shape}/{enc}"


@settings(max_examples=int(220 * SCALE), **FUZZ)
@given(data=upload(), name=names, suffix=suffixes, role=st.sampled_from(["corpus", "task", "eval"]),
       text_col=st.sampled_from(["", "", "text", "sentence", "nope", "premise", " ", "x" * 80]),
       pair_col=st.sampled_from(["", "", "hypothesis", "missing"]),
       label_col=st.sampled_from(["label", "label", "", "sentiment", "text"]))
def fuzz_uploads(app, api, tmp_path_factory, data, name, suffix, role, text_col, pair_col, label_col):
    raw, shape = data
    folder = tmp_path_factory.mktemp("up", numbered=True)
    path = folder / (name + suffix)
    path.write_bytes(raw)
    (msg, preview, _chart, source), secs = call(api(app)["validate_data"], role, str(path), "", text_col, pair_col,
                                                label_col)
    assert secs < 10, f"{shape}: {secs:.1f}s"
    if check_message(msg, "uploads"):
        assert len(preview) >= 1 and source.startswith("DEFTX_HOME/uploads/")  # as the page shows stored paths
        assert app.server_path(source).startswith(str(app.uploads))
        assert all(len(str(v)) <= 300 for v in preview.to_numpy().ravel())  # long lines are cut in the preview
    assert str(app.uploads) not in msg and str(app.home) not in msg  # stored paths never shown
    stored = [p for p in app.uploads.iterdir() if not p.name.startswith(".")]
    assert all(p.parent == app.uploads and len(p.name) <= 90 for p in stored)
    assert not list(app.uploads.glob(".upload-*")), "a temporary file was left behind"


def test_fuzzed_uploads_give_a_message(app, api, tmp_path_factory):
    check_ran(lambda: fuzz_uploads(app, api, tmp_path_factory), "uploads", int(200 * SCALE))


specs = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "~nosuchuser/x", "/proc/self/environ",
                     "assets/examples/../../README.md", "assets/examples/target_corpus_id.txt", "/dev/zero",
                     "hub:", "hub:/", "hub:a/b:@", "hub:x#", "a" * 5000, "x\x00y", "DEFTX_HOME/fifo.txt",
                     "DEFTX_HOME/link.txt", "DEFTX_HOME", "DEFTX_HOME/missing.csv", "assets/examples"]),
    st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(["..", "/", "~", "assets/examples", "DEFTX_HOME"]),
              st.text(alphabet="./~abc\\%", max_size=30)))


@settings(max_examples=int(120 * SCALE), **FUZZ)
@given(spec=specs, role=st.sampled_from(["corpus", "task", "eval"]))
def fuzz_typed_paths(app, api, spec, role):
    home = app.home
    if not (home / "fifo.txt").exists():
        os.mkfifo(home / "fifo.txt")  # a reader would block on it forever
        (home / "link.txt").symlink_to("/etc/passwd")
    spec = spec.replace("DEFTX_HOME", str(home))
    (msg, *_), secs = call(api(app)["validate_data"], role, None, spec, "", "", "label")
    assert secs < 10
    ok = check_message(msg, "typed paths")
    if ok:  # only files the app may read
        assert spec.startswith("hub:") or "assets/examples" in spec, spec
    assert "root:" not in msg  # nothing of /etc/passwd


def test_fuzzed_typed_paths_give_a_message(app, api):
    check_ran(lambda: fuzz_typed_paths(app, api), "typed paths", int(100 * SCALE))


numbers = st.one_of(st.none(), st.just(""), st.just("abc"), st.just(float("nan")), st.just(float("inf")),
                    st.just(-float("inf")), st.integers(-10, 10), st.floats(-1e9, 1e9), st.just(1e30),
                    st.just(2.5))


VALID = dict(full=st.integers(0, 50), sparse=st.integers(0, 50), epochs=st.floats(0.1, 3), lr=st.floats(1e-5, 1e-2),
             bs=st.integers(1, 32), maxlen=st.integers(8, 128), seed=st.integers(0, 100), k=st.floats(0.5, 10),
             energy=st.floats(0.5, 1.0), rho=st.floats(0, 0.2))


@st.composite
def training_settings(draw):
    """All fields valid in about a third of the cases (then one field may still be broken), else random."""
    if draw(st.integers(0, 2)) == 0:
        values = {k: draw(v) for k, v in VALID.items()}
        if draw(st.booleans()):
            values[draw(st.sampled_from(sorted(VALID)))] = draw(numbers)
        return values
    return {k: draw(numbers) for k in VALID}


@settings(max_examples=int(120 * SCALE), **FUZZ)
@given(v=training_settings())
def fuzz_training_settings(app, api, monkeypatch, v):
    from tiny import ASSETS

    full, sparse, epochs, lr, bs, maxlen, seed, k, energy, rho = (v[n] for n in VALID)

    monkeypatch.setenv("DEFTX_MAX_QUEUE", "1")  # after the first accepted run, valid settings meet a full queue
    monkeypatch.setenv("DEFTX_MAX_STEPS", "1000")
    out, secs = call(api(app)["start_training"], kind="language", base_model="minilm",
                     data=str(ASSETS / "target_corpus_id.txt"), language="id", name="fuzz", method="deftx",
                     rank_policy="energy", energy=energy, rank=100, residual_share=rho, k_percent=k, full_steps=full,
                     sparse_steps=sparse, epochs=epochs, lr=lr, batch_size=bs, max_length=maxlen, seed=seed,
                     text_column="", pair_column="", label_column="label", preset="custom", k_exact_value=None)
    assert secs < 10
    check_message(out[0], "training settings")
    assert len(app.registry.list(states=["queued"])) <= 1


def test_fuzzed_training_settings_give_a_message(app, api, monkeypatch):
    check_ran(lambda: fuzz_training_settings(app, api, monkeypatch), "training settings", int(100 * SCALE))


def test_http_uploads_through_gradio_client(app, tmp_path, free_port):
    """A smaller number of real uploads through a launched app (Gradio's upload route, then the same
    function): odd names and contents come back as messages."""
    check_ran(lambda: http_uploads(app, tmp_path, free_port), "http uploads", 24)


def http_uploads(app, tmp_path, free_port):
    from gradio_client import Client, handle_file

    from webapp.settings import launch_kwargs
    from webapp.ui import build_app

    demo = build_app(app)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_kwargs(app.home))
    try:
        c = Client(demo.local_url, verbose=False, download_files=str(tmp_path / "dl"))
        rng = random.Random(6)
        cases = [("..%2F..%2Fetc%2Fpasswd.txt", b"hello\nworld\n"),
                 ("<img src=x onerror=alert(1)>.csv", b"text,label\n"),
                 ("ünï cødé 文字.txt", "Saya suka makan.\n".encode()), ("x" * 200 + ".txt", b"a\nb\n"),
                 ("blob.txt", bytes(rng.randrange(256) for _ in range(4000))),
                 ("latin.csv", "text,label\ncafé,x\n".encode("latin-1")),
                 ("utf16.txt", "hello\n".encode("utf-16")), ("huge.txt", b"w" * 300_000 + b"\nok\n"),
                 ("cols.csv", b"sentence,sentiment\nGood.,positive\n"), ("empty.jsonl", b""),
                 ("bad.jsonl", b'{"text": "a", "label": "x"}\n{"text": \n'), ("-rf .txt", b"ok\n")]
        for i, (name, raw) in enumerate(cases):
            p = tmp_path / f"c{i}" / name
            p.parent.mkdir()
            p.write_bytes(raw)
            for role in ("corpus", "task"):
                t = time.time()
                msg, *_ = c.predict(role, handle_file(str(p)), "", "", "", "label", api_name="/validate_data")
                SLOWEST[1] = max(SLOWEST[1], time.time() - t)
                assert time.time() - t < 20
                # also: no tag from the name (Gradio drops '<' and '>'; the app escapes)
                check_message(msg, "http uploads")
    finally:
        demo.close()
