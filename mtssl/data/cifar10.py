"""Fetch CIFAR-10 into the ImageFolder layout that ``data=cifar10`` reads (needs internet).

``prepare_data`` is the job's data step (``python -m mtssl.run`` calls it after validating the config and
before training): config validation reads the filesystem only, never the network.
"""

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


def prepare_data(cfg) -> bool:
    """The data step: download CIFAR-10 into ``data.root`` when the folder is absent and ``data.download`` is
    on. Returns whether it downloaded (the folder is then validated again by the caller); raises DataError
    naming data.root and the ways out when the download fails (no network, an unwritable folder)."""
    from mtssl.data.image_folder import DataError

    data = cfg.data
    if data.root is None or Path(data.root).exists() or not data.download:
        return False
    try:
        download_cifar10(data.root)
    except (OSError, RuntimeError) as error:  # URLError (no network), a bad archive, an unwritable folder
        raise DataError(
            f"data.root: {data.root} does not exist and downloading CIFAR-10 there failed ({error}). "
            f"Point data.root (or the MTSSL_DATA_ROOT environment variable) at a CIFAR-10 folder in the "
            f"ImageFolder layout (<root>/train/<class>/*.jpg, <root>/val/<class>/*.jpg), or run once where "
            f"there is network; data.download=false turns the download off"
        ) from error
    return True
