"""Linear probe on frozen feature shards: every lr of the grid trained at once, chosen on a held-out part of train.

The features stay sharded over the ranks (see ``FeatureShard``); every rank walks the same global,
seeded mini-batch order and uses the rows of each batch it holds. BatchNorm statistics and gradients
are summed over ranks, so W ranks train the heads one rank would, up to floating-point order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.distributed.collectives import collective_device, device_all_gather_cat, device_sum, world_size
from mtssl.eval.accuracy import topk_correct
from mtssl.eval.features import FeatureShard, check_feature_pair
from mtssl.utils.progress_bar import progress_bar

BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # nn.BatchNorm1d's defaults


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


def _gathered(tensor: Tensor) -> Tensor:
    if world_size() == 1:
        return tensor
    return device_all_gather_cat(tensor.to(collective_device(tensor.device))).to(tensor.device)


@dataclass
class LinearHeads:
    """BatchNorm1d(affine=False) running statistics and one Linear head [C, D] per learning rate."""

    lrs: tuple[float, ...]
    weights: list[Tensor]
    biases: list[Tensor]
    running_mean: Tensor
    running_var: Tensor

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """[L, N, C] eval-mode logits of every head."""
        x = (features.float() - self.running_mean) / torch.sqrt(self.running_var + BN_EPS)
        return torch.stack([F.linear(x, w, b) for w, b in zip(self.weights, self.biases)])


class _ShardRows:
    """Maps global dataset indices to this rank's rows of a shard (padded duplicates excluded)."""

    def __init__(self, shard: FeatureShard):
        self.local = torch.full((shard.num_items,), -1, dtype=torch.int64, device=shard.features.device)
        rows = torch.arange(shard.features.shape[0], device=shard.features.device)
        self.local[shard.indices[shard.valid]] = rows[shard.valid]

    def __call__(self, global_indices: Tensor) -> Tensor:
        rows = self.local[global_indices]
        return rows[rows >= 0]


def train_linear_heads(
    shard: FeatureShard,
    members: Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    description: str = "linear probe",
    check_stop: Callable[[], None] | None = None,
) -> LinearHeads:
    """Train BatchNorm1d(affine=False) + one Linear per lr on the train items `members` (global indices,
    ascending), all heads over the same mini-batches; SGD momentum 0.9, per-step cosine lr. A collective.

    Each head starts from the same N(0, 0.01) init; the generator seeded with `seed` draws the init, then
    one permutation of `members` per epoch (a global batch of `batch_size`, split over the ranks that hold
    its rows). A trailing batch of one sample cannot be batch-normalised and is skipped. ``check_stop()`` is called
    on every rank after each epoch but the last (it may raise to stop).
    """
    device, dim = shard.features.device, shard.dim
    generator = torch.Generator().manual_seed(seed)
    init = torch.empty(num_classes, dim)
    nn.init.normal_(init, std=0.01, generator=generator)
    weights = [init.clone().to(device).requires_grad_() for _ in lrs]
    biases = [torch.zeros(num_classes, device=device, requires_grad=True) for _ in lrs]
    params = [p for pair in zip(weights, biases) for p in pair]
    optimizer = torch.optim.SGD([{"params": [w, b], "lr": lr} for w, b, lr in zip(weights, biases, lrs)],
                                momentum=0.9, weight_decay=weight_decay)
    num_samples = members.shape[0]
    batches_per_epoch = math.ceil(num_samples / batch_size)
    if batches_per_epoch > 1 and num_samples % batch_size == 1:
        batches_per_epoch -= 1
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)
    running_mean, running_var = torch.zeros(dim, device=device), torch.ones(dim, device=device)
    rows_of = _ShardRows(shard)
    members = members.to(device)

    for epoch in progress_bar(range(epochs), desc=description, unit="epoch"):
        order = members[torch.randperm(num_samples, generator=generator).to(device)]
        for batch in order.split(batch_size)[:batches_per_epoch]:
            rows = rows_of(batch)
            x, y = shard.features[rows].float(), shard.labels[rows]
            count = batch.shape[0]
            # Batch statistics over the whole global batch, in two passes (as BatchNorm's own variance).
            mean = device_sum(x.sum(0)) / count
            var = device_sum((x - mean).square().sum(0)) / count
            with torch.no_grad():
                running_mean.mul_(1 - BN_MOMENTUM).add_(BN_MOMENTUM * mean)
                running_var.mul_(1 - BN_MOMENTUM).add_(BN_MOMENTUM * var * count / (count - 1))
            x = (x - mean) / torch.sqrt(var + BN_EPS)
            # Sum of each head's mean cross-entropy over the global batch: heads stay independent.
            loss = sum(F.cross_entropy(F.linear(x, w, b), y, reduction="sum") for w, b in zip(weights, biases)) / count
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if world_size() > 1:
                flat = device_sum(torch.cat([p.grad.reshape(-1) for p in params]))
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            optimizer.step()
            scheduler.step()
        if check_stop is not None and epoch + 1 < epochs:
            check_stop()
    return LinearHeads(tuple(lrs), [w.detach() for w in weights], [b.detach() for b in biases], running_mean, running_var)


def _heads_correct(heads: LinearHeads, shard: FeatureShard, select: Tensor, ks: Sequence[int]) -> list[dict[int, int]]:
    """Per head, the number of selected rows (summed over ranks) whose label is in the top-k."""
    rows = select.nonzero().flatten()
    logits = heads.logits(shard.features[rows])
    counts = torch.tensor([[topk_correct(head, shard.labels[rows], ks)[k] for k in ks] for head in logits],
                          dtype=torch.int64, device=shard.features.device)
    counts = device_sum(counts).tolist()
    return [dict(zip(ks, row)) for row in counts]


def linear_probe_sharded(
    train: FeatureShard,
    val: FeatureShard,
    num_classes: int,
    epochs: int = 100,
    lr_grid: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    check_stop: Callable[[], None] | None = None,
) -> dict:
    """Linear probe on frozen feature shards: BatchNorm1d(affine=False) then Linear, SGD momentum 0.9, cosine lr.

    The learning rate is chosen from `lr_grid` without looking at val: one head per lr is trained on train
    minus a class-stratified, seeded holdout of `holdout_fraction` (all heads in one pass over the same
    batches), and scored by top-1 on that holdout (ties go to the earlier lr in the grid). The chosen lr
    is then retrained on all train features and the last-epoch head is evaluated on val. A collective;
    every rank returns the same result, bitwise repeatable on CPU. ``check_stop()``: called after each epoch of both
    trainings, on every rank; it may raise to stop.

    Returns {"top1": .., "top5": .. (val, percent), "lr": chosen lr, "holdout_top1": {lr: percent}}.
    """
    if epochs < 1:
        raise ValueError(f"linear probe epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"linear probe batch_size must be >= 2 (BatchNorm needs two samples), got {batch_size}")
    if not lr_grid or min(lr_grid) <= 0:
        raise ValueError(f"linear probe lr_grid must be a non-empty list of positive lrs, got {tuple(lr_grid)}")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"linear probe holdout_fraction must be in (0, 1), got {holdout_fraction}; e.g. 0.1")
    if train.dim != val.dim:
        raise ValueError(f"train and val features must have the same dim, got {train.dim} and {val.dim}")
    device = train.features.device
    # Labels of the whole train split (small: no features) give every rank the same holdout.
    labels = torch.zeros(train.num_items, dtype=torch.int64, device=device)
    valid = _gathered(train.valid)
    labels[_gathered(train.indices)[valid]] = _gathered(train.labels)[valid]
    holdout = _stratified_holdout(labels, num_classes, holdout_fraction, torch.Generator().manual_seed(seed))
    if not holdout.any() or holdout.sum() > train.num_items - 2:
        raise ValueError(
            f"cannot hold out {holdout_fraction:.0%} of {train.num_items} training samples for lr "
            f"selection; every class needs at least 2 training samples"
        )
    fit = (~holdout).nonzero().flatten()
    heads = train_linear_heads(train, fit, num_classes, lr_grid, epochs, batch_size, weight_decay, seed,
                               description="linear probe (lr grid)", check_stop=check_stop)
    held_rows = train.valid & holdout.to(device)[train.indices]
    num_held = int(holdout.sum())
    held = _heads_correct(heads, train, held_rows, (1,))
    holdout_top1 = {lr: 100.0 * counts[1] / num_held for lr, counts in zip(lr_grid, held)}
    best_lr = max(lr_grid, key=lambda lr: holdout_top1[lr])  # max() keeps the first of equal values

    final = train_linear_heads(train, torch.arange(train.num_items), num_classes, (best_lr,), epochs, batch_size,
                               weight_decay, seed, description="linear probe (chosen lr)", check_stop=check_stop)
    (val_counts,) = _heads_correct(final, val, val.valid, (1, 5))
    return {"top1": 100.0 * val_counts[1] / val.num_items, "top5": 100.0 * val_counts[5] / val.num_items,
            "lr": best_lr, "holdout_top1": holdout_top1}


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
    """``linear_probe_sharded`` on whole feature tensors held by one process (see there for the protocol)."""
    check_feature_pair(("train", "val"), (train_features, train_labels), (val_features, val_labels), num_classes)
    if world_size() > 1:
        raise ValueError("linear_probe takes whole feature tensors on one process; with several ranks "
                         "use linear_probe_sharded on each rank's FeatureShard")

    def whole(features: Tensor, labels: Tensor) -> FeatureShard:
        n = features.shape[0]
        return FeatureShard(features, labels.to(device=features.device, dtype=torch.int64),
                            torch.arange(n, device=features.device),
                            torch.ones(n, dtype=torch.bool, device=features.device), n)

    return linear_probe_sharded(whole(train_features, train_labels), whole(val_features.to(train_features.device), val_labels),
                                num_classes, epochs, lr_grid, batch_size, holdout_fraction, weight_decay, seed)
