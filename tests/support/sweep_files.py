"""Sweep and job folders written by hand, with known metrics, for the analysis and status tests."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.tables import build_tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def job_name(axes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in axes.items())


def write_sweep(sweep_dir: Path, ablation: str, jobs: list[dict], profile: str = "cpu_quick") -> None:
    """sweep.json listing one job per axes dict (the contract written by sweeps/launch.py)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = {"ablation": ablation, "profile": profile, "axes": list(jobs[0]),
            "jobs": [{"name": job_name(a), "overrides": [f"{k}={v}" for k, v in a.items()], "axes": a}
                     for a in jobs]}
    (sweep_dir / "sweep.json").write_text(json.dumps(spec))


def write_result(sweep_dir: Path, axes: dict, status: str = "completed", knn=None, linear=None, **extra) -> Path:
    """A finished job directory with results.json (config fields default to a resnet18 CIFAR-10 job)."""
    job_dir = sweep_dir / job_name(axes)
    job_dir.mkdir(parents=True, exist_ok=True)
    results = {"status": status, "method": "byol", "views": "global_local_cutout", "predictor": "separate",
               "backbone": "resnet18", "data": "cifar10", "seed": 0, "epochs": 2, "steps": 40,
               "knn_top1": knn, "knn_top5": None if knn is None else min(100.0, knn + 20),
               "knn_top1_target": knn, "linear_top1": linear, "linear_top5": None,
               "knn": {"k10": {"top1": knn, "top5": None}, "k20": {"top1": knn, "top5": None}},
               "final_losses": {"loss": 1.5, "loss_global": 1.0, "loss_local": 0.5},
               "wall_time_s": 12.5, "images_per_s": 300.0, "git_revision": "abc123", "world_size": 1}
    results.update({k: v for k, v in axes.items() if k != "seed"}, seed=int(axes.get("seed", 0)))
    results.update(extra)
    (job_dir / "results.json").write_text(json.dumps(results))
    return job_dir


def write_unfinished(sweep_dir: Path, axes: dict, checkpoint_steps=(20, 40)) -> Path:
    """A started job: config.yaml and checkpoints, no results.json yet."""
    job_dir = sweep_dir / job_name(axes)
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(
        "method:\n  name: {method}\npredictor:\n  name: {predictor}\ntrain:\n  seed: {seed}\n  epochs: 2\n".format(
            **{"method": "byol", "predictor": "separate", "seed": 0, **axes}))
    for step in checkpoint_steps:
        checkpoint = job_dir / "checkpoints" / f"step_{step:08d}"
        checkpoint.mkdir(parents=True)
        for part in (".metadata", "trainer_state.json", "buffers_rank0.pt"):
            (checkpoint / part).write_bytes(b"x")
    (job_dir / "checkpoints" / "step_00000060").mkdir()  # incomplete: nothing in it yet
    (job_dir / "checkpoints" / "step_00000060" / ".metadata").write_bytes(b"x")
    return job_dir


def write_events(job_dir: Path, scalars: dict[str, list[float]]) -> None:
    """Real TensorBoard event files: each tag logged at steps 0, 10, 20, ..."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(job_dir / "tb"))
    for tag, values in scalars.items():
        for i, value in enumerate(values):
            writer.add_scalar(tag, value, global_step=10 * i)
    writer.close()


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of a Markdown pipe table (header first, separator dropped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for i, line in enumerate(lines) if i != 1]


def only_table(frame: pd.DataFrame):
    tables, _ = build_tables(frame)
    assert len(tables) == 1
    return tables[0]
