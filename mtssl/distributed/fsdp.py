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


# BatchNorm under bf16: its running statistics are fp32 buffers (FSDP leaves buffers alone), and both torch's
# CPU kernel and the fused CUDA kernels (cuDNN, and the native NCHW backward) take a bf16 input only beside
# fp32 weight, bias and statistics ("mixed type"), never bf16 weights beside fp32 statistics. Each BatchNorm
# therefore stays in its block's bf16 unit (one all-gather and one reduce-scatter per block, no FSDP hooks
# inside a compiled block) and reads its all-gathered bf16 weight and bias as fp32 (``_Fp32AffineBatchNorm``):
# the kernels see the same dtypes as with fp32 units of their own. The sharded parameters, the optimiser
# and the running statistics stay fp32; what changes is that the forward's weight and bias are bf16-rounded
# copies and their gradients are bf16 before the fp32 reduce-scatter, as for every other parameter.


class _Fp32AffineBatchNorm:
    """Mixin placed before a BatchNorm class: ``weight`` and ``bias`` read as fp32 when FSDP registered bf16
    unsharded copies (a differentiable cast: gradients flow back to those copies). Attribute reads only: FSDP
    swaps parameters through ``_parameters``, and the forward (``_BatchNorm.forward``, SyncBatchNorm's, the
    ghost-BN and activation-checkpointing paths) reads ``self.weight``."""

    @property
    def weight(self):
        return _as_fp32(self._parameters["weight"])

    @property
    def bias(self):
        return _as_fp32(self._parameters["bias"])


def _as_fp32(parameter):
    if parameter is None or parameter.dtype == torch.float32:
        return parameter
    return parameter.float()


_FP32_AFFINE_CLASSES: dict[type, type] = {}


def fp32_affine_batch_norm(module: _BatchNorm) -> None:
    """Make ``module`` read its weight and bias as fp32 (in place: its class gains ``_Fp32AffineBatchNorm``)."""
    cls = type(module)
    if issubclass(cls, _Fp32AffineBatchNorm):
        return
    if cls not in _FP32_AFFINE_CLASSES:
        _FP32_AFFINE_CLASSES[cls] = type(cls.__name__, (_Fp32AffineBatchNorm, cls), {"__module__": cls.__module__})
    module.__class__ = _FP32_AFFINE_CLASSES[cls]


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Apply fully_shard per block, per head and at the root of a MultiTaskSiamese.

    Under bf16 every BatchNorm (SyncBatchNorm included) reads its weights as fp32 (see above) inside its
    block's unit. Units stay unsharded from their first forward to the end of the step
    (``reshard_after_forward=False`` and no reshard after backward): a step calls each unit once per view
    (per-view mode), on the online and the target side, and resharding after each call would all-gather it
    again for every view and again in backward. The price is one unsharded copy of the model per rank in the
    compute dtype during the step (bf16, online and target with their heads: ResNet-50 about 150 MB, ViT-B about 0.5 GB), as in
    ZeRO-2; gradients and optimiser state stay sharded. The step must end with ``reshard_all`` before the
    optimiser step.
    """
    policy = mixed_precision_policy(precision)
    if precision == "bf16":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                fp32_affine_batch_norm(module)
    encoders = [model.online] + ([model.target] if model.target is not None else [])
    units = []
    for encoder in encoders:
        units += backbone_blocks(encoder.backbone) + [encoder.backbone, encoder.projector]
    units += list(model.predictors.values())
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    model.set_reshard_after_backward(False)
    return model


def reshard_all(model: nn.Module) -> None:
    """Reshard every FSDP unit of ``model`` (no collective; a no-op on a plain model).

    Call at the end of each step's forward and backward, before the optimiser step and the EMA update: the
    optimiser and the EMA update the sharded parameters, and a unit still unsharded would run the next
    forward on its stale copy (FSDP all-gathers only a resharded unit) and list that copy in ``parameters()``.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
