"""Whether the local SLURM test cluster (slurm/start_local_cluster.sh) answers, and SLURM commands with a limit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

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
