"""Sharded evaluation: the exact kNN merge and the lr-grid probe give one rank's results on any number of ranks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtssl.eval.features import FeatureShard
from mtssl.eval.knn import knn_classify, knn_classify_sharded
from mtssl.eval.linear import linear_probe, linear_probe_sharded


def shard_of(features, labels, world_size, rank):
    """Rank `rank`'s FeatureShard of whole tensors, laid out as extract_feature_shard lays out a dataset."""
    n = features.shape[0]
    positions = torch.arange(rank, math.ceil(n / world_size) * world_size, world_size)
    indices = positions % n
    return FeatureShard(features[indices], labels[indices], indices, positions < n, n)


def random_bank(seed, ties=False, n_train=61, n_val=23, dim=8, classes=6):
    g = torch.Generator().manual_seed(seed)
    train, val = torch.randn(n_train, dim, generator=g), torch.randn(n_val, dim, generator=g)
    if ties:  # exact cosine ties between rows of different indices (and labels), at the top for 5 queries
        train[40:50] = train[30:40] * 2.0
        val[:5] = train[30:35]
    return train, torch.randint(0, classes, (n_train,), generator=g), val, torch.randint(0, classes, (n_val,), generator=g)


KNN_ARGS = dict(num_classes=6, ks=(1, 4, 9), temperature=0.1)


def test_knn_sharded_on_one_rank_is_bitwise_knn_classify():
    train, train_y, val, val_y = random_bank(0)
    expected = knn_classify(train, train_y, val, val_y, **KNN_ARGS, chunk_size=5)
    got = knn_classify_sharded(shard_of(train, train_y, 1, 0), shard_of(val, val_y, 1, 0), **KNN_ARGS, chunk_size=5)
    assert got == expected


def test_knn_ties_go_to_the_smaller_global_index():
    # Two train points in the same direction, index 0 labelled 0 and index 1 labelled 1: k=1 must take index 0.
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    shard = shard_of(train, torch.tensor([0, 1, 1]), 1, 0)
    query = shard_of(torch.tensor([[3.0, 0.0]]), torch.tensor([0]), 1, 0)
    assert knn_classify_sharded(shard, query, 2, ks=(1,))["k1"]["top1"] == 100.0


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        knn = {}
        for ties in (False, True):
            train, train_y, val, val_y = random_bank(0, ties)
            knn[ties] = knn_classify_sharded(shard_of(train, train_y, world_size, rank),
                                             shard_of(val, val_y, world_size, rank), **KNN_ARGS, chunk_size=3)
        tie = knn_classify_sharded(shard_of(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 1]), world_size, rank),
                                   shard_of(torch.tensor([[3.0, 0.0]]), torch.tensor([0]), world_size, rank), 2, ks=(1,))
        x, y, vx, vy = _probe_data()
        probe = linear_probe_sharded(shard_of(x, y, world_size, rank), shard_of(vx, vy, world_size, rank), 4,
                                     epochs=3, lr_grid=(0.01, 0.3), batch_size=32, seed=3)
        torch.save({"knn": knn, "tie": tie, "probe": probe}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _probe_data():
    g = torch.Generator().manual_seed(5)
    means = 2 * torch.randn(4, 16, generator=g)
    y, vy = torch.arange(4).repeat_interleave(41), torch.arange(4).repeat_interleave(13)
    return means[y] + 2 * torch.randn(len(y), 16, generator=g), y, means[vy] + 2 * torch.randn(len(vy), 16, generator=g), vy


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path):
    """kNN identical to one process; the probe's lr choice and holdout scores equal, val within fp tolerance."""
    mp.spawn(_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=True)
    train, train_y, val, val_y = random_bank(0)
    expected_knn = knn_classify(train, train_y, val, val_y, **KNN_ARGS)
    train, train_y, val, val_y = random_bank(0, ties=True)
    expected_tied = knn_classify_sharded(shard_of(train, train_y, 1, 0), shard_of(val, val_y, 1, 0), **KNN_ARGS)
    x, y, vx, vy = _probe_data()
    expected_probe = linear_probe(x, y, vx, vy, 4, epochs=3, lr_grid=(0.01, 0.3), batch_size=32, seed=3)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["knn"][False] == expected_knn  # no ties: the single-process knn_classify
        assert result["knn"][True] == expected_tied  # ties: broken by global index, as on one rank
        assert result["tie"] == {"k1": {"top1": 100.0, "top5": 100.0}}
        probe = result["probe"]
        assert probe["lr"] == expected_probe["lr"]
        assert probe["holdout_top1"] == pytest.approx(expected_probe["holdout_top1"], abs=100 / 16 + 1e-6)  # <= 1 holdout sample
        assert probe["top1"] == pytest.approx(expected_probe["top1"], abs=100 / 52 + 1e-6)  # <= 1 val sample
