"""Linear probe on frozen features: the learning rate chosen on a held-out part of train, then val."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.distributed.progress import progress_bar
from mtssl.eval.accuracy import topk_accuracy
from mtssl.eval.features import check_feature_pair


def _stratified_holdout(labels: Tensor, num_classes: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Boolean mask selecting round(fraction * n_c) random samples of each class c (at least one, and
    at least one left for training, when the class has two or more samples)."""
    labels = labels.cpu()
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel() < 2:
            continue
        num_held = min(max(round(fraction * members.numel()), 1), members.numel() - 1)
        mask[members[torch.randperm(members.numel(), generator=generator)[:num_held]]] = True
    return mask


def _train_linear(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    lr: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> nn.Module:
    """Train BatchNorm1d(affine=False) + Linear with SGD (momentum 0.9) and a per-step cosine lr."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        nn.init.normal_(linear.weight, std=0.01, generator=generator)
        linear.bias.zero_()
    model = nn.Sequential(nn.BatchNorm1d(features.shape[1], affine=False), linear).to(features.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    num_samples = features.shape[0]
    batches_per_epoch = math.ceil(num_samples / batch_size)
    # A trailing batch of one sample cannot be batch-normalised; it is skipped (it changes every epoch).
    if batches_per_epoch > 1 and num_samples % batch_size == 1:
        batches_per_epoch -= 1
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)

    model.train()
    for _ in progress_bar(range(epochs), desc=f"linear probe, lr {lr:g}", unit="epoch"):
        order = torch.randperm(num_samples, generator=generator).to(features.device)
        for batch in order.split(batch_size)[:batches_per_epoch]:
            loss = F.cross_entropy(model(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def _predict(model: nn.Module, features: Tensor, batch_size: int = 8192) -> Tensor:
    return torch.cat([model(chunk) for chunk in features.split(batch_size)])


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr_grid: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict:
    """Linear probe on frozen features: BatchNorm1d(affine=False) then Linear, SGD momentum 0.9, cosine lr.

    The learning rate is chosen from `lr_grid` without looking at val: each lr is trained on train minus a
    class-stratified, seeded holdout of `holdout_fraction`, and scored by top-1 on that holdout (ties go to
    the earlier lr in the grid). The chosen lr is then retrained on all train features and the last-epoch
    model is evaluated on val. Mini-batch order and head init come from a generator seeded with `seed`, so
    on CPU the result is bitwise repeatable. Runs on the device of `train_features`.

    Returns {"top1": .., "top5": .. (val, percent), "lr": chosen lr, "holdout_top1": {lr: percent}}.
    """
    check_feature_pair(("train", "val"), (train_features, train_labels), (val_features, val_labels), num_classes)
    if epochs < 1:
        raise ValueError(f"linear probe epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"linear probe batch_size must be >= 2 (BatchNorm needs two samples), got {batch_size}")
    if not lr_grid or min(lr_grid) <= 0:
        raise ValueError(f"linear probe lr_grid must be a non-empty list of positive lrs, got {tuple(lr_grid)}")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"linear probe holdout_fraction must be in (0, 1), got {holdout_fraction}; e.g. 0.1")

    device = train_features.device
    train_features = train_features.float()
    train_labels = train_labels.to(device=device, dtype=torch.int64)
    holdout = _stratified_holdout(train_labels, num_classes, holdout_fraction, torch.Generator().manual_seed(seed))
    if not holdout.any() or holdout.sum() > train_labels.shape[0] - 2:
        raise ValueError(
            f"cannot hold out {holdout_fraction:.0%} of {train_labels.shape[0]} training samples for lr "
            f"selection; every class needs at least 2 training samples"
        )
    holdout = holdout.to(device)
    fit_features, fit_labels = train_features[~holdout], train_labels[~holdout]
    held_features, held_labels = train_features[holdout], train_labels[holdout]

    holdout_top1: dict[float, float] = {}
    for lr in lr_grid:
        model = _train_linear(fit_features, fit_labels, num_classes, lr, epochs, batch_size, weight_decay, seed)
        holdout_top1[lr] = topk_accuracy(_predict(model, held_features), held_labels, ks=(1,))["top1"]
    best_lr = max(lr_grid, key=lambda lr: holdout_top1[lr])  # max() keeps the first of equal values

    model = _train_linear(train_features, train_labels, num_classes, best_lr, epochs, batch_size, weight_decay, seed)
    val_accuracy = topk_accuracy(_predict(model, val_features.to(device).float()), val_labels.to(device))
    return {"top1": val_accuracy["top1"], "top5": val_accuracy["top5"], "lr": best_lr, "holdout_top1": holdout_top1}
