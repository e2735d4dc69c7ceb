"""An ablation's reference weights: backbones no job of the sweep trains, evaluated like its jobs, shown as rows.

An ablation (sweeps/conf/ablation/<name>.yaml) may list ``references``, each a weights source (a file, or
``timm:<name>`` with timm's pretrained weights found locally) or a mapping with more::

    references:
      - timm:resnet50                        # backbone=resnet50 is implied (its preset, else backbone.name)
      - weights: /releases/mulan/byol_multitask_resnet50_800ep_ckpt.pth
        name: mulan_byol_800ep               # the row label and folder (default: the file's stem)
        backbone: resnet50                   # the backbone preset (default: the grid's)
        branch: online                       # or target: the EMA target of a backbone.pth or a full checkpoint
        overrides: [data.small_images=false] # any other job keys

Each becomes one job of the sweep, ``<sweep_dir>/reference=<name>/``: the grid's first job with ``eval.weights``
set, so it evaluates on the same data with the same eval settings and trains nothing (``python -m mtssl.run`` with
``eval.weights``: mtssl.eval.evaluate_weights). sweep.json marks it ``"reference": "reference_weights"``; its results.json
has status ``evaluated``, and analysis/tables.py shows it as a "reference: <name>" row above the grid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.config import ConfigError, available
from mtssl.eval.weights import TIMM_PREFIX
from mtssl.job_folder import REFERENCE_JOB_PREFIX, WEIGHTS_REFERENCE
from sweeps.grid import SweepJob, merge_overrides, quote_value

_UNSAFE = re.compile(r"[^A-Za-z0-9._,+@-]")
ENTRY_KEYS = {"weights", "name", "backbone", "branch", "overrides"}


def reference_job(entry: Any, grid_job: SweepJob, index: int) -> SweepJob:
    """The sweep job of one ``references`` entry, built on ``grid_job`` (the grid's first job)."""
    field = f"ablation.references[{index}]"
    if isinstance(entry, str):
        entry = {"weights": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("weights"), str) or not entry["weights"]:
        raise ConfigError(f"{field}: give a weights file or timm:<name>, or a mapping with 'weights' (and name, "
                          f"backbone, branch, overrides); got {entry!r}")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{field}: unknown keys {unknown}; valid keys are {sorted(ENTRY_KEYS)}")
    weights = entry["weights"]
    is_timm = weights.startswith(TIMM_PREFIX)
    default_name = weights[len(TIMM_PREFIX):] if is_timm else Path(weights).stem
    name = _UNSAFE.sub("_", str(entry.get("name") or default_name))
    own = [f"eval.weights={quote_value(weights)}", f"eval.weights_branch={entry.get('branch') or 'online'}"]
    if entry.get("backbone"):
        own.append(f"backbone={entry['backbone']}")
    elif is_timm:  # timm:<name> names its architecture: its preset when there is one (resnet50), else the timm name
        architecture = default_name.split(".", 1)[0]
        preset = architecture in available("backbone")
        own.append(f"backbone={architecture}" if preset else f"backbone.name={architecture}")
    extra = entry.get("overrides") or []
    if not isinstance(extra, (list, tuple)):
        raise ConfigError(f"{field}.overrides: must be a list of key=value, got {extra!r}")
    overrides = merge_overrides(grid_job.overrides, own, [str(o) for o in extra])
    return SweepJob(REFERENCE_JOB_PREFIX + name, tuple(overrides), {}, WEIGHTS_REFERENCE)


def reference_jobs(ablation: DictConfig, grid: Sequence[SweepJob]) -> list[SweepJob]:
    """The jobs of the ablation's ``references`` (none when it lists none); ConfigError on a bad entry."""
    entries = ablation.get("references")
    if not entries or not grid:
        return []
    entries = OmegaConf.to_container(entries, resolve=True) if OmegaConf.is_config(entries) else entries
    if not isinstance(entries, list):
        raise ConfigError(f"ablation.references: must be a list of weights sources, got {entries!r}")
    jobs = [reference_job(entry, grid[0], i) for i, entry in enumerate(entries)]
    names = [job.name for job in jobs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"ablation.references: two references named {repeated}; give each a name: ...")
    return jobs


def plan_references(ablation: DictConfig, grid: Sequence[SweepJob], plan: Callable[[SweepJob], Any]) -> list:
    """``plan(job)`` (sweeps/launch.py's plan_job: compose and validate) of every reference job."""
    return [plan(job) for job in reference_jobs(ablation, grid)]
