"""Process groups for torchrun, submitit tasks and plain single-process runs.

A process group always exists (world size 1 uses an in-memory store), so the same FSDP2 code
path, checkpoint format and collectives serve 1 and N ranks. CUDA uses nccl; CPU uses gloo.
Ranks come from torchrun, or from SLURM when started by ``srun`` (plain or through submitit).

Across nodes (docs/multi_node.md): the rendezvous store is served by the first task of the first node,
where MASTER_ADDR points, whichever rank SLURM gave it; each task of a multi-node SLURM job sends its gloo
traffic (the host group, and the default group on CPU) through the interface of its route to another node
of the job (GLOO_SOCKET_IFNAME, unless set); and every group fails a collective that waits longer than
``train.collective_timeout_s``, so a dead node ends the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlparse

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
    nodes = slurm_step_nodes(environ)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": nodes[0] if nodes else "127.0.0.1",
        "MASTER_PORT": str(rendezvous_port(environ)),
    }


def slurm_step_nodes(environ) -> list[str]:
    """The step's host names, in SLURM's order (SLURM_NODEID indexes them); [] when not given."""
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    return slurm_hostnames(nodes) if nodes else []


def serves_rendezvous(environ) -> bool:
    """Whether this srun task serves the rendezvous store: the first task of the first node (MASTER_ADDR).

    Not rank 0 as such: with ``srun --distribution=arbitrary`` (or a requeued job placed by a host file)
    rank 0 may run on another node than the first of the node list.
    """
    return environ.get("SLURM_NODEID", "0") == "0" and environ.get("SLURM_LOCALID", "0") == "0"


# ---------------------------------------------------------------------------------------------------------------
# The interface of host collectives. Without GLOO_SOCKET_IFNAME, gloo binds the address its host's name
# resolves to locally: on many nodes a loopback address (Debian's "127.0.1.1 <hostname>"), or the address of
# another network than the one the other nodes reach it by. Each task therefore takes the interface of its
# route to a peer node: to the first node of the job, or, on the first node, to the second.


def route_interface(host: str) -> str:
    """The network interface this machine sends packets to ``host`` through (``ip route get``).

    Raises OSError with the reason when ``host`` does not resolve or ``ip`` cannot tell.
    """
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as error:
        raise OSError(f"{host} does not resolve here ({error})") from error
    try:
        out = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OSError(f"`ip route get {address}` failed ({error})") from error
    words = out.stdout.split()
    if out.returncode != 0 or "dev" not in words[:-1]:
        raise OSError(f"`ip route get {address}` found no route ({(out.stderr or out.stdout).strip()})")
    return words[words.index("dev") + 1]


def slurm_gloo_interface(environ) -> tuple[str | None, str]:
    """(GLOO_SOCKET_IFNAME for this srun task, or None to leave gloo's default; a one-line explanation)."""
    nodes = slurm_step_nodes(environ)
    here = environ.get("SLURMD_NODENAME") or socket.gethostname()
    if len(nodes) < 2:
        return None, "a one-node step: gloo's default interface serves it"
    peer = nodes[1] if here == nodes[0] else nodes[0]
    try:
        interface = route_interface(peer)
    except OSError as error:
        return None, (f"no interface found toward {peer} ({error}); gloo falls back to the address of this host's "
                      f"name, which may be unreachable from the other nodes. If the first collective hangs, export "
                      f"GLOO_SOCKET_IFNAME in launcher.setup (docs/multi_node.md)")
    if interface == "lo":  # another node's name resolves to this machine: the rendezvous cannot work either
        return None, (f"the route from {here} to {peer} goes through the loopback interface: {peer} resolves to an "
                      f"address of this machine; fix the name resolution of the nodes (docs/multi_node.md)")
    return interface, f"the route from {here} to {peer}"


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
            from mtssl.utils.errors import ConfigError

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


# How long a rank waits in a collective, or at the rendezvous for the other ranks, when the config does not say
# (train.collective_timeout_s).
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
TASK_RENDEZVOUS = "mtssl-task"  # init_method scheme of srun and submitit tasks (_task_rendezvous)


def _task_rendezvous(url: str, timeout: datetime.timedelta = datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S),
                     **_):
    """torch.distributed rendezvous handler: a TCP store at the URL's host and port, served by the task whose
    query says ``serve=1`` (``serves_rendezvous``) rather than by rank 0 as env:// does."""
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    rank, world_size = int(query["rank"]), int(query["world_size"])
    store = dist.TCPStore(parsed.hostname, parsed.port, world_size, is_master=query.get("serve") == "1",
                          timeout=timeout, wait_for_workers=True)
    yield store, rank, world_size
    raise RuntimeError(f"{TASK_RENDEZVOUS}:// rendezvous cannot be repeated")


try:
    dist.register_rendezvous_handler(TASK_RENDEZVOUS, _task_rendezvous)
except RuntimeError:  # this module imported again (importlib.reload): registered already
    pass


def init_distributed(device_preference: str = "auto", collective_timeout_s: float | None = None) -> DistEnv:
    """Join (or create) the default process group from the torchrun, srun or submitit environment.

    ``collective_timeout_s`` (``train.collective_timeout_s``; default 30 min) bounds every collective of the
    default and the host group and the wait for the other ranks at the rendezvous: past it the waiting rank
    raises, so a rank whose peer died (a node lost) fails instead of waiting forever.
    """
    global _TIMEOUT
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    slurm_task = None if launched_by_torchrun else slurm_task_env(os.environ)
    task = slurm_task or (None if launched_by_torchrun else submitit_local_task_env())
    if task is not None:  # the launcher's task layout wins over values inherited from the submitting shell
        os.environ.update(task)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=collective_timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S)
        # device_id binds nccl to this rank's GPU: barriers and object collectives then use it
        # instead of guessing the device from the rank.
        device_id = device if device.type == "cuda" else None
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id)
        elif task is not None:
            if slurm_task is not None and "GLOO_SOCKET_IFNAME" not in os.environ and len(slurm_step_nodes(os.environ)) > 1:
                _choose_gloo_interface(rank)
            serves = serves_rendezvous(os.environ) if slurm_task is not None else local_rank == 0  # one host
            host = f"[{task['MASTER_ADDR']}]" if ":" in task["MASTER_ADDR"] else task["MASTER_ADDR"]  # IPv6
            init_method = f"{TASK_RENDEZVOUS}://{host}:{task['MASTER_PORT']}?serve={int(serves)}"
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timeout, device_id=device_id)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id)
        _TIMEOUT = timeout
    host_group()  # created now, while every rank is here (new_group is a collective)
    return DistEnv(rank, world_size, local_rank, device)


def _choose_gloo_interface(rank: int) -> None:
    """Set GLOO_SOCKET_IFNAME for this srun task (``slurm_gloo_interface``) and say so on stderr, in the task's
    log: which interface carries the host collectives is the first question when a multi-node job hangs."""
    interface, why = slurm_gloo_interface(os.environ)
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        print(f"mtssl rank {rank}: host collectives (gloo) through GLOO_SOCKET_IFNAME={interface}, {why}",
              file=sys.stderr, flush=True)
    else:
        print(f"mtssl rank {rank}: GLOO_SOCKET_IFNAME left unset: {why}", file=sys.stderr, flush=True)


def host_group():
    """A gloo group for host values (counts, flags, objects, barriers) that must not touch the GPU:
    the default group itself when it is plain gloo, else a gloo group over the same ranks (with the
    default group's timeout: ``new_group`` would otherwise give it torch's 30 minutes)."""
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = (dist.new_group(backend="gloo", timeout=_TIMEOUT) if dist.get_backend() != "gloo"
                       else dist.group.WORLD)
    return _HOST_GROUP


_HOST_GROUP = None
_TIMEOUT: datetime.timedelta | None = None  # the default group's (init_distributed)


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
    global _HOST_GROUP, _TIMEOUT
    if dist.is_initialized():
        if all_ranks_done:
            groups = {id(g): g for g in (dist.group.WORLD, _HOST_GROUP) if g is not None}
            for group in groups.values():
                dist.barrier(group=group)  # gloo's barrier also waits for all earlier work on the group
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
    _HOST_GROUP = None
    _TIMEOUT = None


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for ranks spawned on this machine (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
