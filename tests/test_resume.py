"""Exact resume: a real signal to real rank processes, then a rerun, gives the same weights.

Each job runs as 2 ranks of ``python -m mtssl.run`` (like 2 SLURM tasks) on a tiny folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.data import make_image_folder
from tests.support.jobs import TINY_RESNET
from tests.support.ranks import free_port, rank_env

# One worker for the module under xdist: its tests share the uninterrupted reference run (a module fixture).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]

# The tiny ResNet (tests/support/jobs.py): the resume logic does not depend on the size.
TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=3", "data.num_workers=0", *TINY_RESNET,
    "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]",
    "train.log_every_steps=1", "train.checkpoint_every_steps=4",
    "eval.linear_epochs=2", "eval.knn_k=[3,5]", "eval.batch_size=16", "eval.linear_lrs=[0.1]",
]
TOTAL_STEPS = 12  # 2 classes x 16 images / batch 8 = 4 steps per epoch, 3 epochs


def start_job(root: Path, out_dir: Path, world_size: int, extra=(), own_group: bool = False) -> list[subprocess.Popen]:
    """Start the ranks; ``own_group``: all in one new process group, as a terminal's foreground job (Ctrl-C
    reaches every process in it, DataLoader workers included)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, **rank_env(rank, world_size, port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "mtssl.run", f"data.root={root}", f"out_dir={out_dir}", *TINY, *extra]
        log = open(out_dir.parent / f"{out_dir.name}.rank{rank}.log", "a")
        group = {"process_group": procs[0].pid if procs else 0} if own_group else {}
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **group))
    return procs


def wait(procs, timeout=600) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def results(out_dir: Path) -> dict:
    return json.loads((out_dir / "results.json").read_text())


def logged_steps(out_dir: Path) -> list[int]:
    text = (out_dir / "train.log").read_text() if (out_dir / "train.log").exists() else ""
    return [int(m) for m in re.findall(r"step (\d+)/\d+ epoch", text)]


def wait_for_step(procs, out_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while not any(s >= step for s in logged_steps(out_dir)):
        assert time.monotonic() < deadline, "training never reached the step"
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.05)


def interrupt_at(procs, out_dir: Path, step: int, ranks=(0, 1)) -> None:
    """Send SIGUSR2 (SLURM's warning signal) once training has logged ``step``."""
    wait_for_step(procs, out_dir, step)
    for r in ranks:
        procs[r].send_signal(signal.SIGUSR2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("resume") / "data", classes=2, per_class=16)


@pytest.fixture(scope="module")
def finished_dir(data_root, tmp_path_factory) -> Path:
    """The out_dir of an uninterrupted 2-rank run (reruns of it must leave it as it is)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert wait(start_job(data_root, out, 2)) == [0, 0]
    return out


@pytest.fixture(scope="module")
def uninterrupted(finished_dir):
    return results(finished_dir)


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
    train_log = (out / "train.log").read_bytes()
    procs = start_job(data_root, out, 1, extra=["train.seed=1"])
    assert wait(procs) == [2]
    log = (out.parent / f"{out.name}.rank0.log").read_text()  # its console: a refused run writes nothing in out_dir
    assert "holds a checkpoint" in log and "of a different training config: train.seed: 0 → 1." in log
    assert (out / "train.log").read_bytes() == train_log
    assert not (out / "results.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 0  # still its checkpoints' config


# ---------------------------------------------------------------------------------------------------------------
# Rerunning a finished out_dir


def rerun_log(data_root: Path, out_dir: Path, extra=()) -> tuple[int, str]:
    """Rerun a job in out_dir on one rank; its exit code and what it printed (its console log: a refused rerun
    writes nothing in out_dir, train.log included)."""
    console = out_dir.parent / f"{out_dir.name}.rank0.log"
    before = len(console.read_text()) if console.exists() else 0
    train_log = (out_dir / "train.log").read_bytes() if (out_dir / "train.log").exists() else None
    [code] = wait(start_job(data_root, out_dir, 1, extra=extra))
    if code != 0:
        assert ((out_dir / "train.log").read_bytes() if (out_dir / "train.log").exists() else None) == train_log
    return code, console.read_text()[before:]


@pytest.mark.parametrize("extra, fields", [
    (["train.seed=5"], ["train.seed: 0 → 5"]),
    (["method=simsiam", "train.epochs=7"], ["method.name: byol → simsiam", "train.epochs: 3 → 7"]),
])
def test_finished_job_rerun_with_a_changed_training_field_is_refused(data_root, finished_dir, extra, fields):
    before = (finished_dir / "results.json").read_bytes(), (finished_dir / "config.yaml").read_bytes()
    code, log = rerun_log(data_root, finished_dir, extra)
    assert code == 2
    assert f"{finished_dir} holds final results (results.json status completed) of a different training config" in log
    assert all(field in log for field in fields), log
    assert "Use a new out_dir" in log and "nothing to do" not in log
    assert ((finished_dir / "results.json").read_bytes(), (finished_dir / "config.yaml").read_bytes()) == before


def test_finished_job_rerun_with_a_changed_non_training_field_has_nothing_to_do(data_root, finished_dir):
    before = (finished_dir / "results.json").read_bytes()
    code, log = rerun_log(data_root, finished_dir, ["eval.knn_k=[3]", "train.log_every_steps=2", "data.num_workers=1"])
    assert code == 0
    assert "already holds final results of this training config (status completed): nothing to do" in log
    assert (finished_dir / "results.json").read_bytes() == before


def test_finished_run_cut_short_by_max_steps_trains_on_when_rerun_without_it(data_root, uninterrupted, tmp_path):
    out = tmp_path / "max_steps"
    assert wait(start_job(data_root, out, 2, extra=["train.max_steps=5"])) == [0, 0]
    assert results(out)["status"] == "completed" and results(out)["steps"] == 5
    assert wait(start_job(data_root, out, 2)) == [0, 0]
    assert "cut short at train.max_steps=5; training on" in (out / "train.log").read_text()
    assert results(out)["steps"] == TOTAL_STEPS
    assert results(out)["weights_sha256"] == uninterrupted["weights_sha256"]


def test_finished_job_of_an_older_version_is_compared_by_its_config_yaml(data_root, finished_dir, tmp_path):
    """results.json written before it recorded config_hash: the fields of out_dir/config.yaml decide."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(finished_dir / "config.yaml", old / "config.yaml")
    legacy = {k: v for k, v in results(finished_dir).items() if not k.startswith("config_hash")}
    (old / "results.json").write_text(json.dumps(legacy))
    (old / "train.log").write_text("")
    code, log = rerun_log(data_root, old, ["train.batch_size=16"])
    assert code == 2 and "train.batch_size: 8 → 16" in log
    code, log = rerun_log(data_root, old)
    assert code == 0 and "nothing to do" in log


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_checkpoints_and_the_rerun_resumes_bitwise(data_root, uninterrupted, tmp_path):
    """SIGINT to the whole process group (both ranks and their DataLoader workers), as a terminal sends it."""
    out = tmp_path / "ctrl_c"
    procs = start_job(data_root, out, 2, extra=["data.num_workers=1"], own_group=True)
    wait_for_step(procs, out, random.Random().randint(2, TOTAL_STEPS - 3))
    os.killpg(procs[0].pid, signal.SIGINT)
    assert wait(procs) == [3, 3]
    assert "stopped on SIGINT at step" in (out / "train.log").read_text()
    assert not (out / "results.json").exists()
    assert wait(start_job(data_root, out, 2)) == [0, 0]
    resumed = results(out)
    assert resumed["steps"] == TOTAL_STEPS
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["final_losses"] == uninterrupted["final_losses"]


def test_a_second_ctrl_c_aborts_at_once(data_root, tmp_path):
    out = tmp_path / "ctrl_c_twice"
    [proc] = start_job(data_root, out, 1, extra=["data.num_workers=1"], own_group=True)
    wait_for_step([proc], out, 2)
    os.killpg(proc.pid, signal.SIGINT)
    rank_log = out.parent / f"{out.name}.rank0.log"
    deadline = time.monotonic() + 30
    while "press Ctrl-C again" not in rank_log.read_text():  # the first one was seen
        assert proc.poll() is None and time.monotonic() < deadline, rank_log.read_text()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    assert proc.wait(timeout=30) == -signal.SIGINT  # killed by the signal's default action: no stop checkpoint
    assert time.monotonic() - sent < 5
    assert "stopped on SIGINT" not in (out / "train.log").read_text()


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
