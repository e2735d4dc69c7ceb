"""kNN of the online backbone during pretraining (``monitor.knn_every_epochs``), called by the trainer at epoch ends.

The protocol and the network are the end-of-training kNN's (``mtssl.eval.end_of_training``): the online backbone with its BN
statistics averaged over ranks, gathered unsharded into the same fp32 evaluation copy (``_frozen_backbone``, eval
mode), the validation transform, features extracted per rank (``extract_feature_shard``) and the exact sharded kNN
(``knn_classify_sharded``). So the curve's last point is the end-of-training number (same subsets), not that of the bf16
compute copy FSDP trains with. Every rank takes part (gathering the backbone is a collective).
It leaves training untouched: the global RNG states (CPU and the device's) are restored afterwards, the BN
buffers and every module's train/eval mode too, and nothing runs under autograd. A stop signal is not acted on
inside a kNN (it is bounded by its subsets): the trainer stops at its next step boundary; a stop that is already
there when an evaluation is due skips that evaluation.

Each evaluation goes to TensorBoard (``eval/knn_top1``, ``eval/knn_top5`` at the global step), to the log and to
``out_dir/knn_during_training.json``, which a resumed run reloads (evaluations up to its checkpoint's step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtssl.config import ConfigError
from mtssl.data.image_folder import EvalImageFolder, class_balanced_subset
from mtssl.utils.atomic_write import write_json_atomic
from mtssl.distributed.collectives import average_buffers_over_ranks_, host_any, world_size
from mtssl.distributed.fsdp import full_state_dict
from mtssl.distributed.process_group import DistEnv
from mtssl.eval.features import FEATURE_DTYPES, extract_feature_shard
from mtssl.eval.end_of_training import _frozen_backbone, eval_transform, evaluation_samples
from mtssl.eval.knn import evaluated_ks, headline_k, knn_classify_sharded
from mtssl.job_folder import KNN_DURING_TRAINING

log = logging.getLogger(__name__)

# What an evaluation's numbers depend on besides the weights: a resumed run with other values starts a new list.
SETTINGS = {"eval": ("knn_k", "knn_temperature", "feature_dtype", "train_subset", "val_subset"),
            "monitor": ("knn_train_subset", "knn_val_subset")}


@contextlib.contextmanager
def evaluation_mode(backbone: nn.Module, device: torch.device):
    """``backbone`` in eval mode with BN statistics averaged over ranks, under forked global RNGs; on exit its
    buffers, every submodule's mode and the RNG states are as they were (a collective on several ranks)."""
    modes = [(m, m.training) for m in backbone.modules()]
    buffers = [b for b in backbone.buffers() if b.is_floating_point()]
    saved = [b.detach().clone() for b in buffers] if world_size() > 1 else []
    # The loaders draw their base seed from the global generator: fork it, so training's draws stay the same.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            backbone.eval()
            average_buffers_over_ranks_(backbone)
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
            for module, training in modes:
                module.training = training


class KnnMonitor:
    """``Trainer.fit``'s ``on_epoch_end``: every ``monitor.knn_every_epochs`` epochs, the weighted kNN of the online
    backbone on fixed train and val sets (built once), on every rank."""

    def __init__(self, cfg: DictConfig, env: DistEnv, backbone: nn.Module, train_samples: list, out_dir: Path,
                 writer=None, stop=None, resume_step: int | None = None):
        """``train_samples``: the pretraining images; ``writer``: rank 0's SummaryWriter; ``stop``: the job's
        StopRequest; ``resume_step``: the step of the checkpoint the run resumes from (None: a fresh start)."""
        self.cfg, self.env, self.backbone, self.writer, self.stop = cfg, env, backbone, writer, stop
        self.every = int(cfg.monitor.knn_every_epochs or 0)
        self.path = Path(out_dir) / KNN_DURING_TRAINING
        train, val = evaluation_samples(cfg, train_samples)
        if cfg.monitor.knn_train_subset is not None:
            train = class_balanced_subset(train, cfg.monitor.knn_train_subset, cfg.data.subset_seed)
        if cfg.monitor.knn_val_subset is not None:
            val = class_balanced_subset(val, cfg.monitor.knn_val_subset, cfg.data.subset_seed)
        if max(cfg.eval.knn_k) > len(train):  # validate_config refuses it before training (mtssl.eval.bank)
            raise ConfigError(f"eval.knn_k: k={max(cfg.eval.knn_k)} exceeds the {len(train)} images of the kNN bank "
                              f"during training; lower eval.knn_k or raise monitor.knn_train_subset")
        self.ks = evaluated_ks(cfg.eval.knn_k, len(train))
        self.headline = f"k{headline_k(len(train))}"  # the end-of-training headline: both write eval/knn_top1
        transform = eval_transform(cfg)
        self.train_set, self.val_set = EvalImageFolder(train, transform), EvalImageFolder(val, transform)
        self.num_classes = 1 + max(label for _, label in train + val)
        sections = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in SETTINGS}
        self.settings = {k: sections[name][k] for name, keys in SETTINGS.items() for k in keys}
        self.evaluations = self._load(resume_step)
        self.seconds = 0.0  # this process's kNN time

    def _load(self, resume_step: int | None) -> list[dict]:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        if resume_step is None or saved.get("settings") != self.settings:
            return []
        return [e for e in saved.get("evaluations") or [] if e["step"] <= resume_step]

    def __call__(self, epoch: int, step: int) -> None:
        """Evaluate if ``epoch`` (epochs done) is due; a collective: every rank calls it at the same steps."""
        if not self.every or epoch % self.every:
            return
        if host_any([bool(self.stop is not None and self.stop.requested)])[0]:
            log.info("kNN during training at epoch %d skipped: stopping", epoch)
            return
        start = time.monotonic()
        with evaluation_mode(self.backbone, self.env.device):
            # The end-of-job evaluation's fp32 copy of the (BN-averaged) weights: full_state_dict is a collective.
            frozen = _frozen_backbone(self.cfg, full_state_dict(self.backbone), self.env.device)
            args = (self.cfg.eval.batch_size, self.cfg.data.num_workers, self.env.device,
                    FEATURE_DTYPES[self.cfg.eval.feature_dtype])
            train = extract_feature_shard(frozen, self.train_set, *args, description="kNN bank features")
            val = extract_feature_shard(frozen, self.val_set, *args, description="kNN val features")
            result = knn_classify_sharded(train, val, self.num_classes, self.ks, self.cfg.eval.knn_temperature,
                                          description="kNN during training")
            del train, val, frozen
        seconds = time.monotonic() - start
        self.seconds += seconds
        top1, top5 = result[self.headline]["top1"], result[self.headline]["top5"]
        entry = {"epoch": epoch, "step": step, "top1": top1, "top5": top5, "seconds": seconds, "knn": result}
        self.evaluations = [e for e in self.evaluations if e["step"] < step] + [entry]
        if self.env.is_main:
            write_json_atomic(self.path, {"settings": self.settings, "evaluations": self.evaluations})
            if self.writer is not None:
                self.writer.add_scalar("eval/knn_top1", top1, step)
                self.writer.add_scalar("eval/knn_top5", top5, step)
        log.info("kNN during training (k=%s, %d bank / %d val images) epoch %d step %d: top-1 %.2f top-5 %.2f (%.1f s)",
                 self.headline[1:], len(self.train_set), len(self.val_set), epoch, step, top1, top5, seconds)

    def results(self, train_seconds: float) -> dict:
        """results.json's ``knn_during_training``: every evaluation (with a resumed run's earlier ones), and this
        process's kNN seconds and their share of its pretraining wall time (which includes them)."""
        return {
            "every_epochs": self.every, "k": int(self.headline[1:]),
            "train_images": len(self.train_set), "val_images": len(self.val_set),
            "evaluations": self.evaluations, "seconds": self.seconds,
            "share_of_training": self.seconds / train_seconds if train_seconds > 0 else None,
        }
