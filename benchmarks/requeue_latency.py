"""Requeue latency on the local SLURM cluster: from the preemption signal to training steps running again.

One 2-rank job of a one-job sweep (``python sweeps/launch.py ... launcher=slurm cluster=local``) trains a
small ResNet on CIFAR-10 with no periodic checkpoints. Each time it has run a few steps, this script
preempts it the way a cluster does: a job on the ``high`` partition that needs every CPU of the node.
SLURM sends SIGUSR2 (``preempt_send_user_signal``); the job finishes its step, writes a checkpoint and is
requeued; the preempting job runs (``sleep 1``); the requeued job resumes. Every stage is read from the
job's own train.log (dated, millisecond timestamps, the same clock as this script):

  trigger -> signal            SLURM: the high job is submitted, the scheduler preempts, the signal arrives
  signal -> checkpoint         mtssl: finish the step in flight, all ranks agree, write the checkpoint
  checkpoint -> slurm start    submitit requeues; the preempting job runs; SLURM starts the job again
                               (from sacct, whole seconds)
  slurm start -> job started   Python start, imports, submitit unpickling the job
  checkpoint -> job started    the two above together (also without SLURM accounting)
  job started -> resumed       process group, model build, loading the checkpoint
  resumed -> first step        the first training step after the resume
  signal -> first step         the whole gap in training seen from the job

Lost work is the number of steps trained before the stop that the resumed run trains again (the
design gives 0: the checkpoint is written at the step boundary after the signal).

    bash slurm/start_local_cluster.sh                    # once: the one-node cluster
    python benchmarks/requeue_latency.py                 # 3 preemptions; --preemptions N for more

It never fails on a timing. Results: benchmarks/results/requeue_latency.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import yaml
from report import print_table, write_report

from mtssl.job_folder import TRAIN_LOG

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "requeue_latency.json"
STAGES = ["trigger_to_signal", "signal_to_checkpoint", "checkpoint_to_slurm_start", "slurm_start_to_job_started",
          "checkpoint_to_job_started", "job_started_to_resumed", "resumed_to_first_step", "signal_to_first_step"]

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \[rank 0\] \w+ [\w.]+: (.*)$")
STEP = re.compile(r"^step (\d+)/(\d+) epoch")
STOP = re.compile(r"^stopped on (\w+) at step (\d+) ([\d.]+) s after the signal")
RESUMED = re.compile(r"^resumed from .* \(step (\d+)\)")


def job_overrides(data_root: str | None, subset: int, epochs: int) -> list[str]:
    """A small CPU job (the ablation's fixed overrides): CIFAR-size ResNet with one block per stage, no periodic
    checkpoint."""
    overrides = [
        "data=cifar10", "data.subset=" + str(subset), "data.num_workers=0", "train.device=cpu",
        "train.batch_size=16", f"train.epochs={epochs}", "train.log_every_steps=1",
        "train.checkpoint_every_steps=100000", "train.checkpoint_every_min=1000",
        "method.projector.hidden_dims=[128]", "method.predictor.hidden_dims=[128]", "+backbone.kwargs.layers=[1,1,1,1]",
        "eval.linear_epochs=1", "eval.knn_k=[5]", "eval.linear_lrs=[0.1]",
    ]
    if data_root:
        overrides.append(f"data.root={data_root}")
    return overrides


# 2 ranks of 1 CPU per job.
BUDGET = {"name": "requeue_bench", "regime": "official",
          "resources": {"ranks_per_job": 2, "gpus": False, "hours_per_job": {"default": 0.5}}}


def read_events(log: Path) -> list[tuple[float, str]]:
    """(unix time, message) of every rank-0 line of train.log."""
    events = []
    for line in log.read_text().splitlines() if log.exists() else []:
        match = LINE.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            events.append((stamp, match.group(2)))
    return events


def count(events: list[tuple[float, str]], prefix: str) -> int:
    return sum(1 for _, message in events if message.startswith(prefix))


def steps_since_last_start(events: list[tuple[float, str]]) -> int:
    starts = [i for i, (_, message) in enumerate(events) if message.startswith("job started")]
    tail = events[starts[-1]:] if starts else []
    return sum(1 for _, message in tail if STEP.match(message))


def slurm_run_starts(events: list[tuple[float, str]]) -> list[float]:
    """Start time of every run of the job, oldest first, as SLURM accounted them ([] without sacct)."""
    job_ids = [m.rsplit(" ", 1)[-1] for _, m in events if m.startswith("job started")]
    if not job_ids or not job_ids[0].isdigit():
        return []
    out = subprocess.run(["sacct", "--jobs", job_ids[0], "--duplicates", "--allocations", "--noheader",
                          "--parsable2", "--format=Start"], capture_output=True, text=True)
    starts = []
    for line in out.stdout.split() if out.returncode == 0 else []:
        try:
            starts.append(datetime.strptime(line, "%Y-%m-%dT%H:%M:%S").timestamp())
        except ValueError:
            pass  # "Unknown": not started
    return starts


def cycles_from_log(events: list[tuple[float, str]], triggers: list[float], run_starts: list[float] = ()) -> list[dict]:
    """One row per stop on a signal: the stage durations and the steps trained twice.

    ``run_starts``: SLURM's start time of each run (see ``slurm_run_starts``); without them the
    SLURM/Python split of the restart is left out."""
    rows = []
    stops = [i for i, (_, message) in enumerate(events) if STOP.match(message)]
    for n, i in enumerate(stops):
        stop_time, message = events[i]
        signal_name, stop_step, age = STOP.match(message).groups()
        signal_time = stop_time - float(age)
        before = [int(STEP.match(m).group(1)) for _, m in events[:i] if STEP.match(m)]
        after = events[i + 1:]
        start = next((t for t, m in after if m.startswith("job started")), None)
        resumed = next(((t, int(RESUMED.match(m).group(1))) for t, m in after if RESUMED.match(m)), None)
        first = next((t for t, m in after if STEP.match(m)), None)
        if start is None or resumed is None or first is None:
            continue  # the run after this stop has not reached its first step
        trigger = triggers[n] if n < len(triggers) else None
        slurm_start = run_starts[n + 1] if n + 1 < len(run_starts) else None
        rows.append({
            "signal": signal_name,
            "stopped_at_step": int(stop_step),
            "resumed_at_step": resumed[1],
            "steps_lost": max(before, default=0) - resumed[1],
            "trigger_to_signal": None if trigger is None else signal_time - trigger,
            "signal_to_checkpoint": stop_time - signal_time,
            "checkpoint_to_slurm_start": None if slurm_start is None else slurm_start - stop_time,
            "slurm_start_to_job_started": None if slurm_start is None else start - slurm_start,
            "checkpoint_to_job_started": start - stop_time,
            "job_started_to_resumed": resumed[0] - start,
            "resumed_to_first_step": first - resumed[0],
            "signal_to_first_step": first - signal_time,
        })
    return rows


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"], capture_output=True, text=True, check=True)
    return max(int(c) for c in out.stdout.split())


def preempt(workdir: Path) -> float:
    """Submit a high-partition job needing every CPU of the node; return when it was submitted."""
    submitted = time.time()
    subprocess.run(["sbatch", "--parsable", "--partition=high", f"--cpus-per-task={node_cpus()}",
                    f"--output={workdir / 'high-%j.out'}", "--wrap", "sleep 1"],
                   capture_output=True, text=True, check=True)
    return submitted


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo is not installed"
    out = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True)
    if out.returncode != 0:
        return f"the SLURM controller does not answer ({out.stderr.strip()})"
    partitions = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True).stdout.split()
    return None if "high" in partitions else "no 'high' partition to preempt from"


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for stage in STAGES:
        values = [r[stage] for r in rows if r[stage] is not None]
        if values:
            summary[stage] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    return summary


def print_rows(rows: list[dict], summary: dict) -> None:
    cells = [[stage.replace("_", " "), f"{v['median_s']:.2f}", f"{v['min_s']:.2f}", f"{v['max_s']:.2f}"] for stage, v in summary.items()]
    print_table(f"Requeue after preemption on the local SLURM cluster ({len(rows)} preemptions; seconds)",
                ["stage", "median", "min", "max"], cells)
    print(f"steps trained twice: {[r['steps_lost'] for r in rows]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preemptions", type=int, default=3)
    parser.add_argument("--steps-between", type=int, default=5, help="training steps after each (re)start before preempting")
    parser.add_argument("--data-root", help="ImageFolder root (default: the cifar10 preset's, $MTSSL_DATA_ROOT)")
    parser.add_argument("--subset", type=int, default=640, help="training images")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the sweep directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    problem = cluster_problem()
    if problem:
        print(f"requeue_latency: {problem}; start the local cluster with: bash slurm/start_local_cluster.sh", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="mtssl-requeue-"))
    config_dir, sweep_dir = workdir / "conf", workdir / "sweep"
    (config_dir / "ablation").mkdir(parents=True)
    (config_dir / "budget").mkdir()
    ablation = {"name": "requeue",
                "fixed": ["method=byol", "views=global_local_cutout",
                          *job_overrides(args.data_root, args.subset, args.epochs)],
                "axes": {"predictor": ["separate"]}, "seeds": [0]}
    (config_dir / "ablation" / "requeue.yaml").write_text(yaml.safe_dump(ablation))
    (config_dir / "budget" / "requeue_bench.yaml").write_text(yaml.safe_dump(BUDGET))
    name = f"mtssl-requeue-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, str(REPO / "sweeps" / "launch.py"), "--config-dir", str(config_dir),
               "ablation=requeue", "budget=requeue_bench", f"sweep_dir={sweep_dir}", "poll_s=1",
               "tables.plots=false", "launcher=slurm", "cluster=local", f"launcher.name={name}"]
    log = sweep_dir / "predictor=separate" / TRAIN_LOG
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_until(condition, what: str) -> None:
        deadline = time.monotonic() + 600
        while not condition(read_events(log)):
            if launcher.poll() is not None:
                raise RuntimeError(f"the sweep ended while waiting for {what} (raise --epochs?):\n{launcher.stdout.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited 600 s for {what}; see {log}")
            time.sleep(0.1)

    triggers: list[float] = []
    try:
        for n in range(args.preemptions):
            wait_until(lambda events: count(events, "job started") == n + 1
                       and steps_since_last_start(events) >= args.steps_between, f"run {n + 1} to train")
            triggers.append(preempt(workdir))
            print(f"preemption {n + 1} triggered", file=sys.stderr)
            wait_until(lambda events: sum(1 for _, m in events if STOP.match(m)) == n + 1, f"stop {n + 1}")
        wait_until(lambda events: len(cycles_from_log(events, triggers)) == len(triggers), "the last resume")
    finally:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True)
        launcher.terminate()
        launcher.wait(timeout=60)

    events = read_events(log)
    rows = cycles_from_log(events, triggers, slurm_run_starts(events))
    summary = summarise(rows)
    print_rows(rows, summary)
    write_report(args.out, "requeue_latency", argv,
                 machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, local SLURM cluster",
                 job="2 ranks x 1 CPU, BYOL ResNet (1 block/stage) on CIFAR-10 32 px, global batch 16",
                 preemptions=rows, summary=summary)
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
