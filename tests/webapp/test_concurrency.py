"""Issue 6, concurrent users: 5 gradio_client sessions start, watch, cancel and resume tiny training runs at
once against one launched app (127.0.0.1, DEFTX_MAX_JOBS=1) for a bounded time, while a 6th session measures
prediction latency.

Every loop is bounded in count and time (STORM seconds, default 45: DEFTX_STORM_SECONDS overrides it; starts per
session, default 5: DEFTX_STORM_STARTS; a 30-minute soak sets both, e.g. 1800 and 1000). Then
every run left is cancelled and the registry is checked: no run lost or duplicated (the ids the sessions got
back are exactly the registry's), every run in a final state, the page's view (`run_status`) equal to the
registry's, at most one run at a time, starts in FIFO order of (re)queueing, and no process started twice
(one `configuration:` header per start in process.log). The figures are printed (`pytest -s`) and written to
test-artifacts/reliability-concurrency.json for benchmarks/RESULTS.md.
"""
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import pytest

from tiny import ASSETS, make_tiny_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
STORM = float(os.environ.get("DEFTX_STORM_SECONDS", "45"))
SESSIONS = 5
MAX_STARTS = int(os.environ.get("DEFTX_STORM_STARTS", "5"))  # per session; raise it with the seconds for a soak
FINAL = ("done", "failed", "cancelled", "interrupted")
STATES = FINAL + ("queued", "running")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


@pytest.fixture(scope="module")
def app(tmp_path_factory, launch_app):
    from deftx_engine.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFTX_WARMUP", "0")
        mp.setenv("DEFTX_MAX_JOBS", "1")
        for var in ("DEFTX_MAX_QUEUE", "DEFTX_MAX_STEPS", "DEFTX_MAX_LINES", "DEFTX_AUTH"):
            mp.delenv(var, raising=False)
        tiny = str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))
        mp.setenv("DEFTX_DATA_DIRS", str(Path(tiny).parent))  # a local base model must lie in an allowed folder
        home = tmp_path_factory.mktemp("home")
        assert main(["train-task", "--data", str(ASSETS / "source_task_en.csv"), "--base-model", tiny,
                     "--full-steps", "2", "--sparse-steps", "2", "--batch-size", "8", "--max-length", "32",
                     "--output-dir", str(home / "seed")]) == 0  # the task vector predictions use
        from webapp.settings import launch_kwargs

        demo, studio = launch_app(home, **launch_kwargs(home))
        yield demo, studio, tiny
        studio.registry.shutdown(cancel_running=True)
        demo.close()


def test_five_sessions_start_watch_cancel_while_a_sixth_predicts(app):
    from gradio_client import Client

    demo, studio, tiny = app
    home = studio.home
    url = demo.local_url
    assert url.startswith("http://127.0.0.1:")
    c0 = Client(url, verbose=False)
    msg, _ = c0.predict(str(home / "seed" / "vector"), "", "", "", "", api_name="/pull")
    assert "Pulled" in msg, msg
    task_id = studio.registry.list()[0]["id"]

    lock = threading.Lock()
    started_ids: list[tuple[int, str]] = []  # (session, run id) as returned to the sessions
    counts = {"starts": 0, "cancels": 0, "cancels_running": 0, "resumes": 0, "status_polls": 0, "list_runs": 0,
              "predictions": 0}
    resumed: dict[str, int] = {}
    errors: list[str] = []
    latencies: list[float] = []
    deadline = time.time() + STORM

    def bump(key, n=1):
        with lock:
            counts[key] += n

    def session(k: int):
        rng = random.Random(k)
        try:
            c = Client(url, verbose=False)
            mine: list[str] = []
            for i in range(MAX_STARTS):
                if time.time() > deadline:
                    break
                msg, run_id, *_ = c.predict(
                    kind="language", base_model=tiny, data=str(ASSETS / "target_corpus_id.txt"), language="id",
                    name=f"s{k}-{i}", method=rng.choice(["deftx", "lt-sft"]), rank_policy="energy", energy=0.9,
                    rank=100, residual_share=0.05, k_percent=5, full_steps=2, sparse_steps=2, epochs=1, lr=1e-3,
                    batch_size=8, max_length=32, seed=k * 100 + i, text_column="", pair_column="",
                    label_column="label", preset="custom", api_name="/start_training")
                assert isinstance(run_id, str) and run_id, msg
                with lock:
                    started_ids.append((k, run_id))
                mine.append(run_id)
                bump("starts")
                action = rng.choice(["cancel", "watch+cancel", "watch", "watch"])
                if action == "cancel":
                    c.predict(run_id, api_name="/cancel_run")
                    bump("cancels")
                else:
                    for _ in range(8):  # a bounded watch: 8 polls, about 4 s
                        st = c.predict(run_id, api_name="/run_status")
                        bump("status_polls")
                        assert st["state"] in STATES and st["run"] == run_id, st
                        if st["state"] in FINAL or time.time() > deadline:
                            break
                        time.sleep(0.5)
                    if action == "watch+cancel":
                        c.predict(run_id, api_name="/cancel_run")
                        bump("cancels")
                for rid in mine:  # one of mine got its turn: stop it half the time (cancel while running)
                    if c.predict(rid, api_name="/run_status")["state"] == "running" and rng.random() < 0.5:
                        c.predict(rid, api_name="/cancel_run")
                        bump("cancels_running")
                        break
                if rng.random() < 0.3:  # everyone's runs, as the Runs tab shows them
                    table = c.predict(api_name="/list_runs")
                    bump("list_runs")
                    listed = [r[0] for r in table["data"]]
                    assert len(listed) == len(set(listed)) and set(mine) <= set(listed)
                if rng.random() < 0.2:  # resume one of my stopped runs
                    for rid in mine:
                        if c.predict(rid, api_name="/run_status")["state"] == "cancelled":
                            m, _ = c.predict(rid, api_name="/resume_run")
                            assert "continues from its last checkpoint" in m, m
                            with lock:
                                resumed[rid] = resumed.get(rid, 0) + 1
                            bump("resumes")
                            break
        except Exception as e:  # noqa: BLE001 -- reported by the main thread
            errors.append(f"session {k}: {type(e).__name__}: {e}")

    def predictor():
        try:
            c = Client(url, verbose=False)
            texts = ["Makanannya enak sekali!", "Pelayanannya lambat.", "Biasa saja."]
            for i in range(2000):
                if time.time() > deadline:
                    break
                t = time.perf_counter()
                msg, fig = c.predict(task_id, "", texts[i % 3], "", api_name="/predict")
                latencies.append(time.perf_counter() - t)
                assert "dx-err" not in msg and fig["type"] == "plotly", msg
                bump("predictions")
                time.sleep(0.05)
        except Exception as e:  # noqa: BLE001
            errors.append(f"predictor: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=session, args=(k,), daemon=True) for k in range(SESSIONS)]
    threads.append(threading.Thread(target=predictor, daemon=True))
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=STORM + 60)
    assert not any(t.is_alive() for t in threads), "a session did not stop in time"
    storm_seconds = time.time() - t0
    assert not errors, errors

    # ---- wind down: cancel what is left, wait until every run is final (bounded)
    reg = studio.registry
    ids = [rid for _, rid in started_ids]
    for row in reg.list(states=["queued", "running"]):
        c0.predict(row["id"], api_name="/cancel_run")
    end = time.time() + 60
    while reg.list(states=["queued", "running"]) and time.time() < end:
        time.sleep(0.2)
    rows = {r["id"]: r for r in reg.list() if r["id"] != task_id}

    # ---- nothing lost, nothing duplicated, everything final, the page agrees with the registry
    assert len(ids) == len(set(ids)), "a run id was handed out twice"
    assert set(rows) == set(ids), f"lost: {set(ids) - set(rows)}; unknown: {set(rows) - set(ids)}"
    assert all(r["state"] in FINAL for r in rows.values()), {r["id"]: r["state"] for r in rows.values()}
    for rid in ids:
        assert c0.predict(rid, api_name="/run_status")["state"] == rows[rid]["state"]

    # ---- one at a time, FIFO by (re)queue time, no process started twice
    ran = sorted((r for r in rows.values() if r["started"]), key=lambda r: r["started"])
    for a, b in zip(ran, ran[1:]):
        assert a["finished"] <= b["started"], f"{a['id']} and {b['id']} ran at the same time"
        assert a["queued"] <= b["queued"], f"{b['id']} (queued later) started before {a['id']}"
    for b in ran:
        for a in rows.values():
            if a["queued"] < b["queued"] and not a["started"]:  # older, never started: left the queue first
                assert a["finished"] <= b["started"], f"{b['id']} started while the older {a['id']} waited"
    for rid, r in rows.items():
        log = Path(r["run_dir"]) / "process.log"
        n = log.read_text(encoding="utf-8", errors="replace").count("configuration:") if log.exists() else 0
        assert n <= 1 + resumed.get(rid, 0), f"run {rid} started {n} times"
        assert bool(r["started"]) == (r["pid"] is not None)
    starts_total = len(ran)  # runs whose (last) attempt got a process

    states = {s: sum(r["state"] == s for r in rows.values()) for s in FINAL}
    lat_ms = [x * 1000 for x in latencies]
    figures = {
        "storm_seconds": round(storm_seconds, 1), "sessions": SESSIONS, "prediction_sessions": 1, **counts,
        "runs": len(rows), "runs_given_a_process": starts_total, "final_states": states, "lost": 0, "duplicated": 0,
        "fifo_violations": 0, "overlapping_runs": 0,
        "predict_ms": {"n": len(lat_ms), "p50": round(statistics.median(lat_ms), 1),
                       "p95": round(percentile(lat_ms, 95), 1), "max": round(max(lat_ms), 1)},
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "reliability-concurrency.json").write_text(json.dumps(figures, indent=2))
    print(f"\nconcurrency: {json.dumps(figures)}")
    print(f"prediction latency under load: p50 {figures['predict_ms']['p50']} ms, "
          f"p95 {figures['predict_ms']['p95']} ms over {len(lat_ms)} calls")
    assert counts["predictions"] >= 20 and counts["starts"] >= SESSIONS
    assert starts_total >= 1, "no run got to start: the storm exercised only the queue"
