"""What a new user tripped over (issue 29), one case per item: silent bad data, lost or misplaced work, tracebacks,
a hang, a wrong estimate. Each case runs at tiny sizes (an ImageFolder of 8-16 random 32 px JPEGs per class, one
or two sweep jobs that are planned, never trained) and failed before its fix. Items 2, 3, 8 and 9 (the
re-evaluation, ``python -m mtssl.eval``) are in tests/test_new_user_catalogue_eval.py.

One case starts ``python -m mtssl.run`` as a user's shell would (``--help``, item 14: 3 to 5 s, importing torch);
the SIGHUP case (item 5) starts a plain Python process that imports only the signal module of mtssl.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from mtssl.config import ConfigError, available, compose_config
from mtssl.config.validate import check_out_dir, validate_config
from tests.support.data import REPO, make_image_folder
from tests.support.jobs import SMALL_HEADS, TINY_RESNET, job_config

# A job that validates against a tiny folder (2 classes x 8 images) and builds its trainer in about a second.
TINY_JOB = ["data=cifar10", "data.download=false", "data.subset=null", "data.num_workers=0", "train.device=cpu",
            "train.batch_size=8", "train.epochs=3", "backbone=resnet18", *TINY_RESNET,
            "eval.knn_k=[3]", *SMALL_HEADS]  # a k the smallest bank here (8 images) holds


def checkout_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH (whichever copy of mtssl is installed)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def folder_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# 1. Bad data trained on silently


def _val_class_not_in_train(root: Path) -> Path:
    make_image_folder(root, classes=2, per_class=8)
    make_image_folder(root / "extra", classes=1, per_class=2, splits=("val",))
    (root / "extra" / "val" / "class_0").rename(root / "val" / "class_9")
    return root / "val"


def _empty_class_folder(root: Path) -> Path:
    make_image_folder(root, classes=3, per_class=8)
    empty = root / "train" / "class_1"
    for image in empty.iterdir():
        image.unlink()
    return empty


@pytest.mark.parametrize("build, expected", [
    (_val_class_not_in_train, r"the train and val splits must hold the same classes: .*val has class folder\(s\) "
                              r"\['class_9'\] that .*train lacks"),
    (_empty_class_folder, r"class folder .*train/class_1 holds no images \(files ending in \.jpg"),
], ids=["val_class_not_in_train", "empty_class_folder"])
def test_item01_val_class_not_in_train(tmp_path, build, expected):
    """Refused by validate_config, which python -m mtssl.run, sweeps/launch.py and python -m mtssl.eval all call
    before anything trains, naming the folder."""
    root = tmp_path / "data"
    named = build(root)
    with pytest.raises(ConfigError, match=expected) as refused:
        validate_config(job_config(f"data.root={root}", *TINY_JOB))
    assert str(named) in str(refused.value) and str(refused.value).startswith("data.root:")


# ---------------------------------------------------------------------------------------------------------------
# 4. An out_dir that is no folder of the job's own


@pytest.mark.parametrize("out_dir, expected", [
    ("", "is empty, so the job would write into the current folder"),
    ("  ", "is empty, so the job would write into the current folder"),
    (".", "is the current folder"),
    ("..", "is a parent of the current folder"),
], ids=["empty", "blank", "dot", "parent"])
def test_item04_empty_out_dir_is_refused(tmp_path, monkeypatch, out_dir, expected):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match=re.escape(expected)) as refused:
        check_out_dir(out_dir)
    message = str(refused.value)
    assert message.startswith("out_dir:") and re.search(r"out_dir=(\.\./)?runs/demo$", message), message
    assert os.listdir(work) == []
    assert compose_config(["out_dir=''"]).out_dir == ""  # what `out_dir=''` on the command line gives
    check_out_dir("runs/demo")  # a folder of its own, relative to the current one: accepted


def test_item04_relative_out_dir_in_a_deleted_folder_is_refused(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # a shell still sitting in a folder that was removed
    with pytest.raises(ConfigError, match=r"out_dir: 'runs/demo' is relative to the current folder, which no "
                                          r"longer exists; give an absolute path"):
        check_out_dir("runs/demo")
    check_out_dir(tmp_path / "runs" / "demo")  # an absolute one still works


# ---------------------------------------------------------------------------------------------------------------
# 5. SIGHUP while the stop checkpoint is written

SIGHUP_AFTER_CTRL_C = textwrap.dedent("""
    import os, signal, time
    from mtssl.distributed.preemption import StopRequest, ignore_interrupts

    stop = StopRequest()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the job stops at its next step boundary
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes while the stop checkpoint is written
    time.sleep(0.05)
    print("main:", stop.requested, [signal.Signals(s).name for s in stop.received], flush=True)
    stop.restore()
    ignore_interrupts(0)  # a DataLoader worker: the terminal sends both to every process of the job
    for signum in (signal.SIGINT, signal.SIGHUP):
        os.kill(os.getpid(), signum)
    time.sleep(0.05)
    print("worker: alive", flush=True)
""")


def test_item05_sighup_counts_as_a_stop_request():
    proc = subprocess.run([sys.executable, "-c", SIGHUP_AFTER_CTRL_C], capture_output=True, text=True, timeout=60,
                          env=checkout_env(), cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode} (-1: killed by SIGHUP): {proc.stderr[-2000:]}"
    assert "main: True ['SIGINT', 'SIGHUP']" in proc.stdout
    assert "worker: alive" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# 6. A refused run writes nothing


@pytest.mark.parametrize("problem, expected", [
    ("bad_data", "the train and val splits must hold the same classes"),
    ("refused_by_the_trainer", "train.sync_bn: synchronised BatchNorm needs CUDA"),
])
def test_item06_refused_run_writes_nothing(tmp_path, single_process, restore_logging, capsys, problem, expected):
    from mtssl.run import EXIT_BAD_CONFIG, run_job

    root = tmp_path / "data"
    overrides = []
    if problem == "bad_data":
        _val_class_not_in_train(root)
    else:
        make_image_folder(root, classes=2, per_class=8)
        overrides = ["train.sync_bn=true"]  # passes validate_config; the trainer refuses it on CPU
    out = tmp_path / "run"
    code = run_job(compose_config([f"data.root={root}", f"out_dir={out}", *TINY_JOB, *overrides]))
    assert code == EXIT_BAD_CONFIG
    assert expected in capsys.readouterr().out
    assert folder_files(out) == [] and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Sweeps, launched in this process: the launcher's config composed from sweeps/conf, with a one- or two-job
# ablation of tiny jobs over a tiny folder (planned and validated, never trained).


@pytest.fixture
def sweep_data(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", classes=2, per_class=16)  # 32 training images


def sweep_config(sweep_dir: Path, data_root: Path, *overrides: str, axes=None, job_overrides=(), hours: float = 1.2):
    """The launcher's config as ``python sweeps/launch.py`` composes it, with a tiny ablation and budget."""
    from hydra import compose, initialize_config_dir

    import sweeps.launch  # noqa: F401 - registers the launcher schemas and cluster profiles

    with initialize_config_dir(config_dir=str(REPO / "sweeps" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep_dir={sweep_dir}", "tables.plots=false", "poll_s=0.1", *overrides])
    with open_dict(cfg):
        cfg.ablation = OmegaConf.create({"name": "pair", "fixed": [*TINY_JOB, f"data.root={data_root}"],
                                         "axes": axes or {"predictor": ["separate"]}, "seeds": [0]})
        cfg.budget = OmegaConf.create({"name": "tiny", "regime": "official", "random_init_reference": False,
                                       "resources": {"ranks_per_job": 1, "gpus": False,
                                                     "hours_per_job": {"default": hours}}})
        cfg.job_overrides = list(job_overrides)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# 7. launcher=slurm without SLURM


def test_item07_slurm_launcher_without_slurm_is_refused_before_writing(tmp_path, sweep_data, monkeypatch, capsys):
    from sweeps.launch import launch

    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch, srun or sacct here
    sweep_dir = tmp_path / "sweep"
    assert launch(sweep_config(sweep_dir, sweep_data, "launcher=slurm", "cluster=local")) == 2
    err = capsys.readouterr().err
    assert "launcher=slurm: this machine has no SLURM (sbatch, srun, sacct not found on PATH)" in err
    assert "launcher=local" in err and "--dry-run" in err and "Nothing was submitted." in err
    assert not sweep_dir.exists()  # no sweep.json
    # Planning a SLURM sweep stays possible anywhere.
    assert launch(sweep_config(sweep_dir, sweep_data, "launcher=slurm", "cluster=local", "dry_run=true")) == 0


# ---------------------------------------------------------------------------------------------------------------
# 10. A value Hydra's lexer cannot read


@pytest.mark.parametrize("typed, intended, problem", [
    (["{d}/runs/café"], "{d}/runs/café", "Hydra cannot read the value '{d}/runs/café' unquoted (token recognition "
                                         "error at: 'é')"),
    (["{d}/my runs (2)"], "{d}/my runs (2)", "Hydra cannot read the value '{d}/my runs (2)' unquoted"),
    (["{d}/my", "runs"], "{d}/my runs", "'runs' is not a key=value override: if it is the rest of out_dir's value "
                                        "(the shell splits an unquoted value at its spaces)"),
], ids=["accent", "space_and_parentheses", "space_split_by_the_shell"])
def test_item10_out_dir_with_a_space_or_an_accent_shows_the_quoting(tmp_path, monkeypatch, capsys, typed, intended,
                                                                     problem):
    """``python -m mtssl.run``'s entry point, in this process: the refusal comes before Hydra parses anything."""
    import shlex

    from mtssl.run import main

    typed, intended, problem = ([t.format(d=tmp_path) for t in typed], intended.format(d=tmp_path),
                                problem.format(d=tmp_path))
    argv = ["mtssl.run", f"out_dir={typed[0]}", *typed[1:], "train.epochs=0"]
    monkeypatch.setattr(sys, "argv", argv)  # what Hydra would read
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert problem in printed.err, printed.err
    quoted = f"\"out_dir='{intended}'\""  # single quotes for Hydra inside double quotes for the shell
    assert f": {quoted} (docs/configuration.md, \"Quoting values\")" in printed.err
    assert not Path(intended).exists() and not Path(typed[0]).exists()
    # What the message shows is what the shell hands Hydra once typed: it composes to the intended path.
    [word] = shlex.split(quoted)
    assert compose_config([word]).out_dir == intended


# ---------------------------------------------------------------------------------------------------------------
# 11. launcher.max_parallel=0 hung


@pytest.mark.parametrize("value", [0, -2])
def test_item11_max_parallel_below_one_is_refused(tmp_path, sweep_data, capsys, value):
    from sweeps.launch import launch

    sweep_dir = tmp_path / "sweep"
    # A dry run is checked too (the real launch printed "1 job(s) to submit" and then waited forever).
    assert launch(sweep_config(sweep_dir, sweep_data, f"launcher.max_parallel={value}", "dry_run=true")) == 2
    err = capsys.readouterr().err
    assert f"launcher.max_parallel: {value} jobs at once would never start one" in err
    assert "launcher.max_parallel=1" in err and "Nothing was submitted." in err
    assert not sweep_dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# 12. A running job got a second copy


def test_item12_running_job_is_listed_skipped_and_never_copied(tmp_path, sweep_data, single_process,
                                                              restore_logging, capsys):
    from mtssl.job_folder import read_progress, update_progress
    from mtssl.run import EXIT_BAD_CONFIG, run_job
    from sweeps.launch import Resources, launch, plan_sweep

    sweep_dir = tmp_path / "sweep"
    planned = plan_sweep(sweep_config(sweep_dir, sweep_data), sweep_dir, Resources(1, False, 1))[0]
    job = planned.out_dir
    job.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the job's running rank 0
    try:
        # What a job started by hand (or by another launch) has written by now: its owner, then its config.
        started = int(Path(f"/proc/{owner.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        update_progress(job, starts=1, owner={"host": socket.gethostname(), "pid": owner.pid, "pid_start": started})
        (job / "config.yaml").write_text(OmegaConf.to_yaml(planned.config))
        before = folder_files(job), read_progress(job)

        assert launch(sweep_config(sweep_dir, sweep_data, "dry_run=true")) == 0
        out = capsys.readouterr().out
        assert re.search(rf"predictor=separate\s+running\s+{re.escape(str(job))}", out), out
        assert "resume" not in out

        assert launch(sweep_config(sweep_dir, sweep_data, "dry_run=true", job_overrides=["train.epochs=2"])) == 2
        err = capsys.readouterr().err
        assert (f"predictor=separate: a running job (pid {owner.pid} on host {socket.gethostname()}): "
                f"train.epochs: 3 → 2") in err
        assert "Nothing was submitted." in err

        assert launch(sweep_config(sweep_dir, sweep_data)) == 1  # the real relaunch: the job did not complete here
        out = capsys.readouterr().out
        assert f"predictor=separate: already running (pid {owner.pid}" in out
        assert "0 job(s) to submit, 1 already queued or running, 0 finished" in out
        assert not (sweep_dir / ".submitit").exists()  # nothing submitted
        from sweeps.status import sweep_rows

        assert [row["state"] for row in sweep_rows(sweep_dir)] == ["running"]  # and the status table says so

        # A copy started anyway (by hand, by a launcher that queued it earlier) refuses to run beside it.
        assert run_job(compose_config(planned.overrides)) == EXIT_BAD_CONFIG
        assert f"{job} is in use by a running job (pid {owner.pid} on host" in capsys.readouterr().out
        assert (folder_files(job), read_progress(job)) == before
    finally:
        owner.kill()
        owner.wait()
    # Once the owner is gone, the job is an unfinished one again: resumed by the next launch.
    assert launch(sweep_config(sweep_dir, sweep_data, "dry_run=true")) == 0
    assert re.search(r"predictor=separate\s+resume", capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------------
# 13. The dry run's estimate ignored the jobs' own size


def test_item13_estimate_follows_the_jobs_epochs_and_subset(tmp_path, sweep_data, capsys):
    from sweeps.launch import launch

    axes = {"predictor": ["separate", "shared"]}
    sweep_dir = tmp_path / "sweep"
    assert launch(sweep_config(sweep_dir, sweep_data, "dry_run=true", axes=axes)) == 0
    assert "about 2.4 hours of wall time for the 2 job(s)" in capsys.readouterr().out  # 2 x 1.2 h, as budgeted
    # train.epochs 3 -> 1 and 32 -> 8 training images: each job is 1 x 8 / (3 x 32) of the budget's.
    assert launch(sweep_config(sweep_dir, sweep_data, "dry_run=true", axes=axes,
                               job_overrides=["train.epochs=1", "data.subset=8"])) == 0
    expected = round(2 * 1.2 * (1 * 8) / (3 * 32), 3)
    out = capsys.readouterr().out
    assert f"about {expected:g} hours of wall time for the 2 job(s)" in out, out
    assert "and its epochs x training images over the budget's" in out


def test_item13_estimate_follows_the_jobs_views_and_counts_evaluation_only_jobs_apart(tmp_path, sweep_data, capsys):
    """hours_per_job is for the default views (2 global 32 px + 2 local 16 px + 1 cutout 32 px = 3,584 pixels a
    sample); a job with fewer views costs its share, an evaluation-only job budget.resources.eval_only_hours."""
    from sweeps.launch import launch

    cfg = sweep_config(tmp_path / "sweep", sweep_data, "dry_run=true", axes={"views": ["global", "global_local"]})
    with open_dict(cfg):
        cfg.budget.random_init_reference = True
        cfg.budget.resources.eval_only_hours = 0.05
    assert launch(cfg) == 0
    expected = round(1.2 * (2 * 32**2) / 3584 + 1.2 * (2 * 32**2 + 2 * 16**2) / 3584 + 0.05, 3)  # 0.686 + 0.857 + ref
    out = capsys.readouterr().out
    assert f"about {expected:g} hours of wall time for the 3 job(s)" in out, out
    assert "over theirs" in out and "eval_only_hours" in out


# ---------------------------------------------------------------------------------------------------------------
# 14. python -m mtssl.run --help


def test_item14_run_help_is_short_and_points_the_way(tmp_path):
    """A real ``python -m mtssl.run --help`` (Hydra prints the help and exits; in this process it would keep Hydra's
    global state): 3 to 5 s, mostly importing torch, more on a busy machine."""
    proc = subprocess.run([sys.executable, "-m", "mtssl.run", "--help"], capture_output=True, text=True, timeout=120,
                          env=checkout_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert len(text.splitlines()) <= 50, f"{len(text.splitlines())} lines"
    for group in ("method", "views", "predictor", "backbone", "data", "regime"):
        assert f"{group}: {', '.join(available(group))}" in text, group  # each group with its presets
    assert "--show-recipe" in text and "--cfg job" in text
    assert "docs/configuration.md" in text and "README.md" in text
    assert "augmented_lr" not in text and "linear_lrs" not in text  # not the whole config (--cfg job prints it)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 15. The CPU-only install


def test_item15_cpu_only_install_is_documented():
    readme = (REPO / "README.md").read_text()
    pins = re.search(r"pip install (torch==\S+) (torchvision==\S+) &&", readme)
    assert pins, "the quick start's install line"
    assert (f"pip install {pins.group(1)} {pins.group(2)} --index-url https://download.pytorch.org/whl/cpu"
            in readme)  # the same versions, CPU builds


# ---------------------------------------------------------------------------------------------------------------
# 16. An oversized data.subset used the whole folder silently


def test_item16_subset_larger_than_the_folder_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=30)  # 60 training images
    with pytest.raises(ConfigError) as refused:
        validate_config(job_config(f"data.root={root}", *TINY_JOB, "data.subset=1000"))
    message = str(refused.value)
    assert message.startswith("data.subset: 1000 training images were asked for")
    assert f"{root / 'train'} holds 60" in message
    assert "data.subset=60 or lower" in message and "data.subset=null" in message
    validate_config(job_config(f"data.root={root}", *TINY_JOB, "data.subset=60"))  # all of them: accepted
