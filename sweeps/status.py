#!/usr/bin/env python
"""Show the state of every job of a sweep, running or finished.

    python sweeps/status.py <sweep_dir> [--watch SECONDS]      # installed: mtssl-status <sweep_dir>

One table, one line per job: its state (``completed``, ``diverged``, ``failed`` from results.json; else
``running`` or ``queued`` as the scheduler says, or ``running`` while the folder's owner process is alive on
this machine; else ``unfinished``, started but not running now,
``malformed``, an unusable results.json, or ``pending``, nothing written yet: mtssl.job_folder.JobStatus),
step / total steps, last loss and images/s (from its progress.json or results.json), how many times it was
requeued or restarted, its job id and log; then a one-line summary (``12 completed, 3 running, 1 failed
(16 jobs)``). The scheduler is queried once for the whole sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from mtssl.job_folder import RESULT_STATUSES, SWEEP_SPEC, TRAIN_LOG, JobStatus, job_state, live_owner, read_progress
from mtssl.utils.progress_bar import progress_bar
from sweeps.launchers import read_submissions, scheduler_states

PROGRESS_MIN_JOBS = 200  # show a progress bar when reading more jobs than this


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json of a sweep directory; raises SystemExit with a clear message when there is none."""
    path = Path(sweep_dir) / SWEEP_SPEC
    try:
        return json.loads(path.read_text())
    except OSError:
        raise SystemExit(f"{path} not found: pass the output directory of a sweep (sweeps/launch.py writes it)")
    except ValueError as error:
        raise SystemExit(f"{path} is not valid JSON ({error})")


SCHEDULER_RUNNING = {"RUNNING", "COMPLETING"}
SCHEDULER_QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "PREEMPTED"}


def job_progress(job_dir: Path) -> dict:
    """From a job's progress.json: last step, total steps, last loss, images/s and requeue count (None if unknown)."""
    progress = read_progress(job_dir) or {}
    starts = progress.get("starts")
    return {"step": progress.get("step"), "total": progress.get("total_steps"), "loss": progress.get("loss"),
            "images_per_s": progress.get("images_per_s"), "requeues": None if starts is None else max(0, starts - 1)}


def display_state(state: JobStatus, scheduler: str | None, owner_alive: bool = False) -> JobStatus:
    """One state per job: completed/diverged/failed from results, else running/queued from the scheduler (or
    running while the folder's owner process is alive on this host), else the folder's own (unfinished: started,
    not running now; malformed; pending: nothing written or queued)."""
    if state in RESULT_STATUSES and not owner_alive:
        return state
    if scheduler in SCHEDULER_RUNNING or owner_alive:
        return JobStatus.RUNNING
    if scheduler in SCHEDULER_QUEUED:
        return JobStatus.QUEUED
    return state


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
        state = job_state(job_dir)
        row = {"name": job["name"], "state": display_state(state.status, scheduler, live_owner(job_dir) is not None),
               "job_id": sub.job_id if sub else None, "scheduler": scheduler,
               "log": sub.stdout if sub else (str(job_dir / TRAIN_LOG) if (job_dir / TRAIN_LOG).exists() else None),
               **job_progress(job_dir)}
        results = state.results
        if results:  # final numbers of a finished job
            row["step"] = results.get("steps", row["step"])
            row["total"] = row["total"] or row["step"]
            row["loss"] = (results.get("final_losses") or {}).get("loss", row["loss"])
            row["images_per_s"] = results.get("images_per_s", row["images_per_s"])
        rows.append(row)
    return rows


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
