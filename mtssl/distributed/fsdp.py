"""FSDP2 wrapping: one unit per backbone block, per projector and per predictor, then the root.

The online encoder and the EMA target are sharded with the same plan, so every target shard
sits on the same rank as its online twin and the EMA update is purely local.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm

# Residual / transformer block classes of timm backbones; each becomes one FSDP unit.
BLOCK_CLASS_NAMES = {"BasicBlock", "Bottleneck", "Block", "ResidualBlock", "ConvNeXtBlock"}


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    return [m for m in backbone.modules() if type(m).__name__ in BLOCK_CLASS_NAMES]


PRECISIONS = ("fp32", "bf16")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16: parameters all-gathered and computed in bf16, gradients reduced in fp32; fp32: plain."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


@contextlib.contextmanager
def precision_kernels(precision: str, device: torch.device):
    """Compute with ATen's own CPU kernels under bf16 on CPU: oneDNN off for the block.

    On CPUs with native bf16 (AVX512-BF16, AMX) torch runs bf16 convolutions and matmuls in oneDNN,
    whose bf16 convolution gives wrong results on some of them (pytorch/pytorch#163347). The 2-rank
    bf16 test job (tests/test_multi_gpu.py) had NaN losses on one CI host, and finite ones within
    3e-3 of fp32 on AVX2 hosts, where oneDNN has no bf16 kernels and ATen's run. The CPU bf16 path
    emulates the CUDA one, so it uses those everywhere; CUDA and fp32 jobs keep their kernels.
    Scoped, not process-wide: oneDNN is torch's fast fp32 CPU convolution.
    """
    if precision != "bf16" or device.type != "cpu":
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


# BatchNorm keeps fp32 weights under bf16: its running statistics are fp32, and torch's CPU kernel
# rejects bf16 weights beside them, as does the fused CUDA NCHW backward. A bf16 input with fp32
# weights is supported on both (the output stays bf16), so inputs are left uncast.
BATCH_NORM_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Apply fully_shard per block, per head and at the root of a MultiTaskSiamese.

    Under bf16 each BatchNorm (SyncBatchNorm included) first becomes its own fp32 unit, since
    fully_shard leaves parameters that a nested unit already manages to that unit.
    """
    policy = mixed_precision_policy(precision)
    if precision == "bf16":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                fully_shard(module, mp_policy=BATCH_NORM_POLICY)
    encoders = [model.online] + ([model.target] if model.target is not None else [])
    for encoder in encoders:
        for block in backbone_blocks(encoder.backbone):
            fully_shard(block, mp_policy=policy)
        fully_shard(encoder.backbone, mp_policy=policy)
        fully_shard(encoder.projector, mp_policy=policy)
    for predictor in model.predictors.values():
        fully_shard(predictor, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (parameter, gradient or optimiser state), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def compute_parameters(root: nn.Module, part: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters of ``part`` (a submodule of ``root``) as autograd sees them in a forward.

    A plain module: its parameters. Under FSDP2 the forward computes with each parameter's unsharded copy
    (a leaf of its own), not the sharded DTensor: those copies, from FSDP's parameter groups (a private
    API: torch has no public one), so ``torch.autograd.grad`` can differentiate the step's graph with
    respect to them. Call after the forward.
    """
    inside = set(part.modules())
    found: dict[int, torch.Tensor] = {}
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before grouped fully_shard
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        for group in groups:
            for fsdp_param in group.fsdp_params:
                if fsdp_param._module_info.module in inside and fsdp_param.sharded_param.requires_grad:
                    found[id(fsdp_param.sharded_param)] = fsdp_param._unsharded_param
    return [found.get(id(p), p) for p in part.parameters() if p.requires_grad]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of a module's parameters and buffers (collective: all ranks call)."""
    state = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[key] = value.detach().to("cpu", copy=True)
    return state


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
