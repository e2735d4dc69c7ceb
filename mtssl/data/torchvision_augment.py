"""The ``torchvision`` pipeline: the view specs of ``mtssl.data.views`` as torchvision v2 ops, plus
Cutout and the validation transform.

All geometric and colour ops run on uint8 tensors in the DataLoader worker; the views cross to the
main process and the device as uint8 (a quarter of float32's bytes), and ``to_views`` converts
them to float and normalises them there, with torchvision's own arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision.transforms import v2

from mtssl.data.views import ViewLayout, ViewType


class Cutout(torch.nn.Module):
    """Mask one rectangle of U(area) of the image with the dataset mean.

    Aspect ratio is log-uniform in [3/4, 4/3]. Works on uint8 CHW tensors (fill = mean * 255).
    """

    def __init__(self, area: tuple[float, float], mean: Sequence[float], ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.area = area
        self.ratio = ratio
        self.fill = torch.tensor([round(m * 255) for m in mean], dtype=torch.uint8).view(-1, 1, 1)

    @staticmethod
    def sample_box(height: int, width: int, area, ratio) -> tuple[int, int, int, int]:
        """Return (top, left, h, w) of the masked rectangle."""
        target_area = height * width * torch.empty(1).uniform_(area[0], area[1]).item()
        log_ratio = torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item()
        aspect = math.exp(log_ratio)
        h = min(height, max(1, round(math.sqrt(target_area * aspect))))
        w = min(width, max(1, round(target_area / h)))
        top = int(torch.randint(0, height - h + 1, (1,)).item())
        left = int(torch.randint(0, width - w + 1, (1,)).item())
        return top, left, h, w

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.sample_box(image.shape[-2], image.shape[-1], self.area, self.ratio)
        image = image.clone()
        image[..., top : top + h, left : left + w] = self.fill.to(image.dtype)
        return image


def build_view_transform(view: ViewType, index: int, mean) -> v2.Compose:
    """The augmentation of the ``index``-th view of ``view``: uint8 CHW tensor -> uint8 CHW view
    (``MultiViewTransform.to_views`` normalises it)."""
    ops: list[torch.nn.Module] = [
        v2.RandomResizedCrop(view.size, scale=view.scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
    ]
    if view.cutout_area is not None:  # after the flip, before colour jitter
        ops.append(Cutout(view.cutout_area, mean))
    ops += [
        v2.RandomApply([v2.ColorJitter(*view.jitter)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(view.blur_kernel_px(), sigma=(0.1, 2.0))], p=view.blur_probability(index)),
    ]
    if view.solarize_probability(index) > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_probability(index)))
    return v2.Compose(ops)


class MultiViewTransform:
    """PIL image -> list of uint8 views in ``layout`` order (the worker part); ``to_views`` turns
    a batch of them into normalised float views on the device."""

    def __init__(self, layout: ViewLayout, mean, std):
        self.layout = layout
        self.to_tensor = v2.PILToTensor()
        self.transforms = [build_view_transform(layout.type(name), i, mean) for name, i in layout.entries]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, image) -> list[torch.Tensor]:
        image = self.to_tensor(image.convert("RGB"))
        return [t(image) for t in self.transforms]

    def to_views(self, batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """uint8 [B, 3, H, W] per view -> float32 normalised views on ``device``.

        The arithmetic of ``v2.ToDtype(float32, scale=True)`` then ``v2.Normalize(mean, std)``, in
        that order, so CPU views are bitwise those of the per-sample pipeline; mean and std are
        kept on the device (``v2.Normalize`` builds them from lists per call: a blocking copy).
        """
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        mean, std = self._on_device[device]
        views = []
        for view in batch:
            x = v2.functional.to_dtype(view.to(device, non_blocking=True), torch.float32, scale=True)
            views.append(x.sub_(mean).div_(std))
        return views


EVAL_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def build_eval_transform(mean, std, resize: int | None, crop: int | None, interpolation: str = "bilinear") -> v2.Compose:
    """Validation transform: resize (``interpolation``: bilinear, bicubic or nearest) then centre
    crop, both skipped when null (e.g. CIFAR at 32 px)."""
    ops: list[Any] = [v2.PILToTensor()]
    if resize:
        ops.append(v2.Resize(resize, interpolation=EVAL_INTERPOLATIONS[interpolation], antialias=True))
    if crop:
        ops.append(v2.CenterCrop(crop))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)
