"""The preemption protocol: a stop signal ends a job at the next safe point, after a checkpoint, to be resumed.

SIGUSR2 (SLURM's warning before the time limit or a preemption), SIGTERM, SIGHUP (the terminal closed, e.g. right
after a Ctrl-C, while the stop checkpoint is written) and a first SIGINT only set a flag (``StopRequest``); the
training loop acts on it at its next step boundary (all ranks agree, write a checkpoint and raise
``TrainingInterrupted``), the evaluation after its current phase. ``mtssl.run`` then exits with code 3 and
``mtssl.submitit_job`` requeues the job on SIGUSR2. DataLoader workers ignore SIGINT and SIGHUP (``ignore_interrupts``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# What a terminal sends to every process of the job: only the main process decides when to stop.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP)
SIGINT_NOTICE = (b"mtssl: SIGINT: stopping at the next step boundary after a checkpoint (exit 3, rerun to resume); "
                 b"press Ctrl-C again to abort at once, losing the steps since the last checkpoint\n")


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; rerun (requeue) to resume."""

    def __init__(self, signum: int | None, checkpoint: Path, step: int, signal_age_s: float | None = None):
        reason = signal.Signals(signum).name if signum else "another rank's signal"
        age = f" {signal_age_s:.3f} s after the signal" if signal_age_s is not None else ""
        super().__init__(f"stopped on {reason} at step {step}{age}; checkpoint {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step


class StopRequest:
    """Signal handler that only records the signal; the loop acts on it between steps.

    The first SIGINT (Ctrl-C) counts like SIGTERM and gives SIGINT back its default action, so a second one ends
    the process at once, even inside a long C call (Python runs handlers only between bytecodes).
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None  # the latest signal
        self.received: list[int] = []  # every signal, in order
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.previous_handlers = {s: signal.signal(s, self._record) for s in signals}

    def _record(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
        self.signum = signum
        self.received.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.write(2, SIGINT_NOTICE)  # no logging in a handler: it may interrupt a log call holding its lock

    def age_s(self) -> float | None:
        """Seconds since the first signal arrived (None without one)."""
        return None if self.received_at is None else time.monotonic() - self.received_at

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGHUP, which a terminal's Ctrl-C and its closing
    send to the whole process group; torch's worker loop would otherwise end on the KeyboardInterrupt (or the
    worker die of SIGHUP), and the main process then fails with "DataLoader worker exited unexpectedly" before its
    stop checkpoint. The main process decides when to stop."""
    for signum in TERMINAL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
