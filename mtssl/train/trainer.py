"""The multi-task pretraining loop: one explicit step shared by every method.

Per step: the online network sees every view, the target network (EMA copy, or the online one
under stop-gradient for SimSiam) sees only the global views, the multi-task loss is built from
the method's pair loss, one backward, the optimiser step, then the EMA update.

Runs survive the cluster: SIGUSR2, SIGTERM and a first SIGINT only set a flag; at the next step
boundary all ranks agree on it, write a synchronous checkpoint and stop (``TrainingInterrupted``; the
protocol is mtssl.distributed.preemption).
Randomness is a function of (seed, rank, step) and of (seed, epoch, sample), so a resumed run is
bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mtssl.distributed.checkpoint import CheckpointManager, ModelAndOptimizer, TrainerState
from mtssl.config import ConfigError, config_hash, describe_changes
from mtssl.data.device_prefetch import DevicePrefetcher
from mtssl.data.image_folder import AugmentedImageFolder, GlobalBatchSampler, class_balanced_subset, collate_views, list_image_folder
from mtssl.distributed.collectives import device_mean_, host_any, host_union
from mtssl.distributed.preemption import StopRequest, TrainingInterrupted, ignore_interrupts
from mtssl.distributed.process_group import DistEnv
from mtssl.job_folder import CHECKPOINTS, JobStatus, update_progress
from mtssl.train.ema import ema_momentum, ema_update
from mtssl.train.research_monitors import TrainingMonitors
from mtssl.data.pipelines import AUGMENTATION_PIPELINES
from mtssl.distributed.fsdp import backbone_blocks, compute_parameters, precision_kernels, reshard_all, shard_model
from mtssl.model.activation_checkpoint import checkpoint_backbone_blocks
from mtssl.model.siamese import MultiTaskSiamese, build_model
from mtssl.loss.multitask import multitask_loss, task_pair_counts, view_pair_loss_sum
from mtssl.loss.objectives import Objective, build_objective
from mtssl.train.optim import build_optimizer, lr_at_step, peak_learning_rate, set_learning_rate
from mtssl.data.views import ViewLayout, build_view_layout

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """What ``Trainer.training_step`` returns; all tensors detached, none read on the host."""

    loss: torch.Tensor
    task_losses: dict[str, torch.Tensor]
    embeddings: torch.Tensor  # online projections of the first target view (for the collapse monitor)
    grad_norm: torch.Tensor | None  # total gradient norm before the optimiser step, when asked for
    view_projections: dict[str, torch.Tensor] | None = None  # online projections of each view type's first view (RankMe)


@dataclass
class PretrainOutcome:
    status: JobStatus  # COMPLETED | DIVERGED
    model: MultiTaskSiamese
    layout: ViewLayout
    train_samples: list
    steps: int
    final_losses: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    skipped_files: list[str] = field(default_factory=list)  # distinct unreadable training files, sorted
    error: str | None = None
    monitor: dict = field(default_factory=dict)  # the research monitors' summary (mtssl.train.research_monitors)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the step's own randomness (dropout, drop-path) on one rank."""
    digest = hashlib.blake2b(f"step:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# cuBLAS's fixed workspace sizes that make its reductions repeatable (read when the first cuBLAS handle is made).
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


def configure_determinism(train_cfg, device: torch.device) -> None:
    """Deterministic kernels where the config asks for them (process-wide; call before any CUDA work).

    CPU (``train.deterministic``): deterministic algorithms, and CPU runs are bitwise repeatable.
    CUDA (``train.cuda_deterministic``): deterministic algorithms in strict mode (``warn_only=False``: an op
    without a deterministic CUDA kernel raises, naming itself, instead of warning and breaking the bitwise
    resume), cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG), cuDNN's deterministic algorithms without
    autotuning, and scaled-dot-product attention restricted to its memory-efficient and math kernels, whose
    backward is deterministic in strict mode (flash and cuDNN attention are switched off). The ViT's
    position-embedding resample has no deterministic backward: ``Trainer`` refuses it beforehand.
    CUDA without determinism: cuDNN autotunes its convolution algorithms (``cudnn.benchmark``), once per shape.
    """
    if device.type == "cuda":
        if train_cfg.cuda_deterministic:
            if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS_WORKSPACES:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS_WORKSPACES[0]
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.use_deterministic_algorithms(True, warn_only=False)
        else:
            torch.backends.cudnn.benchmark = True
    elif train_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def cuda_nondeterminism(model: MultiTaskSiamese, layout: ViewLayout) -> str | None:
    """What of the training step has no deterministic CUDA kernel, or None."""
    backbone = model.online.backbone
    if getattr(backbone, "dynamic_img_size", False) and getattr(backbone, "patch_embed", None) is not None:
        native = tuple(backbone.patch_embed.img_size)
        resampled = sorted({t.size for t in layout.types if (t.size, t.size) != native})
        if resampled:
            return (f"the ViT resamples its {native[0]} px position embedding for the {resampled} px views (bicubic "
                    "interpolation, whose CUDA backward accumulates with atomics: no deterministic kernel)")
    return None


def training_samples(cfg: DictConfig) -> list:
    samples, _ = list_image_folder(cfg.data.root, cfg.data.train_split)
    if cfg.data.subset is not None:
        samples = class_balanced_subset(samples, cfg.data.subset, cfg.data.subset_seed)
    return samples


def compile_backbones(model: MultiTaskSiamese) -> None:
    """torch.compile each backbone block in place (the step, which calls backward, never).

    Called before ``shard_model``, in torchtitan's and dinov3's order (compile per block, then
    fully_shard per block): a block is one graph and FSDP2's all-gather and reshard hooks run
    around it. Static shapes: one graph per view resolution, and every block instance and
    resolution needs its own: far more than dynamo's default recompile limit of 8.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    for encoder in (model.online, model.target):
        if encoder is not None:
            for block in backbone_blocks(encoder.backbone):
                block.compile(dynamic=False)


def _mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over ranks of scalar device tensors, read on the host (logging steps only)."""
    keys = sorted(values)
    stacked = device_mean_(torch.stack([values[k].detach().float() for k in keys]))
    return dict(zip(keys, stacked.tolist()))


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings: ~1/sqrt(D) when healthy, 0 on collapse."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


class Trainer:
    """Builds every component of a job from its config and runs the pretraining loop."""

    def __init__(self, cfg: DictConfig, env: DistEnv, out_dir: Path, train_samples: list | None = None):
        """``train_samples``: (path, label) pairs to train on instead of the config's data folder
        (benchmarks that feed synthetic views only need their count)."""
        self.cfg = cfg
        self.env = env
        self.out_dir = Path(out_dir)
        self.layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
        self.view_types = [name for name, _ in self.layout.entries]
        self.target_indices = self.layout.target_indices
        self.weights = {t.name: t.weight for t in self.layout.types}
        self.objective: Objective = build_objective(cfg.method)

        if cfg.train.sync_bn and env.device.type != "cuda":
            raise ConfigError(
                "train.sync_bn: synchronised BatchNorm needs CUDA (torch's SyncBatchNorm refuses CPU tensors); "
                "use train.sync_bn=false (per-rank statistics, as in the paper)"
            )
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg, self.layout.task_names, cfg.data.small_images, self.objective.ema_target)
        if env.device.type == "cuda" and cfg.train.cuda_deterministic and (problem := cuda_nondeterminism(model, self.layout)):
            raise ConfigError(f"train.cuda_deterministic: {problem}; use views of the backbone's size only "
                              "(data.view_sizes, views=global) or train.cuda_deterministic=false")
        if cfg.train.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(env.device)
        if cfg.train.activation_checkpointing:  # torchtitan's order: checkpointing, compile, fully_shard
            checkpoint_backbone_blocks(model.online.backbone)  # the target runs without grad: nothing to save
        if cfg.train.compile:
            compile_backbones(model)
        # One fp32 CPU rank has nothing to shard and no mixed precision: skip FSDP's per-forward parameter
        # copies. DCP checkpoints reshard between plain and sharded layouts, so 1 <-> N resumes work.
        # bf16 always goes through FSDP2, whose policy is the one place precision is set.
        plain = env.world_size == 1 and env.device.type == "cpu" and cfg.train.precision == "fp32"
        self.model = model if plain else shard_model(model, cfg.train.precision)

        self.train_samples = training_samples(cfg) if train_samples is None else train_samples
        self.sampler = GlobalBatchSampler(len(self.train_samples), cfg.train.batch_size, env.rank, env.world_size, cfg.train.seed)
        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.train.epochs * steps_per_epoch
        # Warmup is capped at 10% of training so short runs still reach the peak lr.
        self.warmup_steps = min(cfg.optim.warmup_epochs * steps_per_epoch, self.total_steps // 10)
        self.peak_lr = peak_learning_rate(cfg.optim.base_lr, cfg.train.batch_size)
        fixed = ("predictors.",) if cfg.method.fixed_predictor_lr else ()
        self.optimizer = build_optimizer(cfg.optim, self.model, self.peak_lr, fixed)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        # The pipeline's worker part runs in the dataset; its to_views runs in the loop, on the device.
        self.transform = AUGMENTATION_PIPELINES[cfg.data.pipeline](self.layout, cfg.data.mean, cfg.data.std)
        self.dataset = AugmentedImageFolder(self.train_samples, self.transform, cfg.train.seed)
        if hasattr(self.transform, "decode_on_device"):  # data.gpu_decode: nvJPEG, on CUDA only
            self.transform.decode_on_device = bool(cfg.data.gpu_decode) and env.device.type == "cuda"
        self.checkpoints = CheckpointManager(self.out_dir / CHECKPOINTS, cfg.train.keep_checkpoints, env.rank)
        self.config_hash = config_hash(cfg)
        self.config_yaml = OmegaConf.to_yaml(cfg)
        self.monitors = TrainingMonitors(cfg.get("monitor"), self.layout.task_names)

    # ------------------------------------------------------------------ one step
    def training_step(self, views: list[torch.Tensor], step: int, measure_grad_norm: bool = False) -> StepOutput:
        """Forward all views, build the multi-task loss, backward, optimiser step and EMA update.

        ``measure_grad_norm``: also return the gradients' total norm, taken before the optimiser
        step (LARS builds its update in the gradient tensors); off by default, since on FSDP it
        is a collective.
        """
        with precision_kernels(self.cfg.train.precision, self.env.device):
            return self._training_step(views, step, measure_grad_norm)

    def _training_step(self, views: list[torch.Tensor], step: int, measure_grad_norm: bool) -> StepOutput:
        if self.cfg.train.channels_last:  # activations follow the input's layout; parameters stay contiguous (FSDP2)
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        set_learning_rate(self.optimizer, self.learning_rate(step), self.peak_lr)
        if self.cfg.train.backward == "per_view":  # no joint graph: the probe is refused (mtssl.config)
            loss, task_losses, projections = self._backward_per_view(views)
        else:
            predictions, target_projections, projections = self.model(views, self.view_types, self.target_indices)
            prepared = [self.objective.prepare_target(z.float()) for z in target_projections]
            loss, task_losses = multitask_loss(
                [p.float() for p in predictions], self.view_types, prepared, self.target_indices, self.objective.pair_loss, self.weights
            )
            if self.monitors.probe_due(step):  # per-task gradients from this graph, before its backward
                self.monitors.probe(step, task_losses, compute_parameters(self.model, self.model.online))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        reshard_all(self.model)  # units stay unsharded over the step's forwards and backwards (mtssl.distributed.fsdp)
        if self.cfg.optim.clip_grad:  # clipping measures the norm anyway (before clipping)
            total_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.clip_grad, foreach=True)
        elif measure_grad_norm:
            total_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None], foreach=True)
        grad_norm = None
        if measure_grad_norm:  # on FSDP a DTensor of the shards' partial norms: full_tensor() combines them (a collective)
            grad_norm = (total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm).detach()
        self.optimizer.step()
        if self.model.target is not None:
            ema_update(self.model.target, self.model.online, self.tau(step))
        return StepOutput(
            loss.detach(),
            {k: v.detach() for k, v in task_losses.items()},
            projections[self.target_indices[0]].detach(),
            grad_norm,
            {t: projections[self.view_types.index(t)].detach() for t in self.layout.task_names},
        )

    def _backward_per_view(self, views: list[torch.Tensor]):
        """``train.backward=per_view``: target projections first (no grad), then one forward and backward
        per view, so only one view's activations are alive at a time. The loss is a sum of per-view
        terms against stop-gradient targets, so the gradients are those of one backward up to
        summation order. Returns (loss, task losses, every view's online projection), all detached.

        Under FSDP2 each backward reduce-scatters into the sharded gradients, which accumulate. (Its
        no-sync mode, ``set_requires_gradient_sync(False)``, fails in torch 2.14 on units a view does
        not run, such as the other view types' predictors.)"""
        self.optimizer.zero_grad(set_to_none=True)
        _, target_projections, _ = self.model(views, self.view_types, self.target_indices, branch="target")
        prepared = [self.objective.prepare_target(z.float()) for z in target_projections]
        counts = task_pair_counts(self.view_types, self.target_indices)
        sums: dict[str, torch.Tensor] = {}
        projections = []
        for v, (view, view_type) in enumerate(zip(views, self.view_types)):
            (prediction,), _, (projection,) = self.model([view], [view_type], [], branch="online")
            view_sum = view_pair_loss_sum(v, prediction.float(), prepared, self.target_indices, self.objective.pair_loss)
            (self.weights[view_type] / counts[view_type] * view_sum).backward()
            sums[view_type] = sums[view_type] + view_sum.detach() if view_type in sums else view_sum.detach()
            projections.append(projection.detach())
        task_losses = {t: sums[t] / counts[t] for t in sums}  # the mean pair loss of each task
        loss = sum(self.weights[t] * task_losses[t] for t in task_losses)
        return loss, task_losses, projections

    def tau(self, step: int) -> float:
        return ema_momentum(step, self.total_steps, self.cfg.train.ema_tau)

    def learning_rate(self, step: int) -> float:
        per_epoch = self.cfg.optim.schedule_per == "epoch"
        return lr_at_step(
            step, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg.optim.final_lr_ratio,
            steps_per_update=self.sampler.steps_per_epoch if per_epoch else 1,
        )

    # ------------------------------------------------------------------ the loop
    # "warn" or "error": torch.cuda.set_sync_debug_mode for the steps between logging steps
    # (after this run's first interval, which compiles), where nothing may synchronise the host.
    sync_debug_mode: str | None = None

    @contextlib.contextmanager
    def _host_sync_check(self, active: bool):
        if not (active and self.sync_debug_mode and self.env.device.type == "cuda"):
            yield
            return
        torch.cuda.set_sync_debug_mode(self.sync_debug_mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def save(self, state: TrainerState, skipped_local: set[str]) -> Path:
        self._merge_skipped(state, skipped_local)
        state.epoch, batch = divmod(state.step, max(1, self.sampler.steps_per_epoch))
        state.samples_seen = batch * self.cfg.train.batch_size
        state.world_size = self.env.world_size
        self.monitors.flush()  # the means over probes in the checkpoint include every probe before it
        state.monitor = self.monitors.state_dict()
        path = self.checkpoints.save(state, ModelAndOptimizer(self.model, self.optimizer), self.config_yaml)
        log.info("checkpoint %s", path)
        return path

    @staticmethod
    def _merge_skipped(state: TrainerState, skipped_local: set[str]) -> None:
        """Add every rank's newly met unreadable files to ``state`` (collective), then forget them locally."""
        state.skipped_files = sorted(set(state.skipped_files) | host_union(skipped_local))
        state.skipped_images = len(state.skipped_files)
        skipped_local.clear()

    def train_loader(self, step: int, last_step: int) -> DataLoader:
        """One DataLoader for the rest of the run: the batches of steps ``step`` .. ``last_step`` - 1,
        across epochs (an epoch ends where ``step % steps_per_epoch == 0``), so workers start once
        and keep the prefetch queue full over epoch boundaries (a loader per epoch would respawn
        them and wait for a batch per worker each epoch)."""
        cfg = self.cfg
        self.sampler.set_position(step, last_step)
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers > 0 else None,
            collate_fn=functools.partial(collate_views, collate=getattr(self.transform, "collate", None)),
            pin_memory=self.env.device.type == "cuda",
            # Forked workers inherit StopRequest's handler until then, so no SIGINT ends one.
            worker_init_fn=ignore_interrupts,
        )

    def fit(self, stop: StopRequest, writer=None, on_epoch_end: Callable[[int, int], None] | None = None) -> PretrainOutcome:
        """Train to ``train.epochs`` (or ``train.max_steps``), resuming from the latest checkpoint.

        ``writer``: rank 0's scalar log (``add_scalar(tag, value, step)``: mtssl.train.scalar_logger), None elsewhere.
        ``on_epoch_end(epochs_done, step)``: called on every rank at each epoch end, a step boundary after that
        step's checkpoint (the final one's after the final checkpoint); e.g. the kNN monitor. Its time counts in
        the wall time, not in the images per second.
        """
        cfg, env = self.cfg, self.env
        state = self.checkpoints.load_latest(ModelAndOptimizer(self.model, self.optimizer), self.config_hash,
                                             lambda saved: describe_changes(saved, cfg))
        state = state or TrainerState(config_hash=self.config_hash, world_size=env.world_size)
        self.monitors.load_state_dict(state.monitor)
        self.monitors.writer = writer
        last_step = self.total_steps if cfg.train.max_steps is None else min(self.total_steps, cfg.train.max_steps)
        step = state.step
        skipped_local: set[str] = set()  # unreadable files met on this rank since the last checkpoint
        outcome = PretrainOutcome(JobStatus.COMPLETED, self.model, self.layout, self.train_samples, step,
                                  skipped_files=list(state.skipped_files))
        if step >= last_step:
            log.info("pretraining already done (%d steps)", step)
            outcome.monitor = self.monitors.summary()
            return outcome

        start_time = time.monotonic()
        last_save = window_start = time.monotonic()
        window_steps, start_step = 0, step
        last_nonfinite = False
        logged: dict[str, float] = {}
        hook_seconds = 0.0

        def epoch_end() -> float:
            if on_epoch_end is None or step % self.sampler.steps_per_epoch:
                return 0.0
            hook_start = time.monotonic()
            on_epoch_end(step // self.sampler.steps_per_epoch, step)
            return time.monotonic() - hook_start

        log.info(
            "pretraining %s: %d steps (%d/epoch), global batch %d on %d rank(s), %d views/sample, peak lr %.4g",
            cfg.method.name, last_step, self.sampler.steps_per_epoch, cfg.train.batch_size, env.world_size,
            self.layout.num_views, self.peak_lr,
        )
        if env.is_main:
            update_progress(self.out_dir, step=step, total_steps=last_step, epoch=step // self.sampler.steps_per_epoch)
        self.model.train()
        # One loader for the rest of the run; closing it on the way out (break, exception) stops its workers now.
        with contextlib.closing(iter(DevicePrefetcher(self.train_loader(step, last_step), env.device))) as batches:
            for views, _, skipped in batches:
                # Agree before the forward pass: it updates BN running statistics, which a
                # checkpoint taken after it would wrongly include.
                due = env.is_main and time.monotonic() - last_save > 60 * cfg.train.checkpoint_every_min
                stop_now, save_now, diverged = host_any([stop.requested, due, last_nonfinite])
                if diverged:
                    outcome.status, outcome.error = JobStatus.DIVERGED, f"non-finite loss at step {step - 1}"
                    log.error("loss is not finite at step %d: stopping, status diverged", step - 1)
                    break
                if stop_now:
                    state.step = step
                    path = self.save(state, skipped_local)
                    raise TrainingInterrupted(stop.signum, path, step, stop.age_s())
                if save_now:
                    state.step = step
                    self.save(state, skipped_local)
                    last_save = time.monotonic()

                torch.manual_seed(step_seed(cfg.train.seed, env.rank, step))
                logs_now = (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == last_step
                with self._host_sync_check(active=not logs_now and step >= start_step + cfg.train.log_every_steps):
                    views = self.transform.to_views(views, env.device)  # uint8 on the device -> normalised float views
                    output = self.training_step(views, step, measure_grad_norm=logs_now)
                loss = output.loss
                skipped_local |= skipped
                if hasattr(self.transform, "take_skipped"):  # files only the device found undecodable (data.gpu_decode)
                    skipped_local |= self.transform.take_skipped()
                step += 1
                window_steps += 1
                check_finite = env.device.type == "cpu" or step % cfg.train.log_every_steps == 0
                if check_finite:
                    last_nonfinite = not bool(torch.isfinite(loss))
                if logs_now:
                    logged = self._log(step, last_step, output, window_steps, window_start, writer)
                    window_start, window_steps = time.monotonic(), 0
                if step % cfg.train.checkpoint_every_steps == 0 and step < last_step:
                    state.step = step
                    self.save(state, skipped_local)
                    last_save = time.monotonic()
                if step >= last_step:
                    break
                seconds = epoch_end()
                hook_seconds += seconds
                window_start += seconds
        if outcome.status == JobStatus.COMPLETED and last_nonfinite:
            outcome.status, outcome.error = JobStatus.DIVERGED, f"non-finite loss at step {step - 1}"
        state.step = step
        if outcome.status == JobStatus.COMPLETED:
            self.save(state, skipped_local)
            hook_seconds += epoch_end()
        elapsed = time.monotonic() - start_time
        outcome.steps = step
        outcome.final_losses = {k: v for k, v in logged.items() if k.startswith("loss")}
        outcome.wall_time_s = elapsed
        outcome.images_per_s = (step - start_step) * cfg.train.batch_size / max(elapsed - hook_seconds, 1e-9)
        self._merge_skipped(state, skipped_local)
        outcome.skipped_files = list(state.skipped_files)
        outcome.monitor = self.monitors.summary()
        return outcome

    def _log(self, step, last_step, output: StepOutput, window_steps, window_start, writer) -> dict[str, float]:
        values = {"loss": output.loss, **{f"loss_{k}": v for k, v in output.task_losses.items()}}
        values["embedding_std"] = embedding_std(output.embeddings)
        values = _mean_over_ranks(values)
        elapsed = max(time.monotonic() - window_start, 1e-9)
        values["images_per_s"] = window_steps * self.cfg.train.batch_size / elapsed
        values["lr"] = self.learning_rate(step - 1)
        values["tau"] = self.tau(step - 1) if self.model.target is not None else 0.0
        values["grad_norm"] = float(output.grad_norm)
        self.monitors.flush()
        self.monitors.rankme(step, output.view_projections)
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(f"train/{key}", value, step)
        tasks = " ".join(f"{k[5:]}={values[k]:.4f}" for k in sorted(values) if k.startswith("loss_"))
        log.info(
            "step %d/%d epoch %d loss %.4f (%s) lr %.4g tau %.5f grad %.3g std %.4f %.1f img/s",
            step, last_step, (step - 1) // self.sampler.steps_per_epoch, values["loss"], tasks, values["lr"],
            values["tau"], values["grad_norm"], values["embedding_std"], values["images_per_s"],
        )
        if self.env.is_main:  # what sweeps/status.py shows
            update_progress(self.out_dir, step=step, total_steps=last_step, epoch=step // self.sampler.steps_per_epoch,
                            loss=values["loss"], images_per_s=values["images_per_s"])
        return values

