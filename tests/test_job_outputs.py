"""What a finished job leaves behind: only files of the job folder, results.json's fields, progress.json, its
timings per phase, and only the final checkpoint when asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mtssl.job_folder as job_folder
from mtssl.job_folder import Results, read_progress
from tests.support.data import make_image_folder
from tests.support.jobs import TINY_RESNET

pytestmark = pytest.mark.slow

TINY = ["data=cifar10", "data.download=false", "data.subset=null", "data.num_workers=0", "train.device=cpu",
        "train.batch_size=8", "train.epochs=2", "train.log_every_steps=1", "train.checkpoint_every_steps=1",
        "method.projector.hidden_dims=[32]", "method.predictor.hidden_dims=[32]", *TINY_RESNET,
        "views=global", "eval.linear_epochs=1", "eval.knn_k=[3]", "eval.batch_size=16", "eval.linear_lrs=[0.1]"]


def test_final_checkpoint_only_and_timings_per_phase(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=8)  # 16 images / batch 8 x 2 epochs = 4 steps
    out = tmp_path / "job"
    command = [sys.executable, "-m", "mtssl.run", *TINY, f"data.root={root}", f"out_dir={out}",
               "train.final_checkpoint_only=true"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # Every file is one the job folder names, and every results.json field one its schema lists.
    known = {v for k, v in vars(job_folder).items() if k.isupper() and isinstance(v, str)}
    assert {p.name for p in out.iterdir()} <= known, sorted(p.name for p in out.iterdir())
    assert set(results) <= set(Results.__annotations__), sorted(set(results) - set(Results.__annotations__))
    # progress.json: the last logging step is the last step (logged every step), its loss results.json's.
    progress = read_progress(out)
    assert (progress["starts"], progress["step"], progress["total_steps"], progress["epoch"]) == (1, 4, 4, 2)
    assert progress["loss"] == results["final_losses"]["loss"] and progress["images_per_s"] > 0
    assert results["status"] == "completed" and results["steps"] == 4
    # Checkpoints were written at steps 1..4 and the newest 2 kept while training; only the final one remains.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]
    assert results["train_time_s"] > 0 and results["eval_time_s"] > 0
    assert results["wall_time_s"] == pytest.approx(results["train_time_s"] + results["eval_time_s"])
    # Running the finished job again does nothing but counts as a start (a requeue or relaunch would).
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert read_progress(out)["starts"] == 2 and json.loads((out / "results.json").read_text()) == results
