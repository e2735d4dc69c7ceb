"""What an nccl + bf16 job needs, checked on CPU: collectives by kind, bf16 with fp32 BatchNorm,
one evaluated network on every rank, SLURM task variables, no per-step host copies, RNG resume."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mtssl.distributed import process_group
from mtssl.distributed.process_group import rendezvous_port, select_device, slurm_task_env
from tests.support.data import make_image_folder
from tests.support.jobs import GLOBAL_BATCH, TINY_RESNET, global_views
from tests.support.jobs import sharded_job_config as job_config
from tests.support.ranks import run_ranks
from tests.support.ranks import set_rank_env as set_env

PACKAGE = Path(__file__).resolve().parent.parent / "mtssl"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "reduce",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "send",
    "recv", "isend", "irecv",
}


# ---------------------------------------------------------------------------------------------- collectives
def collective_calls(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every torch.distributed collective a file calls or imports by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = node.value
            dotted = base.id if isinstance(base, ast.Name) else ast.unparse(base)
            if dotted in ("dist", "torch.distributed", "c10d"):
                found.append((node.lineno, f"{dotted}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name in COLLECTIVES]
    return found


def test_collectives_only_in_mtssl_distributed():
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "distributed":
            continue
        outside += [f"{path.relative_to(PACKAGE)}:{line} {name}" for line, name in collective_calls(path)]
    assert not outside, f"use the host_*/device_* helpers of mtssl.distributed.collectives instead: {outside}"


def test_the_collective_guard_sees_a_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nfrom torch.distributed import barrier\ndef f(t):\n    dist.all_reduce(t)\n")
    assert sorted(collective_calls(bad)) == [(2, "barrier"), (4, "dist.all_reduce")]


def _nccl_like_worker(rank, world_size, port, out):
    """Default group for CUDA tensors only (as nccl), a gloo host group beside it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cuda:gloo", rank=rank, world_size=world_size)
    process_group._HOST_GROUP = None
    from mtssl.distributed.checkpoint import CheckpointManager, ModelAndOptimizer, TrainerState
    from mtssl.distributed.collectives import host_any, host_barrier, host_broadcast_object, host_sum

    report = {"sum": host_sum([rank + 1, 10 * rank]), "any": host_any([rank == 1, False]),
              "object": host_broadcast_object({"from": rank}, src=1)}
    host_barrier()
    # What Trainer.save did before: a CPU tensor summed on the default group.
    try:
        dist.all_reduce(torch.tensor(rank + 1))
        report["default_group_cpu_tensor"] = "accepted"
    except RuntimeError as error:
        report["default_group_cpu_tensor"] = str(error)
    # The save path: the skipped-image count, barriers and DCP's coordination, then a resume.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(out / "checkpoints", keep=2, rank=rank)
    state = TrainerState(step=3, config_hash="h", world_size=world_size)
    state.skipped_images += host_sum([rank + 2])[0]
    manager.save(state, ModelAndOptimizer(model, optimizer), "config: 1\n")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    loaded = manager.load_latest(ModelAndOptimizer(model, optimizer), "h")
    report["loaded_step"] = loaded.step
    report["skipped"] = loaded.skipped_images
    report["weights_restored"] = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    torch.save(report, out / f"nccl_like{rank}.pt")
    host_barrier()
    process_group._HOST_GROUP = None
    dist.destroy_process_group()


@pytest.mark.slow
def test_host_values_and_checkpoints_work_beside_a_cuda_only_default_group(tmp_path):
    run_ranks(_nccl_like_worker, 2, tmp_path)
    reports = [torch.load(tmp_path / f"nccl_like{r}.pt") for r in range(2)]
    for report in reports:
        # the emulation is faithful: the old skipped-image sum cannot run on such a default group
        assert "No backend type associated with device type cpu" in report["default_group_cpu_tensor"]
        assert report["sum"] == [3, 10] and report["any"] == [True, False] and report["object"] == {"from": 1}
        assert report["loaded_step"] == 3 and report["skipped"] == 2 + 3 and report["weights_restored"]


# ---------------------------------------------------------------------------------------------- SLURM
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_srun_task_reads_rank_world_size_local_rank_and_first_host():
    env = slurm_task_env(SRUN)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    # every task of the job agrees on the port
    assert slurm_task_env({**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})["MASTER_PORT"] == env["MASTER_PORT"]


def test_outside_an_srun_step_slurm_variables_are_ignored():
    batch_script = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}  # sbatch's shell: one process
    assert slurm_task_env(batch_script) is None
    assert slurm_task_env({"SLURM_JOB_ID": "4242"}) is None


def test_rendezvous_ports_avoid_ephemeral_range_and_separate_array_tasks():
    ports = [rendezvous_port({"SLURM_JOB_ID": str(j)}) for j in range(2000)]
    assert all(1024 < p < 32768 for p in ports)
    array = {"SLURM_JOB_ID": "5001", "SLURM_ARRAY_JOB_ID": "5000"}
    tasks = {rendezvous_port({**array, "SLURM_ARRAY_TASK_ID": str(t)}) for t in range(20)}
    assert len(tasks) == 20
    # 12345_3 and 123453 were one port when ids were flattened to digits
    assert rendezvous_port({"SLURM_ARRAY_JOB_ID": "12345", "SLURM_ARRAY_TASK_ID": "3"}) != rendezvous_port({"SLURM_JOB_ID": "123453"})
    # the components of a heterogeneous job have their own job ids but share the leader's
    het = [rendezvous_port({"SLURM_JOB_ID": str(7000 + c), "SLURM_HET_JOB_ID": "7000"}) for c in range(3)]
    assert len(set(het)) == 1


def test_one_gpu_per_task_binding_uses_device_zero(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert select_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert chosen == [0, 2]


def test_init_distributed_takes_the_srun_layout_over_inherited_values(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(process_group, "host_group", lambda: None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for key in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # init_distributed sets them: restored afterwards
        monkeypatch.setenv(key, "unset")
    monkeypatch.setenv("RANK", "0")  # inherited from the submitting shell
    monkeypatch.setenv("WORLD_SIZE", "1")
    for key, value in SRUN.items():
        monkeypatch.setenv(key, value)
    env = process_group.init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert (seen["rank"], seen["world_size"], seen["backend"]) == (5, 8, "gloo")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) < 32768


# ---------------------------------------------------------------------------------------------- one evaluated network
def _evaluation_worker(rank, world_size, port, root, out):
    set_env(rank, world_size, port)
    torch.set_num_threads(1)
    from mtssl.distributed.fsdp import state_sha256
    from mtssl.distributed.process_group import destroy_distributed, init_distributed
    from mtssl.eval.end_of_training import evaluate_backbones
    from mtssl.train.trainer import PretrainOutcome, Trainer

    env = init_distributed("cpu")
    cfg = job_config(root, ["backbone=resnet18", *TINY_RESNET, "method=byol",
                            "eval.linear_epochs=1", "eval.knn_k=[3]", "eval.linear_lrs=[0.1]", "eval.batch_size=8"])
    trainer = Trainer(cfg, env, out / f"rank{rank}")
    g = torch.Generator().manual_seed(rank)  # each rank its own images, hence its own BN statistics
    local = GLOBAL_BATCH // world_size
    views = [torch.randn(local, 3, trainer.layout.type(t).size, trainer.layout.type(t).size, generator=g)
             for t, _ in trainer.layout.entries]
    trainer.training_step(views, 0)
    backbone = trainer.model.online.backbone
    before = {k: v.detach().clone() for k, v in backbone.named_buffers()}
    outcome = PretrainOutcome("completed", trainer.model, trainer.layout, trainer.train_samples, 1)
    fields = evaluate_backbones(cfg, env, outcome, out, None)
    after = {k: v.detach().clone() for k, v in backbone.named_buffers()}
    torch.save({"sha": fields["weights_sha256"], "knn": fields["knn"], "before": before, "after": after,
                "state_sha": state_sha256(after)}, out / f"eval{rank}.pt")
    destroy_distributed()


@pytest.mark.slow
def test_every_rank_evaluates_the_same_network(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)
    run_ranks(_evaluation_worker, 2, root, tmp_path)
    ranks = [torch.load(tmp_path / f"eval{r}.pt") for r in range(2)]
    key = "bn1.running_mean"
    assert not torch.equal(ranks[0]["before"][key], ranks[1]["before"][key])  # the ranks did train apart
    assert ranks[0]["sha"] == ranks[1]["sha"] and ranks[0]["state_sha"] == ranks[1]["state_sha"]
    assert ranks[0]["knn"] == ranks[1]["knn"]
    for name, value in ranks[0]["after"].items():  # the mean of the two ranks' statistics
        if value.is_floating_point():
            torch.testing.assert_close(value, (ranks[0]["before"][name] + ranks[1]["before"][name]) / 2, rtol=0, atol=1e-7)
    saved = torch.load(tmp_path / "backbone.pth")["state_dict"]
    assert torch.equal(saved[key], ranks[0]["after"][key])


# ---------------------------------------------------------------------------------------------- bf16
def _precision_worker(rank, world_size, port, root, out, steps):
    set_env(rank, world_size, port)
    torch.set_num_threads(1)
    from mtssl.distributed.collectives import device_mean_
    from mtssl.distributed.process_group import destroy_distributed, init_distributed
    from mtssl.train.trainer import Trainer

    env = init_distributed("cpu")
    report = {}
    for precision in ("fp32", "bf16"):
        # The tiny ResNet: bf16 on CPU computes with ATen's scalar kernels, and the dtypes asked about are the
        # same in every block.
        cfg = job_config(root, ["backbone=resnet18", *TINY_RESNET, "method=byol",
                                f"train.precision={precision}"])
        trainer = Trainer(cfg, env, out / f"{precision}{rank}")
        seen = {}

        def record(name):
            def hook(module, inputs):
                seen.setdefault(name, (inputs[0].dtype, module.weight.dtype))
            return hook

        online = trainer.model.online.backbone
        online.bn1.register_forward_pre_hook(record("bn"))
        online.conv1.register_forward_pre_hook(record("conv"))
        local = GLOBAL_BATCH // world_size
        losses = []
        for step in range(steps):
            views = [v[rank * local:(rank + 1) * local] for v in global_views(trainer, step)]
            loss = trainer.training_step(views, step).loss
            losses.append(device_mean_(loss.float().clone()).item())
        buffers = {n: b.dtype for n, b in trainer.model.named_buffers() if "running" in n}
        report[precision] = {"losses": losses, "seen": seen, "buffer_dtypes": set(buffers.values())}
    if rank == 0:
        torch.save(report, out / "precision.pt")
    destroy_distributed()


@pytest.mark.slow
def test_bf16_two_rank_job_trains_with_fp32_batchnorm_close_to_fp32(tmp_path):
    steps = 4
    root = make_image_folder(tmp_path / "data", per_class=8)
    run_ranks(_precision_worker, 2, root, tmp_path, steps)
    report = torch.load(tmp_path / "precision.pt")
    fp32, bf16 = report["fp32"], report["bf16"]
    assert all(math.isfinite(v) for v in bf16["losses"])
    assert bf16["buffer_dtypes"] == {torch.float32}  # BN running statistics
    assert bf16["seen"]["bn"] == (torch.bfloat16, torch.float32)  # bf16 activations into fp32 BN weights
    assert bf16["seen"]["conv"] == (torch.bfloat16, torch.bfloat16)  # the rest computes in bf16
    assert fp32["seen"]["conv"] == (torch.float32, torch.float32)
    assert bf16["losses"] != fp32["losses"]  # really another precision
    # bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 = 2e-3 relative, and the loss is a mean of
    # many rounded terms, whose errors partly cancel. Measured on this job (the tiny ResNet, 4 steps, ATen's AVX512
    # kernels): relative gap 8e-5 to 1.3e-3 (step 0, before any update), while the loss moves 1.5 %, 1.8 % and
    # 0.5 % from one step to the next; earlier, at full width with one block per stage: 4e-5 to 2.0e-3, and with two
    # blocks per stage on AVX2: 8e-5 to 3.1e-3. A step that trained a different network or lost an update would
    # leave the later losses further than 5e-3 apart.
    for a, b in zip(bf16["losses"], fp32["losses"]):
        assert a == pytest.approx(b, rel=5e-3)
    assert fp32["losses"][0] != fp32["losses"][-1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_bf16_steps_run_without_onednn(single_process, tmp_path, precision):
    """oneDNN's bf16 convolution is wrong on some CPUs (mtssl.distributed.fsdp.precision_kernels): a
    bf16 step on CPU computes with ATen's kernels; fp32 steps, and the code around a step, keep oneDNN."""
    from mtssl.train.trainer import Trainer

    root = make_image_folder(tmp_path / "data", per_class=4)
    trainer = Trainer(job_config(root, ["backbone=resnet18", "method=byol", f"train.precision={precision}"]), single_process, tmp_path / "out")
    seen = []
    trainer.model.online.backbone.conv1.register_forward_pre_hook(lambda module, inputs: seen.append(torch.backends.mkldnn.enabled))
    assert torch.backends.mkldnn.enabled
    views = [v[:4] for v in global_views(trainer, 0)]
    assert math.isfinite(trainer.training_step(views, 0).loss.item())
    assert len(seen) == len(views) and set(seen) == {precision == "fp32"}  # every view's forward
    assert torch.backends.mkldnn.enabled  # restored after the step


# ---------------------------------------------------------------------------------------------- host syncs, RNG
def test_lars_builds_no_tensor_from_host_values_per_step(monkeypatch):
    from mtssl.train.optim import LARS

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    groups = [dict(params=[model[0].weight, model[1].weight], trust_coefficient=0.001),
              dict(params=[model[0].bias, model[1].bias], lars_exclude=True)]
    optimizer = LARS(groups, lr=0.1, weight_decay=1e-4)

    def step():
        optimizer.zero_grad()
        model(torch.randn(3, 5)).square().sum().backward()
        optimizer.step()

    step()
    built = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real_tensor(*a, **k))
    before = model[0].weight.detach().clone()
    step()
    assert built == []  # a host list copied to the GPU is a blocking copy every step
    assert not torch.equal(before, model[0].weight)


def test_checkpoint_restores_each_ranks_generator_state(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    from mtssl.distributed.checkpoint import RANK_RNG, CheckpointManager, ModelAndOptimizer, TrainerState
    from mtssl.distributed.process_group import destroy_distributed, init_distributed

    init_distributed("cpu")
    try:
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        manager = CheckpointManager(tmp_path, keep=2)
        torch.manual_seed(123)
        path = manager.save(TrainerState(step=1, config_hash="h"), ModelAndOptimizer(model, optimizer), "")
        expected = torch.rand(4)
        torch.rand(100)  # move on
        manager.load_latest(ModelAndOptimizer(model, optimizer), "h")
        assert (path / RANK_RNG.format(rank=0)).is_file()
        assert torch.equal(torch.rand(4), expected)
    finally:
        destroy_distributed()


def test_sync_batchnorm_stays_in_its_blocks_unit_and_reads_fp32_weights_under_bf16(monkeypatch):
    """SyncBatchNorm only runs on CUDA; the sharding plan it gets is checked here."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    from torch.distributed.fsdp import FSDPModule

    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.fsdp import shard_model
    from mtssl.distributed.process_group import destroy_distributed, init_distributed
    from mtssl.model.siamese import build_model

    init_distributed("cpu")
    try:
        cfg = resolve_config(compose_config(["backbone=resnet18", "data=cifar10", "+backbone.kwargs.layers=[1,1,1,1]"]))
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg, ["global", "local"], True, True))
        shard_model(model, "bf16")
        sync = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert sync and not any(isinstance(m, FSDPModule) for m in sync)  # no unit of its own
        block = model.online.backbone.layer1[0]
        assert block._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
        block.unshard()  # the bf16 copies a forward computes with
        assert block.bn1._parameters["weight"].dtype == torch.bfloat16
        assert block.bn1.weight.dtype == block.bn1.bias.dtype == block.bn1.running_mean.dtype == torch.float32
        block.reshard()
    finally:
        destroy_distributed()


SRUN_TASK = """
import os
os.environ.update(RANK="0", WORLD_SIZE="1")  # as inherited from the submitting shell
from mtssl.distributed.collectives import host_sum
from mtssl.distributed.process_group import destroy_distributed, init_distributed
env = init_distributed("cpu")
print("task", env.rank, env.world_size, env.local_rank, host_sum([env.rank + 1])[0], flush=True)
destroy_distributed()
"""


@pytest.mark.slurm
def test_plain_srun_tasks_form_one_job(tmp_path, slurm_cluster):
    """``srun -n 2 python ...`` without submitit: two ranks of one job, not two copies of rank 0."""
    import subprocess
    import sys

    script = tmp_path / "task.py"
    script.write_text(SRUN_TASK)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    done = subprocess.run(["srun", "-p", "low", "-n", "2", "--export=ALL", sys.executable, str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    tasks = sorted(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("task "))
    assert tasks == [["0", "2", "0", "3"], ["1", "2", "1", "3"]], done.stdout + done.stderr
