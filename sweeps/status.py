#!/usr/bin/env python
"""Show the state of every job of a sweep, running or finished.

    python sweeps/status.py <sweep_dir> [--watch SECONDS]

One table, one line per job: its state (``completed``, ``diverged``, ``failed`` from results.json; else
``running`` or ``queued`` as the scheduler says; else ``unfinished``, started but not running now, or
``pending``, nothing written yet), step / total steps, last loss and images/s (from its train.log or
results.json), how many times it was requeued or restarted, its job id and log; then a one-line summary
(``12 completed, 3 running, 1 failed (16 jobs)``). The scheduler is queried once for the whole sweep.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtssl.utils.progress_bar import progress_bar  # noqa: E402
from sweeps.launchers import read_submissions, scheduler_states  # noqa: E402

PROGRESS_MIN_JOBS = 200  # show a progress bar when reading more jobs than this
FINAL_STATUSES = ("completed", "diverged")  # results a relaunch never touches
STARTED_MARKERS = ("config.yaml", "train.log", "tb", "checkpoints")


def job_state(job_dir: Path) -> str:
    """completed | diverged | failed (results.json), unfinished (started, no results) or pending."""
    try:
        status = json.loads((job_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status in ("completed", "diverged", "failed"):
        return status
    if any((job_dir / marker).exists() for marker in STARTED_MARKERS):
        return "unfinished"
    return "pending"


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json of a sweep directory; raises SystemExit with a clear message when there is none."""
    path = Path(sweep_dir) / "sweep.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise SystemExit(f"{path} not found: pass the output directory of a sweep (sweeps/launch.py writes it)")
    except ValueError as error:
        raise SystemExit(f"{path} is not valid JSON ({error})")


# The trainer's progress line (mtssl/train/trainer.py) and the line each start of a job writes (mtssl/run.py).
_STEP_LINE = re.compile(rb"step (\d+)/(\d+) epoch \d+ loss (\S+) .* ([0-9.]+) img/s")
_TOTAL_LINE = re.compile(rb"pretraining \S+: (\d+) steps")
_START_LINE = b"job started:"
LOG_TAIL_BYTES = 1 << 16
SCHEDULER_RUNNING = {"RUNNING", "COMPLETING"}
SCHEDULER_QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "PREEMPTED"}


def log_progress(train_log: Path) -> dict:
    """From a job's train.log: last step, total steps, last loss, images/s and requeue count (None if unknown)."""
    progress = {"step": None, "total": None, "loss": None, "images_per_s": None, "requeues": None}
    try:
        with open(train_log, "rb") as f:
            data = f.read()  # one sequential read; counting starts needs the whole log
    except OSError:
        return progress
    progress["requeues"] = max(0, data.count(_START_LINE) - 1)  # each (re)start of the job logs one
    tail = data[-LOG_TAIL_BYTES:]
    steps = _STEP_LINE.findall(tail)
    if steps:
        step, total, loss, speed = steps[-1]
        progress.update(step=int(step), total=int(total), loss=float(loss), images_per_s=float(speed))
    else:
        totals = _TOTAL_LINE.findall(data)
        if totals:
            progress.update(step=0, total=int(totals[-1]))
    return progress


def display_state(job_state_: str, scheduler: str | None) -> str:
    """One state per job: completed/diverged/failed from results, else running/queued from the scheduler,
    else unfinished (started, not running now) or pending (nothing written, nothing queued)."""
    if job_state_ in ("completed", "diverged", "failed"):
        return job_state_
    if scheduler in SCHEDULER_RUNNING:
        return "running"
    if scheduler in SCHEDULER_QUEUED:
        return "queued"
    return job_state_


def sweep_rows(sweep_dir: Path, query_scheduler: bool = True) -> list[dict]:
    """One dict per job of sweep.json: name, state, step/total, last loss, images/s, requeues, job id, log.

    The scheduler is asked about all the jobs' latest submissions at once (one sacct call on SLURM).
    """
    sweep_dir = Path(sweep_dir)
    submissions = read_submissions(sweep_dir)
    jobs = read_sweep(sweep_dir)["jobs"]
    latest = {job["name"]: submissions[job["name"]][-1] for job in jobs if submissions.get(job["name"])}
    states = scheduler_states(list(latest.values())) if query_scheduler else {}
    rows = []
    for job in progress_bar(jobs, desc="reading jobs", unit="job", min_items=PROGRESS_MIN_JOBS, file=sys.stderr):
        job_dir = sweep_dir / job["name"]
        sub = latest.get(job["name"])
        scheduler = states.get(sub.job_id) if sub else None
        row = {"name": job["name"], "state": display_state(job_state(job_dir), scheduler),
               "job_id": sub.job_id if sub else None, "scheduler": scheduler,
               "log": sub.stdout if sub else (str(job_dir / "train.log") if (job_dir / "train.log").exists() else None),
               **log_progress(job_dir / "train.log")}
        results = _read_json(job_dir / "results.json")
        if results:  # final numbers of a finished job
            row["step"] = results.get("steps", row["step"])
            row["total"] = row["total"] or row["step"]
            row["loss"] = (results.get("final_losses") or {}).get("loss", row["loss"])
            row["images_per_s"] = results.get("images_per_s", row["images_per_s"])
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def summary_line(rows: list[dict]) -> str:
    """``12 completed, 3 running, 1 failed (16 jobs)``, most frequent state first."""
    counts = Counter(r["state"] for r in rows)
    return ", ".join(f"{n} {state}" for state, n in counts.most_common()) + f" ({len(rows)} jobs)"


def format_rows(rows: list[dict]) -> str:
    """The sweep as one table (one line per job) and a one-line summary."""
    header = ("JOB", "STATE", "STEP", "LOSS", "IMG/S", "REQUEUES", "JOB ID", "LOG")
    lines = [header] + [(
        r["name"], r["state"],
        "-" if r["step"] is None else f"{r['step']}/{_cell(r['total'])}",
        _cell(r["loss"], "{:.4f}"), _cell(r["images_per_s"], "{:.1f}"), _cell(r["requeues"]),
        r["job_id"] or "-", r["log"] or "-",
    ) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines]
    text.append(summary_line(rows))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
    args = parser.parse_args(argv)
    while True:
        print(format_rows(sweep_rows(args.sweep_dir)), flush=True)
        if args.watch is None:
            return 0
        time.sleep(args.watch)
        print()


if __name__ == "__main__":
    sys.exit(main())
