"""Progress as plain lines on a stderr that is not a terminal (``deftx train-*`` under nohup, in CI logs, into a
pipe), where the trainer shows neither its bars nor log.txt's story."""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

from .runs import RunDir
from .train import PHASE_NAMES


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
