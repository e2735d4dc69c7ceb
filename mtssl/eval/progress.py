"""Progress of long evaluation loops: a tqdm bar (elapsed, rate, ETA) on rank 0 only."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm

from mtssl.distributed.collectives import rank


def progress(iterable: Iterable, description: str, total: int | None = None) -> Iterable:
    """Wrap `iterable` in a tqdm bar on rank 0 (other ranks iterate silently); `mininterval` keeps logs short."""
    return tqdm(iterable, desc=description, total=total, disable=rank() != 0, mininterval=10.0, dynamic_ncols=True)
