"""Process groups for torchrun, submitit tasks and plain single-process runs.

A process group always exists (world size 1 uses an in-memory store), so the same FSDP2 code
path, checkpoint format and collectives serve 1 and N ranks. CUDA uses nccl; CPU uses gloo.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_submitit_env() -> None:
    """Inside a submitit task, derive torch.distributed's env vars from SLURM's."""
    try:
        import submitit

        job_env = submitit.JobEnvironment()
    except RuntimeError:  # not in a submitit job
        return
    # SLURM's task layout wins over values inherited from the submitting shell.
    os.environ["RANK"] = str(job_env.global_rank)
    os.environ["LOCAL_RANK"] = str(job_env.local_rank)
    os.environ["WORLD_SIZE"] = str(job_env.num_tasks)
    os.environ["MASTER_ADDR"] = job_env.hostnames[0]
    # One port per job id, so jobs sharing a node do not collide.
    job_id = "".join(ch for ch in str(job_env.job_id) if ch.isdigit()) or "0"
    os.environ["MASTER_PORT"] = str(20000 + int(job_id) % 20000)


def select_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join (or create) the default process group from torchrun / submitit environment."""
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if not launched_by_torchrun and any(k in os.environ for k in ("SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER", "SLURM_JOB_ID")):
        _export_submitit_env()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device)


def cpu_group():
    """A gloo group for small host-side agreements (stop flags) that must not sync the GPU."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


_CPU_GROUP = None


def agree_any(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if dist.get_world_size() == 1:
        return list(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=cpu_group())
    return [bool(v) for v in tensor.tolist()]


def broadcast_object(obj, src: int = 0):
    if dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def destroy_distributed(all_ranks_done: bool = True) -> None:
    """Destroy the process groups while the interpreter is still fully alive.

    A gloo worker thread can hold the last reference to a finished collective whose tensors have
    Python objects. If it drops it during interpreter shutdown it cannot take the GIL and the
    process aborts ("terminate called without an active exception"): SLURM then records a job
    that finished its work as FAILED. So, when every rank reached the end (``all_ranks_done``;
    after an exception on one rank a barrier could wait for peers that never come), wait until
    all collectives completed everywhere, let the worker threads release them, free unreachable
    FSDP state now, and only then destroy the groups.
    """
    global _CPU_GROUP
    if dist.is_initialized():
        if all_ranks_done:
            groups = {id(g): g for g in (dist.group.WORLD, _CPU_GROUP) if g is not None}
            for group in groups.values():
                dist.barrier(group=group)  # gloo's barrier also waits for all earlier work on the group
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _CPU_GROUP = None
