"""The evaluation items of the new-user catalogue (issue 29): what `python -m mtssl.eval` and the end-of-training
kNN did wrong for a first-time user, each with the behaviour asked for.

The jobs here are finished job folders written directly (config.yaml, backbone.pth, results.json of a random
one-block-per-stage ResNet-18 with the ImageNet stem, on 32 px images), not trained: what is tested is the
evaluation, in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtssl.config import ConfigError, compose_config, resolve_config
from mtssl.distributed.fsdp import state_sha256
from mtssl.distributed.process_group import DistEnv
from mtssl.eval.end_of_training import _frozen_backbone, eval_transform, evaluate_states, evaluation_samples
from mtssl.eval.features import extract_features
from mtssl.eval.knn import knn_classify
from mtssl.job_folder import BACKBONE_EXPORT, CONFIG, RESULTS, JobStatus, write_results
from mtssl.model.siamese import backbone_kwargs, build_backbone
from tests.support.data import make_image_folder

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["backbone=resnet18", "+backbone.kwargs.layers=[1,1,1,1]", "data.small_images=false", "data.subset=null",
        "train.batch_size=8", "train.epochs=0", "data.num_workers=0", "method.projector.hidden_dims=[64]",
        "method.predictor.hidden_dims=[64]", "eval.linear_epochs=1", "eval.batch_size=32", "eval.linear_lrs=[0.1]"]


def tiny_config(root: Path, out_dir: Path, *overrides: str):
    return resolve_config(compose_config([f"data.root={root}", f"out_dir={out_dir}", *TINY, *overrides]))


def finished_job(tmp_path: Path, root: Path, *overrides: str) -> tuple[Path, dict]:
    """A completed job folder as `python -m mtssl.run` leaves it (random weights, placeholder metrics)."""
    out = tmp_path / "job"
    out.mkdir()
    cfg = tiny_config(root, out, *overrides)
    (out / CONFIG).write_text(OmegaConf.to_yaml(cfg))
    torch.manual_seed(0)
    online = build_backbone(cfg.backbone.timm_name, small_images=False, **backbone_kwargs(cfg.backbone)).state_dict()
    torch.save({"backbone": cfg.backbone.timm_name, "state_dict": online}, out / BACKBONE_EXPORT)
    placeholder = {"top1": 1.0, "top5": 2.0}
    write_results(out, {"status": JobStatus.COMPLETED.value, "steps": 0, "weights_sha256": state_sha256(online),
                        "knn": {"k20": placeholder}, "knn_top1": 1.0, "knn_target": {"k20": placeholder},
                        "knn_top1_target": 1.0, "linear": {"frozen_features": {**placeholder, "lr": 0.1}},
                        "linear_top1": 1.0})
    return out, online


def test_item02_headline_knn_is_k20_whatever_else_is_asked(tmp_path):
    """eval.knn_k=[10,20,50]: knn_top1 is the k=20 kNN (it was the largest k), every k is under knn; with
    eval.knn_k=[10,50] k=20 is computed all the same. Compared with the plain kNN of the same features (three
    extractions of 60 + 60 images: ~8 s)."""
    root = make_image_folder(tmp_path / "data", classes=3, per_class=20)
    cfg = tiny_config(root, tmp_path, "eval.knn_k=[10,20,50]")
    torch.manual_seed(1)  # a network whose k=20 and k=50 kNN differ on these images
    state = build_backbone(cfg.backbone.timm_name, small_images=False, **backbone_kwargs(cfg.backbone)).state_dict()
    fields = evaluate_states(cfg, ENV, state, None, None, tmp_path)

    train, val = evaluation_samples(cfg, None)
    from mtssl.data.image_folder import EvalImageFolder

    backbone = _frozen_backbone(cfg, state, torch.device("cpu"))
    features = [extract_features(backbone, EvalImageFolder(s, eval_transform(cfg)), 32) for s in (train, val)]
    expected = knn_classify(*features[0], *features[1], num_classes=3, ks=(10, 20, 50))
    assert expected["k20"]["top1"] != expected["k50"]["top1"]  # the data tell the two apart
    assert set(fields["knn"]) == {"k10", "k20", "k50"}
    assert fields["knn"]["k50"]["top1"] == pytest.approx(expected["k50"]["top1"])
    assert (fields["knn_top1"], fields["knn_top5"]) == pytest.approx((expected["k20"]["top1"], expected["k20"]["top5"]))
    assert fields["knn_top1_target"] == fields["knn_top1"] and fields["knn_headline_k"] == 20

    without_20 = tiny_config(root, tmp_path, "eval.knn_k=[10,50]")
    fields = evaluate_states(without_20, ENV, state, None, None, tmp_path)
    assert set(fields["knn"]) == {"k10", "k20", "k50"}
    assert fields["knn_top1"] == pytest.approx(expected["k20"]["top1"])


def test_item03_reevaluation_keeps_results_it_did_not_recompute(tmp_path, eval_cli):
    """An earlier re-evaluation wrote the augmented probe and k=50; a re-evaluation with other settings (bf16
    features, the default protocols and ks) replaces what it recomputes and keeps those."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    out, _ = finished_job(tmp_path, root)
    before = json.loads((out / RESULTS).read_text())
    augmented = {"top1": 55.0, "top5": 100.0, "lr": 0.005, "epochs": 100, "best_top1": 56.0}
    before["linear"]["augmented"] = augmented
    before["knn"]["k50"] = {"top1": 42.0, "top5": 100.0}
    write_results(out, before)

    assert eval_cli([str(out), "eval.feature_dtype=bf16", "eval.knn_k=[3,20]"]) == 0
    after = json.loads((out / RESULTS).read_text())
    assert after["linear"]["augmented"] == augmented
    assert after["knn"]["k50"] == {"top1": 42.0, "top5": 100.0}
    assert set(after["knn"]) == {"k3", "k20", "k50"} and after["knn"]["k20"] != before["knn"]["k20"]  # recomputed
    assert after["linear"]["frozen_features"] != before["linear"]["frozen_features"]
    # The headlines follow the merged entries: the new k=20 kNN, the new frozen-features probe.
    assert after["knn_top1"] == after["knn"]["k20"]["top1"]
    assert after["linear_top1"] == after["linear"]["frozen_features"]["top1"]
    assert after["eval_config"]["feature_dtype"] == "bf16" and after["steps"] == 0


def test_item08_truncated_backbone_export_is_a_clear_error(tmp_path, eval_cli, capsys):
    """A truncated backbone.pth: exit 2, a message naming the file and what to do (no torch.load traceback)."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    out, _ = finished_job(tmp_path, root, "eval.knn_k=[3]")
    data = (out / BACKBONE_EXPORT).read_bytes()
    (out / BACKBONE_EXPORT).write_bytes(data[: len(data) // 2])
    assert eval_cli([str(out)]) == 2
    logged = capsys.readouterr().err
    assert "Traceback" not in logged
    assert f"ERROR mtssl: {out / BACKBONE_EXPORT} (" in logged and "truncated" in logged and "copy" in logged


def test_item09_knn_k_larger_than_the_bank_is_refused_before_training(tmp_path):
    """eval.knn_k=[500] with a 200-image bank (data.subset=200): validate_config refuses it, naming eval.knn_k,
    the bank size and the fix; eval.train_subset sets the bank when given."""
    from mtssl.config.validate import validate_config

    root = make_image_folder(tmp_path / "data", classes=2, per_class=110, size=8)
    cfg = tiny_config(root, tmp_path / "job", "data.subset=200", "eval.knn_k=[500]")
    with pytest.raises(ConfigError, match=r"eval\.knn_k: k=500 exceeds the 200 images .*data\.subset"):
        validate_config(cfg)
    cfg = tiny_config(root, tmp_path / "job", "data.subset=200", "eval.train_subset=30", "eval.knn_k=[50]")
    with pytest.raises(ConfigError, match=r"eval\.knn_k: k=50 exceeds the 30 images .*eval\.train_subset"):
        validate_config(cfg)
    validate_config(tiny_config(root, tmp_path / "job", "data.subset=200", "eval.knn_k=[200]"))  # fits
    assert not (tmp_path / "job").exists()


def test_item14_eval_help_exits_0_with_a_usage(eval_cli, capsys):
    """`python -m mtssl.eval --help`: exit 0, what it evaluates, the main overrides and where the docs are."""
    assert eval_cli(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("usage: python -m mtssl.eval", "results.json", "eval.knn_k", "eval.linear_protocols",
                   "eval.feature_dtype", "docs/evaluation.md"):
        assert needle in text, needle
