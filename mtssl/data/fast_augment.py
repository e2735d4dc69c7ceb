"""The ``fast`` pipeline: the same augmentation distributions as ``mtssl.data.torchvision_augment``.

``FastMultiViewTransform`` is a drop-in replacement for ``MultiViewTransform``: same contract
(PIL image -> list of uint8 CHW views in layout order in the worker; ``to_views`` normalises a
batch on the device) and the same augmentation distributions (crop scale and ratio, flip,
jitter, grayscale, blur, solarize probabilities and parameter ranges, cutout area). Pixel values
differ slightly: colour ops run in float without the uint8 rounding between ops (one rounding
at the end), and blur taps beyond 4 sigma (< 1e-4 of the kernel's weight) are dropped. Where the
time goes, per source image, all on the CPU worker:

1. Every view's crop box is sampled first, from the image size alone (the JPEG header).
2. Decode at reduced size (PIL ``draft``: DCT-domain 1/2, 1/4, 1/8 scaling) when every box
   still covers at least its output size at that scale. This needs an image that is not yet
   decoded (``Image.open`` without ``convert``); a decoded image is used as it is.
3. Crop + bicubic antialiased resize on uint8 channels-last (torch's vectorised uint8 kernel),
   then the flip, on the small uint8 crop.
4. One uint8 -> float conversion per view, to planar (contiguous CHW) layout, kept in the 0..255
   range, and one rounding back to uint8 at the end (what crosses to the main process); the 1/255
   is folded into the normalisation on the device (one ``addcmul`` in ``to_views``).
5. Colour jitter on the small crop: brightness, contrast and saturation as single
   ``mul``/``lerp`` ops (clamped only when a factor can leave the range), hue as a direct
   HSV rotation without ``where``/``remainder`` (10-30x slower per element than arithmetic on
   the CPU; solarize likewise); grayscale drops to one channel, so blur and solarize then touch
   a third of the data (broadcast back to three channels on uint8).
6. Separable Gaussian blur as shifted adds (2 x taps ops, vs k^2 MACs per pixel of the 2-D
   kernel), with reflect padding as in torchvision.

``benchmarks/data_pipeline.py --profile`` times each of these stages.

All randomness comes from torch's global RNG, so ``AugmentedImageFolder``'s per-sample seeding
keeps the stream a function of (seed, epoch, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mtssl.data.torchvision_augment import Cutout
from mtssl.data.views import ViewLayout

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
BLUR_TRUNCATE_SIGMAS = 4.0  # taps beyond 4 sigma hold < 1e-4 of a Gaussian's weight
SOLARIZE_THRESHOLD = 128.0  # on the 0..255 scale, as v2.RandomSolarize(128) on uint8
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision


def sample_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box, drawn exactly as torchvision draws it."""
    return RandomResizedCrop.get_params(torch.empty(0, height, width), list(scale), list(ratio))


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def _happens(p: float) -> bool:
    """One Bernoulli(p) draw; draws nothing for p in {0, 1}, like a skipped transform."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return bool(torch.rand(1).item() < p)


def gaussian_taps(kernel_size: int, sigma: float) -> list[float]:
    """Normalised Gaussian weights over ``kernel_size`` taps, truncated at 4 sigma."""
    radius = min(kernel_size // 2, max(1, math.ceil(BLUR_TRUNCATE_SIGMAS * sigma)))
    weights = [math.exp(-0.5 * (d / sigma) ** 2) for d in range(-radius, radius + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def separable_blur(image: torch.Tensor, taps: Sequence[float]) -> torch.Tensor:
    """Blur a [C, H, W] float image with the 1-D kernel ``taps`` along W then H (reflect padding)."""
    radius = len(taps) // 2
    height, width = image.shape[-2:]
    padded = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")[0]
    rows = padded[:, :, 0:width] * taps[0]
    for i in range(1, len(taps)):
        rows.add_(padded[:, :, i : i + width], alpha=taps[i])
    out = rows[:, 0:height] * taps[0]
    for i in range(1, len(taps)):
        out.add_(rows[:, i : i + height], alpha=taps[i])
    return out


def grayscale(image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[3, H, W] -> [1, H, W] luma (one matrix-vector product)."""
    return (weights @ image.reshape(3, -1)).view(1, *image.shape[1:])


def adjust_hue(image: torch.Tensor, shift: float | torch.Tensor, bound: float = 255.0) -> torch.Tensor:
    """Rotate the HSV hue of a [..., 3, H, W] image in [0, bound] by ``shift`` turns (a number, or a
    tensor broadcasting against [..., H, W], e.g. [B, 1, 1]: one shift per image).

    The same map as torchvision's rgb -> hsv -> rgb, written directly: value v (max) and chroma c
    (max - min) are kept, and channel n becomes v - c * clamp(2 - d_n, 0, 1), d_n the distance on
    the hue circle (6 units around) from the rotated hue 6 h' to 3, 5, 1 for R, G, B. No ``where``,
    comparison or ``remainder``: on the CPU those run 5-30x slower per element than arithmetic, so
    torchvision's sextant is picked by lerp (exact at weights 0 and 1) and the wrap uses floor.
    """
    red, green, blue = image.unbind(-3)
    maxc = torch.maximum(torch.maximum(red, green), blue)  # faster than aminmax over dim 0
    minc = torch.minimum(torch.minimum(red, green), blue)
    chroma = maxc - minc
    # 0 where the channel is the max, else 1 (a gap below 1e-30 of the 0..bound scale would blend the
    # two sextants' hues of a pixel whose chroma is below 1e-30: no visible difference)
    red_below = (maxc - red).mul_(1e30).clamp_(max=1.0)
    green_below = (maxc - green).mul_(1e30).clamp_(max=1.0)
    # 6 h' * chroma: g - b if red is the max, else b - r + 2c if green is, else r - g + 4c
    not_red = torch.lerp((blue - red).add_(chroma, alpha=2.0), (red - green).add_(chroma, alpha=4.0), green_below)
    hue6 = torch.lerp(green - blue, not_red, red_below)
    hue6.mul_(torch.reciprocal(chroma.clamp_min(1e-12 * bound)))  # chroma 0 -> any hue, output = v
    hue6.add_(6.0 * shift + 6.0)  # wrapped to [0, 6) for any shift
    hue6.sub_(torch.floor(hue6 * (1.0 / 6.0)).mul_(6.0))
    distance = torch.empty_like(image)  # no constant tensor to copy to the device
    for channel, centre in enumerate((3.0, 5.0, 1.0)):
        torch.sub(hue6, centre, out=distance.select(-3, channel))
    # |6 h' - centre| in [0, 5]; the shorter way round is 3 - | |.| - 3 |, so 2 - d = | |.| - 3 | - 1
    weight = distance.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return maxc.unsqueeze(-3) - weight.mul_(chroma.unsqueeze(-3))


def solarize(image: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD, bound: float = 255.0) -> torch.Tensor:
    """``bound - x`` where ``x >= threshold``, else ``x`` (a lerp on the mask: ``where`` is slow on the CPU)."""
    return torch.lerp(image, bound - image, (image >= threshold).to(image.dtype))


@dataclass(frozen=True)
class _ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    cutout_area: tuple[float, float] | None
    blur_kernel: int
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue


def view_specs(layout: ViewLayout) -> list[_ViewSpec]:
    """Each view's crop size, scale, probabilities and strengths, in layout order."""
    specs = []
    for name, index in layout.entries:
        view = layout.type(name)
        specs.append(
            _ViewSpec(
                size=view.size,
                scale=tuple(view.scale),
                blur_p=view.blur_probability(index),
                solarize_p=view.solarize_probability(index),
                cutout_area=tuple(view.cutout_area) if view.cutout_area is not None else None,
                blur_kernel=view.blur_kernel_px(),
                jitter=tuple(view.jitter),
            )
        )
    return specs


class FastMultiViewTransform:
    """PIL image -> list of uint8 views in ``layout`` order (same contract as MultiViewTransform).

    Pass a lazily opened JPEG (``Image.open(path)``, not yet converted) to let it decode at
    reduced size when every crop allows; ``reduced_decodes`` counts how often that happened.
    """

    decodes_images = True  # AugmentedImageFolder hands it the undecoded file

    def __init__(self, layout: ViewLayout, mean: Sequence[float], std: Sequence[float]):
        self.layout = layout
        self.views = view_specs(layout)
        mean_t = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        self.cutout_fill = mean_t * 255.0  # the dataset mean, on the 0..255 working scale
        self.norm_scale = 1.0 / (255.0 * std_t)  # (x / 255 - mean) / std = x * scale + shift
        self.norm_shift = -mean_t / std_t
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gray_weights = torch.tensor(GRAY_WEIGHTS).view(1, 3)
        self.reduced_decodes = 0

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [_to_uint8(x) for x in self.float_views(image)]

    def float_views(self, image: Image.Image) -> list[torch.Tensor]:
        """The views before the final rounding: float on the 0..255 scale, [1, H, W] for a
        grayscale view (``__call__`` rounds them to uint8 [3, H, W])."""
        width, height = image.size
        boxes = [sample_crop_box(height, width, v.scale) for v in self.views]
        image, boxes = self._decode(image, boxes)
        source = image_tensor(image)
        return [self._view(source, box, view) for box, view in zip(boxes, self.views)]

    def to_views(self, batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """uint8 [B, 3, H, W] per view -> float32 normalised views on ``device``: x * scale + shift,
        with the 1/255 folded into the scale (one ``addcmul`` per view)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = (self.norm_shift.to(device), self.norm_scale.to(device))
        shift, scale = self._on_device[device]
        return [torch.addcmul(shift, view.to(device, non_blocking=True).float(), scale) for view in batch]

    def _decode(self, image: Image.Image, boxes):
        image, new_boxes = decode_for_crops(image, boxes, [v.size for v in self.views])
        if new_boxes is not boxes:
            self.reduced_decodes += 1
        return image, new_boxes

    def _view(self, source: torch.Tensor, box, view: _ViewSpec) -> torch.Tensor:
        crop = crop_resize(source, box, view.size)
        if _happens(FLIP_P):
            crop = crop.flip(-1)
        x = crop.to(torch.float32, memory_format=torch.contiguous_format)  # 0..255 from here on; planar: the colour ops read whole channels
        if view.cutout_area is not None:  # after the flip, before colour jitter
            ct, cl, ch, cw = Cutout.sample_box(view.size, view.size, view.cutout_area, CROP_RATIO)
            x[:, ct : ct + ch, cl : cl + cw] = self.cutout_fill
        if _happens(JITTER_P):
            x = self._color_jitter(x, view.jitter)
        if _happens(GRAYSCALE_P):
            x = grayscale(x, self.gray_weights)  # one channel; broadcast back at normalisation
        if _happens(view.blur_p):
            x = separable_blur(x, gaussian_taps(view.blur_kernel, _uniform(*BLUR_SIGMA)))
        if _happens(view.solarize_p):
            x = solarize(x)
        return x

    def _color_jitter(self, x: torch.Tensor, strengths: Sequence[float]) -> torch.Tensor:
        """ColorJitter(brightness, contrast, saturation, hue): the four ops in a random order, as
        torchvision draws it (a factor range starting below 0 is clipped at 0, as there)."""
        brightness, contrast, saturation, hue = strengths
        order = torch.randperm(4).tolist()
        b = _uniform(max(0.0, 1 - brightness), 1 + brightness)
        c = _uniform(max(0.0, 1 - contrast), 1 + contrast)
        s = _uniform(max(0.0, 1 - saturation), 1 + saturation)
        h = _uniform(-hue, hue)
        for op in order:
            if op == 0:
                x = x.mul_(b)
                if b > 1:
                    x.clamp_max_(255.0)
            elif op == 1:  # blend with the mean luma
                mean = self.gray_weights @ x.reshape(3, -1).mean(dim=1)
                x = torch.lerp(mean.view(1, 1, 1), x, c)
                if c > 1:
                    x.clamp_(0.0, 255.0)
            elif op == 2:  # blend with the luma image
                x = torch.lerp(grayscale(x, self.gray_weights), x, s)
                if s > 1:
                    x.clamp_(0.0, 255.0)
            else:
                x = adjust_hue(x, h)
        return x


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded RGB image -> uint8 [1, 3, H, W] with channels-last strides (one copy of the pixels)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # H, W, 3
    return pixels.permute(2, 0, 1).unsqueeze(0)


def crop_resize(source: torch.Tensor, box, size: int) -> torch.Tensor:
    """The ``box`` (top, left, h, w) of a uint8 [1, 3, H, W] image, bicubic-antialias resized to
    ``size`` x ``size`` on uint8 channels-last (torch's vectorised uint8 kernel): uint8 [3, size, size]."""
    top, left, h, w = box
    crop = source[..., top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def decode_for_crops(image: Image.Image, boxes, sizes: Sequence[int]):
    """Decode ``image`` to RGB, at reduced size (JPEG DCT scaling) when every crop box still covers at
    least its output size, and return (decoded image, boxes on it); the boxes are the same list when
    the decode was full size."""
    width, height = image.size
    factor = min(min(h, w) / size for (_, _, h, w), size in zip(boxes, sizes))
    if factor >= 2 and getattr(image, "format", None) == "JPEG":
        image.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
    image.load()  # decode here (a lazily opened file would decode on first access)
    if image.mode != "RGB":
        image = image.convert("RGB")
    new_width, new_height = image.size
    if (new_width, new_height) != (width, height):
        sx, sy = new_width / width, new_height / height
        boxes = [_scale_box(box, sy, sx, new_height, new_width) for box in boxes]
    return image, boxes


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A float 0..255 view -> uint8 [3, H, W] (round half to even; a grayscale view is broadcast).
    Rounds ``x`` in place: the worker's float views are temporaries."""
    return x.clamp_(0.0, 255.0).round_().to(torch.uint8).expand(3, -1, -1).contiguous()


def _scale_box(box, sy: float, sx: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A crop box of the full-size image mapped onto the reduced decode."""
    top, left, h, w = box
    new_top, new_left = min(height - 1, round(top * sy)), min(width - 1, round(left * sx))
    new_h = max(1, min(height - new_top, round(h * sy)))
    new_w = max(1, min(width - new_left, round(w * sx)))
    return new_top, new_left, new_h, new_w
