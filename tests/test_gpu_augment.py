"""GpuMultiViewTransform (data.pipeline=gpu) against the augmentation specification and the fast pipeline.

Distributions are checked twice: from the parameter table the workers draw, and from the output
pixels of test images on which each op is visible (per sample, the pixels must show exactly the ops
the table says). Frequencies within 4.5 binomial standard deviations, as in test_fast_augment.py.
Everything runs on CPU tensors: ``to_views`` is the same code on any device.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import mtssl.data.gpu_augment as G
from mtssl.data.fast_augment import FastMultiViewTransform
from mtssl.data.pipelines import AUGMENTATION_PIPELINES
from mtssl.data.gpu_augment import GpuMultiViewTransform, gaussian_blur, resize_crops
from mtssl.data.image_folder import AugmentedImageFolder, collate_views
from mtssl.data.views import VIEW_TYPES, ViewLayout
from tests.support.view_spec import (
    CUTOUT, GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2, MEAN, SIZE, SPEC_BLUR_P, SPEC_SOLARIZE_P, STD, WHOLE_IMAGE_LAYOUT,
    assert_frequency, expected_mean_area, gray_image,
)

CPU = torch.device("cpu")


def to_pixels(view: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of one view: [3, H, W] on the 0..255 scale."""
    return (view * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
IMAGENET_LAYOUT = ViewLayout(tuple(VIEW_TYPES[name] for name in ("global", "local", "cutout")))
SAMPLES = 1500  # source images per frequency test: 4.5 sigma = +-0.058 at p = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def worker_outputs(transform, image: Image.Image, samples: int, seed: int) -> list[list[torch.Tensor]]:
    torch.manual_seed(seed)
    return [transform(image) for _ in range(samples)]


def run_batch(image: Image.Image, samples: int, seed: int, layout: ViewLayout = WHOLE_IMAGE_LAYOUT):
    """(parameters [N, views, NUM_PARAMS], views on the 0..255 scale [N, 3, S, S] per view), one batch."""
    transform = GpuMultiViewTransform(layout, MEAN, STD)
    batch = transform.collate(worker_outputs(transform, image, samples, seed))
    views = transform.to_views(batch, CPU)
    return transform.batch_parameters(batch), [to_pixels_batch(v) for v in views]


def to_pixels_batch(views: torch.Tensor) -> torch.Tensor:
    return (views * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255


def test_registered_as_gpu_pipeline():
    transform = AUGMENTATION_PIPELINES["gpu"](IMAGENET_LAYOUT, MEAN, STD)
    assert isinstance(transform, GpuMultiViewTransform) and transform.decodes_images
    outputs = transform(Image.new("RGB", (500, 375), (90, 120, 30)))
    # Only uint8 images and one small float table cross the DataLoader.
    assert outputs[0].shape == (5, G.NUM_PARAMS) and outputs[0].dtype == torch.float32
    assert all(t.dtype == torch.uint8 and t.dim() == 3 and t.shape[2] == 3 for t in outputs[1:]) and len(outputs) == 6


# ---------------------------------------------------------------------------- drawn parameters
@pytest.mark.parametrize("name", ["global", "local", "cutout"])
def test_crop_boxes_follow_random_resized_crop(name):
    height, width, n = 375, 500, 2000
    layout = ViewLayout((replace(VIEW_TYPES[name], count=1, size=32),))
    transform = GpuMultiViewTransform(layout, MEAN, STD)
    outputs = worker_outputs(transform, Image.new("RGB", (width, height)), n, seed=20)
    params = torch.stack([o[0][0] for o in outputs]).double().numpy()
    top, left, h, w = params[:, G.BOX].T
    assert (params[:, G.IMAGE_SIZE] == [height, width]).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # The crop shipped is the drawn box (full-size decode: Image.new is no JPEG).
    assert all(tuple(o[1].shape) == (int(p[G.BOX][2]), int(p[G.BOX][3]), 3) for o, p in zip(outputs, params))
    area, ratio = h * w / (height * width), w / h
    scale = VIEW_TYPES[name].scale
    whole = area == 1.0
    assert (area[~whole] >= scale[0] * 0.99).all() and (area <= scale[1] * 1.01).all()
    assert (ratio[~whole] >= 0.75 * 0.99).all() and (ratio[~whole] <= 4 / 3 * 1.01).all()
    expected = expected_mean_area(height, width, scale)
    assert abs(area.mean() - expected) < 4.5 * area.std() / math.sqrt(n) + 2e-3, (area.mean(), expected)


def test_drawn_parameters_follow_the_view_spec():
    n = 4000
    transform = GpuMultiViewTransform(IMAGENET_LAYOUT, MEAN, STD)
    params = torch.stack([o[0] for o in worker_outputs(transform, Image.new("RGB", (64, 48)), n, seed=21)])
    for v, (name, _) in enumerate(IMAGENET_LAYOUT.entries):
        p = params[:, v].double()
        assert_frequency(int(p[:, G.FLIP].sum()), n, 0.5, f"flip of view {v}")
        assert_frequency(int(p[:, G.JITTER].sum()), n, 0.8, f"jitter of view {v}")
        assert_frequency(int(p[:, G.GRAY].sum()), n, 0.2, f"grayscale of view {v}")
        assert_frequency(int(p[:, G.BLUR].sum()), n, SPEC_BLUR_P[v], f"blur of view {v}")
        assert_frequency(int(p[:, G.SOLARIZE].sum()), n, SPEC_SOLARIZE_P[v], f"solarize of view {v}")
        jittered = p[p[:, G.JITTER] > 0]
        order = jittered[:, G.ORDER]
        assert (order.sort(dim=1).values == torch.arange(4.0)).all()  # a permutation
        for op in range(4):  # each op first in a quarter of the draws
            assert_frequency(int((order[:, 0] == op).sum()), len(order), 0.25, f"op {op} first, view {v}")
        for column, strength, centre in zip(range(10, 14), VIEW_TYPES[name].jitter, (1, 1, 1, 0)):
            f = jittered[:, column]  # U(centre - s, centre + s)
            assert f.min() >= centre - strength and f.max() <= centre + strength
            assert abs(f.mean() - centre) < 4.5 * strength / math.sqrt(3 * len(f))
            assert abs(f.std() - strength / math.sqrt(3)) < 0.05 * strength / math.sqrt(3)
        assert (p[p[:, G.JITTER] == 0][:, G.FACTORS] == torch.tensor([1.0, 1, 1, 0], dtype=torch.float64)).all()
        sigma = p[p[:, G.BLUR] > 0][:, G.SIGMA]
        if len(sigma):  # U(0.1, 2): mean 1.05, std 0.548
            assert sigma.min() >= 0.1 and sigma.max() <= 2.0
            assert abs(sigma.mean() - 1.05) < 4.5 * 0.548 / math.sqrt(len(sigma))
    cut = params[:, CUTOUT, G.CUTOUT].double()
    area = cut[:, 2] * cut[:, 3] / 224**2
    assert area.min() >= 0.19 and area.max() <= 0.41 and abs(area.mean() - 0.3) < 0.005
    assert (params[:, :CUTOUT, G.CUTOUT] == 0).all()  # no cutout on the other views


# ---------------------------------------------------------------------------- ops seen in the pixels
def test_flip_in_the_pixels_is_the_drawn_flip():
    # A dark increasing ramp: jitter, grayscale and blur keep it increasing, solarize never fires (< 128).
    params, views = run_batch(gray_image(np.tile(np.linspace(10, 60, SIZE), (SIZE, 1))), 1000, seed=22)
    for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):  # the cutout view's box may cover a border column
        flipped = views[v][:, :, :, 0].mean(dim=(1, 2)) > views[v][:, :, :, -1].mean(dim=(1, 2))
        assert torch.equal(flipped, params[:, v, G.FLIP] > 0)
        assert_frequency(int(flipped.sum()), 1000, 0.5, f"flip of view {v}")


def test_grayscale_and_jitter_in_the_pixels_are_the_drawn_ones():
    color = torch.tensor([150.0, 100.0, 50.0])
    params, views = run_batch(Image.new("RGB", (SIZE, SIZE), (150, 100, 50)), SAMPLES, seed=23)
    for v in range(5):
        pixels = views[v]
        gray = (pixels.amax(dim=1) - pixels.amin(dim=1)).flatten(1).amax(dim=1) < 1e-3
        assert torch.equal(gray, params[:, v, G.GRAY] > 0)
        assert_frequency(int(gray.sum()), SAMPLES, 0.2, f"grayscale of view {v}")
        if v in (GLOBAL_1, LOCAL_1, LOCAL_2):  # no solarize, no cutout: the colour changed iff jittered
            changed = (pixels[:, :, 0, 0] - color).abs().amax(dim=1) > 1e-2
            assert torch.equal(changed[~gray], params[~gray, v, G.JITTER] > 0)


@pytest.mark.parametrize("op,column", [("brightness", 10), ("contrast", 11), ("saturation", 12)])
def test_jitter_factor_read_from_the_pixels_is_the_drawn_factor(op, column):
    # One op on (strength 0.4): on a constant colour x with luma g, brightness gives f x, contrast and
    # saturation g + f (x - g) (see test_fast_augment.py).
    jitter = tuple(0.4 if name == op else 0.0 for name in ("brightness", "contrast", "saturation", "hue"))
    view = replace(VIEW_TYPES["global"], count=1, size=SIZE, scale=(1.0, 1.0), blur_p=(0.0,), solarize_p=(0.0,), jitter=jitter)
    color = torch.tensor([150.0, 100.0, 50.0])
    luma = float(torch.tensor(G.GRAY_WEIGHTS) @ color)
    params, (pixels,) = run_batch(Image.new("RGB", (SIZE, SIZE), (150, 100, 50)), 1000, seed=24, layout=ViewLayout((view,)))
    keep = params[:, 0, G.GRAY] == 0
    red = pixels[keep, 0, 0, 0].double()
    f = red / 150.0 if op == "brightness" else (red - luma) / (150.0 - luma)
    np.testing.assert_allclose(f.numpy(), params[keep, 0, column].double().numpy(), atol=2e-4)


def test_solarize_in_the_pixels_is_the_drawn_solarize():
    # Constant gray 250 stays >= 150 under jitter: < 128 means solarized.
    params, views = run_batch(Image.new("RGB", (SIZE, SIZE), (250, 250, 250)), SAMPLES, seed=25)
    for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
        solarized = views[v][:, :, 0, 0].mean(dim=1) < 128
        assert torch.equal(solarized, params[:, v, G.SOLARIZE] > 0)
        assert_frequency(int(solarized.sum()), SAMPLES, SPEC_SOLARIZE_P[v], f"solarize of view {v}")


def test_blur_in_the_pixels_has_the_drawn_sigma():
    # One brighter pixel on a dark background, 3-tap kernel at 32 px: the neighbour's excess over the
    # background is exp(-1 / (2 sigma^2)) of the centre's (no truncation at sigma >= 0.25).
    values = np.full((SIZE, SIZE), 20.0)
    values[16, 16] = 60.0
    params, views = run_batch(gray_image(values), 1000, seed=26)
    for v in (GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2):
        p = views[v][:, 0]
        flat = p.flatten(1).argmax(dim=1)
        rows, cols = flat // SIZE, flat % SIZE
        index = torch.arange(len(p))
        background = p[:, 0, 0]
        centre = p[index, rows, cols] - background
        neighbour = (p[index, rows, cols - 1] + p[index, rows, cols + 1]) / 2 - background
        ratio = neighbour / centre
        blurred = params[:, v, G.BLUR] > 0
        assert (ratio[~blurred].abs() < 1e-5).all()
        sigma = params[blurred, v, G.SIGMA]
        np.testing.assert_allclose(ratio[blurred].numpy(), torch.exp(-1 / (2 * sigma**2)).numpy(), atol=2e-3)


def test_cutout_area_in_the_pixels_is_the_drawn_box():
    # Black image, whole-image crop, no blur: the cutout is the only region of another colour.
    layout = ViewLayout((replace(VIEW_TYPES["cutout"], scale=(1.0, 1.0), size=96, blur_p=(0.0,)),))  # sharp edges
    params, (pixels,) = run_batch(Image.new("RGB", (96, 96)), 500, seed=27, layout=layout)
    corners = torch.stack([pixels[:, :, r, c] for r in (0, -1) for c in (0, -1)], dim=1)  # [N, 4, 3]
    background = corners.median(dim=1).values  # at least 3 corners are background
    distance = (pixels - background.view(-1, 3, 1, 1)).abs().amax(dim=1)
    fraction = (distance > distance.flatten(1).amax(dim=1).view(-1, 1, 1) / 2).flatten(1).float().mean(dim=1)
    box = params[:, 0, G.CUTOUT]
    np.testing.assert_allclose(fraction.numpy(), (box[:, 2] * box[:, 3] / 96**2).numpy(), atol=1e-6)
    assert fraction.min() >= 0.19 and fraction.max() <= 0.41 and abs(fraction.mean() - 0.3) < 0.02


# ---------------------------------------------------------------------------- agreement and determinism
def smooth_jpeg(width: int, height: int, seed: int) -> bytes:
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(500, 375), (1600, 1200)])
def test_views_equal_the_fast_pipelines_for_the_same_seed(size):
    # Both pipelines draw the same parameters in the same order, so under one seed they make the same
    # views: the same decode (reduced at 1600 x 1200) and crop + resize, colour ops up to float rounding.
    data = smooth_jpeg(*size, seed=28)
    fast = FastMultiViewTransform(IMAGENET_LAYOUT, MEAN, STD)
    gpu = GpuMultiViewTransform(IMAGENET_LAYOUT, MEAN, STD)
    samples = []
    for seed in range(6):
        torch.manual_seed(seed)
        expected = fast.float_views(Image.open(io.BytesIO(data)))  # before fast's rounding to uint8
        torch.manual_seed(seed)
        samples.append((expected, gpu(Image.open(io.BytesIO(data)))))
    assert gpu.reduced_decodes == fast.reduced_decodes == (6 if size[0] == 1600 else 0)
    views = gpu.to_views(gpu.collate([s[1] for s in samples]), CPU)
    for i, (expected, _) in enumerate(samples):
        for v, view in enumerate(views):
            assert view.shape[1:] == (3, *expected[v].shape[1:])
            assert (to_pixels(view[i]) - expected[v]).abs().max() < 0.01, (i, v)  # a grayscale view broadcasts


def test_crop_resize_flip_equal_the_fast_pipelines_exactly():
    # Views without colour ops (jitter and grayscale not drawn, no blur or solarize): bitwise equal.
    layout = ViewLayout(tuple(replace(VIEW_TYPES[n], blur_p=(0.0,), solarize_p=(0.0,)) for n in ("global", "local")))
    image = Image.fromarray(np.random.default_rng(29).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    fast, gpu = FastMultiViewTransform(layout, MEAN, STD), GpuMultiViewTransform(layout, MEAN, STD)
    compared = 0
    for seed in range(20):
        torch.manual_seed(seed)
        expected = fast(image)
        torch.manual_seed(seed)
        sample = gpu(image)
        views = gpu.to_views(gpu.collate([sample]), CPU)
        for v in range(4):
            if sample[0][v, G.JITTER] == 0 and sample[0][v, G.GRAY] == 0:
                assert torch.equal(views[v][0], fast.to_views([expected[v][None]], CPU)[0][0])
                compared += 1
    assert compared >= 5


def photo_like(width: int, height: int, seed: int) -> torch.Tensor:
    """[3, H, W] uint8: a smooth colour field with mild noise."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.float32)
    pixels += np.random.default_rng(seed).normal(0, 4, pixels.shape)
    return torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8)).permute(2, 0, 1)


def test_float_resize_is_within_a_level_or_two_of_the_uint8_kernel():
    # The resize other devices use (no uint8 kernel there), checked here against the CPU's uint8 kernel, which
    # also rounds and clamps between its horizontal and vertical passes (so on pure noise they differ more).
    crops = [photo_like(281, 375, 1), photo_like(50, 60, 2), photo_like(224, 224, 3)]
    for size in (224, 96):
        uint8 = resize_crops(crops, size, uint8_kernel=True)
        floats = resize_crops(crops, size, uint8_kernel=False)
        difference = (uint8 - floats).abs()
        assert difference.max() <= 2.0 and (difference > 1).float().mean() < 1e-4 and difference.mean() < 0.2
        assert torch.equal(floats, floats.round()) and floats.min() >= 0 and floats.max() <= 255


@pytest.mark.parametrize("size,kernel", [(224, 23), (96, 23), (96, 9), (32, 3)])
def test_batched_blur_matches_torchvision_per_sample(size, kernel):
    generator = torch.Generator().manual_seed(31)
    images = torch.rand(4, 3, size, size, generator=generator) * 255
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = gaussian_blur(images, sigma, kernel)
    for i in range(4):
        expected = TF.gaussian_blur(images[i], [kernel, kernel], [float(sigma[i])] * 2)
        assert (got[i] - expected).abs().max() < 0.05  # levels of 255: taps beyond 4 sigma are dropped


def test_same_sample_same_views_whatever_the_batch(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(smooth_jpeg(320, 240, seed=40 + i))
    transform = GpuMultiViewTransform(IMAGENET_LAYOUT, MEAN, STD)
    dataset = AugmentedImageFolder([(str(tmp_path / f"{i}.jpg"), i) for i in range(3)], transform, seed=0)
    pair = collate_views([dataset[(1, 0)], dataset[(1, 2)]], transform.collate)
    alone = collate_views([dataset[(1, 2)]], transform.collate)
    assert pair[1].tolist() == [0, 2] and alone[1].tolist() == [2]
    pair_views, alone_views = transform.to_views(pair[0], CPU), transform.to_views(alone[0], CPU)
    again = transform.to_views(collate_views([dataset[(1, 2)]], transform.collate)[0], CPU)
    other_epoch = transform.to_views(collate_views([dataset[(2, 2)]], transform.collate)[0], CPU)
    for v in range(5):
        assert torch.equal(pair_views[v][1], alone_views[v][0])  # independent of the other samples
        assert torch.equal(again[v], alone_views[v])  # the same (seed, epoch, index): the same views
        assert not torch.equal(other_epoch[v], alone_views[v])


def test_device_decode_path_equals_worker_decode(tmp_path):
    # decode_on_device ships the JPEG bytes; torchvision.io.decode_jpeg decodes them in to_views (on the CPU
    # here; nvJPEG on CUDA). Same parameters; pixels within the two JPEG decoders' differences.
    path = tmp_path / "photo.jpg"
    path.write_bytes(smooth_jpeg(320, 240, seed=32))
    worker, device = GpuMultiViewTransform(IMAGENET_LAYOUT, MEAN, STD), GpuMultiViewTransform(IMAGENET_LAYOUT, MEAN, STD, decode_on_device=True)
    torch.manual_seed(33)
    decoded = worker(Image.open(path))
    torch.manual_seed(33)
    shipped = device(Image.open(path))
    assert torch.equal(decoded[0], shipped[0]) and len(shipped) == 3 and shipped[1].dim() == 1 and shipped[2] == str(path)
    expected = worker.to_views(worker.collate([decoded]), CPU)
    got = device.to_views(device.collate([shipped]), CPU)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and (to_pixels(a[0]) - to_pixels(b[0])).abs().mean() < 1.0


# ---------------------------------------------------------------------------- training
@pytest.mark.slow
def test_gpu_pipeline_trains_and_resumes_exactly(tmp_path, monkeypatch):
    # data.pipeline=gpu through the Trainer (one DataLoader worker: the pipeline's collate runs there):
    # 2 steps, then a new Trainer resuming to 4, equals 4 uninterrupted steps; every loss finite.
    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.process_group import destroy_distributed, init_distributed
    from mtssl.distributed.preemption import StopRequest
    from mtssl.train.trainer import Trainer
    from tests.support.data import make_image_folder

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    root = make_image_folder(tmp_path / "data", per_class=8, splits=("train",))
    overrides = [
        f"data.root={root}", "data.subset=null", "data.pipeline=gpu", "data.num_workers=1", "views=global_local_cutout",
        "backbone=resnet18", "+backbone.kwargs.layers=[1,1,1,1]", "method.projector.hidden_dims=[32]",
        "method.predictor.hidden_dims=[32]", "method.projector.out_dim=16", "method.predictor.out_dim=16",
        "train.batch_size=8", "train.epochs=3", "optim.warmup_epochs=0", "train.log_every_steps=1",
    ]
    env = init_distributed("cpu")
    try:
        def fit(out, max_steps):
            trainer = Trainer(resolve_config(compose_config(overrides + [f"train.max_steps={max_steps}"])), env, out)
            assert isinstance(trainer.transform, GpuMultiViewTransform) and not trainer.transform.decode_on_device
            initial.update({k: v.clone() for k, v in trainer.model.online.state_dict().items()})
            stop = StopRequest()
            try:
                outcome = trainer.fit(stop)
            finally:
                stop.restore()
            assert outcome.status == "completed" and outcome.steps == max_steps
            assert outcome.final_losses and all(math.isfinite(v) for v in outcome.final_losses.values())
            return {k: v.clone() for k, v in trainer.model.online.state_dict().items()}

        initial = {}
        uninterrupted = fit(tmp_path / "a", 4)
        fit(tmp_path / "b", 2)
        resumed = fit(tmp_path / "b", 4)
    finally:
        destroy_distributed()
    assert uninterrupted.keys() == resumed.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(value, resumed[key]), key
    assert any(not torch.equal(v, resumed[k]) for k, v in initial.items())  # training moved the weights
