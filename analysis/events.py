"""Read a bounded number of points per scalar curve from TensorBoard event files, fast.

An event file is a sequence of TFRecords (8-byte length, 4-byte masked CRC-32C of the length, the serialized
``Event``, 4-byte CRC of the data). TensorBoard's ``EventAccumulator`` parses every record (about 24 µs each
here): a 200-epoch ImageNet job logs about 225,000 scalars, so 1,000 jobs would take hours. Its
``size_guidance`` bounds what it keeps, not what it parses.

So a file larger than ``FULL_READ_BYTES`` is sampled: at ``max_points`` offsets spread evenly over the file,
the reader finds the next record boundary (a length whose CRC matches, followed by another such header),
skips the rest of the step it lands in and reads the next complete step (all tags logged at that step). The
first and the last ``EDGE_BYTES`` are read in full, so the first and final values, and tags logged rarely
near the end (``eval/*`` after training), are always there. Smaller files are read in full. A run resumed
with ``SummaryWriter(purge_step=s)`` starts a new file with a session-start marker at step s; points at steps
>= s of the earlier files are dropped, as TensorBoard does.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import pandas as pd
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

MAX_POINTS = 100                 # sampled steps per file (hence at most about this many points per curve)
FULL_READ_BYTES = 256 * 1024     # files up to this size are read in full (about 5,000 scalars)
EDGE_BYTES = 8 * 1024            # read in full at the start and the end of a sampled file
WINDOW_BYTES = 4 * 1024          # read at each sampled offset: enough for two steps of ~40 tags
MAX_RECORD_BYTES = 1 << 20       # scalar events are ~50 bytes; a larger "length" is not a record header
_HEADER = 12
_START = event_pb2.SessionLog.START


def event_files(tb_dir: Path) -> list[Path]:
    """The event files of a log directory, in the order they were written (their names hold the time)."""
    return sorted(p for p in Path(tb_dir).iterdir() if p.is_file() and "tfevents" in p.name)


def _header_at(buf: bytes, pos: int) -> int | None:
    """The record length if a valid record header starts at buf[pos], else None."""
    if pos + _HEADER > len(buf):
        return None
    length = int.from_bytes(buf[pos:pos + 8], "little")
    if length > MAX_RECORD_BYTES:
        return None
    (crc,) = struct.unpack_from("<I", buf, pos + 8)
    return length if masked_crc32c(buf[pos:pos + 8]) == crc else None


def _resync(buf: bytes, start: int) -> int | None:
    """The first position >= start where a record header is followed by another one (or by the buffer end)."""
    for pos in range(start, len(buf) - _HEADER + 1):
        length = _header_at(buf, pos)
        if length is None:
            continue
        following = pos + _HEADER + length + 4
        if following >= len(buf) or _header_at(buf, following) is not None:
            return pos
    return None


def _records(buf: bytes, pos: int):
    """The complete records of buf from a verified header at pos: (end offset, serialized Event).

    Records follow one another, so only the first header's CRC is checked (the checks dominate the time).
    """
    while pos + _HEADER <= len(buf):
        length = int.from_bytes(buf[pos:pos + 8], "little")
        end = pos + _HEADER + length + 4
        if length > MAX_RECORD_BYTES or end > len(buf):
            return
        yield end, buf[pos + _HEADER:pos + _HEADER + length]
        pos = end


def _parse(data: bytes) -> tuple[int | None, list[tuple[int, str, float]]]:
    """One serialized Event: (its step if it marks a session start, i.e. a purge, else None; its scalars)."""
    event = event_pb2.Event.FromString(data)
    if event.HasField("session_log") and event.session_log.status == _START:
        return event.step, []
    if not event.HasField("summary"):
        return None, []
    points = []
    for value in event.summary.value:
        if value.HasField("simple_value"):
            points.append((event.step, value.tag, value.simple_value))
        elif value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
            points.append((event.step, value.tag, float(tensor_util.make_ndarray(value.tensor))))
    return None, points


def _read_all(buf: bytes, points: list, purges: list) -> None:
    start = 0 if _header_at(buf, 0) is not None else _resync(buf, 0)
    if start is None:
        return
    for _, data in _records(buf, start):
        purge, found = _parse(data)
        if purge is not None:
            purges.append(purge)
        points += found


def _read_one_step(buf: bytes, points: list) -> None:
    """From a resynced position in buf: skip the step it lands in, keep the next complete step."""
    pos = _resync(buf, 0)
    if pos is None:
        return
    first = kept = None
    for _, data in _records(buf, pos):
        for step, tag, value in _parse(data)[1]:
            if first is None:
                first = step
            elif step != first and kept is None:
                kept = step
            if kept is not None:
                if step != kept:
                    return
                points.append((step, tag, value))


def read_file(path: Path, max_points: int = MAX_POINTS) -> tuple[list[tuple[int, str, float]], int | None]:
    """(step, tag, value) points of one event file, at most about max_points steps, and its purge step."""
    points: list[tuple[int, str, float]] = []
    purges: list[int] = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= FULL_READ_BYTES:
            _read_all(f.read(), points, purges)
        else:
            _read_all(f.read(EDGE_BYTES), points, purges)
            for i in range(1, max_points - 1):
                f.seek(EDGE_BYTES + (size - 2 * EDGE_BYTES) * i // (max_points - 1))
                _read_one_step(f.read(WINDOW_BYTES), points)
            f.seek(size - EDGE_BYTES)
            _read_all(f.read(), points, purges)
    return points, (min(purges) if purges else None)


def read_scalars(tb_dir: Path, max_points: int = MAX_POINTS) -> dict[str, pd.DataFrame]:
    """The scalar curves of a log directory as {tag: DataFrame(step, value)}, sorted by step, one value per step
    (the last written), non-finite values as NaN; about max_points points per curve and file at most."""
    curves: dict[str, dict[int, float]] = {}
    for path in event_files(tb_dir):
        points, purge = read_file(path, max_points)
        if purge is not None:  # a resumed run rewrites the steps from its purge step on
            curves = {tag: {s: v for s, v in curve.items() if s < purge} for tag, curve in curves.items()}
        for step, tag, value in points:
            curves.setdefault(tag, {})[step] = value if math.isfinite(value) else math.nan
    return {tag: pd.DataFrame(sorted(curve.items()), columns=["step", "value"])
            for tag, curve in sorted(curves.items()) if curve}
