"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtssl.eval.accuracy import topk_correct
from mtssl.eval.features import check_feature_pair


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
