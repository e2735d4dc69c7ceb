#!/usr/bin/env python
"""Benchmark: how long gathering (and tabulating) a sweep of 1,000 job directories takes.

    python benchmarks/gather_results.py [--jobs 1000] [--repeats 5] [--json benchmarks/results/gather_results.json]

Builds a synthetic sweep in a temporary directory (sweep.json plus one directory per job; mostly completed jobs
with a results.json of the real shape, and some diverged, failed, running with config.yaml and checkpoints,
missing and malformed ones), then times, over several repeats:
  gather   analysis.gather.gather_sweep (reads every results.json, config.yaml only for unfinished jobs);
  tables   analysis.tables.build_tables on the gathered frame;
  full     analysis.make_tables.make_tables without plots (gather, results.csv, tables, README.md).
The files are freshly written, so the OS page cache is warm: this measures the Python side, not a cold network
file system. Prints a table and writes the numbers as JSON. Not a test: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.gather import gather_sweep  # noqa: E402
from analysis.make_tables import make_tables  # noqa: E402
from analysis.tables import build_tables  # noqa: E402

METHODS = ["byol", "simsiam", "mocov3"]
PREDICTORS = ["shared", "separate"]
VIEWS = ["global", "global_local", "global_cutout", "global_local_cutout"]


def build_sweep(sweep_dir: Path, n_jobs: int) -> dict[str, int]:
    """Write a synthetic sweep of n_jobs jobs; returns how many jobs of each status it holds."""
    grid = itertools.product(range(n_jobs), METHODS, PREDICTORS, VIEWS)
    jobs = [{"method": m, "predictor": p, "views": v, "seed": s} for s, m, p, v in itertools.islice(grid, n_jobs)]
    names = [",".join(f"{k}={v}" for k, v in axes.items()) for axes in jobs]
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "ablation": "predictor_sharing", "profile": "cpu_quick", "axes": ["method", "predictor", "views", "seed"],
        "jobs": [{"name": name, "overrides": name.split(","), "axes": axes} for name, axes in zip(names, jobs)]}))
    counts = dict.fromkeys(("completed", "diverged", "failed", "running", "missing", "malformed"), 0)
    for i, (name, axes) in enumerate(zip(names, jobs)):
        # Every 50 jobs: 2 diverged, 1 failed, 1 running, 1 missing, 1 malformed (12% not completed).
        kind = {0: "diverged", 1: "diverged", 2: "failed", 3: "running", 4: "missing", 5: "malformed"}.get(
            i % 50, "completed")
        counts[kind] += 1
        if kind == "missing":
            continue
        job_dir = sweep_dir / name
        (job_dir / "tb").mkdir(parents=True)
        (job_dir / "config.yaml").write_text(
            f"method:\n  name: {axes['method']}\npredictor:\n  name: {axes['predictor']}\nviews:\n"
            f"  name: {axes['views']}\ntrain:\n  seed: {axes['seed']}\n  epochs: 2\n  batch_size: 256\n")
        if kind == "running":
            (job_dir / "checkpoints" / "step_00000100").mkdir(parents=True)
            (job_dir / "checkpoints" / "step_00000100" / ".metadata").write_bytes(b"")
            continue
        if kind == "malformed":
            (job_dir / "results.json").write_text('{"status": "completed", "knn_to')
            continue
        knn = None if kind != "completed" else 40.0 + (i % 17) * 0.5
        results = {
            "status": kind, **{k: v for k, v in axes.items()}, "backbone": "resnet18", "data": "cifar10",
            "epochs": 2, "steps": 200, "knn_top1": knn, "knn_top5": knn and knn + 30, "knn_top1_target": knn,
            "knn_top5_target": knn and knn + 30, "linear_top1": knn and knn + 5, "linear_top5": knn and knn + 35,
            "knn": {"k10": {"top1": knn, "top5": knn}, "k20": {"top1": knn, "top5": knn}},
            "final_losses": {"loss": 1.2, "loss_global": 0.8, "loss_local": 0.3, "loss_cutout": 0.1},
            "wall_time_s": 120.0, "images_per_s": 850.0, "git_revision": "0123456789abcdef",
            "weights_sha256": "ab" * 32, "skipped_images": 0, "world_size": 1}
        if kind != "completed":
            results["error"] = "loss became nan at step 57" if kind == "diverged" else "RuntimeError: boom"
        (job_dir / "results.json").write_text(json.dumps(results))
    return counts


def timed(function, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" /
                        "gather_results.json")
    args = parser.parse_args()
    # The synthetic sweep's malformed jobs are expected; keep their notes off the console.
    logging.getLogger("analysis.make_tables").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = Path(tmp) / "sweep"
        start = time.perf_counter()
        counts = build_sweep(sweep_dir, args.jobs)
        build_s = time.perf_counter() - start
        frame = gather_sweep(sweep_dir).frame
        if len(frame) != args.jobs:
            print(f"error: gathered {len(frame)} rows, expected {args.jobs}", file=sys.stderr)
            return 1
        timings = {
            "gather": timed(lambda: gather_sweep(sweep_dir), args.repeats),
            "tables": timed(lambda: build_tables(frame), args.repeats),
            "full (no plots)": timed(lambda: make_tables([sweep_dir], Path(tmp) / "out", plots=False),
                                     args.repeats),
        }

    print(f"{args.jobs} job directories ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
          f"writing them took {build_s:.2f} s")
    print(f"{'step':<18}{'median s':>10}{'min s':>10}{'max s':>10}{'jobs/s':>10}")
    for step, seconds in timings.items():
        median = statistics.median(seconds)
        print(f"{step:<18}{median:>10.3f}{min(seconds):>10.3f}{max(seconds):>10.3f}{args.jobs / median:>10.0f}")

    report = {"benchmark": "gather_results", "jobs": args.jobs, "repeats": args.repeats, "statuses": counts,
              "python": platform.python_version(), "machine": platform.machine(),
              "seconds": {step: {"median": statistics.median(s), "min": min(s), "max": max(s), "all": s}
                          for step, s in timings.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
