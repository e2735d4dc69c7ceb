"""Rank 0's scalar log: one ``add_scalar(tag, value, step)`` that every sink receives, so the sinks hold the same
scalars by construction.

Sinks: TensorBoard (always, ``out_dir/tb``) and Weights & Biases (``logging.wandb=true``; the optional extra
``pip install -e '.[wandb]'``). The training loop, the research monitors, the kNN monitor and the end-of-training
evaluation all call ``add_scalar`` on the one ``ScalarLogger`` that ``mtssl.run`` opens (docs/logging.md).

W&B: one run per job. Its id is derived from the job (``wandb_run_id``: the job folder's real path and the
training config's hash), so a requeued or rerun job resumes its run (``resume="allow"``) instead of starting a
second one. Its files are in ``out_dir/wandb`` (``mtssl.job_folder.WANDB``); in offline mode each start of the
job adds one ``offline-run-*`` folder of that run id there, which ``wandb sync`` uploads in order. The W&B step is
the optimiser step, as in TensorBoard.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.config import config_hash
from mtssl.job_folder import TENSORBOARD, JobStatus

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")  # logging.wandb_mode
WANDB_INSTALL = "pip install -e '.[wandb]'"
# The variable in which wandb keeps the address of its service process (wandb.sdk.lib.service).
_WANDB_SERVICE_ENV = "WANDB_SERVICE"


def wandb_missing() -> str | None:
    """Why ``logging.wandb=true`` cannot run here (wandb is not installed), or None. Reads no module."""
    if importlib.util.find_spec("wandb") is None:
        return f"true needs the wandb package, which is not installed; install it with {WANDB_INSTALL} " \
               f"(or pip install wandb), or set logging.wandb=false"
    return None


class ScalarSink(Protocol):
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def log_results(self, results: Mapping[str, Any]) -> None: ...

    def close(self, preempted: bool = False) -> None: ...


class ScalarLogger:
    """What the job logs through, on rank 0: each call goes to every sink."""

    def __init__(self, sinks: Sequence[ScalarSink]):
        self.sinks = list(sinks)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """``tag`` (``train/loss``) at optimiser ``step``; the value is converted to a float once, for every sink."""
        value = float(value)
        for sink in self.sinks:
            sink.add_scalar(tag, value, int(step))

    def log_results(self, results: Mapping[str, Any]) -> None:
        """The job's final results (results.json's fields), written when they are."""
        for sink in self.sinks:
            try:
                sink.log_results(results)
            except Exception as error:  # results.json has them; a sink must not turn the outcome into a failure
                log.warning("the %s log could not take the results: %s", type(sink).__name__, error)

    def close(self, preempted: bool = False) -> None:
        """Write out and close every sink; ``preempted``: the job stopped on a signal and will be resumed."""
        for sink in self.sinks:
            try:
                sink.close(preempted)
            except Exception as error:  # a sink that fails to close must not hide the job's own outcome
                log.warning("closing the %s log failed: %s", type(sink).__name__, error)


class TensorBoardSink:
    """``out_dir/tb``. A resumed job purges the events after its checkpoint's step: those steps are logged again."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the earlier events at steps >= it. Steps up to the checkpoint's (its own logging
        # step included) are never logged again, so they stay.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD), purge_step=purge_step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def log_results(self, results: Mapping[str, Any]) -> None:
        pass  # results.json holds them; the eval/* scalars are in the events already

    def close(self, preempted: bool = False) -> None:
        self.writer.close()


@dataclass(frozen=True)
class WandbSettings:
    """``logging.wandb*`` of the job config."""

    enabled: bool = False
    project: str = "mtssl"
    entity: str | None = None
    group: str | None = None
    mode: str = "online"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "WandbSettings":
        section = OmegaConf.select(cfg, "logging")  # absent from the config.yaml of older jobs: off
        if section is None:
            return cls()
        return cls(bool(section.wandb), str(section.wandb_project), section.wandb_entity, section.wandb_group,
                   str(section.wandb_mode))


def wandb_run_id(cfg: DictConfig, out_dir: Path | str) -> str:
    """The W&B run id of a job: from its folder (real path: one folder reached by two paths is one job) and its
    training config's hash, so every start of the job, on any node, logs to one run."""
    job = f"{os.path.realpath(out_dir)}\0{config_hash(cfg)}"
    return "mtssl-" + hashlib.sha256(job.encode()).hexdigest()[:16]


class _ProcessState:
    """What wandb changes in the process and does not put back: the service's environment variable and its
    ``sys.exit`` and ``sys.excepthook`` hooks. Restored when the job's run is finished."""

    def __init__(self):
        self.service = os.environ.get(_WANDB_SERVICE_ENV)
        self.exit, self.excepthook = sys.exit, sys.excepthook

    def restore(self) -> None:
        if self.service is None:  # the job started the service: stop it (it is joined by nothing else)
            import wandb

            wandb.teardown()
            os.environ.pop(_WANDB_SERVICE_ENV, None)
        else:
            os.environ[_WANDB_SERVICE_ENV] = self.service
        sys.exit, sys.excepthook = self.exit, self.excepthook


class WandbSink:
    """One W&B run per job, resumed by every start of it (rank 0).

    Scalars of one step become one W&B row at that step. A row is written once a later step arrives; since the
    monitors may report a step shortly after a later one (a probe's values wait for the next logging step, after
    an epoch's kNN), the newest row stays open and an earlier step is still accepted while it is newer than the
    last written row. A run resumed online already holds the steps before ``run.step``; those are not sent again.
    """

    def __init__(self, settings: WandbSettings, cfg: DictConfig, out_dir: Path):
        import wandb

        self.state = _ProcessState()
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, group=settings.group, mode=settings.mode,
                name=Path(out_dir).name, id=wandb_run_id(cfg, out_dir), resume="allow", dir=str(out_dir),
                # Console capture off: train.log has the console already, and capture replaces sys.stdout.
                settings=wandb.Settings(console="off", use_dot_wandb=False),
            )
            config = OmegaConf.to_container(cfg, resolve=True)
            config.pop("hydra", None)
            # A resumed job may change fields outside the training config (eval.*, train.max_steps).
            self.run.config.update(config, allow_val_change=True)
            self.written = self.run.step - 1  # the last step the run holds (a run resumed online holds some)
        except BaseException:
            self.state.restore()
            raise
        self.rows: dict[int, dict[str, float]] = {}
        self.results: Mapping[str, Any] | None = None
        self.late_tags: set[str] = set()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if step <= self.written:
            if tag not in self.late_tags:  # once per tag
                self.late_tags.add(tag)
                log.info("W&B: %s at step %d not logged: the run already holds step %d", tag, step, self.written)
            return
        self.rows.setdefault(step, {})[tag] = value
        self._write(below=max(self.rows))

    def _write(self, below: int | None = None) -> None:
        """Write the buffered rows of steps < ``below`` (all of them when None), in step order."""
        for step in sorted(s for s in self.rows if below is None or s < below):
            self.run.log(self.rows.pop(step), step=step, commit=True)
            self.written = step

    def log_results(self, results: Mapping[str, Any]) -> None:
        self.results = results
        self.run.summary.update(json.loads(json.dumps(dict(results))))  # as results.json holds them: "completed"

    def close(self, preempted: bool = False) -> None:
        try:
            self._write()
            if preempted:
                self.run.mark_preempting()
            failed = self.results is None or self.results.get("status") == JobStatus.FAILED
            self.run.finish(exit_code=1 if failed and not preempted else 0)
        finally:
            self.state.restore()


def open_scalar_logger(cfg: DictConfig, out_dir: Path | str, resume_step: int | None) -> ScalarLogger:
    """Rank 0's scalar log of a job: TensorBoard, and W&B when ``logging.wandb`` (``resume_step``: the step of the
    checkpoint the job resumes from, None on a fresh start). A W&B run that cannot start (no network in online
    mode, no login) is reported and left out: the job trains and TensorBoard has every scalar."""
    out_dir = Path(out_dir)
    sinks: list[ScalarSink] = [TensorBoardSink(out_dir, resume_step)]
    settings = WandbSettings.from_config(cfg)
    if settings.enabled and settings.mode != "disabled":
        try:
            sinks.append(WandbSink(settings, cfg, out_dir))
        except Exception as error:
            log.warning("W&B logging is off for this start of the job: wandb.init failed (%s: %s). TensorBoard logs "
                        "every scalar; on a node without network use logging.wandb_mode=offline and wandb sync "
                        "later (docs/logging.md)", type(error).__name__, error)
    return ScalarLogger(sinks)
