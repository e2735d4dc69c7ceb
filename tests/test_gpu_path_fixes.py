"""The GPU-path defects of the review (docs/gpu_limits.md, items 1-14), each where a CPU test can see it.

What only CUDA shows (stream ordering, nccl, kernel limits) is checked by the GPU acceptance run; these tests
check the CPU-visible half of each fix: counts of collectives and host copies, the error paths, the equalities.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtssl.config import ConfigError
from mtssl.distributed.process_group import select_device
from tests.support.data import make_image_folder
from tests.support.jobs import TINY_RESNET


# ---------------------------------------------------------------------------- 10: more local ranks than GPUs
def test_more_local_ranks_than_visible_gpus_is_refused_with_the_fix(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match=r"local rank 6 .* only 4 GPUs .*--ntasks-per-node=4.*--gpus-per-task=1"):
        select_device("cuda", local_rank=6)  # wrapped onto cuda:2 before, beside local rank 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no GPU is visible.*train.device=cpu"):
        select_device("cuda", local_rank=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU bound per task: each task's is number 0
    assert select_device("cuda", local_rank=5) == torch.device("cuda", 0)
    assert chosen == [3, 0]


# ---------------------------------------------------------------------------- 8: kNN ties in bounded memory
def _top_k_by_hand(similarity: torch.Tensor, index: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the global indices of the k largest similarities, ties to the smaller index (a sort by hand)."""
    index = index.expand_as(similarity)
    return [[int(i) for _, i in sorted(zip((-similarity[r]).tolist(), index[r].tolist()))[:k]] for r in range(len(similarity))]


def test_knn_ties_are_reranked_in_blocks_of_bounded_memory(monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    import mtssl.eval.knn as knn

    queries, bank, k = 64, 4096, 5
    monkeypatch.setattr(knn, "TIE_BLOCK_ELEMENTS", 4 * bank, raising=False)  # 4 tied rows per block
    generator = torch.Generator().manual_seed(0)
    # Collapsed features: every similarity equal, so every row ties with every column; a few rows with
    # distinct values (no tie) and a few with a partial tie at the k-th value, over shuffled global indices.
    similarity = torch.zeros(queries, bank)
    similarity[:8] = torch.rand(8, bank, generator=generator)
    similarity[8:16, :3] = 2.0
    index = torch.randperm(10 * bank, generator=generator)[:bank]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        values, position = knn._top_k_by_index(similarity, index, k)
    assert index[position].tolist() == _top_k_by_hand(similarity, index, k)
    assert torch.equal(values, similarity.gather(1, position))
    # Beyond the [Q, k] results, no op allocates more than an eighth of the similarity block (before: a [Q, M]
    # int64 key and an int64 count of the values >= the k-th, each twice the block).
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= similarity.numel() * similarity.element_size() / 8, largest
    # The merge step's [Q, W * k] candidates come with a per-row index.
    per_row = torch.stack([torch.randperm(bank, generator=generator) for _ in range(queries)])
    _, position = knn._top_k_by_index(similarity, per_row, k)
    assert per_row.gather(1, position).tolist() == _top_k_by_hand(similarity, per_row, k)


# ---------------------------------------------------------------------------- 2 gloo ranks: 3, 4 and 13
# One spawn for the three items (starting ranks is most of the cost). Each rank writes its findings after each
# part, so a part that hangs on broken code (13: ranks on different checkpoints) leaves the others' results.
TWO_RANK_DEADLINE_S = 240
TINY_TRAINER = [
    "data.subset=null", "train.batch_size=8", "train.epochs=2", "optim.warmup_epochs=0", "backbone=resnet18",
    *TINY_RESNET,
    "method.projector.hidden_dims=[16]", "method.predictor.hidden_dims=[16]", "method.projector.out_dim=8",
    "method.predictor.out_dim=8", "train.log_every_steps=1",
]
# Per-view mode under bf16: one call per view of every unit (online and target: 2 global views each); a narrow
# backbone and tiny views (CPU bf16 convolutions run on ATen's scalar kernels).
COUNTED = [*TINY_TRAINER, "train.precision=bf16", "views=global", "data.view_sizes.global=16"]


def _count_collectives(counts: collections.Counter) -> None:
    """Count FSDP2's all-gathers and reduce-scatters (torch 2.11 calls the *_tensor names, 2.14 the *_single ones)."""
    for name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            original = getattr(dist, name)
            kind = "all_gather" if name.startswith("all_gather") else "reduce_scatter"

            def counted(*args, _original=original, _kind=kind, **kwargs):
                counts[_kind] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def _manages_parameters(unit) -> bool:
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch before grouped fully_shard
        groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
    return any(group.fsdp_params for group in groups)


def _write(out: Path, rank: int, report: dict) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _two_rank_worker(rank, world_size, port, root, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.modules.batchnorm import _BatchNorm

    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.checkpoint import RANK_BUFFERS, CheckpointManager, ModelAndOptimizer, TrainerState
    from mtssl.distributed.process_group import destroy_distributed, init_distributed
    from mtssl.train.trainer import Trainer

    env = init_distributed("cpu")
    report: dict = {}
    counts: collections.Counter = collections.Counter()
    _count_collectives(counts)
    from mtssl.distributed.fsdp import BLOCK_CLASS_NAMES

    cfg = resolve_config(compose_config([f"data.root={root}", *COUNTED]))
    trainer = Trainer(cfg, env, out / "bf16")
    units = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
    generator = torch.Generator().manual_seed(rank)
    views = [torch.randn(2, 3, 16, 16, generator=generator) for _ in trainer.layout.entries]
    trainer.training_step(views, 0)  # FSDP's lazy initialisation
    counts.clear()
    trainer.training_step(views, 1)
    blocks = sum(type(m).__name__.removeprefix("FSDP") in BLOCK_CLASS_NAMES for m in units)
    report["bf16"] = {
        "units": len(units), "units_with_parameters": sum(_manages_parameters(m) for m in units),
        "planned_units": blocks + 2 * 2 + len(trainer.model.predictors) + 1,  # + backbones, projectors, predictors, root
        "batch_norm_units": sum(isinstance(m, _BatchNorm) for m in units),
        "all_gathers": counts["all_gather"], "reduce_scatters": counts["reduce_scatter"],
    }
    _write(out, rank, report)

    # 13: two checkpoints; every rank must resume from the same one.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(out / "checkpoints", keep=3, rank=rank)
    weights = {}
    for step in (1, 2):
        with torch.no_grad():
            model[0].weight.fill_(float(step))
            model[1].running_mean.fill_(float(step + 10 * rank))
        manager.save(TrainerState(step=step, config_hash="h", world_size=world_size), ModelAndOptimizer(model, optimizer), "")
        weights[step] = model[0].weight[0, 0].item()

    def resume(listing=None):
        with torch.no_grad():
            model[0].weight.zero_()
            model[1].running_mean.zero_()
        if listing is not None:  # a stale directory listing on this rank
            manager.checkpoints = lambda: [p for p in CheckpointManager.checkpoints(manager) if p.name in listing]
        state = manager.load_latest(ModelAndOptimizer(model, optimizer), "h")
        manager.__dict__.pop("checkpoints", None)
        return {"step": state.step, "weight": model[0].weight[0, 0].item(), "running_mean": model[1].running_mean[0].item()}

    report["stale_listing"] = resume(["step_00000001"] if rank == 1 else None)
    _write(out, rank, report)
    if rank == 1:  # this rank cannot read its own buffers of the newest checkpoint
        (out / "checkpoints" / "step_00000002" / RANK_BUFFERS.format(rank=1)).write_bytes(b"truncated")
    dist.barrier()
    report["unreadable_own_file"] = resume()
    report["expected_weights"] = weights
    _write(out, rank, report)
    destroy_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' reports ({} for a rank that did not get there before the deadline)."""
    out = tmp_path_factory.mktemp("two_ranks")
    root = make_image_folder(out / "data", per_class=8, splits=("train",))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_two_rank_worker, args=(2, port, root, out), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TWO_RANK_DEADLINE_S
    try:
        while not context.join(timeout=1) and time.monotonic() < deadline:
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads(p.read_text()) if p.exists() else {} for p in (out / "rank0.json", out / "rank1.json")]


@pytest.mark.slow
def test_per_view_steps_all_gather_each_unit_once_and_batch_norm_has_no_unit_of_its_own(two_ranks):
    counted = two_ranks[0]["bf16"]
    # 3: the units of the plan (blocks, backbones, projectors, predictors, root), none for a BatchNorm (before: one
    # fp32 unit per BatchNorm, 29 more units for this backbone and heads).
    assert counted["batch_norm_units"] == 0 and counted["units"] == counted["planned_units"], counted
    # 4: one all-gather per unit holding parameters and step, although each unit runs once per view, on the
    # online and the target side, and again in backward (before: re-gathered for every call and in backward).
    assert counted["all_gathers"] == counted["units_with_parameters"], counted


@pytest.mark.slow
def test_all_ranks_resume_from_one_checkpoint(two_ranks):
    assert all("unreadable_own_file" in report for report in two_ranks), "a rank hung: the ranks disagreed"
    expected = two_ranks[0]["expected_weights"]
    for rank, report in enumerate(two_ranks):
        # rank 1's stale listing lacks the newest checkpoint: rank 0's listing is used
        assert report["stale_listing"]["step"] == 2 and report["stale_listing"]["weight"] == expected["2"]
        # rank 1 cannot read its own file of step 2: every rank resumes from step 1, its own statistics included
        assert report["unreadable_own_file"] == {"step": 1, "weight": expected["1"], "running_mean": 1.0 + 10 * rank}


# ---------------------------------------------------------------------------- 9: train.cuda_deterministic
@pytest.fixture
def restored_determinism(monkeypatch):
    """configure_determinism sets process-wide flags: put them back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored by monkeypatch
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.cuda.enable_flash_sdp(saved[4])
    torch.backends.cuda.enable_cudnn_sdp(saved[5])


def test_cuda_determinism_is_strict_and_autotuning_runs_without_it(restored_determinism, monkeypatch):
    import os
    from types import SimpleNamespace

    from mtssl.train.trainer import configure_determinism

    cuda = torch.device("cuda")  # only flags are set: no GPU needed
    torch.use_deterministic_algorithms(False)
    configure_determinism(SimpleNamespace(cuda_deterministic=False, deterministic=True), cuda)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # not a deterministic workspace: replaced
    configure_determinism(SimpleNamespace(cuda_deterministic=True, deterministic=True), cuda)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.mem_efficient_sdp_enabled()  # deterministic in strict mode
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_cuda_determinism_refuses_the_vit_position_embedding_resample(tmp_path, monkeypatch):
    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.process_group import DistEnv
    from mtssl.train.trainer import Trainer

    root = make_image_folder(tmp_path / "data", per_class=4, splits=("train",))
    base = [f"data.root={root}", "data.subset=null", "train.batch_size=4", "backbone=vit_tiny", "+backbone.kwargs.depth=1",
            "train.cuda_deterministic=true", "data.small_images=true"]
    cuda = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))  # refused before any CUDA work
    with pytest.raises(ConfigError, match=r"train.cuda_deterministic: the ViT resamples its 32 px position embedding for "
                                          r"the \[16\] px views .*train.cuda_deterministic=false"):
        Trainer(resolve_config(compose_config([*base, "views=global_local"])), cuda, tmp_path / "out")


# ---------------------------------------------------------------------------- 12: a stop inside an evaluation phase
EVAL_TINY = [
    "data.subset=null", "train.batch_size=8", "train.epochs=0", "data.num_workers=0", "backbone=resnet18",
    *TINY_RESNET,
    "eval.linear_epochs=3", "eval.knn_k=[3]", "eval.batch_size=4",
    "eval.linear_lrs=[0.1]",
]


class SignalAt:
    """A stop signal that arrives once ``arrived`` is set (by the test, from inside a phase)."""

    signum = 12  # SIGUSR2: the job is requeued

    def __init__(self):
        self.arrived = False

    @property
    def requested(self) -> bool:
        return self.arrived


def test_a_stop_inside_a_phase_stops_at_its_next_batch_or_epoch_and_the_rerun_completes(tmp_path, monkeypatch):
    import mtssl.eval.end_of_training as job
    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.process_group import DistEnv
    from mtssl.model.siamese import backbone_kwargs, build_backbone

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    root = make_image_folder(tmp_path / "data", per_class=6)
    cfg = resolve_config(compose_config([f"data.root={root}", *EVAL_TINY]))
    torch.manual_seed(0)
    online = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone)).state_dict()
    for name in ("whole", "stopped"):
        (tmp_path / name).mkdir()
    uninterrupted = job.evaluate_states(cfg, env, online, None, None, tmp_path / "whole")

    # The signal arrives during the third feature batch of the online kNN phase.
    stop, forwards = SignalAt(), []
    frozen = job._frozen_backbone

    def counting_backbone(*args):
        backbone = frozen(*args)
        backbone.register_forward_pre_hook(lambda module, inputs: forwards.append(stop.requested))
        backbone.register_forward_hook(lambda module, inputs, output: setattr(stop, "arrived", len(forwards) >= 3))
        return backbone

    monkeypatch.setattr(job, "_frozen_backbone", counting_backbone)
    out = tmp_path / "stopped"
    with pytest.raises(job.EvaluationInterrupted):
        job.evaluate_states(cfg, env, online, None, None, out, stop=stop)
    assert forwards == [False, False, False]  # no batch after the signal: 3 of the phase's 6 batches ran
    assert not (out / job.EVAL_STATE).exists()  # nothing finished
    monkeypatch.setattr(job, "_frozen_backbone", frozen)

    # The rerun finishes the kNN phase; the signal arrives as the linear probe starts: one epoch of its 2 x 3.
    epochs = []
    probe = job.linear_probe_sharded

    def signalled_probe(*args, **kwargs):
        stop.arrived = True
        check = kwargs["check_stop"]
        kwargs["check_stop"] = lambda: (epochs.append(1), check())
        return probe(*args, **kwargs)

    stop.arrived = False
    monkeypatch.setattr(job, "linear_probe_sharded", signalled_probe)
    with pytest.raises(job.EvaluationInterrupted):
        job.evaluate_states(cfg, env, online, None, None, out, stop=stop)
    assert epochs == [1]
    assert list(json.loads((out / job.EVAL_STATE).read_text())["phases"]) == ["knn"]
    monkeypatch.setattr(job, "linear_probe_sharded", probe)

    resumed = job.evaluate_states(cfg, env, online, None, None, out)  # redoes the linear phase
    assert resumed == json.loads(json.dumps(uninterrupted))


# ---------------------------------------------------------------------------- 14: the kNN curve ends at the final kNN
@pytest.mark.slow
def test_knn_during_bf16_training_ends_at_the_end_of_job_knn(single_process, tmp_path, monkeypatch):
    import mtssl.eval.features as features
    import mtssl.eval.end_of_training as job
    import mtssl.eval.knn_monitor as monitor
    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.fsdp import full_state_dict
    from mtssl.distributed.preemption import StopRequest
    from mtssl.train.trainer import Trainer

    root = make_image_folder(tmp_path / "data", per_class=4)  # one step of 8
    cfg = resolve_config(compose_config([
        f"data.root={root}", *TINY_TRAINER, "train.epochs=1", "data.num_workers=0", "train.precision=bf16",
        "views=global", "data.view_sizes.global=16", "monitor.knn_every_epochs=1", "eval.knn_k=[3,5]", "eval.batch_size=8",
        "eval.linear_epochs=1", "eval.linear_lrs=[0.1]"]))
    extracted = {}  # features of each extraction, by caller and description

    def spy(name):
        def extract(*args, description="features", **kwargs):
            shard = features.extract_feature_shard(*args, description=description, **kwargs)
            extracted[(name, description)] = shard.features
            return shard
        return extract

    monkeypatch.setattr(monitor, "extract_feature_shard", spy("monitor"))
    monkeypatch.setattr(job, "extract_feature_shard", spy("job"))
    trainer = Trainer(cfg, single_process, tmp_path / "out")  # bf16: FSDP2 even on one rank
    knn = monitor.KnnMonitor(cfg, single_process, trainer.model.online.backbone, trainer.train_samples, tmp_path / "out")
    stop = StopRequest()
    try:
        trainer.fit(stop, None, on_epoch_end=knn)
    finally:
        stop.restore()
    end = job.evaluate_states(cfg, single_process, full_state_dict(trainer.model.online.backbone), None,
                              trainer.train_samples, tmp_path / "out")
    # The same fp32 network extracts both: bitwise the same features (before: the bf16 training copy's), so the
    # curve's last point is the final number.
    assert torch.equal(extracted[("monitor", "kNN val features")], extracted[("job", "online val features")])
    assert torch.equal(extracted[("monitor", "kNN bank features")], extracted[("job", "online train features")])
    last = knn.evaluations[-1]
    assert last["knn"] == end["knn"] and (last["top1"], last["top5"]) == (end["knn_top1"], end["knn_top5"])


# ---------------------------------------------------------------------------- 1, 2, 5, 6: the gpu pipeline
def _jpeg(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    import io

    import numpy as np
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _gpu_transform(decode_on_device: bool = False):
    from mtssl.data.gpu_augment import GpuMultiViewTransform
    from mtssl.data.views import VIEW_TYPES, ViewLayout

    layout = ViewLayout(tuple(VIEW_TYPES[name] for name in ("global", "local", "cutout")))  # 5 views, every op
    return GpuMultiViewTransform(layout, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), decode_on_device=decode_on_device)


def _worker_samples(transform, paths, seed: int = 0) -> list:
    from PIL import Image

    samples = []
    for i, path in enumerate(paths):
        torch.manual_seed(seed + i)
        with Image.open(path) as image:
            samples.append(transform(image))
    return samples


def _old_per_crop_views(transform, samples, uint8_kernel: bool) -> list[torch.Tensor]:
    """The device path before the batched one (fef54f3), kept as the reference: per crop its own copy, float
    conversion, resize, clamp and round; the hue rotation over the whole batch at each position (``where``)."""
    import torch.nn.functional as F

    import mtssl.data.gpu_augment as G

    params = torch.stack([s[0] for s in samples])
    scale, shift, fill = transform._on(torch.device("cpu"))
    views = []
    for v, spec in enumerate(transform.views):
        resized = []
        for sample in samples:
            x = sample[1 + v].permute(2, 0, 1).unsqueeze(0)
            if uint8_kernel:
                x = x.contiguous(memory_format=torch.channels_last)
                x = F.interpolate(x, size=(spec.size, spec.size), mode="bicubic", antialias=True).to(torch.float32)
            else:
                x = F.interpolate(x.to(torch.float32), size=(spec.size, spec.size), mode="bicubic", antialias=True)
                x = x.clamp_(0.0, 255.0).round_()
            resized.append(x)
        x = G.augment_batch(torch.cat(resized), params[:, v], spec, fill)  # hue_samples=None: the old `where`
        views.append(torch.addcmul(shift, x, scale).contiguous())
    return views


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, size in enumerate([(500, 375), (320, 240), (375, 500), (640, 480), (300, 300), (500, 333)]):
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(*size, seed=i))
    return paths


@pytest.mark.parametrize("uint8_kernel", [True, False], ids=["cpu-uint8-resize", "device-float-resize"])
def test_batched_views_equal_the_per_crop_path_with_one_copy_per_batch(photos, uint8_kernel, one_thread):
    from mtssl.data.device_prefetch import _tensors

    transform = _gpu_transform()
    transform.uint8_resize = uint8_kernel
    samples = _worker_samples(transform, photos)
    batch = transform.collate(samples)
    # 5: what the prefetcher copies (and the loader pins) is one tensor, whatever the batch (before: 1 + B x V)
    assert len(list(_tensors(batch))) == 1
    assert len(list(_tensors(transform.collate(samples[:2])))) == 1
    views = transform.to_views(batch, torch.device("cpu"))
    expected = _old_per_crop_views(transform, samples, uint8_kernel)
    for v, (got, want) in enumerate(zip(views, expected)):
        assert torch.equal(got, want), (v, (got - want).abs().max())
    # the hue rotation ran on some samples at some position, and not on all of them
    jittered_hue = [n for per_view in batch[1].hue_rows for _, n in per_view]
    assert 0 < sum(jittered_hue) < 4 * len(samples) * len(transform.views)


def test_device_decode_reads_nothing_back_to_the_host(photos, monkeypatch, one_thread):
    # 1: with decode_on_device the boxes and JPEG bytes stay on the host side of the batch: to_views makes no
    # device->host transfer (before: the boxes' .tolist() and one .cpu() per image, each a sync on CUDA).
    transform = _gpu_transform(decode_on_device=True)
    samples = _worker_samples(transform, photos)
    assert all(s[1].dim() == 1 for s in samples)  # JPEG bytes shipped
    batch = transform.collate(samples)
    transfers = collections.Counter()

    def counting(name, original):
        def method(self, *args, **kwargs):
            if name != "to" or any(str(a) == "cpu" for a in (*args, kwargs.get("device"))):
                transfers[name] += 1
            return original(self, *args, **kwargs)
        return method

    for name in ("tolist", "item", "cpu", "numpy", "to", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    views = transform.to_views(batch, torch.device("cpu"))
    monkeypatch.undo()
    assert not transfers, transfers
    assert [tuple(v.shape) for v in views] == [(6, 3, 224, 224)] * 2 + [(6, 3, 96, 96)] * 2 + [(6, 3, 224, 224)]


def test_corrupt_and_cmyk_jpegs_do_not_end_a_device_decoded_batch(photos, tmp_path, caplog, one_thread):
    from mtssl.data.image_folder import AugmentedImageFolder, collate_views

    # 2: a truncated JPEG (its header reads: the worker ships it) and a CMYK one (nvJPEG has no CMYK conversion in
    # torchvision: the worker decodes it).
    corrupt, cmyk = tmp_path / "corrupt.jpg", tmp_path / "cmyk.jpg"
    corrupt.write_bytes(_jpeg(320, 240, seed=10)[:700])
    cmyk.write_bytes(_jpeg(320, 240, seed=11, mode="CMYK"))
    transform = _gpu_transform(decode_on_device=True)
    files = [str(p) for p in photos[:3]] + [str(corrupt), str(cmyk)]
    dataset = AugmentedImageFolder([(path, 0) for path in files], transform, seed=0)
    batch, _, skipped = collate_views([dataset[(0, i)] for i in range(5)], transform.collate)
    assert not skipped  # the workers read headers only: the corrupt file passed them
    with caplog.at_level("WARNING"):
        views = transform.to_views(batch, torch.device("cpu"))  # raised for the whole batch before
    assert transform.take_skipped() == {str(corrupt)} and transform.take_skipped() == set()
    assert dataset[(0, 4)][0][1].dim() == 3  # the CMYK file arrives as the worker's crops, not as bytes
    assert f"skipping unreadable image {corrupt}" in caplog.text
    # The other samples' views are those of a batch without the corrupt file; its rows hold a stand-in's crops.
    alone, _, _ = collate_views([dataset[(0, i)] for i in (0, 1, 2, 4)], transform.collate)
    for got, want in zip(views, transform.to_views(alone, torch.device("cpu"))):
        assert torch.equal(got[[0, 1, 2, 4]], want) and torch.isfinite(got[3]).all()


def test_large_downscale_is_pre_reduced_for_the_device_resize(monkeypatch, one_thread):
    import torch.nn.functional as F

    import mtssl.data.gpu_augment as G

    # 6: a 40 x 5000 crop to 96 px is a 52x downscale, beyond CUDA's antialiased kernel (about 47x)
    field = torch.rand(1, 3, 4, 50, generator=torch.Generator().manual_seed(0)) * 255  # a smooth colour field
    crop = F.interpolate(field, size=(40, 5000), mode="bicubic").clamp(0, 255).round().to(torch.uint8)[0]
    direct = F.interpolate(crop[None].float(), size=(96, 96), mode="bicubic", antialias=True).clamp(0, 255).round()
    factors = []
    interpolate = F.interpolate

    def recording(x, size=None, **kwargs):
        factors.append(max(x.shape[-2] / size[0], x.shape[-1] / size[1]))
        return interpolate(x, size=size, **kwargs)

    monkeypatch.setattr(G.F, "interpolate", recording)
    resized = G.resize_crops([crop], 96, uint8_kernel=False)
    assert max(factors) <= 32, factors  # MAX_ANTIALIAS_DOWNSCALE, below the kernel's limit
    difference = (resized - direct).abs()
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_a_file_only_the_device_cannot_decode_is_counted_as_skipped(single_process, tmp_path, one_thread):
    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.preemption import StopRequest
    from mtssl.train.trainer import Trainer

    root = make_image_folder(tmp_path / "data", per_class=2, splits=("train",))
    corrupt = root / "train" / "class_0" / "0.jpg"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: data.find(b"\xff\xda") + 40])  # cut inside the scan: the header still reads
    cfg = resolve_config(compose_config([f"data.root={root}", *TINY_TRAINER, "data.pipeline=gpu", "data.num_workers=0",
                                         "train.batch_size=4", "train.max_steps=1", "views=global", "data.view_sizes.global=16"]))
    trainer = Trainer(cfg, single_process, tmp_path / "out")
    trainer.transform.decode_on_device = True  # data.gpu_decode, which the trainer enables on CUDA only
    stop = StopRequest()
    try:
        outcome = trainer.fit(stop)
    finally:
        stop.restore()
    assert outcome.status == "completed" and outcome.skipped_files == [str(corrupt)]
