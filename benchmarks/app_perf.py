"""Web-app benchmark: startup, prediction latency, Start -> first training step, newcomer flow.

Usage::

    python -m benchmarks.app_perf                 # the three figures with targets (about 3-4 minutes on 2 cores)
    python -m benchmarks.app_perf --flow          # also the newcomer click-through (about 5-10 more minutes)
    python -m benchmarks.app_perf --no-write      # print only, leave benchmarks/RESULTS.md alone
    python -m benchmarks.app_perf --model DIR --task-vector VEC --one-app --repeats 1 --calls 3 --warmup-wait 0
                                                  # a quick check on a local model folder (what the test runs)

What it measures, each time against a fresh ``python app.py`` process on a free port with its own temporary
DEFTX_HOME, on the base model a user gets by default (``DEFAULT_MODEL``: the ``cpu-demo`` preset's offline
multilingual-e5-small) unless ``--model`` names another (an alias or a local model folder; no network):

1. ``python app.py`` until the first HTTP 200 on ``/`` (median of ``--repeats``; target <= 15 s);
2. a prediction round trip through the API with the composed model cached (``--calls`` calls after
   one warm-up call that builds it; p50 and p95; target p50 <= 100 ms), measured two ways: the REST API that
   "Use via API" documents (``POST /gradio_api/call/predict`` then reading the event stream; what curl or
   any HTTP client does) and ``gradio_client.Client.predict`` (which polls its own queue every 50 ms, so
   it carries a client-side floor of roughly that). The task vector is made first with the CLI in a few
   steps and brought into the app with the ``pull`` endpoint;
3. Start -> first training step: the ``start_training`` call of a ``cpu-demo`` language run until its
   ``status.json`` shows step >= 1 (median of ``--repeats``; target <= 20 s); each run is cancelled after. On a
   base without an MLM head (multilingual-e5-small) that step can be the one-time head fit's, which is cached
   per base model and text in the user's model cache;
4. with ``--flow``: the newcomer path through the API -- check both example files, start the cpu-demo
   language SFT and the cpu-demo task SFT (they queue, one job at a time), wait for both, analyze, predict
   with the composed model, score the example evaluation file (target < 10 minutes on 2 cores).

``--sections`` picks among 1-3 (default all three); ``--one-app`` lets the last timed startup's app serve 2 and
3 as well (a quick check, not the published figures). Prints a Markdown table and, unless ``--no-write``,
replaces the ``## Web app`` section of benchmarks/RESULTS.md (or ``--results FILE``; other sections are kept)
with the command, date, machine and figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/app_perf.py` finds deftx_engine and benchmarks

from benchmarks.common import RESULTS, machine_info, other_cores, wait_quiet, write_results_section  # noqa: E402
from deftx_engine.models.presets import preset  # noqa: E402

EXAMPLES = REPO / "assets" / "examples"
HEADING = "## Web app"
SECTIONS = ("startup", "predict", "first-step")
DEFAULT_MODEL = preset("cpu-demo", "language")["base_model"]  # what the app's demo and Train tab start from
SETUP = {"model": DEFAULT_MODEL, "warmup_wait": 8.0, "task_vector": None}  # set from the options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """``python app.py`` in a subprocess with its own DEFTX_HOME; stopped (by its pid) on exit."""

    def __init__(self, home: Path, extra_env: dict | None = None):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, DEFTX_HOME=str(home), GRADIO_SERVER_PORT=str(self.port),
                   GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   **(extra_env or {}))
        if Path(SETUP["model"]).is_dir():  # a local base model: the app loads model folders under DEFTX_DATA_DIRS
            env["DEFTX_DATA_DIRS"] = str(Path(SETUP["model"]).resolve().parent)
        self.log = open(home.parent / f"app-{self.port}.log", "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_http_200(self, timeout: float = 120) -> float:
        import httpx

        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no HTTP 200 from {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


QUIET = {"limit": 0.0, "window": 3.0, "seen": []}


def settle(what: str) -> None:
    """Before a timed section (while none of our processes run): with --wait-quiet S wait at most S seconds
    until other processes keep less than 0.3 cores busy; record and print what was seen."""
    waited, cores = wait_quiet(QUIET["limit"], what, threshold=0.3, window=QUIET["window"])
    if cores is None:
        cores = other_cores(QUIET["window"])
    QUIET["seen"].append((what, cores, waited))
    print(f"  [{what}: other processes busy {cores if cores is None else round(cores, 2)} cores"
          f"{f', waited {waited:.0f} s' if QUIET['limit'] > 0 else ''}]", flush=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# ---- 1. startup ---------------------------------------------------------------------------------------------
def bench_startup(root: Path, repeats: int, keep_last: bool = False) -> tuple[list[float], App | None]:
    """Startup times; with ``keep_last`` the last app is left running and returned (``--one-app``)."""
    times, kept = [], None
    for i in range(repeats):
        home = root / f"startup-{i}" / "home"
        home.mkdir(parents=True)
        settle(f"startup {i + 1}")
        app = App(home)
        try:
            times.append(app.wait_http_200())
        finally:
            if keep_last and i == repeats - 1 and app.proc.poll() is None:
                kept = app
            else:
                app.stop()
        print(f"  startup {i + 1}/{repeats}: {times[-1]:.2f} s", flush=True)
    return times, kept


@contextmanager
def app_for(section: str, home: Path, shared: App | None) -> Iterator[App]:
    """The app a section measures: ``shared`` (``--one-app``: already up, left running) or a fresh one on
    ``home``, stopped after the section."""
    settle(section)
    if shared is not None:
        yield shared
        return
    app = App(home)
    try:
        app.wait_http_200()
        yield app
    finally:
        app.stop()


# ---- 2. prediction latency --------------------------------------------------------------------------------
def make_task_vector(home: Path) -> Path:
    run = home / "bench-task-run"
    cmd = [sys.executable, "-m", "deftx_engine.cli", "train-task", "--output-dir", str(run), "--data",
           str(EXAMPLES / "source_task_en.csv"), "--base-model", SETUP["model"], "--language", "en",
           "--full-steps", "3", "--sparse-steps", "3", "--k", "0.05", "--batch-size", "8", "--max-length", "32",
           "--logging-steps", "1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(f"  task vector via the CLI (3+3 steps on {SETUP['model']}): {time.perf_counter() - t0:.1f} s", flush=True)
    return run / "vector"


def rest_call(http, base: str, api: str, data: list):
    """One call of a Gradio endpoint over plain HTTP: POST, then read the result event."""
    r = http.post(f"{base}gradio_api/call/{api}", json={"data": data})
    r.raise_for_status()
    event = r.json()["event_id"]
    kind = None
    with http.stream("GET", f"{base}gradio_api/call/{api}/{event}") as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                if kind == "error":
                    raise RuntimeError(line)
                return json.loads(line[5:])
    raise RuntimeError("no result")


def bench_predict(root: Path, calls: int, shared: App | None = None) -> dict:
    import httpx
    from gradio_client import Client

    home = shared.home if shared else root / "predict" / "home"
    home.mkdir(parents=True, exist_ok=True)
    if SETUP["task_vector"]:  # checked and saved into DEFTX_HOME, where the app may pull it from
        from deftx_engine.method.vectors import SparseVector

        vector = SparseVector.load(SETUP["task_vector"]).save(home / "given-task-vector")
    else:
        vector = make_task_vector(home)
    with app_for("prediction", home, shared) as app:
        c = Client(app.url, verbose=False)
        msg, _ = c.predict(str(vector), "", "", "", "", api_name="/pull")
        assert "Pulled" in msg, msg
        task = c.predict(api_name="/list_runs")["data"][0][0]
        texts = [f"Makanannya enak sekali, nomor {i}!" for i in range(calls)]
        t0 = time.perf_counter()
        first, _ = c.predict(task, "", "Warm-up sentence.", "", api_name="/predict")
        build = time.perf_counter() - t0
        print(f"  first prediction (builds and caches the composed model): {build:.2f} s", flush=True)
        http = httpx.Client(timeout=60)
        rest, client = [], []
        for t in texts:
            t1 = time.perf_counter()
            out = rest_call(http, app.url, "predict", [task, "", t, "", 1.0, "sum"])  # REST takes every input
            rest.append(time.perf_counter() - t1)
        assert "%" in out[0], out
        for t in texts:
            t1 = time.perf_counter()
            out = c.predict(task, "", t, "", api_name="/predict")
            client.append(time.perf_counter() - t1)
        assert "%" in out[0], out
        server_ms = float(out[0].split(" ms")[0].rsplit("· ", 1)[1])
        return {"rest": rest, "client": client, "build": build, "server_ms_last": server_ms}


# ---- 3. Start -> first step ------------------------------------------------------------------------------
def demo_args(kind: str, data: Path, language: str) -> dict:
    p = preset("cpu-demo", kind)
    return dict(kind=kind, base_model=SETUP["model"], data=str(data), language=language, name=f"bench-{kind}",
                method=p["method"], rank_policy=p["rank_policy"], energy=p["energy"], rank=100,
                residual_share=p["residual_share"], k_percent=round(p["k"] * 100, 2),
                full_steps=p.get("full_steps", 0), sparse_steps=p.get("sparse_steps", 0),
                epochs=p.get("full_epochs", 1.0), lr=p["lr"], batch_size=p["batch_size"],
                max_length=p["max_length"], seed=p["seed"], text_column="", pair_column="", label_column="label",
                preset="cpu-demo")


def bench_first_step(root: Path, repeats: int, shared: App | None = None) -> list[float]:
    from gradio_client import Client

    home = shared.home if shared else root / "first-step" / "home"
    home.mkdir(parents=True, exist_ok=True)
    times = []
    with app_for("Start -> first step", home, shared) as app:
        c = Client(app.url, verbose=False)
        time.sleep(SETUP["warmup_wait"])  # let the app's background warm-up finish, as for a user reading the page
        for i in range(repeats):
            t0 = time.perf_counter()
            msg, run_id, *_ = c.predict(**demo_args("language", EXAMPLES / "target_corpus_id.txt", "id"),
                                        api_name="/start_training")
            assert isinstance(run_id, str) and run_id, msg
            status = home / "runs" / run_id / "status.json"
            while True:
                try:
                    if json.loads(status.read_text()).get("step", 0) >= 1:
                        break
                except (OSError, ValueError):
                    pass
                if time.perf_counter() - t0 > 300:
                    raise TimeoutError("no first step within 300 s")
                time.sleep(0.05)
            times.append(time.perf_counter() - t0)
            print(f"  Start -> first step {i + 1}/{repeats}: {times[-1]:.2f} s", flush=True)
            c.predict(run_id, api_name="/cancel_run")
            while c.predict(run_id, api_name="/run_status")["state"] == "running":
                time.sleep(0.5)
    return times


# ---- 4. newcomer flow ---------------------------------------------------------------------------------------
def bench_flow(root: Path) -> dict:
    from gradio_client import Client

    home = root / "flow" / "home"
    home.mkdir(parents=True)
    settle("newcomer flow")
    app = App(home)
    marks = {}
    try:
        app.wait_http_200()
        c = Client(app.url, verbose=False)
        t0 = time.perf_counter()
        for role, f in (("corpus", "target_corpus_id.txt"), ("task", "source_task_en.csv")):
            msg, *_ = c.predict(role, None, str(EXAMPLES / f), "", "", "label", api_name="/validate_data")
            assert "✔" in msg, msg
        marks["data checked"] = time.perf_counter() - t0
        _, lang, *_ = c.predict(**demo_args("language", EXAMPLES / "target_corpus_id.txt", "id"),
                                api_name="/start_training")
        _, task, *_ = c.predict(**demo_args("task", EXAMPLES / "source_task_en.csv", "en"), api_name="/start_training")
        for name, rid in (("language SFT done", lang), ("task SFT done", task)):
            final = ("done", "failed", "cancelled", "interrupted")
            while (st := c.predict(rid, api_name="/run_status"))["state"] not in final:
                time.sleep(2)
            assert st["state"] == "done", st
            marks[name] = time.perf_counter() - t0
            print(f"  {name}: {marks[name]:.0f} s", flush=True)
        msg, summary, *_ = c.predict(lang, "", task, api_name="/analyze")
        assert "Jaccard" in summary, (msg, summary)
        marks["analyzed"] = time.perf_counter() - t0
        msg, _ = c.predict(task, lang, "Makanannya enak sekali!", "", api_name="/predict")
        assert "%" in msg, msg
        marks["first prediction"] = time.perf_counter() - t0
        msg, _ = c.predict(task, lang, None, str(EXAMPLES / "target_eval_id.csv"), "", "", "label",
                           api_name="/evaluate")
        marks["evaluation file scored"] = time.perf_counter() - t0
        marks["evaluation"] = msg.split("</span>")[-1].replace("**", "").strip()
    finally:
        app.stop()
    return marks


# ---- report ------------------------------------------------------------------------------------------------
def timing_row(name: str, seconds: list[float], target_s: float) -> tuple[str, str, str, bool]:
    """A figure timed ``len(seconds)`` times: its median (and range) against ``target_s``."""
    med = statistics.median(seconds)
    return (name, f"{med:.1f} s (median of {len(seconds)}; {min(seconds):.1f}–{max(seconds):.1f})",
            f"≤ {target_s:g} s", med <= target_s)


def predict_rows(p: dict, calls: int) -> list[tuple[str, str, str, bool | None]]:
    """Section 2's figures from ``bench_predict``'s measurements: p50 / p95 of each client against 100 ms."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for key, label in (("rest", "REST API (`/gradio_api/call/predict`)"), ("client", "gradio_client")):
        p50, p95 = pct(p[key], 0.5) * 1000, pct(p[key], 0.95) * 1000
        rows.append((f"prediction round trip, {label}, {calls} calls", f"p50 {p50:.0f} ms, p95 {p95:.0f} ms",
                     "p50 ≤ 100 ms", p50 <= 100))
    rows.append(("  of which model time in the app (last call)", f"{p['server_ms_last']:.0f} ms", "", None))
    rows.append(("first prediction (builds + caches the composed model)", f"{p['build']:.1f} s", "", None))
    return rows


def table(rows: list[tuple]) -> str:
    """The Markdown table of the figures (``met`` empty where a figure has no target)."""
    lines = ["| figure | value | target | met |", "| --- | --- | --- | --- |"]
    for name, value, target, ok in rows:
        lines.append(f"| {name} | {value} | {target} | {'' if ok is None else ('yes' if ok else 'no')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="startup and Start->first-step repetitions")
    ap.add_argument("--calls", type=int, default=50, help="prediction calls per client")
    ap.add_argument("--flow", action="store_true", help="also time the newcomer click-through (cpu-demo)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, metavar="FILE",
                    help="the results file whose '## Web app' section is replaced (default benchmarks/RESULTS.md)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each section wait up to S seconds for other processes to go quiet")
    ap.add_argument("--meter-seconds", type=float, default=3.0, metavar="S",
                    help="how long other processes' CPU use is metered before each section (default 3)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="which of the three figures to measure (default all)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"base model of the task vector and the runs: an alias ({DEFAULT_MODEL}, the app's default, "
                         "or minilm) or a local model folder (the app is given its parent folder in DEFTX_DATA_DIRS)")
    ap.add_argument("--task-vector", metavar="DIR",
                    help="the task vector (made for --model) to predict with, instead of one trained through the CLI")
    ap.add_argument("--one-app", action="store_true",
                    help="a quick check: the last timed startup's app also serves the prediction and Start -> first "
                         "step sections (by default each section starts a fresh app on its own DEFTX_HOME)")
    ap.add_argument("--warmup-wait", type=float, default=8.0, metavar="S",
                    help="seconds to let the app's background warm-up finish before Start -> first step (default 8)")
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    QUIET.update(limit=args.wait_quiet, window=args.meter_seconds, seen=[])
    SETUP.update(model=args.model, warmup_wait=args.warmup_wait, task_vector=args.task_vector)
    info = machine_info("gradio")
    root = Path(tempfile.mkdtemp(prefix="deftx-app-perf-"))
    rows = []
    if args.one_app and "startup" not in args.sections:
        ap.error("--one-app needs the startup section (its last app serves the others)")
    shared = None
    try:
        if "startup" in args.sections:
            print("1. python app.py -> first HTTP 200", flush=True)
            st, shared = bench_startup(root, args.repeats, keep_last=args.one_app)
            rows.append(timing_row("`python app.py` → first HTTP 200", st, 15))
        if "predict" in args.sections:
            print(f"2. prediction round trip ({args.model}, cached composed model)", flush=True)
            rows += predict_rows(bench_predict(root, args.calls, shared), args.calls)
        if "first-step" in args.sections:
            print(f"3. Start -> first training step (cpu-demo, {args.model}, language)", flush=True)
            rows.append(timing_row("Start → first training step (status.json step ≥ 1)",
                                   bench_first_step(root, args.repeats, shared), 20))
        if args.flow:
            print("4. newcomer flow: data -> language SFT -> task SFT -> analyze -> predict (cpu-demo)", flush=True)
            m = bench_flow(root)
            total = m["evaluation file scored"]
            detail = ", ".join(f"{k} {v:.0f} s" for k, v in m.items() if isinstance(v, float))
            rows.append((f"newcomer flow through the API, cpu-demo on {args.model}",
                         f"{total / 60:.1f} min ({detail}); zero-shot on target_eval_id.csv: {m['evaluation']}",
                         "< 10 min", total < 600))
    finally:
        if shared is not None:
            shared.stop()
        shutil.rmtree(root, ignore_errors=True)

    figures = table(rows)
    print()
    print(figures)
    if not args.no_write:
        cmd = "python -m benchmarks.app_perf " + " ".join(argv if argv is not None else sys.argv[1:])
        others = "; ".join(f"{w}: {c:.2f}" for w, c, _ in QUIET["seen"] if c is not None)
        body = "\n".join([f"Command: `{cmd}` · {info['date']}", "",
                          "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items() if k != "date"), "",
                          f"Other processes' CPU use just before each section (cores): {others}.", "",
                          figures, "",
                          "The REST figure is what any HTTP client (curl, the JavaScript client) sees; "
                          "`gradio_client` polls its job every 50 ms, which adds a client-side floor of "
                          "roughly that to each call. Other jobs on a shared machine inflate all figures. The "
                          "newcomer flow measures time: the cpu-demo preset is a quick walk-through, and its "
                          "zero-shot scores on the small demo data are not meaningful.", ""])
        write_results_section(HEADING, body, args.results)
        print(f"\nwritten to {args.results} ({HEADING})")
    return {"rows": rows, "table": figures, "other_cores": QUIET["seen"]}


if __name__ == "__main__":
    main()
