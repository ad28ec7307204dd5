"""What a training run tells its watchers while it runs: ``status.json`` (the app's progress bar and ETA),
``metrics.jsonl`` (the loss curve; the CLI's progress lines), a bar per phase at a terminal, ``log.txt``, and
plain lines on a stderr that is not a terminal (``deftx train-*`` under nohup, in CI logs, into a pipe), where
the trainer shows neither its bars nor log.txt's story. Only rank 0 reports; a stop signal reaches the trainer
through the same callback.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from .runs import RunDir, StopFlag

PHASE_NAMES = {"full": "phase 1/2: full fine-tuning", "sparse": "phase 2/2: sparse fine-tuning"}


def progress_callback(run: RunDir, phase: str, offset: int, total: int, stop: StopFlag | None):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Writes status/metrics for watchers and turns a stop signal into a clean stop with a checkpoint."""

        def __init__(self):
            self.t0 = time.time()
            self.first = None
            self.last_write = 0.0
            self.loss = None
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:  # a terminal gets a bar per phase; a log file (the app's jobs) none
                # the phase's own message (the app shows the last non-empty one): not "denoising and selecting…"
                run.update(phase=phase, message=PHASE_NAMES.get(phase, phase))
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=PHASE_NAMES.get(phase, phase),
                                unit="step", disable=None, dynamic_ncols=True)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        def on_step_end(self, args, state, control, **kw):
            if stop:
                control.should_training_stop = True
                control.should_save = True
            if not state.is_world_process_zero:
                return
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            now = time.time()
            if self.first is None:
                self.first = (now, state.global_step)
            if now - self.last_write > 0.5 or state.global_step == state.max_steps:
                done = offset + state.global_step
                t_first, s_first = self.first
                rate = (now - t_first) / max(state.global_step - s_first, 1)
                eta = rate * (total - done) if state.global_step > s_first else None
                run.update(state="running", phase=phase, step=done, total_steps=total, loss=self.loss,
                           eta_seconds=eta, phase_step=state.global_step, phase_steps=state.max_steps)
                self.last_write = now

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.loss = float(logs["loss"])
                run.update(loss=self.loss)  # on_step_end ran before this step's log: keep status current
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{self.loss:.3f}", refresh=False)
                run.log_metrics({"phase": phase, "step": offset + state.global_step, "loss": self.loss,
                                 "lr": logs.get("learning_rate"),
                                 "phase_step": state.global_step, "phase_steps": state.max_steps})  # the CLI's lines

    return Progress()


def head_fit_progress(run: RunDir):
    """Step, steps (at most: the fit ends early once the held-out loss stops falling) and ETA of the head fit in
    status.json, at most every half second: the longest step on a new corpus shows progress like the phases."""
    t0, last = time.time(), [0.0]

    def update(step: int, total: int) -> None:
        now = time.time()
        if now - last[0] > 0.5 or step == total:
            run.update(step=step, total_steps=total, eta_seconds=(now - t0) / step * (total - step))
            last[0] = now

    return update


def run_logger(run: RunDir, main: bool) -> Callable[[str], None]:
    """Lines for log.txt (rank 0), told on stderr too when a person reads it at a terminal."""
    log = run.log_file.open("a", encoding="utf-8") if main else None

    def say(msg: str) -> None:
        if log:
            log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            log.flush()
            if sys.stderr.isatty():  # a person at a terminal reads the same story as log.txt
                print(msg, file=sys.stderr, flush=True)

    return say


def _say(line: str) -> None:
    """Stamped like log.txt's lines, which come through as written."""
    print(time.strftime("%H:%M:%S"), line, file=sys.stderr, flush=True)


def _eta(seconds: float | None) -> str:
    return f", ETA {timedelta(seconds=round(seconds))}" if seconds is not None and seconds >= 0 else ""


class PlainProgress(RunDir):
    """A ``RunDir`` that also prints, as plain lines, what the trainer tells it -- each logged step of a phase, the
    head fit's step every ``logging_steps`` steps, each new status message -- and log.txt's new lines before them.
    Nothing is polled: the lines come from the trainer's own calls."""

    log_at: int | None = None  # bytes of log.txt already shown; None until this process claims the folder
    head_fit_shown = 0
    message = ""

    def __init__(self, path: str | Path, logging_steps: int):
        self.logging_steps = logging_steps
        super().__init__(path)

    def claim(self, config: dict, *, resume: bool, overwrite: bool) -> bool:
        resumed = super().claim(config, resume=resume, overwrite=overwrite)
        self.log_at = self.log_file.stat().st_size if self.log_file.is_file() else 0  # an earlier attempt's
        return resumed

    def show_log(self) -> None:
        """log.txt's lines written since the last call (the trainer's story: head fit, mask, vector)."""
        if self.log_at is None:
            return
        try:
            with self.log_file.open("rb") as f:
                f.seek(self.log_at)
                new = f.read()
        except OSError:
            return
        new = new[:new.rfind(b"\n") + 1]  # whole lines only
        self.log_at += len(new)
        for line in new.decode("utf-8", errors="replace").splitlines():
            print(line, file=sys.stderr, flush=True)

    def update(self, **changes) -> None:
        super().update(**changes)
        self.show_log()
        st = self._status
        if st.message and st.message != self.message and st.state != "done":  # log.txt says "vector saved"
            _say(st.message)
        self.message = st.message
        if st.phase == "head-fit" and "step" in changes and st.total_steps:
            if st.step // self.logging_steps > self.head_fit_shown // self.logging_steps or st.step == st.total_steps:
                _say(f"MLM head fit: step {st.step} of at most {st.total_steps}{_eta(st.eta_seconds)}")
                self.head_fit_shown = st.step

    def log_metrics(self, record: dict) -> None:
        super().log_metrics(record)
        self.show_log()
        if record.get("phase") in PHASE_NAMES and "phase_step" in record:
            st = self.status()  # this step's, written just before its log
            _say(f"{PHASE_NAMES[record['phase']]}: step {record['phase_step']}/{record['phase_steps']} (run "
                 f"{record['step']}/{st.get('total_steps', '?')}), loss {record['loss']:.4f}"
                 f"{_eta(st.get('eta_seconds'))}")
