"""Compose, resolve and validate a job config before anything is trained or queued.

``validate_config`` checks everything a typo could break (names, view set, sizes, data folder,
batch size) and raises ``ConfigError`` with one message naming the field and the fix, so a bad
override fails at launch instead of an hour into a cluster job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.data.views import TARGET_VIEW_TYPE, VIEW_TYPES, build_view_layout

CONFIG_MODULE = "mtssl.conf"
PREDICTOR_MODES = ("separate", "shared")
OPTIMIZERS = ("lars", "sgd", "adamw")
LINEAR_PROTOCOLS = ("frozen_features", "augmented")  # eval.linear_protocols
FEATURE_DTYPE_NAMES = ("fp32", "bf16", "fp16")  # eval.feature_dtype; mtssl.eval.features maps them to torch dtypes

# Fields that do not change what is trained: they may differ when a run is resumed.
NON_TRAINING_FIELDS = (
    "out_dir",
    "data.root",
    "data.num_workers",
    "data.download",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_min",
    "train.keep_checkpoints",
    "train.max_steps",
    "train.device",
    "eval",
)


class ConfigError(ValueError):
    """An invalid config value; the message names the field and how to fix it."""


def available(group: str) -> list[str]:
    """Preset names of a config group, e.g. ``available('method')``."""
    folder = Path(__file__).parent / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the job config with Hydra's compose API (as ``python -m mtssl.run`` would)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"bad override in {list(overrides)}: {error}") from error


def _merged_optim(cfg: DictConfig) -> dict:
    """optim = method default < backbone default (ViT) < explicit non-null ``optim.*`` values."""
    merged = dict(OmegaConf.to_container(cfg.optim, resolve=True))
    defaults = dict(OmegaConf.to_container(cfg.method.optim, resolve=True))
    if cfg.backbone.get("optim"):
        defaults.update(OmegaConf.to_container(cfg.backbone.optim, resolve=True))
    for key, value in defaults.items():
        if merged.get(key) is None:
            merged[key] = value
    return merged


def resolve_config(cfg: DictConfig) -> DictConfig:
    """Fill derived defaults (optimiser, EMA tau, absolute data root) and resolve interpolations."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except OmegaConfBaseException as error:  # missing mandatory value, bad interpolation
        raise ConfigError(_omegaconf_message(error)) from error
    cfg.optim = _merged_optim(cfg)
    if cfg.train.ema_tau is None:
        cfg.train.ema_tau = cfg.backbone.ema_tau
    if cfg.train.get("precision", "auto") == "auto":
        cfg.train.precision = default_precision(cfg.train.device)
    if cfg.data.root is not None:
        cfg.data.root = os.path.abspath(os.path.expanduser(str(cfg.data.root)))
    _fill_view_types(cfg)
    return cfg


def default_precision(device: str) -> str:
    """``train.precision=auto``: bf16 where the job runs on CUDA (as ``train.device`` selects it), else fp32.

    Resolved before the config is hashed, so the hash names the precision that trained: a bf16
    checkpoint is not resumed in fp32 (set ``train.precision`` explicitly to move a run).
    """
    import torch

    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bf16" if on_cuda else "fp32"


def _fill_view_types(cfg: DictConfig) -> None:
    """Write every view type's effective fields into the config, so config.yaml shows them."""
    try:
        layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    except (ValueError, TypeError):
        return  # reported by validate_config with the field name
    for view in layout.types:
        fields = {k: v for k, v in asdict(view).items() if k != "name"}
        cfg.views.types[view.name] = OmegaConf.create(
            {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        )


def _omegaconf_message(error: Exception) -> str:
    key = getattr(error, "full_key", None)
    if key:
        hint = " (e.g. data.root=/path/to/imagenet)" if key == "data.root" else ""
        return f"{key}: {error.msg if hasattr(error, 'msg') else error}. Set it on the command line: {key}=...{hint}"
    return str(error)


def config_hash(cfg: DictConfig) -> str:
    """SHA-256 of the fields that define the training run (see ``NON_TRAINING_FIELDS``)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    for dotted in NON_TRAINING_FIELDS:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig, check_data: bool = True, world_size: int = 1) -> None:
    """Raise ConfigError for the first problem found; return None when the job can run."""
    from mtssl.loss.objectives import OBJECTIVES

    _require(
        cfg.method.name in OBJECTIVES,
        f"method.name: unknown method {cfg.method.name!r}; valid methods are {sorted(OBJECTIVES)} (method=<name>)",
    )
    _require(
        cfg.predictor.mode in PREDICTOR_MODES,
        f"predictor.mode: unknown predictor mode {cfg.predictor.mode!r}; valid modes are {list(PREDICTOR_MODES)}",
    )
    _validate_backbone(cfg)
    _validate_views(cfg)
    _validate_optim(cfg)
    train = cfg.train
    _require(train.epochs >= 0, f"train.epochs: must be >= 0, got {train.epochs}")
    _require(train.batch_size > 0, f"train.batch_size: must be positive, got {train.batch_size}")
    _require(
        train.batch_size % world_size == 0,
        f"train.batch_size: {train.batch_size} does not divide across {world_size} ranks; use a multiple of {world_size}",
    )
    _require(0 <= train.ema_tau <= 1, f"train.ema_tau: must be in [0, 1], got {train.ema_tau}")
    _require(train.keep_checkpoints >= 2, f"train.keep_checkpoints: keep at least 2, got {train.keep_checkpoints}")
    _require(train.device in ("auto", "cpu", "cuda"), f"train.device: {train.device!r}; valid values are auto, cpu, cuda")
    _require(
        train.precision in ("fp32", "bf16"),
        f"train.precision: {train.precision!r}; valid values are auto (bf16 on CUDA, fp32 on CPU), fp32, bf16",
    )
    for flag in ("channels_last", "compile", "sync_bn", "deterministic", "cuda_deterministic"):
        value = train.get(flag)
        _require(isinstance(value, bool), f"train.{flag}: {value!r} is not a boolean; use true or false")
    _require(0 < cfg.eval.linear_holdout < 1, f"eval.linear_holdout: must be in (0, 1), got {cfg.eval.linear_holdout}")
    _require(len(cfg.eval.linear_lrs) > 0, "eval.linear_lrs: give at least one learning rate")
    _require(all(k > 0 for k in cfg.eval.knn_k), f"eval.knn_k: values must be positive, got {list(cfg.eval.knn_k)}")
    _require(
        cfg.eval.get("feature_dtype", "fp32") in FEATURE_DTYPE_NAMES,
        f"eval.feature_dtype: {cfg.eval.get('feature_dtype')!r}; valid values are {list(FEATURE_DTYPE_NAMES)} "
        f"(fp32 keeps today's results bitwise; bf16/fp16 halve the banks' device memory)",
    )
    _validate_eval(cfg, world_size)
    from mtssl.data.fast_augment import AUGMENTATION_PIPELINES

    _require(
        cfg.data.pipeline in AUGMENTATION_PIPELINES,
        f"data.pipeline: {cfg.data.pipeline!r}; valid pipelines are {sorted(AUGMENTATION_PIPELINES)}",
    )
    if check_data:
        _validate_data(cfg)


def _validate_eval(cfg: DictConfig, world_size: int) -> None:
    ev = cfg.eval
    _require(ev.batch_size > 0, f"eval.batch_size: must be positive, got {ev.batch_size}")
    _require(ev.linear_epochs >= 1, f"eval.linear_epochs: must be >= 1, got {ev.linear_epochs}")
    _require(ev.linear_batch_size >= 2, f"eval.linear_batch_size: must be >= 2 (BatchNorm needs two samples), got {ev.linear_batch_size}")
    _require(all(lr > 0 for lr in ev.linear_lrs), f"eval.linear_lrs: learning rates must be positive, got {list(ev.linear_lrs)}")
    protocols = list(ev.get("linear_protocols") or [])
    _require(
        len(protocols) > 0 and all(p in LINEAR_PROTOCOLS for p in protocols),
        f"eval.linear_protocols: {protocols}; give one or both of {list(LINEAR_PROTOCOLS)}, e.g. eval.linear_protocols=[frozen_features]",
    )
    _require(ev.augmented_epochs >= 1, f"eval.augmented_epochs: must be >= 1, got {ev.augmented_epochs}")
    _require(ev.augmented_lr > 0, f"eval.augmented_lr: must be positive, got {ev.augmented_lr}")
    _require(
        ev.augmented_batch_size > 0 and ev.augmented_batch_size % world_size == 0,
        f"eval.augmented_batch_size: {ev.augmented_batch_size} must be a positive multiple of the {world_size} ranks",
    )


def _validate_backbone(cfg: DictConfig) -> None:
    import timm

    name = cfg.backbone.timm_name
    _require(
        timm.is_model(name),
        f"backbone.name: unknown backbone {name!r}; use a preset {available('backbone')} (backbone=<preset>) "
        f"or any timm model name (backbone.name=<timm name>, see timm.list_models())",
    )


def _validate_views(cfg: DictConfig) -> None:
    types_cfg = cfg.views.types
    unknown = [t for t in types_cfg if t not in VIEW_TYPES]
    _require(
        not unknown,
        f"views.types: unknown view type {unknown}; valid types are {sorted(VIEW_TYPES)}; presets: {available('views')}",
    )
    try:
        layout = build_view_layout(OmegaConf.to_container(types_cfg), dict(cfg.data.view_sizes or {}))
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    _require(
        TARGET_VIEW_TYPE in layout.task_names and layout.type(TARGET_VIEW_TYPE).count >= 2,
        f"views.types.{TARGET_VIEW_TYPE}.count: at least 2 global views are needed (they are the targets); "
        f"set views.types.global.count=2",
    )
    for view in layout.types:
        field = f"views.types.{view.name}"
        _require(view.count >= 1, f"{field}.count: must be >= 1, got {view.count}; remove the type from the preset instead")
        _require(view.size > 0, f"{field}.size: crop size must be positive, got {view.size}")
        lo, hi = view.scale
        _require(
            len(view.scale) == 2 and 0 < lo <= hi <= 1,
            f"{field}.scale: RandomResizedCrop scale must satisfy 0 < min <= max <= 1, got {list(view.scale)}",
        )
        for key in ("blur_p", "solarize_p"):
            values = getattr(view, key)
            _require(
                len(values) >= 1 and all(0 <= p <= 1 for p in values),
                f"{field}.{key}: probabilities in [0, 1] are needed, got {list(values)}",
            )
        if view.cutout_area is not None:
            a, b = view.cutout_area
            _require(0 < a <= b < 1, f"{field}.cutout_area: need 0 < min <= max < 1, got {list(view.cutout_area)}")
        _require(view.weight >= 0, f"{field}.weight: task weights must be >= 0, got {view.weight}")
    _require(
        any(view.weight > 0 for view in layout.types),
        "views.types.*.weight: every task weight is 0; at least one task must be trained",
    )


def _validate_optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    _require(optim.name in OPTIMIZERS, f"optim.name: unknown optimizer {optim.name!r}; valid names are {list(OPTIMIZERS)}")
    _require(optim.base_lr is not None and optim.base_lr > 0, f"optim.base_lr: must be positive, got {optim.base_lr}")
    _require(optim.weight_decay is not None and optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {optim.weight_decay}")
    _require(optim.warmup_epochs >= 0, f"optim.warmup_epochs: must be >= 0, got {optim.warmup_epochs}")


def _validate_data(cfg: DictConfig) -> None:
    from mtssl.data.image_folder import DataError, class_balanced_subset, list_image_folder

    data = cfg.data
    _require(data.root is not None, "data.root: set the data folder, e.g. data.root=/path/to/imagenet")
    if not Path(data.root).exists() and data.get("download"):
        from mtssl.data.cifar10 import download_cifar10

        download_cifar10(data.root)
    try:
        train_samples, classes = list_image_folder(data.root, data.train_split)
        list_image_folder(data.root, data.val_split)
    except DataError as error:
        raise ConfigError(str(error)) from error
    if data.subset is not None:
        _require(data.subset > 0, f"data.subset: must be a positive number of images or null, got {data.subset}")
        train_samples = class_balanced_subset(train_samples, data.subset, data.subset_seed)
    _require(
        cfg.train.batch_size <= len(train_samples),
        f"train.batch_size: {cfg.train.batch_size} is larger than the {len(train_samples)} training images "
        f"(data.subset={data.subset}); lower train.batch_size or raise data.subset",
    )
