"""Run identity: which fields define a training run, its hash, and the fields two configs differ in.

A rerun or a relaunch compares its config with the one an out_dir recorded (results.json's hash, the
checkpoint's config.yaml); only the training fields count (``NON_TRAINING_FIELDS`` may differ).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

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
    "logging",  # where the scalars are written (TensorBoard, W&B), not what is trained
)


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


