"""Sweeps: the grid, launch-time validation and dry runs (no cluster), then real sweeps on the local SLURM
cluster (slurm/start_local_cluster.sh): completion with results and tables, idempotent relaunches, and
requeue after preemption and after a time limit ending with the weights of an uninterrupted run.

Every launch goes through the real command line, ``python sweeps/launch.py``, with a test ablation and a
tiny budget written as YAML into a --config-dir (as a user adds them). Each job runs 2 FSDP ranks
(2 tasks of 1 CPU) on a 32-image synthetic folder (32 px, CIFAR-10 settings): 12 steps
(2 classes x 16 images / batch 8 x 3 epochs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from mtssl.config import ConfigError
from mtssl.job_folder import record_start, update_progress
from sweeps.grid import expand_grid, job_name
from sweeps.launchers import Submission, SweepLauncher, TrackedJob, record_submissions, scheduler_states
from sweeps.overrides import split_overrides
from sweeps.status import format_rows, sweep_rows
from tests.support.data import make_image_folder
from tests.support.jobs import TINY_RESNET
from tests.support.slurm import freeze_until_usr2, rank_pids, wait_for

REPO = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, str(REPO / "sweeps" / "launch.py")]


def checkout_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH: the scripts (and the jobs they start) import this
    checkout's sweeps and mtssl whichever copy is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
STEPS_PER_JOB = 2 * 16 // 8 * 3
JOB_NAMES = ["predictor=separate", "predictor=shared"]
LAUNCH_TIMEOUT_S = 360


# ---------------------------------------------------------------------------------------------------------------
# The grid


def test_grid_is_the_product_of_axes_and_seeds_with_axis_values_winning():
    jobs = expand_grid(
        axes={"backbone": ["resnet50", "vit_small"], "predictor": ["separate", "shared"]},
        seeds=[0, 1],
        fixed=["views=global_local", "method=byol", "train.epochs=2"],
        regime="cpu",
        job_overrides=["train.epochs=1"],
    )
    assert [job.name for job in jobs] == [
        f"backbone={b},predictor={p},train.seed={s}"
        for b in ("resnet50", "vit_small") for p in ("separate", "shared") for s in (0, 1)
    ]
    first = jobs[0]
    assert first.axes == {"backbone": "resnet50", "predictor": "separate", "train.seed": 0}
    # One value per key: job_overrides beat the ablation's fixed values, the axes beat both; every job
    # names the budget's regime (its values are the job's defaults: any override wins over them).
    assert sorted(first.overrides) == sorted(["regime=cpu", "backbone=resnet50", "train.epochs=1",
                                              "views=global_local", "method=byol", "predictor=separate", "train.seed=0"])


def test_one_seed_is_a_fixed_override_not_an_axis():
    jobs = expand_grid(axes={"method": ["byol", "mocov3"]}, seeds=[3])
    assert [job.name for job in jobs] == ["method=byol", "method=mocov3"]
    assert all("train.seed=3" in job.overrides for job in jobs)


def test_a_budgets_axes_replace_the_ablations_axis_of_the_same_key_only():
    from sweeps.grid import sweep_axes

    ablation = {"backbone": ["resnet50", "vit_small"], "method": ["byol"]}
    axes, replaced = sweep_axes(ablation, {"backbone": ["resnet18", "vit_micro"], "views": ["global"]})
    assert axes == {"backbone": ["resnet18", "vit_micro"], "method": ["byol"]}  # views: not swept, not added
    assert replaced == {"backbone": ["resnet50", "vit_small"]}
    assert sweep_axes(ablation, None) == (ablation, {})


def test_job_names_are_filesystem_safe():
    assert job_name({"data.root": "/a b/c", "x": [1, 2]}) == "data.root=_a_b_c,x=_1,2_"


@pytest.mark.parametrize("kwargs, field", [
    ({"axes": {"method": ["byol"]}, "job_overrides": ["method=simsiam"]}, "job_overrides"),
    ({"axes": {"method": []}}, "ablation.axes.method"),
    ({"axes": {"x": ["a/b", "a_b"]}}, "same job directory"),
    ({"axes": {"method": ["byol"]}, "seeds": []}, "ablation.seeds"),
])
def test_bad_grids_are_refused_with_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        expand_grid(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The command line: bare job overrides


def test_bare_overrides_split_between_launcher_and_jobs_in_order():
    launcher, jobs = split_overrides([
        "ablation=method", "data.subset=500", "budget.seeds=[1]", "train.epochs=1", "sweep_dir=/s",
        "method=simsiam", "+backbone.kwargs.layers=[1,1,1,1]", "tables.plots=false", "hydra.verbose=true",
        "~train.max_steps", "data.root='/a b/c'", "cluster=local", "launcher.max_parallel=2",
    ])
    assert launcher == ["ablation=method", "budget.seeds=[1]", "sweep_dir=/s", "tables.plots=false",
                        "hydra.verbose=true", "cluster=local", "launcher.max_parallel=2"]
    assert jobs == ["data.subset=500", "train.epochs=1", "method=simsiam", "+backbone.kwargs.layers=[1,1,1,1]",
                    "~train.max_steps", "data.root='/a b/c'"]


@pytest.mark.parametrize("override, key, nearest", [
    ("train.epoch=2", "train.epoch", "train.epochs"),
    ("eval.knn=[5]", "eval.knn", "eval.knn_k"),
    ("tables.plot=false", "tables.plot", "tables.plots"),
    ("dryrun=true", "dryrun", "dry_run"),
])
def test_unknown_key_names_both_configs_and_the_nearest_key(override, key, nearest):
    with pytest.raises(ConfigError) as info:
        split_overrides(["ablation=method", override])
    message = str(info.value)
    assert f"unknown key {key!r}" in message and f"did you mean {nearest}?" in message
    assert "sweeps/conf/config.yaml" in message and "mtssl/conf/config.yaml" in message


def test_help_lists_dry_run_and_job_keys():
    out = launch("--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--dry-run" in out.stdout and "job key=value" in out.stdout and "ablation: " in out.stdout


@pytest.mark.slow
def test_bare_job_overrides_reach_every_job_after_job_overrides(config_dir, tmp_path):
    sweep_dir = tmp_path / "bare"
    # Forwarded: a bare job key is validated per job like a job_overrides entry (2 ranks per job).
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, "train.batch_size=7", "--dry-run"), timeout=120)
    assert out.returncode == 2 and "train.batch_size: 7 does not divide across 2 ranks" in out.stderr, out.stderr
    # The bare key comes after the quoted form: it wins.
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, 'job_overrides=["train.batch_size=7"]', "train.batch_size=4",
                                  "--dry-run"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Job overrides (every job): train.batch_size=7 train.batch_size=4" in out.stdout
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, "train.epoch=1"), timeout=120)
    assert out.returncode == 2 and "did you mean train.epochs?" in out.stderr and "Nothing was submitted." in out.stderr
    assert "Traceback" not in out.stderr and not sweep_dir.exists()


@pytest.mark.slow
def test_bare_form_runs_end_to_end_on_the_local_launcher(config_dir, tmp_path):
    sweep_dir = tmp_path / "local"
    # One job of the pair; the ablation's fixed values train 3 epochs, the bare override 1: 2 classes x 16 images / batch 8 steps.
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, "ablation.axes.predictor=[shared]", "train.epochs=1",
                                  "eval.knn_k=[2]"))
    assert out.returncode == 0, out.stdout + out.stderr
    result = results(sweep_dir / "predictor=shared")
    assert result["status"] == "completed" and result["epochs"] == 1 and result["steps"] == 2 * 16 // 8
    assert set(result["knn"]) == {"k2", "k20"}  # eval.knn_k, and the headline k (20; the bank holds 32)
    assert yaml.safe_load((sweep_dir / "predictor=shared" / "config.yaml").read_text())["train"]["epochs"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Polling the scheduler: one sacct call per poll

FAKE_SACCT = """#!/bin/sh
# Counts its calls; reports every -j id RUNNING on the first call, COMPLETED afterwards.
echo call >> "$SACCT_CALLS"
calls=$(wc -l < "$SACCT_CALLS")
state=RUNNING
[ "$calls" -gt 1 ] && state=COMPLETED
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
  if [ "$1" = "-j" ]; then echo "$2|$state|node1"; echo "$2.batch|$state|node1"; shift; fi
  shift
done
"""


@pytest.fixture
def fake_sacct(tmp_path, monkeypatch) -> Path:
    """A stand-in `sacct` first on PATH; returns the file that gets one line per call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(FAKE_SACCT)
    (bin_dir / "sacct").chmod(0o755)
    calls = tmp_path / "sacct_calls"
    calls.write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SACCT_CALLS", str(calls))
    return calls


def fake_submissions(n: int, folder: Path) -> list[Submission]:
    return [Submission(f"job{i}", str(1000 + i), "slurm", str(folder), str(folder / f"{i}.out"),
                       str(folder / f"{i}.err"), "2026-01-01T00:00:00") for i in range(n)]


def calls(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("n", [1, 300])
def test_scheduler_states_of_any_number_of_jobs_take_one_sacct_call(fake_sacct, tmp_path, n):
    states = scheduler_states(fake_submissions(n, tmp_path))
    assert calls(fake_sacct) == 1
    assert states == {str(1000 + i): "RUNNING" for i in range(n)}


def test_following_attached_jobs_calls_sacct_once_per_poll(fake_sacct, tmp_path):
    attached = [TrackedJob(s.name, s) for s in fake_submissions(50, tmp_path)]
    polls = []
    done = SweepLauncher().follow(tmp_path, None, [], attached, poll_s=0, report=polls.append)
    # Poll 1: all RUNNING (50 reports), poll 2: all COMPLETED (50 reports), then every job is final.
    assert len(done) == 50 and len(polls) == 100
    assert calls(fake_sacct) == 2


def test_status_table_reads_progress_and_queries_sacct_once(fake_sacct, tmp_path):
    sweep = tmp_path / "sweep"
    names = ["a", "b", "c", "d"]
    (sweep / ".submitit").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"jobs": [{"name": n, "overrides": [], "axes": {}} for n in names]}))
    subs = fake_submissions(3, sweep)  # "d" was never submitted
    record_submissions(sweep, [Submission(n, s.job_id, *list(vars(s).values())[2:]) for n, s in zip(names, subs)])
    (sweep / "a").mkdir()
    (sweep / "a" / "results.json").write_text(json.dumps(
        {"status": "completed", "steps": 40, "final_losses": {"loss": 0.25}, "images_per_s": 80.0, "knn_top1": 50.0}))
    # "b" started, logged step 10, was requeued and logged step 20: progress.json as run.py and the trainer write it.
    record_start(sweep / "b")
    update_progress(sweep / "b", step=10, total_steps=40, loss=1.5, images_per_s=12.5)
    record_start(sweep / "b")
    update_progress(sweep / "b", step=20, total_steps=40, loss=1.25, images_per_s=20.0)
    rows = {r["name"]: r for r in sweep_rows(sweep)}
    assert calls(fake_sacct) == 1
    assert (rows["a"]["state"], rows["a"]["step"], rows["a"]["total"], rows["a"]["loss"]) == ("completed", 40, 40, 0.25)
    assert (rows["b"]["state"], rows["b"]["step"], rows["b"]["total"]) == ("running", 20, 40)
    assert (rows["b"]["loss"], rows["b"]["images_per_s"], rows["b"]["requeues"]) == (1.25, 20.0, 1)
    assert rows["c"]["state"] == "running"  # submitted, nothing written yet: the scheduler says RUNNING
    assert rows["d"]["state"] == "pending" and rows["d"]["job_id"] is None
    text = format_rows(list(rows.values()))
    assert re.search(r"^b\s+running\s+20/40\s+1\.2500\s+20\.0\s+1\s+1001\s+\S+1\.out$", text, re.M), text
    assert text.splitlines()[-1] == "2 running, 1 completed, 1 pending (4 jobs)"


# The job's stop signals


def test_sigint_stops_a_submitit_job_without_requeueing_it(tmp_path):
    """After the stop checkpoint, SIGUSR2 (time limit, preemption) hands over to submitit's requeue handler; SIGINT
    (a person's Ctrl-C, submitit's local cancel) ends the job without one."""
    from submitit.core.utils import UncompletedJobError

    from mtssl.submitit_job import MtsslJob
    from mtssl.distributed.preemption import StopRequest

    requeued: list[int] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGINT)}
    signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # where submitit's handler sits
    try:
        for sent, requeues in ((signal.SIGUSR2, True), (signal.SIGINT, False)):
            stop = StopRequest()
            try:
                os.kill(os.getpid(), sent)
                assert stop.received == [sent]
                with pytest.raises(UncompletedJobError) as stopped:
                    MtsslJob._requeue(stop, tmp_path, rank=0)
            finally:
                stop.restore()
            assert requeued == ([signal.SIGUSR2] if requeues else []), sent
            assert requeues or "stopped on SIGINT" in str(stopped.value) and "not requeued" in str(stopped.value)
            requeued.clear()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------------
# Launch-time validation and dry runs (no cluster needed)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("sweeps") / "data", classes=2, per_class=16)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, data_root) -> Path:
    """A --config-dir holding a 2-job test ablation of tiny jobs and a budget for them, written as a user would."""
    root = tmp_path_factory.mktemp("sweep_conf")
    (root / "ablation").mkdir()
    (root / "budget").mkdir()
    ablation = {
        "name": "pair",
        "fixed": [
            "method=byol", "views=global_local",
            "data=cifar10", f"data.root={data_root}", "data.download=false", "data.subset=null", "data.num_workers=0",
            "train.device=cpu", "train.batch_size=8", "train.epochs=3", "train.log_every_steps=1",
            "train.checkpoint_every_steps=4", "method.projector.hidden_dims=[64]",
            "method.predictor.hidden_dims=[64]", *TINY_RESNET,
            "eval.linear_epochs=2", "eval.knn_k=[3,5]", "eval.batch_size=16", "eval.linear_lrs=[0.1]",
        ],
        "axes": {"predictor": ["separate", "shared"]}, "seeds": [0],
    }
    budget = {"name": "tiny", "regime": "official",
              "resources": {"ranks_per_job": 2, "gpus": False, "hours_per_job": {"default": 0.01}}}
    (root / "ablation" / "pair.yaml").write_text(yaml.safe_dump(ablation))
    (root / "budget" / "tiny.yaml").write_text(yaml.safe_dump(budget))
    return root


def launch(*args: str, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=checkout_env())


def tiny_sweep_args(config_dir: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return ["--config-dir", str(config_dir), "ablation=pair", "budget=tiny", f"sweep_dir={sweep_dir}",
            "poll_s=1", "tables.plots=false", *extra]


@pytest.mark.slow
def test_dry_run_prints_grid_gpu_hours_and_dirs_and_submits_nothing(data_root, tmp_path):
    sweep_dir = tmp_path / "paper"
    out = launch("ablation=method", "budget=imagenet_200ep", "launcher=slurm", "cluster=example_gpu",
                 f"data.root={data_root}", 'job_overrides=["train.batch_size=32"]',
                 f"sweep_dir={sweep_dir}", "--dry-run", timeout=120)
    assert out.returncode == 0, out.stderr
    budget = yaml.safe_load((REPO / "sweeps/conf/budget/imagenet_200ep.yaml").read_text())
    hours, gpus = budget["resources"]["hours_per_job"]["resnet50"], budget["resources"]["ranks_per_job"]
    assert f"= {3 * hours * gpus:g} GPU-hours" in out.stdout  # 3 methods x 4 GPUs x hours of a ResNet-50 job
    for method in ("byol", "simsiam", "mocov3"):
        assert re.search(rf"method={method}\s+submit\s+{re.escape(str(sweep_dir / f'method={method}'))}", out.stdout)
    assert "nothing submitted" in out.stdout
    assert not sweep_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", [
    (['job_overrides=["train.batch_size=7"]'], "train.batch_size: 7 does not divide across 2 ranks"),
    (["ablation.axes.predictor=[separate,nope]"], "job 'predictor=nope': bad override"),
    (['job_overrides=["predictor=shared"]'], "job_overrides sets ['predictor']"),
])
def test_bad_override_fails_the_launch_before_anything_is_submitted(config_dir, tmp_path, extra, expected):
    sweep_dir = tmp_path / "bad"
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, *extra), timeout=120)
    assert out.returncode == 2
    assert expected in out.stderr and "Nothing was submitted." in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not sweep_dir.exists()


@pytest.mark.slow
def test_default_sweep_dirs_differ_by_launcher(config_dir):
    """So a SLURM launch after a local one (as the README runs them) neither skips nor reuses the local jobs."""
    dirs = {}
    for kind, extra in (("local", []), ("slurm", ["launcher=slurm", "cluster=local"])):
        out = launch("--config-dir", str(config_dir), "ablation=pair", "budget=tiny", *extra, "--dry-run", timeout=120)
        assert out.returncode == 0, out.stderr
        dirs[kind] = re.search(r"^Sweep directory: (.+)$", out.stdout, re.M).group(1)
    assert dirs == {kind: str(REPO / "sweeps" / "outputs" / kind / "pair-tiny") for kind in ("local", "slurm")}


@pytest.mark.slow
def test_relaunch_with_changed_job_overrides_is_refused_before_submitting(config_dir, tmp_path):
    sweep_dir = tmp_path / "relaunch"
    one_job = ["ablation.axes.predictor=[separate]", "budget.resources.ranks_per_job=1"]
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, *one_job))
    assert out.returncode == 0, out.stdout + out.stderr
    job = sweep_dir / "predictor=separate"
    kept = [sweep_dir / "sweep.json", sweep_dir / ".submitit" / "submissions.json", job / "results.json",
            job / "config.yaml", sweep_dir / "tables" / "results.csv"]
    before = [p.read_bytes() for p in kept]

    out = launch(*tiny_sweep_args(config_dir, sweep_dir, *one_job, 'job_overrides=["train.epochs=2"]'), timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "1 job(s) in" in out.stderr and "different training config" in out.stderr
    assert "predictor=separate: final results (results.json status completed): train.epochs: 3 → 2" in out.stderr
    assert "new sweep_dir" in out.stderr and "Nothing was submitted." in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert [p.read_bytes() for p in kept] == before  # sweep.json still describes the results beside it

    # A field outside the training config (the evaluation) is the same run: skipped, as before.
    out = launch(*tiny_sweep_args(config_dir, sweep_dir, *one_job, 'job_overrides=["eval.knn_k=[3]"]'), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 job(s) to submit, 0 already queued or running, 1 finished" in out.stdout
    assert (job / "results.json").read_bytes() == before[2]


# ---------------------------------------------------------------------------------------------------------------
# Real sweeps on the local SLURM cluster


def slurm_args(config_dir: Path, sweep_dir: Path, *extra: str) -> tuple[list[str], str]:
    """Arguments of a tiny sweep on the local cluster, and the SLURM job name unique to this launch."""
    name = f"mtssl-test-{uuid.uuid4().hex[:8]}"
    return tiny_sweep_args(config_dir, sweep_dir, "launcher=slurm", "cluster=local", f"launcher.name={name}",
                           *extra), name


def slurm_jobs_named(name: str) -> list[str]:
    out = subprocess.run(["sacct", "--name", name, "--allocations", "--noheader", "--parsable2", "--format=JobID",
                          "--starttime=now-1days"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def accounted_states(job_id: str) -> list[str]:
    """Every state sacct recorded for a job, oldest first (one per run when it was requeued)."""
    out = subprocess.run(["sacct", "--jobs", job_id, "--duplicates", "--allocations", "--noheader", "--parsable2",
                          "--format=State"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def submissions(sweep_dir: Path) -> dict[str, list[dict]]:
    path = sweep_dir / ".submitit" / "submissions.json"
    return json.loads(path.read_text())["jobs"] if path.exists() else {}


def results(job_dir: Path) -> dict:
    return json.loads((job_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def finished_sweep(slurm_cluster, config_dir, tmp_path_factory):
    """The 2-job test sweep, run to completion on the cluster; also the uninterrupted reference weights."""
    sweep_dir = tmp_path_factory.mktemp("slurm_sweep") / "pair"
    args, name = slurm_args(config_dir, sweep_dir)
    out = launch(*args)
    return sweep_dir, out, name


@pytest.fixture(scope="module")
def reference_sweep(finished_sweep) -> Path:
    """The finished test sweep's folder, for the tests that build on its successful launch."""
    sweep_dir, out, _ = finished_sweep
    assert out.returncode == 0, out.stdout + out.stderr
    return sweep_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_two_job_sweep_runs_to_completion_with_results_and_tables(finished_sweep):
    sweep_dir, out, name = finished_sweep
    assert out.returncode == 0, out.stdout + out.stderr
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    assert spec["ablation"] == "pair" and spec["budget"] == "tiny" and spec["axes"] == ["predictor"]
    assert spec["regime"] == "official"
    assert [job["name"] for job in spec["jobs"]] == JOB_NAMES
    records = submissions(sweep_dir)
    assert sorted(records) == sorted(JOB_NAMES) and all(len(r) == 1 for r in records.values())
    assert sorted(slurm_jobs_named(name)) == sorted(r[0]["job_id"] for r in records.values())
    weights = set()
    for job in JOB_NAMES:
        result = results(sweep_dir / job)
        assert result["status"] == "completed"
        assert result["predictor"] == job.split("=")[1] and result["steps"] == STEPS_PER_JOB
        assert result["world_size"] == 2  # 2 SLURM tasks = 2 FSDP ranks
        weights.add(result["weights_sha256"])
        record = records[job][0]
        assert accounted_states(record["job_id"]) == ["COMPLETED"]
        # Progress: the job's id, the states it was seen in, in order, ending COMPLETED, and its log (which
        # exists). A state shorter than one poll, or that accounting (slurmdbd) recorded late, can go unseen.
        line = re.compile(rf"^\S* ?{re.escape(job)}: job {re.escape(record['job_id'])} (\w+)  log {re.escape(record['stdout'])}$", re.M)
        seen = line.findall(out.stdout)
        order = ["SUBMITTED", "PENDING", "RUNNING", "COMPLETING", "COMPLETED"]
        assert seen and seen[-1] == "COMPLETED" and seen == sorted(seen, key=order.index), (seen, out.stdout)
        assert Path(record["stdout"]).is_file()
    assert len(weights) == 2  # separate and shared predictors train different weights
    table = (sweep_dir / "tables" / "results.csv").read_text().splitlines()
    assert len(table) == 1 + len(JOB_NAMES) and all(",completed," in row for row in table[1:])
    assert (sweep_dir / "tables" / "README.md").is_file()
    status = subprocess.run([sys.executable, str(REPO / "sweeps/status.py"), str(sweep_dir)], capture_output=True,
                            text=True, check=True, env=checkout_env()).stdout
    for job in JOB_NAMES:
        job_id = records[job][0]["job_id"]
        assert re.search(rf"^{re.escape(job)}\s+completed\s+{STEPS_PER_JOB}/{STEPS_PER_JOB}\s+\d+\.\d{{4}}\s+[\d.]+\s+0\s+"
                         rf"{job_id}\s", status, re.M), status
    assert status.rstrip().splitlines()[-1] == f"{len(JOB_NAMES)} completed ({len(JOB_NAMES)} jobs)"


@pytest.mark.slurm
@pytest.mark.slow
def test_relaunching_a_finished_sweep_submits_nothing(reference_sweep, config_dir):
    sweep_dir = reference_sweep
    before = {job: (sweep_dir / job / "results.json").read_bytes() for job in JOB_NAMES}
    args, name = slurm_args(config_dir, sweep_dir)
    out = launch(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 job(s) to submit, 0 already queued or running, 2 finished" in out.stdout
    assert slurm_jobs_named(name) == []
    assert all(len(records) == 1 for records in submissions(sweep_dir).values())
    assert {job: (sweep_dir / job / "results.json").read_bytes() for job in JOB_NAMES} == before


@pytest.mark.slurm
@pytest.mark.slow
def test_relaunching_a_half_finished_sweep_submits_only_the_missing_job(reference_sweep, config_dir, tmp_path):
    source = reference_sweep
    sweep_dir = tmp_path / "half"
    shutil.copytree(source, sweep_dir, ignore=shutil.ignore_patterns(".submitit", "tables"))
    finished, missing = JOB_NAMES
    (sweep_dir / missing / "results.json").unlink()  # killed after its last checkpoint, before the results
    finished_bytes = (sweep_dir / finished / "results.json").read_bytes()
    args, name = slurm_args(config_dir, sweep_dir)
    out = launch(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 job(s) to submit, 0 already queued or running, 1 finished" in out.stdout
    records = submissions(sweep_dir)
    assert list(records) == [missing] and len(slurm_jobs_named(name)) == 1
    assert (sweep_dir / finished / "results.json").read_bytes() == finished_bytes
    assert results(sweep_dir / missing)["weights_sha256"] == results(source / missing)["weights_sha256"]
    assert f"resumed from {sweep_dir / missing}/checkpoints/step_{STEPS_PER_JOB:08d}" in (
        sweep_dir / missing / "train.log").read_text()


def hold_until_usr2(sweep_dir: Path, job: str, step: int, launcher: subprocess.Popen, then=lambda: None) -> None:
    """Freeze the job's ranks once training logged ``step``, call ``then``, and let them go on once SLURM's
    SIGUSR2 is pending. Freezing stands in for a slow job: the signal then surely lands mid-training."""
    log = sweep_dir / job / "train.log"

    def reached() -> bool:
        text = log.read_text() if log.exists() else ""
        return any(int(s) >= step for s in re.findall(r"step (\d+)/\d+ epoch", text))

    wait_for(reached, f"training to reach step {step}", 240, launcher)
    pids = rank_pids(sweep_dir)
    assert len(pids) == 2, pids
    freeze_until_usr2(pids, launcher, then)


def run_interrupted_job(config_dir: Path, sweep_dir: Path, extra=(), then=lambda: None) -> tuple[str, str]:
    """Launch the 'separate' job alone, hold it mid-training until SLURM signals it; return (stdout, job id)."""
    args, _ = slurm_args(config_dir, sweep_dir, "ablation.axes.predictor=[separate]", *extra)
    launcher = subprocess.Popen([*LAUNCH, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=checkout_env())
    try:
        hold_until_usr2(sweep_dir, "predictor=separate", 2, launcher, then)
        stdout, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stdout
    [record] = submissions(sweep_dir)["predictor=separate"]
    return stdout, record


def assert_resumed_to_reference(sweep_dir: Path, record: dict, reference: Path, submitit_case: str) -> None:
    job_dir = sweep_dir / "predictor=separate"
    log = (job_dir / "train.log").read_text()
    stops = [int(s) for s in re.findall(r"stopped on SIGUSR2 at step (\d+)", log)]
    assert stops and all(2 <= s < STEPS_PER_JOB for s in stops), log
    assert f"resumed from {job_dir}/checkpoints/step_{stops[0]:08d} (step {stops[0]})" in log
    assert f"this job is {submitit_case}" in Path(record["stdout"]).read_text()
    states = accounted_states(record["job_id"])
    # One requeue per stop (a signal after training, during evaluation, may add one that resumes nothing).
    assert states[-1] == "COMPLETED" and states.count("REQUEUED") >= len(stops), states
    result, uninterrupted = results(job_dir), results(reference / "predictor=separate")
    assert result["status"] == "completed" and result["steps"] == STEPS_PER_JOB
    assert result["weights_sha256"] == uninterrupted["weights_sha256"]
    assert result["final_losses"] == uninterrupted["final_losses"]


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_and_ends_with_the_uninterrupted_weights(reference_sweep, config_dir, tmp_path):
    reference = reference_sweep
    sweep_dir = tmp_path / "preempted"
    high_job: list[str] = []

    def preempt() -> None:
        # A high-partition job needing every CPU of the node can only start by preempting the sweep job.
        cpus = max(int(c) for c in subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"],
                                                   capture_output=True, text=True, check=True).stdout.split())
        out = subprocess.run(["sbatch", "--parsable", "--partition=high", f"--cpus-per-task={cpus}",
                              f"--output={tmp_path / 'high.out'}", "--wrap", "sleep 2"],
                             capture_output=True, text=True, check=True)
        high_job.append(out.stdout.strip().split(";")[0])

    _, record = run_interrupted_job(config_dir, sweep_dir, then=preempt)
    assert_resumed_to_reference(sweep_dir, record, reference, "preempted")
    assert accounted_states(high_job[0])[-1] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_job_hitting_its_time_limit_requeues_and_ends_with_the_uninterrupted_weights(reference_sweep, config_dir,
                                                                                      tmp_path):
    reference = reference_sweep
    sweep_dir = tmp_path / "time_limit"
    # SIGUSR2 60 s before a 2-minute limit (SLURM checks limits every ~30 s: it arrives 60-90 s before).
    _, record = run_interrupted_job(config_dir, sweep_dir, extra=(
        "cluster.timeout_min=2", "cluster.signal_delay_s=60", "cluster.max_num_timeout=3"))
    assert_resumed_to_reference(sweep_dir, record, reference, "timed-out")
    assert "remaining timeouts" in Path(record["stdout"]).read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_bare_form_runs_end_to_end_on_slurm(slurm_cluster, config_dir, tmp_path):
    sweep_dir = tmp_path / "bare_slurm"
    args, name = slurm_args(config_dir, sweep_dir, "ablation.axes.predictor=[separate]", "train.epochs=1")
    out = launch(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    result = results(sweep_dir / "predictor=separate")
    assert result["status"] == "completed" and result["epochs"] == 1 and result["steps"] == 2 * 16 // 8
    assert result["world_size"] == 2 and len(slurm_jobs_named(name)) == 1


@pytest.mark.slow
@pytest.mark.slurm
def test_relaunch_while_a_job_is_queued_with_another_config_is_refused(slurm_cluster, config_dir, tmp_path):
    """A queued job runs the overrides it was submitted with: a relaunch that changed them must not follow it."""
    sweep_dir = tmp_path / "queued"
    held = ["ablation.axes.predictor=[separate]", "wait=false", "+cluster.additional_parameters.begin='now+3600'"]
    args, _ = slurm_args(config_dir, sweep_dir, *held)
    out = launch(*args, timeout=120)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        [record] = submissions(sweep_dir)["predictor=separate"]
        spec = (sweep_dir / "sweep.json").read_bytes()
        args, name = slurm_args(config_dir, sweep_dir, *held, 'job_overrides=["train.epochs=2"]')
        out = launch(*args, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert (f"predictor=separate: job {record['job_id']} (PENDING) runs another training config: "
                f"train.epochs: 3 → 2") in out.stderr
        assert "scancel" in out.stderr and "Nothing was submitted." in out.stderr
        assert slurm_jobs_named(name) == [] and len(submissions(sweep_dir)["predictor=separate"]) == 1
        assert (sweep_dir / "sweep.json").read_bytes() == spec
        # The same config follows it.
        args, _ = slurm_args(config_dir, sweep_dir, *held)
        out = launch(*args, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"predictor=separate: job {record['job_id']} already PENDING, following it" in out.stdout
    finally:
        ids = [r["job_id"] for records in submissions(sweep_dir).values() for r in records]
        if ids:
            subprocess.run(["scancel", *ids], check=False)


@pytest.mark.slurm
def test_bad_override_submits_nothing_to_slurm(slurm_cluster, config_dir, tmp_path):
    args, name = slurm_args(config_dir, tmp_path / "bad", 'job_overrides=["train.batch_size=7"]')
    out = launch(*args, timeout=120)
    assert out.returncode == 2 and "train.batch_size" in out.stderr
    assert slurm_jobs_named(name) == []


@pytest.mark.slow
def test_random_init_reference_jobs_one_per_distinct_backbone_and_budget_seeds(data_root, tmp_path):
    """cpu_quick adds one train.epochs=0 job per distinct (backbone, data, eval, seed), listed first: one for the
    6 predictor-sharing jobs (the backbone is built first from the seed, whatever the method), one per backbone
    of the backbone ablation. cifar10_gpu's own seeds replace the ablation's: 6 x 3 jobs, 3 GPU-hours each."""
    out = launch("ablation=predictor_sharing", f"sweep_dir={tmp_path / 'a'}", "--dry-run", timeout=180)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^  (\S+)\s+submit", out.stdout, flags=re.M)
    assert listed[0] == "random_init" and len(listed) == 7 and listed.count("random_init") == 1
    out = launch("ablation=backbone", f"sweep_dir={tmp_path / 'b'}", "--dry-run", timeout=180)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^  (\S+)\s+submit", out.stdout, flags=re.M)
    assert [n for n in listed if n.startswith("random_init")] == [
        f"random_init,backbone={b}" for b in ("resnet10t", "resnet18", "vit_micro")]  # the budget's CPU members
    out = launch("ablation=predictor_sharing", "budget=cifar10_gpu", "launcher=slurm", "cluster=example_gpu",
                 f"sweep_dir={tmp_path / 'c'}", "--dry-run", timeout=180)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^  (\S+)\s+submit", out.stdout, flags=re.M)
    assert len(listed) == 18 and all("train.seed=" in n for n in listed)
    # 18 jobs x 4.2 GPU-hours (hours_per_job, for the default views) x global_local's pixels over theirs:
    # (2 x 32^2 + 2 x 16^2) / (2 x 32^2 + 2 x 16^2 + 32^2) = 3 GPU-hours a job
    assert f"= {round(18 * 4.2 * 2560 / 3584, 3):g} GPU-hours" in out.stdout


def test_random_init_backbone_does_not_depend_on_the_method():
    """Why one reference job serves every method and predictor of a grid: same seed, same backbone weights."""
    import torch

    from mtssl.config import compose_config, resolve_config
    from mtssl.model.siamese import build_model

    states = []
    for method, predictor in (("byol", "separate"), ("simsiam", "shared"), ("mocov3", "separate")):
        cfg = resolve_config(compose_config([f"method={method}", f"predictor={predictor}", "backbone=resnet18",
                                             "method.projector.hidden_dims=[64]", "method.predictor.hidden_dims=[64]"]))
        torch.manual_seed(cfg.train.seed)  # as the Trainer does
        model = build_model(cfg, ["global", "local"], False, method != "simsiam")
        states.append(model.online.backbone.state_dict())
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
