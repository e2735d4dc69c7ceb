"""The ``data.pipeline`` registry: implementations of the same augmentation distributions."""

from __future__ import annotations

from mtssl.data.fast_augment import FastMultiViewTransform
from mtssl.data.gpu_augment import GpuMultiViewTransform
from mtssl.data.views import MultiViewTransform

# name -> class(layout, mean, std). An instance's ``__call__`` is the worker part (under the sample's seed);
# optional ``collate`` batches its outputs (default: stack each view) and ``to_views(batch, device)``, run on
# the device after the copy, returns the normalised float views.
AUGMENTATION_PIPELINES = {"torchvision": MultiViewTransform, "fast": FastMultiViewTransform, "gpu": GpuMultiViewTransform}
