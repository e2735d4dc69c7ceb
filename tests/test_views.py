"""View presets, shapes and counts, and the cutout mask."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2

from mtssl.config import compose_config, resolve_config
from mtssl.data.torchvision_augment import Cutout, MultiViewTransform
from mtssl.data.views import blur_kernel_size, build_view_layout

PRESETS = {
    "global": {"global": 2},
    "global_local": {"global": 2, "local": 2},
    "global_cutout": {"global": 2, "cutout": 1},
    "global_local_cutout": {"global": 2, "local": 2, "cutout": 1},
}


def layout_for(overrides):
    cfg = resolve_config(compose_config(overrides))
    return cfg, build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("data,sizes", [("cifar10", {"global": 32, "local": 16, "cutout": 32}),
                                        ("imagefolder", {"global": 224, "local": 96, "cutout": 224})])
def test_preset_view_shapes(preset, data, sizes):
    cfg, layout = layout_for([f"views={preset}", f"data={data}", "data.root=/unused"])
    expected = [(t, sizes[t]) for t in PRESETS[preset] for _ in range(PRESETS[preset][t])]
    assert [(name, layout.type(name).size) for name, _ in layout.entries] == expected
    image = Image.new("RGB", (300, 260), (120, 30, 200))
    transform = MultiViewTransform(layout, cfg.data.mean, cfg.data.std)
    views = transform(image)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for _, s in expected]
    assert all(v.dtype == torch.uint8 for v in views)  # what crosses the DataLoader
    batch = transform.to_views([v.unsqueeze(0) for v in views], torch.device("cpu"))
    assert [(tuple(v.shape), v.dtype) for v in batch] == [((1, 3, s, s), torch.float32) for _, s in expected]
    assert layout.target_indices == [0, 1]


@pytest.mark.parametrize("data", ["cifar10", "imagefolder"])
def test_to_views_is_bitwise_the_per_sample_float_pipeline(data):
    # Before normalisation moved to the device, each worker view ended with ToDtype(float32, scale) and
    # Normalize: the batched to_views must give exactly those floats (CPU results stay unchanged).
    cfg, layout = layout_for(["views=global_local_cutout", f"data={data}", "data.root=/unused"])
    transform = MultiViewTransform(layout, cfg.data.mean, cfg.data.std)
    finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.data.mean, cfg.data.std)])
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8, generator=generator).numpy()) for _ in range(3)]
    samples = []
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        samples.append(transform(image))
    views = transform.to_views([torch.stack(v) for v in zip(*samples)], torch.device("cpu"))
    for v, view in enumerate(views):
        expected = torch.stack([finish(sample[v]) for sample in samples])
        assert view.dtype == torch.float32 and torch.equal(view, expected)


def test_counts_and_sizes_are_overridable():
    _, layout = layout_for(["views.types.local.count=6", "views.types.local.size=24"])
    assert layout.indices_of("local") == [2, 3, 4, 5, 6, 7]
    assert layout.type("local").size == 24


def test_global_views_are_asymmetric():
    _, layout = layout_for([])
    g = layout.type("global")
    assert [g.blur_probability(i) for i in range(2)] == [1.0, 0.1]
    assert [g.solarize_probability(i) for i in range(2)] == [0.0, 0.2]


def test_blur_kernel_is_about_ten_percent_and_odd():
    assert [blur_kernel_size(s) for s in (224, 96, 32, 16)] == [23, 9, 3, 3]


def test_cutout_masks_between_20_and_40_percent():
    torch.manual_seed(0)
    mean = (0.5, 0.25, 0.75)
    cutout = Cutout((0.2, 0.4), mean)
    fill = torch.tensor([128, 64, 191], dtype=torch.uint8)
    fractions = []
    for _ in range(500):
        image = torch.zeros(3, 224, 224, dtype=torch.uint8)
        out = cutout(image)
        masked = (out == fill.view(3, 1, 1)).all(dim=0)
        fractions.append(masked.float().mean().item())
    assert min(fractions) >= 0.2 - 2 / 224 and max(fractions) <= 0.4 + 2 / 224
    assert 0.28 < sum(fractions) / len(fractions) < 0.32  # U(0.2, 0.4) has mean 0.3
