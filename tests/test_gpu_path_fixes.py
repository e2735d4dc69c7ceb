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


# ---------------------------------------------------------------------------- 8: kNN ties in bounded memory
def _top_k_by_hand(similarity: torch.Tensor, index: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the global indices of the k largest similarities, ties to the smaller index (a sort by hand)."""
    index = index.expand_as(similarity)
    return [[int(i) for _, i in sorted(zip((-similarity[r]).tolist(), index[r].tolist()))[:k]] for r in range(len(similarity))]


def test_knn_ties_are_reranked_in_blocks_of_bounded_memory(monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    import mtssl.eval.knn as knn

    queries, bank, k = 64, 4096, 5
    monkeypatch.setattr(knn, "TIE_BLOCK_ELEMENTS", 4 * bank, raising=False)  # 4 tied rows per block
    generator = torch.Generator().manual_seed(0)
    # Collapsed features: every similarity equal, so every row ties with every column; a few rows with
    # distinct values (no tie) and a few with a partial tie at the k-th value, over shuffled global indices.
    similarity = torch.zeros(queries, bank)
    similarity[:8] = torch.rand(8, bank, generator=generator)
    similarity[8:16, :3] = 2.0
    index = torch.randperm(10 * bank, generator=generator)[:bank]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        values, position = knn._top_k_by_index(similarity, index, k)
    assert index[position].tolist() == _top_k_by_hand(similarity, index, k)
    assert torch.equal(values, similarity.gather(1, position))
    # Beyond the [Q, k] results, no op allocates more than an eighth of the similarity block (before: a [Q, M]
    # int64 key and an int64 count of the values >= the k-th, each twice the block).
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= similarity.numel() * similarity.element_size() / 8, largest
    # The merge step's [Q, W * k] candidates come with a per-row index.
    per_row = torch.stack([torch.randperm(bank, generator=generator) for _ in range(queries)])
    _, position = knn._top_k_by_index(similarity, per_row, k)
    assert per_row.gather(1, position).tolist() == _top_k_by_hand(similarity, per_row, k)
