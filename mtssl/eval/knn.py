"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtssl.eval.accuracy import topk_correct
from mtssl.distributed.collectives import collective_device, device_all_gather_cat, device_all_gather_stack, world_size
from mtssl.eval.features import FeatureShard, check_feature_pair
from mtssl.job_folder import KNN_HEADLINE_K
from mtssl.utils.progress_bar import progress_bar


def headline_k(bank_size: int) -> int:
    """The k of the headline kNN (``knn_top1``): ``KNN_HEADLINE_K``, or the whole bank when it is smaller."""
    return min(KNN_HEADLINE_K, bank_size)


def evaluated_ks(requested: Sequence[int], bank_size: int) -> tuple[int, ...]:
    """The ks a kNN evaluation computes: ``eval.knn_k`` plus the headline k, ascending."""
    return tuple(sorted(set(int(k) for k in requested) | {headline_k(bank_size)}))


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Weighted k-nearest-neighbour classification (InstDisc / DINO protocol).

    Features are L2-normalised; each test sample takes its k most cosine-similar training samples, and each
    neighbour votes for its class with weight exp(similarity / temperature). The class scores are the summed
    votes. A class without any vote among the k neighbours never counts towards top-5 (with few voted
    classes, topk would otherwise pick zero-vote classes arbitrarily). Runs on the device of
    `train_features`, `chunk_size` test samples at a time.

    Returns {"k10": {"top1": .., "top5": ..}, "k20": {...}} with accuracies in percent.
    """
    check_feature_pair(("train", "test"), (train_features, train_labels), (test_features, test_labels), num_classes)
    if not ks or min(ks) < 1 or max(ks) > train_features.shape[0]:
        raise ValueError(
            f"knn ks must be positive and at most the number of training samples "
            f"({train_features.shape[0]}), got {tuple(ks)}; lower eval k or use more training data"
        )
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}; the standard value is 0.07")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")

    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.int64)
    max_k = max(ks)
    correct = {k: {1: 0, 5: 0} for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        labels = test_labels[start : start + chunk_size].to(device)
        similarity, neighbours = (test @ train.T).topk(max_k, dim=1)  # sorted, most similar first
        neighbour_labels = train_labels[neighbours]
        weights = (similarity / temperature).exp()
        for k in ks:
            votes = torch.zeros(test.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            for top, count in topk_correct(votes, labels, (1, 5), require_positive=True).items():
                correct[k][top] += count
    num_test = test_features.shape[0]
    return {
        f"k{k}": {"top1": 100.0 * correct[k][1] / num_test, "top5": 100.0 * correct[k][5] / num_test} for k in ks
    }


# Tied rows are re-ranked this many (row x column) elements at a time: the re-ranking key is int64, so this bounds
# its temporaries to a few hundred MB whatever the bank size (collapsed features tie every row with every column).
TIE_BLOCK_ELEMENTS = 1 << 24


def _top_k_by_index(similarity: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Column positions of the k largest similarities per row, ties broken by the smaller global index.

    `similarity` [Q, M] and `index` [M] or [Q, M] (int64). Returns (similarity [Q, k], position [Q, k])
    sorted by similarity descending then index ascending: a total order, so the selection does not
    depend on how the columns were split over ranks. Only rows with a tie at the k-th value (rare on
    real features) pay for more than one ``topk``; they are re-ranked ``TIE_BLOCK_ELEMENTS // M`` rows at a
    time, so memory beyond ``similarity`` stays one bool mask plus that block, even when every row ties.
    """
    # A row ties at its k-th value iff its (k+1)-th largest value equals it (no [Q, M] count of values >= k-th).
    values, position = similarity.topk(min(k + 1, similarity.shape[1]), dim=1)
    kth = values[:, k - 1 : k]
    tied = (values[:, k] == values[:, k - 1]).nonzero().flatten() if values.shape[1] > k else values.new_empty(0, dtype=torch.int64)
    position = position[:, :k].clone()
    rows_per_block = max(1, TIE_BLOCK_ELEMENTS // max(1, similarity.shape[1]))
    for rows in tied.split(rows_per_block) if tied.numel() else ():
        # Everything above the k-th value is in; among values equal to it the smallest indices fill the rest.
        sub, sub_kth = similarity[rows], kth[rows]
        sub_index = index.unsqueeze(0) if index.dim() == 1 else index[rows]  # [1, M] broadcasts: no [T, M] copy
        big = sub_index.max() + 2
        key = torch.where(sub > sub_kth, 2 * big, torch.where(sub == sub_kth, 2 * big - 1 - sub_index, 0))
        position[rows] = key.topk(k, dim=1).indices
        del sub, key
    chosen_index = index[position] if index.dim() == 1 else index.gather(1, position)
    order = chosen_index.argsort(dim=1, stable=True)
    position = position.gather(1, order)
    order = similarity.gather(1, position).argsort(dim=1, descending=True, stable=True)
    position = position.gather(1, order)
    return similarity.gather(1, position), position


def _votes_correct(similarity: Tensor, neighbour_labels: Tensor, labels: Tensor, valid: Tensor, num_classes: int,
                   ks: Sequence[int], temperature: float) -> dict[int, dict[int, int]]:
    weights = (similarity / temperature).exp()
    correct = {}
    for k in ks:
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        correct[k] = topk_correct(votes[valid], labels[valid], (1, 5), require_positive=True)
    return correct


@torch.no_grad()
def knn_classify_sharded(
    train: FeatureShard,
    val: FeatureShard,
    num_classes: int,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    description: str = "kNN",
    check_stop: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Weighted kNN (as ``knn_classify``) on feature shards spread over the ranks; a collective.

    Val queries are all-gathered in blocks of about `chunk_size` queries (chunk_size / W per rank), so a
    block's similarities [chunk_size, shard] take chunk_size * N / W floats per rank; each rank scores them
    against its train shard and keeps its top-k (ties to the smaller global train index); the per-rank top-k
    similarities, labels and global indices are all-gathered and reduced to the global top-k by the same
    rule. The merge is exact, so any number of ranks gives the result of one rank. Every rank returns the
    same accuracies. ``check_stop()`` is called on every rank before each block (it may raise to stop).
    """
    if not ks or min(ks) < 1 or max(ks) > train.num_items:
        raise ValueError(
            f"knn ks must be positive and at most the number of training samples ({train.num_items}), "
            f"got {tuple(ks)}; lower eval.knn_k or use more training data"
        )
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}; the standard value is 0.07")
    if train.dim != val.dim:
        raise ValueError(f"train and val features must have the same dim, got {train.dim} and {val.dim}")
    device = train.features.device
    bank = F.normalize(train.features.float(), dim=1)
    max_k = max(ks)
    # Padded duplicates never win; a shard smaller than k is padded with -inf entries after every real index.
    invalid_columns = (~train.valid).nonzero().flatten()
    pad = max(0, max_k - bank.shape[0])
    bank_index = torch.cat([train.indices, train.num_items + torch.arange(pad, device=device)])
    bank_labels = torch.cat([train.labels, torch.zeros(pad, dtype=torch.int64, device=device)])
    gather = collective_device(device) if world_size() > 1 else device
    correct = {k: {1: 0, 5: 0} for k in ks}
    per_rank = val.features.shape[0]
    # chunk_size queries per block in all: the block's similarities [chunk_size, shard] shrink with the ranks.
    rows_per_rank = max(1, math.ceil(chunk_size / world_size()))
    for start in progress_bar(range(0, per_rank, rows_per_rank), desc=description, unit="chunk"):
        if check_stop is not None:
            check_stop()
        rows = slice(start, start + rows_per_rank)
        queries = device_all_gather_cat(val.features[rows].to(gather)).to(device)
        query_labels = device_all_gather_cat(val.labels[rows].to(gather)).to(device)
        query_valid = device_all_gather_cat(val.valid[rows].to(gather)).to(device)
        similarity = F.normalize(queries.float(), dim=1) @ bank.T
        similarity[:, invalid_columns] = float("-inf")
        if pad:
            similarity = torch.cat([similarity, similarity.new_full((similarity.shape[0], pad), float("-inf"))], dim=1)
        local_sim, position = _top_k_by_index(similarity, bank_index, max_k)
        local_index, local_labels = bank_index[position], bank_labels[position]
        if world_size() > 1:  # [W * Q, k] -> [Q, W * k]
            def merged(t: Tensor) -> Tensor:
                stacked = device_all_gather_stack(t.to(gather)).to(device)
                return stacked.permute(1, 0, 2).reshape(t.shape[0], -1)

            all_sim, all_index, all_labels = merged(local_sim), merged(local_index), merged(local_labels)
            local_sim, position = _top_k_by_index(all_sim, all_index, max_k)
            local_labels = all_labels.gather(1, position)
        for k, hits in _votes_correct(local_sim, local_labels, query_labels, query_valid, num_classes, ks, temperature).items():
            for top, count in hits.items():
                correct[k][top] += count
    return {f"k{k}": {"top1": 100.0 * correct[k][1] / val.num_items, "top5": 100.0 * correct[k][5] / val.num_items}
            for k in ks}
