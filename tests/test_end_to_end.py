"""End to end on real CIFAR-10: pretraining must beat the randomly initialised network.

Both runs go through the real command line (`python -m mtssl.run`) with the same config; the
only difference is `train.epochs`. This proves learning, not just running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.first]  # ~4-8 minutes on one thread: started early (tests/conftest.py)

# The README quick start (regime=cpu: ResNet-18 with the last BN gamma at 0, a 2,500-image subset, batch 128,
# MoCo v3 at temperature 0.2) on a shorter schedule, so that CI checks that its recipe learns.
E2E = [
    "method=mocov3", "views=global_local_cutout", "predictor=separate", "backbone=resnet18", "data=cifar10",
    "regime=cpu", "train.log_every_steps=5", "monitor.knn_every_epochs=null",
]
EPOCHS = 4
SUBSET = 2500  # regime=cpu's data.subset
# Measured on CPU (deterministic at a fixed thread count and host, not across them): random init kNN top-1 /
# linear 19.35 / 21.3 (1 thread), 19.3 / 21.3 (2 threads); after 4 epochs (76 steps; a schedule this short
# learns less than the quick start's first 4 of 20 epochs) 22.9 / 28.0 (1 thread), 23.1 / 27.65 (2 threads),
# linear 26.0 on another CI host. The margins sit below the smallest gains seen (+3.55 kNN, +4.7 linear).
KNN_MARGIN = 2.5
LINEAR_MARGIN = 3.0


def run(out_dir, root, *overrides):
    """One job on one thread: beside the suite's other worker, two threads on 2 cores would oversubscribe them
    (CI measured 560 s for this test so), and the margins below were measured on one thread."""
    cmd = [sys.executable, "-m", "mtssl.run", *E2E, f"data.root={root}", f"out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out_dir / "results.json").read_text())


def test_pretraining_beats_random_init(tmp_path, cifar_root):
    baseline = run(tmp_path / "random_init", cifar_root, "train.epochs=0")
    trained = run(tmp_path / "pretrained", cifar_root, f"train.epochs={EPOCHS}")
    for result in (baseline, trained):
        assert result["status"] == "completed"
        assert {"knn_top1", "knn_top5", "knn_top1_target", "linear_top1", "linear_top5", "weights_sha256"} <= result.keys()
    assert baseline["steps"] == 0 and trained["steps"] == EPOCHS * (SUBSET // 128)
    assert set(trained["final_losses"]) == {"loss", "loss_global", "loss_local", "loss_cutout"}
    assert trained["knn_top1"] >= baseline["knn_top1"] + KNN_MARGIN, (baseline["knn_top1"], trained["knn_top1"])
    assert trained["linear_top1"] >= baseline["linear_top1"] + LINEAR_MARGIN, (baseline["linear_top1"], trained["linear_top1"])

    out = tmp_path / "pretrained"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["name"] == "mocov3" and config["views"]["types"]["local"]["size"] == 16
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "backbone.pth").stat().st_size > 1_000_000
