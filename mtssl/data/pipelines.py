"""``data.pipeline``: the registry of multi-view augmentation pipelines.

Each entry is called as ``AUGMENTATION_PIPELINES[name](layout, mean, std)``. All of them implement
the same augmentation distributions (``mtssl.data.views``).
"""

from __future__ import annotations

from mtssl.data.fast_augment import FastMultiViewTransform
from mtssl.data.torchvision_augment import MultiViewTransform

AUGMENTATION_PIPELINES = {
    "torchvision": MultiViewTransform,
    "fast": FastMultiViewTransform,
    # "gpu": GpuMultiViewTransform (mtssl/data/gpu_augment.py) goes here.
}
