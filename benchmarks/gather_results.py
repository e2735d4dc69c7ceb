#!/usr/bin/env python
"""Benchmark: how long gathering, tabulating and plotting a sweep of 1,000 job directories takes.

    python benchmarks/gather_results.py [--jobs 1000] [--repeats 5] [--logged-steps 25000] [--event-files 4]
                                        [--json benchmarks/results/gather_results.json]

Builds a synthetic sweep in a temporary directory (sweep.json plus one directory per job; mostly completed jobs
with a results.json of the real shape, and some diverged, failed, unfinished with config.yaml and checkpoints,
pending and malformed ones), then times, over several repeats:
  gather   analysis.gather.gather_sweep (reads every results.json, config.yaml only for unfinished jobs);
  tables   analysis.tables.build_tables on the gathered frame;
  full     analysis.make_tables.make_tables without plots (gather, results.csv, tables, README.md);
  curves   analysis.events.read_scalars of every job's tb/ (a bounded number of points per curve);
  full + plots   make_tables with plots (tables, loss/kNN/embedding-std curves, the per-cell bar chart).
Every job but the pending ones has TensorBoard events of realistic size: ``--logged-steps`` steps of the 9 scalars
the trainer logs (25,000 = 200 ImageNet epochs at batch 1024, logging every 10 steps: 225,000 events, ~11 MB).
Writing 1,000 such files would take 11 GB, so ``--event-files`` distinct files are written and hard-linked
into the job directories. For comparison, TensorBoard's EventAccumulator (which parses every event) reads one
of those files, timed in the same run and multiplied by the number of jobs. The files are freshly written, so
the OS page cache is warm: this measures the Python side, not a cold network file system. Prints a table and
writes the numbers as JSON. Not a test: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from analysis.events import read_scalars
from analysis.gather import STATUSES, gather_sweep
from analysis.make_tables import make_tables
from analysis.tables import build_tables
from mtssl.job_folder import (CHECKPOINTS, CONFIG, DCP_METADATA, RANK_BUFFERS, RESULTS, SWEEP_SPEC, TENSORBOARD,
                              TRAINER_STATE, JobStatus, checkpoint_name)

# The scalars the trainer logs every train.log_every_steps (mtssl/train/trainer.py), for views=global_local_cutout.
TAGS = ["train/loss", "train/loss_global", "train/loss_local", "train/loss_cutout", "train/embedding_std",
        "train/images_per_s", "train/lr", "train/tau", "train/grad_norm"]
LOG_EVERY = 10

METHODS = ["byol", "simsiam", "mocov3"]
PREDICTORS = ["shared", "separate"]
VIEWS = ["global", "global_local", "global_cutout", "global_local_cutout"]


def write_event_file(path: Path, logged_steps: int, seed: int) -> int:
    """A TensorBoard event file of TAGS at logged_steps steps (as SummaryWriter.add_scalar writes them) and the
    final eval/* scalars; returns its size in bytes."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    def record(event) -> bytes:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))

    rng = random.Random(seed)
    chunks = [record(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))]
    for i in range(1, logged_steps + 1):
        step = i * LOG_EVERY
        base = 4.0 * math.exp(-i / (logged_steps / 3)) + 0.5
        for k, tag in enumerate(TAGS):
            value = base / (k + 1) + 0.05 * rng.random()
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
            chunks.append(record(event_pb2.Event(wall_time=1.7e9 + i, step=step, summary=summary)))
    for tag, value in (("eval/knn_top1", 40.0 + seed), ("eval/knn_top1_target", 41.0 + seed),
                       ("eval/linear_top1", 45.0 + seed)):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        chunks.append(record(event_pb2.Event(wall_time=1.7e9 + logged_steps, step=logged_steps * LOG_EVERY,
                                             summary=summary)))
    data = b"".join(chunks)
    path.write_bytes(data)
    return len(data)


def link_events(sweep_dir: Path, sources: list[Path]) -> int:
    """Hard-link one of the event files into every job's tb/ (copy where links fail); returns how many jobs."""
    linked = 0
    for i, tb in enumerate(sorted(p for p in sweep_dir.glob("*/tb") if p.is_dir())):
        source = sources[i % len(sources)]
        target = tb / source.name
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        linked += 1
    return linked


def build_sweep(sweep_dir: Path, n_jobs: int) -> dict[str, int]:
    """Write a synthetic sweep of n_jobs jobs; returns how many jobs of each status it holds."""
    grid = itertools.product(range(n_jobs), METHODS, PREDICTORS, VIEWS)
    jobs = [{"method": m, "predictor": p, "views": v, "seed": s} for s, m, p, v in itertools.islice(grid, n_jobs)]
    names = [",".join(f"{k}={v}" for k, v in axes.items()) for axes in jobs]
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_SPEC).write_text(json.dumps({
        "ablation": "predictor_sharing", "profile": "cpu_quick", "axes": ["method", "predictor", "views", "seed"],
        "jobs": [{"name": name, "overrides": name.split(","), "axes": axes} for name, axes in zip(names, jobs)]}))
    counts = dict.fromkeys(STATUSES, 0)
    for i, (name, axes) in enumerate(zip(names, jobs)):
        # Every 50 jobs: 2 diverged, 1 failed, 1 unfinished, 1 pending, 1 malformed (12% not completed).
        kind = {0: JobStatus.DIVERGED, 1: JobStatus.DIVERGED, 2: JobStatus.FAILED, 3: JobStatus.UNFINISHED,
                4: JobStatus.PENDING, 5: JobStatus.MALFORMED}.get(i % 50, JobStatus.COMPLETED)
        counts[kind.value] += 1
        if kind == JobStatus.PENDING:
            continue
        job_dir = sweep_dir / name
        (job_dir / TENSORBOARD).mkdir(parents=True)
        (job_dir / CONFIG).write_text(
            f"method:\n  name: {axes['method']}\npredictor:\n  name: {axes['predictor']}\nviews:\n"
            f"  name: {axes['views']}\ntrain:\n  seed: {axes['seed']}\n  epochs: 2\n  batch_size: 256\n")
        if kind == JobStatus.UNFINISHED:
            checkpoint = job_dir / CHECKPOINTS / checkpoint_name(100)
            checkpoint.mkdir(parents=True)
            for part in (DCP_METADATA, TRAINER_STATE, RANK_BUFFERS.format(rank=0)):
                (checkpoint / part).write_bytes(b"")
            continue
        if kind == JobStatus.MALFORMED:
            (job_dir / RESULTS).write_text('{"status": "completed", "knn_to')
            continue
        knn = None if kind != JobStatus.COMPLETED else 40.0 + (i % 17) * 0.5
        results = {
            "status": kind, **{k: v for k, v in axes.items()}, "backbone": "resnet18", "data": "cifar10",
            "epochs": 2, "steps": 200, "knn_top1": knn, "knn_top5": knn and knn + 30, "knn_top1_target": knn,
            "knn_top5_target": knn and knn + 30, "linear_top1": knn and knn + 5, "linear_top5": knn and knn + 35,
            "knn": {"k10": {"top1": knn, "top5": knn}, "k20": {"top1": knn, "top5": knn}},
            "final_losses": {"loss": 1.2, "loss_global": 0.8, "loss_local": 0.3, "loss_cutout": 0.1},
            "wall_time_s": 120.0, "images_per_s": 850.0, "git_revision": "0123456789abcdef",
            "weights_sha256": "ab" * 32, "skipped_images": 0, "world_size": 1}
        if kind != JobStatus.COMPLETED:
            results["error"] = "loss became nan at step 57" if kind == JobStatus.DIVERGED else "RuntimeError: boom"
        (job_dir / RESULTS).write_text(json.dumps(results))
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
    parser.add_argument("--logged-steps", type=int, default=25000, help="logged steps per job's event file")
    parser.add_argument("--event-files", type=int, default=4, help="distinct event files (hard-linked into jobs)")
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
        start = time.perf_counter()
        sources = [Path(tmp) / f"events.out.tfevents.{1700000000 + i}.bench" for i in range(args.event_files)]
        sizes = [write_event_file(path, args.logged_steps, seed=i) for i, path in enumerate(sources)]
        with_events = link_events(sweep_dir, sources)
        events_s = time.perf_counter() - start
        tb_dirs = sorted(p for p in sweep_dir.glob("*/tb") if p.is_dir())
        points = sum(len(c) for c in read_scalars(tb_dirs[0]).values())
        timings["curves"] = timed(lambda: [read_scalars(tb) for tb in tb_dirs], 1)
        timings["full + plots"] = timed(lambda: make_tables([sweep_dir], Path(tmp) / "out_plots", plots=True), 1)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        def accumulate_one():
            accumulator = EventAccumulator(str(tb_dirs[0]), size_guidance={"scalars": 0})
            accumulator.Reload()
        one_job = timed(accumulate_one, 1)[0]

    events = args.logged_steps * len(TAGS) + 3
    print(f"{args.jobs} job directories ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
          f"writing them took {build_s:.2f} s")
    print(f"{with_events} jobs with TensorBoard events: {events} scalars per job ({args.logged_steps} steps x "
          f"{len(TAGS)} tags + 3 eval), {statistics.mean(sizes) / 1e6:.1f} MB per file, {args.event_files} distinct "
          f"files hard-linked (writing them took {events_s:.1f} s); {points} points read per job")
    print(f"{'step':<18}{'median s':>10}{'min s':>10}{'max s':>10}{'jobs/s':>10}")
    for step, seconds in timings.items():
        median = statistics.median(seconds)
        print(f"{step:<18}{median:>10.3f}{min(seconds):>10.3f}{max(seconds):>10.3f}{args.jobs / median:>10.0f}")
    print(f"EventAccumulator (every event) on one job's events: {one_job:.2f} s, x {with_events} jobs = "
          f"{one_job * with_events:.0f} s; bounded reading of all {with_events} jobs: {timings['curves'][0]:.1f} s "
          f"({one_job * with_events / timings['curves'][0]:.0f}x less)")

    report = {"benchmark": "gather_results", "jobs": args.jobs, "repeats": args.repeats, "statuses": counts,
              "events": {"jobs_with_events": with_events, "scalars_per_job": events, "bytes_per_file": sizes,
                         "points_read_per_job": points, "event_accumulator_one_job_s": one_job},
              "python": platform.python_version(), "machine": platform.machine(),
              "seconds": {step: {"median": statistics.median(s), "min": min(s), "max": max(s), "all": s}
                          for step, s in timings.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
