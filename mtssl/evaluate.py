"""Frozen-feature evaluation: feature extraction (single or multi rank), weighted kNN and a linear probe.

All three work on plain tensors so that they can be tested on synthetic features and reused for the
online and the target backbone alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["extract_features", "knn_classify", "linear_probe", "topk_accuracy"]


# --------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------


def _padded_rank_indices(num_items: int, world_size: int, rank: int) -> list[int]:
    """Indices rank `rank` processes: rank, rank + W, ... of range(num_items) padded to a multiple of W.

    The padding repeats the first indices, so every rank gets exactly ceil(num_items / W) items and
    therefore runs the same number of forward calls for any batch size.
    """
    per_rank = math.ceil(num_items / world_size)
    padded = [i % num_items for i in range(per_rank * world_size)]
    return padded[rank::world_size]


def _gather_device(device: torch.device) -> torch.device:
    """Device the all-gather runs on: NCCL needs CUDA tensors, gloo (and mixed backends) take CPU ones."""
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(tensor: Tensor, world_size: int, device: torch.device) -> Tensor:
    """All-gather equally shaped tensors from every rank; returns [W, *tensor.shape] on the CPU."""
    tensor = tensor.to(device).contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return torch.stack(gathered).cpu()


@torch.no_grad()  # not inference_mode: FSDP2 forwards are not reliably supported under inference_mode
def extract_features(
    forward_fn: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Compute features and labels for every item of `dataset`, in dataset order.

    Args:
        forward_fn: maps an image batch (already on `device`) to features [B, D]. Pass a frozen backbone
            in eval mode; this function only disables gradients.
        dataset: `dataset[i]` returns `(image_tensor, label)`.
        batch_size: images per forward call (per rank).
        num_workers: DataLoader workers.
        device: where the images are sent before `forward_fn`.

    Returns:
        (features [N, D] float32 on CPU, labels [N] int64 on CPU) with N = len(dataset), row i = dataset[i].

    When torch.distributed is initialised with world size W, rank r processes items r, r + W, ... of the
    index list padded (by repeating the first items) to a multiple of W. Every rank therefore runs the same
    number of forward calls on equally sized batches, which FSDP-sharded backbones require. Each batch is
    all-gathered right away (bounded accelerator memory), then the original order is restored and the padded
    duplicates are dropped, so every rank returns the same full result.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}; pass e.g. batch_size=256")
    num_items = len(dataset)
    if num_items == 0:
        raise ValueError("dataset is empty: extract_features needs at least one (image, label) item")
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world_size = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0

    subset = Subset(dataset, _padded_rank_indices(num_items, world_size, rank)) if distributed else dataset
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    gather_device = _gather_device(device) if distributed else None

    feature_chunks: list[Tensor] = []  # per batch: [W, b, D] when distributed, [b, D] otherwise
    label_chunks: list[Tensor] = []
    for images, labels in loader:
        features = forward_fn(images.to(device, non_blocking=True)).float()
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if features.ndim != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"forward_fn must return features of shape [batch, dim], got {tuple(features.shape)} "
                f"for a batch of {labels.shape[0]} images; flatten or pool the backbone output"
            )
        if distributed:
            feature_chunks.append(_all_gather_rows(features, world_size, gather_device))
            label_chunks.append(_all_gather_rows(labels, world_size, gather_device))
        else:
            feature_chunks.append(features.cpu())
            label_chunks.append(labels.cpu())

    if not distributed:
        return torch.cat(feature_chunks), torch.cat(label_chunks)

    # [W, per_rank, ...]: entry (r, j) holds padded index j * W + r, so moving the rank axis inside
    # and flattening gives padded order; the first num_items rows are the dataset, the rest duplicates.
    features = torch.cat(feature_chunks, dim=1).transpose(0, 1).reshape(-1, feature_chunks[0].shape[-1])
    labels = torch.cat(label_chunks, dim=1).transpose(0, 1).reshape(-1)
    return features[:num_items].contiguous(), labels[:num_items].contiguous()


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


def _topk_correct(
    scores: Tensor, labels: Tensor, ks: Sequence[int], require_positive: bool = False
) -> dict[int, int]:
    """Number of rows whose label is among the top-min(k, num_classes) scores, for each k.

    With `require_positive`, a label whose score is not > 0 never counts as a hit: kNN classes that got no
    vote are tied at zero, and topk would otherwise break that tie arbitrarily.
    """
    num_classes = scores.shape[1]
    max_k = min(max(ks), num_classes)
    labels = labels.to(scores.device).view(-1, 1)
    top = scores.topk(max_k, dim=1).indices
    hits = top == labels
    if require_positive:
        hits &= scores.gather(1, labels) > 0
    return {k: int(hits[:, : min(k, num_classes)].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent of class scores or logits [N, C] against integer labels [N].

    Returns {"top1": .., "top5": ..} (one key per k). With fewer than k classes, top-k uses all C classes
    (and is then 100%).
    """
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores must be [N, num_classes] with N = len(labels) = {labels.shape[0]}, got {tuple(scores.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    correct = _topk_correct(scores, labels, ks)
    return {f"top{k}": 100.0 * correct[k] / scores.shape[0] for k in ks}


# --------------------------------------------------------------------------------------------------
# Weighted kNN
# --------------------------------------------------------------------------------------------------


def _check_feature_pair(names: tuple[str, str], first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor],
                        num_classes: int) -> None:
    """Both (features, labels) pairs are well-formed and have the same feature dimension."""
    _check_features(names[0], *first, num_classes)
    _check_features(names[1], *second, num_classes)
    if first[0].shape[1] != second[0].shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} features must have the same dim, got {first[0].shape[1]} and "
            f"{second[0].shape[1]}; extract both with the same backbone"
        )


def _check_features(name: str, features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name}_features must be a [N, dim] tensor, got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}_labels must be a [N] tensor with N = {features.shape[0]} rows of {name}_features, "
            f"got shape {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name}_features is empty; evaluation needs at least one {name} sample")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{name}_labels must lie in [0, num_classes) = [0, {num_classes}), found range "
            f"[{int(labels.min())}, {int(labels.max())}]; check num_classes"
        )


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Weighted k-nearest-neighbour classification (InstDisc / DINO protocol).

    Features are L2-normalised; each test sample takes its k most cosine-similar training samples, and each
    neighbour votes for its class with weight exp(similarity / temperature). The class scores are the summed
    votes. A class without any vote among the k neighbours never counts towards top-5 (with few voted
    classes, topk would otherwise pick zero-vote classes arbitrarily). Runs on the device of
    `train_features`, `chunk_size` test samples at a time.

    Returns {"k10": {"top1": .., "top5": ..}, "k20": {...}} with accuracies in percent.
    """
    _check_feature_pair(("train", "test"), (train_features, train_labels), (test_features, test_labels), num_classes)
    if not ks or min(ks) < 1 or max(ks) > train_features.shape[0]:
        raise ValueError(
            f"knn ks must be positive and at most the number of training samples "
            f"({train_features.shape[0]}), got {tuple(ks)}; lower eval k or use more training data"
        )
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}; the standard value is 0.07")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")

    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.int64)
    max_k = max(ks)
    correct = {k: {1: 0, 5: 0} for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        labels = test_labels[start : start + chunk_size].to(device)
        similarity, neighbours = (test @ train.T).topk(max_k, dim=1)  # sorted, most similar first
        neighbour_labels = train_labels[neighbours]
        weights = (similarity / temperature).exp()
        for k in ks:
            votes = torch.zeros(test.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            for top, count in _topk_correct(votes, labels, (1, 5), require_positive=True).items():
                correct[k][top] += count
    num_test = test_features.shape[0]
    return {
        f"k{k}": {"top1": 100.0 * correct[k][1] / num_test, "top5": 100.0 * correct[k][5] / num_test} for k in ks
    }


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


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
    for _ in range(epochs):
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
    _check_feature_pair(("train", "val"), (train_features, train_labels), (val_features, val_labels), num_classes)
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
