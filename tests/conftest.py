"""Shared fixtures: the CIFAR-10 folder, tiny synthetic ImageFolder datasets, the local SLURM cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CIFAR_ROOT = Path(os.environ.get("MTSSL_DATA_ROOT", REPO.parent / "shared" / "data" / "cifar10"))


def pytest_terminal_summary(terminalreporter):
    """The CPU kernels in use, printed even under -q: several tests compare floats that depend on them."""
    import torch

    terminalreporter.write_line(
        f"torch {torch.__version__}: ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN bf16 kernels {'available' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'absent'}, "
        f"{torch.get_num_threads()} threads")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR_ROOT / "train").is_dir():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_ROOT} (set MTSSL_DATA_ROOT)")
    return CIFAR_ROOT


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 32, splits=("train", "val")) -> Path:
    """Write a tiny ImageFolder of random JPEGs: root/{split}/class_k/i.jpg."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def single_process(monkeypatch):
    """A one-rank process group (checkpoints and collectives go through it), torn down afterwards."""
    from mtssl.distributed.process_group import destroy_distributed, init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = init_distributed("cpu")
    yield env
    destroy_distributed()


@pytest.fixture
def one_thread():
    """One torch thread for tiny tensors: extra threads only add contention on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------------
# The local SLURM cluster (slurm/start_local_cluster.sh)

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


@pytest.fixture(scope="module")
def slurm_cluster():
    """Skip unless a cluster with the local test layout answers; find its config if not linked in /etc."""
    state_conf = Path(os.environ.get("MTSSL_SLURM_STATE", "/tmp/mtssl-slurm"), "etc", "slurm.conf")
    with pytest.MonkeyPatch.context() as env:
        if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists() and state_conf.exists():
            env.setenv("SLURM_CONF", str(state_conf))
        problem = slurm_cluster_problem()
        if problem:
            pytest.skip(problem)
        yield
