"""Submit a sweep's jobs with submitit, configured like hydra-submitit-launcher, and follow their states.

``launcher=local`` and ``launcher=slurm`` (sweeps/conf/launcher/) extend hydra-submitit-launcher's own
config schemas (``LocalQueueConf``, ``SlurmQueueConf``) and instantiate the classes below, which subclass
its launchers. Its ``launch()`` maps the Hydra task function over one job array and then blocks on all
results. A sweep needs more than that, so ``launch()`` is replaced by ``submit()`` / ``follow()``:
  * idempotence: finished jobs are skipped and jobs still queued or running are followed, not resubmitted;
  * progress: each job's id, state and log path are reported whenever they change;
  * requeue: each job runs ``mtssl.submitit_job.MtsslJob``, which checkpoints on SLURM's warning signal
    before submitit requeues it, and a sensible ``max_num_timeout`` replaces the plugin's default of 0;
  * the local executor starts every submitted job at once, so local jobs are submitted ``max_parallel``
    at a time.
States are polled for all jobs at once: one ``sacct`` call per poll, whatever the number of jobs
(``scheduler_states``). Every submission is recorded in ``<sweep_dir>/.submitit/submissions.json`` (job id, log paths), which
``sweeps/status.py`` and later launches read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import submitit
from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf
from submitit.slurm.slurm import SlurmInfoWatcher

from mtssl.utils.errors import ConfigError
from mtssl.utils.progress_bar import Progress
from mtssl.submitit_job import MtsslJob

SUBMISSIONS_FILE = Path(".submitit") / "submissions.json"
# What launcher=slurm runs on the launching machine: submitit submits with sbatch (its job script calls srun)
# and the launcher follows the jobs with sacct.
SLURM_COMMANDS = ("sbatch", "srun", "sacct")

# sacct states after which a SLURM job never runs again. PREEMPTED and NODE_FAIL are not among them: with
# PreemptMode=REQUEUE, and for a node lost under a requeueable job (JobRequeue=1, sbatch --requeue), SLURM
# requeues the job, so they are followed by PENDING; they only count as final once they lasted PREEMPTED_FINAL_S.
SLURM_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL",
                      "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
SLURM_REQUEUED_STATES = {"PREEMPTED", "NODE_FAIL"}
PREEMPTED_FINAL_S = 300
LOCAL_FINAL_STATES = {"FINISHED", "INTERRUPTED", "NO PROCESS AND NO RESULT", "EXITED"}


@dataclass
class Submission:
    """One submission of one sweep job, as recorded in submissions.json."""

    name: str
    job_id: str
    cluster: str  # "slurm" | "local"
    folder: str   # submitit folder of the job
    stdout: str
    stderr: str
    submitted_at: str


def read_submissions(sweep_dir: Path) -> dict[str, list[Submission]]:
    """Every recorded submission per job name, oldest first ({} when none)."""
    try:
        raw = json.loads((Path(sweep_dir) / SUBMISSIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {name: [Submission(**record) for record in records] for name, records in raw.get("jobs", {}).items()}


def record_submissions(sweep_dir: Path, submissions: Sequence[Submission]) -> None:
    """Append submissions to submissions.json (atomically replaced)."""
    path = Path(sweep_dir) / SUBMISSIONS_FILE
    records = {name: [asdict(s) for s in subs] for name, subs in read_submissions(sweep_dir).items()}
    for submission in submissions:
        records.setdefault(submission.name, []).append(asdict(submission))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"jobs": records}, indent=2))
    os.replace(tmp, path)


def scheduler_states(submissions: Sequence[Submission]) -> dict[str, str]:
    """What the scheduler says about each submission now, by job id: a SLURM state, RUNNING/FINISHED, or UNKNOWN.

    All SLURM job ids go to one ``sacct`` call (submitit's info watcher, which batches ids; a fresh one so
    that no state is served from another poll's cache).
    """
    states: dict[str, str] = {}
    slurm = [s.job_id for s in submissions if s.cluster == "slurm"]
    if slurm:
        watcher = SlurmInfoWatcher(delay_s=0)
        for job_id in slurm:
            watcher.register_job(job_id)
        watcher.update()
        states.update({job_id: _first_word(watcher.get_info(job_id, mode="cache").get("State")) for job_id in slurm})
    for s in submissions:
        if s.cluster != "slurm":
            states[s.job_id] = "RUNNING" if _pid_runs_submitit(int(s.job_id)) else "FINISHED"
    return states


def submitted_overrides(submission: Submission) -> list[str] | None:
    """The mtssl overrides a recorded submission runs with, read from submitit's submission pickle (what a
    requeue runs again); None when it cannot be read."""
    job_class = submitit.SlurmJob if submission.cluster == "slurm" else submitit.LocalJob
    try:
        delayed = job_class(folder=submission.folder, job_id=submission.job_id).submission()
        return [str(o) for o in delayed.args[0]]
    except Exception:  # noqa: BLE001 - a missing, partial or foreign pickle: the caller says it could not check
        return None


def is_final(cluster: str, state: str) -> bool:
    return state in (SLURM_FINAL_STATES if cluster == "slurm" else LOCAL_FINAL_STATES)


def _first_word(state: str | None) -> str:
    return (state or "UNKNOWN").split()[0]  # "CANCELLED by 0" -> "CANCELLED"


def _pid_runs_submitit(pid: int) -> bool:
    """Whether pid is alive and is a submitit local job controller (pids get reused)."""
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class TrackedJob:
    """A submitted job, followed until the scheduler reports a final state."""

    def __init__(self, name: str, submission: Submission, job: submitit.Job | None = None):
        self.name, self.submission, self.job = name, submission, job
        self.state = "SUBMITTED"
        self._requeued_since: float | None = None  # when it was last seen PREEMPTED or NODE_FAIL

    @property
    def cluster(self) -> str:
        return self.submission.cluster

    def refresh(self, polled: dict[str, str]) -> str:
        """Take this job's state from one poll of all jobs (``scheduler_states``); return it."""
        if self.job is not None and self.cluster == "local":
            state = self.job.get_info().get("jobState", "UNKNOWN")  # submitted by this process: ask submitit
        else:
            state = polled.get(self.submission.job_id, "UNKNOWN")
        if state == "UNKNOWN":
            return self.state  # not in accounting yet (slurmdbd lags sbatch by ~1 s): keep the last state
        requeued = self.cluster == "slurm" and state in SLURM_REQUEUED_STATES
        self._requeued_since = (self._requeued_since or time.monotonic()) if requeued else None
        self.state = state
        return state

    @property
    def final(self) -> bool:
        if self._requeued_since is not None:
            return time.monotonic() - self._requeued_since > PREEMPTED_FINAL_S  # and not requeued after all
        return is_final(self.cluster, self.state)


Report = Callable[[str], None]


class SweepLauncher:
    """The sweep-facing part shared by the local and SLURM launchers (mixed into the plugin's classes)."""

    _EXECUTOR: str
    params: dict

    @property
    def kind(self) -> str:
        """The submitit executor: "local" or "slurm"."""
        return self._EXECUTOR

    def make_executor(self, tasks_per_node: int, gpus_per_node: int) -> submitit.AutoExecutor:
        """An executor set up from the launcher config exactly as hydra-submitit-launcher's launch() does."""
        params = dict(self.params, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node)
        folder = params.pop("submitit_folder")
        max_num_timeout = params.pop("max_num_timeout", None)  # an executor argument, not a job parameter
        init = {} if max_num_timeout is None else {f"{self._EXECUTOR}_max_num_timeout": max_num_timeout}
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items() if v is not None})
        return executor

    @property
    def max_parallel(self) -> int | None:
        """How many jobs may be submitted at once (None: all)."""
        return None

    def check(self, dry_run: bool = False) -> None:
        """Raise ConfigError when this launcher cannot run the sweep here (``dry_run``: only plan it): checked
        before anything is planned, written or submitted."""
        if self._EXECUTOR == "slurm" and not dry_run:
            missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
            if missing:
                raise ConfigError(
                    f"launcher=slurm: this machine has no SLURM ({', '.join(missing)} not found on PATH), so no job "
                    f"can be submitted from here. Launch from a SLURM login node, run the jobs on this machine with "
                    f"launcher=local, or add --dry-run to plan the sweep (its jobs, GPU-hours and folders) here")

    def submit(self, executor: submitit.AutoExecutor, jobs: Sequence[tuple[str, list[str]]]) -> list[TrackedJob]:
        """Submit (name, overrides) pairs, each job running MtsslJob()(overrides); the caller records them."""
        if not jobs:
            return []
        if self._EXECUTOR == "slurm":
            with executor.batch():  # one job array, as hydra-submitit-launcher submits
                submitted = [executor.submit(MtsslJob(), overrides) for _, overrides in jobs]
        else:
            submitted = [executor.submit(MtsslJob(), overrides) for _, overrides in jobs]
        now = datetime.now().isoformat(timespec="seconds")
        return [
            TrackedJob(name, Submission(name, str(job.job_id), self._EXECUTOR, str(job.paths.folder),
                                        str(job.paths.stdout), str(job.paths.stderr), now), job)
            for (name, _), job in zip(jobs, submitted)
        ]

    def follow(self, sweep_dir: Path, executor: submitit.AutoExecutor | None,
               to_submit: Sequence[tuple[str, list[str]]], attached: Sequence[TrackedJob], poll_s: float,
               report: Report) -> list[TrackedJob]:
        """Submit jobs (max_parallel at a time), report state changes, return once every job is final."""
        waiting = list(to_submit)
        active = list(attached)
        done: list[TrackedJob] = []
        last_seen: dict[str, tuple[str, str]] = {}
        progress = Progress("jobs finished", total=len(waiting) + len(active), unit="job")
        while waiting or active:
            room = len(waiting) if self.max_parallel is None else max(0, self.max_parallel - len(active))
            if room and waiting:
                batch, waiting = waiting[:room], waiting[room:]
                new = self.submit(executor, batch)
                record_submissions(sweep_dir, [t.submission for t in new])
                active += new
            polled = scheduler_states([job.submission for job in active
                                       if job.job is None or job.cluster == "slurm"])  # one sacct per poll
            for job in list(active):
                job.refresh(polled)
                seen = (job.submission.job_id, job.state)
                if last_seen.get(job.name) != seen:
                    last_seen[job.name] = seen
                    with progress.external_write():
                        report(f"{job.name}: job {job.submission.job_id} {job.state}  log {job.submission.stdout}")
                if job.final:
                    active.remove(job)
                    done.append(job)
                    progress.update()
            if waiting or active:
                time.sleep(poll_s)
        progress.close()
        return done


class LocalSweepLauncher(SweepLauncher, LocalLauncher):
    """Runs jobs on this machine through submitit's local executor, ``max_parallel`` at a time."""

    def __init__(self, max_parallel: int = 1, **params) -> None:
        super().__init__(**params)
        self._max_parallel = max_parallel

    @property
    def max_parallel(self) -> int | None:
        return self._max_parallel

    def check(self, dry_run: bool = False) -> None:
        if isinstance(self._max_parallel, bool) or not isinstance(self._max_parallel, int) or self._max_parallel < 1:
            raise ConfigError(f"launcher.max_parallel: {self._max_parallel!r} jobs at once would never start one; "
                              f"set launcher.max_parallel=1 (the default) or more")
        super().check(dry_run)

    def make_executor(self, tasks_per_node: int, gpus_per_node: int) -> submitit.AutoExecutor:
        # Ranks of concurrent jobs share the cores: one OpenMP pool per rank, not one per core per rank.
        ranks = max(1, tasks_per_node * self._max_parallel)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        return super().make_executor(tasks_per_node, gpus_per_node)


class SlurmSweepLauncher(SweepLauncher, SlurmLauncher):
    """Submits the jobs as one SLURM job array (``array_parallelism`` of them running at once)."""


@dataclass
class LocalSweepQueueConf(LocalQueueConf):
    _target_: str = "sweeps.launchers.LocalSweepLauncher"
    max_parallel: int = 1  # jobs running at once on this machine


@dataclass
class SlurmSweepQueueConf(SlurmQueueConf):
    _target_: str = "sweeps.launchers.SlurmSweepLauncher"
    srun_args: Optional[List[str]] = None  # extra srun options of each job's step, e.g. [--cpu-bind=none]


def register_configs(cluster_profiles: Path) -> None:
    """Register the launcher schemas and the cluster profiles (``cluster=<name>``) with Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(group="schema/launcher", name="local", node=LocalSweepQueueConf)
    store.store(group="schema/launcher", name="slurm", node=SlurmSweepQueueConf)
    for path in sorted(Path(cluster_profiles).glob("*.yaml")):
        store.store(group="cluster", name=path.stem, node=OmegaConf.load(path))
