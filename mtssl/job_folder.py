"""The job folder: what one job (``python -m mtssl.run``) writes in its ``out_dir``, and how its state is read.

This module is the one owner of the folder: the file names, the status vocabulary (``JobStatus``), the
``results.json`` schema (``Results``) with its one writer and one reader, ``progress.json`` (``Progress``) and
``job_state``. ``mtssl.run``, the evaluation, ``python -m mtssl.eval``, ``sweeps/`` and ``analysis/`` all use it;
docs/job_folder.md describes every file. It imports neither torch nor anything above ``mtssl.utils``, so a
sweep's status and its tables read thousands of job folders quickly.

    out_dir/
      config.yaml                the effective config (resolved), written when the job starts
      train.log                  rank 0's log, appended by every start of the job
      progress.json              starts, the process running the job now, and step / total steps / loss / images
                                 per s at the latest logging step
      tb/                        TensorBoard events (train/*, monitor/*, eval/*)
      wandb/                     Weights & Biases files of the job's run (logging.wandb=true), offline-run-* per start
      checkpoints/step_XXXXXXXX/ DCP checkpoints (mtssl.distributed.checkpoint), the newest train.keep_checkpoints
      knn_during_training.json   the kNN evaluations during training (monitor.knn_every_epochs)
      eval_state.json            the finished evaluation phases (a stopped evaluation resumes from them)
      eval_augmented.pt          the augmented probe's head and optimiser after its last finished epoch
      backbone.pth               the trained online (and target) backbones, written before the evaluation
      results.json               the job's results (``Results``), written when it ends
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypedDict

from mtssl.utils.atomic_write import write_json_atomic

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- file names
CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
PROGRESS = "progress.json"
TENSORBOARD = "tb"
WANDB = "wandb"  # wandb's own folder name under the root dir it is given (wandb.init(dir=out_dir))
CHECKPOINTS = "checkpoints"
KNN_DURING_TRAINING = "knn_during_training.json"
EVAL_STATE = "eval_state.json"
AUGMENTED_STATE = "eval_augmented.pt"
BACKBONE_EXPORT = "backbone.pth"
RESULTS = "results.json"

# Inside checkpoints/: one folder per checkpoint, CHECKPOINT_PREFIX + the step in 8 digits.
CHECKPOINT_PREFIX = "step_"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
TRAINER_STATE = "trainer_state.json"
# BatchNorm statistics are per rank (each rank normalises its own batch) while DCP stores one copy
# of unsharded tensors; each rank therefore also saves its own buffers.
RANK_BUFFERS = "buffers_rank{rank}.pt"
# Each rank's generator states (CPU, and its own GPU's when it has one).
RANK_RNG = "rng_rank{rank}.pt"

# A sweep folder (sweeps/launch.py) holds the grid in SWEEP_SPEC and one job folder per job.
SWEEP_SPEC = "sweep.json"
# SWEEP_SPEC's mark ("reference") of a job that evaluates an ablation's reference weights (sweeps/references.py),
# whose folder is REFERENCE_JOB_PREFIX + its name; the tables show it as a reference row.
WEIGHTS_REFERENCE = "reference_weights"
REFERENCE_JOB_PREFIX = "reference="
# SWEEP_SPEC's record of the axes whose values the budget replaced: {axis: {"ablation": [...], "budget": [...]}}.
REPLACED_AXES = "replaced_axes"

# What a job has written once it started; a folder without any of them is still pending.
STARTED_MARKERS = (CONFIG, TRAIN_LOG, PROGRESS, TENSORBOARD, CHECKPOINTS)


# --------------------------------------------------------------------------------------------------- status
class JobStatus(str, Enum):
    """The state of a job, read from its folder (and, for the last two, from the scheduler)."""

    COMPLETED = "completed"  # results.json: trained to the end (train.epochs or train.max_steps) and evaluated
    DIVERGED = "diverged"  # results.json: stopped on a non-finite loss; not evaluated
    FAILED = "failed"  # results.json: an error ended the job (its ``error`` field); a rerun starts it again
    # results.json: weights no mtssl job trained, evaluated only (python -m mtssl.eval --weights, a sweep's
    # reference weights); the tables show them as reference rows
    EVALUATED = "evaluated"
    MALFORMED = "malformed"  # results.json is there but unusable (``JobState.problem`` says why)
    UNFINISHED = "unfinished"  # started (STARTED_MARKERS), no results.json: running, stopped on a signal, or killed
    PENDING = "pending"  # nothing written yet
    # An unfinished or pending job whose latest submission the scheduler reports (sweeps/status.py), or whose
    # progress.json names a live process on this host as its owner (``live_status``).
    RUNNING = "running"
    QUEUED = "queued"

    def __str__(self) -> str:  # the word itself in messages, f-strings and tables
        return self.value


RESULT_STATUSES = (JobStatus.COMPLETED, JobStatus.DIVERGED, JobStatus.FAILED, JobStatus.EVALUATED)  # results.json's
FOLDER_STATUSES = RESULT_STATUSES + (JobStatus.MALFORMED, JobStatus.UNFINISHED, JobStatus.PENDING)  # job_state's
# results that a rerun or a relaunch never touches
FINAL_STATUSES = (JobStatus.COMPLETED, JobStatus.DIVERGED, JobStatus.EVALUATED)
EVALUATED_STATUSES = (JobStatus.COMPLETED, JobStatus.EVALUATED)  # results.json holds the evaluation fields

# The headline kNN (``knn_top1``, what docs and tables call "kNN"): k=20 whatever else ``eval.knn_k`` asks (those
# are under ``knn``); a bank of fewer images (a tiny test run) takes all of them. ``knn_headline_k`` records it.
KNN_HEADLINE_K = 20


# ------------------------------------------------------------------------------------------- results.json
class Results(TypedDict, total=False):
    """results.json. Percentages are 0..100; times in seconds. docs/job_folder.md gives every field's meaning."""

    status: str  # one of RESULT_STATUSES
    error: str  # failed or diverged: what ended the job
    # What was trained
    method: str
    views: str
    predictor: str
    backbone: str
    data: str
    seed: int
    epochs: int
    max_steps: int | None
    world_size: int
    git_revision: str
    config_hash: str
    config_hash_without_seed: str
    # Training
    steps: int
    final_losses: dict[str, float]
    train_time_s: float
    images_per_s: float
    skipped_images: int
    skipped_files: list[str]
    monitor: dict[str, Any]
    knn_during_training: dict[str, Any]
    # Evaluation (completed jobs)
    weights_sha256: str
    knn: dict[str, dict[str, float]]
    knn_headline_k: int  # the k of knn_top1 (KNN_HEADLINE_K)
    knn_top1: float
    knn_top5: float
    knn_target: dict[str, dict[str, float]]
    knn_top1_target: float
    knn_top5_target: float
    linear: dict[str, dict[str, Any]]
    linear_top1: float
    linear_top5: float
    linear_lr: float
    eval_skipped_files: list[str]
    eval_time_s: float
    wall_time_s: float
    eval_config: dict[str, Any]  # written by a re-evaluation (python -m mtssl.eval)
    # Evaluated only (status evaluated): where the weights came from
    weights_source: str  # the file, or timm:<name>
    weights_file_sha256: str  # SHA-256 of the file's bytes (weights_sha256: of the backbone state dict)
    weights_format: str  # the detected format (mtssl.eval.weights.FORMATS)
    weights_branch: str  # eval.weights_branch: online, or the EMA target of an export or a checkpoint
    weights_dropped_keys: list[str]  # groups of keys left out: a classifier head (fc.*), a projector


# Fields a reader computes with: a number or null, or the results are malformed.
NUMBER_FIELDS = ("knn_top1", "knn_top5", "knn_top1_target", "knn_top5_target", "linear_top1", "linear_top5",
                 "wall_time_s", "images_per_s")
# Nested {name: number} entries: final_losses, the research monitors', kNN per k ({k: {metric: number}}).
NUMBER_MAPS = ("final_losses",)
MONITOR_NUMBER_MAPS = ("interference_mean_cos", "interference_mean_gradnorm", "rankme_final", "rankme_min")


class MalformedResults(ValueError):
    """A results.json that is there but cannot be used; the message says why."""


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def results_problem(raw: Any) -> str | None:
    """Why a parsed results.json cannot be used (None when it can)."""
    if not isinstance(raw, dict):
        return f"{RESULTS} holds a JSON {type(raw).__name__}, expected an object with a 'status' field"
    status = raw.get("status")
    if status is None:
        return f"{RESULTS} has no 'status' field (partial file?)"
    if status not in RESULT_STATUSES:
        return f"{RESULTS} status {status!r} is not one of {', '.join(map(str, RESULT_STATUSES))}"
    if status in EVALUATED_STATUSES and "knn_top1" not in raw:
        return f"{RESULTS} of a{'n' if status == JobStatus.EVALUATED else ''} {status} job has no 'knn_top1' field " \
               f"(partial file?)"
    numbers = [(key, raw[key]) for key in NUMBER_FIELDS if key in raw]
    maps = [(key, raw.get(key)) for key in NUMBER_MAPS]
    monitor = raw.get("monitor")
    maps += [(f"monitor.{key}", monitor.get(key)) for key in MONITOR_NUMBER_MAPS] if isinstance(monitor, dict) else []
    knn = raw.get("knn")
    maps += [(f"knn.{k}", per_k) for k, per_k in knn.items()] if isinstance(knn, dict) else []
    for name, entry in maps:
        if isinstance(entry, dict):
            numbers += [(f"{name}.{key}", value) for key, value in entry.items()]
    for name, value in numbers:
        if not _is_number_or_null(value):
            return f"{RESULTS} field {name!r} is {value!r}, expected a number or null"
    return None


def read_results(out_dir: Path | str) -> Results | None:
    """The job's results.json; None when it has none. Raises MalformedResults when it is there but unusable
    (not JSON, not an object, an unknown status, a partial file, a metric that is not a number)."""
    path = Path(out_dir) / RESULTS
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedResults(f"{RESULTS} is not valid JSON ({error}); the job was probably interrupted while "
                               f"writing it") from error
    except OSError as error:
        raise MalformedResults(f"{RESULTS} cannot be read ({error})") from error
    problem = results_problem(raw)
    if problem is not None:
        raise MalformedResults(problem)
    return raw


def write_results(out_dir: Path | str, results: Results) -> None:
    """Write results.json atomically (rank 0): a reader sees the previous file or the new one, never a part."""
    write_json_atomic(Path(out_dir) / RESULTS, dict(results))


# ------------------------------------------------------------------------------------------- progress.json
class Owner(TypedDict):
    """The process running a job (its rank 0), as progress.json records it at the start."""

    host: str  # socket.gethostname()
    pid: int
    pid_start: int | None  # the process's start time (clock ticks after boot, /proc/<pid>/stat): a reused pid differs


class Progress(TypedDict, total=False):
    """progress.json, rewritten (atomically, by rank 0) at every start and every logging step."""

    starts: int  # how many times the job started; requeues and restarts = starts - 1
    step: int  # optimiser steps done (at the latest logging step, or where this start resumed)
    total_steps: int  # the step this run trains to (train.epochs, or train.max_steps when smaller)
    epoch: int  # epochs done
    loss: float  # total loss at the latest logging step (mean over ranks)
    images_per_s: float  # training throughput since the logging step before it
    owner: Owner | None  # the process running the job now (rank 0), null once it ended
    updated: float  # unix time of this update


def read_progress(out_dir: Path | str) -> Progress | None:
    """progress.json of a job; None when it has none (or an unreadable one: it is only a progress report)."""
    try:
        with open(Path(out_dir) / PROGRESS, encoding="utf-8") as f:
            progress = json.load(f)
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def update_progress(out_dir: Path | str, **fields: Any) -> None:
    """Merge ``fields`` (of ``Progress``) into progress.json (rank 0). A failed write is logged and ignored:
    the file only reports progress, and a training run must not end for it."""
    progress = read_progress(out_dir) or {}
    progress.update(fields, updated=time.time())
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # a Trainer may run before its first checkpoint made it
        write_json_atomic(Path(out_dir) / PROGRESS, progress)
    except OSError as error:
        log.warning("could not update %s: %s", Path(out_dir) / PROGRESS, error)


def record_start(out_dir: Path | str) -> None:
    """Count one more start of the job in progress.json and name this process its owner (rank 0, once the job
    is accepted: a refused run writes nothing)."""
    update_progress(out_dir, starts=int((read_progress(out_dir) or {}).get("starts", 0)) + 1, owner=this_process())


def record_end(out_dir: Path | str) -> None:
    """Clear the owner in progress.json (rank 0, whenever a started job ends; a killed one leaves a dead pid)."""
    if (read_progress(out_dir) or {}).get("owner") is not None:
        update_progress(out_dir, owner=None)


# --------------------------------------------------------------------------------------------------- owner
def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, field 22 of /proc/<pid>/stat); None without /proc or
    without that process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # after "pid (comm)": state is field 3, starttime 22
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> Owner:
    """This process as a job's owner."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid())}


def _alive(owner: Owner) -> bool:
    """Whether the owner process still runs (on this host: another host's processes cannot be seen from here)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    recorded_start = owner.get("pid_start")
    if recorded_start is not None and Path("/proc").is_dir():
        return process_start(pid) == recorded_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def live_owner(out_dir: Path | str) -> Owner | None:
    """The process that runs the job in ``out_dir`` now: the owner progress.json names when it is alive on this
    host and is not this process; None otherwise (ended, killed, or on another host, where only the scheduler
    can tell)."""
    owner = (read_progress(out_dir) or {}).get("owner")
    if not isinstance(owner, dict) or (owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid()):
        return None
    return owner if _alive(owner) else None


def describe_owner(owner: Owner) -> str:
    """``pid 1234 on host node1``."""
    return f"pid {owner.get('pid')} on host {owner.get('host')}"


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` optimiser steps: step_00001234."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: Path | str) -> int | None:
    """The step of a checkpoint folder (its name), None for any other name (e.g. an unfinished .tmp_step_*)."""
    name = Path(path).name
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    """Whether a checkpoint folder holds all it needs to resume (it is renamed into place only then)."""
    return all((path / name).is_file() for name in (DCP_METADATA, TRAINER_STATE, RANK_BUFFERS.format(rank=0)))


def last_checkpoint_step(out_dir: Path | str) -> int | None:
    """Step of the newest complete checkpoint in ``out_dir/checkpoints``, None when there is none."""
    steps = []
    try:
        with os.scandir(Path(out_dir) / CHECKPOINTS) as entries:
            for entry in entries:
                step = checkpoint_step(entry.name)
                if step is not None and is_complete_checkpoint(Path(entry.path)):
                    steps.append(step)
    except OSError:
        return None
    return max(steps, default=None)


# ----------------------------------------------------------------------------------------------- job state
@dataclass(frozen=True)
class JobState:
    """What a job folder says about its job: the status, its results and why they are unusable, if so."""

    status: JobStatus  # never RUNNING or QUEUED: only a scheduler knows those
    results: Results | None = None  # results.json, for COMPLETED, DIVERGED and FAILED
    problem: str | None = None  # MALFORMED: what is wrong with results.json


def live_status(out_dir: Path | str) -> JobStatus:
    """``job_state``'s status, or RUNNING while the job's owner process is alive on this host (a rerun of a failed
    job, or one trained on past its train.max_steps, runs beside its old results.json)."""
    return JobStatus.RUNNING if live_owner(out_dir) is not None else job_state(out_dir).status


def job_state(out_dir: Path | str) -> JobState:
    """The state of the job in ``out_dir``: its results.json's status, else unfinished (started) or pending."""
    out_dir = Path(out_dir)
    try:
        results = read_results(out_dir)
    except MalformedResults as error:
        return JobState(JobStatus.MALFORMED, problem=str(error))
    if results is not None:
        return JobState(JobStatus(results["status"]), results)
    if any((out_dir / marker).exists() for marker in STARTED_MARKERS):
        return JobState(JobStatus.UNFINISHED)
    return JobState(JobStatus.PENDING)
