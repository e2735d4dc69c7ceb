"""Tiny datasets on disk and where the real CIFAR-10 lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CIFAR_ROOT = Path(os.environ.get("MTSSL_DATA_ROOT", REPO.parent / "shared" / "data" / "cifar10"))


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 32, splits=("train", "val")) -> Path:
    """Write a tiny ImageFolder of random JPEGs: root/{split}/class_k/i.jpg."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root
