"""Pair losses and the multi-task loss against the formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mtssl.config import compose_config, resolve_config
from mtssl.loss.multitask import multitask_loss
from mtssl.loss.objectives import build_objective, byol_pair_loss, mocov3_pair_loss, simsiam_pair_loss


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def rows(t):
    return t.double().tolist()


@pytest.fixture
def pz():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)


def test_byol_pair_loss(pz):
    p, z = pz
    expected = sum(2 - 2 * cosine(a, b) for a, b in zip(rows(p), rows(z))) / len(p)
    assert byol_pair_loss(p, z).item() == pytest.approx(expected, rel=1e-5)


def test_simsiam_pair_loss(pz):
    p, z = pz
    expected = -sum(cosine(a, b) for a, b in zip(rows(p), rows(z))) / len(p)
    assert simsiam_pair_loss(p, z).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_mocov3_pair_loss(pz, tau):
    q, k = pz
    norm = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    qs, ks = [norm(v) for v in rows(q)], [norm(v) for v in rows(k)]
    total = 0.0
    for i, qi in enumerate(qs):
        logits = [sum(a * b for a, b in zip(qi, kj)) / tau for kj in ks]
        total += -(logits[i] - math.log(sum(math.exp(l) for l in logits)))
    expected = 2 * tau * total / len(qs)
    keys = build_objective(_method("mocov3", temperature=tau)).prepare_target(k)
    assert mocov3_pair_loss(q, keys, tau).item() == pytest.approx(expected, rel=1e-5)


def _method(name, **kwargs):
    from omegaconf import OmegaConf

    return OmegaConf.create({"name": name, "objective_kwargs": kwargs})


def hand_multitask(preds, types, targets, target_idx, loss, weights):
    """L = sum_t w_t / N_t sum_{v in t} sum_{g != v} l(p_v, z_g), written as plain loops."""
    per_task_sum, per_task_n = {}, {}
    for v in range(len(preds)):
        for j, g in enumerate(target_idx):
            if g == v:
                continue
            per_task_sum[types[v]] = per_task_sum.get(types[v], 0.0) + loss(preds[v], targets[j]).item()
            per_task_n[types[v]] = per_task_n.get(types[v], 0) + 1
    return sum(weights[t] * per_task_sum[t] / per_task_n[t] for t in per_task_sum), per_task_n


def test_multitask_loss_normalisation():
    g = torch.Generator().manual_seed(1)
    types = ["global", "global", "local", "local", "local", "cutout"]
    preds = [torch.randn(4, 8, generator=g) for _ in types]
    targets = [torch.randn(4, 8, generator=g) for _ in range(2)]
    weights = {"global": 1.0, "local": 0.5, "cutout": 2.0}
    total, per_task = multitask_loss(preds, types, targets, [0, 1], byol_pair_loss, weights)
    expected, counts = hand_multitask(preds, types, targets, [0, 1], byol_pair_loss, weights)
    assert counts == {"global": 2, "local": 6, "cutout": 2}  # N_global = 2, N_local = 2 n_local
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # Logged task losses are the unweighted means.
    local_mean = sum(byol_pair_loss(preds[v], targets[j]).item() for v in (2, 3, 4) for j in (0, 1)) / 6
    assert per_task["local"].item() == pytest.approx(local_mean, rel=1e-6)


@pytest.mark.parametrize("method,standard", [
    ("byol", lambda l, p, z: l(p[0], z[1]) + l(p[1], z[0])),
    ("mocov3", lambda l, p, z: l(p[0], z[1]) + l(p[1], z[0])),
    ("simsiam", lambda l, p, z: 0.5 * l(p[0], z[1]) + 0.5 * l(p[1], z[0])),
])
def test_two_view_baseline_equals_standard_symmetric_loss(method, standard):
    cfg = resolve_config(compose_config([f"method={method}", "views=global", "predictor=shared"]))
    weights = {"global": cfg.views.types["global"].weight}
    objective = build_objective(cfg.method)
    g = torch.Generator().manual_seed(2)
    p = [torch.randn(8, 16, generator=g) for _ in range(2)]
    z = [objective.prepare_target(torch.randn(8, 16, generator=g)) for _ in range(2)]
    total, _ = multitask_loss(p, ["global", "global"], z, [0, 1], objective.pair_loss, weights)
    assert total.item() == pytest.approx(standard(objective.pair_loss, p, z).item(), rel=1e-6)


def test_default_task_weights():
    byol = resolve_config(compose_config(["method=byol"]))
    simsiam = resolve_config(compose_config(["method=simsiam"]))
    assert {t: v.weight for t, v in byol.views.types.items()} == {"global": 1.0, "local": 1.0, "cutout": 1.0}
    assert all(v.weight == pytest.approx(1 / 3) for v in simsiam.views.types.values())
