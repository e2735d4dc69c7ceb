"""Tests for mtssl.eval (features, kNN, linear probe) against hand-computed kNN votes, known-answer linear probes and a 2-rank gather."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.eval.accuracy import topk_accuracy
from mtssl.eval.features import extract_features
from mtssl.eval.knn import knn_classify
from mtssl.eval.linear import linear_probe

# --------------------------------------------------------------------------------------------------
# topk_accuracy
# --------------------------------------------------------------------------------------------------


def test_topk_accuracy_known_answer():
    scores = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # true 0 -> rank 1
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # true 1 -> rank 5 (only 0 is lower)
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # true 0 -> rank 6
            [0.0, 1.0, 0.0, 0.5, 0.2, 0.1],  # true 3 -> rank 2
        ]
    )
    labels = torch.tensor([0, 1, 0, 3])
    assert topk_accuracy(scores, labels, ks=(1, 2, 5)) == {"top1": 25.0, "top2": 50.0, "top5": 75.0}


def test_topk_accuracy_fewer_classes_than_k_counts_all_classes():
    scores = torch.tensor([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 0, 1])
    assert topk_accuracy(scores, labels) == {"top1": pytest.approx(200 / 3), "top5": 100.0}


# --------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------


def _unit(angle_degrees: float, norm: float = 1.0) -> list[float]:
    angle = math.radians(angle_degrees)
    return [norm * math.cos(angle), norm * math.sin(angle)]


# Training points in 2-D given by angle (degrees); norms differ on purpose (cosine must ignore them).
HAND_TRAIN_ANGLES = [0.0, 90.0, 200.0, 20.0, 25.0, 120.0]
HAND_TRAIN_NORMS = [1.0, 2.0, 0.5, 3.0, 1.5, 0.7]
HAND_TRAIN_LABELS = [0, 0, 0, 1, 1, 1]


def _hand_weighted_votes(test_angle: float, k: int, temperature: float) -> list[float]:
    """Weighted kNN votes written out with plain math: cos of the angle difference is the cosine similarity."""
    similarities = [math.cos(math.radians(test_angle - a)) for a in HAND_TRAIN_ANGLES]
    nearest = sorted(range(len(similarities)), key=lambda i: -similarities[i])[:k]
    votes = [0.0, 0.0]
    for i in nearest:
        votes[HAND_TRAIN_LABELS[i]] += math.exp(similarities[i] / temperature)
    return votes


def _knn_top1_single(test_angle: float, label: int, k: int, temperature: float) -> float:
    train = torch.tensor([_unit(a, n) for a, n in zip(HAND_TRAIN_ANGLES, HAND_TRAIN_NORMS)])
    result = knn_classify(
        train,
        torch.tensor(HAND_TRAIN_LABELS),
        torch.tensor([_unit(test_angle, 4.0)]),
        torch.tensor([label]),
        num_classes=2,
        ks=(k,),
        temperature=temperature,
    )
    return result[f"k{k}"]["top1"]


@pytest.mark.parametrize(
    ("test_angle", "temperature", "expected_class"),
    [
        # neighbours: 0 deg (class 0, s=1), 20 and 25 deg (class 1, s=cos20, cos25)
        (0.0, 0.07, 0),  # sharp weights: the single closest point outvotes two slightly farther ones
        (0.0, 1.0, 1),  # flat weights: the 2-vs-1 majority wins
        (110.0, 0.07, 1),  # 120 (class 1) > 90 (class 0) > 25 (class 1)
        (210.0, 0.07, 0),  # 200 (class 0) > 120 (class 1, s=0) > 90 (class 0, s=-0.5)
    ],
)
def test_knn_hand_built_weighted_votes(test_angle, temperature, expected_class):
    votes = _hand_weighted_votes(test_angle, k=3, temperature=temperature)
    assert votes.index(max(votes)) == expected_class  # the hand computation agrees with the comment above
    if (test_angle, temperature) == (0.0, 0.07):
        assert votes[0] == pytest.approx(math.exp(1 / 0.07))
        cos20, cos25 = math.cos(math.radians(20)), math.cos(math.radians(25))
        assert votes[1] == pytest.approx(math.exp(cos20 / 0.07) + math.exp(cos25 / 0.07))
    assert _knn_top1_single(test_angle, expected_class, k=3, temperature=temperature) == 100.0
    assert _knn_top1_single(test_angle, 1 - expected_class, k=3, temperature=temperature) == 0.0


def test_knn_hand_built_batch_accuracy_and_top5_with_two_classes():
    train = torch.tensor([_unit(a, n) for a, n in zip(HAND_TRAIN_ANGLES, HAND_TRAIN_NORMS)])
    test = torch.tensor([_unit(0.0), _unit(110.0), _unit(210.0)])
    test_labels = torch.tensor([0, 0, 0])  # predictions at T=0.07, k=3 are [0, 1, 0]
    result = knn_classify(train, torch.tensor(HAND_TRAIN_LABELS), test, test_labels, 2, ks=(1, 3), chunk_size=2)
    # k=1: nearest points are 0 (class 0), 120 (class 1), 200 (class 0)
    assert result["k1"]["top1"] == pytest.approx(200 / 3)
    assert result["k3"]["top1"] == pytest.approx(200 / 3)
    assert result["k3"]["top5"] == 100.0  # only 2 classes: top-5 covers them all


def test_knn_top5_counts_the_five_highest_vote_totals():
    # 7 classes; training point c sits at angle 10*c degrees, test at 0: neighbour c is the (c+1)-th nearest,
    # so with k=7 the vote for class c decreases with c and the top-5 classes are exactly 0..4.
    num_classes = 7
    train = torch.tensor([_unit(10.0 * c) for c in range(num_classes)])
    train_labels = torch.arange(num_classes)
    test = torch.tensor([_unit(0.0)])
    for true_class in range(num_classes):
        result = knn_classify(train, train_labels, test, torch.tensor([true_class]), num_classes, ks=(7,))
        assert result["k7"]["top1"] == (100.0 if true_class == 0 else 0.0)
        assert result["k7"]["top5"] == (100.0 if true_class < 5 else 0.0)
    # With k=3 only classes 0..2 get votes; classes 3 and 4 are tied at zero and are not top-5 predictions.
    for true_class, expected_top5 in ((2, 100.0), (3, 0.0), (4, 0.0)):
        result = knn_classify(train, train_labels, test, torch.tensor([true_class]), num_classes, ks=(3,))
        assert result["k3"]["top5"] == expected_top5


def _reference_knn_predictions(train, train_labels, test, num_classes, k, temperature):
    """Per-sample loop with torch.cosine_similarity and a full sort; returns the class scores."""
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for row, x in enumerate(test.double()):
        similarities = torch.cosine_similarity(x.unsqueeze(0), train.double(), dim=1)
        for i in similarities.argsort(descending=True)[:k].tolist():
            scores[row, train_labels[i]] += math.exp(similarities[i].item() / temperature)
    return scores


def test_knn_matches_per_sample_reference_on_random_features():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=generator)
    train_labels = torch.randint(0, 6, (60,), generator=generator)
    test = torch.randn(23, 8, generator=generator)
    test_labels = torch.randint(0, 6, (23,), generator=generator)
    result = knn_classify(train, train_labels, test, test_labels, 6, ks=(4, 9), temperature=0.1, chunk_size=5)
    for k in (4, 9):
        scores = _reference_knn_predictions(train, train_labels, test, 6, k, 0.1)
        true_score = scores.gather(1, test_labels.view(-1, 1))
        ranks = (scores > true_score).sum(1)  # classes strictly ahead of the true class
        voted = true_score.squeeze(1) > 0  # a class without votes is never a prediction
        assert result[f"k{k}"]["top1"] == pytest.approx(100.0 * ((ranks < 1) & voted).double().mean().item())
        assert result[f"k{k}"]["top5"] == pytest.approx(100.0 * ((ranks < 5) & voted).double().mean().item())


def _gaussian_clusters(means, per_class, spread, generator):
    labels = torch.arange(len(means)).repeat_interleave(per_class)
    features = means[labels] + spread * torch.randn(len(labels), means.shape[1], generator=generator)
    return features, labels


def test_knn_separated_clusters_are_classified_perfectly():
    generator = torch.Generator().manual_seed(1)
    means = torch.eye(5, 32) * 10  # orthogonal directions: clusters separated in angle, not just distance
    train_labels = torch.arange(5).repeat_interleave(40)
    test_labels = torch.arange(5).repeat_interleave(10)
    train = means[train_labels] + 0.5 * torch.randn(200, 32, generator=generator)
    test = means[test_labels] + 0.5 * torch.randn(50, 32, generator=generator)
    result = knn_classify(train, train_labels, test, test_labels, 5, chunk_size=16)
    assert result == {"k10": {"top1": 100.0, "top5": 100.0}, "k20": {"top1": 100.0, "top5": 100.0}}


def test_knn_rejects_k_larger_than_train_set():
    with pytest.raises(ValueError, match="at most the number of training samples"):
        labels = torch.zeros(5, dtype=torch.long)
        knn_classify(torch.randn(5, 3), labels, torch.randn(2, 3), labels[:2], num_classes=2)


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


def _separable_split(seed):
    """4 classes of 16-D Gaussian clusters (means 5 std apart per dim), 100 train and 50 val per class."""
    generator = torch.Generator().manual_seed(seed)
    means = 5 * torch.randn(4, 16, generator=generator)
    train, train_labels = _gaussian_clusters(means, 100, 1.0, generator)
    val, val_labels = _gaussian_clusters(means, 50, 1.0, generator)
    return train, train_labels, val, val_labels


def _train_linear(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    lr: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> nn.Module:
    """The one-head-at-a-time probe mtssl used before the heads were trained together: the independent
    reference for ``train_linear_heads``. BatchNorm1d(affine=False) + Linear, SGD momentum 0.9, per-step cosine lr."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        nn.init.normal_(linear.weight, std=0.01, generator=generator)
        linear.bias.zero_()
    model = nn.Sequential(nn.BatchNorm1d(features.shape[1], affine=False), linear).to(features.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    num_samples = features.shape[0]
    batches_per_epoch = math.ceil(num_samples / batch_size)
    # A trailing batch of one sample cannot be batch-normalised; it is skipped (it changes every epoch).
    if batches_per_epoch > 1 and num_samples % batch_size == 1:
        batches_per_epoch -= 1
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)

    model.train()
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator).to(features.device)
        for batch in order.split(batch_size)[:batches_per_epoch]:
            loss = F.cross_entropy(model(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()



def test_linear_probe_separable_clusters():
    train, train_labels, val, val_labels = _separable_split(0)
    result = linear_probe(train, train_labels, val, val_labels, 4, epochs=10, lr_grid=(0.01, 0.1, 1.0), batch_size=64)
    assert result["top1"] > 95.0
    assert result["top5"] == 100.0
    assert result["lr"] in (0.01, 0.1, 1.0)
    assert set(result["holdout_top1"]) == {0.01, 0.1, 1.0}


def test_linear_probe_random_labels_stay_near_chance():
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(400, 16, generator=generator)
    val = torch.randn(400, 16, generator=generator)
    train_labels = torch.randint(0, 4, (400,), generator=generator)
    val_labels = torch.randint(0, 4, (400,), generator=generator)
    result = linear_probe(train, train_labels, val, val_labels, 4, epochs=10, lr_grid=(0.1, 1.0), batch_size=64)
    assert result["top1"] < 35.0  # chance is 25%; 400 samples give a std of about 2.2 points


def test_linear_probe_lr_is_chosen_on_train_holdout_not_val():
    # lr=1e-6 leaves the tiny random init in charge (about chance everywhere); lr=1.0 learns the clusters.
    # Holdout accuracy must pick 1.0. With val labels shifted by one class the learned model scores about 0%
    # on val while the untrained one scores about chance, so a selection looking at val would pick 1e-6.
    train, train_labels, val, val_labels = _separable_split(4)
    kwargs = dict(num_classes=4, epochs=5, lr_grid=(1e-6, 1.0), batch_size=64)
    clean = linear_probe(train, train_labels, val, val_labels, **kwargs)
    shifted = linear_probe(train, train_labels, val, (val_labels + 1) % 4, **kwargs)
    assert clean["lr"] == shifted["lr"] == 1.0
    assert clean["holdout_top1"] == shifted["holdout_top1"]
    assert clean["holdout_top1"][1.0] > 95.0 and clean["holdout_top1"][1e-6] < 60.0
    assert clean["top1"] > 95.0 and shifted["top1"] < 5.0


def test_linear_probe_is_bitwise_deterministic():
    train, train_labels, val, val_labels = _separable_split(5)
    train = train + 3.0 * torch.randn(train.shape, generator=torch.Generator().manual_seed(9))  # overlap classes
    kwargs = dict(num_classes=4, epochs=3, lr_grid=(0.03, 0.3), batch_size=32, seed=7)
    assert linear_probe(train, train_labels, val, val_labels, **kwargs) == linear_probe(
        train, train_labels, val, val_labels, **kwargs
    )
    from mtssl.eval.features import FeatureShard
    from mtssl.eval.linear import train_linear_heads

    n = train.shape[0]
    shard = FeatureShard(train, train_labels, torch.arange(n), torch.ones(n, dtype=torch.bool), n)
    first, second, other_seed = (train_linear_heads(shard, torch.arange(n), 4, (0.3,), 3, 32, seed=s).weights[0] for s in (7, 7, 8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


def test_linear_probe_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"val_labels must lie in \[0, num_classes\)"):
        linear_probe(torch.randn(20, 4), torch.arange(20) % 2, torch.randn(4, 4), torch.tensor([0, 1, 2, 1]), 2)


# --------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------


class FilledImages(torch.utils.data.Dataset):
    """Item i is a 3x2x2 image filled with the value i, labelled (3 * i) % 5."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.full((3, 2, 2), float(index)), (3 * index) % 5


class RecordingForward:
    """forward_fn = first three pixels times two; records the batch sizes it was called with."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, images):
        self.batch_sizes.append(images.shape[0])
        return images.flatten(1)[:, :3] * 2


def _expected_features(size):
    values = 2.0 * torch.arange(size, dtype=torch.float32)
    return values.view(-1, 1).expand(size, 3), torch.tensor([(3 * i) % 5 for i in range(size)])


def test_extract_features_single_process_keeps_dataset_order():
    forward = RecordingForward()
    features, labels = extract_features(forward, FilledImages(7), batch_size=3)
    expected_features, expected_labels = _expected_features(7)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert torch.equal(features, expected_features)
    assert torch.equal(labels, expected_labels)
    assert forward.batch_sizes == [3, 3, 1]


def _extract_on_rank(rank, world_size, init_file, out_dir, size, batch_size):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        forward = RecordingForward()
        features, labels = extract_features(forward, FilledImages(size), batch_size=batch_size)
        torch.save({"features": features, "labels": labels, "batch_sizes": forward.batch_sizes}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_extract_features_distributed_gathers_in_order_without_duplicates(tmp_path, world_size):
    size, batch_size = 7, 3  # 7 is divisible neither by the world size nor by the batch size
    mp.spawn(
        _extract_on_rank,
        args=(world_size, tmp_path / "init", tmp_path, size, batch_size),
        nprocs=world_size,
        join=True,
    )
    expected_features, expected_labels = _expected_features(size)
    per_rank = math.ceil(size / world_size)
    expected_batch_sizes = [min(batch_size, per_rank - s) for s in range(0, per_rank, batch_size)]
    for rank in range(world_size):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(result["features"], expected_features)
        assert torch.equal(result["labels"], expected_labels)
        assert result["batch_sizes"] == expected_batch_sizes  # same forward calls on every rank


def test_lr_grid_heads_match_one_head_at_a_time_reference():
    """Every head of train_linear_heads is the model the one-head-at-a-time reference trains with its lr
    (same init, batches and seed), and linear_probe's holdout scores are the reference's."""
    from mtssl.eval.linear import _stratified_holdout, train_linear_heads
    from mtssl.eval.features import FeatureShard

    train, train_labels, val, val_labels = _separable_split(6)
    train = train + 3.0 * torch.randn(train.shape, generator=torch.Generator().manual_seed(2))  # overlap classes
    lrs, epochs, batch, seed = (0.01, 0.1, 1.0), 4, 48, 11
    n = train.shape[0]
    shard = FeatureShard(train, train_labels, torch.arange(n), torch.ones(n, dtype=torch.bool), n)
    heads = train_linear_heads(shard, torch.arange(n), 4, lrs, epochs, batch, 0.0, seed)
    for lr, weight, bias in zip(lrs, heads.weights, heads.biases):
        reference = _train_linear(train, train_labels, 4, lr, epochs, batch, 0.0, seed)
        torch.testing.assert_close(weight, reference[1].weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias, reference[1].bias.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(heads.running_mean, reference[0].running_mean)
        torch.testing.assert_close(heads.running_var, reference[0].running_var)

    result = linear_probe(train, train_labels, val, val_labels, 4, epochs=epochs, lr_grid=lrs, batch_size=batch, seed=seed)
    holdout = _stratified_holdout(train_labels, 4, 0.1, torch.Generator().manual_seed(seed))
    for lr in lrs:
        reference = _train_linear(train[~holdout], train_labels[~holdout], 4, lr, epochs, batch, 0.0, seed)
        with torch.no_grad():
            predicted = reference(train[holdout]).argmax(1)
        expected = 100.0 * (predicted == train_labels[holdout]).float().mean().item()
        assert result["holdout_top1"][lr] == pytest.approx(expected, abs=1e-9)
