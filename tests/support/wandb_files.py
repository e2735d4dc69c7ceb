"""Read W&B's offline run files back: what ``wandb sync`` would upload.

A run folder (``<root>/wandb/offline-run-<time>-<id>/``) holds ``run-<id>.wandb``, W&B's transaction log: a
LevelDB log (32 KiB blocks of chunks: CRC-32 of the chunk type and payload, length, type FULL/FIRST/MIDDLE/LAST)
after a 7-byte header (``:W&B``, magic 0xBEE1, version), each record a ``wandb_internal_pb2.Record``. wandb 0.31
has no Python reader of its own (its reader is in wandb-core); this one follows
github.com/wandb/wandb core/pkg/leveldb/record.go and checks every checksum.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FILE_HEADER = struct.pack("<4sH", b":W&B", 0xBEE1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every record of a ``.wandb`` file, in order (a truncated or corrupt file fails the test)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:6] == FILE_HEADER, f"{path}: not a W&B transaction log (header {data[:7]!r})"
    records, parts, pos = [], [], CHUNK_HEADER  # the file header is as long as a chunk header
    while pos + CHUNK_HEADER <= len(data):
        block_end = (pos // BLOCK + 1) * BLOCK
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == length == kind == 0:  # zero padding: the rest of the block is empty
            pos = block_end
            continue
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        assert len(payload) == length, f"{path}: truncated chunk at byte {pos}"
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: checksum mismatch at byte {pos}"
        parts.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        end = pos + CHUNK_HEADER + length
        pos = end if end + CHUNK_HEADER <= block_end else block_end  # a block's tail shorter than a header is padding
    assert not parts, f"{path}: ends inside a record"
    return records


def _items(items) -> dict[str, Any]:
    """key/nested_key + value_json items as a dict (nested keys nested)."""
    out: dict[str, Any] = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """One offline run folder: its run record, history rows, config, summary and exit code."""

    folder: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    name: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)  # history rows; "_step" is the W&B step
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    preempting: bool = False


def read_offline_run(folder: Path) -> OfflineRun:
    """The run of one ``offline-run-*`` folder, from its ``.wandb`` file."""
    [log_file] = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for record in read_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.group, run.name = r.run_id, r.project, r.run_group, r.display_name
            run.config.update(_items(r.config.update))
        elif kind == "history":
            row = _items(record.history.item)
            row.setdefault("_step", record.history.step.num)
            run.rows.append(row)
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "preempting":
            run.preempting = True
    # wandb stores each config value as {"value": v} (and "desc"); the job's own keys are what a reader sees.
    run.config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in run.config.items()}
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run folder under a wandb folder, oldest first (their names start with the time)."""
    return [read_offline_run(f) for f in sorted(Path(wandb_dir).glob("offline-run-*")) if f.is_dir()]
