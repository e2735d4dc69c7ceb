"""One DataLoader per run: the run-long sampler against the per-epoch one, workers started once, the
device prefetcher's CPU pass-through, and a mid-epoch resume through the persistent loader."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

import mtssl.train.trainer as trainer_module
from mtssl.config import compose_config, resolve_config
from mtssl.data.device_prefetch import DevicePrefetcher
from mtssl.data.image_folder import GlobalBatchSampler
from mtssl.distributed.process_group import DistEnv, destroy_distributed, init_distributed
from mtssl.distributed.preemption import StopRequest
from mtssl.train.trainer import Trainer
from tests.support.data import make_image_folder


def per_epoch_batches(num_samples, global_batch, rank, world, seed, start_step, stop_step):
    """The old loop's batches: a new per-epoch iteration from (epoch, offset) of each epoch's start step."""
    steps_per_epoch = num_samples // global_batch
    local = global_batch // world
    batches, step = [], start_step
    while step < stop_step:
        epoch, batch = divmod(step, steps_per_epoch)
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for b in range(batch, steps_per_epoch):
            if step >= stop_step:
                break
            lo = b * global_batch + rank * local
            batches.append([(epoch, i) for i in order[lo : lo + local]])
            step += 1
    return batches


@pytest.mark.parametrize("start,stop", [(0, 12), (5, 12), (3, 10), (7, 8), (4, 4)])
@pytest.mark.parametrize("world", [1, 2])
def test_run_sampler_yields_the_per_epoch_batches(start, stop, world):
    # 37 samples, global batch 8: 4 steps per epoch (5 samples dropped each epoch), 3 epochs.
    for rank in range(world):
        sampler = GlobalBatchSampler(37, 8, rank, world, seed=3)
        sampler.set_position(start, stop)
        got = list(sampler)
        assert len(sampler) == len(got) == stop - start
        assert got == per_epoch_batches(37, 8, rank, world, 3, start, stop)


def test_default_stop_is_the_end_of_the_epoch():
    sampler = GlobalBatchSampler(37, 8, 0, 1, seed=3)
    sampler.set_position(5)
    assert list(sampler) == per_epoch_batches(37, 8, 0, 1, 3, 5, 8)


def test_prefetcher_on_cpu_passes_the_loader_batches_through():
    batches = [([torch.full((2, 3), float(i))], torch.tensor([i]), {f"bad{i}"}) for i in range(4)]
    out = list(DevicePrefetcher(batches, torch.device("cpu")))
    assert len(out) == len(batches) and all(a is b for a, b in zip(out, batches))


TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=2", "data.num_workers=2", "data.pipeline=fast",
    "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]", "method.projector.out_dim=32",
    "method.predictor.out_dim=32", "train.log_every_steps=2", "train.checkpoint_every_steps=100", "optim.warmup_epochs=0",
]  # 2 classes x 8 images / batch 8: 2 steps per epoch, 4 in all


def record_worker(path: Path, worker_id: int) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {worker_id}\n")


@pytest.fixture
def one_rank(monkeypatch):
    """A one-process group (HashStore), as ``python -m mtssl.run`` makes without a launcher."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(key, raising=False)
    env = init_distributed("cpu")
    yield env
    destroy_distributed()


def fit(env: DistEnv, root: Path, out_dir: Path, *overrides: str) -> Trainer:
    cfg = resolve_config(compose_config([f"data.root={root}", "train.device=cpu", *TINY, *overrides]))
    trainer = Trainer(cfg, env, out_dir)
    stop = StopRequest()
    try:
        trainer.fit(stop)
    finally:
        stop.restore()
    return trainer


@pytest.mark.slow
def test_two_epochs_start_workers_once_and_resume_mid_epoch_exactly(one_rank, one_thread, tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    starts = tmp_path / "workers.txt"
    monkeypatch.setattr(trainer_module, "ignore_interrupts", functools.partial(record_worker, starts))
    straight = fit(one_rank, root, tmp_path / "straight")
    # 2 workers for the whole run (a loader per epoch started 2 per epoch: 4).
    workers = [line.split() for line in starts.read_text().splitlines()]
    assert sorted(worker_id for _, worker_id in workers) == ["0", "1"]
    for pid, _ in workers:  # and stopped when fit returns
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    # Cut mid-epoch 1, then resume: the new loader starts at step 3, mid-epoch.
    fit(one_rank, root, tmp_path / "resumed", "train.max_steps=3")
    resumed = fit(one_rank, root, tmp_path / "resumed")
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
