"""The multi-task latent alignment loss.

    L = sum_t  w_t / N_t  sum_{v in t} sum_{g in globals, g != v}  l(pred_t(proj(f(x_v))), sg(z_g))

Each view type t is one task. N_t is the number of pairs actually summed for task t (a global
view is not aligned with itself), so for 2 global views N_global = 2 and N_local = 2 n_local.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch


def multitask_loss(
    predictions: Sequence[torch.Tensor],
    view_types: Sequence[str],
    prepared_targets: Sequence[torch.Tensor],
    target_indices: Sequence[int],
    pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: Mapping[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the weighted total and each task's mean pair loss (unweighted, for logging).

    ``predictions[v]`` is the prediction of view v, of type ``view_types[v]``;
    ``prepared_targets[j]`` is the target of view ``target_indices[j]``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for v, (prediction, view_type) in enumerate(zip(predictions, view_types)):
        for g, target in zip(target_indices, prepared_targets):
            if g == v:
                continue
            term = pair_loss(prediction, target)
            sums[view_type] = sums[view_type] + term if view_type in sums else term
            counts[view_type] = counts.get(view_type, 0) + 1
    task_losses = {t: sums[t] / counts[t] for t in sums}
    total = sum(weights[t] * task_losses[t] for t in task_losses)
    return total, task_losses


def task_pair_counts(view_types: Sequence[str], target_indices: Sequence[int]) -> dict[str, int]:
    """N_t: the number of pair terms of each task in ``multitask_loss`` (its terms weigh w_t / N_t)."""
    counts: dict[str, int] = {}
    for v, view_type in enumerate(view_types):
        counts[view_type] = counts.get(view_type, 0) + sum(g != v for g in target_indices)
    return counts


def view_pair_loss_sum(
    v: int,
    prediction: torch.Tensor,
    prepared_targets: Sequence[torch.Tensor],
    target_indices: Sequence[int],
    pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sum of view v's pair terms (every target view but itself): its share of ``multitask_loss``,
    so that sum_v w_t / N_t * view_pair_loss_sum(v) over views v of task t is the total (for one backward per view)."""
    terms = [pair_loss(prediction, target) for g, target in zip(target_indices, prepared_targets) if g != v]
    return torch.stack(terms).sum()
