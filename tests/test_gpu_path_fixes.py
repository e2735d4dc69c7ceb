"""The GPU-path defects of the review (docs/gpu_limits.md, items 1-14), each where a CPU test can see it.

What only CUDA shows (stream ordering, nccl, kernel limits) is checked by the GPU acceptance run; these tests
check the CPU-visible half of each fix: counts of collectives and host copies, the error paths, the equalities.
"""

from __future__ import annotations

import pytest
import torch

from mtssl.config import ConfigError
from mtssl.distributed.process_group import select_device


# ---------------------------------------------------------------------------- 10: more local ranks than GPUs
def test_more_local_ranks_than_visible_gpus_is_refused_with_the_fix(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match=r"local rank 6 .* only 4 GPUs .*--ntasks-per-node=4.*--gpus-per-task=1"):
        select_device("cuda", local_rank=6)  # wrapped onto cuda:2 before, beside local rank 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no GPU is visible.*train.device=cpu"):
        select_device("cuda", local_rank=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU bound per task: each task's is number 0
    assert select_device("cuda", local_rank=5) == torch.device("cuda", 0)
    assert chosen == [3, 0]
