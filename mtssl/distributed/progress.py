"""Progress of long phases with tqdm, on rank 0 only.

On a terminal it is tqdm's bar. When stdout is not a terminal (a SLURM log, a pipe), a bar's carriage
returns would pile up into one huge line, so a plain line in tqdm's format (count, rate, ETA) is printed
at most every ``PLAIN_INTERVAL_S`` seconds, plus one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
PLAIN_INTERVAL_S = 30.0


def is_rank_zero() -> bool:
    """False on the ranks > 0 of an initialised process group (torch is never imported for this)."""
    dist = sys.modules.get("torch.distributed")
    return dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def progress_bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
                 min_items: int = 0, file=None) -> Iterator[T]:
    """Iterate ``iterable`` showing progress with an ETA; silent off rank 0 or for fewer than ``min_items``."""
    file = sys.stdout if file is None else file
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    if not is_rank_zero() or (total is not None and total < min_items):
        yield from iterable
        return
    if file.isatty():
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=file, dynamic_ncols=True, leave=False)
        return
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= PLAIN_INTERVAL_S:
            print(tqdm.format_meter(n, total, now - start, prefix=desc, unit=unit), file=file, flush=True)
            last = now
    if n:
        print(tqdm.format_meter(n, total, time.monotonic() - start, prefix=desc, unit=unit), file=file, flush=True)
