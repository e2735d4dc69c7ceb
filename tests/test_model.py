"""Predictor layouts, the target branch, EMA and the optimisation schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mtssl.config import compose_config, resolve_config
from mtssl.train.ema import ema_momentum, ema_update
from mtssl.model.siamese import Encoder, build_model, mlp
from mtssl.train.optim import LARS, lr_at_step, parameter_groups, peak_learning_rate


def count(module):
    return sum(p.numel() for p in module.parameters())


def mlp_params(dims, last_bn=False):
    """Linear(no bias)+BN(affine) per hidden layer, Linear(bias) last; non-affine last BN has none."""
    n = 0
    for a, b in zip(dims[:-2], dims[1:-1]):
        n += a * b + 2 * b
    n += dims[-2] * dims[-1] + dims[-1]
    return n


def model_for(overrides, tasks=("global", "local", "cutout")):
    cfg = resolve_config(compose_config(overrides))
    return cfg, build_model(cfg, list(tasks), small_images=True, ema_target=cfg.method.name != "simsiam")


@pytest.mark.parametrize("method,pred_dims", [("byol", [256, 4096, 256]), ("simsiam", [2048, 512, 2048]), ("mocov3", [256, 4096, 256])])
def test_separate_vs_shared_predictor_parameter_counts(method, pred_dims):
    _, separate = model_for([f"method={method}", "predictor=separate"])
    _, shared = model_for([f"method={method}", "predictor=shared"])
    one = mlp_params(pred_dims)
    assert count(shared.predictors) == one
    assert count(separate.predictors) == 3 * one
    assert count(separate) - count(shared) == 2 * one
    assert sorted(separate.predictors) == ["cutout", "global", "local"]


def test_projector_dims_follow_the_method_table():
    _, byol = model_for(["method=byol"])
    assert count(byol.online.projector) == mlp_params([512, 4096, 256])
    _, simsiam = model_for(["method=simsiam"])
    assert count(simsiam.online.projector) == mlp_params([512, 2048, 2048, 2048])
    assert isinstance(simsiam.online.projector[-1], torch.nn.BatchNorm1d) and not simsiam.online.projector[-1].affine


def test_target_is_encoder_only_and_frozen():
    _, model = model_for(["method=byol"])
    assert isinstance(model.target, Encoder)
    assert count(model.target) == count(model.online)
    assert not any("predictor" in name for name, _ in model.target.named_parameters())
    assert not any(p.requires_grad for p in model.target.parameters())
    _, simsiam = model_for(["method=simsiam"])
    assert simsiam.target is None  # the online network under stop-gradient


def test_target_sees_only_global_views():
    _, model = model_for(["method=byol"])
    calls = []
    model.target.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    views = [torch.randn(4, 3, s, s) for s in (32, 32, 16, 16, 32)]
    preds, targets, _ = model(views, ["global", "global", "local", "local", "cutout"], [0, 1])
    assert len(preds) == 5 and len(targets) == 2
    assert calls == [torch.Size([4, 3, 32, 32])] * 2


def test_ema_schedule_values():
    assert ema_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert ema_momentum(100, 100, 0.996) == pytest.approx(1.0)
    k, K = 30, 100
    assert ema_momentum(k, K, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / K) + 1) / 2)


def test_one_ema_update():
    online, target = mlp(3, [4], 2), mlp(3, [4], 2)
    before = {n: p.clone() for n, p in target.named_parameters()}
    target_buffers = {n: b.clone() for n, b in target.named_buffers()}
    with torch.no_grad():
        online[1].running_mean.fill_(7.0)
    ema_update(target, online, 0.9)
    for name, p in target.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(online.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    for name, b in target.named_buffers():  # BN statistics come from the target's own forwards
        torch.testing.assert_close(b, target_buffers[name])


def test_learning_rate_schedule():
    peak = peak_learning_rate(0.4, 512)
    assert peak == pytest.approx(0.8)
    assert lr_at_step(0, 100, 10, peak) == 0.0
    assert lr_at_step(5, 100, 10, peak) == pytest.approx(0.4)
    assert lr_at_step(10, 100, 10, peak) == pytest.approx(peak)
    assert lr_at_step(100, 100, 10, peak) == pytest.approx(0.001 * peak)
    mid = 0.001 * peak + (peak - 0.001 * peak) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at_step(55, 100, 10, peak) == pytest.approx(mid)


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = parameter_groups(net, weight_decay=0.1)
    opt = LARS(groups, lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    net(torch.randn(8, 4)).pow(2).sum().backward()
    w, g = net[0].weight.detach().clone(), net[0].weight.grad.clone()
    b, gb = net[0].bias.detach().clone(), net[0].bias.grad.clone()
    opt.step()
    u = g + 0.1 * w
    trust = 0.001 * w.norm() / u.norm()
    torch.testing.assert_close(net[0].weight.detach(), w - 0.5 * trust * u)
    torch.testing.assert_close(net[0].bias.detach(), b - 0.5 * gb)  # 1-D: no decay, no adaptation

    # second step: momentum 0.9 carries the first (scaled) update
    w1, b1 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    opt.zero_grad()
    net(torch.randn(8, 4)).pow(2).sum().backward()
    g2, gb2 = net[0].weight.grad.clone(), net[0].bias.grad.clone()
    opt.step()
    u2 = g2 + 0.1 * w1
    trust2 = 0.001 * w1.norm() / u2.norm()
    torch.testing.assert_close(net[0].weight.detach(), w1 - 0.5 * (0.9 * trust * u + trust2 * u2))
    torch.testing.assert_close(net[0].bias.detach(), b1 - 0.5 * (0.9 * gb + gb2))
    torch.testing.assert_close(net[0].weight.grad, trust2 * u2)  # the update is built in place in p.grad
