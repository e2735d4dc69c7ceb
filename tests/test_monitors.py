"""Research monitors (mtssl/train/research_monitors.py): gradient cosines and norms against hand values, RankMe of a
rank-k matrix against a hand computation, the probe's per-task gradients against separate backwards of each task
loss, training bitwise unchanged with the probe on (plain and FSDP), the unstable flag, and means over probes that
survive a resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mtssl.config import compose_config, config_hash, resolve_config
from mtssl.distributed.checkpoint import TrainerState
from mtssl.distributed.fsdp import full_state_dict, state_sha256
from mtssl.distributed.process_group import destroy_distributed, init_distributed
from mtssl.loss.multitask import multitask_loss
from mtssl.train.research_monitors import TrainingMonitors, gradient_norms, pairwise_cosines, rank_unstable, rankme
from mtssl.distributed.preemption import StopRequest
from mtssl.train.trainer import Trainer
from tests.support.data import make_image_folder
from tests.support.jobs import global_views, random_views, tiny_trainer
from tests.support.jobs import TINY_STEP as TINY
from tests.support.jobs import sharded_job_config as job_config
from tests.support.ranks import run_ranks
from tests.support.ranks import set_rank_env as set_env



# ------------------------------------------------------------------------------------------------ the math

def test_cosines_of_identical_opposite_and_orthogonal_gradients_over_several_parameters():
    a = [torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([3.0, 0.5, -2.0])]
    cos = pairwise_cosines({"global": a, "local": [t.clone() for t in a], "cutout": [-t for t in a]})
    assert cos["global_local"].item() == pytest.approx(1.0, abs=1e-6)
    assert cos["global_cutout"].item() == pytest.approx(-1.0, abs=1e-6)
    assert list(cos) == ["global_local", "global_cutout", "local_cutout"]
    # Orthogonal only through the concatenation: each lives in a different parameter.
    x = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(3)]
    y = [torch.zeros(2, 2), torch.tensor([1.0, 1.0, 1.0])]
    assert pairwise_cosines({"global": x, "local": y})["global_local"].item() == 0.0
    # By hand: u = (1, 0 | 1), v = (1, 1 | 1): u.v = 2, |u| = sqrt 2, |v| = sqrt 3, cos = 2 / sqrt 6.
    u, v = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])], [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
    assert pairwise_cosines({"global": u, "local": v})["global_local"].item() == pytest.approx(2 / math.sqrt(6), rel=1e-6)
    norms = gradient_norms({"global": u, "local": v})
    assert norms["global"].item() == pytest.approx(math.sqrt(2)) and norms["local"].item() == pytest.approx(math.sqrt(3))


def test_rankme_of_a_rank_k_matrix_matches_a_hand_computation():
    torch.manual_seed(0)
    n, d, singular = 12, 6, [4.0, 2.0, 1.0, 1.0]  # rank 4 of at most 6
    u, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    s = torch.tensor(singular + [0.0] * (d - len(singular)), dtype=torch.float64)
    z = (u * s) @ v.T
    eps = 1e-7
    p = [x / sum(singular) + eps for x in singular] + [eps] * (d - len(singular))  # p_i = s_i / sum(s) + eps
    expected = math.exp(-sum(q * math.log(q) for q in p))  # about exp(1.213) = 3.36 for (1/2, 1/4, 1/8, 1/8)
    assert rankme(z).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(2 ** 1.75, rel=1e-4)  # entropy 1.75 ln 2 (the eps terms are ~1e-6)
    assert rankme(torch.ones(16, 8)).item() == pytest.approx(1.0, abs=1e-4)  # full collapse: one direction
    diverged = z.clone()
    diverged[3, 2] = float("nan")
    assert math.isnan(rankme(diverged).item())  # a diverging run's embeddings: NaN, not an SVD error


def test_collapsed_embeddings_flag_the_job_unstable():
    monitors = TrainingMonitors({"interference_every": None, "rankme": True, "rankme_threshold": 2.0}, ["global", "local"])
    healthy = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    monitors.rankme(10, {"global": healthy, "local": healthy})
    assert monitors.summary()["unstable"] is False and monitors.summary()["unstable_reason"] is None
    collapsed = torch.ones(64, 32) + 1e-4 * healthy  # every sample on one vector
    monitors.rankme(20, {"global": healthy, "local": collapsed})
    monitors.rankme(30, {"global": healthy, "local": healthy})  # recovered: the fall still counts
    summary = monitors.summary()
    assert summary["unstable"] is True
    assert "local" in summary["unstable_reason"] and "2" in summary["unstable_reason"]
    assert summary["rankme_min_step"]["local"] == 20 and summary["rankme_min"]["local"] < 1.1
    assert summary["rankme_final"]["local"] == pytest.approx(summary["rankme_final"]["global"])
    assert rank_unstable({"local": 1.0}, None) == (False, None)  # threshold null: never flagged


def test_old_trainer_state_without_monitor_entry_loads():
    old = {"step": 4, "epoch": 1, "samples_seen": 0, "config_hash": "x", "world_size": 1, "skipped_images": 0,
           "skipped_files": []}
    assert TrainerState(**old).monitor == {}


def test_monitor_fields_do_not_change_the_training_config_hash():
    base = resolve_config(compose_config(TINY))
    probed = resolve_config(compose_config(TINY + ["monitor.interference_every=5", "monitor.rankme_threshold=3"]))
    assert config_hash(base) == config_hash(probed)


# ------------------------------------------------------------------------------------------------ the probe

def probe_trainer(env, tmp_path, *overrides):
    return tiny_trainer(env, tmp_path / "_".join(overrides or ("default",)), *overrides)


def test_probe_gradients_equal_separate_backwards_of_each_task_loss(single_process, tmp_path):
    trainer = probe_trainer(single_process, tmp_path, "monitor.interference_every=1")
    fresh = copy.deepcopy(trainer.model)  # same weights and BN statistics, before the step
    views = random_views(trainer, torch.Generator().manual_seed(0))
    trainer.training_step(views, 0)
    probed = trainer.monitors.flush()

    # Independently: the fresh copy's forward, then one backward per task loss into .grad.
    predictions, targets, _ = fresh(views, trainer.view_types, trainer.target_indices)
    prepared = [trainer.objective.prepare_target(z.float()) for z in targets]
    _, task_losses = multitask_loss([p.float() for p in predictions], trainer.view_types, prepared,
                                    trainer.target_indices, trainer.objective.pair_loss, trainer.weights)
    grads = {}
    for task, loss in task_losses.items():
        fresh.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads[task] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                 for p in fresh.online.parameters()])
    assert set(grads) == {"global", "local", "cutout"}
    for task, g in grads.items():
        assert probed[f"gradnorm_{task}"] == pytest.approx(g.norm().item(), rel=1e-4)
    for a, b in (("global", "local"), ("global", "cutout"), ("local", "cutout")):
        expected = torch.dot(grads[a], grads[b]) / (grads[a].norm() * grads[b].norm())
        assert probed[f"cos_{a}_{b}"] == pytest.approx(expected.item(), abs=1e-4)


def run_steps(env, tmp_path, *overrides, steps=2):
    trainer = probe_trainer(env, tmp_path, *overrides)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        trainer.training_step(random_views(trainer, generator), step)
    rng_after = torch.get_rng_state()
    return state_sha256(full_state_dict(trainer.model)), trainer.monitors, rng_after


@pytest.mark.parametrize("precision, extra", [("fp32", ()), ("fp32", ("train.activation_checkpointing=true",)),
                                              pytest.param("bf16", (), marks=pytest.mark.slow)])
def test_training_is_bitwise_unchanged_with_the_probe_on(single_process, tmp_path, precision, extra):
    """fp32: the plain module; bf16: FSDP2 on one CPU rank (gradients of the unsharded parameters); with activation
    checkpointing the probe's backward recomputes the blocks too, without a second BN running-statistics update.
    bf16 on CPU computes with ATen's scalar kernels: the ImageNet stem (a 7x smaller feature map) keeps it seconds."""
    common = [f"train.precision={precision}"] + (["data.small_images=false"] if precision == "bf16" else [])
    torch.manual_seed(1)
    off, _, rng_off = run_steps(single_process, tmp_path, *common)
    torch.manual_seed(1)
    on, monitors, rng_on = run_steps(single_process, tmp_path, *common, "monitor.interference_every=1", *extra)
    assert on == off  # weights, optimiser-visible gradients and BN running statistics all unchanged
    assert torch.equal(rng_on, rng_off)  # no random draw
    latest = monitors.flush()
    assert monitors.probes == 2 and len(latest) == 6
    assert all(math.isfinite(v) for v in latest.values())
    assert all(v > 0 for k, v in latest.items() if k.startswith("gradnorm_"))


@pytest.mark.slow
def test_probe_means_and_rankme_survive_a_resume(single_process, tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)  # 16 images, batch 8: 2 steps per epoch
    overrides = [f"data.root={root}", "data.subset=null", "data.num_workers=0", "train.epochs=2",
                 "train.log_every_steps=1", "train.checkpoint_every_steps=2", "monitor.interference_every=1"]

    def fit(out, *extra):
        cfg = resolve_config(compose_config(TINY + overrides + [f"out_dir={out}", *extra]))
        stop = StopRequest()
        try:
            return Trainer(cfg, single_process, out).fit(stop)
        finally:
            stop.restore()

    whole = fit(tmp_path / "whole")
    fit(tmp_path / "split", "train.max_steps=2")
    resumed = fit(tmp_path / "split")
    assert whole.steps == resumed.steps == 4
    assert whole.monitor["interference_probes"] == 4
    assert json.dumps(resumed.monitor, sort_keys=True) == json.dumps(whole.monitor, sort_keys=True)
    assert set(whole.monitor["rankme_final"]) == {"global", "local", "cutout"}


def _probe_worker(rank, world_size, port, root, out):
    set_env(rank, world_size, port)
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    trainer = Trainer(job_config(root, ["monitor.interference_every=1"]), env, out / f"rank{rank}")
    local = trainer.cfg.train.batch_size // world_size
    trainer.training_step([v[rank * local:(rank + 1) * local] for v in global_views(trainer, 0)], 0)
    latest = trainer.monitors.flush()
    torch.save(latest, out / f"probe_rank{rank}.pt")
    destroy_distributed()


@pytest.mark.slow
def test_probe_on_two_fsdp_ranks_measures_the_global_batch_gradients(single_process, tmp_path):
    """2 gloo ranks (FSDP2, sharded parameters) against one process: the gradient of the mean over the two
    half-batches' task losses (BN statistics per half, as on each rank)."""
    root = make_image_folder(tmp_path / "data", per_class=8)
    trainer = Trainer(job_config(root, []), single_process, tmp_path / "reference")
    model, views = trainer.model, global_views(trainer, 0)
    local = trainer.cfg.train.batch_size // 2
    per_half = []
    for h in range(2):
        predictions, targets, _ = model([v[h * local:(h + 1) * local] for v in views], trainer.view_types,
                                        trainer.target_indices)
        prepared = [trainer.objective.prepare_target(z.float()) for z in targets]
        per_half.append(multitask_loss([p.float() for p in predictions], trainer.view_types, prepared,
                                       trainer.target_indices, trainer.objective.pair_loss, trainer.weights)[1])
    params = list(model.online.parameters())
    grads = {}
    for task in per_half[0]:
        loss = (per_half[0][task] + per_half[1][task]) / 2
        grads[task] = torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    run_ranks(_probe_worker, 2, root, tmp_path)
    probed = [torch.load(tmp_path / f"probe_rank{r}.pt") for r in range(2)]
    assert probed[0] == probed[1]  # every rank reports the same global values
    for task, g in grads.items():
        assert probed[0][f"gradnorm_{task}"] == pytest.approx(g.norm().item(), rel=1e-4)
    for a, b in (("global", "local"), ("global", "cutout"), ("local", "cutout")):
        expected = torch.dot(grads[a], grads[b]) / (grads[a].norm() * grads[b].norm())
        assert probed[0][f"cos_{a}_{b}"] == pytest.approx(expected.item(), abs=1e-4)
