"""Fetch CIFAR-10 into the ImageFolder layout that ``data=cifar10`` reads (needs internet)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def download_cifar10(root: str | Path) -> None:
    """Download CIFAR-10 with torchvision and write root/{train,val}/<class>/NNNNN.png."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    log.info("data.root %s is absent: downloading CIFAR-10 into it", root)
    with tempfile.TemporaryDirectory() as raw:
        for split, train in (("train", True), ("val", False)):
            dataset = CIFAR10(raw, train=train, download=True)
            for index, (image, label) in enumerate(dataset):
                folder = root / split / dataset.classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{index:05d}.png")
