"""Bounded activation memory changes nothing but memory.

``train.activation_checkpointing``: steps with and without it give bitwise the same losses,
gradients, weights and BatchNorm running statistics on CPU (ResNet, per-view and ghost modes;
ViT with drop-path; bf16 through FSDP2). ``train.backward=per_view``: the gradients of one
backward per view equal those of one joint backward (up to summation order).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mtssl.config import ConfigError, compose_config, config_hash, resolve_config
from mtssl.config.validate import validate_config
from mtssl.distributed.process_group import destroy_distributed, init_distributed
from mtssl.model.activation_checkpoint import CheckpointedForward
from mtssl.train.trainer import Trainer
from tests.support.jobs import TINY_RESNET

# Tiny and fast: narrow nets (1 block per ResNet stage, 2 ViT blocks), 16/8 px views, batch 4.
SIZES = ["data.small_images=true", "data.view_sizes.global=16", "data.view_sizes.local=8", "data.view_sizes.cutout=16",
         "train.batch_size=4", "optim.warmup_epochs=0", "method.projector.hidden_dims=[32]",
         "method.predictor.hidden_dims=[32]", "method.projector.out_dim=16", "method.predictor.out_dim=16"]
RESNET = ["method=byol", "views=global_local_cutout", "backbone=resnet18", "data=cifar10",
          *TINY_RESNET,
          *SIZES]
VIT = ["method=byol", "views=global_local_cutout", "backbone=vit_tiny", "data=cifar10", "+backbone.kwargs.depth=2",
       "+backbone.kwargs.embed_dim=32", "+backbone.kwargs.num_heads=2", "backbone.drop_path_rate=0.5", *SIZES]
AC = "train.activation_checkpointing=true"
STEPS = 2


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: threads only add overhead
        yield init_distributed("cpu")
        destroy_distributed()
        torch.set_num_threads(threads)


def run(env, tmp_path, overrides, steps=STEPS):
    """Losses, gradients of the last step and the whole model state (weights and BN buffers) after ``steps``."""
    cfg = resolve_config(compose_config(list(overrides)))
    trainer = Trainer(cfg, env, tmp_path / str(abs(hash(tuple(overrides)))), train_samples=[("unused", 0)] * 16)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the step's drop-path draws
        views = [torch.randn(4, 3, trainer.layout.type(t).size, trainer.layout.type(t).size, generator=generator)
                 for t in trainer.view_types]
        losses.append(trainer.training_step(views, step).loss.item())
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in trainer.model.state_dict().items()}
    return losses, grads, state


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def assert_bitwise_equal(actual, expected):
    assert actual[0] == expected[0]
    assert expected[0][0] != expected[0][1]  # the weights moved
    assert differing(actual[1], expected[1]) == []
    assert differing(actual[2], expected[2]) == []


@pytest.mark.parametrize("mode", ["none", "bn_per_view"])
def test_checkpointed_resnet_steps_are_bitwise_equal(env, tmp_path, mode):
    overrides = RESNET + [f"train.view_batching={mode}"]
    assert_bitwise_equal(run(env, tmp_path, overrides + [AC]), run(env, tmp_path, overrides))


def test_plain_torch_checkpoint_would_update_batch_norm_twice(env, tmp_path, monkeypatch):
    """The control for the test above: without mtssl's recomputation context, the running
    statistics (and only they, at first) differ, so that test does catch double updates."""
    expected = run(env, tmp_path, RESNET, steps=1)
    monkeypatch.setattr(CheckpointedForward, "_contexts", lambda self: (contextlib.nullcontext(), contextlib.nullcontext()))
    actual = run(env, tmp_path, RESNET + [AC], steps=1)
    assert actual[0] == expected[0] and differing(actual[1], expected[1]) == []
    changed = differing(actual[2], expected[2])
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert any(k.startswith("online.backbone.layer") for k in changed)


def test_checkpointed_vit_with_drop_path_replays_the_same_masks(env, tmp_path):
    expected = run(env, tmp_path, VIT)
    assert_bitwise_equal(run(env, tmp_path, VIT + [AC]), expected)
    no_drop_path = [o for o in VIT if not o.startswith("backbone.drop_path_rate")]
    assert run(env, tmp_path, no_drop_path)[0] != expected[0]  # drop-path is really active


def test_checkpointed_bf16_fsdp_step_is_bitwise_equal(env, tmp_path):
    overrides = RESNET + ["train.precision=bf16"]
    assert_bitwise_equal(run(env, tmp_path, overrides + [AC]), run(env, tmp_path, overrides))


@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_per_view_backward_gives_the_joint_gradients(env, tmp_path, model):
    overrides = {"resnet": RESNET, "vit": VIT}[model]
    joint = run(env, tmp_path, overrides, steps=1)
    per_view = run(env, tmp_path, overrides + ["train.backward=per_view"], steps=1)
    assert per_view[0] == pytest.approx(joint[0], rel=1e-6)
    for name, grad in joint[1].items():
        torch.testing.assert_close(per_view[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for key, value in joint[2].items():  # BN running statistics and weights after the step
        if value.is_floating_point():
            torch.testing.assert_close(per_view[2][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_per_view_backward_with_checkpointing_and_mocov3(env, tmp_path):
    overrides = [o.replace("method=byol", "method=mocov3") for o in RESNET]
    joint = run(env, tmp_path, overrides, steps=1)
    per_view = run(env, tmp_path, overrides + ["train.backward=per_view", AC], steps=1)
    assert per_view[0] == pytest.approx(joint[0], rel=1e-6)
    for name, grad in joint[1].items():
        torch.testing.assert_close(per_view[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_config_checks(tmp_path):
    base = RESNET + [f"out_dir={tmp_path}/run", "views.types.local.blur_kernel=3"]
    with pytest.raises(ConfigError, match="train.activation_checkpointing.*train.compile"):
        validate_config(resolve_config(compose_config(base + [AC, "train.compile=true"])), check_data=False)
    with pytest.raises(ConfigError, match="train.backward=per_view: simsiam"):
        validate_config(resolve_config(compose_config(
            [o.replace("method=byol", "method=simsiam") for o in base] + ["train.backward=per_view"])), check_data=False)
    with pytest.raises(ConfigError, match="train.backward=per_view.*view_batching"):
        validate_config(resolve_config(compose_config(base + ["train.backward=per_view", "train.view_batching=bn_per_view"])),
                        check_data=False)
    with pytest.raises(ConfigError, match="train.backward"):
        validate_config(resolve_config(compose_config(base + ["train.backward=views"])), check_data=False)
    with pytest.raises(ConfigError, match="monitor.interference_every.*train.backward=per_view"):
        validate_config(resolve_config(compose_config(base + ["train.backward=per_view",
                                                              "monitor.interference_every=4"])), check_data=False)
    # bitwise the same results: not part of the run's identity, so a run may resume with it switched
    plain = resolve_config(compose_config(base))
    assert config_hash(resolve_config(compose_config(base + [AC]))) == config_hash(plain)
    assert config_hash(resolve_config(compose_config(base + ["train.backward=per_view"]))) != config_hash(plain)


def test_per_view_backward_through_fsdp_accumulates_every_view(env, tmp_path):
    """bf16 goes through FSDP2, which reduces the gradients once, after the last view's backward."""
    overrides = RESNET + ["train.precision=bf16"]
    joint = run(env, tmp_path, overrides, steps=1)[1]
    per_view = run(env, tmp_path, overrides + ["train.backward=per_view"], steps=1)[1]
    for name, grad in joint.items():  # bf16 rounds differently per summation order: compare whole tensors' norms
        error = float((per_view[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12))
        assert error < 0.05, f"{name}: relative error {error:.3g}"


def test_saved_tensor_counter_matches_a_hand_count():
    """benchmarks/activation_memory.py's counter on Linear(8, 16) + ReLU at batch 4 (fp32): Linear saves its
    input (4 x 8 x 4 B = 128 B; the weight is a parameter, not counted), ReLU its output (4 x 16 x 4 B = 256 B).
    Checkpointed, only the input is kept; a tensor saved twice counts once."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from activation_memory import SavedTensorBytes
    from torch.utils.checkpoint import checkpoint

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorBytes(exclude=net.parameters()) as counter:
        net(x)
    assert counter.total == 128 + 256
    with SavedTensorBytes(exclude=net.parameters()) as counter:
        checkpoint(net, x, use_reentrant=False)
    assert counter.total == 128
    with SavedTensorBytes() as counter:  # parameters included now: + weight 16 x 8 x 4 B; x * x saves x twice
        net(x)
        x * x
    assert counter.total == 128 + 256 + 512
