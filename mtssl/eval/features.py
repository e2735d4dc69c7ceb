"""Frozen-feature extraction on one or many ranks, and the shape checks shared by kNN and the linear probe."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from mtssl.distributed.collectives import collective_device, device_all_gather_stack, rank as current_rank, world_size as current_world_size
from mtssl.utils.progress_bar import progress_bar

# eval.feature_dtype -> the dtype of the feature banks; the config's check of eval.feature_dtype reads this registry.
FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _padded_rank_indices(num_items: int, world_size: int, rank: int) -> list[int]:
    """Indices rank `rank` processes: rank, rank + W, ... of range(num_items) padded to a multiple of W.

    The padding repeats the first indices, so every rank gets exactly ceil(num_items / W) items and
    therefore runs the same number of forward calls for any batch size.
    """
    per_rank = math.ceil(num_items / world_size)
    padded = [i % num_items for i in range(per_rank * world_size)]
    return padded[rank::world_size]


@dataclass
class FeatureShard:
    """One rank's share of a dataset's features, kept on the device.

    Row j of rank r is padded position j * W + r of the dataset; positions >= num_items repeat the
    first items and are marked invalid (every rank holds the same number of rows, so chunked
    collectives over shards line up). ``indices`` are global dataset indices, used for exact,
    rank-independent tie-breaks.
    """

    features: Tensor  # [n, D], feature dtype, on the device
    labels: Tensor  # [n] int64
    indices: Tensor  # [n] int64 global dataset index
    valid: Tensor  # [n] bool, False for padded duplicates
    num_items: int  # size of the whole dataset
    replaced: list[int] = field(default_factory=list)  # global indices of unreadable items (EvalImageFolder report_unreadable)

    @property
    def dim(self) -> int:
        return self.features.shape[1]


@torch.no_grad()  # not inference_mode: FSDP2 forwards are not reliably supported under inference_mode
def extract_feature_shard(
    forward_fn: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    description: str = "features",
) -> FeatureShard:
    """This rank's share of the features and labels of `dataset`, kept on `device` in `dtype`.

    Rank r of W processes items r, r + W, ... of the index list padded (by repeating the first items)
    to a multiple of W, so every rank runs the same number of equally sized forward calls (FSDP-sharded
    backbones require it). Nothing is gathered: host and device memory per rank is about the bank / W.
    Progress (elapsed, ETA) is shown on rank 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}; pass e.g. batch_size=256")
    num_items = len(dataset)
    if num_items == 0:
        raise ValueError("dataset is empty: extract_features needs at least one (image, label) item")
    device = torch.device(device)
    world_size, rank = current_world_size(), current_rank()
    positions = torch.arange(rank, math.ceil(num_items / world_size) * world_size, world_size)
    subset = Subset(dataset, _padded_rank_indices(num_items, world_size, rank)) if world_size > 1 else dataset
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)

    feature_chunks: list[Tensor] = []
    label_chunks: list[Tensor] = []
    replaced: set[int] = set()
    for batch_start, (images, labels, *flags) in enumerate(progress_bar(loader, desc=description, unit="batch")):
        if flags:  # the dataset reports which items it replaced
            rows = positions[batch_start * batch_size: batch_start * batch_size + len(labels)]
            replaced.update(int(p) % num_items for p, bad in zip(rows, flags[0]) if bad)
        features = forward_fn(images.to(device, non_blocking=True))
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if features.ndim != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"forward_fn must return features of shape [batch, dim], got {tuple(features.shape)} "
                f"for a batch of {labels.shape[0]} images; flatten or pool the backbone output"
            )
        feature_chunks.append(features.float().to(device=device, dtype=dtype))
        label_chunks.append(labels.to(device))
    return FeatureShard(
        features=torch.cat(feature_chunks),
        labels=torch.cat(label_chunks),
        indices=(positions % num_items).to(device),
        valid=(positions < num_items).to(device),
        num_items=num_items,
        replaced=sorted(replaced),
    )


def extract_features(
    forward_fn: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Features and labels of every item of `dataset`, in dataset order, on every rank (small datasets only).

    Returns (features [N, D] float32 on CPU, labels [N] int64 on CPU). Built on ``extract_feature_shard``;
    with W ranks the shards are all-gathered, so every rank holds the whole bank: the end-of-training
    evaluation never calls this, it works on shards.
    """
    shard = extract_feature_shard(forward_fn, dataset, batch_size, num_workers, device)
    if current_world_size() == 1:
        return shard.features.cpu(), shard.labels.cpu()
    gather_device = collective_device(torch.device(device))
    features = device_all_gather_stack(shard.features.to(gather_device)).cpu()
    labels = device_all_gather_stack(shard.labels.to(gather_device)).cpu()
    # [W, per_rank, ...]: entry (r, j) holds padded position j * W + r; rank axis inside gives padded order.
    features = features.transpose(0, 1).reshape(-1, shard.dim)[: shard.num_items]
    labels = labels.transpose(0, 1).reshape(-1)[: shard.num_items]
    return features.contiguous(), labels.contiguous()


def check_feature_pair(names: tuple[str, str], first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor],
                        num_classes: int) -> None:
    """Both (features, labels) pairs are well-formed and have the same feature dimension."""
    check_features(names[0], *first, num_classes)
    check_features(names[1], *second, num_classes)
    if first[0].shape[1] != second[0].shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} features must have the same dim, got {first[0].shape[1]} and "
            f"{second[0].shape[1]}; extract both with the same backbone"
        )


def check_features(name: str, features: Tensor, labels: Tensor, num_classes: int) -> None:
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
