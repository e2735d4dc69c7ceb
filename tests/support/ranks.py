"""N CPU ranks in one test: spawned processes that meet on a free local port."""

from __future__ import annotations

import multiprocessing
import os

import torch.multiprocessing as mp

from mtssl.distributed.process_group import free_local_port as free_port


def run_ranks(fn, world_size: int, *args) -> None:
    """``fn(rank, world_size, port, *args)`` in ``world_size`` spawned processes; raises if any rank fails."""
    mp.spawn(_rank_main, args=(fn, world_size, free_port(), *args), nprocs=world_size, join=True)


def _rank_main(rank: int, fn, *args) -> None:
    """One spawned rank, as srun or torchrun would start it. A rank they start is exec'd, so its DataLoader
    workers fork (Linux's default); a spawned one inherits "spawn", and every worker of every loader would import
    torch, torchvision and timm again (~6 s of CPU per worker: 12 s per feature extraction)."""
    multiprocessing.set_start_method("fork", force=True)
    fn(rank, *args)


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun would set for one rank on this machine."""
    return dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def set_rank_env(rank: int, world_size: int, port: int) -> None:
    """Inside a spawned rank (its own process): the environment ``init_distributed`` reads."""
    os.environ.update(rank_env(rank, world_size, port))
