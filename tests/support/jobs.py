"""A tiny job: its config, a Trainer over it, and random views in its view layout.

Tests that exercise one training step need no images on disk: ``tiny_trainer`` gives the Trainer placeholder
samples and the test feeds it ``random_views``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtssl.config import compose_config, resolve_config

# ResNet-18 with one block per stage at 1/8 of its width (about 80k parameters): what the tests of training,
# resuming, sharding and scheduling assert does not depend on the size, and in 2-rank tests gloo's all-gathers and
# reduce-scatters of the full-width net cost more than its compute.
TINY_RESNET = ["+backbone.kwargs.layers=[1,1,1,1]", "+backbone.kwargs.channels=[8,16,32,64]",
               "+backbone.kwargs.stem_width=8"]
SMALL_HEADS = ["method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]",
               "method.projector.out_dim=32", "method.predictor.out_dim=32"]
# BYOL, 3 view types, the tiny ResNet-18 on 32-pixel views: one step in milliseconds.
TINY_STEP = ["method=byol", "views=global_local_cutout", "backbone=resnet18", "data=cifar10", "data.small_images=true",
             *TINY_RESNET, *SMALL_HEADS, "train.batch_size=8", "optim.warmup_epochs=0"]


def job_config(*overrides: str):
    """The resolved config of ``overrides`` (no validation against data on disk)."""
    return resolve_config(compose_config(list(overrides)))


def tiny_trainer(env, out_dir: Path, *overrides: str, base=TINY_STEP, samples: int = 64):
    """A Trainer of ``base + overrides`` with ``samples`` placeholder training samples (steps get random views)."""
    from mtssl.train.trainer import Trainer

    return Trainer(job_config(*base, *overrides), env, out_dir, train_samples=[("unused", 0)] * samples)


def random_views(trainer, generator: torch.Generator, batch: int = 8) -> list[torch.Tensor]:
    """One batch of random images per view, at each view type's size."""
    return [torch.randn(batch, 3, trainer.layout.type(t).size, trainer.layout.type(t).size, generator=generator)
            for t in trainer.view_types]


# The FSDP comparisons: one global batch of 16, split across ranks, against one process doing the same.
GLOBAL_BATCH = 16


def sharded_job_config(root: Path, overrides=()):
    """A job over the image folder ``root`` whose global batch (GLOBAL_BATCH) is split across the ranks."""
    return job_config(f"data.root={root}", "data.subset=null", f"train.batch_size={GLOBAL_BATCH}", "train.epochs=4",
                      "optim.warmup_epochs=1", *SMALL_HEADS, *overrides)


def global_views(trainer, step: int) -> list[torch.Tensor]:
    """The same global batch of views on every rank, from a fixed seed per step."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(GLOBAL_BATCH, 3, trainer.layout.type(t).size, trainer.layout.type(t).size, generator=g)
            for t, _ in trainer.layout.entries]
