"""Host-to-device copy of the next batch while the current one computes.

On CUDA, ``DevicePrefetcher`` issues the copy of batch n+1 from the loader's pinned memory on a
side stream (``non_blocking=True``: an asynchronous DMA) before it hands out batch n, so the copy
overlaps batch n's kernels on the compute stream even when the host is not ahead of the device.
Before a batch is handed out, the compute stream waits for its copy (``wait_stream``: a
device-side wait, the host does not block), and each copied tensor is marked as used by the
compute stream (``record_stream``): the tensors were allocated on the side stream, and without it
the caching allocator could hand their memory to a later copy while the compute stream still
reads them. The pinned source may be dropped at once: torch's pinned-memory allocator keeps a
block until the copies recorded on it have finished.

Each tensor of a batch costs one copy and one ``record_stream``: a pipeline with per-sample shapes
packs its batch into one buffer in its collate (``data.pipeline=gpu``: one uint8 buffer and a host-side
layout, which passes through untouched, as does any value that is not a tensor, list or tuple).

On CPU it passes batches through: there is no copy engine to overlap and the tensors already
live in the memory the step reads (``Tensor.to("cpu")`` would return them unchanged).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _tensors(item)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in its (nested) lists and tuples copied to ``device``, asynchronously."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    return batch  # e.g. the set of skipped file paths


class DevicePrefetcher:
    """Iterate over ``loader``'s batches with their tensors on ``device``, one copy ahead on CUDA."""

    def __init__(self, loader: Iterable, device: torch.device):
        self.loader = loader
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)

        def copy_next():
            batch = next(batches, None)
            if batch is None:
                return None
            with torch.cuda.stream(stream):
                return to_device(batch, self.device)

        ahead = copy_next()
        while ahead is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(stream)
            for tensor in _tensors(ahead):
                tensor.record_stream(compute)
            batch, ahead = ahead, copy_next()
            yield batch
