"""The global state a test must leave as it found it, and the check that enforces it.

A test that changes torch's thread count, the rank environment, the current directory, the default dtype or
the process group, and does not restore it, silently changes every test collected after it (one such leak
once ran most of the suite on one thread). ``tests/conftest.py`` runs :func:`check_test_leaves_no_state` around
every test and every module.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

WATCHED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
WATCHED_ENV_PREFIXES = ("MTSSL_",)


@dataclass(frozen=True)
class GlobalState:
    threads: int
    env: dict = field(hash=False)
    cwd: str
    default_dtype: torch.dtype
    process_group: bool
    threads_running: frozenset = field(hash=False)


def watched_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in WATCHED_ENV or k.startswith(WATCHED_ENV_PREFIXES)}


def snapshot() -> GlobalState:
    return GlobalState(
        threads=torch.get_num_threads(), env=watched_env(), cwd=os.getcwd(), default_dtype=torch.get_default_dtype(),
        process_group=dist.is_available() and dist.is_initialized(),
        threads_running=frozenset(t for t in threading.enumerate() if not t.daemon))


def differences(before: GlobalState, after: GlobalState) -> list[str]:
    """What changed, one readable line per item."""
    found = []
    if after.threads != before.threads:
        found.append(f"torch.get_num_threads() is {after.threads}, was {before.threads} (restore it, or use the "
                     "one_thread fixture)")
    for key in sorted(set(before.env) | set(after.env)):
        if before.env.get(key) != after.env.get(key):
            found.append(f"environment variable {key}={after.env.get(key)!r}, was {before.env.get(key)!r} "
                         "(use monkeypatch.setenv)")
    if after.cwd != before.cwd:
        found.append(f"current directory is {after.cwd}, was {before.cwd} (use monkeypatch.chdir)")
    if after.default_dtype != before.default_dtype:
        found.append(f"torch default dtype is {after.default_dtype}, was {before.default_dtype}")
    if after.process_group != before.process_group:
        state = "initialised" if after.process_group else "destroyed"
        found.append(f"the default process group was left {state} (use the single_process fixture)")
    for thread in after.threads_running - before.threads_running:
        thread.join(timeout=2.0)  # a thread that is finishing gets a moment
        if thread.is_alive():
            found.append(f"non-daemon thread {thread.name!r} is still running")
    return found


def restore(before: GlobalState) -> None:
    """Put the process back, so one leak fails one test and not every test after it."""
    torch.set_num_threads(before.threads)
    for key in set(watched_env()) - set(before.env):
        del os.environ[key]
    os.environ.update(before.env)
    os.chdir(before.cwd)
    torch.set_default_dtype(before.default_dtype)
    if not before.process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_test_leaves_no_state(what: str):
    """A generator for a fixture: snapshot, run the test (or module), then fail naming what it left behind."""
    before = snapshot()
    yield
    found = differences(before, snapshot())
    if found:
        restore(before)
        raise AssertionError(f"{what} left global state behind:\n  " + "\n  ".join(found))
