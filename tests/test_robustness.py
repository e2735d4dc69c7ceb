"""A diverging run and an unreadable image end as recorded outcomes, not tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.data import make_image_folder
from tests.support.jobs import TINY_RESNET

pytestmark = pytest.mark.slow

# The tiny ResNet: what is asserted (a recorded divergence, the unreadable files counted) does not depend on its size.
TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=2", "data.num_workers=0", *TINY_RESNET,
    "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]", "train.log_every_steps=1",
    "eval.linear_epochs=2", "eval.knn_k=[3,5]", "eval.batch_size=16", "eval.linear_lrs=[0.1]",
]


def run(root, out_dir, *overrides):
    cmd = [sys.executable, "-m", "mtssl.run", f"data.root={root}", f"out_dir={out_dir}", *TINY, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_non_finite_loss_records_diverged(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)
    proc = run(root, tmp_path / "run", "optim.name=sgd", "optim.base_lr=1e30", "optim.warmup_epochs=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "diverged"
    assert "non-finite loss" in results["error"]
    assert results["steps"] < 4  # stopped early, not trained to the end


@pytest.mark.parametrize("pipeline", ["torchvision", "fast"])
def test_unreadable_image_is_skipped_and_counted(tmp_path, pipeline):
    root = make_image_folder(tmp_path / "data", per_class=8)
    broken = root / "train" / "class_0" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    # A valid header with half the data: it opens, and fails only when decoded (inside the fast
    # pipeline, which decodes the file itself).
    good = next((root / "train" / "class_1").glob("*.jpg")).read_bytes()
    truncated = root / "train" / "class_1" / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    # Met only by the evaluation (val split): counted once more, in the same list.
    val_broken = root / "val" / "class_0" / "broken.jpg"
    val_broken.write_bytes(b"not a jpeg either")
    # 18 images, 3 steps of 6 per epoch: every image is drawn in each of the 3 epochs, so each bad train file is met
    # (at least) 3 times: the count is of distinct files, not of skip events (6 or more).
    proc = run(root, tmp_path / "run", "train.epochs=3", "train.batch_size=6", f"data.pipeline={pipeline}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    # The train files are met again by the evaluation's feature extraction: still 3 distinct files.
    assert results["skipped_images"] == 3
    assert results["skipped_files"] == sorted([str(broken), str(truncated), str(val_broken)])
    assert results["eval_skipped_files"] == sorted([str(broken), str(truncated), str(val_broken)])
    assert "skipping unreadable image" in (proc.stdout + proc.stderr)
