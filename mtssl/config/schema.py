"""The field schema of the job config: one check per field, and the walk that applies them.

``FIELD_CHECKS`` maps every dotted field (``*`` stands for one key, e.g. a view type) to its check: its type,
range or choices. ``check_fields`` refuses a field without a check (a typo added with ``+``) and a missing
one. Each field is checked here and only here; what spans several fields is in ``mtssl.config.validate``.
The registries a choice reads (objectives, pipelines, optimisers, precisions, feature dtypes) live with
their owners and are read when checking.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.config.errors import ConfigError
from mtssl.data.torchvision_augment import EVAL_INTERPOLATIONS

PREDICTOR_MODES = ("separate", "shared")
LINEAR_PROTOCOLS = ("frozen_features", "augmented")  # eval.linear_protocols

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


def _weights_branches() -> list[str]:
    from mtssl.eval.weights import BRANCHES

    return list(BRANCHES)


def _pipelines() -> list[str]:
    from mtssl.data.pipelines import AUGMENTATION_PIPELINES

    return sorted(AUGMENTATION_PIPELINES)


def _backbone_families() -> list[str]:
    from mtssl.config.compose import available

    return available("backbone_family")


def _view_batching() -> list[str]:
    from mtssl.model.ghost_bn import VIEW_BATCHING

    return list(VIEW_BATCHING)


def _optimizers() -> list[str]:
    from mtssl.train.optim import OPTIMIZERS

    return sorted(OPTIMIZERS)


def _schedule_per() -> list[str]:
    from mtssl.train.optim import SCHEDULE_PER

    return list(SCHEDULE_PER)


def _precisions() -> list[str]:
    from mtssl.distributed.fsdp import PRECISIONS

    return ["auto", *PRECISIONS]  # auto is resolved (resolve_config) before the hash


def _feature_dtypes() -> list[str]:
    from mtssl.eval.features import FEATURE_DTYPES

    return list(FEATURE_DTYPES)


def _wandb_modes() -> list[str]:
    from mtssl.train.scalar_logger import WANDB_MODES

    return list(WANDB_MODES)


def _wandb_switch(value: Any) -> str | None:
    """logging.wandb: a boolean; true only where wandb is installed (refused before anything is written)."""
    problem = boolean()(value)
    if problem or not value:
        return problem
    from mtssl.train.scalar_logger import wandb_missing

    return wandb_missing()


_PROBABILITIES = listing(number(0, 1))
_HEAD = {"hidden_dims": listing(integer(1), min_length=0), "out_dim": integer(1), "last_bn": boolean()}

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
    "method.batch_size": integer(1),
    "method.fixed_predictor_lr": boolean(),
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
    "views.types.*.weight": number(0, null=True),
    "views.types.*.jitter": listing(number(0), length=4, null=True),
    "views.types.*.blur_kernel": integer(1, null=True),
    "predictor": section(),
    "predictor.mode": choice(PREDICTOR_MODES, " (predictor=<mode>)"),
    "backbone": section(),
    "backbone.name": text(),
    "backbone.family": choice(_backbone_families, " (set by the backbone preset: backbone=<preset>)"),
    "backbone.timm_name": text(),
    "backbone.kwargs": section(),
    "backbone.zero_init_last": boolean(null=True),
    "backbone.drop_path_rate": number(0, 1, high_open=True),
    "backbone.projector_hidden_dims": listing(integer(1)),
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
    "optim.name": choice(_optimizers),
    "optim.base_lr": number(0, low_open=True),
    "optim.weight_decay": number(0),
    "optim.momentum": number(0, 1),
    "optim.trust_coefficient": number(0, low_open=True),
    "optim.betas": listing(number(0, 1), length=2),
    "optim.clip_grad": number(0, low_open=True, null=True),
    "optim.warmup_epochs": number(0),
    "optim.final_lr_ratio": number(0, 1),
    "optim.weight_decay_1d": boolean(),
    "optim.schedule_per": choice(_schedule_per),
    "train": section(),
    "train.epochs": integer(0),
    "train.batch_size": integer(1),
    "train.seed": integer(0),
    "train.ema_tau": number(0, 1),
    "train.view_batching": choice(_view_batching),
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
    "train.precision": choice(_precisions),
    "train.deterministic": boolean(),
    "train.cuda_deterministic": boolean(),
    "train.collective_timeout_s": number(0, low_open=True),
    "monitor": section(),
    "monitor.interference_every": integer(0, null=True),
    "monitor.rankme": boolean(),
    "monitor.rankme_threshold": number(0, null=True),
    "monitor.knn_every_epochs": integer(0, null=True),
    "monitor.knn_val_subset": integer(1, null=True),
    "monitor.knn_train_subset": integer(1, null=True),
    "logging": section(),
    "logging.wandb": _wandb_switch,
    "logging.wandb_project": text(),
    "logging.wandb_entity": text(null=True),
    "logging.wandb_group": text(null=True),
    "logging.wandb_mode": choice(_wandb_modes),
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
    "eval.feature_dtype": choice(_feature_dtypes, " (fp32 keeps results bitwise; bf16/fp16 halve the banks' memory)"),
    "eval.linear_protocols": listing(choice(LINEAR_PROTOCOLS)),
    "eval.augmented_epochs": integer(1),
    "eval.augmented_batch_size": integer(1),
    "eval.augmented_lr": number(0, low_open=True),
    "eval.weights": text(null=True),
    "eval.weights_branch": choice(_weights_branches),
}
# Sections passed on as keyword arguments (to timm, to the objective): their keys are not ours to check.
OPEN_SECTIONS = ("method.objective_kwargs", "backbone.kwargs")
# Fields that may be absent: the sub-fields of a section that may be null.
OPTIONAL_PATTERNS = (  # a method's 2-view transform may leave these to the global view type (views=global)
    *(f"method.two_view.{k}" for k in ("scale", "blur_p", "solarize_p", "jitter")),
    "train.collective_timeout_s",  # absent from the config.yaml of older jobs (re-evaluation): the default
    "eval.weights", "eval.weights_branch",  # the same (absent: the job's own weights)
    "logging",  # absent from the config.yaml of older jobs too: TensorBoard only
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


