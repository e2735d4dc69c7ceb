"""End-of-training evaluation: kNN (online and target backbones) and the frozen-feature linear probe, plus exports.

kNN and the ``frozen_features`` probe use frozen backbone features (pre-projector; the CLS token for ViTs) in eval mode
with the validation transform. The backbones are gathered unsharded onto every rank; each rank then
extracts its share of train and val and keeps it on its device (``FeatureShard``): no rank holds the
whole bank, and kNN and the probe run on every rank over the shards (no single-rank phase).

Evaluation runs in phases (``PHASES``). After each one, rank 0 writes the finished phases' results
to ``out_dir/eval_state.json``. All ranks agree whether a stop signal arrived after each phase, and inside
one at every feature batch, kNN chunk and probe epoch (an ImageNet phase can outlast SLURM's signal delay):
if so they stop with ``EvaluationInterrupted`` (the job exits as stopped and is requeued), and the rerun skips
the finished phases and redoes the interrupted one (the augmented probe resumes after its last epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mtssl.data.image_folder import EvalImageFolder, class_balanced_subset, list_image_folder
from mtssl.data.torchvision_augment import build_eval_transform
from mtssl.utils.atomic_write import write_json_atomic
from mtssl.distributed.collectives import average_buffers_over_ranks_, host_any, host_barrier, host_union
from mtssl.distributed.fsdp import full_state_dict, state_sha256
from mtssl.distributed.process_group import DistEnv
from mtssl.eval.augmented import ProbeStopped, augmented_linear_probe, augmented_train_transform
from mtssl.eval.features import FEATURE_DTYPES, FeatureShard, extract_feature_shard
from mtssl.eval.bank import bank_samples
from mtssl.eval.knn import evaluated_ks, headline_k, knn_classify_sharded
from mtssl.eval.linear import linear_probe_sharded
from mtssl.job_folder import AUGMENTED_STATE, BACKBONE_EXPORT, EVAL_STATE
from mtssl.model.siamese import backbone_kwargs, build_backbone

log = logging.getLogger(__name__)

# Online kNN, the online probes, target kNN: one bank alive at a time.
PHASES = ("knn", "linear", "linear_augmented", "knn_target")
UNREADABLE = "unreadable_files"  # eval_state.json: the files replaced by black images so far


class EvaluationInterrupted(Exception):
    """Evaluation stopped on a signal after a phase; its results are in eval_state.json. Rerun to resume."""

    def __init__(self, signum: int | None, state_path: Path, finished: list[str]):
        super().__init__(f"evaluation stopped on signal {signum} after phases {finished}; state in {state_path}")
        self.signum = signum


def _frozen_backbone(cfg: DictConfig, state: dict, device: torch.device) -> torch.nn.Module:
    backbone = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))
    backbone.load_state_dict(state)
    return backbone.to(device).eval().requires_grad_(False)


def evaluation_samples(cfg: DictConfig, train_samples: list | None) -> tuple[list, list]:
    """(train, val) samples: the pretraining images (or eval.train_subset) and val (or eval.val_subset).

    ``train_samples=None`` lists the pretraining images again from ``data.*`` (re-evaluation)."""
    if cfg.eval.train_subset is not None or train_samples is None:
        train_samples = bank_samples(cfg, list_image_folder(cfg.data.root, cfg.data.train_split)[0])
    val_samples, _ = list_image_folder(cfg.data.root, cfg.data.val_split)
    if cfg.eval.val_subset is not None:
        val_samples = class_balanced_subset(val_samples, cfg.eval.val_subset, cfg.data.subset_seed)
    return train_samples, val_samples


def eval_transform(cfg: DictConfig):
    """The validation transform of the data preset (resize, centre crop, train normalisation)."""
    return build_eval_transform(cfg.data.mean, cfg.data.std, cfg.data.eval_resize, cfg.data.eval_crop, cfg.data.eval_interpolation)


def evaluate_backbones(cfg: DictConfig, env: DistEnv, outcome, out_dir: Path, writer=None, stop=None) -> dict:
    """Return the results.json evaluation fields; rank 0 also writes ``backbone.pth``.

    ``stop``: an object with ``requested`` and ``signum`` (the job's stop-signal handler), checked after
    every phase; None never stops.
    """
    model = outcome.model
    # Each rank's BatchNorm statistics saw only its own batches: average them so that every rank
    # extracts features with one network, the one backbone.pth and weights_sha256 describe.
    for encoder in (model.online, model.target):
        if encoder is not None:
            average_buffers_over_ranks_(encoder.backbone)
    online_state = full_state_dict(model.online.backbone)
    target_state = full_state_dict(model.target.backbone) if model.target is not None else None
    if env.is_main:
        export = {"backbone": cfg.backbone.timm_name, "state_dict": online_state}
        if target_state is not None:
            export["target_state_dict"] = target_state
        torch.save(export, out_dir / BACKBONE_EXPORT)
    fields = evaluate_states(cfg, env, online_state, target_state, outcome.train_samples, out_dir, stop)
    if writer is not None and env.is_main:
        for key in ("knn_top1", "knn_top1_target", "linear_top1"):
            writer.add_scalar(f"eval/{key}", fields[key], outcome.steps)
    return fields


def _eval_settings(cfg: DictConfig) -> dict:
    """What the phases' results depend on besides the weights (a changed setting redoes every phase)."""
    evaluation = OmegaConf.to_container(cfg.eval, resolve=True)
    return {"eval": evaluation, "seed": cfg.train.seed,
            "data": {k: cfg.data.get(k) for k in ("train_split", "val_split", "subset", "subset_seed", "eval_resize", "eval_crop")}}


def _state_key(weights: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps({"weights": weights, "settings": settings}, sort_keys=True).encode()).hexdigest()


def _load_eval_state(out_dir: Path, weights: str, settings: dict) -> tuple[dict, set[str]]:
    """The finished phases' results and the unreadable files met so far, for these weights and settings."""
    try:
        state = json.loads((out_dir / EVAL_STATE).read_text())
    except (OSError, ValueError):
        return {}, set()
    if state.get("weights_sha256") != weights or state.get("settings") != settings:
        return {}, set()
    return dict(state.get("phases") or {}), set(state.get(UNREADABLE) or [])


def evaluate_states(cfg: DictConfig, env: DistEnv, online_state: dict, target_state: dict | None,
                    train_samples: list | None, out_dir: Path, stop=None) -> dict:
    """Evaluate the online (and target) backbone state dicts, phase by phase (a collective, all ranks).

    Returns the results.json evaluation fields: ``knn``/``knn_target`` per k (``eval.knn_k`` and the headline k),
    the headline ``knn_top1``/``knn_top5`` (k = ``KNN_HEADLINE_K``, ``knn_headline_k``), ``linear`` per protocol and
    the headline ``linear_top1``/``linear_top5`` (``headline_fields``). Finished phases recorded in
    ``out_dir/eval_state.json`` for the same weights and eval settings are not redone.
    """
    out_dir = Path(out_dir)
    weights = state_sha256(online_state)
    settings = _eval_settings(cfg)
    # Finished phases, and the unreadable files (replaced by black images) any phase met.
    phases, unreadable = _load_eval_state(out_dir, weights, settings)
    if phases:
        log.info("evaluation resumes: phases %s already finished", sorted(phases))
    # All ranks read the file; agree before anyone overwrites it.
    host_barrier()

    transform = eval_transform(cfg)
    train_samples, val_samples = evaluation_samples(cfg, train_samples)
    train_set = EvalImageFolder(train_samples, transform, report_unreadable=True)
    val_set = EvalImageFolder(val_samples, transform, report_unreadable=True)
    num_classes = 1 + max(label for _, label in train_samples + val_samples)
    dtype = FEATURE_DTYPES[cfg.eval.feature_dtype]
    knn_args = dict(num_classes=num_classes, ks=evaluated_ks(cfg.eval.knn_k, len(train_samples)),
                    temperature=cfg.eval.knn_temperature)

    def shards(state: dict, name: str) -> tuple[FeatureShard, FeatureShard]:
        backbone = _frozen_backbone(cfg, state, env.device)

        def forward(images: torch.Tensor) -> torch.Tensor:
            check_stop()  # every rank runs the same number of batches (padded shards)
            return backbone(images)

        args = (cfg.eval.batch_size, cfg.data.num_workers, env.device, dtype)
        train = extract_feature_shard(forward, train_set, *args, description=f"{name} train features")
        val = extract_feature_shard(forward, val_set, *args, description=f"{name} val features")
        found = {train_samples[i][0] for i in train.replaced} | {val_samples[i][0] for i in val.replaced}
        unreadable.update(host_union(found))
        return train, val

    protocols = list(cfg.eval.linear_protocols)
    planned = [p for p in PHASES if p not in ("linear", "linear_augmented")
               or {"linear": "frozen_features", "linear_augmented": "augmented"}[p] in protocols]

    def stop_requested() -> bool:
        return host_any([bool(stop is not None and stop.requested)])[0]

    def check_stop() -> None:
        """Inside a phase: stop when any rank got a signal (a collective, at the same points on every rank)."""
        if stop_requested():
            raise EvaluationInterrupted(getattr(stop, "signum", None), out_dir / EVAL_STATE, list(phases))

    def finished(phase: str, result) -> None:
        phases[phase] = result
        if env.is_main:
            write_json_atomic(out_dir / EVAL_STATE, {"weights_sha256": weights, "settings": settings, "phases": phases,
                                                      UNREADABLE: sorted(unreadable)})
        if stop_requested() and any(p not in phases for p in planned):
            raise EvaluationInterrupted(getattr(stop, "signum", None), out_dir / EVAL_STATE, list(phases))

    if any(p not in phases for p in ("knn", "linear", "linear_augmented") if p in planned):
        train, val = shards(online_state, "online")
        if "knn" not in phases:
            finished("knn", knn_classify_sharded(train, val, **knn_args, description="online kNN", check_stop=check_stop))
        if "linear" in planned and "linear" not in phases:
            probe = linear_probe_sharded(
                train, val, num_classes, epochs=cfg.eval.linear_epochs, lr_grid=tuple(cfg.eval.linear_lrs),
                batch_size=cfg.eval.linear_batch_size, holdout_fraction=cfg.eval.linear_holdout, seed=cfg.train.seed,
                check_stop=check_stop,
            )
            finished("linear", {**probe, "holdout_top1": {str(k): v for k, v in probe["holdout_top1"].items()}})
        del train  # the train bank goes before the augmented probe and the target's bank
        if "linear_augmented" in planned and "linear_augmented" not in phases:
            augmented_set = EvalImageFolder(train_samples, augmented_train_transform(
                cfg.data.mean, cfg.data.std, cfg.views.types["global"].size))
            try:
                result = augmented_linear_probe(
                    _frozen_backbone(cfg, online_state, env.device), augmented_set, val, num_classes, env.device,
                    epochs=cfg.eval.augmented_epochs, batch_size=cfg.eval.augmented_batch_size, base_lr=cfg.eval.augmented_lr,
                    seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                    autocast_dtype=torch.bfloat16 if cfg.train.get("precision") == "bf16" and env.device.type == "cuda" else None,
                    state_path=out_dir / AUGMENTED_STATE, state_key=_state_key(weights, settings), should_stop=stop_requested,
                )
            except ProbeStopped as stopped:
                raise EvaluationInterrupted(getattr(stop, "signum", None), out_dir / AUGMENTED_STATE, list(phases)) from stopped
            finished("linear_augmented", result)
        del val
    if "knn_target" not in phases:
        if target_state is not None:
            train, val = shards(target_state, "target")
            finished("knn_target", knn_classify_sharded(train, val, **knn_args, description="target kNN",
                                                        check_stop=check_stop))
            del train, val
        else:  # SimSiam: the target is the online network
            finished("knn_target", phases["knn"])

    linear = {name: phases[phase] for name, phase in (("frozen_features", "linear"), ("augmented", "linear_augmented"))
              if phase in planned}
    fields = {"weights_sha256": weights, "knn": phases["knn"], "knn_target": phases["knn_target"], "linear": linear,
              **headline_fields(phases["knn"], phases["knn_target"], linear, headline_k(len(train_samples))),
              "eval_skipped_files": sorted(unreadable)}
    log.info("kNN (k=%s) top-1 online %.2f target %.2f", fields["knn_headline_k"], fields["knn_top1"],
             fields["knn_top1_target"])
    for name, result in linear.items():
        log.info("linear probe (%s) top-1 %.2f, lr %g", name, result["top1"], result["lr"])
    return fields


# Evaluation entries of results.json holding one result per k or per protocol: a re-evaluation adds to them.
PER_SETTING_FIELDS = ("knn", "knn_target", "linear")


def headline_fields(knn: dict, knn_target: dict, linear: dict, k: int) -> dict:
    """The headline fields of results.json: ``knn_top1``/``knn_top5`` (and the target's) at ``k`` (``headline_k``),
    ``linear_top1``/``linear_top5``/``linear_lr`` of ``frozen_features`` when ``linear`` has it, else ``augmented``."""
    key = f"k{k}"
    main_linear = linear.get("frozen_features") or linear["augmented"]
    return {"knn_headline_k": k, "knn_top1": knn[key]["top1"], "knn_top5": knn[key]["top5"],
            "knn_top1_target": knn_target[key]["top1"], "knn_top5_target": knn_target[key]["top5"],
            "linear_top1": main_linear["top1"], "linear_top5": main_linear["top5"], "linear_lr": main_linear["lr"]}


def merge_evaluation(previous: dict, fields: dict) -> dict:
    """``previous`` results.json with the evaluation ``fields`` of a re-evaluation merged in: per-k and
    per-protocol results it did not recompute (``PER_SETTING_FIELDS``) are kept, the recomputed ones replaced, and
    the headline fields taken from the merged entries (``headline_fields``, at the new evaluation's headline k)."""
    merged = {**previous, **fields}
    for key in PER_SETTING_FIELDS:
        earlier = previous.get(key) if isinstance(previous.get(key), dict) else {}
        merged[key] = {**earlier, **fields[key]}
    merged.update(headline_fields(merged["knn"], merged["knn_target"], merged["linear"], fields["knn_headline_k"]))
    return merged
