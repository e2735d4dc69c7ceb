"""FastMultiViewTransform against the augmentation specification, statistically.

Each op is detected in the output pixels of a test image built so that the op is visible and
no other op can imitate it. The pipeline rounds to uint8 once, at the end (its worker output);
tests that read sub-level values (blur sigma and support, jitter factors) read the float views
before that rounding, and ``test_worker_output_is_the_rounded_float_views`` ties the two. Views are 32 px crops of 32 px images with scale (1, 1), i.e. the
whole image (the RandomResizedCrop draw is tested on its own), and keep each registered view
type's blur and solarize probabilities. Frequencies are checked against the specification
within 4.5 binomial standard deviations.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import mtssl.data.fast_augment as fast_augment
from mtssl.config import compose_config, resolve_config
from mtssl.data.fast_augment import FastMultiViewTransform, adjust_hue, gaussian_taps, sample_crop_box, separable_blur, solarize
from mtssl.data.torchvision_augment import MultiViewTransform
from mtssl.data.views import VIEW_TYPES, ViewLayout, build_view_layout
from tests.support.view_spec import (
    GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2, MEAN, SIZE, SPEC_BLUR_P, SPEC_SOLARIZE_P, STD, WHOLE_IMAGE_LAYOUT,
    assert_frequency, expected_mean_area, gray_image,
)

SAMPLES = 4000  # source images per frequency test: 4.5 sigma = +-0.036 at p = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_views(image: Image.Image, samples: int, seed: int, layout: ViewLayout = WHOLE_IMAGE_LAYOUT,
              before_rounding: bool = False) -> list[list[torch.Tensor]]:
    """``samples`` view lists as float [3, H, W] pixels on the 0..255 scale: the uint8 worker output,
    or with ``before_rounding`` the float views before it (grayscale broadcast to 3 channels)."""
    transform = FastMultiViewTransform(layout, MEAN, STD)
    torch.manual_seed(seed)
    if before_rounding:
        return [[v.expand(3, -1, -1) for v in transform.float_views(image)] for _ in range(samples)]
    return [[v.float() for v in transform(image)] for _ in range(samples)]


# ---------------------------------------------------------------------------- crop boxes

@pytest.mark.parametrize("name", ["global", "local", "cutout"])
def test_crop_scale_and_ratio_follow_random_resized_crop(name):
    height, width, n = 375, 500, 20000
    scale = VIEW_TYPES[name].scale
    torch.manual_seed(0)
    boxes = np.array([sample_crop_box(height, width, scale) for _ in range(n)], dtype=float)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    ratio = w / h
    whole = area == 1.0
    # Rounding w and h to pixels moves area and ratio by < 1%.
    assert (area[~whole] >= scale[0] * 0.99).all() and (area <= scale[1] * 1.01).all()
    assert (ratio[~whole] >= 0.75 * 0.99).all() and (ratio[~whole] <= 4 / 3 * 1.01).all()
    expected = expected_mean_area(height, width, scale)
    assert abs(area.mean() - expected) < 4.5 * area.std() / math.sqrt(n) + 2e-3, (area.mean(), expected)
    if name == "local":  # every attempt fits: area ~ U(0.08, 0.25), log ratio ~ U(log 3/4, log 4/3)
        quartiles = np.quantile(area, [0.25, 0.5, 0.75])
        np.testing.assert_allclose(quartiles, [0.1225, 0.165, 0.2075], atol=0.004)
        log_ratio = np.log(ratio)
        assert abs(log_ratio.mean()) < 0.005
        np.testing.assert_allclose(np.quantile(log_ratio, [0.25, 0.75]), [-0.1438, 0.1438], atol=0.006)


def test_each_view_draws_its_crop_with_its_type_scale(monkeypatch):
    cfg = resolve_config(compose_config(["data=imagefolder", "data.root=/unused", "views=global_local_cutout"]))
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    scales = []
    original = fast_augment.sample_crop_box

    def recording(height, width, scale, *rest):
        scales.append(tuple(scale))
        return original(height, width, scale, *rest)

    monkeypatch.setattr(fast_augment, "sample_crop_box", recording)
    FastMultiViewTransform(layout, MEAN, STD)(Image.new("RGB", (500, 375), (90, 120, 30)))
    assert scales == [layout.type(name).scale for name, _ in layout.entries]


# ---------------------------------------------------------------------------- op frequencies
@pytest.mark.slow
def test_flip_frequency():
    # A dark-to-less-dark ramp: jitter, grayscale and blur keep it increasing, and its values
    # stay < 128 after any jitter (factors <= 1.4 twice), so solarize never fires.
    ramp = gray_image(np.tile(np.linspace(10, 60, SIZE), (SIZE, 1)))
    flips = np.zeros(5)
    for views in run_views(ramp, SAMPLES, seed=1):
        for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
            flips[v] += bool(views[v][:, :, 0].mean() > views[v][:, :, -1].mean())
    for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
        assert_frequency(flips[v], SAMPLES, 0.5, f"flip of view {v}")


@pytest.mark.slow
def test_jitter_and_grayscale_frequencies():
    # A constant colour: crop, flip and blur leave it unchanged; grayscale makes the channels
    # equal; jitter (brightness, contrast, saturation, hue) changes the colour and keeps it coloured.
    color = (150.0, 100.0, 50.0)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in color))
    gray, jittered, colored = np.zeros(5), np.zeros(5), np.zeros(5)
    for views in run_views(image, SAMPLES, seed=2):
        for v, pixels in enumerate(views):
            corner = pixels[:, 0, 0]
            if (pixels.amax(dim=0) - pixels.amin(dim=0)).max() < 1e-3:
                gray[v] += 1
            elif v in (GLOBAL_1, LOCAL_1, LOCAL_2):  # no solarize, no cutout
                colored[v] += 1
                jittered[v] += bool((corner - torch.tensor(color)).abs().max() > 1e-2)
    for v in range(5):
        assert_frequency(gray[v], SAMPLES, 0.2, f"grayscale of view {v}")
    for v in (GLOBAL_1, LOCAL_1, LOCAL_2):
        assert_frequency(jittered[v], int(colored[v]), 0.8, f"colour jitter of view {v}")


@pytest.mark.slow
@pytest.mark.parametrize("op,strength", [("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.2), ("saturation", 0.4)])
def test_jitter_strengths_follow_the_view_spec(op, strength):
    # The view's ``jitter`` field with one op switched on: on a constant colour x (gray luma g), brightness
    # multiplies by f and contrast / saturation (blend with the mean luma / the luma, both g) give
    # g + f (x - g), so f is read back from the red channel. The spec: f ~ U(1 - s, 1 + s), applied with p 0.8.
    jitter = tuple(strength if name == op else 0.0 for name in ("brightness", "contrast", "saturation", "hue"))
    view = replace(VIEW_TYPES["global"], size=SIZE, scale=(1.0, 1.0), blur_p=(0.0,), solarize_p=(0.0,), jitter=jitter)
    color = torch.tensor([150.0, 100.0, 50.0])
    luma = float(torch.tensor(fast_augment.GRAY_WEIGHTS) @ color)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in color))
    factors, colored = [], 0
    for views in run_views(image, 2000, seed=11, layout=ViewLayout((view,)), before_rounding=True):
        for pixels in views:
            red = float(pixels[0, 0, 0])
            if (pixels.amax(dim=0) - pixels.amin(dim=0)).max() < 1e-3:
                continue  # grayscale
            colored += 1
            f = red / color[0].item() if op == "brightness" else (red - luma) / (color[0].item() - luma)
            if abs(f - 1) > 1e-4:  # jittered (a factor within 1e-4 of 1 has probability < 1e-3)
                factors.append(f)
    factors = np.array(factors)
    assert_frequency(len(factors), colored, 0.8, f"{op} jitter")
    assert factors.min() >= 1 - strength - 1e-3 and factors.max() <= 1 + strength + 1e-3
    assert factors.min() < 1 - 0.95 * strength and factors.max() > 1 + 0.95 * strength  # the whole range
    std = strength / math.sqrt(3)  # of U(1 - s, 1 + s)
    assert abs(factors.mean() - 1) < 4.5 * std / math.sqrt(len(factors))
    assert abs(factors.std() - std) < 0.05 * std


@pytest.mark.parametrize("kernel,radius", [(5, 2), (9, 4), (23, 8)])
def test_blur_kernel_field_bounds_the_blur_support(kernel, radius):
    # One bright pixel, blur always on: the blur reaches ``kernel // 2`` pixels, or 4 sigma <= 8 when
    # that is shorter (taps beyond 4 sigma are dropped), for the view's ``blur_kernel`` field.
    size = 64
    values = np.full((size, size), 20.0)
    values[32, 32] = 220.0
    view = replace(VIEW_TYPES["local"], size=size, scale=(1.0, 1.0), blur_p=(1.0,), jitter=(0.0, 0.0, 0.0, 0.0), blur_kernel=kernel)
    reach = []
    for (pixels,) in run_views(gray_image(values), 200, seed=12, layout=ViewLayout((replace(view, count=1),)), before_rounding=True):
        p = pixels[0]
        row, col = divmod(int(p.argmax()), size)
        lit = (p[row] - p[row, 0]).abs() > 1e-3
        reach.append(int(lit.nonzero().max()) - col)
    assert max(reach) == radius


@pytest.mark.slow
def test_blur_frequency_and_sigma_range():
    # A single brighter pixel on a dark gray background: after a blur of sigma the horizontal
    # neighbour's excess over the background is exp(-1 / (2 sigma^2)) times the centre's
    # (3-tap kernel at 32 px), which recovers sigma; no blur leaves the neighbour at background.
    values = np.full((SIZE, SIZE), 20.0)
    values[16, 16] = 60.0
    image = gray_image(values)
    detect_sigma = 0.3  # below it the neighbour moves by < 0.4% of the peak
    counts, sigmas = np.zeros(5), {v: [] for v in range(4)}
    for views in run_views(image, SAMPLES, seed=3, before_rounding=True):
        for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
            p = views[v][0]
            background = p[0, 0]
            row, col = divmod(int(p.argmax()), SIZE)
            centre = p[row, col] - background
            neighbour = (p[row, col - 1] + p[row, col + 1]) / 2 - background
            ratio = float(neighbour / centre)
            if ratio > math.exp(-1 / (2 * detect_sigma**2)):
                counts[v] += 1
                sigmas[v].append(math.sqrt(-1 / (2 * math.log(ratio))))
    kept = (2.0 - detect_sigma) / (2.0 - 0.1)  # P(sigma > detect_sigma) for sigma ~ U(0.1, 2)
    for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
        assert_frequency(counts[v], SAMPLES, SPEC_BLUR_P[v] * kept, f"blur of view {v}")
    detected = np.concatenate([sigmas[v] for v in sigmas])
    assert detected.max() <= 2.0 + 1e-3
    # sigma | sigma > 0.3 ~ U(0.3, 2): mean 1.15, std 0.49
    assert abs(detected.mean() - 1.15) < 4.5 * 0.49 / math.sqrt(len(detected))


@pytest.mark.slow
def test_solarize_frequency():
    # Constant gray 250: jitter keeps it >= 150 (brightness >= 0.6; contrast and saturation
    # are identities on a constant gray), so < 128 means solarized.
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))
    counts = np.zeros(5)
    for views in run_views(image, SAMPLES, seed=4):
        for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
            counts[v] += bool(views[v][:, 0, 0].mean() < 128)
    for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
        assert_frequency(counts[v], SAMPLES, SPEC_SOLARIZE_P[v], f"solarize of view {v}")


def test_cutout_area_fraction():
    # Black image: the cutout is the only region of a second colour. At least three corners
    # are background (the box is at most ~0.73 of a side), so their majority names it.
    size, n = 224, 300
    layout = ViewLayout((replace(VIEW_TYPES["cutout"], scale=(1.0, 1.0)),))
    fractions = []
    for (pixels,) in run_views(Image.new("RGB", (size, size)), n, seed=5, layout=layout):
        corners = [pixels[:, r, c] for r in (0, -1) for c in (0, -1)]
        agreeing = [sum(bool((c - o).abs().max() < 1) for o in corners) for c in corners]
        background = corners[int(np.argmax(agreeing))]
        distance = (pixels - background.view(3, 1, 1)).abs().amax(dim=0)
        fractions.append(float((distance > distance.max() / 2).float().mean()))
    fractions = np.array(fractions)
    assert fractions.min() >= 0.19 and fractions.max() <= 0.41, (fractions.min(), fractions.max())
    assert fractions.min() < 0.23 and fractions.max() > 0.37  # the whole range is used
    assert abs(fractions.mean() - 0.3) < 0.02


# ---------------------------------------------------------------------------- kernels and contract
@pytest.mark.parametrize("size,sigma,k", [(224, 0.1, 23), (224, 0.7, 23), (224, 2.0, 23), (96, 1.3, 23), (96, 2.0, 23),
                                          (96, 1.3, 9), (32, 1.9, 3)])
def test_separable_blur_matches_torchvision_gaussian_blur(size, sigma, k):
    torch.manual_seed(6)
    image = torch.rand(3, size, size) * 255
    expected = TF.gaussian_blur(image, [k, k], [sigma, sigma])
    got = separable_blur(image, gaussian_taps(k, sigma))
    assert (got - expected).abs().max() < 0.05  # levels of 255: taps beyond 4 sigma are dropped


def hue_test_image(size: int = 64, seed: int = 13) -> torch.Tensor:
    """[3, size, size] on 0..255: random colours, plus rows of grays (chroma 0), of ties for the max
    (red = green, green = blue, blue = red) and of saturated and near-black colours."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=generator) * 255
    image[:, 0:4] = image[0:1, 0:4]  # grays
    image[1, 4:8] = image[0, 4:8]  # red = green
    image[2, 8:12] = image[1, 8:12]  # green = blue
    image[0, 12:16] = image[2, 12:16]  # blue = red
    image[:, 16:20] = (image[:, 16:20] > 127).float() * 255  # the corners of the RGB cube
    image[:, 20:24] *= 1e-3  # near black
    return image


@pytest.mark.parametrize("shift", [0.0, 0.02, -0.07, 0.1, -0.1, 1 / 6, -1 / 3, 0.5, -0.5])
def test_hue_rotation_equals_torchvision(shift):
    # adjust_hue is torchvision's rgb -> hsv -> rotate -> rgb written without branches; same map to float rounding.
    image = hue_test_image()
    expected = TF.adjust_hue(image / 255, shift) * 255
    assert (adjust_hue(image, shift) - expected).abs().max() < 1e-3  # levels of 255


def test_batched_hue_rotation_equals_one_image_at_a_time():
    # The gpu pipeline rotates a batch with one shift per image ([B, 1, 1]).
    images = torch.stack([hue_test_image(32, seed) for seed in range(4)])
    shifts = torch.tensor([0.1, -0.25, 0.0, 0.5])
    batched = adjust_hue(images, shifts.view(4, 1, 1))
    for image, shift, got in zip(images, shifts, batched):
        torch.testing.assert_close(got, adjust_hue(image, float(shift)), rtol=0, atol=1e-4)
        assert (got - TF.adjust_hue(image / 255, float(shift)) * 255).abs().max() < 1e-3


def test_solarize_inverts_from_the_threshold_on():
    # v2.RandomSolarize(128) on uint8 inverts x >= 128; on the float scale values just below 128 stay.
    values = torch.tensor([0.0, 1.5, 127.0, 127.99, 128.0, 128.01, 200.25, 255.0])
    image = torch.cat([values, torch.rand(56, generator=torch.Generator().manual_seed(14)) * 255]).view(1, 8, 8).expand(3, -1, -1)
    got = solarize(image)
    expected = np.where(image.numpy() >= 128, np.float32(255) - image.numpy(), image.numpy())
    np.testing.assert_array_equal(got.numpy(), expected)
    uint8 = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, -1, -1)
    assert torch.equal(solarize(uint8.float()).to(torch.uint8), TF.solarize(uint8, 128))


@pytest.mark.parametrize("data", ["cifar10", "imagefolder"])
def test_output_shapes_and_dtypes_equal_multiview_transform(data):
    cfg = resolve_config(compose_config([f"data={data}", "data.root=/unused", "views=global_local_cutout"]))
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (260, 300, 3), dtype=np.uint8))
    torch.manual_seed(7)
    reference = MultiViewTransform(layout, cfg.data.mean, cfg.data.std)(image)
    fast = FastMultiViewTransform(layout, cfg.data.mean, cfg.data.std)(image)
    assert [(tuple(v.shape), v.dtype) for v in fast] == [(tuple(v.shape), v.dtype) for v in reference]
    assert all(v.is_contiguous() for v in fast)


def test_randomness_comes_from_torch_only():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    transform = FastMultiViewTransform(WHOLE_IMAGE_LAYOUT, MEAN, STD)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch.manual_seed(8)
    first = transform(image)
    torch.manual_seed(8)
    second = transform(image)
    third = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(second, third))
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_reduced_jpeg_decode_keeps_the_views():
    # 1600 x 1200 smooth JPEG, 32/16 px views: every crop allows a 1/8 decode.
    smooth = Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    buffer = io.BytesIO()
    smooth.save(buffer, "JPEG", quality=95)
    cfg = resolve_config(compose_config(["data=cifar10", "views=global_local_cutout"]))
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    transform = FastMultiViewTransform(layout, MEAN, STD)
    torch.manual_seed(9)
    reduced = transform(Image.open(io.BytesIO(buffer.getvalue())))
    assert transform.reduced_decodes == 1
    torch.manual_seed(9)
    full = transform(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))  # decoded: no draft
    assert transform.reduced_decodes == 1
    for a, b in zip(reduced, full):
        assert a.shape == b.shape
        assert (a.float() - b.float()).abs().mean() < 3.0  # same crops, same ops, DCT-scaled source


def test_training_dataset_hands_the_fast_pipeline_the_undecoded_jpeg(tmp_path):
    from mtssl.data.image_folder import AugmentedImageFolder

    smooth = Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    smooth.save(tmp_path / "photo.jpg", "JPEG", quality=95)
    cfg = resolve_config(compose_config(["data=cifar10", "views=global_local_cutout"]))
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    transform = FastMultiViewTransform(layout, MEAN, STD)
    dataset = AugmentedImageFolder([(str(tmp_path / "photo.jpg"), 4)], transform, seed=0)
    views, label, skipped = dataset[(0, 0)]
    assert transform.reduced_decodes == 1 and (label, skipped) == (4, [])
    again, _, _ = dataset[(0, 0)]  # the same (epoch, index) gives the same views
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_worker_output_is_the_rounded_float_views():
    # The worker hands over uint8: the float views rounded to the nearest level (half to even),
    # broadcast to 3 channels where grayscale, under the same random draws.
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    transform = FastMultiViewTransform(WHOLE_IMAGE_LAYOUT, MEAN, STD)
    for seed in range(20):
        torch.manual_seed(seed)
        floats = transform.float_views(image)
        torch.manual_seed(seed)
        worker = transform(image)
        for x, u in zip(floats, worker):
            assert u.dtype == torch.uint8 and u.shape == (3, SIZE, SIZE) and u.is_contiguous()
            expected = np.rint(np.clip(np.broadcast_to(x.numpy(), (3, SIZE, SIZE)), 0, 255))
            np.testing.assert_array_equal(u.numpy(), expected.astype(np.uint8))


def test_to_views_normalises_on_the_device_side():
    # to_views: (x / 255 - mean) / std per channel, batched; float32 [B, 3, H, W] per view.
    transform = FastMultiViewTransform(WHOLE_IMAGE_LAYOUT, MEAN, STD)
    generator = torch.Generator().manual_seed(5)
    batch = [torch.randint(0, 256, (4, 3, n, n), dtype=torch.uint8, generator=generator) for n in (SIZE, 16)]
    views = transform.to_views(batch, torch.device("cpu"))
    for view, pixels in zip(views, batch):
        expected = (pixels.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
        assert view.dtype == torch.float32 and view.shape == pixels.shape
        torch.testing.assert_close(view.double(), expected, rtol=0, atol=1e-5)
