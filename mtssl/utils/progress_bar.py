"""Progress of long phases with tqdm, on rank 0 only.

On a terminal it is tqdm's bar. When the output is not a terminal (a SLURM log, a pipe), a bar's carriage
returns would pile up into one huge line, so a plain line in tqdm's format (count, rate, ETA) is printed
at most every ``PLAIN_INTERVAL_S`` seconds, plus one at the end.
"""

from __future__ import annotations

import contextlib
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


class Progress:
    """Counts done items of a phase and shows them with an ETA (a tqdm bar, or plain lines off a terminal)."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", file=None, enabled: bool = True) -> None:
        self.file = sys.stdout if file is None else file
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled and is_rank_zero()
        self.bar = None
        if self.enabled and self.file.isatty():
            self.bar = tqdm(desc=desc, total=total, unit=unit, file=self.file, dynamic_ncols=True, leave=False)
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= PLAIN_INTERVAL_S:
            self._line()

    def external_write(self):
        """Context for printing other lines while a bar is shown (it is cleared and redrawn around them)."""
        if self.bar is None:
            return contextlib.nullcontext()
        return tqdm.external_write_mode(file=self.file)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        print(tqdm.format_meter(self.n, self.total, self.last - self.start, prefix=self.desc, unit=self.unit),
              file=self.file, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
                 min_items: int = 0, file=None) -> Iterator[T]:
    """Iterate ``iterable`` showing progress with an ETA; silent off rank 0 or for fewer than ``min_items``."""
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    with Progress(desc, total, unit, file, enabled=total is None or total >= min_items) as progress:
        for item in iterable:
            yield item
            progress.update()
