"""Frozen-feature extraction on one or many ranks, and the shape checks shared by kNN and the linear probe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from mtssl.distributed.collectives import collective_device, device_all_gather_stack, rank as current_rank, world_size as current_world_size
from mtssl.distributed.progress import progress_bar


def _padded_rank_indices(num_items: int, world_size: int, rank: int) -> list[int]:
    """Indices rank `rank` processes: rank, rank + W, ... of range(num_items) padded to a multiple of W.

    The padding repeats the first indices, so every rank gets exactly ceil(num_items / W) items and
    therefore runs the same number of forward calls for any batch size.
    """
    per_rank = math.ceil(num_items / world_size)
    padded = [i % num_items for i in range(per_rank * world_size)]
    return padded[rank::world_size]


def _all_gather_rows(tensor: Tensor, device: torch.device) -> Tensor:
    """All-gather equally shaped tensors from every rank; returns [W, *tensor.shape] on the CPU."""
    return device_all_gather_stack(tensor.to(device)).cpu()


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
    world_size = current_world_size()
    distributed = world_size > 1
    rank = current_rank()

    subset = Subset(dataset, _padded_rank_indices(num_items, world_size, rank)) if distributed else dataset
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    gather_device = collective_device(device) if distributed else None

    feature_chunks: list[Tensor] = []  # per batch: [W, b, D] when distributed, [b, D] otherwise
    label_chunks: list[Tensor] = []
    for images, labels in progress_bar(loader, desc="extracting features", unit="batch"):
        features = forward_fn(images.to(device, non_blocking=True)).float()
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if features.ndim != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"forward_fn must return features of shape [batch, dim], got {tuple(features.shape)} "
                f"for a batch of {labels.shape[0]} images; flatten or pool the backbone output"
            )
        if distributed:
            feature_chunks.append(_all_gather_rows(features, gather_device))
            label_chunks.append(_all_gather_rows(labels, gather_device))
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
