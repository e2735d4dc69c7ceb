"""The paper's linear protocol: a Linear head on a frozen backbone fed augmented images (``augmented``).

RandomResizedCrop + horizontal flip images (normalised with the train statistics ``data.mean``/``data.std``,
never val's) go through the frozen backbone in eval mode; a Linear head, init N(0, 0.01), is trained
with SGD momentum 0.9, wd 0, lr ``base_lr * global batch / 512`` and a per-epoch cosine. Every epoch the
head is scored on the val features (centre crop, extracted once); the last epoch and the best one are
reported. Data-parallel over the ranks: each rank takes its share of every global batch and the
gradients are averaged with a device all-reduce.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from mtssl.distributed.collectives import device_sum, rank, world_size
from mtssl.eval.accuracy import topk_correct
from mtssl.eval.features import FeatureShard
from mtssl.utils.progress_bar import progress_bar


class ProbeStopped(Exception):
    """The augmented probe stopped on request after an epoch; its state is in ``state_path``."""

    def __init__(self, epochs_done: int, state_path: Path):
        super().__init__(f"augmented linear probe stopped after epoch {epochs_done}; state in {state_path}")
        self.epochs_done = epochs_done


def augmented_train_transform(mean, std, size: int) -> v2.Compose:
    """RandomResizedCrop(size) with torchvision's default (bilinear) interpolation, as the official probe, +
    horizontal flip, then the train normalisation."""
    return v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


def _epoch_seed(seed: int, epoch: int, this_rank: int) -> int:
    digest = hashlib.blake2b(f"augmented-probe:{seed}:{epoch}:{this_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def augmented_linear_probe(
    backbone: nn.Module,
    train_set: Dataset,
    val: FeatureShard,
    num_classes: int,
    device: torch.device,
    epochs: int = 100,
    batch_size: int = 512,
    base_lr: float = 0.005,
    seed: int = 0,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    on_epoch=None,
    state_path: Path | None = None,
    state_key: str = "",
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Train the ``augmented`` protocol's head (see the module docstring); a collective.

    `train_set` yields augmented (image, label); `batch_size` is the global batch (split over the ranks);
    `val` holds this rank's val features of the same backbone. Returns {"top1", "top5" (last epoch),
    "best_top1", "best_top5", "best_epoch" (1-based; chosen on val, so it is an optimistic number),
    "lr", "epochs"}. ``on_epoch(epoch, val_top1, head)``, when given, is called after every epoch.

    Preemptible: after an epoch, when ``should_stop()`` (a collective) says so, rank 0 saves the head, optimiser,
    schedule and val history to ``state_path`` and ``ProbeStopped`` is raised; a later call with the same
    ``state_key`` resumes after that epoch (per-epoch seeds: on CPU the result is bitwise the uninterrupted one).
    """
    world = world_size()
    if batch_size % world:
        raise ValueError(f"eval.augmented_batch_size: {batch_size} does not divide across {world} ranks")
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(val.dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, val.dim, generator=generator) * 0.01)
        head.bias.zero_()
    lr = base_lr * batch_size / 512
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank(), shuffle=True, seed=seed)
    val_rows = val.valid.nonzero().flatten()
    history: list = []
    start = 0
    if state_path is not None and Path(state_path).exists():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved.get("key") == state_key:
            head.load_state_dict(saved["head"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            history, start = [tuple(h) for h in saved["history"]], int(saved["epoch"])
    for epoch in progress_bar(range(start, epochs), desc="augmented linear probe", unit="epoch"):
        sampler.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(seed, epoch, rank()))  # the crops and flips (main process)
        loader = DataLoader(train_set, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch, rank())))
        for images, labels in loader:
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                features = backbone(images.to(device, non_blocking=True))
            loss = F.cross_entropy(head(features.float()), torch.as_tensor(labels).to(device))
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if world > 1:
                params = list(head.parameters())
                flat = device_sum(torch.cat([p.grad.reshape(-1) for p in params])) / world
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            hits = topk_correct(head(val.features[val_rows].float()), val.labels[val_rows], (1, 5))
        counts = device_sum(torch.tensor([hits[1], hits[5]], device=device)).tolist()
        history.append((100.0 * counts[0] / val.num_items, 100.0 * counts[1] / val.num_items))
        if on_epoch is not None:
            on_epoch(epoch, history[-1][0], head)
        if should_stop is not None and epoch + 1 < epochs and should_stop():
            if state_path is not None and rank() == 0:
                tmp = Path(f"{state_path}.tmp")
                torch.save({"key": state_key, "epoch": epoch + 1, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "history": history}, tmp)
                os.replace(tmp, state_path)
            raise ProbeStopped(epoch + 1, state_path)
    best = max(range(epochs), key=lambda e: history[e][0])  # the first of equal values
    return {"top1": history[-1][0], "top5": history[-1][1], "best_top1": history[best][0], "best_top5": history[best][1],
            "best_epoch": best + 1, "lr": lr, "epochs": epochs}
