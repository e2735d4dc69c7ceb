"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``out_dir/checkpoints/step_00001234/`` holding DCP shards, DCP's ``.metadata``, the
trainer state (``trainer_state.json``) and the resolved config. A checkpoint is written into
``.tmp_step_*`` and renamed when complete, so a directory without ``.metadata`` or trainer state
is never a valid checkpoint. DCP reshards on load, so a run saved on 2 ranks resumes on 1.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from mtssl.distributed.collectives import host_any, host_barrier, host_broadcast_object, world_size
from mtssl.distributed.process_group import host_group
# The checkpoint's file names are the job folder's (mtssl.job_folder), which readers without torch share.
from mtssl.job_folder import (CHECKPOINT_PREFIX, CONFIG, RANK_BUFFERS, RANK_RNG, TRAINER_STATE, checkpoint_name,
                              is_complete_checkpoint)

log = logging.getLogger(__name__)


class CheckpointMismatch(RuntimeError):
    """out_dir holds a checkpoint of a different config: resuming it would mix two runs."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_seen: int = 0  # global samples seen in ``epoch``
    config_hash: str = ""
    world_size: int = 1
    skipped_images: int = 0  # distinct unreadable files met so far (len(skipped_files))
    skipped_files: list[str] = field(default_factory=list)  # their paths, sorted
    monitor: dict = field(default_factory=dict)  # running sums of the research monitors (mtssl.train.research_monitors)


class ModelAndOptimizer(Stateful):
    """DCP view of the network (online, predictors, target) and the optimizer state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state_dict):
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's generator states: the CPU's and, when CUDA is in use, its current GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_dir(root: Path, step: int) -> Path:
    return root / checkpoint_name(step)


class CheckpointManager:
    """Save every N steps / minutes / on demand, keep the newest ``keep``, resume the newest valid."""

    def __init__(self, root: Path, keep: int, rank: int = 0):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.is_main = rank == 0

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first; partial ones are reported and ignored."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
            if is_complete_checkpoint(path):
                found.append(path)
            else:
                log.warning("ignoring incomplete checkpoint %s (no .metadata or %s)", path, TRAINER_STATE)
        return found

    def keep_only_newest(self) -> list[Path]:
        """Delete every checkpoint but the newest complete one (rank 0; e.g. once a job has completed);
        returns the deleted paths."""
        if not self.is_main:
            return []
        found = self.checkpoints()
        for old in found[1:]:
            shutil.rmtree(old, ignore_errors=True)
        return found[1:]

    def save(self, state: TrainerState, model_and_optimizer: ModelAndOptimizer, config_yaml: str) -> Path:
        """Write a complete checkpoint atomically (all ranks must call)."""
        final = _step_dir(self.root, state.step)
        tmp = self.root / f".tmp_{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        host_barrier()
        # DCP's own coordination exchanges only metadata (Python objects): the gloo host group
        # keeps it off nccl. Shards are written by their owner, with no tensor collective.
        dcp.save({"app": model_and_optimizer}, checkpoint_id=str(tmp), process_group=host_group())
        buffers = {name: b.detach().cpu() for name, b in model_and_optimizer.model.named_buffers()}
        torch.save(buffers, tmp / RANK_BUFFERS.format(rank=self.rank))
        torch.save(rng_state(), tmp / RANK_RNG.format(rank=self.rank))
        host_barrier()
        if self.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
            (tmp / CONFIG).write_text(config_yaml)
            if final.exists():  # re-saving a step (e.g. stop right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.checkpoints()[self.keep :]:
                shutil.rmtree(old, ignore_errors=True)
        host_barrier()
        return final

    def load_latest(self, model_and_optimizer: ModelAndOptimizer, config_hash: str,
                    changed_fields: Callable[[Path], str] | None = None) -> TrainerState | None:
        """Load the newest loadable checkpoint into place; None when there is none (a collective).

        Refuses (CheckpointMismatch) a checkpoint written by a different config; ``changed_fields(saved
        config.yaml)`` names the fields that differ in the message. A corrupted newest checkpoint is skipped
        with a warning and the one before it is used.

        Every rank resumes from the same checkpoint: rank 0's listing and trainer state are broadcast (another
        rank may see a stale directory listing), and a checkpoint is used only when every rank could read its
        own files (its buffers and RNG states, then its DCP shards): one rank's unreadable file sends all ranks
        to the previous checkpoint together, so the next collectives match.
        """
        listed = host_broadcast_object([p.name for p in self.checkpoints()] if self.is_main else None)
        for name in listed:
            path = self.root / name
            state = host_broadcast_object(self._read_state(path) if self.is_main else None)
            if state is None:  # rank 0 could not read it: all ranks skip it
                continue
            if state.config_hash != config_hash:
                fields = (changed_fields(path / CONFIG) if changed_fields is not None
                          else f"hash {state.config_hash[:12]} vs {config_hash[:12]}, see {path / CONFIG}")
                raise CheckpointMismatch(
                    f"{self.root.parent} holds a checkpoint ({path}) of a different training config: {fields}. "
                    f"Use a new out_dir (out_dir=...), or delete {self.root.parent} to run this config from scratch."
                )
            # This rank's own files first (no collective in torch.load), then the shards (dcp.load reports a
            # failure on any rank to all of them; the agreement below covers it anyway).
            try:
                # Same world size: each rank gets its own statistics back; otherwise rank r takes
                # those of saved rank r mod saved world size.
                saved = torch.load(path / RANK_BUFFERS.format(rank=self.rank % state.world_size), map_location="cpu")
                rng_file = path / RANK_RNG.format(rank=self.rank)
                rng = None
                if state.world_size == world_size() and rng_file.is_file():  # older checkpoints have none
                    rng = torch.load(rng_file, map_location="cpu")
                error = None
            except (Exception, CheckpointException) as failure:  # truncated, corrupted or missing files
                error = failure
            if self._any_rank_failed(path, error):
                continue
            try:
                dcp.load({"app": model_and_optimizer}, checkpoint_id=str(path), process_group=host_group())
                with torch.no_grad():
                    for buffer_name, buffer in model_and_optimizer.model.named_buffers():
                        buffer.copy_(saved[buffer_name])
                error = None
            except (Exception, CheckpointException) as failure:
                error = failure
            if self._any_rank_failed(path, error):
                continue  # the previous checkpoint's load overwrites whatever this one loaded
            if rng is not None:
                set_rng_state(rng)
            log.info("resumed from %s (step %d)", path, state.step)
            return state
        return None

    @staticmethod
    def _read_state(path: Path) -> TrainerState | None:
        try:
            return TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
        except (OSError, ValueError, TypeError) as error:
            log.warning("checkpoint %s has an unreadable %s (%s); trying the previous one", path, TRAINER_STATE, error)
            return None

    def _any_rank_failed(self, path: Path, error: BaseException | None) -> bool:
        """Whether any rank failed to read ``path`` (a collective: one small gloo all-reduce); warns with the reason."""
        failed = host_any([error is not None])[0]
        if error is not None:
            first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            log.warning("checkpoint %s could not be loaded on rank %d (%s); all ranks try the previous one",
                        path, self.rank, first_line)
        elif failed:
            log.warning("checkpoint %s could not be loaded on another rank; all ranks try the previous one", path)
        return failed
