"""The multi-view augmentation on the training device, batched, with per-sample random parameters.

Same augmentation distributions as ``mtssl.data.views`` and ``mtssl.data.fast_augment``; the parameters
are drawn as ``fast`` draws them, in the same order, so under one seed both pipelines pick the same
crops, flips, jitter, ... for a sample. The work is split in three:

* Worker (``__call__``, under the per-sample seed): read the file, draw every random parameter of
  every view (crop boxes first, to choose the reduced JPEG decode as ``fast`` does), decode, and
  cut the views' crop boxes out of the uint8 image. It returns one small float parameter table
  [views, NUM_PARAMS] and the uint8 crops. Cutting the crops here costs a copy, but keeps the crop
  geometry in the tensors' shapes: the device part then never reads a value back from the device.
  With ``decode_on_device`` (``data.gpu_decode``) it returns the JPEG bytes and the path instead, and
  the device decodes them with nvJPEG (``torchvision.io.decode_jpeg``); a file nvJPEG cannot decode
  (CMYK/YCCK, seen in the header) is decoded and cropped by the worker as without it.
* Collate (in the worker too): everything the device needs goes into ONE uint8 buffer (the parameter
  table, the samples of each view's hue op, every crop in CHW order, view after view), described by a
  host-side ``BatchLayout`` (offsets and shapes, the JPEG bytes): the loader pins one buffer and the
  prefetcher makes one host-to-device copy per batch, whatever the batch size and number of views.
* Device (``to_views``, a deterministic function of the batch): per view one uint8 -> float conversion,
  per crop one antialiased bicubic resize (sources differ in size), then everything on [B, 3, S, S] at
  once with per-sample parameter tensors: flip, cutout, colour jitter in each sample's own op order
  (brightness, contrast and saturation run at each of the 4 positions as an identity for the samples with
  another op there; the hue rotation runs on the samples that have it there only), grayscale, Gaussian blur
  (one depthwise conv with a kernel per sample), solarize and normalisation. Nothing is read back to the host.

torchvision's v2 transforms applied to a batch draw one set of parameters for the whole batch;
here each sample keeps its own, so a sample's views do not depend on the rest of its batch.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
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
from mtssl.data.image_folder import DataError
from mtssl.data.torchvision_augment import Cutout
from mtssl.data.views import ViewLayout

log = logging.getLogger(__name__)

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
HUE = 3  # the hue op in ORDER

# CUDA's antialiased resize keeps its filter weights in shared memory (48 KB a block): for float32 crops it
# refuses a downscale above about 47x (1 + 2 ceil(2 s) taps per axis, 32 x 65 of them). Larger ones are first
# reduced by an integer factor with a box average (as a JPEG's DCT-domain reduced decode does), so the
# bicubic resize never goes beyond this factor.
MAX_ANTIALIAS_DOWNSCALE = 32
# JPEG colour modes (PIL's, read from the header) nvJPEG decodes; others (CMYK, YCCK) are decoded by the worker:
# torchvision's CUDA decoder does not enable nvJPEG's CMYK conversion.
NVJPEG_MODES = ("RGB", "L")


@dataclass(frozen=True)
class BatchLayout:
    """Where each part of a collated batch lies in its uint8 buffer; host values only (the prefetcher leaves it
    on the host: it copies tensors in lists and tuples only).

    Byte offsets: ``params`` (float32 [B, views, NUM_PARAMS]) and ``hue_index`` (int64 sample indices) are
    (start, end) spans; ``hue_rows[v][position]`` is (first, count) in the hue indices; ``crops[v][b]`` is
    (offset, h, w) of a CHW uint8 crop, or None for a sample decoded on the device, whose ``boxes[b][v]``
    (top, left, h, w on the full-size image) are cut there. ``jpegs``: (sample, path, bytes) to decode.
    """

    samples: int
    params: tuple[int, int]
    hue_index: tuple[int, int]
    hue_rows: tuple[tuple[tuple[int, int], ...], ...]
    view_pixels: tuple[tuple[int, int], ...]  # [v]: the byte span of view v's crops
    crops: tuple[tuple[tuple[int, int, int] | None, ...], ...]
    boxes: tuple[tuple[tuple[int, int, int, int], ...], ...] = ()
    jpegs: tuple[tuple[int, str, torch.Tensor], ...] = ()


def _aligned(offset: int, alignment: int = 8) -> int:
    return -(-offset // alignment) * alignment


def _new_buffer(num_bytes: int) -> torch.Tensor:
    """A uint8 buffer, in shared memory inside a DataLoader worker (as default_collate allocates its output:
    sending it to the main process then copies nothing)."""
    if torch.utils.data.get_worker_info() is not None:
        elem = torch.empty(0, dtype=torch.uint8)
        return elem.new(elem._typed_storage()._new_shared(num_bytes, device="cpu")).resize_(num_bytes)
    return torch.empty(num_bytes, dtype=torch.uint8)


class GpuMultiViewTransform:
    """Image file -> views in ``layout`` order, augmented on the training device (see the module doc).

    Pipeline contract: ``__call__`` (worker) -> [parameters, crop per view] (uint8 HWC crops) or, with
    ``decode_on_device``, [parameters, JPEG bytes, path]; ``collate`` -> [uint8 buffer, ``BatchLayout``];
    ``to_views(batch, device)`` -> normalised float [B, 3, S, S] per view. Files the device cannot decode are
    replaced in their batch and reported by ``take_skipped``.
    """

    decodes_images = True  # AugmentedImageFolder hands it the undecoded file
    # The resize kernel: torch's uint8 one (the CPU's only; the fast pipeline's pixels) or float; None: by device.
    uint8_resize: bool | None = None

    def __init__(self, layout: ViewLayout, mean: Sequence[float], std: Sequence[float], decode_on_device: bool = False):
        self.layout = layout
        self.views = view_specs(layout)
        self.decode_on_device = decode_on_device
        mean_t = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        # (x / 255 - mean) / std = x * scale + shift; cutout fill = the mean on the 0..255 scale
        self._constants = {torch.device("cpu"): (1.0 / (255.0 * std_t), -mean_t / std_t, mean_t * 255.0)}
        self.reduced_decodes = 0
        self._skipped: set[str] = set()  # files the device could not decode, since the last take_skipped()
        self._decode_streams: dict[torch.device, torch.cuda.Stream] = {}

    def __getstate__(self) -> dict:
        """Workers get the host part only (no device constants, no CUDA stream)."""
        state = dict(self.__dict__)
        state["_constants"] = {torch.device("cpu"): self._constants[torch.device("cpu")]}
        state["_decode_streams"] = {}
        return state

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The normalisation and fill constants on ``device``, copied once (a copy from the host waits for it)."""
        if device not in self._constants:
            self._constants[device] = tuple(t.to(device) for t in self._constants[torch.device("cpu")])
        return self._constants[device]

    def take_skipped(self) -> set[str]:
        """The files replaced in their batch since the last call because the device could not decode them."""
        skipped, self._skipped = self._skipped, set()
        return skipped

    # ------------------------------------------------------------------ worker
    def __call__(self, image: Image.Image) -> list:
        width, height = image.size
        boxes = [fast_augment.sample_crop_box(height, width, v.scale) for v in self.views]
        params = torch.stack([self.draw_parameters(v) for v in self.views])
        params[:, BOX] = torch.tensor(boxes, dtype=torch.float32)
        params[:, IMAGE_SIZE] = torch.tensor([float(height), float(width)])
        if self.decode_on_device and getattr(image, "format", None) == "JPEG" and image.mode in NVJPEG_MODES:
            with open(image.filename, "rb") as f:  # decoded on the device, at full size
                return [params, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), str(image.filename)]
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

    # ------------------------------------------------------------------ collate (worker)
    def collate(self, samples: list[list]) -> list:
        """[one uint8 buffer, its BatchLayout] (see the module doc): one pinned buffer and one copy per batch."""
        num_samples, num_views = len(samples), len(self.views)
        params = torch.stack([s[0] for s in samples])  # [B, views, NUM_PARAMS], on the host
        on_device = [s[1].dim() == 1 for s in samples]  # JPEG bytes, else the worker's crops
        # The samples whose hue rotation sits at each position of each view (read here, from the host table).
        applied = params[:, :, JITTER] > 0
        hue = [[(applied[:, v] & (params[:, v, ORDER][:, p] == HUE)).nonzero().flatten() for p in range(4)]
               for v in range(num_views)]
        hue_rows, first = [], 0
        for per_view in hue:
            hue_rows.append(tuple((first + sum(len(t) for t in per_view[:p]), len(per_view[p])) for p in range(4)))
            first += sum(len(t) for t in per_view)
        params_end = params.numel() * params.element_size()
        hue_start = _aligned(params_end)
        offset = hue_end = hue_start + 8 * first
        crops, view_pixels = [], []
        for v in range(num_views):
            view_start, per_view = offset, []
            for b, sample in enumerate(samples):
                if on_device[b]:
                    per_view.append(None)
                    continue
                h, w, _ = sample[1 + v].shape
                per_view.append((offset, h, w))
                offset += 3 * h * w
            crops.append(tuple(per_view))
            view_pixels.append((view_start, offset))
        buffer = _new_buffer(offset)
        buffer[:params_end].view(torch.float32).copy_(params.reshape(-1))
        if first:
            buffer[hue_start:hue_end].view(torch.int64).copy_(torch.cat([t for per_view in hue for t in per_view]))
        for v in range(num_views):
            for b, placed in enumerate(crops[v]):
                if placed is not None:  # HWC crop -> CHW: the float resize then reads contiguous planes
                    start, h, w = placed
                    buffer[start : start + 3 * h * w].view(3, h, w).copy_(samples[b][1 + v].permute(2, 0, 1))
        boxes = tuple(tuple(tuple(int(x) for x in box) for box in params[b, :, BOX].tolist()) if on_device[b] else ()
                      for b in range(num_samples))
        jpegs = tuple((b, s[2], s[1]) for b, s in enumerate(samples) if on_device[b])
        layout = BatchLayout(num_samples, (0, params_end), (hue_start, hue_end), tuple(hue_rows), tuple(view_pixels),
                             tuple(crops), boxes if jpegs else (), jpegs)
        return [buffer, layout]

    def batch_parameters(self, batch: list) -> torch.Tensor:
        """The parameter table [B, views, NUM_PARAMS] of a collated batch (on the buffer's device)."""
        buffer, layout = batch
        return buffer[slice(*layout.params)].view(torch.float32).view(layout.samples, len(self.views), NUM_PARAMS)

    # ------------------------------------------------------------------ device
    @torch.no_grad()
    def to_views(self, batch: list, device: torch.device) -> list[torch.Tensor]:
        """The batch from ``collate`` -> normalised float views [B, 3, S, S] in layout order, on ``device``.

        No value is read back to the host: every shape and offset comes from the host-side layout, so the
        only host-device traffic is the prefetcher's one copy of the buffer (and, with ``decode_on_device``,
        what torchvision's decoder does on its own stream).
        """
        device = torch.device(device)
        buffer, layout = batch
        if buffer.device != device:  # the trainer's prefetcher has already copied it
            buffer = buffer.to(device, non_blocking=True)
        params = self.batch_parameters([buffer, layout])
        hue_index = buffer[slice(*layout.hue_index)].view(torch.int64)
        sources, replaced = self._decode_on_device(layout, device) if layout.jpegs else ({}, {})
        uint8_kernel = self.uint8_resize if self.uint8_resize is not None else device.type == "cpu"
        scale, shift, fill = self._on(device)
        views = []
        for v, spec in enumerate(self.views):
            start, end = layout.view_pixels[v]
            # One conversion per view for the float resize (per crop before); the uint8 kernel reads uint8.
            pixels = buffer[start:end] if uint8_kernel or start == end else buffer[start:end].to(torch.float32)
            crops = []
            for b in range(layout.samples):
                source = replaced.get(b, b)
                placed = layout.crops[v][source]
                if placed is None:  # decoded on the device: cut the box out of the full-size image
                    t, l, h, w = layout.boxes[source][v]
                    crops.append(sources[source][:, t : t + h, l : l + w].unsqueeze(0))
                else:
                    offset, h, w = placed
                    crops.append(pixels[offset - start : offset - start + 3 * h * w].view(1, 3, h, w))
            hue = [hue_index[f : f + n] for f, n in layout.hue_rows[v]]
            x = augment_batch(resize_crops(crops, spec.size, uint8_kernel), params[:, v], spec, fill, hue)
            views.append(torch.addcmul(shift, x, scale).contiguous())
        return views

    def _decode_on_device(self, layout: BatchLayout, device: torch.device):
        """({sample: decoded uint8 [3, H, W] on ``device``}, {undecodable sample: the sample replacing it}).

        The whole batch in one ``decode_jpeg`` call; if it fails, one call per file, and a file that fails
        there too is decoded on the host with PIL (nvJPEG lacks some JPEG variants) and copied over. A file
        PIL cannot decode either is skipped as the workers skip unreadable files: it is logged and reported
        by ``take_skipped``, and the next decodable sample of the batch stands in for it (its crops, under the
        skipped sample's own flips and colour draws: the batch keeps its size, which MoCo's gather needs).
        """
        data = [jpeg for _, _, jpeg in layout.jpegs]
        try:
            images = list(self._decode(data, device))
        except RuntimeError:
            images = []
            for (_, path, jpeg) in layout.jpegs:
                try:
                    images.append(self._decode([jpeg], device)[0])
                except RuntimeError as error:
                    log.warning("the device decoder cannot decode %s (%s); decoding it on the host", path, str(error).splitlines()[0])
                    images.append(_decode_on_host(jpeg, path, device))
        sources = {sample: image for (sample, _, _), image in zip(layout.jpegs, images) if image is not None}
        bad = [(sample, path) for (sample, path, _), image in zip(layout.jpegs, images) if image is None]
        readable = [b for b in range(layout.samples) if b not in {sample for sample, _ in bad}]
        if bad and not readable:
            raise DataError(f"data.root: no decodable image in a batch of {layout.samples} ({bad[0][1]}, ...)")
        replaced = {}
        for sample, path in bad:
            replaced[sample] = next((b for b in readable if b > sample), readable[0])
            self._skipped.add(path)
        return sources, replaced

    def _decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """decode_jpeg of host JPEG bytes into uint8 [3, H, W] images on ``device``, ordered before the current
        stream's later work.

        torchvision's CUDA decoder (decode_jpegs_cuda.cpp) allocates the outputs on the current stream, writes
        them on a private pool stream without making that stream wait for the current one, then synchronises
        the host with its private stream and makes the current stream wait for it. Its outputs may therefore
        reuse memory that kernels still queued on the current stream read. So the decode runs with a stream of
        its own as the current one: outputs come from that stream's memory pool, where each earlier output
        was marked used by the compute stream (``record_stream``: the caching allocator reuses its block only
        once the compute stream's work queued on it has finished, checked with events, no host wait); and the
        compute stream waits for the decode stream (a device-side wait) before it reads the images.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        if device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        compute = torch.cuda.current_stream(device)
        if device not in self._decode_streams:  # one per device, made once
            self._decode_streams[device] = torch.cuda.Stream(device)
        stream = self._decode_streams[device]
        with torch.cuda.stream(stream):
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        compute.wait_stream(stream)
        for image in images:
            image.record_stream(compute)
        return images


def _decode_on_host(jpeg: torch.Tensor, path: str, device: torch.device) -> torch.Tensor | None:
    """A JPEG the device decoder rejected, decoded with PIL and copied to ``device`` ([3, H, W] uint8); None (logged) when PIL
    cannot decode it either. A rare path: its copy from pinned memory is asynchronous but the decode is on the host."""
    try:
        with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    except (OSError, ValueError) as error:
        log.warning("skipping unreadable image %s: %s", path, error)
        return None
    if device.type == "cuda":
        return pixels.contiguous().pin_memory().to(device, non_blocking=True)
    return pixels.contiguous()


def resize_crops(crops: list[torch.Tensor], size: int, uint8_kernel: bool | None = None) -> torch.Tensor:
    """[3, h, w] or [1, 3, h, w] crops (any sizes; uint8, or float on the 0..255 scale) -> [B, 3, size, size] float
    on the 0..255 scale: antialiased bicubic resize, one call per crop. ``uint8_kernel`` (default: on the CPU, the
    only device that has it): torch's uint8 kernel on uint8 crops, as the fast pipeline (same pixels); else in
    float, clamped and rounded to uint8 levels once for the batch (within one level of the uint8 kernel), a
    downscale beyond ``MAX_ANTIALIAS_DOWNSCALE`` first reduced by an integer box average."""
    uint8_kernel = uint8_kernel if uint8_kernel is not None else crops[0].device.type == "cpu"
    out = []
    for crop in crops:
        x = crop if crop.dim() == 4 else crop.unsqueeze(0)
        if uint8_kernel:
            x = x.contiguous(memory_format=torch.channels_last)  # the layout of the vectorised uint8 kernel
        else:
            x = _reduced_for_antialias(x.to(torch.float32), size)
        out.append(F.interpolate(x, size=(size, size), mode="bicubic", antialias=True))
    batch = torch.cat(out)
    return batch.to(torch.float32) if uint8_kernel else batch.clamp_(0.0, 255.0).round_()


def _reduced_for_antialias(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` box-averaged, along each axis that needs it, by the smallest integer factor that leaves at most
    ``MAX_ANTIALIAS_DOWNSCALE`` to the resize."""
    h, w = x.shape[-2:]
    factor_h, factor_w = (math.ceil(n / (size * MAX_ANTIALIAS_DOWNSCALE)) for n in (h, w))
    if factor_h <= 1 and factor_w <= 1:
        return x
    return F.adaptive_avg_pool2d(x, (math.ceil(h / factor_h), math.ceil(w / factor_w)))


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


def color_jitter(x: torch.Tensor, params: torch.Tensor, hue_samples: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """ColorJitter with each sample's own op order and factors ([B, NUM_PARAMS] table), on [B, 3, H, W] in 0..255.

    At each of the 4 positions brightness, contrast and saturation run on the whole batch with each sample's
    factor where that sample has this op there, else the identity (factor 1: ``x * 1`` and ``lerp(., x, 1)``
    return x exactly). The hue rotation, the costly op, runs on the samples that have it at that position:
    ``hue_samples[position]`` (their indices, from the host) or, without it, on the whole batch selected with
    ``where``; the same values either way (it is per pixel). Clamping always is as clamping when a factor is
    > 1 only: a factor <= 1 keeps values in range.
    """
    b = x.shape[0]
    applied = params[:, JITTER] > 0
    order = params[:, ORDER]
    factors = params[:, FACTORS]
    one = torch.ones_like(factors[:, 0]).view(b, 1, 1, 1)
    for position in range(4):
        at = [(applied & (order[:, position] == op)).view(b, 1, 1, 1) for op in range(3)]
        x = x.mul(torch.where(at[0], factors[:, 0].view(b, 1, 1, 1), one)).clamp_max_(255.0)
        mean = luma(x).mean(dim=(2, 3), keepdim=True)  # contrast: blend with the mean luma
        x = torch.lerp(mean, x, torch.where(at[1], factors[:, 1].view(b, 1, 1, 1), one)).clamp_(0.0, 255.0)
        x = torch.lerp(luma(x), x, torch.where(at[2], factors[:, 2].view(b, 1, 1, 1), one)).clamp_(0.0, 255.0)
        if hue_samples is None:
            at_hue = (applied & (order[:, position] == HUE)).view(b, 1, 1, 1)
            x = torch.where(at_hue, adjust_hue(x, factors[:, 3].view(b, 1, 1)), x)
        elif hue_samples[position].numel():  # a host-known size: no read-back
            rows = hue_samples[position]
            x.index_copy_(0, rows, adjust_hue(x.index_select(0, rows), factors[:, 3].index_select(0, rows).view(-1, 1, 1)))
    return x


def augment_batch(x: torch.Tensor, params: torch.Tensor, view: _ViewSpec, fill: torch.Tensor,
                  hue_samples: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Everything after the resize, in the specification's order, on [B, 3, S, S] (0..255) with one row
    of ``params`` per sample; ``fill`` is the cutout colour [1, 3, 1, 1] on the 0..255 scale;
    ``hue_samples``: see ``color_jitter``."""
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
        x = color_jitter(x, params, hue_samples)
    x = torch.where(mask(GRAY), luma(x).expand_as(x), x)
    if view.blur_p > 0:
        x = torch.where(mask(BLUR), gaussian_blur(x, params[:, SIGMA], view.blur_kernel), x)
    if view.solarize_p > 0:
        x = torch.where(mask(SOLARIZE) & (x >= SOLARIZE_THRESHOLD), 255.0 - x, x)
    return x


def check_on_device(paths: Sequence[str], device: torch.device, seed: int = 0) -> dict:
    """For the GPU acceptance run: the ``data.gpu_decode`` path on ``device`` against the same batch decoded by
    the workers and augmented on the CPU with the float resize (the device's kernels; pixels differ by the two
    JPEG decoders only), on the 0..255 scale.

    Returns {"max_abs", "mean_abs" (over all views), "repeat_equal" (a second pass gives the same bits),
    "host_sync" (None, or the error of ``torch.cuda.set_sync_debug_mode("error")`` inside ``to_views``),
    "skipped" (files replaced in their batch), and on CUDA "decode_ordered" / "plain_decode_ordered": whether a
    kernel queued on the compute stream still reads its input right when that input is freed and a JPEG is
    decoded at once, with this module's decode and with a plain ``decode_jpeg`` on the compute stream (whose
    outputs can take the freed block while the kernel waits)}.
    """
    from mtssl.data.views import VIEW_TYPES

    device = torch.device(device)
    layout = ViewLayout(tuple(VIEW_TYPES[name] for name in ("global", "local", "cutout")))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    on_device, on_host = GpuMultiViewTransform(layout, mean, std, True), GpuMultiViewTransform(layout, mean, std)
    on_host.uint8_resize = False

    def samples(transform, indices):
        out = []
        for i in indices:
            torch.manual_seed(seed + i)
            with Image.open(paths[i]) as image:
                out.append(transform(image))
        return out

    def readable(i):
        try:
            with Image.open(paths[i]) as image:
                image.load()
            return True
        except OSError:
            return False

    batch = on_device.collate(samples(on_device, range(len(paths))))
    rows = [i for i in range(len(paths)) if readable(i)]  # the reference skips what the workers would skip
    expected = on_host.to_views(on_host.collate(samples(on_host, rows)), torch.device("cpu"))
    buffer = batch[0].pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch[0]
    host_sync = None
    if device.type == "cuda":
        on_device.to_views([buffer, batch[1]], device)  # first call: constants copied, decoder and stream made
        torch.cuda.set_sync_debug_mode("error")
    try:
        first = on_device.to_views([buffer, batch[1]], device)
    except RuntimeError as error:
        host_sync, first = str(error).splitlines()[0], None
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    if first is None:
        first = on_device.to_views([buffer, batch[1]], device)
    first_host = [v.cpu() for v in first]
    del first
    second = [v.cpu() for v in on_device.to_views([buffer, batch[1]], device)]
    std_t = torch.tensor(std).view(1, 3, 1, 1) * 255.0
    differences = torch.cat([((a[rows] - b) * std_t).abs().flatten() for a, b in zip(first_host, expected)])
    result = {"max_abs": float(differences.max()), "mean_abs": float(differences.mean()),
              "repeat_equal": all(torch.equal(a, b) for a, b in zip(first_host, second)), "host_sync": host_sync,
              "skipped": sorted(on_device.take_skipped())}
    decodable = [jpeg for sample, _, jpeg in batch[1].jpegs if sample in rows]
    if device.type == "cuda" and decodable:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = decodable[0]
        result["decode_ordered"] = _decode_keeps_queued_reads(lambda: on_device._decode([jpeg], device), jpeg, device)
        result["plain_decode_ordered"] = _decode_keeps_queued_reads(
            lambda: decode_jpeg([jpeg], mode=ImageReadMode.RGB, device=device), jpeg, device)
    return result


def _decode_keeps_queued_reads(decode, jpeg: torch.Tensor, device: torch.device) -> bool:
    """A tensor the size of the decoded image is read by a kernel held back in the compute stream's queue, freed,
    and the JPEG decoded at once: True when the kernel still read the tensor's own values."""
    with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as image:
        num_bytes = 3 * image.size[0] * image.size[1]
    torch.cuda.synchronize(device)
    values = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    torch.cuda._sleep(500_000_000)  # some 0.3 s of GPU cycles ahead of the read
    total = values.sum(dtype=torch.int64)
    del values  # its block goes back to the compute stream's pool while the read still waits
    decode()
    return int(total) == num_bytes
