"""Optimisers (LARS, SGD, AdamW) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtssl.distributed.collectives import device_sum_, world_size
from mtssl.distributed.fsdp import local_shard


class LARS(torch.optim.Optimizer):
    """LARS as used by BYOL and MoCo v3: SGD momentum with a layer-wise trust ratio.

    For adapted parameters the update is u = g + wd * w, scaled by
    ``trust_coefficient * ||w|| / ||u||`` (1 when either norm is 0). Groups with
    ``lars_exclude=True`` (biases, norm layers) get neither weight decay nor adaptation.
    Works on FSDP2-sharded DTensor parameters: the squared norms of all local shards are summed
    with one all-reduce per step. Every tensor operation is a foreach call over a whole group
    (a few kernels per step, not a few per parameter).

    The update is built in place in ``p.grad`` (no parameter-sized temporary: one copy of the
    model less at peak, and on CPU no fresh pages to fault in every step), so after ``step()``
    ``p.grad`` holds the scaled update, not the gradient. Read gradients before the step.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        groups = []  # (group, local weights, local updates (the gradients, modified in place), local momentum buffers)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            weights = [local_shard(p) for p in params]
            updates = [local_shard(p.grad) for p in params]
            buffers = [local_shard(self._momentum_buffer(p)) for p in params]
            if not group["lars_exclude"] and group["weight_decay"]:
                torch._foreach_add_(updates, weights, alpha=group["weight_decay"])
            groups.append((group, weights, updates, buffers))
        adapted = [g for g in groups if not g[0]["lars_exclude"]]
        if adapted:
            weights = [w for _, ws, _, _ in adapted for w in ws]
            updates = [u for _, _, us, _ in adapted for u in us]
            norms = torch.stack(torch._foreach_norm(weights + updates, 2, dtype=torch.float32))
            if world_size() > 1:  # sum the squares over the shards of every parameter
                norms = device_sum_(norms.square()).sqrt()
            w_norm, u_norm = norms.split(len(weights))
            coefficient = self._trust_coefficients([(g["trust_coefficient"], len(ws)) for g, ws, _, _ in adapted], norms.device)
            trust = torch.where((w_norm > 0) & (u_norm > 0), coefficient * w_norm / u_norm, torch.ones_like(w_norm))
            torch._foreach_mul_(updates, list(trust.to(updates[0].dtype).unbind()))
        for group, weights, updates, buffers in groups:
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(weights, buffers, alpha=-group["lr"])
        return loss

    def _trust_coefficients(self, layout: list[tuple[float, int]], device: torch.device) -> torch.Tensor:
        """Per-parameter trust coefficients, built once per layout: a host-to-device copy each
        step would block the host on CUDA (the list lives in pageable memory)."""
        key = (tuple(layout), device)
        cache = self.__dict__.setdefault("_coefficient_cache", {})
        if key not in cache:
            values = [c for c, n in layout for _ in range(n)]
            cache[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return cache[key]

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]


def parameter_groups(model: nn.Module, weight_decay: float, fixed_lr_prefixes: tuple[str, ...] = (),
                     weight_decay_1d: bool = False) -> list[dict]:
    """Split trainable parameters into groups.

    1-D parameters (biases, norm scales) get no LARS adaptation, and no weight decay unless
    ``weight_decay_1d`` (SimSiam decays every parameter). Parameters whose name starts with one
    of ``fixed_lr_prefixes`` keep the peak lr (SimSiam's predictor).
    """
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_1d = p.ndim <= 1
        fixed = name.startswith(fixed_lr_prefixes) if fixed_lr_prefixes else False
        key = (is_1d, fixed)
        if key not in groups:
            decay = weight_decay if weight_decay_1d or not is_1d else 0.0
            groups[key] = dict(params=[], weight_decay=decay, lars_exclude=is_1d, fixed_lr=fixed)
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _lars(groups: list[dict], optim_cfg, peak_lr: float) -> torch.optim.Optimizer:
    return LARS(groups, lr=peak_lr, weight_decay=optim_cfg.weight_decay, momentum=optim_cfg.momentum,
                trust_coefficient=optim_cfg.trust_coefficient)


def _sgd(groups: list[dict], optim_cfg, peak_lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=peak_lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                           foreach=True)


def _adamw(groups: list[dict], optim_cfg, peak_lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay,
                             foreach=True)


# optim.name -> builder; the config's check of optim.name reads this registry.
OPTIMIZERS = {"lars": _lars, "sgd": _sgd, "adamw": _adamw}
# optim.schedule_per: the lr changes every step, or once per epoch (after a per-step warmup).
SCHEDULE_PER = ("step", "epoch")


def build_optimizer(optim_cfg, model: nn.Module, peak_lr: float, fixed_lr_prefixes: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """``optim.name`` one of ``OPTIMIZERS``; the lr is set per step by ``lr_at_step``."""
    groups = parameter_groups(model, optim_cfg.weight_decay, fixed_lr_prefixes, bool(optim_cfg.weight_decay_1d))
    name = optim_cfg.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {name!r}; valid names are {sorted(OPTIMIZERS)}")
    if name != "lars":  # only LARS reads the flag
        for g in groups:
            g.pop("lars_exclude")
    return OPTIMIZERS[name](groups, optim_cfg, peak_lr)


def peak_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """Linear scaling rule: base_lr * batch / 256."""
    return base_lr * global_batch_size / 256


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_ratio: float = 0.001,
               steps_per_update: int = 1) -> float:
    """Linear warmup from 0, then cosine from ``peak_lr`` down to ``final_ratio * peak_lr``.

    ``steps_per_update``: after the warmup (always per step, so no block is spent at lr 0) the lr
    only changes every that many steps, holding the value of the first step of each block (the
    steps per epoch give SimSiam's schedule set once per epoch).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    step = max(warmup_steps, step - step % max(1, steps_per_update))
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    final = final_ratio * peak_lr
    return final + (peak_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, peak_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = peak_lr if group.get("fixed_lr") else lr
