"""Process groups for torchrun, submitit tasks and plain single-process runs.

A process group always exists (world size 1 uses an in-memory store), so the same FSDP2 code
path, checkpoint format and collectives serve 1 and N ranks. CUDA uses nccl; CPU uses gloo.
Ranks come from torchrun, or from SLURM when started by ``srun`` (plain or through submitit).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
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


# Rendezvous ports: below Linux's ephemeral range (32768-60999), where the kernel picks the
# source ports of outgoing connections, and above the usual service ports.
PORT_BASE, PORT_SPAN = 12000, 20000


def rendezvous_port(environ) -> int:
    """MASTER_PORT of a SLURM job: a hash of the job (heterogeneous leader, array job and task) id.

    Every task of one job derives the same port (the components of a heterogeneous job too: they
    share the leader's id); each array task has its own key, so jobs sharing a node collide only
    when two hashes meet (1 in PORT_SPAN for any pair).
    """
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        key = f"array:{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    else:  # one id shared by every component of a heterogeneous job
        key = f"job:{environ.get('SLURM_HET_JOB_ID') or environ.get('SLURM_JOB_ID', '0')}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return PORT_BASE + int.from_bytes(digest, "little") % PORT_SPAN


def slurm_hostnames(node_list: str) -> list[str]:
    """Expand a SLURM node list (``gpu[01-03,07],login``) with submitit's parser."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(node_list)


def slurm_task_env(environ) -> dict[str, str] | None:
    """torch.distributed's variables for a task started by ``srun`` (directly or by submitit).

    None outside an srun step: the batch script has SLURM_PROCID=0 but no SLURM_STEP_ID, and its
    SLURM_NTASKS counts the tasks of the allocation, not the one process running it.
    """
    in_step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID")) is not None
    if not in_step or "SLURM_PROCID" not in environ:
        return None
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": slurm_hostnames(nodes)[0] if nodes else "127.0.0.1",
        "MASTER_PORT": str(rendezvous_port(environ)),
    }


def submitit_local_task_env() -> dict[str, str] | None:
    """The same variables inside a task of submitit's local executor (no SLURM); None elsewhere."""
    if not any(k.startswith("SUBMITIT_LOCAL_") for k in os.environ):
        return None
    import submitit

    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # not in a submitit job
        return None
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(rendezvous_port({"SLURM_JOB_ID": str(job_env.job_id)})),
    }


def select_device(preference: str, local_rank: int) -> torch.device:
    """The rank's device: GPU ``local_rank``, or GPU 0 when the task sees a single one (one GPU bound per
    task, ``--gpus-per-task=1``: every task sees its own GPU as number 0, whatever its local rank).

    More local ranks than visible GPUs is refused here: wrapping them around would put two ranks on one GPU,
    which nccl only reports later ("Duplicate GPU detected"). Tasks sharing one visible GPU cannot be told
    apart from bound ones; nccl's error at initialisation names that case.
    """
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if count == 0 or (count > 1 and local_rank >= count):
            from mtssl.config import ConfigError  # deferred: the config module imports the data pipelines

            seen = "no GPU is visible" if count == 0 else f"only {count} GPUs are visible on this node"
            raise ConfigError(
                f"train.device: local rank {local_rank} needs its own GPU but {seen}. Start at most one task per "
                f"GPU on each node (srun --ntasks-per-node={max(count, 1)}, torchrun --nproc-per-node={max(count, 1)}), "
                "bind one GPU per task (srun --gpus-per-task=1), or use train.device=cpu"
            )
        index = local_rank if count > 1 else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join (or create) the default process group from the torchrun, srun or submitit environment."""
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    task = None if launched_by_torchrun else (slurm_task_env(os.environ) or submitit_local_task_env())
    if task is not None:  # the launcher's task layout wins over values inherited from the submitting shell
        os.environ.update(task)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        # device_id binds nccl to this rank's GPU: barriers and object collectives then use it
        # instead of guessing the device from the rank.
        device_id = device if device.type == "cuda" else None
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id)
    host_group()  # created now, while every rank is here (new_group is a collective)
    return DistEnv(rank, world_size, local_rank, device)


def host_group():
    """A gloo group for host values (counts, flags, objects, barriers) that must not touch the GPU:
    the default group itself when it is plain gloo, else a gloo group over the same ranks."""
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _HOST_GROUP


_HOST_GROUP = None


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
    global _HOST_GROUP
    if dist.is_initialized():
        if all_ranks_done:
            groups = {id(g): g for g in (dist.group.WORLD, _HOST_GROUP) if g is not None}
            for group in groups.values():
                dist.barrier(group=group)  # gloo's barrier also waits for all earlier work on the group
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _HOST_GROUP = None
