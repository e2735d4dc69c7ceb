"""Activation checkpointing per backbone block (``train.activation_checkpointing``).

Each block (ResNet residual block, ViT transformer block: ``backbone_blocks``) keeps only its
input for backward and runs its forward again there (``torch.utils.checkpoint``, non-reentrant,
RNG state replayed so drop-path draws the same masks). The block's ``forward`` is replaced on the
instance, not the module wrapped: parameter names, state dicts, FSDP units and the EMA pairing of
online and target parameters stay as they are.

BatchNorm inside a block needs care, which torch's checkpoint does not take: the recomputation
runs in train mode, so each BN layer would update its running statistics a second time. During
the recomputation every BN layer of the block therefore normalises with batch statistics (as the
first forward did) and updates scratch copies of its running statistics, and in ghost mode (``mtssl.model.ghost_bn``, whose context
has ended by backward time) it splits its batch into the same view chunks the forward saw.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from mtssl.distributed.fsdp import backbone_blocks
from mtssl.model.ghost_bn import batch_norm_layers, batch_statistics_chunks


def checkpoint_backbone_blocks(backbone: nn.Module) -> int:
    """Checkpoint every block of ``backbone`` in place; returns the number of blocks."""
    blocks = backbone_blocks(backbone)
    for block in blocks:
        block.forward = CheckpointedForward(block)
    return len(blocks)


class CheckpointedForward:
    """A block's forward under non-reentrant activation checkpointing (installed on the instance)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs):
        forward = functools.partial(type(self.block).forward, self.block)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=self._contexts, **kwargs)

    def _contexts(self):
        """Called in the forward: the recomputation replays each BN layer's chunking of now."""
        chunks = [(layer, batch_statistics_chunks(layer)) for layer in batch_norm_layers(self.block)]
        return contextlib.nullcontext(), _BatchNormRecompute([(l, n) for l, n in chunks if n])


class _BatchNormRecompute:
    """BN layers use batch statistics per chunk, as in the forward, and leave running statistics alone."""

    def __init__(self, layers: list[tuple[_BatchNorm, int]]):
        self.layers = layers
        self.saved: list = []

    def __enter__(self):
        self.saved = [layer.__dict__.get("forward") for layer, _ in self.layers]
        for layer, num_chunks in self.layers:
            layer.forward = functools.partial(_batch_statistics_only, layer, num_chunks)
        return self

    def __exit__(self, *exc) -> bool:  # also on checkpoint's early stop, which raises out of the recomputation
        for (layer, _), forward in zip(self.layers, self.saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
        self.saved = []
        return False


def _batch_statistics_only(layer: _BatchNorm, num_chunks: int, x: torch.Tensor) -> torch.Tensor:
    """The layer's own forward per chunk, its running statistics redirected into scratch copies.

    Passing None instead would skip the update too, but autograd would then save two tensors
    fewer per layer than in the forward, and checkpoint matches saved tensors by position.
    """
    original = type(layer).forward
    saved = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    try:
        outputs = []
        for chunk in x.chunk(num_chunks) if num_chunks > 1 else (x,):
            for name, buffer in zip(("running_mean", "running_var", "num_batches_tracked"), saved):
                if buffer is not None:
                    setattr(layer, name, buffer.clone())
            outputs.append(original(layer, chunk))
        return outputs[0] if num_chunks == 1 else torch.cat(outputs)
    finally:
        layer.running_mean, layer.running_var, layer.num_batches_tracked = saved
