"""Target-network momentum: the cosine tau schedule and a sharding-agnostic foreach EMA."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtssl.distributed.fsdp import local_shard


def ema_momentum(step: int, total_steps: int, base_tau: float) -> float:
    """tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2: tau_0 at step 0, 1 at step K."""
    if total_steps <= 0:
        return base_tau
    return 1 - (1 - base_tau) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, on parameters paired by name.

    Online and target are sharded identically, so each rank updates its own shards with one
    foreach lerp and no communication. Buffers (BN statistics) are not copied: the target
    keeps the statistics of its own train-mode forwards.
    """
    online_params = dict(online.named_parameters())
    target_locals, online_locals = [], []
    for name, target_param in target.named_parameters():
        target_locals.append(local_shard(target_param))
        online_locals.append(local_shard(online_params[name]).to(target_locals[-1].dtype))
    if target_locals:
        torch._foreach_lerp_(target_locals, online_locals, 1.0 - tau)
