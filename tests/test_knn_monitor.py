"""kNN during pretraining (``monitor.knn_every_epochs``, mtssl/eval/knn_monitor.py): it leaves training bitwise unchanged,
its last evaluation is the end-of-training kNN, a resumed run keeps the earlier evaluations, and 2 ranks give 1 rank's."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.support.data import make_image_folder
from tests.support.ranks import run_ranks, set_rank_env
from mtssl.config import ConfigError, compose_config, resolve_config
from mtssl.config.validate import validate_config
from mtssl.distributed.fsdp import full_state_dict, state_sha256
from mtssl.distributed.process_group import DistEnv, destroy_distributed, init_distributed
from mtssl.eval.features import extract_features
from mtssl.eval.end_of_training import eval_transform, evaluate_states
from mtssl.eval.knn import knn_classify
from mtssl.eval.knn_monitor import KNN_DURING_TRAINING, KnnMonitor
from mtssl.data.image_folder import EvalImageFolder, class_balanced_subset, list_image_folder
from mtssl.model.siamese import backbone_kwargs, build_backbone
from mtssl.distributed.preemption import StopRequest
from mtssl.train.trainer import Trainer

TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=2", "data.num_workers=0", "backbone=resnet18",
    "+backbone.kwargs.layers=[1,1,1,1]", "views=global",
    "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]", "method.projector.out_dim=32",
    "method.predictor.out_dim=32", "eval.linear_epochs=1", "eval.knn_k=[3,5]", "eval.batch_size=8",
    "eval.linear_lrs=[0.1]",
]
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))



def _config(root, *overrides):
    return resolve_config(compose_config([f"data.root={root}", *TINY, *overrides]))


def _fit(cfg, out_dir, with_monitor: bool):
    out_dir.mkdir(parents=True)
    trainer = Trainer(cfg, ENV, out_dir)
    monitor = KnnMonitor(cfg, ENV, trainer.model.online.backbone, trainer.train_samples, out_dir) if with_monitor else None
    stop = StopRequest()
    try:
        outcome = trainer.fit(stop, None, on_epoch_end=monitor)
    finally:
        stop.restore()
    return trainer, outcome, monitor


def test_knn_during_training_leaves_training_unchanged_and_ends_at_the_end_of_job_knn(single_process, tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)
    # The same val subset for the monitor and the end-of-training kNN (eval.* fields never change training).
    cfg = _config(root, "monitor.knn_every_epochs=1", "monitor.knn_val_subset=12", "eval.val_subset=12")
    plain = _config(root)
    watched, watched_outcome, monitor = _fit(cfg, tmp_path / "watched", with_monitor=True)
    unwatched, unwatched_outcome, _ = _fit(plain, tmp_path / "plain", with_monitor=False)

    assert state_sha256(full_state_dict(watched.model)) == state_sha256(full_state_dict(unwatched.model))
    assert watched_outcome.final_losses == unwatched_outcome.final_losses
    steps_per_epoch = watched.sampler.steps_per_epoch
    assert [(e["epoch"], e["step"]) for e in monitor.evaluations] == [(1, steps_per_epoch), (2, 2 * steps_per_epoch)]

    end = evaluate_states(cfg, ENV, full_state_dict(watched.model.online.backbone), None, watched.train_samples,
                          tmp_path / "watched")
    last = monitor.evaluations[-1]
    assert last["knn"] == end["knn"] and (last["top1"], last["top5"]) == (end["knn_top1"], end["knn_top5"])
    saved = json.loads((tmp_path / "watched" / KNN_DURING_TRAINING).read_text())
    assert saved["evaluations"] == json.loads(json.dumps(monitor.evaluations))
    fields = monitor.results(train_seconds=4 * monitor.seconds)
    # k: the headline's, 20, capped at the whole bank of 16 images (not the last of eval.knn_k=[3,5])
    assert (fields["every_epochs"], fields["k"], fields["val_images"], fields["train_images"]) == (1, 16, 12, 16)
    assert fields["share_of_training"] == pytest.approx(0.25)


def test_monitor_restores_modes_buffers_and_rng_and_matches_knn_by_hand(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)
    cfg = _config(root, "monitor.knn_every_epochs=2", "monitor.knn_train_subset=12",
                  "monitor.knn_val_subset=10")
    train_samples, _ = list_image_folder(root, "train")
    torch.manual_seed(3)
    # The config's backbone: the monitor evaluates an fp32 copy built from the config, as the end-of-job kNN.
    backbone = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))
    with torch.no_grad():  # BN statistics away from their initial values, so a reset or update would show
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    backbone.train()
    backbone.layer2.eval()  # a submodule in its own mode stays there
    buffers = copy.deepcopy(backbone.state_dict())
    monitor = KnnMonitor(cfg, ENV, backbone, train_samples, tmp_path)

    rng = torch.get_rng_state()
    monitor(1, 5)  # not due (every 2 epochs)
    assert monitor.evaluations == []
    monitor(2, 10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, buffers[k]) for k, v in backbone.state_dict().items())
    assert backbone.training and backbone.layer1.training and not backbone.layer2.training

    # By hand: the subsets, the eval transform and an eval-mode copy of the backbone, then the plain kNN.
    transform = eval_transform(cfg)
    bank = class_balanced_subset(train_samples, 12, cfg.data.subset_seed)
    val = class_balanced_subset(list_image_folder(root, "val")[0], 10, cfg.data.subset_seed)
    frozen = copy.deepcopy(backbone).eval()
    expected = knn_classify(*extract_features(frozen, EvalImageFolder(bank, transform), 8),
                            *extract_features(frozen, EvalImageFolder(val, transform), 8), 2, ks=(3, 5, 12))
    assert monitor.evaluations[0]["knn"] == expected
    assert monitor.evaluations[0]["top1"] == expected["k12"]["top1"]  # the headline k: the whole 12-image bank (< 20)

    # Resume: evaluations up to the checkpoint's step come back, later ones (or other settings) do not.
    def reloaded(resume_step, *overrides):
        other = _config(root, "monitor.knn_every_epochs=2", "monitor.knn_train_subset=12",
                        "monitor.knn_val_subset=10", *overrides)
        return KnnMonitor(other, ENV, backbone, train_samples, tmp_path, resume_step=resume_step).evaluations

    assert reloaded(10) == json.loads(json.dumps(monitor.evaluations))
    assert reloaded(9) == [] and reloaded(None) == []
    assert reloaded(10, "monitor.knn_every_epochs=4") != []  # how often is not a setting of the numbers
    assert reloaded(10, "eval.knn_k=[3]") == []


@pytest.mark.parametrize(("override", "field"), [
    ("monitor.knn_every_epochs=-1", "monitor.knn_every_epochs"),
    ("monitor.knn_every_epochs=1.5", "monitor.knn_every_epochs"),
    ("monitor.knn_val_subset=0", "monitor.knn_val_subset"),
    ("monitor.knn_train_subset=ten", "monitor.knn_train_subset"),
])
def test_knn_during_training_fields_are_validated(tmp_path, override, field):
    cfg = resolve_config(compose_config([f"out_dir={tmp_path / 'job'}", override]))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(cfg, check_data=False)


def test_a_bank_smaller_than_k_is_refused_before_training(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)
    cfg = _config(root, "monitor.knn_every_epochs=1", "monitor.knn_train_subset=4")
    with pytest.raises(ConfigError, match="monitor.knn_train_subset"):
        KnnMonitor(cfg, ENV, torch.nn.Identity(), list_image_folder(root, "train")[0], tmp_path)


def _two_rank_worker(rank, world_size, port, root, out_dir):
    set_rank_env(rank, world_size, port)
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        cfg = _config(root, *TWO_RANKS)
        trainer = Trainer(cfg, env, out_dir)  # FSDP-sharded (2 ranks)
        # One step on different images per rank: each rank's BN statistics differ, as in training.
        g = torch.Generator().manual_seed(rank)
        trainer.training_step([torch.randn(4, 3, 32, 32, generator=g) for _ in trainer.view_types], 0)
        backbone = trainer.model.online.backbone
        before = {k: v.clone() for k, v in backbone.state_dict().items() if not hasattr(v, "full_tensor")}
        monitor = KnnMonitor(cfg, env, backbone, trainer.train_samples, out_dir)
        monitor(1, 2)
        unchanged = all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items() if k in before)
        torch.save({"state": full_state_dict(backbone), "evaluations": monitor.evaluations, "unchanged": unchanged,
                    "training": backbone.training}, out_dir / f"rank{rank}.pt")
    finally:
        destroy_distributed()


TWO_RANKS = ["monitor.knn_every_epochs=1", "monitor.knn_val_subset=10", "eval.batch_size=4"]


@pytest.mark.slow
def test_two_fsdp_ranks_give_the_one_process_knn(tmp_path):
    """The sharded backbone on 2 ranks, BN statistics averaged over them (then restored), equals one process's kNN
    on the same averaged network."""
    root = make_image_folder(tmp_path / "data", per_class=8)
    (tmp_path / "job").mkdir()
    run_ranks(_two_rank_worker, 2, root, tmp_path / "job")
    ranks = [torch.load(tmp_path / "job" / f"rank{r}.pt") for r in range(2)]
    assert all(r["unchanged"] and r["training"] for r in ranks)
    states = [r["state"] for r in ranks]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0] if "running_mean" in k)
    averaged = {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() and "running" in k else v
                for k, v in states[0].items()}

    cfg = _config(root, *TWO_RANKS)
    backbone = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))
    backbone.load_state_dict(averaged)
    backbone.eval()
    transform = eval_transform(cfg)
    bank = list_image_folder(root, "train")[0]
    val = class_balanced_subset(list_image_folder(root, "val")[0], 10, cfg.data.subset_seed)
    expected = knn_classify(*extract_features(backbone, EvalImageFolder(bank, transform), 4),
                            *extract_features(backbone, EvalImageFolder(val, transform), 4), 2,
                            ks=(3, 5, len(bank)))  # eval.knn_k, and the headline's 20 capped at the bank
    for r in ranks:
        assert [e["knn"] for e in r["evaluations"]] == [expected]
