"""The augmentation specification that every view pipeline (torchvision, fast, gpu) is tested against.

Views are 32 px crops of 32 px images with scale (1, 1): the whole image, so each op can be detected in the
output pixels. Frequencies are checked within 4.5 binomial standard deviations.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from mtssl.data.views import VIEW_TYPES, ViewLayout

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 32
# The spec's five views at 32 px, whole-image crops: global 1, global 2, local, local, cutout.
WHOLE_IMAGE_LAYOUT = ViewLayout(
    tuple(replace(VIEW_TYPES[name], size=SIZE, scale=(1.0, 1.0)) for name in ("global", "local", "cutout"))
)
GLOBAL_1, GLOBAL_2, LOCAL_1, LOCAL_2, CUTOUT = range(5)
SPEC_BLUR_P = [1.0, 0.1, 0.5, 0.5, 0.5]
SPEC_SOLARIZE_P = [0.0, 0.2, 0.0, 0.0, 0.0]


def assert_frequency(hits: int, n: int, p: float, what: str) -> None:
    sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(hits / n - p) <= 4.5 * sigma + 1e-9, f"{what}: frequency {hits / n:.4f} over {n}, specified {p}"


def gray_image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(values[:, :, None], 3, axis=2).astype(np.uint8))


def expected_mean_area(height: int, width: int, scale, ratio=(3 / 4, 4 / 3), attempts: int = 10) -> float:
    """E[crop area / image area] of RandomResizedCrop, by numerical integration over (scale, log ratio).

    An attempt draws s ~ U(scale), log r ~ U(log ratio) and is kept when the box fits; after
    ``attempts`` misses the box is the whole image (its ratio lies inside ``ratio`` here).
    """
    s = np.linspace(scale[0], scale[1], 801)
    log_r = np.linspace(math.log(ratio[0]), math.log(ratio[1]), 801)
    ss, rr = np.meshgrid(s, np.exp(log_r), indexing="ij")
    area = height * width * ss
    fits = (np.sqrt(area * rr) <= width) & (np.sqrt(area / rr) <= height)
    q = fits.mean()
    miss_all = (1 - q) ** attempts
    return (1 - miss_all) * (ss * fits).sum() / fits.sum() + miss_all * 1.0
