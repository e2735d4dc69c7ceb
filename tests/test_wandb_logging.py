"""Weights & Biases logging (``logging.wandb=true``), read back from W&B's offline run files; no network.

The job test runs a real job (``python -m mtssl.run``), stops it with SLURM's warning signal and reruns it, as a
requeue does; the others check the scalar log in this process (the leak guard then checks that the job's
logger, not the test, put the process back), the TensorBoard purge on resume, the config checks and the sweep's
group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtssl.config import ConfigError
from mtssl.config.schema import check_fields
from mtssl.job_folder import TENSORBOARD, WANDB, last_checkpoint_step
from mtssl.train.scalar_logger import TensorBoardSink, open_scalar_logger, wandb_run_id
from tests.support.data import make_image_folder
from tests.support.jobs import job_config

pytest.importorskip("wandb")
from tests.support.wandb_files import offline_runs  # noqa: E402 (needs wandb's protobuf classes)

OFFLINE = ["logging.wandb=true", "logging.wandb_mode=offline", "logging.wandb_project=mtssl-test",
           "logging.wandb_group=the-sweep"]
LOG_EVERY, EPOCHS, STEPS_PER_EPOCH = 2, 3, 4  # 2 classes x 16 images / batch 8
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
JOB = ["data.subset=null", "data.num_workers=0", "train.batch_size=8", f"train.epochs={EPOCHS}",
       "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]",
       f"train.log_every_steps={LOG_EVERY}", "train.checkpoint_every_steps=4", "monitor.knn_every_epochs=1",
       "eval.linear_epochs=1", "eval.knn_k=[3]", "eval.batch_size=16", "eval.linear_lrs=[0.1]", *OFFLINE]


def start_job(root: Path, out: Path) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "mtssl.run", f"data.root={root}", f"out_dir={out}", *JOB],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT)


def wait_for_log_line(proc: subprocess.Popen, out: Path, text: str) -> None:
    deadline = time.monotonic() + 300
    while text not in ((out / "train.log").read_text() if (out / "train.log").exists() else ""):
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the job never logged " + text
        time.sleep(0.05)


def points(runs) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the runs' history rows (W&B's own keys, _step etc., left out)."""
    return [(tag, row["_step"], value) for run in runs for row in run.rows
            for tag, value in row.items() if not tag.startswith("_")]


@pytest.mark.slow
def test_a_stopped_and_resumed_job_logs_one_wandb_run(tmp_path):
    """Two starts of a tiny job (about 25 s each on 2 shared cores: interpreter, wandb's service, 12 steps, 3 kNN
    monitors and the evaluation): one run id, each scalar once at its step, the same scalars as TensorBoard, the
    config and the results."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=16)
    out = tmp_path / "job"
    proc = start_job(root, out)
    wait_for_log_line(proc, out, f"step {3 * LOG_EVERY}/{TOTAL_STEPS} epoch")
    proc.send_signal(signal.SIGUSR2)  # SLURM's warning before the time limit: checkpoint, exit 3, requeue
    assert proc.wait(timeout=300) == 3
    stopped = last_checkpoint_step(out)
    assert stopped is not None and stopped < TOTAL_STEPS
    assert start_job(root, out).wait(timeout=300) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == TOTAL_STEPS

    first, second = runs = offline_runs(out / WANDB)  # one offline folder per start
    cfg = OmegaConf.load(out / "config.yaml")
    assert {(r.run_id, r.project, r.group, r.name) for r in runs} == \
        {(wandb_run_id(cfg, out), "mtssl-test", "the-sweep", out.name)}

    # Each scalar once, at its step: the first start up to its stop checkpoint, the second after it.
    assert all(step <= stopped for _, step, _ in points([first]))
    assert all(step > stopped for _, step, _ in points([second]))
    logged = points(runs)
    assert len({(tag, step) for tag, step, _ in logged}) == len(logged), "a step logged twice"
    steps = {tag: sorted(step for t, step, _ in logged if t == tag) for tag, _, _ in logged}
    assert steps["train/loss"] == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    assert steps["monitor/rankme_global"] == steps["train/loss"]
    # Each epoch's kNN; one that a stop signal skipped at the stop step is not redone.
    epoch_ends = set(range(STEPS_PER_EPOCH, TOTAL_STEPS + 1, STEPS_PER_EPOCH))
    assert set(steps["eval/knn_top5"]) - {stopped} == epoch_ends - {stopped}
    assert steps["eval/linear_top1"] == [TOTAL_STEPS]

    # The same scalars as TensorBoard's events of the same job (float32 there).
    from analysis.events import read_scalars

    tensorboard = {(tag, int(s), v) for tag, frame in read_scalars(out / TENSORBOARD).items()
                   for s, v in zip(frame.step, frame.value)}
    wandb_points = {(tag, step, float(_float32(value))) for tag, step, value in logged}
    assert {p[:2] for p in wandb_points} == {p[:2] for p in tensorboard}
    assert wandb_points == tensorboard

    # The resolved config (config.yaml) and the final results.
    assert {k: v for k, v in second.config.items() if not k.startswith("_")} == OmegaConf.to_container(cfg)
    for key in ("status", "steps", "knn_top1", "linear_top1", "weights_sha256", "config_hash"):
        assert second.summary[key] == results[key], key
    assert first.preempting and first.exit_code == 0 and second.exit_code == 0


def _float32(value: float) -> float:
    import numpy as np

    return float(np.float32(value))


def test_the_logger_writes_rows_in_step_order_and_puts_the_process_back(tmp_path):
    """The monitors may report a step just after a later one (a probe's values wait for the next logging step,
    after an epoch's kNN): the open row accepts it; a step before the last written row is dropped."""
    out = tmp_path / "job"
    cfg = job_config(f"out_dir={out}", *OFFLINE)
    before = os.environ.get("WANDB_SERVICE"), sys.exit, sys.excepthook
    logger = open_scalar_logger(cfg, out, resume_step=None)
    assert len(logger.sinks) == 2
    for tag, value, step in [("train/loss", 2.0, 10), ("eval/knn_top1", 11.0, 32), ("monitor/cos_a_b", 0.5, 31),
                             ("train/loss", 1.5, 40), ("monitor/cos_a_b", 0.25, 20), ("eval/linear_top1", 9.0, 40)]:
        logger.add_scalar(tag, value, step)
    logger.log_results({"status": "completed", "knn_top1": 12.5})
    logger.close()
    assert (os.environ.get("WANDB_SERVICE"), sys.exit, sys.excepthook) == before

    [run] = offline_runs(out / WANDB)
    assert [(row["_step"], {k: v for k, v in row.items() if not k.startswith("_")}) for row in run.rows] == [
        (10, {"train/loss": 2.0}), (31, {"monitor/cos_a_b": 0.5}), (32, {"eval/knn_top1": 11.0}),
        (40, {"train/loss": 1.5, "eval/linear_top1": 9.0})]
    assert run.summary["knn_top1"] == 12.5 and run.summary["status"] == "completed" and run.exit_code == 0
    assert run.config["train"]["batch_size"] == cfg.train.batch_size


def test_a_resumed_tensorboard_log_keeps_the_checkpoint_step(tmp_path):
    """A resumed job logs again only after its checkpoint's step; the events at that step stay."""
    from analysis.events import read_scalars

    sink = TensorBoardSink(tmp_path, resume_step=None)
    for step in (2, 4, 6):
        sink.add_scalar("train/loss", float(step), step)
    sink.close()
    sink = TensorBoardSink(tmp_path, resume_step=4)  # stopped after step 6, checkpoint at 4: 6 is logged again
    for step in (6, 8):
        sink.add_scalar("train/loss", step + 0.5, step)
    sink.close()
    curve = read_scalars(tmp_path / TENSORBOARD)["train/loss"]
    assert list(zip(curve.step, curve.value)) == [(2, 2.0), (4, 4.0), (6, 6.5), (8, 8.5)]


def test_wandb_without_the_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from mtssl.run import EXIT_BAD_CONFIG, run_job

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importlib finds no module
    with pytest.raises(ConfigError, match=r"logging\.wandb: .*pip install -e '\.\[wandb\]'"):
        check_fields(job_config("logging.wandb=true"))
    check_fields(job_config("logging.wandb=false"))  # TensorBoard only needs nothing more
    out = tmp_path / "job"
    assert run_job(job_config(f"out_dir={out}", "logging.wandb=true")) == EXIT_BAD_CONFIG
    assert not out.exists()


@pytest.mark.parametrize("override, hint", [("logging.wandb_mode=cloud", "'offline'"),
                                            ("logging.wandb=yes", "true or false")])
def test_bad_wandb_fields_name_the_field(override, hint):
    with pytest.raises(ConfigError) as info:
        check_fields(job_config(override))
    assert override.split("=")[0] in str(info.value) and hint in str(info.value)


def test_wandb_fields_leave_the_training_config_alone():
    from mtssl.config import config_hash

    assert config_hash(job_config()) == config_hash(job_config(*OFFLINE))


def test_the_run_id_is_the_jobs(tmp_path):
    """One folder reached by two paths (a symlinked scratch space) is one job; another folder or training config
    is another; a field outside the training config (train.max_steps, eval.*) is the same job."""
    cfg = job_config()
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    run_id = wandb_run_id(cfg, tmp_path / "a")
    assert wandb_run_id(cfg, tmp_path / "link") == run_id
    assert wandb_run_id(job_config("train.max_steps=5", "eval.knn_k=[3]"), tmp_path / "a") == run_id
    assert wandb_run_id(cfg, tmp_path / "b") != run_id
    assert wandb_run_id(job_config("train.seed=1"), tmp_path / "a") != run_id
    assert len(run_id) <= 64 and run_id.replace("-", "").isalnum()  # W&B's limits on run ids


def test_a_run_that_cannot_start_leaves_tensorboard_and_a_warning(tmp_path, monkeypatch, caplog):
    """Online mode on a node without network (or login): wandb.init fails; the job trains on, TensorBoard only."""
    import wandb

    def no_network(**kwargs):
        raise wandb.errors.CommError("cannot reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", no_network)
    before = os.environ.get("WANDB_SERVICE"), sys.exit, sys.excepthook
    with caplog.at_level("WARNING", logger="mtssl.train.scalar_logger"):
        logger = open_scalar_logger(job_config(*OFFLINE, "logging.wandb_mode=online"), tmp_path, resume_step=None)
    logger.add_scalar("train/loss", 1.0, 1)
    logger.close()
    assert [type(s).__name__ for s in logger.sinks] == ["TensorBoardSink"]
    assert "cannot reach api.wandb.ai" in caplog.text and "logging.wandb_mode=offline" in caplog.text
    assert (os.environ.get("WANDB_SERVICE"), sys.exit, sys.excepthook) == before


def test_mode_disabled_logs_to_tensorboard_only(tmp_path):
    logger = open_scalar_logger(job_config(*OFFLINE, "logging.wandb_mode=disabled"), tmp_path, resume_step=None)
    logger.close()
    assert [type(s).__name__ for s in logger.sinks] == ["TensorBoardSink"] and not (tmp_path / WANDB).exists()


def test_a_sweep_names_the_group_of_its_jobs(tmp_path):
    from mtssl.job_folder import JobStatus
    from sweeps.grid import SweepJob
    from sweeps.launch import PlannedJob

    job = PlannedJob(SweepJob("predictor=shared", ("predictor=shared",)),
                     tmp_path / "ablation-budget" / "predictor=shared", JobStatus.PENDING, backbone="resnet18")
    assert "logging.wandb_group='ablation-budget'" in job.overrides
    own = PlannedJob(SweepJob("a", ("logging.wandb_group=mine",)), tmp_path / "s" / "a", JobStatus.PENDING, "resnet18")
    assert [o for o in own.overrides if o.startswith("logging.wandb_group")] == ["logging.wandb_group=mine"]
