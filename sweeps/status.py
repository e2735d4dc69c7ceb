#!/usr/bin/env python
"""Show the state of every job of a sweep, running or finished.

    python sweeps/status.py <sweep_dir> [--watch SECONDS]

Per job: its state from its directory (``completed``, ``diverged``, ``failed`` from results.json;
``unfinished`` when it has started but has no results yet, with its last checkpoint step; ``pending``
when nothing was written yet), and the scheduler's view of its latest submission (job id, state, log).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.launchers import read_submissions, scheduler_state  # noqa: E402

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


def last_checkpoint_step(job_dir: Path) -> int | None:
    """Step of the newest complete checkpoint (one with DCP's .metadata), or None."""
    steps = [int(p.name.split("_")[1]) for p in (job_dir / "checkpoints").glob("step_*")
             if (p / ".metadata").exists() and p.name.split("_")[1].isdigit()]
    return max(steps) if steps else None


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json of a sweep directory; raises SystemExit with a clear message when there is none."""
    path = Path(sweep_dir) / "sweep.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise SystemExit(f"{path} not found: pass the output directory of a sweep (sweeps/launch.py writes it)")
    except ValueError as error:
        raise SystemExit(f"{path} is not valid JSON ({error})")


def sweep_rows(sweep_dir: Path, query_scheduler: bool = True) -> list[dict]:
    """One dict per job of sweep.json: name, state, checkpoint step, latest job id, scheduler state, log."""
    sweep_dir = Path(sweep_dir)
    submissions = read_submissions(sweep_dir)
    rows = []
    for job in read_sweep(sweep_dir)["jobs"]:
        job_dir = sweep_dir / job["name"]
        latest = submissions.get(job["name"], [None])[-1]
        row = {"name": job["name"], "state": job_state(job_dir), "step": last_checkpoint_step(job_dir),
               "job_id": latest.job_id if latest else None, "scheduler": None, "log": latest.stdout if latest else None}
        if latest is not None and query_scheduler:
            row["scheduler"] = scheduler_state(latest)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ("JOB", "STATE", "CKPT STEP", "JOB ID", "SCHEDULER", "LOG")
    lines = [header] + [(r["name"], r["state"], "-" if r["step"] is None else str(r["step"]), r["job_id"] or "-",
                         r["scheduler"] or "-", r["log"] or "-") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    text.append(", ".join(f"{n} {state}" for state, n in counts.items()) + f" ({len(rows)} jobs)")
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
