"""Gather the jobs of one or more sweep directories into one tidy pandas DataFrame, one row per job.

Which directories are jobs:
  * with ``<sweep_dir>/sweep.json``: every job it lists, in its order, at ``<sweep_dir>/<job name>/``, plus any
    unlisted sub-directory that holds ``results.json`` or ``config.yaml`` (reported in the messages);
  * without it: every sub-directory holding ``results.json`` or ``config.yaml`` (or the directory itself, when it
    is a single job directory).

The ``status`` column of a row is one of ``STATUSES``, the job folder's own (``mtssl.job_folder.job_state``):
  completed, diverged, failed  read from the job's ``results.json``;
  malformed   ``results.json`` is not valid JSON, not an object, lacks ``status``, has an unknown status, is a
              completed job without ``knn_top1`` (a partial file), or holds a metric that is not a number or null.
              The ``message`` column says which;
  unfinished  the job has started (its directory holds config.yaml, train.log, progress.json, tb/ or checkpoints/)
              but has no ``results.json`` yet (running, stopped, or killed before writing it);
              ``last_checkpoint_step`` says how far it got;
  pending     listed in ``sweep.json`` but not started: no job directory, or one holding none of those.

Configuration columns (method, views, predictor, backbone, data, seed, epochs) come from the job's axes in
``sweep.json`` first, then from ``results.json``; ``config.yaml`` is read only for jobs without a usable
``results.json`` (running or malformed ones) or with one written before it recorded ``config_hash_without_seed``,
so gathering stays fast. ``config_hash_without_seed`` (the training config's hash, seed left out) tells jobs
of different training configs apart: the tables never put two of them in one cell. Metric columns are percentages
(0..100) exactly as the job wrote them; nested entries are flattened (``knn.k10.top1`` -> ``knn_k10_top1``,
``final_losses.loss_local`` -> ``final_loss_local``). The research monitors' entry (``monitor``, see
mtssl/train/research_monitors.py) becomes ``cos_<a>_<b>`` (mean over probes of the cosine of two tasks' gradients),
``cos_mean`` (their mean over the pairs), ``gradnorm_<task>``, ``rankme_<type>`` (final), ``rankme_min_<type>``,
``unstable`` (true when a RankMe fell below the job's threshold) and ``unstable_reason``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from mtssl.job_folder import (CONFIG, FOLDER_STATUSES, RESULTS, SWEEP_SPEC, JobStatus, job_state,
                              last_checkpoint_step)
from mtssl.utils.progress_bar import progress_bar

STATUSES = tuple(s.value for s in FOLDER_STATUSES)

ID_COLUMNS = ["sweep", "sweep_dir", "ablation", "profile", "axes", "job", "job_dir", "reference", "reference_job", "status",
              "message"]
CONFIG_FIELDS = ["method", "views", "predictor", "backbone", "data", "seed", "epochs", "steps"]
METRIC_COLUMNS = ["knn_top1", "knn_top5", "knn_top1_target", "knn_top5_target", "linear_top1", "linear_top5"]
RUN_FIELDS = ["wall_time_s", "train_time_s", "eval_time_s", "images_per_s", "world_size", "skipped_images", "git_revision",
              "weights_sha256", "config_hash", "config_hash_without_seed", "error"]
CELL_HASH = "config_hash_without_seed"  # what the seeds of one table cell share
MONITOR_PREFIXES = ("cos_", "gradnorm_", "rankme_")  # numeric columns of the research monitors
INTEGER_COLUMNS = ["seed", "epochs", "steps", "world_size", "skipped_images", "last_checkpoint_step"]

# Axis names in sweep.json that are stored under a different column name.
AXIS_COLUMN_ALIASES = {"train.seed": "seed", "train.epochs": "epochs"}
# Where a configuration field lives in a job's resolved config.yaml.
CONFIG_YAML_PATHS = {"method": ("method",), "views": ("views",), "predictor": ("predictor",),
                     "backbone": ("backbone",), "data": ("data",), "seed": ("train", "seed"),
                     "epochs": ("train", "epochs")}
# Sub-directories of a sweep that are never jobs.
NON_JOB_DIRS = {"tables", ".submitit", "logs", "__pycache__"}

# Sweeps with more jobs than this show a progress bar (on stderr) while they are gathered.
PROGRESS_MIN_JOBS = 200
# Malformed jobs listed one by one in the messages; the rest are counted.
MAX_LISTED_PROBLEMS = 3

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class AnalysisError(Exception):
    """A user-facing problem with the input (bad path, no jobs); the message says what to do."""


@dataclass
class Gathered:
    """The gathered jobs (``frame``, one row per job) and human-readable notes about the input (``messages``)."""

    frame: pd.DataFrame
    messages: list[str] = field(default_factory=list)


def gather_sweeps(sweep_dirs: Iterable[Path | str]) -> Gathered:
    """Gather several sweep directories into one DataFrame (rows keep the order of the dirs and of sweep.json).

    Raises AnalysisError if a path does not exist or is not a directory. An empty directory is not an error here:
    it adds a message and no rows.
    """
    records: list[dict[str, Any]] = []
    messages: list[str] = []
    for sweep_dir in sweep_dirs:
        sweep_records, sweep_messages = _gather_one(Path(sweep_dir))
        records.extend(sweep_records)
        messages.extend(sweep_messages)
    return Gathered(_to_frame(records), messages)


def gather_sweep(sweep_dir: Path | str) -> Gathered:
    """Gather one sweep directory (see ``gather_sweeps``)."""
    return gather_sweeps([sweep_dir])


def _gather_one(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if not sweep_dir.exists():
        raise AnalysisError(f"sweep directory {sweep_dir} does not exist; pass the output directory of a sweep "
                            f"(the one holding sweep.json)")
    if not sweep_dir.is_dir():
        raise AnalysisError(f"{sweep_dir} is a file, not a sweep directory; pass the directory holding sweep.json")

    messages: list[str] = []
    spec, spec_problem = _read_sweep_spec(sweep_dir / SWEEP_SPEC)
    if spec_problem:
        messages.append(spec_problem)
    sweep_info = {"sweep": sweep_dir.resolve().name, "sweep_dir": str(sweep_dir),
                  "ablation": spec.get("ablation"), "profile": spec.get("profile")}
    spec_axes = [str(a) for a in spec.get("axes") or []]

    records = []
    listed = set()
    for job in progress_bar(spec.get("jobs", []), desc=f"gathering {sweep_dir.name}", unit="job",
                            min_items=PROGRESS_MIN_JOBS, file=sys.stderr):
        listed.add(job["name"])
        record = _gather_job(sweep_dir / job["name"], job["name"], job["axes"], spec_axes, sweep_info)
        record["reference"], record["reference_job"] = job.get("reference"), job.get("reference_job")
        records.append(record)

    if not spec and (sweep_dir / RESULTS).is_file():
        # A single job directory passed on its own.
        records.append(_gather_job(sweep_dir, sweep_dir.name, {}, [], sweep_info))
        return records, messages

    unlisted = []
    with os.scandir(sweep_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if (entry.name in listed or entry.name in NON_JOB_DIRS or entry.name.startswith(".")
                    or not entry.is_dir()):
                continue
            job_dir = Path(entry.path)
            if (job_dir / RESULTS).is_file() or (job_dir / CONFIG).is_file():
                unlisted.append(entry.name)
                records.append(_gather_job(job_dir, entry.name, {}, spec_axes, sweep_info))
    if unlisted and spec:
        one = len(unlisted) == 1
        messages.append(f"{sweep_dir}: {len(unlisted)} job director{'y' if one else 'ies'} not listed in sweep.json "
                        f"{'was' if one else 'were'} gathered too: {', '.join(unlisted[:5])}"
                        f"{' ...' if len(unlisted) > 5 else ''}")
    if not records:
        found = "sweep.json lists no jobs" if spec else "no sweep.json"
        messages.append(f"{sweep_dir}: no jobs found ({found} and no job directories with results.json or "
                        f"config.yaml); pass the output directory of a sweep")
    malformed = [r for r in records if r["status"] == JobStatus.MALFORMED]
    messages += [f"{r['job_dir']}: {r['message']}" for r in malformed[:MAX_LISTED_PROBLEMS]]
    if len(malformed) > MAX_LISTED_PROBLEMS:
        messages.append(f"{sweep_dir}: {len(malformed) - MAX_LISTED_PROBLEMS} more jobs with a malformed "
                        f"results.json (the 'message' column of results.csv says why for each)")
    return records, messages


def _read_sweep_spec(path: Path) -> tuple[dict[str, Any], str | None]:
    """Read sweep.json into {ablation, profile, axes, jobs: [{name, axes, reference, reference_job}]}; ({}, problem)
    if unusable. ``reference`` ("random_init" or None) marks the untrained jobs the tables compare the grid with;
    ``reference_job`` names a grid job's own one."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}, None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {}, (f"{path} is not valid JSON ({exc}); gathering the job directories found beside it instead. "
                    f"Relaunching the sweep rewrites it")
    if not isinstance(raw, dict) or not isinstance(raw.get("jobs"), list):
        return {}, (f"{path} has no 'jobs' list; gathering the job directories found beside it instead. "
                    f"Relaunching the sweep rewrites it")
    jobs = []
    for job in raw["jobs"]:
        if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not job["name"]:
            continue
        axes = job.get("axes")
        if not isinstance(axes, dict):
            # Fall back to the overrides ("key=value") when axes are absent.
            axes = dict(o.split("=", 1) for o in job.get("overrides") or [] if isinstance(o, str) and "=" in o)
        references = {key: job.get(key) if isinstance(job.get(key), str) else None
                      for key in ("reference", "reference_job")}
        jobs.append({"name": job["name"], "axes": axes, **references})
    # "profile" holds the sweep's budget (sweeps/conf/budget/), named "profile" in sweep.json files before it was renamed
    spec = {"ablation": raw.get("ablation"), "profile": raw.get("budget", raw.get("profile")), "axes": raw.get("axes"),
            "jobs": jobs}
    if not isinstance(spec["axes"], list):
        spec["axes"] = list(dict.fromkeys(k for job in jobs for k in job["axes"]))
    return spec, None


def _gather_job(job_dir: Path, name: str, axes: dict[str, Any], spec_axes: list[str],
                sweep_info: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = dict(sweep_info)
    axis_columns = [AXIS_COLUMN_ALIASES.get(a, a) for a in (spec_axes or list(axes))]
    record.update(axes=",".join(axis_columns), job=name, job_dir=str(job_dir), message=None)

    state = job_state(job_dir)
    results = None if state.results is None else _result_columns(state.results)
    record["status"] = state.status.value
    if state.status == JobStatus.MALFORMED:
        record["message"] = state.problem
    elif results is not None:
        record.update({k: v for k, v in results.items() if k not in ID_COLUMNS})
    elif state.status == JobStatus.UNFINISHED:
        record["last_checkpoint_step"] = last_checkpoint_step(job_dir)

    if results is None and job_dir.is_dir():
        for key, value in _config_fields(job_dir / CONFIG).items():
            record.setdefault(key, value)
    if record.get(CELL_HASH) is None and (job_dir / CONFIG).is_file():
        record[CELL_HASH] = _seedless_hash(job_dir / CONFIG)
    # Axes from sweep.json describe the grid and take precedence over what the job recorded.
    for key, value in axes.items():
        record[AXIS_COLUMN_ALIASES.get(key, key)] = value
    return record


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _result_columns(raw: dict[str, Any]) -> dict[str, Any]:
    """Flatten a results.json object (checked by mtssl.job_folder.read_results) into columns."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "knn" and isinstance(value, dict):
            for k_name, per_k in value.items():
                if isinstance(per_k, dict):
                    for metric, v in per_k.items():
                        out[f"knn_{k_name}_{metric}"] = v
        elif key == "final_losses" and isinstance(value, dict):
            for task, v in value.items():
                out[f"final_{task}"] = v
        elif key == "monitor" and isinstance(value, dict):
            out.update(_monitor_columns(value))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out


def _monitor_columns(monitor: dict[str, Any]) -> dict[str, Any]:
    """Columns of a results.json ``monitor`` entry (see the module docstring)."""
    out: dict[str, Any] = {}
    for source, prefix in (("interference_mean_cos", "cos_"), ("interference_mean_gradnorm", "gradnorm_"),
                           ("rankme_final", "rankme_"), ("rankme_min", "rankme_min_")):
        entry = monitor.get(source)
        for name, v in (entry.items() if isinstance(entry, dict) else ()):
            out[f"{prefix}{name}"] = v
    cosines = [v for k, v in out.items() if k.startswith("cos_") and _is_number_or_null(v) and v is not None]
    if cosines:
        out["cos_mean"] = sum(cosines) / len(cosines)
    if "unstable" in monitor:
        out["unstable"] = bool(monitor["unstable"])
        out["unstable_reason"] = monitor.get("unstable_reason")
    return out


def _config_fields(path: Path) -> dict[str, Any]:
    """Configuration fields from a job's resolved config.yaml; {} if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    fields = {}
    for name, keys in CONFIG_YAML_PATHS.items():
        value: Any = cfg
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, dict):
            # A config group: its preset name, if it records one.
            value = value.get("preset", value.get("name"))
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            fields[name] = value
    return fields


def _seedless_hash(path: Path) -> str | None:
    """``config_hash_without_seed`` of a job's resolved config.yaml, as the job itself records it; None if unreadable."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mtssl.config import config_hash

    try:
        return config_hash(OmegaConf.load(path), ignore=("train.seed",))
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError, AttributeError):
        return None


def _to_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Build the DataFrame once, with a stable column order and numeric dtypes."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    axis_columns = [c for r in records for c in (r["axes"].split(",") if r.get("axes") else [])]
    knn_columns = sorted(c for c in seen if c.startswith("knn_k"))
    loss_columns = sorted(c for c in seen if c.startswith("final_"))
    monitor_columns = sorted(c for c in seen if c.startswith(MONITOR_PREFIXES))
    ordered = list(dict.fromkeys(
        ID_COLUMNS + CONFIG_FIELDS + axis_columns + METRIC_COLUMNS + knn_columns + loss_columns + monitor_columns
        + [c for c in ("unstable", "unstable_reason") if c in seen] + RUN_FIELDS + ["last_checkpoint_step"] + list(seen)))
    frame = pd.DataFrame.from_records(records, columns=ordered)
    for column in METRIC_COLUMNS + knn_columns + loss_columns + monitor_columns + ["wall_time_s", "images_per_s"]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in INTEGER_COLUMNS:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.notna().sum() == frame[column].notna().sum() and all(
                math.isfinite(v) and float(v).is_integer() for v in numbers.dropna()):
            frame[column] = numbers.astype("Int64")
    return frame
