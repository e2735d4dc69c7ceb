"""``data.pipeline``: the registry of multi-view augmentation pipelines.

Each entry is called as ``AUGMENTATION_PIPELINES[name](layout, mean, std)``. All of them implement the same
augmentation distributions (``mtssl.data.views``). An instance's ``__call__`` is the worker part, run under the
sample's seed, and returns uint8 tensors; its optional ``collate`` batches them (default: stack each view);
``to_views(batch, device)``, run on the device after the copy, returns the normalised float views.
"""

from __future__ import annotations

from mtssl.data.fast_augment import FastMultiViewTransform
from mtssl.data.gpu_augment import GpuMultiViewTransform
from mtssl.data.torchvision_augment import MultiViewTransform

AUGMENTATION_PIPELINES = {
    "torchvision": MultiViewTransform,
    "fast": FastMultiViewTransform,
    "gpu": GpuMultiViewTransform,
}
