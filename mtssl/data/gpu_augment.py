"""The multi-view augmentation on the training device, batched, with per-sample random parameters.

Same augmentation distributions as ``mtssl.data.views`` and ``mtssl.data.fast_augment``; the parameters
are drawn as ``fast`` draws them, in the same order, so under one seed both pipelines pick the same
crops, flips, jitter, ... for a sample. The work is split in two:

* Worker (``__call__``, under the per-sample seed): read the file, draw every random parameter of
  every view (crop boxes first, to choose the reduced JPEG decode as ``fast`` does), decode, and
  cut the views' crop boxes out of the uint8 image. It returns one small float parameter table
  [views, NUM_PARAMS] and the uint8 crops. Cutting the crops here costs a copy, but keeps the crop
  geometry in the tensors' shapes: the device part then never reads a value back from the device.
  With ``decode_on_device`` (``data.gpu_decode``) it returns the JPEG bytes instead, and the device
  decodes them with nvJPEG (``torchvision.io.decode_jpeg``) - not verified on CUDA.
* Device (``to_views``, a deterministic function of the batch): per crop one antialiased bicubic
  resize (sources differ in size), then everything on [B, 3, S, S] at once with per-sample
  parameter tensors: flip, cutout, colour jitter in each sample's own op order (every op runs at
  each of the 4 positions, an identity for the samples that have another op there), grayscale,
  Gaussian blur (one depthwise conv with a kernel per sample), solarize and normalisation.

torchvision's v2 transforms applied to a batch draw one set of parameters for the whole batch;
here each sample keeps its own, so a sample's views do not depend on the rest of its batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtssl.data import fast_augment
from mtssl.data.fast_augment import (
    BLUR_SIGMA, BLUR_TRUNCATE_SIGMAS, CROP_RATIO, FLIP_P, GRAY_WEIGHTS, GRAYSCALE_P, JITTER_P, SOLARIZE_THRESHOLD,
    _happens, _uniform, _ViewSpec, adjust_hue, decode_for_crops, view_specs,
)
from mtssl.data.torchvision_augment import Cutout
from mtssl.data.views import ViewLayout

# Columns of the parameter table: one row per view.
FLIP = 0
CUTOUT = slice(1, 5)  # top, left, h, w on the output crop (zeros for views without cutout)
JITTER = 5  # 1: colour jitter applied
ORDER = slice(6, 10)  # jitter op at each position: 0 brightness, 1 contrast, 2 saturation, 3 hue
FACTORS = slice(10, 14)  # brightness, contrast, saturation factors and hue shift (identities when not applied)
GRAY = 14
BLUR = 15  # 1: blurred, with sigma in column SIGMA
SIGMA = 16
SOLARIZE = 17
BOX = slice(18, 22)  # the crop box (top, left, h, w) on the full-size image
IMAGE_SIZE = slice(22, 24)  # full-size image height, width
NUM_PARAMS = 24


class GpuMultiViewTransform:
    """Image file -> views in ``layout`` order, augmented on the training device (see the module doc).

    Pipeline contract: ``__call__`` (worker) -> [parameters, crop per view] (uint8 HWC crops) or, with
    ``decode_on_device``, [parameters, JPEG bytes]; ``collate`` stacks the parameters into [B, views,
    NUM_PARAMS] followed by the per-sample tensors; ``to_views(batch, device)`` -> normalised float
    [B, 3, S, S] per view.
    """

    decodes_images = True  # AugmentedImageFolder hands it the undecoded file

    def __init__(self, layout: ViewLayout, mean: Sequence[float], std: Sequence[float], decode_on_device: bool = False):
        self.layout = layout
        self.views = view_specs(layout)
        self.decode_on_device = decode_on_device
        mean_t = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        # (x / 255 - mean) / std = x * scale + shift; cutout fill = the mean on the 0..255 scale
        self._constants = {torch.device("cpu"): (1.0 / (255.0 * std_t), -mean_t / std_t, mean_t * 255.0)}
        self.reduced_decodes = 0

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The normalisation and fill constants on ``device``, copied once (a copy from the host waits for it)."""
        if device not in self._constants:
            self._constants[device] = tuple(t.to(device) for t in self._constants[torch.device("cpu")])
        return self._constants[device]

    # ------------------------------------------------------------------ worker
    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        width, height = image.size
        boxes = [fast_augment.sample_crop_box(height, width, v.scale) for v in self.views]
        params = torch.stack([self.draw_parameters(v) for v in self.views])
        params[:, BOX] = torch.tensor(boxes, dtype=torch.float32)
        params[:, IMAGE_SIZE] = torch.tensor([float(height), float(width)])
        if self.decode_on_device:
            if getattr(image, "format", None) == "JPEG":
                with open(image.filename, "rb") as f:  # decoded on the device, at full size
                    return [params, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)]
            return [params, torch.from_numpy(np.asarray(image.convert("RGB")).copy())]  # H, W, 3
        decoded, crop_boxes = decode_for_crops(image, boxes, [v.size for v in self.views])
        if crop_boxes is not boxes:
            self.reduced_decodes += 1
        pixels = np.asarray(decoded)  # H, W, 3 uint8
        crops = [torch.from_numpy(pixels[t : t + h, l : l + w].copy()) for t, l, h, w in crop_boxes]
        return [params, *crops]

    @staticmethod
    def draw_parameters(view: _ViewSpec) -> torch.Tensor:
        """One view's random parameters, drawn from torch's global RNG in FastMultiViewTransform's order."""
        p = [0.0] * NUM_PARAMS
        p[FACTORS], p[SIGMA] = [1.0, 1.0, 1.0, 0.0], 1.0
        p[FLIP] = float(_happens(FLIP_P))
        if view.cutout_area is not None:
            p[CUTOUT] = Cutout.sample_box(view.size, view.size, view.cutout_area, CROP_RATIO)
        if _happens(JITTER_P):  # ColorJitter.make_params: the op order, then the four factors
            brightness, contrast, saturation, hue = view.jitter
            p[JITTER] = 1.0
            p[ORDER] = torch.randperm(4).tolist()
            p[FACTORS] = [
                _uniform(max(0.0, 1 - brightness), 1 + brightness),
                _uniform(max(0.0, 1 - contrast), 1 + contrast),
                _uniform(max(0.0, 1 - saturation), 1 + saturation),
                _uniform(-hue, hue),
            ]
        p[GRAY] = float(_happens(GRAYSCALE_P))
        if _happens(view.blur_p):
            p[BLUR], p[SIGMA] = 1.0, _uniform(*BLUR_SIGMA)
        p[SOLARIZE] = float(_happens(view.solarize_p))
        return torch.tensor(p, dtype=torch.float32)

    def collate(self, samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """[parameters [B, views, NUM_PARAMS], then view 0's crop of every sample, view 1's, ...], or with
        ``decode_on_device`` [parameters, each sample's JPEG bytes]."""
        params = torch.stack([s[0] for s in samples])
        per_sample = len(samples[0]) - 1
        return [params, *(s[1 + v] for v in range(per_sample) for s in samples)]

    # ------------------------------------------------------------------ device
    @torch.no_grad()
    def to_views(self, batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """The batch from ``collate`` -> normalised float views [B, 3, S, S] in layout order, on ``device``."""
        params = batch[0].to(device)
        size = params.shape[0]
        payloads = [t.to(device) for t in batch[1:]]
        if self.decode_on_device:
            crops = self._decode_and_crop(params, payloads, device)
        else:  # crops cut by the workers, HWC
            crops = [[c.permute(2, 0, 1) for c in payloads[v * size : (v + 1) * size]] for v in range(len(self.views))]
        scale, shift, fill = self._on(torch.device(device))
        views = []
        for v, spec in enumerate(self.views):
            x = augment_batch(resize_crops(crops[v], spec.size), params[:, v], spec, fill)
            views.append(torch.addcmul(shift, x, scale).contiguous())
        return views

    def _decode_and_crop(self, params: torch.Tensor, payloads: list[torch.Tensor], device: torch.device):
        """``decode_on_device``: decode the JPEG bytes with torchvision.io.decode_jpeg on ``device`` (nvJPEG on
        CUDA; not verified on CUDA) and cut the crop boxes. Reads the boxes and bytes back to the host (the
        trainer copies the whole batch to the device first): two device->host copies per batch."""
        from torchvision.io import ImageReadMode, decode_jpeg

        boxes = params[:, :, BOX].to("cpu", torch.int64).tolist()
        jpegs = [i for i, p in enumerate(payloads) if p.dim() == 1]
        decoded = decode_jpeg([payloads[i].cpu() for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        sources = [p.permute(2, 0, 1) if p.dim() == 3 else None for p in payloads]  # non-JPEG: decoded by the worker
        for i, image in zip(jpegs, decoded):
            sources[i] = image.to(device)
        return [[sources[b][:, t : t + h, l : l + w] for b, (t, l, h, w) in enumerate(box[v] for box in boxes)]
                for v in range(len(self.views))]


def resize_crops(crops: list[torch.Tensor], size: int, uint8_kernel: bool | None = None) -> torch.Tensor:
    """uint8 [3, h, w] crops (any sizes) -> [B, 3, size, size] float on the 0..255 scale: antialiased bicubic
    resize, one call per crop. ``uint8_kernel`` (default: on the CPU, the only device that has it): torch's
    uint8 kernel, as the fast pipeline (same pixels); else in float, clamped and rounded to uint8 levels
    (within one level of the uint8 kernel)."""
    out = []
    for crop in crops:
        x = crop.unsqueeze(0)
        if uint8_kernel if uint8_kernel is not None else x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).to(torch.float32)
        else:
            x = F.interpolate(x.to(torch.float32), size=(size, size), mode="bicubic", antialias=True)
            x = x.clamp_(0.0, 255.0).round_()
        out.append(x)
    return torch.cat(out)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] ITU-R 601-2 luma, as torchvision's grayscale."""
    red, green, blue = x.unsqueeze(2).unbind(1)
    return red * GRAY_WEIGHTS[0] + green * GRAY_WEIGHTS[1] + blue * GRAY_WEIGHTS[2]


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[B] sigmas -> [B, kernel_size] normalised Gaussian taps, cut at 4 sigma (as fast_augment.gaussian_taps)."""
    radius = kernel_size // 2
    d = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    reach = torch.ceil(BLUR_TRUNCATE_SIGMAS * sigma).clamp(1, radius).unsqueeze(1)
    taps = torch.exp(-0.5 * (d / sigma.unsqueeze(1)) ** 2) * (d.abs() <= reach)
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with one sigma per image (reflect padding, as torchvision)."""
    b, c, h, w = x.shape
    radius = kernel_size // 2
    taps = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # [B * C, K]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect").reshape(1, b * c, h + 2 * radius, w + 2 * radius)
    rows = F.conv2d(padded, taps.view(b * c, 1, 1, kernel_size), groups=b * c)
    return F.conv2d(rows, taps.view(b * c, 1, kernel_size, 1), groups=b * c).view(b, c, h, w)


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each sample's own op order and factors ([B, NUM_PARAMS] table), on [B, 3, H, W] in 0..255.

    At each of the 4 positions every op runs on the whole batch with each sample's factor where that
    sample has this op there, else the identity (factor 1: ``x * 1`` and ``lerp(., x, 1)`` return x exactly;
    the hue rotation is selected with ``where``). Clamping always is as clamping when a factor is > 1 only:
    a factor <= 1 keeps values in range.
    """
    b = x.shape[0]
    applied = params[:, JITTER] > 0
    order = params[:, ORDER]
    factors = params[:, FACTORS]
    for position in range(4):
        at = [(applied & (order[:, position] == op)).view(b, 1, 1, 1) for op in range(4)]
        one = torch.ones_like(factors[:, 0]).view(b, 1, 1, 1)
        x = x.mul(torch.where(at[0], factors[:, 0].view(b, 1, 1, 1), one)).clamp_max_(255.0)
        mean = luma(x).mean(dim=(2, 3), keepdim=True)  # contrast: blend with the mean luma
        x = torch.lerp(mean, x, torch.where(at[1], factors[:, 1].view(b, 1, 1, 1), one)).clamp_(0.0, 255.0)
        x = torch.lerp(luma(x), x, torch.where(at[2], factors[:, 2].view(b, 1, 1, 1), one)).clamp_(0.0, 255.0)
        x = torch.where(at[3], adjust_hue(x, factors[:, 3].view(b, 1, 1)), x)
    return x


def augment_batch(x: torch.Tensor, params: torch.Tensor, view: _ViewSpec, fill: torch.Tensor) -> torch.Tensor:
    """Everything after the resize, in the specification's order, on [B, 3, S, S] (0..255) with one row
    of ``params`` per sample; ``fill`` is the cutout colour [1, 3, 1, 1] on the 0..255 scale."""
    b, _, h, w = x.shape
    def mask(column: int) -> torch.Tensor:
        return (params[:, column] > 0).view(b, 1, 1, 1)

    x = torch.where(mask(FLIP), x.flip(-1), x)
    if view.cutout_area is not None:  # after the flip, before colour jitter
        top, left, ch, cw = params[:, CUTOUT].unbind(1)
        rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
        cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
        inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + ch).view(b, 1, 1))
                  & (cols >= left.view(b, 1, 1)) & (cols < (left + cw).view(b, 1, 1)))
        x = torch.where(inside.unsqueeze(1), fill, x)
    if JITTER_P > 0:
        x = color_jitter(x, params)
    x = torch.where(mask(GRAY), luma(x).expand_as(x), x)
    if view.blur_p > 0:
        x = torch.where(mask(BLUR), gaussian_blur(x, params[:, SIGMA], view.blur_kernel), x)
    if view.solarize_p > 0:
        x = torch.where(mask(SOLARIZE) & (x >= SOLARIZE_THRESHOLD), 255.0 - x, x)
    return x
