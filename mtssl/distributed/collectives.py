"""Every collective of mtssl, named by what it moves.

nccl (the default group on GPUs) only serves CUDA tensors, and each of its results lives on the
GPU: reading one on the host is a synchronisation. Host values (counts, flags, Python objects,
filesystem barriers) therefore go over a separate gloo group, ``host_group()``, and never touch
the GPU; device tensors (loss means, LARS norms, MoCo keys, features, BN statistics) go over the
default group, stay on their device and are not read here. ``host_*`` functions take and return
Python values; ``device_*`` functions take and return tensors on the default group's device.
All functions are collectives (every rank calls them, in the same order) and are identities
on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mtssl.distributed.process_group import host_group


def world_size() -> int:
    """Ranks of the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------- host values (gloo)
def host_any(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small gloo all-reduce)."""
    if world_size() == 1:
        return list(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=host_group())
    return [bool(v) for v in tensor.tolist()]


def host_sum(values: list[int]) -> list[int]:
    """Element-wise sum of integers over all ranks (gloo, int64)."""
    if world_size() == 1:
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(tensor, group=host_group())
    return [int(v) for v in tensor.tolist()]


def host_broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (gloo: no GPU staging copy)."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=host_group())
    return holder[0]


def host_union(items: set[str]) -> set[str]:
    """The union over ranks of each rank's set of strings (e.g. paths), gathered over gloo."""
    if world_size() == 1:
        return set(items)
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(items), group=host_group())
    return {item for part in gathered for item in part}


def host_barrier() -> None:
    """Wait until every rank got here (filesystem ordering). gloo's barrier also waits for all
    earlier work on the host group; it does not wait for GPU work."""
    if world_size() > 1:
        dist.barrier(group=host_group())


# ---------------------------------------------------------------------------- device tensors (default group)
def collective_device(device: torch.device | None = None) -> torch.device:
    """The device the default group's collectives run on: CUDA for nccl, the CPU for gloo."""
    if "nccl" in dist.get_backend():
        if device is not None and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no host synchronisation) and return it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def device_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, computed on the collective device and returned on ``tensor``'s device."""
    if world_size() == 1:
        return tensor
    return device_sum_(tensor.to(collective_device(tensor.device))).to(tensor.device)


def device_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place and return it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def device_all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape everywhere) concatenated along dim 0 in rank order."""
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = torch.empty((world_size() * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(gathered, tensor)
    return gathered


def device_all_gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` stacked into [world_size, *shape] in rank order, on ``tensor``'s
    device; the caller moves it to ``collective_device()`` first."""
    if world_size() == 1:
        return tensor.unsqueeze(0)
    return device_all_gather_cat(tensor.unsqueeze(0))


@torch.no_grad()
def average_buffers_over_ranks_(module: nn.Module) -> None:
    """Replace each floating-point buffer (BN running mean and variance) by its mean over ranks.

    Gathered, then averaged in rank order on every rank, so the result is bitwise identical
    everywhere (an all-reduce leaves the summation order to the backend). Integer buffers (BN's
    batch counters) are the same on every rank and stay as they are.
    """
    if world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    device = collective_device(buffers[0].device)
    flat = torch.cat([b.detach().reshape(-1).to(device, torch.float32) for b in buffers])
    mean = device_all_gather_stack(flat).mean(dim=0)
    for buffer, value in zip(buffers, mean.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))
