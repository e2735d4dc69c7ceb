"""The end-of-training evaluation as phases: stop and resume give the uninterrupted results; `python -m mtssl.eval`
re-evaluates a finished job without touching its training fields."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.support.data import make_image_folder
from mtssl.config import compose_config, resolve_config
from mtssl.distributed.process_group import DistEnv
from mtssl.eval.end_of_training import EVAL_STATE, EvaluationInterrupted, evaluate_states
from mtssl.model.siamese import build_backbone

TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=0", "data.num_workers=0", "backbone=resnet18",
    "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]",
    "eval.linear_epochs=2", "eval.knn_k=[3,5]", "eval.batch_size=16", "eval.linear_lrs=[0.01,0.1]",
]
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class StopAfterFirstPhase:
    """A stop signal that arrives as the first phase finishes (its results are on disk): a stop within a phase
    stops it at its next batch, see tests/test_gpu_path_fixes.py."""

    signum = 10

    def __init__(self, out):
        self.out = out

    @property
    def requested(self) -> bool:
        return (self.out / EVAL_STATE).exists()


def _states(cfg):
    torch.manual_seed(0)
    online = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images).state_dict()
    torch.manual_seed(1)
    target = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images).state_dict()
    return online, target


def test_stopped_evaluation_resumes_to_the_uninterrupted_results(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=10)
    cfg = resolve_config(compose_config([f"data.root={root}", *TINY]))
    online, target = _states(cfg)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    uninterrupted = evaluate_states(cfg, ENV, online, target, None, tmp_path / "a")

    out = tmp_path / "b"
    with pytest.raises(EvaluationInterrupted):
        evaluate_states(cfg, ENV, online, target, None, out, stop=StopAfterFirstPhase(out))
    state = json.loads((out / EVAL_STATE).read_text())
    assert list(state["phases"]) == ["knn"] and state["phases"]["knn"] == uninterrupted["knn"]
    resumed = evaluate_states(cfg, ENV, online, target, None, out)
    assert resumed == json.loads(json.dumps(uninterrupted))  # results.json holds the JSON form

    # Other eval settings never reuse a finished phase: k=1 appears although "knn" was recorded (k=20: the headline).
    other = resolve_config(compose_config([f"data.root={root}", *TINY, "eval.knn_k=[1,5]"]))
    assert set(evaluate_states(other, ENV, online, target, None, out)["knn"]) == {"k1", "k5", "k20"}


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_reevaluate_a_finished_job_keeps_training_fields(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "job"
    proc = _run("-m", "mtssl.run", f"data.root={root}", f"out_dir={out}", *TINY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    before = json.loads((out / "results.json").read_text())

    refused = _run("-m", "mtssl.eval", str(out), "train.epochs=3")
    assert refused.returncode == 2 and "change the training config" in refused.stdout + refused.stderr

    proc = _run("-m", "mtssl.eval", str(out), "eval.knn_k=[1,5]", "eval.linear_lrs=[0.1]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = json.loads((out / "results.json").read_text())
    for key in ("status", "steps", "wall_time_s", "final_losses", "git_revision", "weights_sha256", "epochs"):
        assert after[key] == before[key], key
    assert set(after["knn"]) == {"k1", "k3", "k5", "k20"}  # k=3 of the job's own evaluation is kept
    assert after["knn"]["k5"] == before["knn"]["k5"]  # same network, same features: same k=5 result
    assert after["knn_target"]["k5"] == before["knn_target"]["k5"]
    assert after["linear"]["frozen_features"]["lr"] == after["linear_lr"] == 0.1
    assert after["eval_config"]["knn_k"] == [1, 5]


def test_each_linear_protocol_under_its_own_key(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=10)
    frozen_only = resolve_config(compose_config([f"data.root={root}", *TINY]))
    both = resolve_config(compose_config([f"data.root={root}", *TINY, "eval.linear_protocols=[frozen_features,augmented]",
                                          "eval.augmented_epochs=2", "eval.augmented_batch_size=8"]))
    online, target = _states(frozen_only)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = evaluate_states(frozen_only, ENV, online, target, None, tmp_path / "a")
    second = evaluate_states(both, ENV, online, target, None, tmp_path / "b")
    assert set(first["linear"]) == {"frozen_features"} and set(second["linear"]) == {"frozen_features", "augmented"}
    assert second["linear"]["frozen_features"] == first["linear"]["frozen_features"]  # the protocols are independent
    assert second["linear_top1"] == first["linear_top1"]  # the headline stays frozen_features
    augmented = second["linear"]["augmented"]
    assert augmented["epochs"] == 2 and augmented["best_epoch"] in (1, 2) and augmented["best_top1"] >= augmented["top1"]
    assert augmented["lr"] == pytest.approx(0.005 * 8 / 512)


@pytest.mark.parametrize(("override", "world_size", "field"), [
    ("eval.feature_dtype=fp8", 1, "eval.feature_dtype"),
    ("eval.linear_protocols=[frozen_features,augmnted]", 1, "eval.linear_protocols"),
    ("eval.augmented_epochs=0", 1, "eval.augmented_epochs"),
    ("eval.augmented_lr=0", 1, "eval.augmented_lr"),
    ("eval.augmented_batch_size=512", 3, "eval.augmented_batch_size"),
    ("eval.linear_batch_size=1", 1, "eval.linear_batch_size"),
])
def test_new_eval_fields_are_validated(tmp_path, override, world_size, field):
    from mtssl.config import ConfigError
    from mtssl.config.validate import validate_config

    cfg = resolve_config(compose_config([f"out_dir={tmp_path / 'job'}", "train.batch_size=12", override]))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(cfg, check_data=False, world_size=world_size)


@pytest.mark.slow
def test_sigterm_during_evaluation_exits_3_and_the_rerun_completes_as_uninterrupted(tmp_path):
    """A real SIGTERM to `python -m mtssl.run` once its evaluation started: exit 3 at the next batch, kNN block or
    epoch, and the rerun's results equal an uninterrupted evaluation of the same backbones."""
    root = make_image_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "job"
    # The augmented probe's epochs keep the evaluation running long enough for the signal to land inside it.
    augmented = ["eval.linear_protocols=[frozen_features,augmented]", "eval.augmented_epochs=30",
                 "eval.augmented_batch_size=8"]
    args = ["-m", "mtssl.run", f"data.root={root}", f"out_dir={out}", *TINY, *augmented]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (out / "backbone.pth").exists():  # written just before the evaluation phases start
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, output[-3000:]
    assert "evaluation stopped on signal 15" in output
    finished = json.loads((out / EVAL_STATE).read_text())["phases"] if (out / EVAL_STATE).exists() else {}
    assert "linear_augmented" not in finished
    assert not (out / "results.json").exists()

    rerun = _run(*args)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    cfg = resolve_config(compose_config([f"data.root={root}", *TINY, *augmented]))
    saved = torch.load(out / "backbone.pth")
    (tmp_path / "reference").mkdir()
    reference = evaluate_states(cfg, ENV, saved["state_dict"], saved["target_state_dict"], None, tmp_path / "reference")
    reference = json.loads(json.dumps(reference))
    for key in ("weights_sha256", "knn", "knn_target", "linear", "knn_top1", "linear_top1"):
        assert results[key] == reference[key], key
