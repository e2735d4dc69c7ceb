#!/usr/bin/env python
"""Launch one ablation sweep of mtssl jobs, on this machine or on a SLURM cluster.

    python sweeps/launch.py ablation=predictor_sharing                      # this machine, budget=cpu_quick
    python sweeps/launch.py ablation=predictor_sharing data.subset=500 train.epochs=1  # job keys go to every job
    python sweeps/launch.py ablation=predictor_sharing launcher=slurm       # SLURM, cluster=local profile
    python sweeps/launch.py ablation=backbone budget=imagenet_200ep launcher=slurm cluster=example_gpu \
        data.root=/data/imagenet --dry-run
    mtssl-sweep ablation=predictor_sharing                                  # the same, as the installed command

A Hydra app (config: sweeps/conf/) composing an ablation (the grid), a budget (the jobs' regime, seeds and
resources: sweeps/conf/budget/), a launcher and a cluster profile (slurm/profiles/). Every job's config is
composed and validated before anything is submitted: one bad override fails the whole launch, nothing submitted. An override whose key belongs to the
job config (mtssl/conf: ``train.epochs=1``, ``method=simsiam``) is forwarded to every job, as if listed in
``job_overrides`` (sweeps/overrides.py); a key of neither config is refused with the nearest valid key. ``--dry-run`` prints the job grid,
the GPU-hours estimate and the output directories, and stops there.

Each job writes to ``<sweep_dir>/<job name>/``; ``<sweep_dir>/sweep.json`` lists the grid. Launching again
skips jobs with final results, follows jobs still queued, skips a job whose folder names a live owner
process on this machine (started by hand or by another launch: never a second copy), and resubmits the
others (they resume from their checkpoints). A relaunch whose jobs' training configs differ from those that jobs in ``sweep_dir``
finished, checkpointed or are queued with is refused before anything is submitted or written (exit 2),
naming the jobs and the fields: use a new ``sweep_dir``. The launcher reports each job's id, state and log
as they change and, once every job has ended, writes the result tables (analysis/make_tables.py). Exit status: 0 when every job completed
(or diverged), 1 when some failed or did not finish, 2 on a bad config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import FailedSubmissionError, UncompletedJobError

from mtssl.config import (ConfigError, compose_config, config_changes, config_hash, describe_recipe,
                          format_changes, resolve_config)
from mtssl.config.quoting import check_override_syntax
from mtssl.config.validate import validate_config
from mtssl.job_folder import FINAL_STATUSES, REPLACED_AXES, SWEEP_SPEC, JobStatus, describe_owner, live_owner, live_status
from mtssl.run import OutDirConflict, out_dir_conflict
from sweeps.grid import (RANDOM_INIT, SweepJob, expand_grid, override_key, quote_value, random_init_job,
                         sweep_axes)
from sweeps.launchers import (Submission, SweepLauncher, TrackedJob, is_final, read_submissions,
                              record_submissions, register_configs, scheduler_states, submitted_overrides)
from sweeps.overrides import split_overrides
from sweeps.references import plan_references

REPO = Path(__file__).resolve().parent.parent

DRY_RUN_FLAG = "--dry-run"
WANDB_GROUP = "logging.wandb_group"
CLUSTER_PROFILES = REPO / "slurm" / "profiles"
register_configs(CLUSTER_PROFILES)


@dataclass
class PlannedJob:
    """A grid job with its output directory, its current state and its validated config."""

    job: SweepJob
    out_dir: Path
    state: JobStatus  # of its job folder, when planned (RUNNING while the folder's owner process is alive)
    backbone: str
    config: DictConfig | None = None  # resolved
    conflict: OutDirConflict | None = None  # out_dir holds results or a checkpoint of another training config
    recipe: str = ""  # the resolved recipe items, shown by --dry-run
    size: float = 1.0  # its training work (epochs x images) over the budget's, which hours_per_job is for

    @property
    def overrides(self) -> list[str]:
        # The sweep folder names the W&B group of its jobs (logging.wandb=true), unless the sweep sets one.
        group = [] if any(override_key(o) == WANDB_GROUP for o in self.job.overrides) else \
            [f"{WANDB_GROUP}={quote_value(self.out_dir.parent.name)}"]
        return [*self.job.overrides, *group, f"out_dir={quote_value(str(self.out_dir))}"]


@dataclass
class Resources:
    """Ranks of one job and how they are laid out (one task per rank; one GPU per task on GPU budgets)."""

    ranks: int
    gpus: bool
    nodes: int

    @property
    def tasks_per_node(self) -> int:
        return self.ranks // self.nodes

    @property
    def gpus_per_node(self) -> int:
        return self.tasks_per_node if self.gpus else 0


def report(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def compose_job(overrides: list[str]) -> DictConfig:
    """Compose a job config with mtssl's compose API, lending it Hydra's global state (held by this app)."""
    global_hydra = GlobalHydra.instance()
    app_hydra = global_hydra.hydra
    global_hydra.clear()
    try:
        return compose_config(overrides)
    finally:
        GlobalHydra.instance().clear()
        if app_hydra is not None:
            GlobalHydra.instance().initialize(app_hydra)


def job_resources(cfg: DictConfig, executor_kind: str) -> Resources:
    res = cfg.budget.resources
    ranks, gpus = int(res.ranks_per_job), bool(res.gpus)
    nodes = int(cfg.cluster.nodes) if executor_kind == "slurm" else 1
    if ranks < 1:
        raise ConfigError(f"budget.resources.ranks_per_job: must be >= 1, got {ranks}")
    if nodes < 1 or ranks % nodes:
        raise ConfigError(f"cluster.nodes: {ranks} ranks per job (budget.resources.ranks_per_job) do not split "
                          f"evenly over {nodes} nodes; set cluster.nodes to a divisor of {ranks}, or "
                          f"budget.resources.ranks_per_job to a multiple of {max(nodes, 1)}")
    return Resources(ranks, gpus, nodes)


def plan_sweep(cfg: DictConfig, sweep_dir: Path, resources: Resources) -> list[PlannedJob]:
    """Expand the grid and compose, resolve and validate every job; raise ConfigError on the first bad one."""
    ablation, budget = cfg.ablation, cfg.budget
    if not budget.get("regime"):
        raise ConfigError(f"budget.regime: budget {budget.name} names no job regime; set budget.regime=<name> "
                          f"(mtssl/conf/regime/<name>.yaml)")
    axes, _ = budget_axes(cfg)
    grid = dict(axes=axes,
                seeds=list(budget.get("seeds") or ablation.seeds),  # a budget may fix its own seeds
                fixed=list(ablation.get("fixed") or []), regime=str(budget.regime))
    jobs = expand_grid(**grid, job_overrides=list(cfg.job_overrides or []))
    planned = [plan_job(job, sweep_dir, resources) for job in jobs]
    if budget.get("random_init_reference"):
        planned = random_init_references(planned, sweep_dir, resources) + planned
    if cfg.job_overrides:  # job keys (train.epochs=1 data.subset=500) change the work that hours_per_job is for
        budget_jobs = {job.name: job for job in expand_grid(**grid)}
        for p in planned:
            p.size = job_size(p, budget_job(p.job, budget_jobs))
    # The ablation's reference weights (evaluated only), last: sweep.json's axes are read from the first job.
    return planned + plan_references(ablation, jobs, lambda job: plan_job(job, sweep_dir, resources))


def budget_axes(cfg: DictConfig) -> tuple[dict[str, list], dict[str, list]]:
    """The sweep's axes: the ablation's, with the budget's ``axes`` replacing those it names (sweeps/grid.py)."""
    return sweep_axes(OmegaConf.to_container(cfg.ablation.axes, resolve=True),
                      OmegaConf.to_container(cfg.budget.axes, resolve=True) if cfg.budget.get("axes") else None)


def budget_job(job: SweepJob, budget_jobs: dict[str, SweepJob]) -> SweepJob:
    """The job as the budget alone composes it (without job_overrides): what budget.resources.hours_per_job is for."""
    if job.reference == RANDOM_INIT:  # "random_init" (the first grid job's) or "random_init,<grid job>"
        name = job.name.split(",", 1)[1] if "," in job.name else next(iter(budget_jobs))
        return random_init_job(budget_jobs[name], False)
    return budget_jobs[job.name]


def training_work(cfg: DictConfig, images_in_folder: int) -> tuple[int, int]:
    """(epochs, training images) of a job config over a training folder of ``images_in_folder`` images."""
    subset = cfg.data.subset
    return int(cfg.train.epochs), images_in_folder if subset is None else min(int(subset), images_in_folder)


def job_size(planned: PlannedJob, budget: SweepJob) -> float:
    """The planned job's training work (epochs x training images) over the budget's own job's, both over the
    planned job's data folder: the factor its hours_per_job estimate is scaled by. An evaluation-only job
    (train.epochs=0, as the random-init reference) scales with the images only."""
    from mtssl.data.image_folder import list_image_folder

    folder = len(list_image_folder(planned.config.data.root, planned.config.data.train_split)[0])
    epochs, images = training_work(planned.config, folder)
    try:  # composed only (its data.root may be one of the job keys): epochs and subset are plain values
        budget_epochs, budget_images = training_work(compose_job(list(budget.overrides)), folder)
    except ConfigError:
        return 1.0
    epoch_ratio = epochs / budget_epochs if budget_epochs else 1.0
    return epoch_ratio * images / budget_images


def plan_job(job: SweepJob, sweep_dir: Path, resources: Resources) -> PlannedJob:
    """Compose, resolve and validate one job; raise ConfigError naming the job."""
    out_dir = sweep_dir / job.name
    candidate = PlannedJob(job, out_dir, live_status(out_dir), backbone="")
    try:
        job_cfg = resolve_config(compose_job(candidate.overrides))
        validate_config(job_cfg, check_data=True, world_size=resources.ranks)
    except ConfigError as error:
        message = str(error)
        if message.startswith("bad override in ["):  # drop the echo of every override of the job
            message = "bad override: " + message.split("]: ", 1)[-1]
        raise ConfigError(f"job {job.name!r}: {message}") from error
    candidate.backbone = str(job_cfg.backbone.name)
    candidate.config, candidate.conflict = job_cfg, out_dir_conflict(job_cfg, out_dir)
    candidate.recipe = describe_recipe(job_cfg)
    return candidate


def random_init_key(cfg: DictConfig) -> str:
    """What the evaluation of an untrained network depends on. The backbone is built first from
    ``train.seed``, so the method, views and heads do not change its weights."""
    fields = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "data", "eval")}
    return json.dumps({**fields, "seed": cfg.train.seed}, sort_keys=True, default=str)


def random_init_references(planned: list[PlannedJob], sweep_dir: Path, resources: Resources) -> list[PlannedJob]:
    """One ``train.epochs=0`` job per distinct (backbone, data, eval settings, seed) of the grid (budget option
    ``random_init_reference``): the reference row of the tables, what any pretraining must beat."""
    firsts: dict[str, PlannedJob] = {}
    keys = [random_init_key(p.config) for p in planned]
    for key, p in zip(keys, planned):
        firsts.setdefault(key, p)
    distinct = len(firsts) > 1
    references = {key: plan_job(random_init_job(p.job, distinct), sweep_dir, resources) for key, p in firsts.items()}
    for key, p in zip(keys, planned):
        p.job = dataclasses.replace(p.job, reference_job=references[key].job.name)
    return list(references.values())


def hours_per_job(cfg: DictConfig, backbone: str) -> float:
    table = cfg.budget.resources.hours_per_job
    return float(table.get(backbone, table.get("default", 0.0)))


def view_pixels(job_cfg: DictConfig) -> float:
    """Pixels of one sample's views over those of the default views (global_local_cutout at the data preset's
    sizes, which ``hours_per_job`` is stated for): the training compute a job's views cost, roughly."""
    from mtssl.data.views import VIEW_TYPES, build_view_layout

    default = build_view_layout({name: None for name in VIEW_TYPES}, job_cfg.data.get("view_sizes"))
    default_pixels = sum(t.count * t.size ** 2 for t in default.types)
    return sum(int(v.count) * int(v.size) ** 2 for v in job_cfg.views.types.values()) / default_pixels


def evaluation_only(job_cfg: DictConfig) -> bool:
    return int(job_cfg.train.epochs) == 0 or job_cfg.eval.get("weights") is not None


def job_hours(cfg: DictConfig, planned: PlannedJob) -> float:
    """The estimated wall-clock hours of one planned job (the rule is printed with the estimate: ESTIMATE_RULE)."""
    resources = cfg.budget.resources
    if evaluation_only(planned.config) and resources.get("eval_only_hours") is not None:
        return float(resources.eval_only_hours) * planned.size
    return hours_per_job(cfg, planned.backbone) * planned.size * view_pixels(planned.config)


ESTIMATE_RULE = ("budget.resources.hours_per_job of the job's backbone, for the default views, times the job's view "
                 "pixels over theirs{work}; an evaluation-only job: budget.resources.eval_only_hours")


def print_plan(cfg: DictConfig, sweep_dir: Path, planned: list[PlannedJob], resources: Resources, kind: str) -> None:
    action = {JobStatus.COMPLETED: "skip (done)", JobStatus.DIVERGED: "skip (done)", JobStatus.FAILED: "rerun",
              JobStatus.UNFINISHED: "resume", JobStatus.MALFORMED: "resume", JobStatus.PENDING: "submit",
              JobStatus.EVALUATED: "skip (done)",
              JobStatus.RUNNING: str(JobStatus.RUNNING)}  # followed if this sweep submitted it, else skipped
    print(f"Sweep {cfg.ablation.name} (budget {cfg.budget.name}: regime {cfg.budget.regime}, launcher {kind}): "
          f"{len(planned)} jobs, "
          f"{resources.ranks} rank(s) each ({resources.nodes} node(s) x {resources.tasks_per_node} task(s)"
          f"{', 1 GPU per task' if resources.gpus else ', CPU'})")
    print(f"Sweep directory: {sweep_dir}")
    if cfg.job_overrides:
        print(f"Job overrides (every job): {' '.join(map(str, cfg.job_overrides))}")
    width = max(len(p.job.name) for p in planned)
    for p in planned:
        print(f"  {p.job.name.ljust(width)}  {action[p.state]:<12} {p.out_dir}")
        if cfg.dry_run:
            print(f"    {p.recipe}")
    to_run = [p for p in planned if p.state not in (*FINAL_STATUSES, JobStatus.RUNNING)]
    hours = sum(job_hours(cfg, p) for p in to_run)
    all_hours = sum(job_hours(cfg, p) for p in planned)
    source = ESTIMATE_RULE.format(work=", and its epochs x training images over the budget's"
                                  if any(p.size != 1.0 for p in planned) else "")
    if resources.gpus:
        print(f"Estimate: {resources.ranks} GPUs x {_hours(all_hours)} job-hours = {_hours(resources.ranks * all_hours)} "
              f"GPU-hours for the sweep, {_hours(resources.ranks * hours)} GPU-hours for the {len(to_run)} job(s) to "
              f"run (rough: {source})")
    else:
        print(f"Estimate: 0 GPU-hours (CPU jobs); about {_hours(hours)} hours of wall time for the {len(to_run)} "
              f"job(s) to run, one after another ({source})")


def _hours(hours: float) -> str:
    return f"{round(hours, 3):g}"


def write_sweep_json(cfg: DictConfig, sweep_dir: Path, planned: list[PlannedJob]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    axes = list(planned[0].job.axes) if planned else []
    axes_in_use, replaced = budget_axes(cfg)
    spec = {"ablation": cfg.ablation.name, "budget": cfg.budget.name, "regime": cfg.budget.regime, "axes": axes,
            "jobs": [p.job.to_json() for p in planned]}
    if replaced:  # which values stood in for the ablation's (the CPU budget's backbones)
        spec[REPLACED_AXES] = {key: {"ablation": values, "budget": axes_in_use[key]} for key, values in replaced.items()}
    tmp = sweep_dir / f"{SWEEP_SPEC}.tmp"
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, sweep_dir / SWEEP_SPEC)


def write_tables(cfg: DictConfig, sweep_dir: Path) -> None:
    from analysis.gather import AnalysisError
    from analysis.make_tables import make_tables

    try:
        out = make_tables([sweep_dir], plots=bool(cfg.tables.plots))
        report(f"tables written to {out}")
    except AnalysisError as error:
        report(f"no tables: {error}")


def queued_config_change(planned: PlannedJob, submission: Submission) -> str | None:
    """The training fields in which a queued or running submission differs from the planned job; None if the same
    (or if its submission pickle cannot be read, reported)."""
    overrides = submitted_overrides(submission)
    if overrides is None:
        report(f"{planned.job.name}: cannot read the overrides of job {submission.job_id} from {submission.folder}; "
               f"following it without checking its config")
        return None
    try:
        queued = resolve_config(compose_job(overrides))
    except ConfigError as error:
        return f"its overrides no longer compose ({error})"
    if config_hash(queued) == config_hash(planned.config):
        return None
    return format_changes(config_changes(queued, planned.config)) or "the config hashes differ"


def refuse_relaunch(sweep_dir: Path, stale: list[str], queued: bool = False) -> int:
    """Print why the jobs of ``sweep_dir`` cannot be relaunched with this config; return exit status 2."""
    print(f"sweeps/launch.py: {len(stale)} job(s) in {sweep_dir} hold results, checkpoints, running or queued runs "
          f"of a different training config than this launch composes:\n"
          + "".join(f"  {line}\n" for line in stale)
          + "Relaunching them here would mix two configs in one sweep. Launch into a new sweep_dir (sweep_dir=...), "
          + ("or stop those jobs (scancel; a local one: its process) and " if queued else "or ")
          + "delete their job directories to rerun them with this config.\nNothing was submitted.", file=sys.stderr)
    return 2


def launch(cfg: DictConfig) -> int:
    """Plan, validate, then submit and follow the sweep; return the exit status."""
    sweep_dir = Path(str(cfg.sweep_dir)).expanduser().resolve()
    try:
        launcher = hydra.utils.instantiate(cfg.launcher)
        launcher.check(dry_run=bool(cfg.dry_run))  # max_parallel; SLURM's commands on this machine
        resources = job_resources(cfg, launcher.kind)
        if not cfg.wait and launcher.kind == "local":
            raise ConfigError("wait: false needs launcher=slurm; local jobs are started by the launcher, "
                              "max_parallel at a time, so it must keep running")
        planned = plan_sweep(cfg, sweep_dir, resources)
    except ConfigError as error:
        print(f"sweeps/launch.py: {error}\nNothing was submitted.", file=sys.stderr)
        return 2
    stale = [f"{p.job.name}: {p.conflict.holds}: {p.conflict.fields}" for p in planned if p.conflict]
    if stale:
        return refuse_relaunch(sweep_dir, stale, queued=any(p.state == JobStatus.RUNNING for p in planned if p.conflict))
    print_plan(cfg, sweep_dir, planned, resources, launcher.kind)
    if cfg.dry_run:
        print("Dry run: nothing submitted.")
        return 0

    submissions = read_submissions(sweep_dir)
    to_submit: list[tuple[str, list[str]]] = []
    attached: list[TrackedJob] = []
    running_elsewhere = 0  # running jobs this sweep did not submit: never a second copy
    latest_of = {p.job.name: submissions[p.job.name][-1] for p in planned
                 if p.state not in FINAL_STATUSES and submissions.get(p.job.name)}
    states = scheduler_states(list(latest_of.values()))  # one sacct call for the whole sweep
    for p in planned:
        if p.state in FINAL_STATUSES:
            continue
        latest = latest_of.get(p.job.name)
        if latest is not None:
            state = states[latest.job_id]
            if state != "UNKNOWN" and not is_final(latest.cluster, state):
                changed = queued_config_change(p, latest)
                if changed:
                    stale.append(f"{p.job.name}: job {latest.job_id} ({state}) runs another training config: {changed}")
                    continue
                attached.append(TrackedJob(p.job.name, latest))
                attached[-1].state = state
                continue
        owner = live_owner(p.out_dir) if p.state == JobStatus.RUNNING else None
        if owner is not None:  # started outside this sweep's submissions (by hand, or by another launch still queueing)
            report(f"{p.job.name}: already running ({describe_owner(owner)}), not submitted again")
            running_elsewhere += 1
            continue
        to_submit.append((p.job.name, p.overrides))
    if stale:
        return refuse_relaunch(sweep_dir, stale, queued=True)
    write_sweep_json(cfg, sweep_dir, planned)  # only now: it must describe the results beside it
    for t in attached:
        report(f"{t.name}: job {t.submission.job_id} already {t.state}, following it")
    done = sum(p.state in FINAL_STATUSES for p in planned)
    report(f"{len(to_submit)} job(s) to submit, {len(attached) + running_elsewhere} already queued or running, "
           f"{done} finished")

    try:
        return submit_and_follow(cfg, sweep_dir, planned, launcher, resources, to_submit, attached)
    except (UncompletedJobError, FailedSubmissionError, OSError) as error:  # e.g. sbatch refused the jobs
        print(f"sweeps/launch.py: submitting failed: {error}", file=sys.stderr)
        return 1


def submit_and_follow(cfg: DictConfig, sweep_dir: Path, planned: list[PlannedJob], launcher: SweepLauncher,
                      resources: Resources, to_submit: list[tuple[str, list[str]]], attached: list[TrackedJob]) -> int:
    """Submit the jobs, follow them and every attached one to the end, write the tables; return the exit status."""
    if to_submit:
        executor = launcher.make_executor(resources.tasks_per_node, resources.gpus_per_node)
    if not cfg.wait:
        tracked = launcher.submit(executor, to_submit) if to_submit else []
        record_submissions(sweep_dir, [t.submission for t in tracked])
        for t in tracked:
            report(f"{t.name}: job {t.submission.job_id} submitted  log {t.submission.stdout}")
        report(f"not waiting; follow with: python sweeps/status.py {sweep_dir}")
        return 0
    if to_submit or attached:
        try:
            launcher.follow(sweep_dir, executor if to_submit else None, to_submit, attached, float(cfg.poll_s), report)
        except KeyboardInterrupt:
            if launcher.kind == "local":
                # Ctrl-C reached the local jobs too (one process group); submitit's local controller then ends them.
                report("stopped the sweep; its local jobs were stopped as well. Launch again to resume them from "
                       "their last checkpoints")
            else:
                report(f"stopped following the sweep; submitted SLURM jobs keep running. Follow them with "
                       f"`python sweeps/status.py {sweep_dir}`, or launch again to follow them and write the tables")
            return 130

    states = {p.job.name: live_status(p.out_dir) for p in planned}
    unfinished = {name: state for name, state in states.items() if state not in FINAL_STATUSES}
    write_tables(cfg, sweep_dir)
    if unfinished:
        report(f"{len(unfinished)} job(s) did not complete: "
               + ", ".join(f"{name} ({state})" for name, state in unfinished.items())
               + f"; see their train.log, and `python sweeps/status.py {sweep_dir}`; launch again to resume them")
        return 1
    report(f"all {len(planned)} job(s) finished")
    return 0


# Job overrides given bare on the command line; taken out of sys.argv before Hydra parses it.
BARE_JOB_OVERRIDES: list[str] = []


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if BARE_JOB_OVERRIDES:  # after the quoted job_overrides: a bare key given last wins, as on Hydra's command line
        cfg.job_overrides = [*cfg.job_overrides, *BARE_JOB_OVERRIDES]
    sys.exit(launch(cfg))


def take_job_overrides(argv: list[str]) -> list[str]:
    """argv without its job-config overrides, which go to BARE_JOB_OVERRIDES; exits 2 on an unknown key."""
    from hydra._internal.utils import get_args_parser

    if DRY_RUN_FLAG in argv:  # a plain flag for `dry_run=true`
        argv = [arg for arg in argv if arg != DRY_RUN_FLAG] + ["dry_run=true"]
    try:
        args, _ = get_args_parser().parse_known_args(argv[1:])  # the parser hydra.main uses
    except SystemExit:
        return argv  # let hydra.main report its own usage error
    try:
        check_override_syntax(args.overrides, multirun=args.multirun)  # before Hydra's lexer error
        _, job = split_overrides(args.overrides)
    except ConfigError as error:
        print(f"sweeps/launch.py: {error}\nNothing was submitted.", file=sys.stderr)
        sys.exit(2)
    BARE_JOB_OVERRIDES.extend(job)
    taken = set(job)
    return [argv[0]] + [arg for arg in argv[1:] if arg not in taken]


def cli() -> None:
    """``python sweeps/launch.py ...`` and its console command ``mtssl-sweep ...``."""
    sys.argv = take_job_overrides(sys.argv)
    main()


if __name__ == "__main__":
    cli()
