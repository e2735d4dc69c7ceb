"""One sweep job as a submitit callable: compose its config, run it, requeue it on SLURM's warning signal.

SLURM sends SIGUSR2 before a job's time limit (``sbatch --signal``, set by submitit) and, with
``SlurmctldParameters=preempt_send_user_signal``, when a higher-priority job preempts it. submitit's own
SIGUSR2 handler would pickle the callable and run ``scontrol requeue`` at once, in the middle of a step.
``MtsslJob`` installs mtssl's ``StopRequest`` over it instead: training runs to the next step boundary,
all ranks agree, write a checkpoint and stop (``run_job`` returns 3). Only then does global rank 0 call
submitit's saved handler, which requeues the job with submitit's bookkeeping (timeout countdown, updated
submission pickle). The requeued run composes the same config and resumes from the checkpoint in
``out_dir``, so it ends with the same weights as an uninterrupted run. SIGTERM, SIGHUP and SIGINT stop the
job the same way but never requeue it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Sequence

import submitit
from submitit.core.utils import UncompletedJobError

from mtssl.config import compose_config
from mtssl.distributed.preemption import StopRequest
from mtssl.distributed.process_group import destroy_distributed
from mtssl.job_folder import TRAIN_LOG, JobStatus, job_state
from mtssl.run import run_job
from mtssl.utils.exit_codes import EXIT_BAD_CONFIG, EXIT_INTERRUPTED, EXIT_OK

EXIT_MEANINGS = {EXIT_BAD_CONFIG: "invalid config", EXIT_INTERRUPTED: "stopped on a signal"}


class MtsslJob(submitit.helpers.Checkpointable):
    """``MtsslJob()(overrides)`` runs ``python -m mtssl.run <overrides>`` as one rank of a submitit job.

    Returns a summary of results.json on global rank 0 (``{"rank": r}`` on the others). Raises when the job
    failed or cannot be requeued, so submitit records an error. ``checkpoint`` (inherited) resubmits the
    same overrides: all progress lives in the job's out_dir.
    """

    def __call__(self, overrides: Sequence[str]) -> dict:
        # Installed first, so a signal that arrives while the job is still starting is not lost.
        stop = StopRequest()
        code = None
        try:
            cfg = compose_config(overrides)
            out_dir = Path(cfg.out_dir)
            code = run_job(cfg, stop=stop)
        finally:
            stop.restore()
            destroy_distributed(all_ranks_done=code in (EXIT_OK, EXIT_INTERRUPTED))
        rank = submitit.JobEnvironment().global_rank
        if code == EXIT_INTERRUPTED:
            return self._requeue(stop, out_dir, rank)
        if code != EXIT_OK:
            meaning = EXIT_MEANINGS.get(code, JobStatus.FAILED.value)
            where = ("its message above (a refused job writes nothing in its out_dir)" if code == EXIT_BAD_CONFIG
                     else out_dir / TRAIN_LOG)
            raise RuntimeError(f"mtssl job {out_dir} ended with exit code {code} ({meaning}); see {where}")
        if rank != 0:
            return {"rank": rank}
        results = job_state(out_dir).results or {}
        keys = ("status", "knn_top1", "linear_top1", "weights_sha256", "steps")
        return {"rank": 0, "out_dir": str(out_dir), **{k: results.get(k) for k in keys}}

    @staticmethod
    def _requeue(stop: StopRequest, out_dir: Path, rank: int) -> dict:
        """After the stop checkpoint: requeue through submitit on SIGUSR2; end without a result on SIGTERM or SIGINT."""
        if stop.signum in (signal.SIGTERM, signal.SIGHUP) or signal.SIGINT in stop.received:
            # scancel, or a cluster that preempts with SIGTERM: SLURM requeues preempted jobs itself. SIGINT is a
            # person's Ctrl-C (or submitit's local cancel): they asked the job to stop, not to come back.
            name = signal.Signals(signal.SIGINT if signal.SIGINT in stop.received else stop.signum).name
            raise UncompletedJobError(
                f"stopped on {name} after a checkpoint in {out_dir}; not requeued by the job "
                f"(relaunch the sweep to resume it)")
        if rank != 0:
            # submitit requeues from global rank 0 only; the requeue then ends this task as well.
            return {"rank": rank, "requeued_by": 0}
        submitit_handler = stop.previous_handlers.get(signal.SIGUSR2)
        if not callable(submitit_handler):
            raise UncompletedJobError(f"stopped on a signal after a checkpoint in {out_dir}, outside a submitit "
                                      f"job that could requeue it; run it again to resume")
        # submitit's checkpoint_and_try_requeue: counts a timeout or a preemption, dumps self.checkpoint(...),
        # runs `scontrol requeue` and exits; raises UncompletedJobError when no requeue is left.
        submitit_handler(signal.SIGUSR2, None)
        raise UncompletedJobError(f"stopped on a signal after a checkpoint in {out_dir}; submitit did not requeue it")
