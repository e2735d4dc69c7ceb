"""Siamese objectives: a pair loss and a target update, and nothing else.

BYOL, SimSiam and MoCo v3 share every other piece of the training step; adding an objective
means adding one ``Objective`` entry to ``OBJECTIVES`` (plus its config preset).

A pair loss takes a prediction ``p`` [B, D] and a *prepared* target (``prepare_target`` of the
target projection ``z``), so per-step work on targets (normalising, all-gathering MoCo keys)
happens once per global view, not once per pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mtssl.distributed.collectives import device_all_gather_cat, rank


def byol_pair_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL: mean over the batch of 2 - 2 cos(p, z)."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()


def simsiam_pair_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam: negative mean cosine similarity."""
    return -F.cosine_similarity(p, z, dim=-1).mean()


def gather_keys(z: torch.Tensor) -> torch.Tensor:
    """L2-normalised keys of all ranks, concatenated in rank order (no gradient)."""
    return device_all_gather_cat(F.normalize(z.detach(), dim=-1))


def mocov3_pair_loss(q: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MoCo v3: 2 tau CE(q^ k^T / tau) with positives on the diagonal, offset by this rank."""
    q = F.normalize(q, dim=-1)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return 2 * temperature * F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class Objective:
    """What distinguishes one Siamese method from another."""

    name: str
    pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prepare_target: Callable[[torch.Tensor], torch.Tensor]
    ema_target: bool  # True: EMA copy of the online encoder; False: online encoder under stop-gradient


def _detached(z: torch.Tensor) -> torch.Tensor:
    return z.detach()


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "byol": lambda: Objective("byol", byol_pair_loss, _detached, ema_target=True),
    "simsiam": lambda: Objective("simsiam", simsiam_pair_loss, _detached, ema_target=False),
    "mocov3": lambda temperature=1.0: Objective(
        "mocov3", lambda q, k: mocov3_pair_loss(q, k, temperature), gather_keys, ema_target=True
    ),
}


def build_objective(method_cfg) -> Objective:
    """``method.name`` plus its keyword options (``method.objective_kwargs``)."""
    return OBJECTIVES[method_cfg.name](**dict(method_cfg.get("objective_kwargs") or {}))
