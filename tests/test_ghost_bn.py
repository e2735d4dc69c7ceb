"""Ghost-BN grouped views equal per-view calls; plain grouping does not (a documented change)."""

import copy

import pytest
import torch
from torch import nn

from mtssl.config import ConfigError, compose_config
from mtssl.model.ghost_bn import GhostBatchNorm, grouped_views_mode, view_batching_mode
from mtssl.model.siamese import build_model
from mtssl.loss.multitask import multitask_loss
from mtssl.loss.objectives import build_objective

TOL = 1e-5
VIEW_TYPES = ["global", "global", "local", "local", "cutout"]  # CIFAR sizes 32, 32, 16, 16, 32
TARGET_INDICES = [0, 1]


def test_ghost_batch_norm_matches_hand_written_per_chunk_formula():
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3, momentum=0.25)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    chunks = [torch.randn(4, 3, 5, 5) * s + s for s in (1.0, 2.0, 3.0)]
    view_ids = [2, 0, 1]  # the batch holds views 2, 0, 1; running updates must follow 0, 1, 2
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()

    with GhostBatchNorm(layer) as ghost, ghost.views(view_ids):
        out = layer(torch.cat(chunks))

    expected_mean, expected_var = mean0, var0
    for view in sorted(view_ids):
        x = chunks[view_ids.index(view)]
        expected_mean = 0.75 * expected_mean + 0.25 * x.mean(dim=(0, 2, 3))
        expected_var = 0.75 * expected_var + 0.25 * x.var(dim=(0, 2, 3), unbiased=True)
    for x, y in zip(chunks, out.chunk(3)):
        mu = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = (x - mu) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.running_mean, expected_mean, atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.running_var, expected_var, atol=TOL, rtol=TOL)
    assert int(layer.num_batches_tracked) == 3
    assert "forward" not in vars(layer)  # the layer is back to normal after the context


def test_ghost_batch_norm_cumulative_average_when_momentum_is_none():
    torch.manual_seed(1)
    layer = nn.BatchNorm1d(4, momentum=None)
    chunks = [torch.randn(6, 4) + i for i in range(2)]
    with GhostBatchNorm(layer) as ghost, ghost.views([0, 1]):
        layer(torch.cat(chunks))
    # momentum None: running mean is the plain average of the batch means seen so far
    expected = (chunks[0].mean(0) + chunks[1].mean(0)) / 2
    torch.testing.assert_close(layer.running_mean, expected, atol=TOL, rtol=TOL)


VIEW_BATCHING = {"false": "none", "ghost": "bn_per_view", "plain": "bn_shared"}  # the model's mode -> the field


def _models(mode, predictor="separate"):
    cfg = compose_config(["method=byol", "backbone=resnet18", "data=cifar10", f"train.view_batching={VIEW_BATCHING[mode]}",
                          f"predictor={predictor}"])
    torch.manual_seed(0)
    return cfg, build_model(cfg, ["global", "local", "cutout"], small_images=True, ema_target=True)


def _step(model, views, objective, weights):
    """Forward, loss and backward of one training step (no optimiser), returning what to compare."""
    model.train()
    predictions, targets, projections = model(views, VIEW_TYPES, TARGET_INDICES)
    prepared = [objective.prepare_target(z) for z in targets]
    loss, _ = multitask_loss(predictions, VIEW_TYPES, prepared, TARGET_INDICES, objective.pair_loss, weights)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return predictions, targets, loss.detach(), grads, buffers


@pytest.fixture(scope="module")
def outcomes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: extra threads only contend on a shared machine
    try:
        return _run_modes()
    finally:
        torch.set_num_threads(threads)


def _run_modes():
    torch.manual_seed(123)
    batch = 6
    steps = [[torch.randn(batch, 3, s, s) for s in (32, 32, 16, 16, 32)] for _ in range(2)]
    results = {}
    for mode, predictor in (("false", "separate"), ("ghost", "separate"), ("plain", "separate"),
                            ("false", "shared"), ("ghost", "shared")):
        cfg, model = _models(mode, predictor)
        objective = build_objective(cfg.method)
        weights = {"global": 1.0, "local": 1.0, "cutout": 1.0}
        for views in steps:  # two steps: the ghost context is reused, running statistics accumulate
            results[mode if predictor == "separate" else f"{mode}+shared"] = _step(model, views, objective, weights)
    return results


@pytest.mark.slow
def test_ghost_grouped_equals_per_view(outcomes):
    assert_same_step(outcomes["false"], outcomes["ghost"])


@pytest.mark.slow
def test_ghost_grouped_equals_per_view_with_a_shared_predictor(outcomes):
    # ghost mode sends all five views through the one predictor in a single call
    assert_same_step(outcomes["false+shared"], outcomes["ghost+shared"])


def assert_same_step(reference, ghost):
    for name, ref, got in zip(("predictions", "targets"), reference[:2], ghost[:2]):
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(ghost[2], reference[2], atol=TOL, rtol=TOL)
    assert reference[3].keys() == ghost[3].keys() and len(reference[3]) > 0
    for key in reference[3]:
        torch.testing.assert_close(ghost[3][key], reference[3][key], atol=TOL, rtol=TOL, msg=lambda m: f"grad {key}: {m}")
    running = [k for k in reference[4] if "running_" in k or "num_batches_tracked" in k]
    assert all(any(k.startswith(part) for k in running) for part in ("online.", "target.", "predictors."))
    for key in running:
        torch.testing.assert_close(ghost[4][key], reference[4][key], atol=TOL, rtol=TOL, msg=lambda m: f"buffer {key}: {m}")


@pytest.mark.slow
def test_plain_grouped_changes_batch_norm_semantics(outcomes):
    reference, plain = outcomes["false"], outcomes["plain"]
    assert (plain[2] - reference[2]).abs() > 1e-3
    diff = max((p - r).abs().max().item() for p, r in zip(plain[0], reference[0]))
    assert diff > 1e-2
    key = "online.backbone.bn1.running_mean"
    assert not torch.allclose(plain[4][key], reference[4][key], atol=1e-4)


def test_grouped_views_values():
    assert grouped_views_mode(False) is None and grouped_views_mode(None) is None
    assert grouped_views_mode(True) == "plain"
    assert grouped_views_mode("ghost") == "ghost" and grouped_views_mode("plain") == "plain"
    with pytest.raises(ValueError, match="train.view_batching"):
        grouped_views_mode("fast")
    assert [view_batching_mode(v) for v in ("none", "bn_per_view", "bn_shared")] == [None, "ghost", "plain"]
    with pytest.raises(ConfigError, match="train.view_batching"):
        view_batching_mode("ghost")


def test_ghost_mode_in_eval_uses_running_statistics_unchanged():
    torch.manual_seed(2)
    layer = nn.BatchNorm1d(3).eval()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(8, 3)
    with GhostBatchNorm(layer) as ghost, ghost.views([0, 1]):
        out = layer(x)
    torch.testing.assert_close(out, nn.functional.batch_norm(x, before["running_mean"], before["running_var"], layer.weight, layer.bias))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


class BatchNormReLU(nn.BatchNorm1d):
    """A BatchNorm subclass with its own forward (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_batch_norm_subclass_with_own_forward_matches_per_view_calls():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 4), BatchNormReLU(4, momentum=0.3))
    reference = copy.deepcopy(net)
    views = [torch.randn(6, 5) * (i + 1) for i in range(3)]
    expected = [reference(v) for v in views]  # one call per view, in view order
    with GhostBatchNorm(net) as ghost:
        with ghost.views([0, 2]):
            first = net(torch.cat([views[0], views[2]]))
        with ghost.views([1]):
            second = net(views[1])
    got = [first[:6], second, first[6:]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=TOL, rtol=TOL)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=TOL, rtol=TOL)
