"""What a training run tells its watchers while it runs: ``status.json`` (the app's progress bar and ETA),
``metrics.jsonl`` (the loss curve; the CLI's progress lines), a bar per phase at a terminal, and ``log.txt``.
Only rank 0 reports; a stop signal reaches the trainer through the same callback.
"""
from __future__ import annotations

import sys
import time
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
                           eta_seconds=eta)
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
