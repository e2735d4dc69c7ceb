"""Ghost BatchNorm: several views in one backbone call, BatchNorm statistics per view.

Forwarding same-resolution views as one batch makes each call bigger and cheaper per image,
but plain BatchNorm would then normalise with statistics over the whole group, which changes
the method. ``GhostBatchNorm`` is a context in which every BatchNorm layer of a module splits its
batch into the equal chunks of the views it holds and normalises each chunk with that chunk's
own statistics, exactly as one call per view would. Outputs, losses and gradients therefore
equal per-view mode up to float rounding.

Running statistics are an exponential average, so their value depends on the order of the
updates, and per-view mode interleaves resolutions (global, global, local, local, cutout).
Each chunk's batch mean and unbiased variance are recorded instead, and the updates are
applied when the context exits, in view order, as per-view calls would have made them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

GROUPED_VIEW_MODES = ("ghost", "plain")
# train.view_batching -> the model's grouping mode: none (one backbone call per view, as in the paper),
# bn_per_view (same-size views in one call, BatchNorm statistics still per view: same results), bn_shared (one
# call, BatchNorm statistics over the group: changes the method). The config's check reads this registry.
VIEW_BATCHING = {"none": None, "bn_per_view": "ghost", "bn_shared": "plain"}


def view_batching_mode(value: str) -> str | None:
    """The grouping mode (``MultiTaskSiamese``'s ``grouped_views``) of a ``train.view_batching`` value."""
    if value in VIEW_BATCHING:
        return VIEW_BATCHING[value]
    from mtssl.config import ConfigError  # deferred: config imports the view registry only

    raise ConfigError(f"train.view_batching: {value!r} is not a mode; valid values are {list(VIEW_BATCHING)}")


def grouped_views_mode(value) -> str | None:
    """Parse ``MultiTaskSiamese``'s ``grouped_views``: None (per view), "ghost" or "plain"; ``True`` means "plain"."""
    if value is None or value is False:
        return None
    if value is True:
        return "plain"
    if isinstance(value, str) and value.lower() in GROUPED_VIEW_MODES:
        return value.lower()
    raise ValueError(f"grouped_views: {value!r} is not a mode; valid values are None/False, 'ghost' and "
                     f"'plain' (True); the job config's field is train.view_batching ({list(VIEW_BATCHING)})")


def batch_norm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def _uses_batch_statistics(layer: _BatchNorm) -> bool:
    return layer.training or layer.running_mean is None


def batch_statistics_chunks(layer: _BatchNorm) -> int:
    """How many chunks ``layer`` normalises separately right now: 0 when it uses running statistics
    (eval), the number of views inside a ``GhostBatchNorm.views`` context, else 1."""
    if not _uses_batch_statistics(layer):
        return 0
    forward = layer.__dict__.get("forward")
    if isinstance(forward, _GhostForward) and forward.ghost.view_ids is not None:
        return len(forward.ghost.view_ids)
    return 1


class GhostBatchNorm:
    """Context making ``module``'s BatchNorm layers normalise per view chunk.

    Usage (``views`` of one resolution, concatenated in the order of ``view_ids``)::

        with GhostBatchNorm(encoder) as ghost:
            for view_ids, batch in groups:
                with ghost.views(view_ids):
                    out = encoder(batch)
        # running statistics are now those of per-view calls in view-id order

    Outside ``views(...)`` the layers behave normally. On an exception the recorded running
    statistic updates are dropped. A context may be entered again (one per encoder, every step).
    """

    def __init__(self, module: nn.Module):
        self.layers = batch_norm_layers(module)
        self.view_ids: tuple[int, ...] | None = None
        # One persistent forward per layer: reusing the context keeps the same objects
        # installed every step, so torch.compile guards on them do not fail and recompile.
        self.forwards = [_GhostForward(self, layer) for layer in self.layers]

    def covers(self, module: nn.Module) -> bool:
        """Whether ``module`` still has exactly these BatchNorm layers (none swapped since)."""
        current = batch_norm_layers(module)
        return len(current) == len(self.layers) and all(a is b for a, b in zip(current, self.layers))

    def __enter__(self) -> "GhostBatchNorm":
        for layer, forward in zip(self.layers, self.forwards):
            # An instance attribute shadows the class's forward for nn.Module.__call__.
            layer.forward = forward
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for layer in self.layers:
            del layer.forward
        if exc_type is None:
            self._apply_running_updates()
        for forward in self.forwards:
            forward.records.clear()

    @contextlib.contextmanager
    def views(self, view_ids: Sequence[int]) -> Iterator[None]:
        """The next forwards hold ``len(view_ids)`` equal chunks, of these views, in this order."""
        self.view_ids = tuple(view_ids)
        try:
            yield
        finally:
            self.view_ids = None

    # ------------------------------------------------------------------ per layer
    def forward(self, layer: _BatchNorm, x: torch.Tensor, records: list) -> torch.Tensor:
        original = type(layer).forward
        if self.view_ids is None or not _uses_batch_statistics(layer):
            return original(layer, x)  # running statistics only: chunking changes nothing
        num_chunks = len(self.view_ids)
        if x.shape[0] % num_chunks:
            raise ValueError(f"ghost BatchNorm: batch of {x.shape[0]} does not split into {num_chunks} equal view chunks")
        chunks = x.chunk(num_chunks)
        if layer.running_mean is None:  # no running statistics to keep
            return torch.cat([original(layer, c) for c in chunks])
        # momentum 1 on zeroed buffers leaves exactly a chunk's mean and unbiased variance in them
        stats = torch.zeros((num_chunks, 2, layer.num_features), dtype=layer.running_mean.dtype, device=layer.running_mean.device)
        if type(layer).forward is _BatchNorm.forward:
            layer._check_input_dim(x)
            outputs = [F.batch_norm(c, s[0], s[1], layer.weight, layer.bias, True, 1.0, layer.eps) for c, s in zip(chunks, stats)]
        else:  # subclasses with their own forward (SyncBatchNorm, BatchNorm + activation)
            outputs = [self._wrapped_chunk(layer, original, c, s) for c, s in zip(chunks, stats)]
        records.extend(zip(self.view_ids, stats))
        return outputs[0] if num_chunks == 1 else torch.cat(outputs)

    @staticmethod
    def _wrapped_chunk(layer: _BatchNorm, original, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """The layer's own forward on one chunk, its running statistics redirected into ``stats``."""
        saved = (layer.running_mean, layer.running_var, layer.num_batches_tracked, layer.momentum)
        layer.running_mean, layer.running_var, layer.momentum = stats[0], stats[1], 1.0
        if saved[2] is not None:
            layer.num_batches_tracked = torch.zeros_like(saved[2])
        try:
            return original(layer, x)
        finally:
            layer.running_mean, layer.running_var, layer.num_batches_tracked, layer.momentum = saved

    @torch.no_grad()
    def _apply_running_updates(self) -> None:
        """r <- (1 - f) r + f s for each recorded chunk s in view order, as per-view calls update.

        Folded into r <- keep * r + sum_i w_i s_i with w_i = f_i prod_{j > i} (1 - f_j) and
        keep = prod_j (1 - f_j), applied with foreach ops over all layers sharing the factors
        (a few kernels per encoder, no host-device traffic).
        """
        groups: dict[tuple, list[tuple[_BatchNorm, list]]] = {}
        counters: dict[int, list[torch.Tensor]] = {}  # batches to add -> num_batches_tracked tensors
        for layer, forward in zip(self.layers, self.forwards):
            if not forward.records:
                continue
            records = sorted(forward.records, key=lambda r: r[0])
            if layer.momentum is None:  # cumulative moving average: factors 1/n, n = batches seen
                seen = int(layer.num_batches_tracked)  # per-view mode reads it on the host too
                factors = [1.0 / (seen + i + 1) for i in range(len(records))]
            else:
                factors = [float(layer.momentum)] * len(records)
            if layer.num_batches_tracked is not None:
                counters.setdefault(len(records), []).append(layer.num_batches_tracked)
            weights, keep = [], 1.0
            for f in reversed(factors):
                weights.append(f * keep)
                keep *= 1.0 - f
            groups.setdefault((keep, tuple(reversed(weights))), []).append((layer, records))
        for (keep, weights), members in groups.items():
            running = [l.running_mean for l, _ in members] + [l.running_var for l, _ in members]
            torch._foreach_mul_(running, keep)
            for i, w in enumerate(weights):
                chunk_stats = [r[i][1][0] for _, r in members] + [r[i][1][1] for _, r in members]
                torch._foreach_add_(running, chunk_stats, alpha=w)
        for count, tensors in counters.items():
            torch._foreach_add_(tensors, count)


class _GhostForward:
    """Bound per-layer forward installed by ``GhostBatchNorm`` (a plain callable, no module state)."""

    def __init__(self, ghost: GhostBatchNorm, layer: _BatchNorm):
        self.ghost = ghost
        self.layer = layer
        self.records: list[tuple[int, torch.Tensor]] = []  # (view id, [mean; unbiased var]) per chunk

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost.forward(self.layer, x, self.records)
