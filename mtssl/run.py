"""One complete job: validate, pretrain (resuming if possible), evaluate, write results.

    python -m mtssl.run method=mocov3 views=global_local predictor=separate \
        backbone=resnet18 data=cifar10 regime=cpu out_dir=runs/demo
    mtssl-run ...                                   # the same, as the installed command

Writes ``out_dir/config.yaml`` (resolved config) at the start and ``out_dir/results.json`` at
the end (every file of the job folder: mtssl.job_folder, docs/job_folder.md).
Runs as one of N ranks under torchrun or submitit. Exit codes: 0 done (completed or
diverged, see results.json), 2 bad config, or an out_dir holding results or checkpoints of another
training config, 3 stopped on a signal after a checkpoint (rerun the same command to resume), 1 failed.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mtssl.config import ConfigError, changes_from_file, compose_config, config_hash, describe_changes, resolve_config
from mtssl.config.quoting import check_override_syntax
from mtssl.config.renames import refuse_renamed
from mtssl.config.schema import FIELD_CHECKS
from mtssl.config.validate import check_device, check_out_dir, validate_config, validate_data
from mtssl.data.cifar10 import prepare_data
from mtssl.data.image_folder import DataError
from mtssl.distributed.checkpoint import CheckpointManager, CheckpointMismatch
from mtssl.distributed.process_group import DistEnv, destroy_distributed, init_distributed
from mtssl.distributed.preemption import StopRequest, TrainingInterrupted
from mtssl.distributed.collectives import host_any
from mtssl.job_folder import (CHECKPOINTS, CONFIG, FINAL_STATUSES, TRAIN_LOG, TRAINER_STATE, JobStatus, Results,
                              describe_owner, job_state, last_checkpoint_step, live_owner, record_end, record_start,
                              write_results)
from mtssl.train.scalar_logger import open_scalar_logger
from mtssl.train.trainer import PretrainOutcome, Trainer, configure_determinism
from mtssl.utils.exit_codes import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from mtssl.utils.git_revision import git_revision

log = logging.getLogger("mtssl")



class JobLog:
    """Rank 0 logs INFO to the console and to out_dir/train.log, other ranks only warnings. The file is opened
    only once the job is accepted (``open``), with the lines logged before it: a refused run writes nothing."""

    def __init__(self, env: DistEnv):
        root = logging.getLogger()
        root.handlers.clear()
        # Dated, with milliseconds: multi-day jobs, and requeue latency is read from these lines.
        self.format = logging.Formatter(f"%(asctime)s.%(msecs)03d [rank {env.rank}] %(levelname)s %(name)s: "
                                        f"%(message)s", "%Y-%m-%d %H:%M:%S")
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(self.format)
        root.addHandler(console)
        root.setLevel(logging.INFO if env.is_main else logging.WARNING)
        self.opened = False  # train.log opened: the job was accepted
        # The lines before the job is accepted, kept for train.log (never flushed on their own: no target yet).
        self.pending: logging.handlers.MemoryHandler | None = None
        if env.is_main:
            self.pending = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
            root.addHandler(self.pending)

    def open(self, out_dir: Path) -> None:
        """Rank 0: create out_dir, open train.log (appended) and write the lines logged so far into it."""
        self.opened = True
        if self.pending is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(out_dir / TRAIN_LOG)
        file_handler.setFormatter(self.format)
        self.pending.setTarget(file_handler)
        self.pending.flush()
        self.discard()
        logging.getLogger().addHandler(file_handler)

    def discard(self) -> None:
        """Drop the lines kept for train.log (a refused run); the console has shown them."""
        if self.pending is not None:
            logging.getLogger().removeHandler(self.pending)
            self.pending.buffer.clear()
            self.pending = None


@dataclass
class OutDirConflict:
    """An out_dir holding final results or a checkpoint of a different training config."""

    out_dir: Path
    holds: str  # what is there, e.g. "final results (results.json status completed)"
    fields: str  # the changed fields, "train.seed: 0 → 5, ..." (mtssl.config.describe_changes)

    def message(self) -> str:
        return (f"{self.out_dir} holds {self.holds} of a different training config: {self.fields}. "
                f"Use a new out_dir (out_dir=...), or delete {self.out_dir} to run this config from scratch.")


def out_dir_conflict(cfg: DictConfig, out_dir: Path | str) -> OutDirConflict | None:
    """What ``out_dir`` holds that ``cfg`` must not reuse: final results, a checkpoint, or a running job (its owner
    alive on this host, ``mtssl.job_folder.live_owner``) of another training config.

    Only training fields count (``mtssl.config.NON_TRAINING_FIELDS`` may differ). Recorded configs are compared by
    hash (results.json, the checkpoint's trainer state); results.json of older versions, without a hash, by the
    fields of the out_dir's config.yaml. A failed job without a checkpoint holds nothing to reuse.
    """
    out_dir = Path(out_dir)
    state = job_state(out_dir)
    owner = live_owner(out_dir)
    if owner is not None:  # running now, maybe before its first checkpoint: its config.yaml is what it trains
        changes = changes_from_file(out_dir / CONFIG, cfg)
        if not changes:  # the same training config, or not written yet (the owner is recorded first)
            return None
        return OutDirConflict(out_dir, f"a running job ({describe_owner(owner)})",
                              describe_changes(out_dir / CONFIG, cfg, changes))
    if state.status in FINAL_STATUSES:
        holds, recorded_hash = f"final results (results.json status {state.status})", state.results.get("config_hash")
        recorded = out_dir / CONFIG
    else:
        found = CheckpointManager(out_dir / CHECKPOINTS, 2).checkpoints()
        if not found:
            return None
        holds, recorded = f"a checkpoint ({found[0]})", found[0] / CONFIG
        recorded_hash = json.loads((found[0] / TRAINER_STATE).read_text()).get("config_hash")
    if recorded_hash == config_hash(cfg):
        return None
    changes = changes_from_file(recorded, cfg)
    if recorded_hash is None and changes == []:
        return None  # results.json of an older version: same training fields
    return OutDirConflict(out_dir, holds, describe_changes(recorded, cfg, changes))


def base_results(cfg: DictConfig, env: DistEnv) -> Results:
    return {
        "method": cfg.method.name,
        "views": cfg.views.name,
        "predictor": cfg.predictor.mode,
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "max_steps": cfg.train.max_steps,
        "world_size": env.world_size,
        "git_revision": git_revision(),
        # Which training config produced these results (reruns compare it; the seeds of one table cell share
        # config_hash_without_seed).
        "config_hash": config_hash(cfg),
        "config_hash_without_seed": config_hash(cfg, ignore=("train.seed",)),
    }


def run_job(cfg: DictConfig, stop: StopRequest | None = None) -> int:
    """Run one job in this process (one rank). Returns the exit code.

    ``stop``: stop-signal handlers the caller installed itself, so it can read afterwards which
    signal stopped the job (mtssl.submitit_job requeues on SIGUSR2); by default installed here.
    A refused job (exit 2 before training: a bad config or data folder, an out_dir in use by a running job or
    holding another training config) writes nothing; one with nothing to do only logs so and counts its start.
    An accepted one names this process the job's owner in progress.json until it ends, so that no second copy
    starts in the same out_dir.
    """
    out_dir = Path(cfg.out_dir)
    try:
        check_device(cfg)  # before the process group is set up on that device
        check_out_dir(out_dir)  # before the log file is opened in it
    except ConfigError as error:
        print(f"invalid config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    timeout_s = OmegaConf.select(cfg, "train.collective_timeout_s")
    problem = FIELD_CHECKS["train.collective_timeout_s"](timeout_s) if timeout_s is not None else None
    if problem:  # init_distributed needs it before validate_config runs
        print(f"invalid config: train.collective_timeout_s: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    problem = FIELD_CHECKS["logging.wandb"](OmegaConf.select(cfg, "logging.wandb", default=False))
    if problem:  # wandb not installed: refused before train.log is written
        print(f"invalid config: logging.wandb: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    env = init_distributed(OmegaConf.select(cfg, "train.device") or "auto", timeout_s)
    job_log = JobLog(env)
    log.info("job started: %d rank(s), pid %d, SLURM job %s", env.world_size, os.getpid(),
             os.environ.get("SLURM_JOB_ID", "none"))
    try:
        cfg, code = _admit(cfg, env, out_dir)
        if cfg is None:
            if code == EXIT_OK:  # final results, nothing to do: still a start (a requeue or relaunch counts), logged
                job_log.open(out_dir)
                if env.is_main:
                    record_start(out_dir)
            return code
        if cfg.eval.get("weights") is not None:  # weights no mtssl job trained: evaluated only, nothing is trained
            from mtssl.eval.evaluate_weights import run_evaluation_only  # noqa: deferred, heavy

            job_log.open(out_dir)
            return run_evaluation_only(cfg, env, stop)
        stop = stop if stop is not None else StopRequest()
        try:
            return _train_and_evaluate(cfg, env, out_dir, stop, job_log)
        finally:
            stop.restore()
    finally:
        job_log.discard()
        if job_log.opened and env.is_main:
            record_end(out_dir)


def _admit(cfg: DictConfig, env: DistEnv, out_dir: Path) -> tuple[DictConfig | None, int]:
    """The resolved config of a job that may run, or (None, exit code) for one that must not: a bad config, an
    out_dir in use by a running job or holding results or a checkpoint of another training config, or final
    results of this one (nothing to do). Writes nothing in out_dir."""
    try:
        cfg = resolve_config(cfg)
        validate_config(cfg, world_size=env.world_size)
        if prepare_data(cfg):  # the data step: CIFAR-10 fetched into an absent data.root (data.download)
            validate_data(cfg)
    except (ConfigError, DataError) as error:
        log.error("invalid config: %s", error)
        return None, EXIT_BAD_CONFIG
    owner = live_owner(out_dir) if env.is_main else None
    if host_any([owner is not None])[0]:  # all ranks agree, and rank 0 records its own start only after this
        if owner is not None:
            log.error("%s is in use by a running job (%s): a second copy would train beside it in the same folder. "
                      "Wait for it to end (or stop it), then rerun to resume; or use another out_dir=...",
                      out_dir, describe_owner(owner))
        return None, EXIT_BAD_CONFIG
    if cfg.eval.get("weights") is not None:  # evaluated only: mtssl.eval.evaluate_weights checks its out_dir itself
        return cfg, EXIT_OK
    conflict = out_dir_conflict(cfg, out_dir)
    if conflict is not None:
        log.error("%s", conflict.message())
        return None, EXIT_BAD_CONFIG
    previous = job_state(out_dir)
    if previous.status in FINAL_STATUSES and _more_steps_asked(previous.results, cfg):
        log.info("%s holds results of a run cut short at train.max_steps=%s; training on from its last checkpoint",
                 out_dir, previous.results["max_steps"])
    elif previous.status in FINAL_STATUSES:
        log.info("%s already holds final results of this training config (status %s): nothing to do. Changed "
                 "fields outside the training config (eval.*) are not applied to them; re-evaluate with "
                 "python -m mtssl.eval %s eval.<key>=...", out_dir, previous.status, out_dir)
        return None, EXIT_OK
    return cfg, EXIT_OK


def _train_and_evaluate(cfg: DictConfig, env: DistEnv, out_dir: Path, stop: StopRequest, job_log: JobLog) -> int:
    """Pretrain and evaluate an admitted job; returns the exit code. The job folder is started (train.log, the
    owner in progress.json, config.yaml) once the trainer is built: a config the trainer refuses writes nothing."""
    configure_determinism(cfg.train, env.device)
    results = base_results(cfg, env)
    writer = None
    try:
        trainer = Trainer(cfg, env, out_dir)
        monitor = None
        if cfg.monitor.knn_every_epochs:
            from mtssl.eval.knn_monitor import KnnMonitor  # noqa: deferred, heavy

            monitor = KnnMonitor(cfg, env, trainer.model.online.backbone, trainer.train_samples, out_dir, None, stop,
                                 resume_step=last_checkpoint_step(out_dir))
        _start_job_folder(cfg, env, out_dir, job_log)
        if env.is_main:  # TensorBoard, and W&B with logging.wandb (mtssl.train.scalar_logger)
            writer = open_scalar_logger(cfg, out_dir, resume_step=last_checkpoint_step(out_dir))
            if monitor is not None:
                monitor.writer = writer
        outcome = trainer.fit(stop, writer, on_epoch_end=monitor)
        results.update(_outcome_fields(outcome, cfg))
        if monitor is not None:
            results["knn_during_training"] = monitor.results(outcome.wall_time_s)
        if outcome.status == JobStatus.COMPLETED:
            from mtssl.eval.end_of_training import EvaluationInterrupted, evaluate_backbones  # noqa: deferred, heavy

            eval_start = time.monotonic()
            try:
                results.update(evaluate_backbones(cfg, env, outcome, out_dir, writer, stop))
            except EvaluationInterrupted as interrupt:  # finished phases are in eval_state.json
                log.warning("%s; rerun the same command to resume", interrupt)
                return EXIT_INTERRUPTED
            # One count of distinct unreadable files over training and evaluation.
            results["skipped_files"] = sorted(set(results["skipped_files"]) | set(results["eval_skipped_files"]))
            results["skipped_images"] = len(results["skipped_files"])
            results["eval_time_s"] = time.monotonic() - eval_start
            results["wall_time_s"] = results["train_time_s"] + results["eval_time_s"]
    except TrainingInterrupted as interrupt:
        log.warning("%s; rerun the same command to resume", interrupt)
        return EXIT_INTERRUPTED
    except (ConfigError, CheckpointMismatch) as error:
        log.error("%s", error)
        return EXIT_BAD_CONFIG
    except Exception as error:
        log.exception("job failed")
        results.update(status=JobStatus.FAILED, error=f"{type(error).__name__}: {error}")
        if not job_log.opened:  # failed while building the trainer: still a job that ran, and failed
            _start_job_folder(cfg, env, out_dir, job_log)
        if env.is_main:
            write_results(out_dir, results)
            if writer is not None:
                writer.log_results(results)
        return EXIT_FAILED
    else:  # final results (completed or diverged), written to results.json below
        if writer is not None:
            writer.log_results(results)
    finally:
        if writer is not None:
            writer.close(preempted=stop.requested)
    if env.is_main:
        write_results(out_dir, results)
        if results["status"] == JobStatus.COMPLETED and cfg.train.final_checkpoint_only:
            deleted = trainer.checkpoints.keep_only_newest()
            if deleted:
                log.info("train.final_checkpoint_only: deleted %d earlier checkpoint(s)", len(deleted))
        log.info("results: %s", json.dumps({k: results.get(k) for k in ("status", "knn_top1", "linear_top1", "weights_sha256")}))
    return EXIT_OK


def _start_job_folder(cfg: DictConfig, env: DistEnv, out_dir: Path, job_log: JobLog) -> None:
    """Rank 0, once the job is accepted: train.log (with the lines so far), this process as the owner in
    progress.json (before config.yaml: a relaunch then sees a running job as soon as it has a config), config.yaml."""
    job_log.open(out_dir)
    if env.is_main:
        record_start(out_dir)
        (out_dir / CONFIG).write_text(OmegaConf.to_yaml(cfg))


def _more_steps_asked(previous: Results, cfg: DictConfig) -> bool:
    """Whether completed results stopped at ``train.max_steps`` and this run allows more steps (train.max_steps
    is not a training field, so the config hashes agree)."""
    limit = previous.get("max_steps")
    return (previous.get("status") == JobStatus.COMPLETED and limit is not None and previous.get("steps") == limit
            and (cfg.train.max_steps is None or cfg.train.max_steps > limit))


def _outcome_fields(outcome: PretrainOutcome, cfg: DictConfig) -> Results:
    fields = {
        "status": outcome.status,
        "steps": outcome.steps,
        "final_losses": outcome.final_losses,
        "wall_time_s": outcome.wall_time_s,  # training, plus evaluation once it ran (eval_time_s)
        "train_time_s": outcome.wall_time_s,
        "images_per_s": outcome.images_per_s,
        "skipped_images": len(outcome.skipped_files),
        "skipped_files": outcome.skipped_files,
    }
    if outcome.monitor:
        fields["monitor"] = outcome.monitor
    if outcome.error:
        fields["error"] = outcome.error
    return fields


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def run_from_hydra(cfg: DictConfig) -> None:
    code = run_job(cfg)
    destroy_distributed(all_ranks_done=code in (EXIT_OK, EXIT_INTERRUPTED))
    if code:
        sys.exit(code)


SHOW_RECIPE_FLAG = "--show-recipe"


def show_config(overrides: list[str], recipe_only: bool) -> int:
    """Print the effective config of a job (``--cfg job``: what out_dir/config.yaml will hold) or its recipe and
    the files it comes from (``--show-recipe``); writes nothing. Returns the exit code."""
    from mtssl.config import describe_recipe
    from mtssl.config.compose import recipe_sources
    from mtssl.config.schema import check_fields

    try:
        cfg = resolve_config(compose_config(overrides))
        check_fields(cfg)
        sources = recipe_sources(overrides) if recipe_only else []
    except ConfigError as error:
        print(f"invalid config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if not recipe_only:
        print(OmegaConf.to_yaml(cfg), end="")
        return EXIT_OK
    print(f"{cfg.method.name} {cfg.views.name} {cfg.predictor.mode}, {cfg.backbone.name} ({cfg.backbone.family}), "
          f"{cfg.data.name}; composed from mtssl/conf/: {', '.join(sources)}")
    print(describe_recipe(cfg))
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """``python -m mtssl.run [key=value ...]``: a renamed field is refused naming its replacement, a value Hydra
    cannot read unquoted (a non-ASCII letter, ``~``, ...) is refused showing it quoted,
    ``--show-recipe`` prints the recipe and ``--cfg job`` the effective config (both exit without writing
    anything); anything else goes to Hydra, which runs the job."""
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv if argv is None else argv)
    show_recipe = SHOW_RECIPE_FLAG in argv
    argv = [arg for arg in argv if arg != SHOW_RECIPE_FLAG]
    try:
        args, _ = get_args_parser().parse_known_args(argv[1:])  # the parser hydra.main uses
    except SystemExit:
        args = None  # let Hydra report its own usage error
    if args is not None:
        try:
            refuse_renamed(args.overrides)
            check_override_syntax(args.overrides, multirun=args.multirun)  # before Hydra's lexer error
        except ConfigError as error:
            print(f"invalid config: {error}", file=sys.stderr)
            sys.exit(EXIT_BAD_CONFIG)
        if show_recipe or (args.cfg == "job" and not args.package):
            sys.exit(show_config(args.overrides, recipe_only=show_recipe))
    sys.argv = argv
    run_from_hydra()


if __name__ == "__main__":
    main()
