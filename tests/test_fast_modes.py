"""The fast training options keep the method: a step with train.channels_last or train.compile
equals the default step (same losses and updated weights up to float rounding)."""

from __future__ import annotations

import pytest
import torch

from tests.support.jobs import random_views, tiny_trainer

STEPS = 2


def run_steps(env, tmp_path, *overrides):
    """Losses and final online weights of STEPS training steps on fixed random views."""
    trainer = tiny_trainer(env, tmp_path / "_".join(overrides or ("default",)), *overrides)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(STEPS):
        loss = trainer.training_step(random_views(trainer, generator), step).loss
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in trainer.model.online.state_dict().items()}


def assert_same_run(actual, expected, tol):
    assert actual[0] == pytest.approx(expected[0], rel=tol)
    assert actual[0][0] != actual[0][1]  # the weights moved between the two steps
    for key, value in expected[1].items():
        if value.is_floating_point():
            torch.testing.assert_close(actual[1][key], value, atol=tol, rtol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_channels_last_step_equals_default_step(single_process, tmp_path):
    default = run_steps(single_process, tmp_path)
    assert_same_run(run_steps(single_process, tmp_path, "train.channels_last=true"), default, 1e-4)


@pytest.mark.slow
def test_compiled_backbone_step_equals_eager_step(single_process, tmp_path, monkeypatch):
    """SimSiam with two view sizes: no target encoder, so half the blocks to compile of BYOL (each block, size and
    direction is its own inductor graph: minutes on 2 cores) and still one graph per view size. One compile
    thread: inductor's worker pool would outlive the test (and buys nothing on 2 cores)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    overrides = ("method=simsiam", "views=global_local")
    torch._dynamo.reset()
    counters.clear()
    try:
        eager = run_steps(single_process, tmp_path, *overrides)
        assert counters["stats"]["unique_graphs"] == 0
        compiled = run_steps(single_process, tmp_path, *overrides, "train.compile=true")
        assert counters["stats"]["unique_graphs"] >= 2  # the backbone really ran compiled (one graph per view size)
        assert_same_run(compiled, eager, 1e-4)
    finally:
        torch._dynamo.reset()


def grad_norm(trainer) -> float:
    return sum(float(p.grad.double().pow(2).sum()) for p in trainer.trainable if p.grad is not None) ** 0.5


def first_step(env, tmp_path, *overrides):
    """The trainer, its first step's output, and the norms of the gradients the optimiser was
    given and of p.grad after the step."""
    trainer = tiny_trainer(env, tmp_path / "_".join(overrides or ("default",)), *overrides)
    given = []
    lars_step = trainer.optimizer.step

    def step_recording_gradients():  # the real step, after measuring what it is given
        given.append(grad_norm(trainer))
        lars_step()

    trainer.optimizer.step = step_recording_gradients
    output = trainer.training_step(random_views(trainer, torch.Generator().manual_seed(0)), 0, measure_grad_norm=True)
    return trainer, output, given[0], grad_norm(trainer)


def test_logged_grad_norm_is_taken_before_the_lars_step(single_process, tmp_path):
    """LARS builds its update in p.grad, so the step measures the gradient norm before it."""
    trainer, output, given, after = first_step(single_process, tmp_path)
    assert float(output.grad_norm) == pytest.approx(given, rel=1e-5)
    assert after != pytest.approx(given, rel=1e-3)  # p.grad now holds the trust-scaled update
    assert trainer.training_step(random_views(trainer, torch.Generator()), 1).grad_norm is None  # only when asked


def test_logged_grad_norm_with_clipping_is_the_norm_before_clipping(single_process, tmp_path):
    _, unclipped, unclipped_given, _ = first_step(single_process, tmp_path)
    _, clipped, clipped_given, _ = first_step(single_process, tmp_path, "optim.clip_grad=0.001")
    assert clipped_given == pytest.approx(0.001, rel=1e-4)  # LARS got the clipped gradients
    assert float(clipped.grad_norm) == pytest.approx(float(unclipped.grad_norm), rel=1e-5)  # the log: before clipping
