"""Research monitors of a pretraining run: the task-interference probe and RankMe per view type.

Task interference (``monitor.interference_every``): on a probe step, the gradient of each task's loss
(unweighted, as logged) with respect to the shared encoder (online backbone + projector) is taken from
the step's own forward graph with ``torch.autograd.grad(..., retain_graph=True)``, before the step's
backward. No extra forward pass (BatchNorm running statistics untouched), no write to any ``.grad`` (the
optimiser sees the same gradients) and no random draw, so training is bitwise unchanged; the cost is
one extra backward per task on probe steps. Under FSDP2 the gradients are those of the unsharded
parameters the forward used (``mtssl.distributed.fsdp.compute_parameters``): each rank's gradient of
its own batch; they are averaged over ranks (as FSDP averages the training gradient), so the cosines
and norms are those of the global batch's per-task gradients. Logged per pair of tasks
(``monitor/cos_<a>_<b>``) and per task (``monitor/gradnorm_<task>``).

RankMe (Garrido et al. 2023, ``monitor.rankme``): exp of the entropy of the normalised singular values
of an embedding matrix, ``p_i = s_i / sum(s) + eps``. Logged at logging steps per view type on the
online projections of the batch's first view of that type, gathered over ranks (one global batch of
embeddings; at most min(global batch, projector out_dim)). A run whose RankMe of any view type falls
below ``monitor.rankme_threshold`` at a logging step is flagged ``unstable`` in results.json.
"""

from __future__ import annotations

import logging
import math
from itertools import combinations
from typing import Mapping, Sequence

import torch

from mtssl.distributed.collectives import device_all_gather_cat, device_mean_

log = logging.getLogger(__name__)

RANKME_EPS = 1e-7  # Garrido et al.'s epsilon


def flatten_gradients(grads: Sequence[torch.Tensor | None] | torch.Tensor, like: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """One fp32 vector of a task's gradients over several parameters (None: an unused parameter, zeros
    shaped like the matching entry of ``like``)."""
    if isinstance(grads, torch.Tensor):
        return grads.detach().reshape(-1).float()
    parts = [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float()
             for g, p in zip(grads, like or grads)]
    return torch.cat(parts)


def _pair_name(a: str, b: str) -> str:
    return f"{a}_{b}"


GRAM_CHUNK = 1 << 20  # elements per float64 block of the Gram matrix


def gradient_gram(vectors: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """(task names, float64 Gram matrix of their flat gradient vectors).

    Accumulated in float64 over blocks: an fp32 matmul over millions of elements loses about 1e-4 of
    relative accuracy, while a float64 copy of whole gradients would double their memory.
    """
    names = list(vectors)
    stacked = torch.stack([vectors[n] for n in names])
    gram = torch.zeros(len(names), len(names), dtype=torch.float64, device=stacked.device)
    for block in stacked.split(GRAM_CHUNK, dim=1):
        block = block.double()
        gram += block @ block.T
    return names, gram


def pairwise_cosines(grads: Mapping[str, Sequence[torch.Tensor] | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cosine of every pair of tasks' gradients, ``{"<a>_<b>": cos}`` in the mapping's order.

    Each task's gradient is the concatenation of its tensors (one per parameter), so the cosine is over
    all parameters together; a zero gradient has cosine 0 with everything.
    """
    names, gram = gradient_gram({t: flatten_gradients(g) for t, g in grads.items()})
    return _cosines_from_gram(names, gram)


def gradient_norms(grads: Mapping[str, Sequence[torch.Tensor] | torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2 norm of each task's gradient over all its tensors together."""
    return {t: torch.linalg.vector_norm(flatten_gradients(g)) for t, g in grads.items()}


def _cosines_from_gram(names: list[str], gram: torch.Tensor) -> dict[str, torch.Tensor]:
    norms = gram.diagonal().clamp_min(0).sqrt()
    out = {}
    for i, j in combinations(range(len(names)), 2):
        out[_pair_name(names[i], names[j])] = gram[i, j] / (norms[i] * norms[j]).clamp_min(1e-30)
    return out


def rankme(z: torch.Tensor, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe of embeddings ``z`` [N, D]: exp(-sum p_i log p_i), p_i = s_i / sum(s) + eps (s: singular values).

    NaN when ``z`` holds a non-finite value (a diverging run): the SVD would fail on it, and checking on the host
    would synchronise; so the SVD runs on the finite entries and the result is masked."""
    z = z.detach().float()
    finite = torch.isfinite(z)
    s = torch.linalg.svdvals(torch.where(finite, z, 0.0))
    p = s / s.sum().clamp_min(1e-30) + eps
    value = torch.exp(-(p * p.log()).sum())
    return torch.where(finite.all(), value, torch.nan)


def rank_unstable(rankme_min: Mapping[str, float], threshold: float | None) -> tuple[bool, str | None]:
    """(unstable, reason): whether some view type's lowest logged RankMe fell below ``threshold``."""
    if threshold is None:
        return False, None
    low = {t: v for t, v in rankme_min.items() if v < threshold}
    if not low:
        return False, None
    worst = min(low, key=low.get)
    return True, (f"RankMe of the {worst} embeddings fell to {low[worst]:.3g}, below monitor.rankme_threshold="
                  f"{threshold:g} (collapse)" + (f"; also {', '.join(sorted(set(low) - {worst}))}" if len(low) > 1 else ""))


def task_gradients(task_losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each task loss's gradient on ``params`` as one flat fp32 vector, from the existing graph (kept for the
    step's own backward); nothing is written to ``.grad``."""
    grads = {}
    for task, loss in task_losses.items():
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads[task] = flatten_gradients(g, params)
    return grads


class TrainingMonitors:
    """The probe and RankMe of one Trainer: measures on device, reads on the host only at logging steps.

    Probe results wait on the device (``pending``) until ``flush`` reads them, at the next logging step or
    checkpoint; the running sums (means over probes) and RankMe's final and lowest values are kept in the
    checkpoint's trainer state (``state_dict``), so a resumed run reports the same means.
    """

    def __init__(self, monitor_cfg, task_names: Sequence[str]):
        every = monitor_cfg.get("interference_every") if monitor_cfg is not None else None
        self.every = int(every) if every else 0
        self.rankme_on = bool(monitor_cfg.get("rankme", True)) if monitor_cfg is not None else False
        self.threshold = monitor_cfg.get("rankme_threshold") if monitor_cfg is not None else None
        self.task_names = list(task_names)
        self.writer = None  # rank 0's ScalarLogger (TensorBoard, W&B: mtssl.train.scalar_logger), set by Trainer.fit
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.sums: dict[str, float] = {}
        self.probes = 0
        self.rankme_final: dict[str, float] = {}
        self.rankme_min: dict[str, float] = {}
        self.rankme_min_step: dict[str, int] = {}

    # ------------------------------------------------------------------ interference
    def probe_due(self, step: int) -> bool:
        """Whether step (0-based) is a probe step: every ``every``-th step, counted from 1 like the logs."""
        return self.every > 0 and len(self.task_names) > 0 and (step + 1) % self.every == 0

    def probe(self, step: int, task_losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]) -> None:
        """On a probe step, measure the per-task gradient cosines and norms (collective under several ranks:
        every rank calls it on the same steps); call before the step's backward."""
        if not self.probe_due(step):
            return
        grads = task_gradients(task_losses, params)
        for g in grads.values():
            device_mean_(g)  # the global batch's gradient: the mean of the ranks' (as FSDP reduces it)
        names, gram = gradient_gram(grads)
        values = {f"cos_{k}": v for k, v in _cosines_from_gram(names, gram).items()}
        values.update({f"gradnorm_{n}": gram[i, i].clamp_min(0).sqrt() for i, n in enumerate(names)})
        self.pending.append((step + 1, {k: v.detach() for k, v in values.items()}))

    def flush(self) -> dict[str, float]:
        """Read the pending probe results (host sync), add them to the running sums and TensorBoard
        (``monitor/<name>`` at the probe's step); returns the latest probe's values."""
        latest: dict[str, float] = {}
        for step, values in self.pending:
            keys = sorted(values)
            numbers = torch.stack([values[k].float() for k in keys]).tolist()
            latest = dict(zip(keys, numbers))
            self.probes += 1
            for key, value in latest.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
                if self.writer is not None:
                    self.writer.add_scalar(f"monitor/{key}", value, step)
            log.info("monitor step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in latest.items()))
        self.pending.clear()
        return latest

    # ------------------------------------------------------------------ RankMe
    def rankme(self, step: int, projections: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """RankMe per view type of the online projections gathered over ranks (a collective; logging steps)."""
        if not self.rankme_on or not projections:
            return {}
        values = {t: float(rankme(device_all_gather_cat(z.detach().float()))) for t, z in projections.items()}
        for view_type, value in values.items():
            self.rankme_final[view_type] = value
            if math.isfinite(value) and value < self.rankme_min.get(view_type, math.inf):
                self.rankme_min[view_type], self.rankme_min_step[view_type] = value, step
            if self.writer is not None:
                self.writer.add_scalar(f"monitor/rankme_{view_type}", value, step)
        log.info("monitor step %d: %s", step, " ".join(f"rankme_{t} {v:.4g}" for t, v in values.items()))
        return values

    # ------------------------------------------------------------------ results and resume
    def summary(self) -> dict:
        """The ``monitor`` entry of results.json (reads the pending probes first)."""
        self.flush()
        mean = {k: v / self.probes for k, v in self.sums.items()} if self.probes else {}
        unstable, reason = rank_unstable(self.rankme_min, self.threshold)
        return {
            "interference_every": self.every or None,
            "interference_probes": self.probes,
            "interference_mean_cos": {k[4:]: v for k, v in sorted(mean.items()) if k.startswith("cos_")},
            "interference_mean_gradnorm": {k[9:]: v for k, v in sorted(mean.items()) if k.startswith("gradnorm_")},
            "rankme_final": {t: v if math.isfinite(v) else None for t, v in self.rankme_final.items()},
            "rankme_min": dict(self.rankme_min),
            "rankme_min_step": dict(self.rankme_min_step),
            "rankme_threshold": self.threshold,
            "unstable": unstable,
            "unstable_reason": reason,
        }

    def state_dict(self) -> dict:
        """Running sums and RankMe extremes (JSON) for the checkpoint's trainer state; flush first."""
        return {"sums": dict(self.sums), "probes": self.probes, "rankme_final": dict(self.rankme_final),
                "rankme_min": dict(self.rankme_min), "rankme_min_step": dict(self.rankme_min_step)}

    def load_state_dict(self, state: Mapping | None) -> None:
        state = state or {}
        self.sums = dict(state.get("sums", {}))
        self.probes = int(state.get("probes", 0))
        self.rankme_final = dict(state.get("rankme_final", {}))
        self.rankme_min = dict(state.get("rankme_min", {}))
        self.rankme_min_step = {k: int(v) for k, v in state.get("rankme_min_step", {}).items()}
        self.pending.clear()
