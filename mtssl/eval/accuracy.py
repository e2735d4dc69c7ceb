"""Top-k accuracy of class scores, shared by kNN and the linear probe."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def topk_correct(
    scores: Tensor, labels: Tensor, ks: Sequence[int], require_positive: bool = False
) -> dict[int, int]:
    """Number of rows whose label is among the top-min(k, num_classes) scores, for each k.

    With `require_positive`, a label whose score is not > 0 never counts as a hit: kNN classes that got no
    vote are tied at zero, and topk would otherwise break that tie arbitrarily.
    """
    num_classes = scores.shape[1]
    max_k = min(max(ks), num_classes)
    labels = labels.to(scores.device).view(-1, 1)
    top = scores.topk(max_k, dim=1).indices
    hits = top == labels
    if require_positive:
        hits &= scores.gather(1, labels) > 0
    return {k: int(hits[:, : min(k, num_classes)].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent of class scores or logits [N, C] against integer labels [N].

    Returns {"top1": .., "top5": ..} (one key per k). With fewer than k classes, top-k uses all C classes
    (and is then 100%).
    """
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores must be [N, num_classes] with N = len(labels) = {labels.shape[0]}, got {tuple(scores.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    correct = topk_correct(scores, labels, ks)
    return {f"top{k}": 100.0 * correct[k] / scores.shape[0] for k in ks}
