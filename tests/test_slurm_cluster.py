"""Integration tests against a real SLURM cluster (start one with `sudo slurm/start_local_cluster.sh`).

They submit real jobs with submitit and check results, task ranks, accounting states and
requeue after preemption by a job of the high-priority partition.
"""

import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.support.slurm import run_slurm_command

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# The jobs run in fresh interpreters that cannot import this test module: ship its functions
# and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 120


def _executor(folder: Path, partition: str = "low", **parameters) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # timeout_min above 10: submitit counts any USR2 of a shorter job as a timeout, not a preemption.
    defaults = {"slurm_partition": partition, "timeout_min": 30, "cpus_per_task": 1}
    executor.update_parameters(**{**defaults, **parameters})
    return executor


def _wait_done(job: submitit.Job, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Wait for a job to end, failing (instead of hanging) when it takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} still {job.state} after {timeout_s} s; log: {job.paths.stderr}")
        time.sleep(1)


def _wait_for(condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def _accounted_states(job_id: str) -> list[str]:
    """Every state sacct recorded for a job, oldest first (one per run when it was requeued)."""
    out = run_slurm_command("sacct", "--jobs", job_id, "--duplicates", "--allocations", "--noheader", "--parsable2",
               "--format=State")
    assert out.returncode == 0, out.stderr
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _wait_accounted(job_id: str, final_state: str, timeout_s: float = 30) -> list[str]:
    """Wait until sacct's last record of the job has final_state (slurmdbd lags job end by ~1 s)."""
    _wait_for(lambda: _accounted_states(job_id)[-1:] == [final_state],
              f"sacct to report job {job_id} {final_state} (has {_accounted_states(job_id)})", timeout_s)
    return _accounted_states(job_id)


def _node_cpus() -> int:
    return max(int(c) for c in run_slurm_command("sinfo", "--noheader", "--Node", "--format=%c").stdout.split())


def _polynomial(x: int) -> int:
    return 3 * x * x + 2 * x + 1


def _rank_report() -> tuple[int, int, str]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, env.job_id


def _sleep_then_return(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


class StepCounter(submitit.helpers.Checkpointable):
    """Sums 0..total_steps-1, one step every step_s seconds; its progress survives requeues.

    Each run records the step it starts from and touches `attempt<N>` in progress_dir.
    """

    def __init__(self) -> None:
        self.progress = (0, 0)  # (next step, sum so far); one assignment, so a signal never splits it
        self.run_starts: list[int] = []

    def __call__(self, total_steps: int, step_s: float, progress_dir: str) -> dict:
        self.run_starts.append(self.progress[0])
        Path(progress_dir, f"attempt{len(self.run_starts)}").touch()
        while self.progress[0] < total_steps:
            time.sleep(step_s)
            step, total = self.progress
            self.progress = (step + 1, total + step)
        return {"sum": self.progress[1], "run_starts": self.run_starts}


def test_job_result_and_completed_state(tmp_path):
    job = _executor(tmp_path).submit(_polynomial, 7)
    _wait_done(job)
    assert job.result() == 3 * 49 + 14 + 1
    assert _wait_accounted(job.job_id, "COMPLETED") == ["COMPLETED"]
    assert job.get_info(mode="force")["State"] == "COMPLETED"  # what submitit reads from sacct


def test_two_tasks_get_ranks_0_and_1(tmp_path):
    job = _executor(tmp_path, nodes=1, tasks_per_node=2).submit(_rank_report)
    _wait_done(job)
    reports = job.results()
    assert sorted(rank for rank, _, _ in reports) == [0, 1]
    assert [num_tasks for _, num_tasks, _ in reports] == [2, 2]
    assert {job_id for _, _, job_id in reports} == {job.job_id}


def test_cancelled_job_is_accounted_and_ends_without_result(tmp_path):
    job = _executor(tmp_path).submit(_sleep_then_return, 600, "never")
    _wait_for(lambda: job.get_info(mode="force").get("State") == "RUNNING", f"job {job.job_id} to run")
    job.cancel()
    _wait_done(job, timeout_s=60)  # without accounting, submitit would wait here forever
    assert _wait_accounted(job.job_id, "CANCELLED")[-1] == "CANCELLED"
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_finishes(tmp_path):
    total_steps, step_s = 100, 0.1
    low_executor = _executor(tmp_path / "low", partition="low")
    low = low_executor.submit(StepCounter(), total_steps, step_s, str(tmp_path))
    _wait_for((tmp_path / "attempt1").exists, f"low-priority job {low.job_id} to start")
    time.sleep(1)  # let it make some progress, so resuming differs from restarting

    # A high-partition job needing every CPU of the node can only run by preempting the low one.
    high = _executor(tmp_path / "high", partition="high", cpus_per_task=_node_cpus())
    high_job = high.submit(_sleep_then_return, 2, "high done")
    _wait_done(high_job)
    assert high_job.result() == "high done"

    _wait_done(low)
    result = low.result()
    assert result["sum"] == total_steps * (total_steps - 1) // 2
    starts = result["run_starts"]
    assert len(starts) >= 2, f"the low job was never preempted (runs started at steps {starts})"
    assert starts[0] == 0 and starts == sorted(set(starts)) and starts[1] > 0, starts
    # submitit's USR2 handler checkpoints and calls `scontrol requeue`; sacct keeps each run.
    states = _wait_accounted(low.job_id, "COMPLETED")
    assert "REQUEUED" in states, states
