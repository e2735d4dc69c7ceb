"""ImageFolder data, class-balanced subsets, and the resumable global-batch sampler.

Augmentation randomness is a pure function of (seed, epoch, sample index): every sample is
augmented under its own seeded RNG. Together with the sampler, whose whole state is the global
(epoch, samples seen), this makes a run's data stream independent of the number of ranks and
data-loader workers, and lets a resumed run see exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)


IMAGE_FILES = f"files ending in {', '.join(IMG_EXTENSIONS[:3])}, ..."  # what a class folder must hold


class DataError(ValueError):
    """A data root, split or subset that cannot be used; the message says how to fix it."""


@functools.lru_cache(maxsize=16)
def list_image_folder(root: str | os.PathLike, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Scan ``root/split/<class>/*`` and return ([(path, class index)], class names).

    Raises DataError naming ``data.root`` when the folder, classes or images are missing.
    Cached: launching a sweep validates every job against the same folders.
    """
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise DataError(
            f"data.root: folder {root!s} does not exist. Point data.root (or $MTSSL_DATA_ROOT) at a folder "
            f"holding {split}/<class>/*.jpg"
        )
    if not split_dir.is_dir():
        raise DataError(f"data.root: {root!s} has no '{split}' folder; expected {split_dir}/<class>/*.jpg")
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    samples = []
    empty = []
    for index, name in enumerate(classes):
        files = sorted(f.path for f in os.scandir(split_dir / name) if f.name.lower().endswith(IMG_EXTENSIONS))
        samples.extend((path, index) for path in files)
        if not files:
            empty.append(name)
    if not samples:
        raise DataError(f"data.root: split folder {split_dir} holds no images (expected <class>/*.jpg)")
    if empty:
        # A class without images would still take a label: training silently covers the other classes only.
        raise DataError(f"data.root: class folder {split_dir / empty[0]} holds no images ({IMAGE_FILES})"
                        + (f", nor do {len(empty) - 1} other class folder(s) of {split_dir}: {empty[1:6]}"
                           if len(empty) > 1 else "")
                        + "; add its images or remove the folder")
    present = {label for _, label in samples}
    if len(present) < 2:
        raise DataError(f"data.root: split folder {split_dir} has images of {len(present)} class; at least 2 are needed")
    return samples, classes


def list_splits(root: str | os.PathLike, train_split: str, val_split: str
                ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """Both splits of ``root``: (train samples, val samples, class names), refused (DataError) unless the two
    splits hold the same classes. Labels are class indices in sorted order per split, so a class in one split only
    would give the other split's images wrong labels (and val images of a class never trained on)."""
    train, train_classes = list_image_folder(root, train_split)
    val, val_classes = list_image_folder(root, val_split)
    if train_classes != val_classes:
        only_val = sorted(set(val_classes) - set(train_classes))
        only_train = sorted(set(train_classes) - set(val_classes))
        parts = [f"{Path(root) / val_split} has class folder(s) {only_val[:5]} that {Path(root) / train_split} lacks"
                 if only_val else "",
                 f"{Path(root) / train_split} has class folder(s) {only_train[:5]} that {Path(root) / val_split} lacks"
                 if only_train else ""]
        raise DataError(f"data.root: the {train_split} and {val_split} splits must hold the same classes: "
                        f"{'; '.join(p for p in parts if p)}; add or remove class folders so that both list the same")
    return train, val, train_classes


def class_balanced_subset(samples: list[tuple[str, int]], size: int, seed: int = 0) -> list[tuple[str, int]]:
    """A deterministic subset of ``size`` samples with (nearly) equal counts per class."""
    if size >= len(samples):
        return samples
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    labels = sorted(by_class)
    generator = torch.Generator().manual_seed(seed)
    # .tolist(): iterating a tensor makes one tensor per element (about 1 s for CIFAR-10's 50,000 images)
    orders = {c: torch.randperm(len(by_class[c]), generator=generator).tolist() for c in labels}
    shuffled = {c: [by_class[c][j] for j in orders[c]] for c in labels}
    chosen: list[int] = []
    rank = 0
    while len(chosen) < size:  # round-robin over classes keeps counts within one of each other
        for c in labels:
            if rank < len(shuffled[c]) and len(chosen) < size:
                chosen.append(shuffled[c][rank])
        rank += 1
    return [samples[i] for i in sorted(chosen)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentations: stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def undecodable_sample(paths: list[str], sample_size: int = 8) -> str | None:
    """What is wrong when none of ``sample_size`` files spread evenly over ``paths`` decodes as an image, e.g.
    "none of 8 sampled images decodes (a.jpg: cannot identify image file)"; None when one of them does. Cheap
    enough to run before every job: a folder of unreadable files is refused before training, while a few bad
    files among good ones are skipped and counted during the run."""
    if not paths:
        return None
    step = max(1, len(paths) // sample_size)
    sample = paths[::step][:sample_size]
    errors = []
    for path in sample:
        try:
            load_rgb(path)
            return None
        except (OSError, ValueError) as error:  # as the loaders: PIL raises these for a bad or truncated file
            errors.append(f"{path}: {error}")
    return f"none of {len(sample)} sampled images decodes (e.g. {errors[0]})"


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


class AugmentedImageFolder(Dataset):
    """Samples indexed by (epoch, index) and augmented under a per-sample seeded RNG.

    An unreadable image is replaced by the next readable one and reported through the paths
    of the ``skipped`` files returned with each sample, so a bad file costs a warning, not a job.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, seed: int):
        self.samples = samples
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        skipped: list[str] = []
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                views = self._augment(path, sample_seed(self.seed, epoch, index))
                break
            except (OSError, ValueError) as error:
                log.warning("skipping unreadable image %s: %s", path, error)
                skipped.append(path)
        else:
            raise DataError("data.root: no readable image in the dataset")
        return views, label, skipped

    def _augment(self, path: str, seed: int) -> list[torch.Tensor]:
        """The views of one image under its own seed. A transform with ``decodes_images`` gets the
        file undecoded (the fast pipeline decodes JPEGs at reduced size when its crops allow), so
        its decode errors land here as well."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if getattr(self.transform, "decodes_images", False):
                with Image.open(path) as image:
                    return self.transform(image)
            return self.transform(load_rgb(path))


class EvalImageFolder(Dataset):
    """Deterministic (validation-transform) samples for feature extraction.

    An unreadable image is replaced by a black one, so rows stay aligned with labels; with
    ``report_unreadable`` each item also says whether it was replaced (``(image, label, replaced)``).
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, report_unreadable: bool = False):
        self.samples = samples
        self.transform = transform
        self.report_unreadable = report_unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        replaced = False
        try:
            image = load_rgb(path)
        except (OSError, ValueError) as error:
            # Keep the row count fixed so features stay aligned with labels.
            log.warning("unreadable image %s replaced by black: %s", path, error)
            image, replaced = Image.new("RGB", (32, 32)), True
        if self.report_unreadable:
            return self.transform(image), label, replaced
        return self.transform(image), label


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded per-epoch permutation, cut into global batches, each sliced by rank.

    Yields, for this rank, lists of (epoch, sample index), one per global step from
    ``set_position``'s start to its stop, across epoch boundaries: one DataLoader (and one set of
    workers) serves a whole run. The state is the global step, so resuming at any world size
    covers the same data. The last incomplete global batch of each epoch is dropped.
    """

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int, seed: int):
        if global_batch_size % world_size:
            raise ValueError(
                f"train.batch_size: {global_batch_size} does not divide across {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.steps_per_epoch = num_samples // global_batch_size
        self.seed = seed
        self.start_step = 0
        self.stop_step = self.steps_per_epoch

    def set_position(self, step: int, stop_step: int | None = None) -> None:
        """Yield the batches of global steps ``step`` .. ``stop_step`` - 1 (default: to the end of
        ``step``'s epoch); epoch and offset follow from the global batch."""
        self.start_step = step
        self.stop_step = (step // self.steps_per_epoch + 1) * self.steps_per_epoch if stop_step is None else stop_step

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order_epoch, order = None, []
        for step in range(self.start_step, self.stop_step):
            epoch, batch = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.permutation(epoch).tolist()
            lo = batch * self.global_batch_size + self.rank * self.local_batch_size
            yield [(epoch, i) for i in order[lo : lo + self.local_batch_size]]


def stack_views(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-sample view lists -> one [B, ...] tensor per view (a pipeline's default ``collate``)."""
    return [torch.stack([views[v] for views in samples]) for v in range(len(samples[0]))]


def collate_views(batch, collate: Callable | None = None):
    """[(views, label, skipped paths)] -> (batched views, labels, set of skipped paths).

    ``collate`` batches the per-sample view lists (the pipeline's own, e.g. for per-sample shapes;
    default ``stack_views``); bind it with ``functools.partial`` for a DataLoader.
    """
    views = (collate or stack_views)([sample[0] for sample in batch])
    labels = torch.tensor([sample[1] for sample in batch])
    skipped = {path for sample in batch for path in sample[2]}
    return views, labels, skipped
