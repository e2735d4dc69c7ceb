"""PNG plots of a sweep's training curves, read from each job's TensorBoard event files (``<job dir>/tb``).

For the jobs of one table, ``plot_jobs`` writes (each only when some job logged the tags):
  ``<name>_loss.png``            one panel per task loss (``train/loss``, ``train/loss_global``, ``train/loss_local``,
                                 ``train/loss_cutout``) over steps, one line per job;
  ``<name>_knn.png``             ``eval/knn_top1`` over steps, for jobs evaluated during training;
  ``<name>_embedding_std.png``   ``train/embedding_std``, the collapse monitor: the per-dimension std of the
                                 normalised embeddings, which falls to 0 when the representation collapses (about
                                 1/sqrt(d) for a d-dimensional embedding that uses all its dimensions).
Jobs that did not complete are drawn dashed. Non-finite values (a diverging loss) are left as gaps. Figures are
drawn on matplotlib's Agg canvas without pyplot, so no display is needed and the global backend is untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

LOSS_TAGS = ["train/loss", "train/loss_global", "train/loss_local", "train/loss_cutout"]
KNN_TAG = "eval/knn_top1"
EMBEDDING_STD_TAG = "train/embedding_std"
MAX_LEGEND_ENTRIES = 12

# Keep every scalar event; skip loading the heavier plugin data.
_SIZE_GUIDANCE = {"scalars": 0, "tensors": 1, "images": 1, "audio": 1, "histograms": 1, "distributions": 1,
                  "compressedHistograms": 1}


def read_scalars(tb_dir: Path) -> dict[str, pd.DataFrame]:
    """All scalar series of a TensorBoard log directory as {tag: DataFrame(step, value)}, sorted by step."""
    accumulator = EventAccumulator(str(tb_dir), size_guidance=_SIZE_GUIDANCE)
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        frame = pd.DataFrame({"step": [e.step for e in events],
                              "value": [e.value if math.isfinite(e.value) else math.nan for e in events]})
        series[tag] = frame.sort_values("step", kind="stable").reset_index(drop=True)
    return series


def plot_jobs(jobs: pd.DataFrame, out_dir: Path, name: str) -> tuple[list[Path], list[str]]:
    """Write the loss, kNN and embedding-std plots of these jobs into out_dir; returns (paths, messages)."""
    messages = []
    curves: dict[str, tuple[dict[str, pd.DataFrame], bool]] = {}  # job -> (scalars, completed)
    for job in jobs.itertuples(index=False):
        tb_dir = Path(job.job_dir) / "tb"
        if not tb_dir.is_dir():
            continue
        try:
            scalars = read_scalars(tb_dir)
        except Exception as exc:  # a corrupt event file must not stop the tables being written
            messages.append(f"{tb_dir}: TensorBoard events could not be read ({exc}); job left out of the plots")
            continue
        if scalars:
            curves[str(job.job)] = (scalars, job.status == "completed")
    if not curves:
        messages.append(f"{name}: no TensorBoard scalars found in the job directories; no plots written")
        return [], messages

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    loss_tags = [tag for tag in LOSS_TAGS if any(tag in scalars for scalars, _ in curves.values())]
    for suffix, tags, ylabel in (("loss", loss_tags, "loss"), ("knn", [KNN_TAG], "kNN top-1 (%)"),
                                 ("embedding_std", [EMBEDDING_STD_TAG], "embedding std")):
        if tags and any(tag in scalars for scalars, _ in curves.values() for tag in tags):
            path = out_dir / f"{name}_{suffix}.png"
            _plot_panels(curves, tags, ylabel, path)
            paths.append(path)
    return paths, messages


def _plot_panels(curves: dict[str, tuple[dict[str, pd.DataFrame], bool]], tags: list[str], ylabel: str,
                 path: Path) -> None:
    """One panel per tag, one line per job that logged it."""
    figure = Figure(figsize=(4.5 * len(tags), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tags), squeeze=False)[0]
    for ax, tag in zip(axes, tags):
        for i, (job, (scalars, completed)) in enumerate(curves.items()):
            if tag in scalars:
                series = scalars[tag]
                # Same colour for a job in every panel; a marker keeps a lone finite point visible.
                ax.plot(series["step"], series["value"], color=f"C{i % 10}", linestyle="-" if completed else "--",
                        linewidth=1.2, label=job, marker="." if series["value"].notna().sum() < 2 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if len(curves) <= MAX_LEGEND_ENTRIES:
        by_label = {}
        for ax in axes:
            by_label.update(zip(*reversed(ax.get_legend_handles_labels())))
        figure.legend(list(by_label.values()), list(by_label), loc="outside lower center", fontsize="small",
                      ncols=min(len(tags), len(by_label)))
    else:
        figure.suptitle(f"{len(curves)} jobs (dashed: not completed)")
    figure.savefig(path, dpi=100, bbox_inches="tight")
