"""Expand an ablation (axes x seeds) and a budget's regime into the jobs of a sweep.

A job is a list of ``python -m mtssl.run`` overrides: ``regime=<the budget's regime>``, the ablation's
``fixed`` overrides, the sweep's ``job_overrides``, then the job's own axis values and seed, a later
override of the same key replacing an earlier one. They are all command-line values of the job, so each
of them wins over what its regime sets (the precedence rule of ``mtssl.config``): a regime can pick
``backbone=resnet50`` and the backbone ablation still sweeps its backbones.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from mtssl.config import ConfigError
from mtssl.config.quoting import quote_value  # noqa: F401 - a job's out_dir override (sweeps/launch.py)

SEED_AXIS = "train.seed"
# Characters kept in a job directory name; anything else becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]")
MAX_NAME_LENGTH = 200


@dataclass(frozen=True)
class SweepJob:
    """One job of a sweep: its directory name, its mtssl overrides (without out_dir) and its axis values."""

    name: str
    overrides: tuple[str, ...]
    axes: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None  # "random_init": the untrained network the tables compare the grid with
    reference_job: str | None = None  # a grid job's own random-init reference (its job name)

    def to_json(self) -> dict:
        spec = {"name": self.name, "overrides": list(self.overrides), "axes": dict(self.axes)}
        for key in ("reference", "reference_job"):
            if getattr(self, key):
                spec[key] = getattr(self, key)
        return spec


def format_value(value: Any) -> str:
    """A value as Hydra override text: ``[64,64]``, ``null``, ``true``, ``0.1``, ``byol``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def override_key(override: str) -> str:
    """The key an override sets: ``+train.seed=1`` -> ``train.seed``; ``data@x=y`` keeps ``data@x``."""
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


def merge_overrides(*groups: Iterable[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces the earlier one (in its place)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            override = str(override).strip()
            if "=" not in override and not override.startswith("~"):
                raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.epochs=2)")
            merged[override_key(override)] = override
    return list(merged.values())


def job_name(axes: Mapping[str, Any]) -> str:
    """Directory name from the axis values, e.g. ``method=byol,predictor=shared`` (filesystem safe)."""
    if not axes:
        return "default"
    text = ",".join(f"{key}={format_value(value)}" for key, value in axes.items())
    text = _UNSAFE.sub("_", text)
    if len(text) > MAX_NAME_LENGTH:
        raise ConfigError(f"job name {text[:60]}... is longer than {MAX_NAME_LENGTH} characters; "
                          f"use shorter axis names or values in the ablation")
    return text


def expand_grid(axes: Mapping[str, Sequence[Any]], seeds: Sequence[int] = (0,), fixed: Sequence[str] = (),
                regime: str | None = None, job_overrides: Sequence[str] = ()) -> list[SweepJob]:
    """Every combination of the axis values (first axis slowest), times the seeds; every job runs ``regime``.

    With several seeds, ``train.seed`` becomes the last axis; with one it is a fixed override.
    """
    axes = {str(key): list(values) for key, values in axes.items()}
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"ablation.axes.{key}: empty list of values; give at least one or remove the axis")
        if len(set(map(format_value, values))) != len(values):
            raise ConfigError(f"ablation.axes.{key}: repeated values in {values}")
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("ablation.seeds: give at least one seed, e.g. ablation.seeds=[0]")
    if SEED_AXIS in axes:
        raise ConfigError(f"ablation.axes.{SEED_AXIS}: list the seeds in ablation.seeds instead")
    if len(seeds) > 1:
        axes[SEED_AXIS] = seeds
    clashing = sorted({override_key(o) for o in job_overrides} & set(axes))
    if clashing:
        raise ConfigError(f"job_overrides sets {clashing}, which this ablation sweeps as axes (job keys given on "
                          f"the command line count as job_overrides); "
                          f"change the axis values instead (ablation.axes.<axis>=[...])")
    one_seed = [f"{SEED_AXIS}={seeds[0]}"] if len(seeds) == 1 else []
    base = merge_overrides([f"regime={regime}"] if regime else [], fixed, job_overrides, one_seed)
    jobs, names = [], {}
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        name = job_name(combo)
        if name in names:
            raise ConfigError(f"axis values {names[name]} and {combo} give the same job directory {name!r}; "
                              f"make the values differ in letters, digits or ._=,+@-")
        names[name] = combo
        own = [f"{key}={format_value(value)}" for key, value in combo.items()]
        jobs.append(SweepJob(name, tuple(merge_overrides(base, own)), combo))
    return jobs


def sweep_axes(ablation_axes: Mapping[str, Sequence[Any]], budget_axes: Mapping[str, Sequence[Any]] | None
               ) -> tuple[dict[str, list], dict[str, list]]:
    """The ablation's axes, a budget's ``axes`` replacing the values of the axes it names.

    The rule: a budget's ``axes.<key>`` replaces the values of the ablation's axis ``<key>``; an axis the ablation
    does not sweep is not added (one budget serves every ablation). A CPU budget sweeps CPU-sized backbones this
    way. Returns (the axes, {each replaced axis: the ablation's own values}).
    """
    axes = {str(key): list(values) for key, values in ablation_axes.items()}
    replaced = {}
    for key, values in (budget_axes or {}).items():
        if key in axes and list(values) != axes[key]:
            replaced[key] = axes[key]
            axes[key] = list(values)
    return axes, replaced


RANDOM_INIT = "random_init"


def random_init_job(job: SweepJob, distinct: bool) -> SweepJob:
    """The reference job of ``job``: its config with ``train.epochs=0``, so evaluation sees the network as
    initialised. ``distinct``: several references in one sweep; the name then keeps ``job``'s axis values."""
    name = f"{RANDOM_INIT},{job.name}" if distinct else RANDOM_INIT
    return SweepJob(name, tuple(merge_overrides(job.overrides, ["train.epochs=0"])), dict(job.axes), RANDOM_INIT)
