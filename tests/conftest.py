"""Fixtures for every test: the leak guard, one-rank process groups, one thread, tiny datasets, the SLURM cluster,
the root logger put back, `python -m mtssl.eval` in process.

Builders that tests call directly live in ``tests/support/`` (import them from there, never from a test module
or from this file).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.support.data import CIFAR_ROOT, make_image_folder
from tests.support.leak_guard import check_test_leaves_no_state
from tests.support.slurm import slurm_cluster_problem

pytest_plugins = ["pytester"]  # tests/test_leak_guard.py runs an inner pytest


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker gets an equal share of the cores, and so does every process it
    starts (a job, its ranks, a launch, a SLURM job's tasks: OMP_NUM_THREADS): N workers of all-core torch would
    oversubscribe the machine (the end-to-end job took 560 s on 2 threads beside the other worker, 304 s on 1).
    Set once per worker, before any test, so the leak guard sees it as given."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """The SLURM tests of one cluster run one after another on one worker (under ``--dist loadgroup``): a module
    that uses another cluster names its own group (``pytest.mark.xdist_group``). Tests marked ``first`` are
    collected first."""
    for item in items:
        if item.get_closest_marker("slurm") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    # xdist hands out the groups first (largest first), then single tests in this order, each to the first worker
    # that is nearly idle: the longest single test (marked ``first``) then starts early instead of ending the run.
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


def pytest_terminal_summary(terminalreporter):
    """The CPU kernels in use, printed even under -q: several tests compare floats that depend on them."""
    import torch

    terminalreporter.write_line(
        f"torch {torch.__version__}: ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN bf16 kernels {'available' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'absent'}, "
        f"{torch.get_num_threads()} threads")


@pytest.fixture(autouse=True)
def leaves_no_state(request):
    """Fail a test that leaves threads, rank environment, cwd, default dtype or a process group changed."""
    yield from check_test_leaves_no_state(f"test {request.node.nodeid}")


@pytest.fixture(scope="module", autouse=True)
def module_leaves_no_state(request):
    """The same for a module's fixtures (set up before its first test, torn down after its last)."""
    yield from check_test_leaves_no_state(f"module {request.node.nodeid}")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR_ROOT / "train").is_dir():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_ROOT} (set MTSSL_DATA_ROOT)")
    return CIFAR_ROOT


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


@pytest.fixture
def restore_logging():
    """run_job and mtssl.eval replace the root logger's handlers (the console, train.log): close theirs and put the
    earlier ones back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def eval_cli(monkeypatch, restore_logging):
    """`python -m mtssl.eval ARGS` in this process (returns its exit code), as one rank outside torchrun."""
    from mtssl.eval.__main__ import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    return main
