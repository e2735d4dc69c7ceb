"""Whether the local SLURM test cluster (slurm/start_local_cluster.sh) answers, SLURM commands with a limit, and
the processes of a job on it (to freeze, signal or watch)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

READY_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def run_slurm_command(*command: str) -> subprocess.CompletedProcess:
    """A SLURM command's output; a hang (unreachable controller) becomes exit code 124 after 30 s."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"`{' '.join(command)}` took over 30 s")


def slurm_cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a usable cluster answers."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no `sinfo`); run `sudo slurm/start_local_cluster.sh`"
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # SLURM would retry reading it for 60 s
        return f"SLURM_CONF={conf} does not exist; unset it or start the cluster"
    ping = run_slurm_command("scontrol", "ping")  # fails at once when no controller runs; sinfo would retry ~10 s
    nodes = run_slurm_command("sinfo", "--noheader", "--Node", "--format=%T") if ping.returncode == 0 else ping
    if nodes.returncode != 0:
        reason = (nodes.stderr or nodes.stdout).strip().splitlines()[0]
        return f"no SLURM cluster answers ({reason}); run `sudo slurm/start_local_cluster.sh`"
    if not READY_NODE_STATES & set(nodes.stdout.split()):
        return f"no SLURM node is ready (states: {nodes.stdout.split()}); see the slurmd log"
    partitions = set(run_slurm_command("sinfo", "--noheader", "--format=%R").stdout.split())
    if not {"low", "high"} <= partitions:
        return f"the cluster lacks the 'low' and 'high' partitions (has {sorted(partitions)}); see slurm/"
    accounting = run_slurm_command("sacct", "--noheader", "--starttime=now-1hours")
    if accounting.returncode != 0:
        return f"SLURM accounting does not answer (`sacct`: {accounting.stderr.strip()})"
    return None


def rank_pids(sweep_dir: Path) -> list[int]:
    """The job's task processes (python -m submitit.core._submit <sweep_dir>/.submitit/...), on every node of this
    machine's cluster; not srun, whose command line holds the same words."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (proc.name.isdigit() and args and b"python" in Path(args[0].decode()).name.encode()
                and b"submitit.core._submit" in args and any(str(sweep_dir).encode() in a for a in args)):
            pids.append(int(proc.name))
    return pids


def proc_status(pid: int) -> str | None:
    """/proc/<pid>/status, or None once the process ended."""
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None


def usr2_pending_or_running(pid: int) -> bool:
    """Whether a stopped (SIGSTOP) process has SIGUSR2 pending, or is no longer stopped."""
    status = proc_status(pid)
    if status is None or "State:\tT" not in status:
        return True  # ended, or woken up (SLURM sends SIGCONT before its signal)
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd", "SigPnd"))]
    return any(mask & (1 << (signal.SIGUSR2 - 1)) for mask in masks)


def freeze_until_usr2(pids: list[int], launcher: subprocess.Popen, then=lambda: None) -> None:
    """Freeze a job's ranks, call ``then`` (what makes SLURM signal them: a preempting job, a time limit near),
    and let them go on once SLURM's SIGUSR2 is pending. Freezing stands in for a slow job: the signal then surely
    lands mid-training."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: all("State:\tT" in (proc_status(p) or "State:\tT") for p in pids), "ranks to stop", 10, launcher)
    then()
    wait_for(lambda: all(usr2_pending_or_running(p) for p in pids), "SLURM's SIGUSR2", 150, launcher)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def wait_for(condition, what: str, timeout_s: float, launcher: subprocess.Popen) -> None:
    """Poll ``condition`` until it holds; fail the test on a timeout or when ``launcher`` ended meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert launcher.poll() is None, f"the launcher ended while waiting for {what}: {launcher.communicate()[0]}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
