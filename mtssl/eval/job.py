"""End-of-job evaluation: kNN (online and target backbones) and a linear probe, plus exports.

Both evaluations use frozen backbone features (pre-projector; the CLS token for ViTs) in eval
mode with the validation transform. The backbones are gathered unsharded onto every rank, which
then extract their share of the features (see ``mtssl.eval.features.extract_features``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from mtssl.data.image_folder import EvalImageFolder, class_balanced_subset, list_image_folder
from mtssl.distributed.collectives import average_buffers_over_ranks_
from mtssl.distributed.process_group import DistEnv
from mtssl.eval.features import extract_features
from mtssl.eval.knn import knn_classify
from mtssl.eval.linear import linear_probe
from mtssl.distributed.fsdp import full_state_dict, state_sha256
from mtssl.model.siamese import backbone_kwargs, build_backbone
from mtssl.data.views import build_eval_transform

log = logging.getLogger(__name__)


def _frozen_backbone(cfg: DictConfig, state: dict, device: torch.device) -> torch.nn.Module:
    backbone = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))
    backbone.load_state_dict(state)
    return backbone.to(device).eval().requires_grad_(False)


def evaluation_samples(cfg: DictConfig, train_samples: list) -> tuple[list, list]:
    """(train, val) samples: the pretraining images (or eval.train_subset) and val (or eval.val_subset)."""
    if cfg.eval.train_subset is not None:
        all_train, _ = list_image_folder(cfg.data.root, cfg.data.train_split)
        train_samples = class_balanced_subset(all_train, cfg.eval.train_subset, cfg.data.subset_seed)
    val_samples, _ = list_image_folder(cfg.data.root, cfg.data.val_split)
    if cfg.eval.val_subset is not None:
        val_samples = class_balanced_subset(val_samples, cfg.eval.val_subset, cfg.data.subset_seed)
    return train_samples, val_samples


def evaluate_backbones(cfg: DictConfig, env: DistEnv, outcome, out_dir: Path, writer=None) -> dict:
    """Return the results.json evaluation fields; rank 0 also writes ``backbone.pth``."""
    model = outcome.model
    # Each rank's BatchNorm statistics saw only its own batches: average them so that every rank
    # extracts features with one network, the one backbone.pth and weights_sha256 describe.
    for encoder in (model.online, model.target):
        if encoder is not None:
            average_buffers_over_ranks_(encoder.backbone)
    online_state = full_state_dict(model.online.backbone)
    target_state = full_state_dict(model.target.backbone) if model.target is not None else None
    fields: dict = {"weights_sha256": state_sha256(online_state)}
    if env.is_main:
        torch.save({"backbone": cfg.backbone.timm_name, "state_dict": online_state}, out_dir / "backbone.pth")

    transform = build_eval_transform(cfg.data.mean, cfg.data.std, cfg.data.eval_resize, cfg.data.eval_crop, cfg.data.eval_interpolation)
    train_samples, val_samples = evaluation_samples(cfg, outcome.train_samples)
    train_set, val_set = EvalImageFolder(train_samples, transform), EvalImageFolder(val_samples, transform)
    num_classes = 1 + max(label for _, label in train_samples + val_samples)
    batch, workers = cfg.eval.batch_size, cfg.data.num_workers

    def features(state: dict):
        backbone = _frozen_backbone(cfg, state, env.device)
        train = extract_features(backbone, train_set, batch, workers, env.device)
        val = extract_features(backbone, val_set, batch, workers, env.device)
        return train, val

    (train_x, train_y), (val_x, val_y) = features(online_state)
    knn_args = dict(num_classes=num_classes, ks=tuple(cfg.eval.knn_k), temperature=cfg.eval.knn_temperature)
    headline = f"k{max(cfg.eval.knn_k)}"
    knn = knn_classify(train_x, train_y, val_x, val_y, **knn_args)
    fields.update(knn=knn, knn_top1=knn[headline]["top1"], knn_top5=knn[headline]["top5"])
    if target_state is not None:
        (t_train_x, t_train_y), (t_val_x, t_val_y) = features(target_state)
        knn_target = knn_classify(t_train_x, t_train_y, t_val_x, t_val_y, **knn_args)
    else:  # SimSiam: the target is the online network
        knn_target = knn
    fields.update(knn_target=knn_target, knn_top1_target=knn_target[headline]["top1"], knn_top5_target=knn_target[headline]["top5"])
    log.info("kNN (k=%s) top-1 online %.2f target %.2f", headline[1:], fields["knn_top1"], fields["knn_top1_target"])

    if env.is_main:  # deterministic and cheap on precomputed features: one rank is enough
        probe = linear_probe(
            train_x.to(env.device), train_y, val_x.to(env.device), val_y, num_classes,
            epochs=cfg.eval.linear_epochs, lr_grid=tuple(cfg.eval.linear_lrs), batch_size=cfg.eval.linear_batch_size,
            holdout_fraction=cfg.eval.linear_holdout, seed=cfg.train.seed,
        )
        fields.update(linear_top1=probe["top1"], linear_top5=probe["top5"], linear_lr=probe["lr"])
        log.info("linear probe top-1 %.2f (lr %g chosen on a held-out train split)", probe["top1"], probe["lr"])
        if writer is not None:
            for key in ("knn_top1", "knn_top1_target", "linear_top1"):
                writer.add_scalar(f"eval/{key}", fields[key], outcome.steps)
    return fields
