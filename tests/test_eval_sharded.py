"""Sharded evaluation: the exact kNN merge and the lr-grid probe give one rank's results on any number of ranks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtssl.eval.augmented import augmented_linear_probe
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
    if ties:  # exact cosine ties between rows of different indices, parities (ranks) and labels, at the top for 5 queries
        train[41:51] = train[30:40] * 2.0
        val[:5] = train[30:35]
    return train, torch.randint(0, classes, (n_train,), generator=g), val, torch.randint(0, classes, (n_val,), generator=g)


KNN_ARGS = dict(num_classes=6, ks=(1, 4, 9), temperature=0.1)


def test_knn_sharded_on_one_rank_is_bitwise_knn_classify():
    train, train_y, val, val_y = random_bank(0)
    expected = knn_classify(train, train_y, val, val_y, **KNN_ARGS, chunk_size=5)
    got = knn_classify_sharded(shard_of(train, train_y, 1, 0), shard_of(val, val_y, 1, 0), **KNN_ARGS, chunk_size=5)
    assert got == expected


# Index 1 (label 1) and index 2 (label 0) point the same way as the query: k=1 must take index 1. On 2 ranks
# index 2 lives on rank 0 and index 1 on rank 1, so the merge, not the order of the ranks, must decide.
TIE_TRAIN, TIE_LABELS = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1, 0])
TIE_QUERY, TIE_QUERY_LABEL = torch.tensor([[3.0, 0.0]]), torch.tensor([1])


def test_knn_ties_go_to_the_smaller_global_index():
    shard = shard_of(TIE_TRAIN, TIE_LABELS, 1, 0)
    query = shard_of(TIE_QUERY, TIE_QUERY_LABEL, 1, 0)
    assert knn_classify_sharded(shard, query, 2, ks=(1,))["k1"]["top1"] == 100.0


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        knn = {}
        for ties in (False, True):
            train, train_y, val, val_y = random_bank(0, ties)
            knn[ties] = knn_classify_sharded(shard_of(train, train_y, world_size, rank),
                                             shard_of(val, val_y, world_size, rank), **KNN_ARGS, chunk_size=3)
        tie = knn_classify_sharded(shard_of(TIE_TRAIN, TIE_LABELS, world_size, rank),
                                   shard_of(TIE_QUERY, TIE_QUERY_LABEL, world_size, rank), 2, ks=(1,))
        x, y, vx, vy = _probe_data()
        probe = linear_probe_sharded(shard_of(x, y, world_size, rank), shard_of(vx, vy, world_size, rank), 4,
                                     epochs=3, lr_grid=(0.01, 0.3), batch_size=32, seed=3)
        augmented = _augmented(world_size, rank)
        torch.save({"knn": knn, "tie": tie, "probe": probe, "augmented": augmented}, f"{out_dir}/{rank}.pt")
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
        assert result["augmented"]["history"] == pytest.approx(_augmented_reference()["history"], abs=1e-9)
        torch.testing.assert_close(result["augmented"]["weight"], _augmented_reference()["weight"], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- augmented protocol
class Items(torch.utils.data.Dataset):
    """(x_i, y_i) pairs: with an identity backbone the augmented probe is SGD on a Linear over these rows."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


AUG = dict(epochs=4, batch_size=16, base_lr=2.0, seed=3)  # lr 2.0 * 16 / 512 = 0.0625


def _augmented(world_size=1, rank=0):
    x, y, vx, vy = _probe_data()
    x, y = x[:160], y[:160]  # 10 global batches of 16, 8 per rank on 2 ranks
    history, heads = [], []

    def record(epoch, top1, head):
        history.append(top1)
        heads.append(head.weight.detach().clone())

    result = augmented_linear_probe(torch.nn.Identity(), Items(x, y), shard_of(vx, vy, world_size, rank), 4,
                                    torch.device("cpu"), **AUG, on_epoch=record)
    return {"history": history, "weight": heads[-1], **result}


def _augmented_reference():
    """The protocol written out: same init draw, DistributedSampler's permutation (seed + epoch), batches of 16,
    lr 0.005-style linear scaling, SGD momentum 0.9, per-epoch cosine; val top-1 after every epoch."""
    x, y, vx, vy = _probe_data()
    x, y = x[:160], y[:160]
    g = torch.Generator().manual_seed(AUG["seed"])
    head = torch.nn.Linear(16, 4)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, 16, generator=g) * 0.01)
        head.bias.zero_()
    lr0 = AUG["base_lr"] * AUG["batch_size"] / 512
    optimizer = torch.optim.SGD(head.parameters(), lr=lr0, momentum=0.9)
    history = []
    for epoch in range(AUG["epochs"]):
        for group in optimizer.param_groups:
            group["lr"] = lr0 * (1 + math.cos(math.pi * epoch / AUG["epochs"])) / 2
        order = torch.randperm(160, generator=torch.Generator().manual_seed(AUG["seed"] + epoch))
        for batch in order.split(AUG["batch_size"]):
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            history.append(100.0 * (head(vx).argmax(1) == vy).double().mean().item())
    return {"history": history, "weight": head.weight.detach()}


def test_augmented_probe_matches_the_written_out_protocol():
    got, expected = _augmented(), _augmented_reference()
    assert got["history"] == pytest.approx(expected["history"], abs=1e-9)
    torch.testing.assert_close(got["weight"], expected["weight"], rtol=1e-4, atol=1e-6)
    assert got["top1"] == expected["history"][-1]
    best = max(range(AUG["epochs"]), key=lambda e: expected["history"][e])
    assert got["best_top1"] == expected["history"][best] and got["best_epoch"] == best + 1
    assert got["lr"] == pytest.approx(2.0 * 16 / 512)


def test_augmented_probe_stopped_after_an_epoch_resumes_bitwise(tmp_path):
    from mtssl.eval.augmented import ProbeStopped

    x, y, vx, vy = _probe_data()
    train, val = Items(x[:160], y[:160]), shard_of(vx, vy, 1, 0)
    heads = {}

    def run(name, **kwargs):
        record = lambda epoch, top1, head: heads.setdefault(name, []).append((top1, head.weight.detach().clone()))
        return augmented_linear_probe(torch.nn.Identity(), train, val, 4, torch.device("cpu"), **AUG, on_epoch=record, **kwargs)

    uninterrupted = run("whole")
    state = tmp_path / "probe.pt"
    calls = []
    with pytest.raises(ProbeStopped):
        run("first", state_path=state, state_key="k", should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert len(heads["first"]) == 2  # stopped after the second epoch
    assert run("other key", state_path=state, state_key="other") == uninterrupted  # a foreign state is not resumed
    resumed = run("rest", state_path=state, state_key="k")
    assert len(heads["rest"]) == AUG["epochs"] - 2
    assert resumed == uninterrupted
    assert torch.equal(heads["rest"][-1][1], heads["whole"][-1][1])
