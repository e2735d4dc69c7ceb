"""Exact resume: a real signal to real rank processes, then a rerun, gives the same weights.

Each job runs as 2 ranks of ``python -m mtssl.run`` (like 2 SLURM tasks) on a tiny folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image_folder

pytestmark = pytest.mark.slow

TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=3", "data.num_workers=0",
    "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]",
    "train.log_every_steps=1", "train.checkpoint_every_steps=4",
    "eval.linear_epochs=2", "eval.knn_k=[3,5]", "eval.batch_size=16", "eval.linear_lrs=[0.1]",
]
TOTAL_STEPS = 12  # 2 classes x 16 images / batch 8 = 4 steps per epoch, 3 epochs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(root: Path, out_dir: Path, world_size: int, extra=()) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "mtssl.run", f"data.root={root}", f"out_dir={out_dir}", *TINY, *extra]
        log = open(out_dir.parent / f"{out_dir.name}.rank{rank}.log", "a")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs, timeout=600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def results(out_dir: Path) -> dict:
    return json.loads((out_dir / "results.json").read_text())


def logged_steps(out_dir: Path) -> list[int]:
    text = (out_dir / "train.log").read_text() if (out_dir / "train.log").exists() else ""
    return [int(m) for m in re.findall(r"step (\d+)/\d+ epoch", text)]


def interrupt_at(procs, out_dir: Path, step: int, ranks=(0, 1)) -> None:
    """Send SIGUSR2 (SLURM's warning signal) once training has logged ``step``."""
    deadline = time.monotonic() + 300
    while not any(s >= step for s in logged_steps(out_dir)):
        assert time.monotonic() < deadline, "training never reached the step"
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.05)
    for r in ranks:
        procs[r].send_signal(signal.SIGUSR2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("resume") / "data", classes=2, per_class=16)


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert wait(start_job(data_root, out, 2)) == [0, 0]
    return results(out)


def test_interrupted_run_resumes_bitwise(data_root, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    stop_step = random.Random().randint(2, TOTAL_STEPS - 3)
    procs = start_job(data_root, out, 2)
    interrupt_at(procs, out, stop_step, ranks=(1,))  # one rank's flag is enough: ranks agree
    assert wait(procs) == [3, 3]
    assert not (out / "results.json").exists()
    assert wait(start_job(data_root, out, 2)) == [0, 0]
    resumed = results(out)
    assert resumed["status"] == "completed" and resumed["steps"] == TOTAL_STEPS
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"], f"stopped near step {stop_step}"
    assert resumed["final_losses"] == uninterrupted["final_losses"]
    assert resumed["knn_top1"] == uninterrupted["knn_top1"]


def test_truncated_newest_checkpoint_is_skipped(data_root, uninterrupted, tmp_path):
    out = tmp_path / "truncated"
    procs = start_job(data_root, out, 2)
    interrupt_at(procs, out, 9)  # periodic checkpoints at 4 and 8, then the stop checkpoint
    assert wait(procs) == [3, 3]
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 2
    newest = checkpoints[-1]
    shard = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    assert wait(start_job(data_root, out, 2)) == [0, 0]
    log = (out / "train.log").read_text()
    assert f"{newest} could not be loaded" in log
    assert results(out)["weights_sha256"] == uninterrupted["weights_sha256"]


def test_config_mismatch_is_refused(data_root, tmp_path):
    out = tmp_path / "mismatch"
    procs = start_job(data_root, out, 2)
    interrupt_at(procs, out, 2)
    assert wait(procs) == [3, 3]
    procs = start_job(data_root, out, 1, extra=["train.seed=1"])
    assert wait(procs) == [2]
    assert "was written by a different config" in (out / "train.log").read_text()
    assert not (out / "results.json").exists()


def test_resume_two_ranks_on_one(data_root, tmp_path):
    out = tmp_path / "two_to_one"
    procs = start_job(data_root, out, 2)
    interrupt_at(procs, out, 5)
    assert wait(procs) == [3, 3]
    stopped = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))[-1]
    assert wait(start_job(data_root, out, 1)) == [0]
    log = (out / "train.log").read_text()
    assert f"step_{stopped:08d} (step {stopped})" in log
    # The schedule continues where it stopped: the first resumed step logs the lr of that step.
    lr = re.search(rf"step {stopped + 1}/{TOTAL_STEPS} epoch \d+ loss \S+ \(.*?\) lr (\S+)", log.split("resumed from")[-1])
    before = re.search(rf"step {stopped + 1}/{TOTAL_STEPS} epoch \d+ loss \S+ \(.*?\) lr (\S+)", Path(out / "train.log").read_text())
    assert lr is not None and before is not None
    result = results(out)
    assert result["status"] == "completed" and result["steps"] == TOTAL_STEPS and result["world_size"] == 1
