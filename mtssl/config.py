"""Compose, resolve and validate a job config before anything is trained or queued.

``validate_config`` checks everything a typo could break (names, view set, sizes, data folder,
batch size) and raises ``ConfigError`` with one message naming the field and the fix, so a bad
override fails at launch instead of an hour into a cluster job.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.data.torchvision_augment import EVAL_INTERPOLATIONS
from mtssl.data.views import TARGET_VIEW_TYPE, VIEW_TYPES, build_view_layout

CONFIG_MODULE = "mtssl.conf"
# The repository root: relative defaults (data.root of data=cifar10) resolve against it, not the cwd.
REPO_ROOT = Path(__file__).resolve().parent.parent
if not OmegaConf.has_resolver("mtssl.repo"):
    OmegaConf.register_new_resolver("mtssl.repo", lambda: str(REPO_ROOT))
PREDICTOR_MODES = ("separate", "shared")
OPTIMIZERS = ("lars", "sgd", "adamw")
SCHEDULE_PER = ("step", "epoch")
LINEAR_PROTOCOLS = ("frozen_features", "augmented")  # eval.linear_protocols
FEATURE_DTYPE_NAMES = ("fp32", "bf16", "fp16")  # eval.feature_dtype; mtssl.eval.features maps them to torch dtypes

# Fields that do not change what is trained: they may differ when a run is resumed.
NON_TRAINING_FIELDS = (
    "out_dir",
    "data.root",
    "data.num_workers",
    "data.prefetch_factor",
    "data.download",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_min",
    "train.keep_checkpoints",
    "train.final_checkpoint_only",
    "train.max_steps",
    "train.device",
    "train.activation_checkpointing",  # recomputes the same forward: bitwise the same results on CPU (tested)
    "train.collective_timeout_s",  # when a waiting rank gives up, not what it computes
    "eval",
    "monitor",  # measured beside training, bitwise unchanged (tests/test_monitors.py)
)


class ConfigError(ValueError):
    """An invalid config value; the message names the field and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Field checks: one per field of the job config. ``check_fields`` walks the composed config and refuses any
# field without a check, so a new field must get one here (a pattern; ``*`` stands for one key, e.g. a view
# type). A check returns None when the value is fine, else what is wrong and how to fix it.

Check = Callable[[Any], "str | None"]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _bounds(low, high, low_open: bool, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return "positive" if (low == 0 and low_open) else f">= {low}"
    return f"<= {high}" if high is not None else ""


def _in_range(value, low, high, low_open: bool, high_open: bool = False) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def integer(low: int | None = None, high: int | None = None, null: bool = False) -> Check:
    """An int (not a bool) in [low, high]; null allowed when ``null``."""
    def check(value):
        if value is None and null:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer{'' if low is None else ' ' + _bounds(low, high, False)}" \
                   f"{' or null' if null else ''}, got {value!r} ({_kind(value)})"
        if not _in_range(value, low, high, False):
            return f"must be {_bounds(low, high, False)}, got {value}"
        return None
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           null: bool = False) -> Check:
    """An int or float in [low, high] (``low_open``/``high_open``: excluding that bound); null allowed when ``null``."""
    def check(value):
        if value is None and null:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number{'' if low is None and high is None else ' ' + _bounds(low, high, low_open, high_open)}" \
                   f"{' or null' if null else ''}, got {value!r} ({_kind(value)})"
        if not _in_range(value, low, high, low_open, high_open):
            return f"must be {_bounds(low, high, low_open, high_open)}, got {value}"
        return None
    return check


def boolean(null: bool = False) -> Check:
    """true or false (or null when ``null``)."""
    def check(value):
        if isinstance(value, bool) or (value is None and null):
            return None
        return f"{value!r} is not a boolean; use true or false{' or null' if null else ''}"
    return check


def text(null: bool = False) -> Check:
    """A string (a name, a path); null allowed when ``null``."""
    def check(value):
        if (value is None and null) or isinstance(value, str):
            return None
        return f"must be a string{' or null' if null else ''}, got {value!r} ({_kind(value)})"
    return check


def choice(values: Sequence[Any] | Callable[[], Sequence[Any]], hint: str = "") -> Check:
    """One of ``values`` (or of what the callable returns: a registry read when checking)."""
    def check(value):
        valid = list(values() if callable(values) else values)
        if value in valid and not (isinstance(value, bool) and not any(isinstance(v, bool) for v in valid)):
            return None
        return f"unknown value {value!r}; valid values are {valid}{hint}"
    return check


def listing(item: Check, length: int | None = None, min_length: int = 1, null: bool = False) -> Check:
    """A list whose every element passes ``item`` (exactly ``length`` long, or at least ``min_length``)."""
    def check(value):
        if value is None and null:
            return None
        if not isinstance(value, (list, tuple)):
            return f"must be a list{'' if length is None else f' of {length}'}{' or null' if null else ''}, " \
                   f"got {value!r} ({_kind(value)}); write it as [a,b]"
        if length is not None and len(value) != length:
            return f"must hold {length} values, got {len(value)}: {list(value)}"
        if len(value) < min_length:
            return f"must hold at least {min_length} value(s), got {list(value)}"
        for i, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"element {i}: {problem}"
        return None
    return check


def section(null: bool = False) -> Check:
    """A group of fields (checked one by one); null allowed when ``null``."""
    def check(value):
        if (value is None and null) or isinstance(value, dict):
            return None
        return f"must be a group of fields{' or null' if null else ''}, got {value!r}"
    return check


def _objectives() -> list[str]:
    from mtssl.loss.objectives import OBJECTIVES

    return sorted(OBJECTIVES)


def _pipelines() -> list[str]:
    from mtssl.data.pipelines import AUGMENTATION_PIPELINES

    return sorted(AUGMENTATION_PIPELINES)


def _view_types() -> list[str]:
    return sorted(VIEW_TYPES)


_PROBABILITIES = listing(number(0, 1))
_HEAD = {"hidden_dims": listing(integer(1), min_length=0), "out_dim": integer(1), "last_bn": boolean()}
_OPTIM_OVERRIDE = {  # method.optim / backbone.optim: the defaults that optim.* null fields take
    "name": choice(OPTIMIZERS), "base_lr": number(0, low_open=True), "weight_decay": number(0),
    "betas": listing(number(0, 1), length=2), "clip_grad": number(0, low_open=True, null=True),
    "weight_decay_1d": boolean(), "warmup_epochs": number(0), "final_lr_ratio": number(0, 1),
    "schedule_per": choice(SCHEDULE_PER),
}

FIELD_CHECKS: dict[str, Check] = {
    "out_dir": text(),
    "method": section(),
    "method.name": choice(_objectives, " (method=<name>)"),
    **{f"method.{head}": section() for head in ("projector", "predictor")},
    **{f"method.{head}.{k}": c for head in ("projector", "predictor") for k, c in _HEAD.items()},
    "method.objective_kwargs": section(),
    "method.task_weight": number(0),
    "method.two_view": section(),  # views=global: the method's own 2-view augmentation and loss weight
    "method.two_view.weight": number(0),
    "method.two_view.scale": listing(number(), length=2),
    "method.two_view.blur_p": _PROBABILITIES,
    "method.two_view.solarize_p": _PROBABILITIES,
    "method.two_view.jitter": listing(number(0), length=4),
    "method.batch_size": integer(1, null=True),
    "method.fixed_predictor_lr": boolean(),
    "method.optim": section(),
    **{f"method.optim.{k}": c for k, c in _OPTIM_OVERRIDE.items()},
    "views": section(),
    "views.name": text(),
    "views.types": section(),
    "views.types.*": section(),
    "views.types.*.count": integer(1, null=True),
    "views.types.*.size": integer(1, null=True),
    "views.types.*.scale": listing(number(), length=2, null=True),
    "views.types.*.blur_p": listing(number(0, 1), null=True),
    "views.types.*.solarize_p": listing(number(0, 1), null=True),
    "views.types.*.cutout_area": listing(number(), length=2, null=True),
    "views.types.*.weight": number(null=True),
    "views.types.*.jitter": listing(number(0), length=4, null=True),
    "views.types.*.blur_kernel": integer(1, null=True),
    "predictor": section(),
    "predictor.mode": choice(PREDICTOR_MODES, " (predictor=<mode>)"),
    "backbone": section(),
    "backbone.name": text(),
    "backbone.timm_name": text(),
    "backbone.ema_tau": number(0, 1),
    "backbone.kwargs": section(),
    "backbone.zero_init_last": boolean(null=True),
    "backbone.drop_path_rate": number(0, 1, high_open=True),
    "backbone.projector_hidden_dims": listing(integer(1)),
    "backbone.optim": section(null=True),
    **{f"backbone.optim.{k}": c for k, c in _OPTIM_OVERRIDE.items()},
    "data": section(),
    "data.name": text(),
    "data.root": text(null=True),
    "data.train_split": text(),
    "data.val_split": text(),
    "data.subset": integer(1, null=True),
    "data.subset_seed": integer(0),
    "data.mean": listing(number(0, 1), length=3),
    "data.std": listing(number(0, low_open=True), length=3),
    "data.view_sizes": section(),
    "data.view_sizes.*": integer(1),
    "data.small_images": boolean(),
    "data.eval_resize": integer(1, null=True),
    "data.eval_crop": integer(1, null=True),
    "data.eval_interpolation": choice(EVAL_INTERPOLATIONS),
    "data.pipeline": choice(_pipelines),
    "data.gpu_decode": boolean(),
    "data.num_workers": integer(0),
    "data.prefetch_factor": integer(1),
    "data.download": boolean(),
    "optim": section(),
    "optim.name": choice(OPTIMIZERS),
    "optim.base_lr": number(0, low_open=True),
    "optim.weight_decay": number(0),
    "optim.momentum": number(0, 1),
    "optim.trust_coefficient": number(0, low_open=True),
    "optim.betas": listing(number(0, 1), length=2),
    "optim.clip_grad": number(0, low_open=True, null=True),
    "optim.warmup_epochs": number(0),
    "optim.final_lr_ratio": number(0, 1),
    "optim.weight_decay_1d": boolean(),
    "optim.schedule_per": choice(SCHEDULE_PER),
    "train": section(),
    "train.epochs": integer(0),
    "train.batch_size": integer(1),
    "train.seed": integer(0),
    "train.ema_tau": number(0, 1),
    "train.grouped_views": choice([False, True, "ghost", "plain"]),
    "train.sync_bn": boolean(),
    "train.channels_last": boolean(),
    "train.compile": boolean(),
    "train.activation_checkpointing": boolean(),
    "train.backward": choice(["joint", "per_view"]),
    "train.log_every_steps": integer(1),
    "train.checkpoint_every_steps": integer(1),
    "train.checkpoint_every_min": number(0, low_open=True),
    "train.keep_checkpoints": integer(2),
    "train.final_checkpoint_only": boolean(),
    "train.max_steps": integer(1, null=True),
    "train.device": choice(["auto", "cpu", "cuda"]),
    "train.precision": choice(["auto", "fp32", "bf16"]),  # auto is resolved (resolve_config) before the hash
    "train.deterministic": boolean(),
    "train.cuda_deterministic": boolean(),
    "train.collective_timeout_s": number(0, low_open=True),
    "monitor": section(),
    "monitor.interference_every": integer(0, null=True),
    "monitor.rankme": boolean(),
    "monitor.rankme_threshold": number(0, null=True),
    "eval": section(),
    "eval.knn_k": listing(integer(1)),
    "eval.knn_temperature": number(0, low_open=True),
    "eval.batch_size": integer(1),
    "eval.train_subset": integer(1, null=True),
    "eval.val_subset": integer(1, null=True),
    "eval.linear_epochs": integer(1),
    "eval.linear_lrs": listing(number(0, low_open=True)),
    "eval.linear_batch_size": integer(2),  # BatchNorm needs two samples
    "eval.linear_holdout": number(0, 1, low_open=True, high_open=True),
    "eval.feature_dtype": choice(FEATURE_DTYPE_NAMES, " (fp32 keeps results bitwise; bf16/fp16 halve the banks' memory)"),
    "eval.linear_protocols": listing(choice(LINEAR_PROTOCOLS)),
    "eval.augmented_epochs": integer(1),
    "eval.augmented_batch_size": integer(1),
    "eval.augmented_lr": number(0, low_open=True),
    "eval.knn_every_epochs": integer(0, null=True),
    "eval.knn_during_training_val_subset": integer(1, null=True),
    "eval.knn_during_training_train_subset": integer(1, null=True),
}
# Sections passed on as keyword arguments (to timm, to the objective): their keys are not ours to check.
OPEN_SECTIONS = ("method.objective_kwargs", "backbone.kwargs")
# Fields that may be absent: the sub-fields of a section that may be null.
OPTIONAL_PATTERNS = tuple(f"backbone.optim.{k}" for k in _OPTIM_OVERRIDE) + tuple(
    f"method.optim.{k}" for k in _OPTIM_OVERRIDE if k not in ("name", "base_lr", "weight_decay")) + (
    # Recipe fields a preset may leave out (read with oc.select / .get, null when absent).
    "backbone.projector_hidden_dims", "backbone.zero_init_last", "backbone.drop_path_rate", "method.batch_size",
    *(f"method.two_view.{k}" for k in ("scale", "blur_p", "solarize_p", "jitter")),
    "train.collective_timeout_s",  # absent from the config.yaml of older jobs (re-evaluation): the default
)


def field_check(path: str) -> Check | None:
    """The check of a dotted field path (``views.types.local.count`` matches ``views.types.*.count``)."""
    if path in FIELD_CHECKS:
        return FIELD_CHECKS[path]
    parts = path.split(".")
    for pattern, check in FIELD_CHECKS.items():
        pattern_parts = pattern.split(".")
        if len(pattern_parts) == len(parts) and all(p in ("*", q) for p, q in zip(pattern_parts, parts)):
            return check
    return None


def _nearest_field(path: str) -> str:
    import difflib

    known = [p for p in FIELD_CHECKS if "*" not in p]
    nearest = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    return f"; did you mean {nearest[0]}?" if nearest else ""


def check_fields(cfg: DictConfig) -> None:
    """Check every field's type and range against FIELD_CHECKS; refuse fields it does not know and missing ones."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)

    def walk(node: Any, path: str) -> None:
        check = field_check(path) if path else section()
        if check is None:
            raise ConfigError(
                f"{path}: not a field of the job config{_nearest_field(path)} "
                f"(an override with + adds a field that nothing reads; remove it, or fix its name)")
        problem = check(node)
        if problem:
            raise ConfigError(f"{path}: {problem}")
        if isinstance(node, dict) and path not in OPEN_SECTIONS:
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))

    walk(data, "")
    for pattern in FIELD_CHECKS:
        if "*" in pattern or pattern in OPTIONAL_PATTERNS:
            continue
        parent, _, leaf = pattern.rpartition(".")
        node = data
        for part in parent.split(".") if parent else []:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            raise ConfigError(f"{pattern}: missing from the config (removed with ~?); give it a value: {pattern}=...")


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


def describe_recipe(cfg: DictConfig) -> str:
    """One line with the recipe items of a resolved job config (what ``--dry-run`` shows per job)."""
    from mtssl.loss.objectives import build_objective

    o, m, b = cfg.optim, cfg.method, cfg.backbone
    tau = cfg.train.ema_tau if build_objective(m).ema_target else "- (no EMA)"
    peak = o.base_lr * cfg.train.batch_size / 256
    heads = "-".join(str(d) for d in [*m.projector.hidden_dims, m.projector.out_dim])
    views = ", ".join(
        f"{name} {v.count}x{v.size} w {v.weight:.4g} scale {list(v.scale)} blur k{v.blur_kernel}"
        for name, v in cfg.views.types.items()
    )
    return (
        f"{cfg.train.epochs} ep, batch {cfg.train.batch_size}; {o.name} base lr {o.base_lr:g} (peak {peak:g}), "
        f"wd {o.weight_decay:g} ({'every parameter' if o.weight_decay_1d else 'not 1-D'}), warmup {o.warmup_epochs} ep, "
        f"cosine per {o.schedule_per} to {o.final_lr_ratio:g} x peak, clip {o.clip_grad}; tau0 "
        f"{tau}; projector {heads}; drop-path "
        f"{b.get('drop_path_rate') or 0:g}; zero_init_last {b.get('zero_init_last')}; views: {views}"
    )


def _omegaconf_message(error: Exception) -> str:
    key = getattr(error, "full_key", None)
    if key:
        hint = " (e.g. data.root=/path/to/imagenet)" if key == "data.root" else ""
        return f"{key}: {error.msg if hasattr(error, 'msg') else error}. Set it on the command line: {key}=...{hint}"
    return str(error)


def training_fields(cfg: DictConfig | dict) -> dict:
    """The config as plain data without ``NON_TRAINING_FIELDS`` (and Hydra's own node): what defines the run."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    data.pop("hydra", None)
    for dotted in NON_TRAINING_FIELDS:
        _drop(data, dotted)
    return data


def _drop(data: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.get(p, {})
    data.pop(leaf, None)


def config_hash(cfg: DictConfig | dict, ignore: Sequence[str] = ()) -> str:
    """SHA-256 of the fields that define the training run (see ``NON_TRAINING_FIELDS``).

    ``ignore``: further dotted fields to leave out, e.g. ``("train.seed",)`` for the hash that the seeds of
    one table cell share.
    """
    data = training_fields(cfg)
    for dotted in ignore:
        _drop(data, dotted)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


ABSENT = "(absent)"


def config_changes(old: DictConfig | dict, new: DictConfig | dict) -> list[tuple[str, Any, Any]]:
    """Training fields whose values differ, as (dotted key, old value, new value); ``ABSENT`` where a side lacks
    the key. Lists compare as one value; ``NON_TRAINING_FIELDS`` are ignored."""
    before, after = _flatten(training_fields(old)), _flatten(training_fields(new))
    keys = list(after) + [k for k in before if k not in after]
    return [(k, before.get(k, ABSENT), after.get(k, ABSENT)) for k in keys if before.get(k, ABSENT) != after.get(k, ABSENT)]


def changes_from_file(recorded: Path | str, cfg: DictConfig | dict) -> list[tuple[str, Any, Any]] | None:
    """``config_changes`` from the resolved config saved at ``recorded`` (a config.yaml) to ``cfg``; None when
    that file is missing or unreadable."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        old = OmegaConf.load(recorded)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError):
        return None
    return config_changes(old, cfg) if isinstance(old, DictConfig) else None


def describe_changes(recorded: Path | str, cfg: DictConfig | dict,
                     changes: list[tuple[str, Any, Any]] | None = None) -> str:
    """The training fields that differ from the config saved at ``recorded`` to ``cfg`` (``format_changes``), or why
    they cannot be named; ``changes``: ``changes_from_file(recorded, cfg)`` when already computed."""
    changes = changes_from_file(recorded, cfg) if changes is None else changes
    if changes:
        return format_changes(changes)
    if changes is None:
        return f"the fields cannot be named: {recorded} is missing or unreadable"
    return f"the config hashes differ although no field of {recorded} does"


# The field naming each preset of a config group: when it changes, the group's other fields are the preset's.
PRESET_KEYS = {"method": "method.name", "backbone": "backbone.name", "views": "views.name", "data": "data.name",
               "predictor": "predictor.mode"}


def format_changes(changes: Sequence[tuple[str, Any, Any]], limit: int = 24) -> str:
    """``train.seed: 0 → 5, method.name: byol → simsiam (+17 fields of the preset)`` (the first ``limit``, then a count).

    A changed preset (``method=simsiam``) is one entry with the count of the fields it brings, so the
    fields set on their own (``train.epochs``) are not crowded out.
    """
    swapped = {group for group, key in PRESET_KEYS.items() if any(k == key for k, _, _ in changes)}
    brought = {group: sum(k.startswith(group + ".") and k != PRESET_KEYS[group] for k, _, _ in changes) for group in swapped}
    shown = []
    for key, a, b in changes:
        group = key.split(".", 1)[0]
        if group in swapped and key != PRESET_KEYS[group]:
            continue
        extra = f" (+{brought[group]} fields of the preset)" if group in swapped and brought[group] else ""
        shown.append(f"{key}: {_show(a)} → {_show(b)}{extra}")
    if len(shown) > limit:
        shown = shown[:limit] + [f"... and {len(shown) - limit} more"]
    return ", ".join(shown)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig, check_data: bool = True, world_size: int = 1) -> None:
    """Raise ConfigError for the first problem found; return None when the job can run.

    Every field's type and range first (``check_fields``), then what spans fields (views, batch per rank,
    the backbone name in timm), the output directory, and with ``check_data`` the data folder.
    """
    check_fields(cfg)
    _validate_backbone(cfg)
    _validate_method(cfg)
    _validate_views(cfg)
    _validate_optim(cfg)
    train = cfg.train
    _require(
        not (train.activation_checkpointing and train.compile),
        "train.activation_checkpointing: not supported with train.compile=true yet (the recomputation's BatchNorm "
        "handling is eager-only); set one of them to false",
    )
    if train.backward == "per_view":
        from mtssl.loss.objectives import build_objective  # deferred, as in describe_recipe

        _require(build_objective(cfg.method).ema_target, f"train.backward=per_view: {cfg.method.name}'s targets are the "
                 "online projections of the global views (no EMA target), which one view at a time does not have; "
                 "use train.backward=joint")
        _require(not train.grouped_views, f"train.backward=per_view: runs one view per call, so train.grouped_views="
                 f"{train.grouped_views} cannot group views; use train.grouped_views=false or train.backward=joint")
        _require(not cfg.monitor.interference_every, "monitor.interference_every: the task-interference probe takes "
                 "each task's gradient from the step's joint graph, which train.backward=per_view does not build; "
                 "use train.backward=joint or monitor.interference_every=null")
    _require(
        train.batch_size % world_size == 0,
        f"train.batch_size: {train.batch_size} does not divide across {world_size} ranks; use a multiple of {world_size}",
    )
    _require(
        cfg.eval.augmented_batch_size % world_size == 0,
        f"eval.augmented_batch_size: {cfg.eval.augmented_batch_size} does not divide across {world_size} ranks; "
        f"use a multiple of {world_size}",
    )
    check_out_dir(cfg.out_dir)
    if check_data:
        _validate_data(cfg)


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Raise ConfigError unless out_dir exists as a writable folder or can be created (nothing is created)."""
    path = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir: {path} cannot be created: {existing} is a file; choose another out_dir=...")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir: {path} cannot be {'written' if existing == path else 'created'}: no write "
                          f"permission on {existing}; choose a folder you can write, out_dir=...")


def _validate_backbone(cfg: DictConfig) -> None:
    import timm

    name = cfg.backbone.timm_name
    _require(
        timm.is_model(name),
        f"backbone.name: unknown backbone {name!r}; use a preset {available('backbone')} (backbone=<preset>) "
        f"or any timm model name (backbone.name=<timm name>, see timm.list_models())",
    )
    zero_init_last = cfg.backbone.get("zero_init_last")
    if zero_init_last is not None:
        _require(isinstance(zero_init_last, bool), f"backbone.zero_init_last: {zero_init_last!r} is not a boolean; use true, false or null")
        _require(
            name in timm.list_models(module="resnet"),
            f"backbone.zero_init_last: only timm ResNets take it, not {name!r}; set backbone.zero_init_last=null",
        )
    rate = cfg.backbone.get("drop_path_rate") or 0.0
    _require(0 <= rate < 1, f"backbone.drop_path_rate: must be in [0, 1), got {rate}")


def _validate_method(cfg: DictConfig) -> None:
    method = cfg.method
    for head in ("projector", "predictor"):
        dims = list(method[head].hidden_dims)
        _require(
            all(isinstance(d, int) and d > 0 for d in dims),
            f"method.{head}.hidden_dims: positive layer widths are needed, got {dims}",
        )
    batch = method.get("batch_size")
    _require(
        batch is None or (isinstance(batch, int) and batch > 0),
        f"method.batch_size: the recipe's global batch must be a positive integer, got {batch!r}",
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
        jitter = list(view.jitter)
        _require(
            len(jitter) == 4 and all(j >= 0 for j in jitter) and jitter[3] <= 0.5,
            f"{field}.jitter: [brightness, contrast, saturation, hue] with every value >= 0 and hue <= 0.5 "
            f"is needed, got {jitter}",
        )
        k = view.blur_kernel_px()
        _require(
            isinstance(k, int) and k >= 1 and k % 2 == 1 and k // 2 < view.size,
            f"{field}.blur_kernel: an odd number of pixels with half of it below the crop size {view.size} "
            f"is needed, got {k!r}; e.g. {field}.blur_kernel=null (about 10 % of the crop)",
        )
    _require(
        any(view.weight > 0 for view in layout.types),
        "views.types.*.weight: every task weight is 0; at least one task must be trained",
    )


def _validate_optim(cfg: DictConfig) -> None:
    """What spans optimiser fields (each field's own type and range is in FIELD_CHECKS)."""
    optim = cfg.optim
    _require(
        not (optim.weight_decay_1d and optim.name == "lars"),
        "optim.weight_decay_1d: LARS excludes 1-D parameters from weight decay and adaptation; "
        "use optim.weight_decay_1d=false with lars, or optim.name=sgd|adamw",
    )


def _validate_data(cfg: DictConfig) -> None:
    from mtssl.data.image_folder import DataError, class_balanced_subset, list_image_folder

    data = cfg.data
    _require(data.root is not None, "data.root: set the data folder, e.g. data.root=/path/to/imagenet")
    if not Path(data.root).exists() and data.get("download"):
        from mtssl.data.cifar10 import download_cifar10

        try:
            download_cifar10(data.root)
        except (OSError, RuntimeError) as error:  # URLError (no network), a bad archive, an unwritable folder
            raise ConfigError(
                f"data.root: {data.root} does not exist and downloading CIFAR-10 there failed ({error}). "
                f"Point data.root (or the MTSSL_DATA_ROOT environment variable) at a CIFAR-10 folder in the "
                f"ImageFolder layout (<root>/train/<class>/*.jpg, <root>/val/<class>/*.jpg), or run once where "
                f"there is network; data.download=false turns the download off"
            ) from error
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
