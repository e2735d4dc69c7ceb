"""Shared fixtures: the CIFAR-10 folder and tiny synthetic ImageFolder datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CIFAR_ROOT = Path(os.environ.get("MTSSL_DATA_ROOT", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR_ROOT / "train").is_dir():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_ROOT} (set MTSSL_DATA_ROOT)")
    return CIFAR_ROOT


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


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")
