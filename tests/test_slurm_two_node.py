"""Multi-node jobs on the local two-node SLURM cluster (``sudo slurm/start_local_cluster.sh --nodes 2``).

Its nodes node1 and node2 are network namespaces of this machine, each with its own host name, hosts file,
address and slurmd, joined by point-to-point links (docs/multi_node.md). Each sweep job here runs as 2 nodes x
1 rank (FSDP2 over gloo between the namespaces), checkpointing into the shared folder, and is compared with the
same job run as 2 ranks on one node: the weights must be equal bitwise (same thread count, 1 per rank).

* a sweep job across both nodes: each rank sends its host collectives through its own link to the other node
  (the launcher's GLOO_SOCKET_IFNAME), and ends with the one-node weights;
* preemption: the job is preempted by a high-priority job on node2, requeued, comes back with its ranks on the
  nodes in the other order (the test reverses the task placement of the requeued run) and ends with the same
  weights;
* a node that dies (its links go down, its slurmd and job processes are killed): the surviving rank fails
  after the collective timeout, SLURM records NODE_FAIL and requeues the job, no results.json claims completion;
  once the node is back the requeued job resumes from the last checkpoint and ends with the same weights.

Every job is the predictor_sharing ablation's BYOL job with separate predictors, at a tiny size (16 synthetic
images, 6 steps). The tests need root (namespaces) and the running cluster; they skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.data import make_image_folder
from tests.support.jobs import TINY_RESNET
from tests.support.slurm import freeze_until_usr2, proc_status, rank_pids, run_slurm_command, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm_two_node")]  # its own cluster

REPO = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, str(REPO / "sweeps" / "launch.py")]
START = REPO / "slurm" / "start_local_cluster.sh"
STATE_DIR = Path(os.environ.get("MTSSL_SLURM_TWO_NODE_STATE", "/tmp/mtssl-slurm2"))
NODES = ["node1", "node2"]
JOB = "method=byol,predictor=separate"
STEPS = 2 * 8 // 8 * 3  # 2 classes x 8 images, global batch 8, 3 epochs
COLLECTIVE_TIMEOUT_S = 15  # train.collective_timeout_s of the node-death test's job (the cluster: SlurmdTimeout=30)
LAUNCH_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------------------------
# The cluster, the data and the sweep config


def namespaces_problem() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root; run the tests as root"
    try:
        probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"network namespaces cannot be made here (unshare: {error})"
    if probe.returncode != 0:
        return f"network namespaces cannot be made here (unshare --net --uts --mount: {probe.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def two_node_cluster():
    """The running two-node cluster, as SLURM_CONF for this module; skips with the reason when there is none."""
    problem = namespaces_problem()
    if problem:
        pytest.skip(problem)
    conf = STATE_DIR / "etc" / "slurm.conf"
    start = f"sudo slurm/start_local_cluster.sh --nodes 2 (state {STATE_DIR}, MTSSL_SLURM_TWO_NODE_STATE)"
    if not conf.is_file():
        pytest.skip(f"the two-node cluster is not started; start it with {start}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURM_CONF", str(conf))
        states = run_slurm_command("sinfo", "--noheader", "--Node", "--format=%N %T")
        ready = {line.split()[0] for line in states.stdout.splitlines()
                 if line.split()[1:] and line.split()[1] in ("idle", "mixed", "allocated", "completing")}
        if states.returncode != 0 or not set(NODES) <= ready:
            answer = states.stdout.strip() or states.stderr.strip()
            pytest.skip(f"the two-node cluster does not answer with nodes {NODES} ready ({answer}); restart it with "
                        f"{start}")
        yield conf


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """A --config-dir with the tiny budget the jobs run at (2 ranks a job); the tiny job keys are TINY_JOB."""
    root = tmp_path_factory.mktemp("two_node")
    make_image_folder(root / "data", classes=2, per_class=8)
    budget = {"name": "tiny_2node", "regime": "official",
              "resources": {"ranks_per_job": 2, "gpus": False, "hours_per_job": {"default": 0.01}}}
    (root / "conf" / "budget").mkdir(parents=True)
    (root / "conf" / "budget" / "tiny_2node.yaml").write_text(yaml.safe_dump(budget))
    return root / "conf"


def tiny_job(config_dir: Path) -> list[str]:
    """The job keys of every job (16 images of 32 px, 6 steps, checkpoints every 2), bare on the command line."""
    data = config_dir.parent / "data"  # written by the config_dir fixture
    return [
        "data=cifar10", f"data.root={data}", "data.download=false", "data.subset=null", "data.num_workers=0",
        "train.device=cpu", "train.batch_size=8", "train.epochs=3", "train.log_every_steps=1",
        "train.checkpoint_every_steps=2",
        "method.projector.hidden_dims=[32]", "method.predictor.hidden_dims=[32]", *TINY_RESNET,
        "monitor.rankme=false", "eval.linear_epochs=1", "eval.knn_k=[3]", "eval.batch_size=16",
        "eval.linear_lrs=[0.1]",
    ]


def cluster_settings() -> dict[str, str]:
    """The settings the cluster was started with (its state dir's start.env, written by the start script)."""
    lines = (STATE_DIR / "start.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def sweep_args(config_dir: Path, sweep_dir: Path, *extra: str, name: str | None = None) -> list[str]:
    """The issue's command: the predictor_sharing ablation on the two-node cluster profile, one of its jobs."""
    return ["--config-dir", str(config_dir), "ablation=predictor_sharing", "budget=tiny_2node", "launcher=slurm",
            "cluster=local_2node", "ablation.axes.method=[byol]", "ablation.axes.predictor=[separate]",
            f"launcher.name={name or job_name()}", f"sweep_dir={sweep_dir}", "poll_s=1", "tables.plots=false", *tiny_job(config_dir),
            *extra]


def job_name() -> str:
    """A SLURM job name unique to one launch (to cancel what a failed test leaves queued)."""
    return f"mtssl-2node-{uuid.uuid4().hex[:8]}"


def cancel(name: str) -> None:
    run_slurm_command("scancel", f"--name={name}")


def start_launch(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})


@contextlib.contextmanager
def launched(args: list[str], name: str, **env: str):
    """A launcher running ``args``; when the block fails, it is killed and its SLURM job cancelled at once."""
    launcher = start_launch(args, **env)
    try:
        yield launcher
    except BaseException:
        launcher.kill()
        launcher.communicate()
        cancel(name)
        raise


def finish(launcher: subprocess.Popen, name: str | None = None, timeout_s: float = LAUNCH_TIMEOUT_S) -> str:
    """The launcher's output once it ended with status 0; on the way out, its SLURM job (``name``) is cancelled:
    nothing, unless the test failed with the job still queued or running."""
    try:
        out, _ = launcher.communicate(timeout=timeout_s)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
        if name is not None:
            cancel(name)
    assert launcher.returncode == 0, out
    return out


def results(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / JOB / "results.json").read_text())


def submission(sweep_dir: Path) -> dict:
    [record] = json.loads((sweep_dir / ".submitit" / "submissions.json").read_text())["jobs"][JOB]
    return record


def accounted(job_id: str, field: str = "State") -> list[str]:
    """One value of ``field`` per run of the job that sacct recorded (a requeued job has several), oldest first."""
    out = run_slurm_command("sacct", "--jobs", job_id, "--duplicates", "--allocations", "--noheader", "--parsable2",
                            f"--format={field}")
    assert out.returncode == 0, out.stderr
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def rank_hosts(record: dict) -> list[dict[int, str]]:
    """Per start of the job, the host of each global rank, from submitit's task logs."""
    starts: dict[int, list[str]] = {}
    for rank in (0, 1):
        log = Path(record["stdout"]).with_name(Path(record["stdout"]).name.replace("_0_log.out", f"_{rank}_log.out"))
        starts[rank] = re.findall(r"JobEnvironment\(.*hostname=(\w+),.*global_rank=" + str(rank), log.read_text())
    runs = min(len(hosts) for hosts in starts.values())
    return [{rank: starts[rank][i] for rank in starts} for i in range(runs)]


def task_stderr(record: dict, rank: int) -> str:
    return Path(record["stderr"].replace("_0_log.err", f"_{rank}_log.err")).read_text()


@pytest.fixture(scope="module")
def reference(two_node_cluster, config_dir, tmp_path_factory):
    """The job run across both nodes, and the same job as 2 ranks on one node (this machine, submitit's local
    executor, 1 thread per rank as on the cluster), launched side by side."""
    root = tmp_path_factory.mktemp("reference")
    name = job_name()
    across = start_launch(sweep_args(config_dir, root / "two_nodes", name=name))
    one_node = start_launch(sweep_args(config_dir, root / "one_node", "launcher=local"), OMP_NUM_THREADS="1")
    try:
        across_out = finish(across, name)
    finally:
        one_node_out = finish(one_node)
    return root / "two_nodes", across_out, root / "one_node", one_node_out


# ---------------------------------------------------------------------------------------------------------------
# 1. The cluster


def test_nodes_have_their_own_names_and_resolve_each_other(two_node_cluster, tmp_path):
    script = tmp_path / "probe.sh"
    script.write_text('#!/bin/sh\necho "$SLURM_PROCID $(hostname) $(getent hosts node1 node2 | tr -s " \\n" " ")'
                      ' $(ip route show default | wc -l)"\n')
    script.chmod(0o755)
    out = run_slurm_command("srun", "--nodes=2", "--ntasks-per-node=1", f"--chdir={tmp_path}", str(script))
    assert out.returncode == 0, out.stderr
    lines = sorted(" ".join(line.split()) for line in out.stdout.splitlines())
    # Each node's own name is a loopback address there (as in Debian's /etc/hosts); the other's is its address.
    # No default route: a packet to any address but the cluster's own goes nowhere.
    net = cluster_settings()["MTSSL_SLURM_NET"]
    assert lines == [f"0 node1 127.0.1.1 node1 {net}.12 node2 0", f"1 node2 {net}.11 node1 127.0.1.1 node2 0"], lines


# ---------------------------------------------------------------------------------------------------------------
# 2. A sweep job across both nodes


def test_sweep_job_across_two_nodes_equals_two_ranks_on_one_node(reference):
    two_nodes, out, one_node, _ = reference
    across, local = results(two_nodes), results(one_node)
    assert across["status"] == local["status"] == "completed" and across["steps"] == local["steps"] == STEPS
    assert across["world_size"] == local["world_size"] == 2
    assert across["weights_sha256"] == local["weights_sha256"]
    assert across["final_losses"] == local["final_losses"]
    record = submission(two_nodes)
    assert rank_hosts(record) == [{0: "node1", 1: "node2"}]
    assert accounted(record["job_id"]) == ["COMPLETED"] and accounted(record["job_id"], "NodeList") == ["node[1-2]"]
    # Each rank's host collectives go through its own link to the other node, which the launcher found from the
    # route: interface names differ between the nodes.
    assert "GLOO_SOCKET_IFNAME=to-node2, the route from node1 to node2" in task_stderr(record, 0)
    assert "GLOO_SOCKET_IFNAME=to-node1, the route from node2 to node1" in task_stderr(record, 1)
    # Checkpoints in the shared folder hold both ranks' files, written from the two nodes.
    final = two_nodes / JOB / "checkpoints" / f"step_{STEPS:08d}"
    assert {p.name for p in final.glob("*_rank*.pt")} == {"buffers_rank0.pt", "buffers_rank1.pt", "rng_rank0.pt",
                                                          "rng_rank1.pt"}


# ---------------------------------------------------------------------------------------------------------------
# 3. Preemption across nodes


def reached_step(sweep_dir: Path, step: int) -> bool:
    log = sweep_dir / JOB / "train.log"
    text = log.read_text() if log.exists() else ""
    return any(int(s) >= step for s in re.findall(r"step (\d+)/\d+ epoch", text))


def test_preempted_job_comes_back_on_the_nodes_in_the_other_order_with_the_same_weights(reference, config_dir,
                                                                                        tmp_path):
    _, _, one_node, _ = reference
    sweep_dir = tmp_path / "preempted"
    # srun places the ranks by this host file: rank 0 on node1 first, then, for the requeued run, on node2.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1\nnode2\n")
    name = job_name()
    with launched(sweep_args(config_dir, sweep_dir, 'launcher.srun_args=["--distribution=arbitrary"]', name=name),
                  name, SLURM_HOSTFILE=str(hostfile)) as launcher:
        # Freeze the ranks mid-training, so that SLURM's signal surely lands before the end.
        wait_for(lambda: reached_step(sweep_dir, 2), "training to reach step 2", 240, launcher)
        pids = rank_pids(sweep_dir)
        assert len(pids) == 2, pids

        high_job: list[str] = []

        def preempt() -> None:
            hostfile.write_text("node2\nnode1\n")
            # A high-partition job needing both CPUs of node2 can only start by preempting the sweep job.
            high = run_slurm_command("sbatch", "--parsable", "--partition=high", "--nodelist=node2",
                                     "--cpus-per-task=2", f"--output={tmp_path / 'high.out'}", "--wrap", "sleep 2")
            assert high.returncode == 0, high.stderr
            high_job.append(high.stdout.strip().split(";")[0])

        freeze_until_usr2(pids, launcher, preempt)
    finish(launcher, name)
    record = submission(sweep_dir)
    assert rank_hosts(record) == [{0: "node1", 1: "node2"}, {0: "node2", 1: "node1"}]
    log = (sweep_dir / JOB / "train.log").read_text()
    [stop] = [int(s) for s in re.findall(r"stopped on SIGUSR2 at step (\d+)", log)]
    assert 2 <= stop < STEPS and f"resumed from {sweep_dir / JOB}/checkpoints/step_{stop:08d} (step {stop})" in log
    assert "this job is preempted" in Path(record["stdout"]).read_text()
    states = accounted(record["job_id"])
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, states
    assert accounted(high_job[0])[-1] == "COMPLETED"
    result, uninterrupted = results(sweep_dir), results(one_node)
    assert result["status"] == "completed" and result["steps"] == STEPS
    assert result["weights_sha256"] == uninterrupted["weights_sha256"]
    assert result["final_losses"] == uninterrupted["final_losses"]


# ---------------------------------------------------------------------------------------------------------------
# 4. A node that dies


def node_namespace(node: str) -> str:
    """The network namespace of a node, as the start script recorded it (``netns <name>`` in <state>/network)."""
    records = [line.split()[1] for line in (STATE_DIR / "network").read_text().splitlines()
               if line.startswith("netns ") and line.endswith(f"-{node}")]
    assert len(records) == 1, records
    return records[0]


def in_namespace(pid: int, namespace: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino
    except OSError:
        return False


def kill_node(node: str) -> list[int]:
    """The node dies: its links go down first, so that no connection of its processes is closed in order (no FIN
    reaches the other node), then its slurmd and job processes are killed. Returns the killed pids."""
    namespace = node_namespace(node)
    links = subprocess.run(["ip", "-n", namespace, "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    for link in re.findall(r"^\d+: ([^:@]+)", links, re.M):
        if link != "lo":
            subprocess.run(["ip", "-n", namespace, "link", "set", "dev", link, "down"], check=True)
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                                           check=True).stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


@contextlib.contextmanager
def restored_nodes():
    """On the way out, bring back what is missing of the cluster (a dead node's links and slurmd), with the
    settings it was started with."""
    try:
        yield
    finally:
        out = subprocess.run(["bash", str(START), "--nodes", "2"], capture_output=True, text=True, timeout=180,
                             env={**os.environ, **cluster_settings()})
        assert out.returncode == 0, out.stdout + out.stderr


def wait_until(condition, what: str, timeout_s: float) -> float:
    """Wait for condition(); return the time.monotonic() at which it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic()


def test_a_dead_node_fails_the_surviving_rank_after_the_collective_timeout_and_the_rerun_resumes(
        reference, config_dir, tmp_path):
    _, _, one_node, _ = reference
    sweep_dir = tmp_path / "node_death"
    job_dir = sweep_dir / JOB
    name = job_name()
    with launched(sweep_args(config_dir, sweep_dir, f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", name=name),
                  name) as launcher, restored_nodes():
        wait_for(lambda: (job_dir / "checkpoints" / "step_00000002").is_dir() and reached_step(sweep_dir, 3),
                 "a checkpoint and a step after it", 240, launcher)
        pids = rank_pids(sweep_dir)
        [survivor] = [pid for pid in pids if in_namespace(pid, node_namespace("node1"))]
        killed = kill_node("node2")
        killed_at = time.monotonic()
        assert set(pids) - {survivor} <= set(killed)
        failed_at = wait_until(lambda: proc_status(survivor) is None, "the surviving rank to end",
                               COLLECTIVE_TIMEOUT_S + 60)
        failed_after_s = failed_at - killed_at
        # No rank claims completion: rank 0 (the survivor, on node1) recorded the failure.
        result = results(sweep_dir)
        assert result["status"] == "failed" and "Timed out" in result["error"], result
        assert "job failed" in (job_dir / "train.log").read_text()
        job_id = submission(sweep_dir)["job_id"]
        # SLURM sets the unresponsive node DOWN and requeues the job (JobRequeue=1).
        wait_until(lambda: "NODE_FAIL" in accounted(job_id), "sacct to record NODE_FAIL", 90)
        node_state = run_slurm_command("sinfo", "--noheader", "--Node", "--nodes=node2", "--format=%T").stdout.split()
        print(f"the surviving rank ended {failed_after_s:.1f} s after node2 died (collective timeout "
              f"{COLLECTIVE_TIMEOUT_S} s); sacct: {accounted(job_id)}; node2: {node_state}")
        assert failed_after_s <= COLLECTIVE_TIMEOUT_S + 15, failed_after_s
        assert results(sweep_dir)["status"] == "failed"  # the requeued run waits for node2: nothing ran
    finish(launcher, name)  # node2 is back (ReturnToService=2): the requeued job ran again
    log = (job_dir / "train.log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+/checkpoints/step_(\d+)", log)]
    assert resumed and 2 <= resumed[-1] < STEPS, log
    states = accounted(job_id)
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED", states
    result, uninterrupted = results(sweep_dir), results(one_node)
    assert result["status"] == "completed" and result["steps"] == STEPS
    assert result["weights_sha256"] == uninterrupted["weights_sha256"]
