"""Backbone, projector/predictor MLPs and the multi-task Siamese network.

The online branch is backbone -> projector -> predictor of the view's type. The target branch
is a backbone -> projector only (never a predictor): an EMA copy for BYOL and MoCo v3, or, for
SimSiam, the online projections of the global views under stop-gradient (no extra forward).
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import timm
import torch
from timm.layers import DropPath
from torch import nn

from mtssl.model.ghost_bn import GhostBatchNorm, grouped_views_mode, view_batching_mode

SHARED_PREDICTOR = "shared"


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, last_bn: bool = False) -> nn.Sequential:
    """Hidden layers Linear(no bias) -> BN -> ReLU; last layer Linear(bias); optional non-affine BN."""
    layers: list[nn.Module] = []
    dim = in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def build_backbone(timm_name: str, small_images: bool = False, **timm_kwargs) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): returns pooled / CLS features.

    ``small_images`` adapts it to 32 px inputs as is usual for CIFAR: a 3x3 stride-1 stem
    without max-pool for ResNets, 4 px patches for ViTs. ViTs accept mixed crop sizes through
    timm's dynamic image size.
    """
    kwargs = dict(num_classes=0, pretrained=False, **timm_kwargs)
    is_vit = timm_name.startswith(("vit_", "deit_"))
    if is_vit:
        kwargs.setdefault("dynamic_img_size", True)
        if small_images:
            kwargs.setdefault("img_size", 32)
            kwargs.setdefault("patch_size", 4)
    model = timm.create_model(timm_name, **kwargs)
    if small_images and not is_vit and hasattr(model, "conv1") and hasattr(model, "maxpool"):
        out_channels = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def without_drop_path(module: nn.Module) -> nn.Module:
    """Replace every timm ``DropPath`` in ``module`` by an identity, in place; returns ``module``.

    The EMA target of a drop-path recipe (ViT BYOL: online only) runs in train mode like the
    online network, so its stochastic depth has to be removed, not just switched off by eval().
    DropPath holds no parameters: state dicts and FSDP shards are unchanged.
    """
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, DropPath):
                setattr(parent, name, nn.Identity())
    return module


def backbone_kwargs(backbone_cfg) -> dict:
    """timm arguments of a ``backbone`` config: ``kwargs`` plus ``zero_init_last`` when set (ResNets)."""
    kwargs = dict(backbone_cfg.get("kwargs") or {})
    if backbone_cfg.get("zero_init_last") is not None:
        kwargs["zero_init_last"] = bool(backbone_cfg.zero_init_last)
    return kwargs


def feature_dim(backbone: nn.Module) -> int:
    return backbone.num_features


class Encoder(nn.Module):
    """Backbone followed by projector: the part shared by online and target branches."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))


class MultiTaskSiamese(nn.Module):
    """Shared encoder, one predictor per view type (or one shared), and an optional EMA target.

    ``forward(views, view_types, target_indices)`` runs one training forward:
      * the online encoder and the predictor of each view's type on every view;
      * the target encoder on the target (global) views only, under no_grad.
    BatchNorm statistics are per view (one call per view), as in the paper. ``grouped_views``:
      * "ghost": same-resolution views go through the backbone in one call, all views through the
        projector in one call and each predictor's views through it in one call, while every BN
        layer normalises each view's chunk with its own statistics (``mtssl.model.ghost_bn``): the same
        outputs, gradients and running statistics as per-view calls, faster;
      * "plain" (or True): one backbone call per resolution with BN statistics over the group,
        projector still per view: faster, but a change of BN semantics.
    """

    def __init__(
        self,
        encoder: Encoder,
        predictors: Mapping[str, nn.Module],
        ema_target: bool,
        grouped_views: bool | str | None = False,
    ):
        super().__init__()
        self.online = encoder
        self.predictors = nn.ModuleDict(dict(predictors))
        self.target = copy.deepcopy(encoder) if ema_target else None
        if self.target is not None:
            self.target.requires_grad_(False)
        self.grouped_views = grouped_views_mode(grouped_views)  # None | "ghost" | "plain"
        self._ghost_bn: dict[int, GhostBatchNorm] = {}  # per encoder, reused across steps

    def predictor_for(self, view_type: str) -> nn.Module:
        if SHARED_PREDICTOR in self.predictors:
            return self.predictors[SHARED_PREDICTOR]
        return self.predictors[view_type]

    def _ghost_context(self, module: nn.Module) -> GhostBatchNorm:
        """The module's ghost-BN context, reused across steps (rebuilt if its BN layers were swapped)."""
        ghost = self._ghost_bn.get(id(module))
        if ghost is None or not ghost.covers(module):  # first call, or BN layers swapped (SyncBN)
            ghost = self._ghost_bn[id(module)] = GhostBatchNorm(module)
        return ghost

    def _encode(self, encoder: Encoder, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.grouped_views:
            return [encoder(x) for x in views]
        outputs: list[torch.Tensor | None] = [None] * len(views)
        by_shape = _indices_by([tuple(x.shape[1:]) for x in views])
        if self.grouped_views == "ghost":
            # One backbone call per resolution, then one projector call for every view (pooled
            # features have one size); BN statistics per view chunk throughout.
            order: list[int] = []
            features = []
            with self._ghost_context(encoder) as ghost:
                for indices in by_shape:
                    with ghost.views(indices):
                        features.append(encoder.backbone(torch.cat([views[i] for i in indices])))
                    order += indices
                with ghost.views(order):
                    projections = encoder.projector(torch.cat(features) if len(features) > 1 else features[0])
            _scatter_chunks(projections, order, outputs)
            return outputs  # type: ignore[return-value]
        # "plain": one backbone call per resolution; projector still per view so its BN stays per view.
        for indices in by_shape:
            features = encoder.backbone(torch.cat([views[i] for i in indices]))
            for i, chunk in zip(indices, features.chunk(len(indices))):
                outputs[i] = encoder.projector(chunk)
        return outputs  # type: ignore[return-value]

    def _predict(self, projections: Sequence[torch.Tensor], view_types: Sequence[str]) -> list[torch.Tensor]:
        if self.grouped_views != "ghost":
            return [self.predictor_for(t)(z) for t, z in zip(view_types, projections)]
        # Ghost: one call per predictor on all the views it serves, BN statistics per view chunk.
        outputs: list[torch.Tensor | None] = [None] * len(projections)
        for indices in _indices_by([id(self.predictor_for(t)) for t in view_types]):
            predictor = self.predictor_for(view_types[indices[0]])
            with self._ghost_context(predictor) as ghost, ghost.views(indices):
                predictions = predictor(torch.cat([projections[i] for i in indices]))
            _scatter_chunks(predictions, indices, outputs)
        return outputs  # type: ignore[return-value]

    def forward(self, views: Sequence[torch.Tensor], view_types: Sequence[str], target_indices: Sequence[int],
                branch: str = "both"):
        """Return (predictions per view, target projections per target view, online projections).

        ``branch``: "online" runs the online network only and "target" the target network only
        (EMA target only), their other outputs empty; for one backward per view.
        """
        if branch == "target":
            with torch.no_grad():
                return [], self._encode(self.target, [views[i] for i in target_indices]), []
        projections = self._encode(self.online, views)
        predictions = self._predict(projections, view_types)
        if branch == "online":
            return predictions, [], projections
        with torch.no_grad():
            if self.target is None:  # SimSiam: the online network under stop-gradient
                targets = [projections[i].detach() for i in target_indices]
            else:
                targets = self._encode(self.target, [views[i] for i in target_indices])
        return predictions, targets, projections


def _indices_by(keys: Sequence) -> list[list[int]]:
    """Positions grouped by equal key; groups and positions in first-seen order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _scatter_chunks(batch: torch.Tensor, indices: Sequence[int], outputs: list) -> None:
    """outputs[indices[j]] <- the j-th of len(indices) equal chunks of a grouped call's batch."""
    for i, chunk in zip(indices, batch.chunk(len(indices))):
        outputs[i] = chunk


def build_model(cfg, task_names: Sequence[str], small_images: bool, ema_target: bool) -> MultiTaskSiamese:
    """Build the network from the ``backbone``, ``method`` and ``predictor`` config groups.

    ``backbone.drop_path_rate`` (timm stochastic depth) applies to the online backbone only.
    """
    timm_kwargs = backbone_kwargs(cfg.backbone)
    if cfg.backbone.get("drop_path_rate"):  # only when set: not every timm model takes the argument
        timm_kwargs["drop_path_rate"] = cfg.backbone.drop_path_rate
    backbone = build_backbone(cfg.backbone.timm_name, small_images=small_images, **timm_kwargs)
    proj = cfg.method.projector
    projector = mlp(feature_dim(backbone), list(proj.hidden_dims), proj.out_dim, proj.last_bn)
    pred = cfg.method.predictor
    keys = [SHARED_PREDICTOR] if cfg.predictor.mode == "shared" else list(task_names)
    predictors = {k: mlp(proj.out_dim, list(pred.hidden_dims), pred.out_dim, pred.last_bn) for k in keys}
    grouped = view_batching_mode(cfg.train.view_batching)  # checked before any weights are built
    model = MultiTaskSiamese(Encoder(backbone, projector), predictors, ema_target, grouped_views=grouped)
    if model.target is not None:
        without_drop_path(model.target)
    return model
