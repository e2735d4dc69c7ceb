"""What a finished job leaves behind: its timings per phase, and only the final checkpoint when asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.data import make_image_folder

pytestmark = pytest.mark.slow

TINY = ["data=cifar10", "data.download=false", "data.subset=null", "data.num_workers=0", "train.device=cpu",
        "train.batch_size=8", "train.epochs=2", "train.log_every_steps=1", "train.checkpoint_every_steps=1",
        "method.projector.hidden_dims=[32]", "method.predictor.hidden_dims=[32]", "+backbone.kwargs.layers=[1,1,1,1]",
        "views=global", "eval.linear_epochs=1", "eval.knn_k=[3]", "eval.batch_size=16", "eval.linear_lrs=[0.1]"]


def test_final_checkpoint_only_and_timings_per_phase(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=8)  # 16 images / batch 8 x 2 epochs = 4 steps
    out = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "mtssl.run", *TINY, f"data.root={root}", f"out_dir={out}",
                           "train.final_checkpoint_only=true"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 4
    # Checkpoints were written at steps 1..4 and the newest 2 kept while training; only the final one remains.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]
    assert results["train_time_s"] > 0 and results["eval_time_s"] > 0
    assert results["wall_time_s"] == pytest.approx(results["train_time_s"] + results["eval_time_s"])
