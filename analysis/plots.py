"""PNG plots of a table's jobs: training curves from each job's TensorBoard events (``<job dir>/tb``), and the
table's metrics per ablation cell.

For the jobs of one table, ``plot_jobs`` writes (each only when there is something to draw):
  ``<name>_loss.png``            one panel per task loss (``train/loss``, ``train/loss_global``, ``train/loss_local``,
                                 ``train/loss_cutout``) over steps;
  ``<name>_knn.png``             ``eval/knn_top1`` over steps (during training when logged, else the final value);
  ``<name>_embedding_std.png``   ``train/embedding_std``, the collapse monitor: the per-dimension std of the
                                 normalised embeddings, which falls to 0 when the representation collapses (about
                                 1/sqrt(d) for a d-dimensional embedding that uses all its dimensions);
  ``<name>_interference.png``    the task-interference probe: ``monitor/cos_<a>_<b>``, the cosine between two tasks'
                                 gradients on the shared encoder, one panel per pair (global_local, global_cutout,
                                 local_cutout), over the probe steps;
  ``<name>_gradnorm.png``        ``monitor/gradnorm_<task>``, each task's gradient norm on the shared encoder;
  ``<name>_rankme.png``          ``monitor/rankme_<view type>``, RankMe (effective rank) of the online projections
                                 of each view type: it falls towards 1 when the embeddings collapse;
  ``<name>_cells.png``           each metric of the table per ablation cell: a bar at the mean over completed
                                 seeds, the sample std as error bar, each seed as a dot, n under the bar.
Curves: with up to ``MAX_LEGEND_ENTRIES`` jobs, one line per job; with more, one line per ablation cell (its
seeds averaged on a common step grid, their range shaded). The lines pair what the ablation compares
(``Encoding``): one colour per value of the row axes (e.g. the method) and one line style per value of the
compared setting (the table's column axis, e.g. predictor shared / separate; else the last axis); the seeds of
a cell share both. The legend names the axes. The table's random-init reference (a ``train.epochs=0`` job) is
a grey dotted level in the kNN panel. Jobs that did not complete are drawn faded. Non-finite values (a
diverging loss) are left as gaps. Each figure's title names the table and how many jobs (and of which sweeps)
it covers. Panels are at most ``MAX_COLUMNS`` wide and sized to be read on a laptop screen. Curves are read with
``analysis.events`` (a bounded number of points per curve). Figures are drawn on matplotlib's Agg canvas
without pyplot, so no display is needed and the global backend is untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.events import read_scalars
from analysis.tables import NOT_RANKED, Table
from mtssl.job_folder import TENSORBOARD, JobStatus
from mtssl.utils.progress_bar import progress_bar

LOSS_TAGS = ["train/loss", "train/loss_global", "train/loss_local", "train/loss_cutout"]
KNN_TAG = "eval/knn_top1"
EMBEDDING_STD_TAG = "train/embedding_std"
TASKS = ["global", "local", "cutout"]
COSINE_TAGS = [f"monitor/cos_{a}_{b}" for i, a in enumerate(TASKS) for b in TASKS[i + 1:]]
GRADNORM_TAGS = [f"monitor/gradnorm_{t}" for t in TASKS]
RANKME_TAGS = [f"monitor/rankme_{t}" for t in TASKS]
MAX_LEGEND_ENTRIES = 12
GRID_POINTS = 100          # common steps on which the seeds of a cell are averaged
PROGRESS_MIN_JOBS = 200    # show a progress bar (stderr) when reading the events of more jobs
PARALLEL_MIN_JOBS = 100    # read the events of more jobs in MAX_READERS processes
MAX_READERS = 8
SEED_AXES = ("seed", "train.seed")
LINE_STYLES = ["-", "--", ":", "-."]  # one per value of the compared setting (cycled beyond four)
REFERENCE_STYLE = {"color": "0.35", "linestyle": ":", "linewidth": 2.2}  # the random-init level
REFERENCE_METRICS = {KNN_TAG: "knn_top1"}  # curve tag -> the table metric whose random-init value is drawn
INCOMPLETE_ALPHA = 0.4  # lines of jobs that did not complete
PANEL_INCHES = (6.4, 4.4)  # one panel; at DPI about 700 x 480 pixels
MAX_COLUMNS = 2            # panels side by side (4 losses: 2 x 2), so a figure fits a laptop screen
DPI = 110
FONT_SIZE = 11

__all__ = ["plot_jobs", "curve_plots", "read_scalars"]


class Curves:
    """The scalars of one job (or one cell's average): {tag: DataFrame(step, value[, low, high])}; ``axes``: its
    ablation axis values ({axis: value}, seed left out), which choose its colour and line style."""

    def __init__(self, label: str, scalars: dict[str, pd.DataFrame], completed: bool,
                 axes: dict[str, str] | None = None) -> None:
        self.label, self.scalars, self.completed = label, scalars, completed
        self.axes = dict(axes or {})


@dataclass
class Encoding:
    """How the lines pair what the ablation compares: a colour per value of ``colour_axes`` (joined), a line style
    per value of ``style_axis``. Without axes (job folders without sweep.json), a colour per line."""

    colour_axes: list[str]
    style_axis: str | None
    colours: dict[str, str] = field(default_factory=dict)  # colour key -> matplotlib colour
    styles: dict[str, str] = field(default_factory=dict)  # style value -> line style

    @classmethod
    def of(cls, curves: list[Curves], compared: str | None = None) -> "Encoding":
        """``compared``: the axis of the compared setting (the table's column axis); else the last of two or more."""
        axes = list(dict.fromkeys(a for c in curves for a in c.axes))
        style = compared if compared in axes else (axes[-1] if len(axes) >= 2 else None)
        encoding = cls([a for a in axes if a != style], style)
        for c in curves:  # in the order of the sweep's grid
            encoding.colours.setdefault(encoding.colour_key(c), f"C{len(encoding.colours) % 10}")
            if style is not None:
                value = str(c.axes.get(style, ""))
                encoding.styles.setdefault(value, LINE_STYLES[len(encoding.styles) % len(LINE_STYLES)])
        return encoding

    def colour_key(self, c: Curves) -> str:
        if not self.colour_axes:
            return c.label if self.style_axis is None else "all"
        return " / ".join(str(c.axes.get(a, "")) for a in self.colour_axes)

    def colour(self, c: Curves) -> str:
        return self.colours[self.colour_key(c)]

    def style(self, c: Curves) -> str:
        return self.styles.get(str(c.axes.get(self.style_axis, "")), "-") if self.style_axis else "-"

    def title(self) -> str:
        """The legend's title: which axis the colours and the line styles stand for."""
        parts = [f"colour: {' / '.join(self.colour_axes)}"] if self.colour_axes else []
        parts += [f"line: {self.style_axis}"] if self.style_axis else []
        return ", ".join(parts) or "job"

    def handles(self) -> list[Line2D]:
        """One legend entry per colour and per line style (not one per line: the seeds of a cell share both)."""
        entries = [] if self.colour_axes == [] and self.style_axis is not None else [
            Line2D([], [], color=colour, linewidth=2.5, label=key) for key, colour in self.colours.items()]
        entries += [Line2D([], [], color="0.15", linestyle=style, linewidth=2.0, label=value)
                    for value, style in self.styles.items()]
        return entries


def plot_jobs(jobs: pd.DataFrame, out_dir: Path, name: str, table: Table | None = None) -> tuple[list[Path], list[str]]:
    """Write the curve plots of these jobs and, given their table, its per-cell bar chart; returns (paths, messages)."""
    messages: list[str] = []
    paths: list[Path] = []
    covers = _covers(jobs)
    if table is not None and _has_values(table):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}_cells.png"
        _plot_cells(table, path, f"{name}: {covers}")
        paths.append(path)

    figures, curve_messages = curve_plots(jobs, name, table)
    messages += curve_messages
    if figures:
        out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, figure in figures.items():
        path = out_dir / f"{name}_{suffix}.png"
        with matplotlib.rc_context({"font.size": FONT_SIZE}):
            figure.savefig(path, dpi=DPI, bbox_inches="tight")
        paths.append(path)
    return paths, messages


def curve_plots(jobs: pd.DataFrame, name: str, table: Table | None = None) -> tuple[dict[str, Figure], list[str]]:
    """The curve figures of these jobs, {file suffix: Figure} (``curve_figures``), and messages. ``table``: theirs,
    for the compared setting (its column axis) and the random-init level (its reference row)."""
    messages: list[str] = []
    covers = _covers(jobs)
    per_job: list[tuple[object, Curves]] = []
    rows = [job for job in jobs.itertuples(index=False) if (Path(job.job_dir) / TENSORBOARD).is_dir()]
    tb_dirs = [Path(job.job_dir) / TENSORBOARD for job in rows]
    with _reader(len(tb_dirs)) as pool:
        read = pool.map(_read_job, tb_dirs, chunksize=16) if pool else map(_read_job, tb_dirs)
        for job, (scalars, problem) in zip(rows, progress_bar(read, desc=f"reading curves of {name}", unit="job",
                                                              total=len(rows), min_items=PROGRESS_MIN_JOBS,
                                                              file=sys.stderr)):
            if problem:
                messages.append(problem)
            elif scalars:
                per_job.append((job, Curves(str(job.job), scalars, job.status == JobStatus.COMPLETED, _job_axes(job))))
    if not per_job:
        messages.append(f"{name}: no TensorBoard scalars found in the job directories; no curve plots written")
        return {}, messages

    if len(per_job) <= MAX_LEGEND_ENTRIES:
        curves = [c for _, c in per_job]
        subject = f"{name}: {covers}, one line per job"
    else:
        curves = _cell_means(per_job)
        subject = f"{name}: {covers}; mean over seeds per cell, range shaded ({len(curves)} cells)"
    encoding = Encoding.of(curves, table.column_axis if table is not None else None)
    levels = reference_levels(table) if table is not None else {}
    figures = {suffix: curve_figure(curves, tags, ylabel, subject, encoding, levels)
               for suffix, tags, ylabel in curve_figures(curves)}
    return figures, messages


def curve_figures(curves: list[Curves]) -> list[tuple[str, list[str], str]]:
    """The curve figures to draw: (file suffix, its panels' tags that some curve logged, y label); a figure
    only when one of its tags was logged (``eval/knn_top1``: by the kNN during training, ``monitor.knn_every_epochs``,
    and at the final step by the end-of-training evaluation)."""
    figures = []
    for suffix, tags, ylabel in (("loss", LOSS_TAGS, "loss"), ("knn", [KNN_TAG], "kNN top-1 (%)"),
                                 ("embedding_std", [EMBEDDING_STD_TAG], "embedding std"),
                                 ("interference", COSINE_TAGS, "gradient cosine"),
                                 ("gradnorm", GRADNORM_TAGS, "gradient norm"), ("rankme", RANKME_TAGS, "RankMe")):
        logged = [tag for tag in tags if any(tag in c.scalars for c in curves)]
        if logged:
            figures.append((suffix, logged, ylabel))
    return figures


def _read_job(tb_dir: Path) -> tuple[dict[str, pd.DataFrame], str | None]:
    """A job's curves, or a message when its events cannot be read (which must not stop the tables)."""
    try:
        return read_scalars(tb_dir), None
    except Exception as exc:
        return {}, f"{tb_dir}: TensorBoard events could not be read ({exc}); job left out of the plots"


def _reader(n_jobs: int):
    """Processes that read many jobs' events in parallel (None: read here, for few jobs or one core)."""
    workers = min(MAX_READERS, os.cpu_count() or 1)
    if n_jobs < PARALLEL_MIN_JOBS or workers < 2:
        return contextlib.nullcontext()
    return ProcessPoolExecutor(max_workers=workers)


def _covers(jobs: pd.DataFrame) -> str:
    """``12 jobs of sweep_a (10 completed)``: what a figure covers."""
    sweeps = sorted(set(map(str, jobs["sweep"]))) if "sweep" in jobs.columns else []
    completed = int((jobs["status"] == JobStatus.COMPLETED).sum()) if "status" in jobs.columns else 0
    where = f" of {', '.join(sweeps)}" if sweeps and len(sweeps) <= 3 else (f" of {len(sweeps)} sweeps" if sweeps else "")
    return f"{len(jobs)} jobs{where} ({completed} completed)"


def _job_axes(job) -> dict[str, str]:
    """The job's ablation axis values, {axis: value}, the seed left out (empty without axes)."""
    axes = [a for a in str(getattr(job, "axes", "") or "").split(",") if a and a not in SEED_AXES]
    return {a: str(getattr(job, a)) for a in axes if hasattr(job, a)}


def _cell_label(job) -> str:
    """The job's ablation cell: its axis values without the seed (the job name when it has no axes)."""
    return ",".join(f"{a}={v}" for a, v in _job_axes(job).items()) or str(job.job)


def reference_levels(table: Table) -> dict[str, list[tuple[str, float]]]:
    """The random-init levels to draw, {curve tag: [(label, value)]}: the table's reference row (the mean of the
    ``train.epochs=0`` jobs), one level per distinct value over its columns (e.g. per predictor mode)."""
    if not table.reference_rows:
        return {}
    levels: dict[str, list[tuple[str, float]]] = {}
    for tag, metric in REFERENCE_METRICS.items():
        found: dict[float, list[str]] = {}
        for cell, column in zip(table.cells[0], table.columns):
            if column.metric == metric and not column.delta_of and cell.mean is not None:
                found.setdefault(round(cell.mean, 6), []).append(column.value)
        for value, columns in found.items():
            named = [c for c in columns if c]
            label = "random init" + (f" ({', '.join(named)})" if len(found) > 1 and named else "")
            levels.setdefault(tag, []).append((label, value))
    return levels


def _cell_means(per_job: list[tuple[object, Curves]]) -> list[Curves]:
    """One curve per cell: its jobs' values interpolated on a common step grid, mean with min/max."""
    cells: dict[str, list[Curves]] = {}
    for job, curves in per_job:
        cells.setdefault(_cell_label(job), []).append(curves)
    merged = []
    for label, members in cells.items():
        scalars = {}
        for tag in sorted({t for c in members for t in c.scalars}):
            series = []
            for c in members:  # numpy, not pandas, per series: a 1,000-job sweep has ~10,000 of them
                if tag in c.scalars:
                    steps, values = c.scalars[tag]["step"].to_numpy(), c.scalars[tag]["value"].to_numpy()
                    finite = np.isfinite(values)
                    if finite.any():
                        series.append((steps[finite], values[finite]))
            if not series:
                continue
            first = min(int(st[0]) for st, _ in series)
            last = max(int(st[-1]) for st, _ in series)
            grid = np.unique(np.linspace(first, last, GRID_POINTS).round().astype(np.int64))
            stacked = np.full((len(series), len(grid)), np.nan)
            for i, (steps, values) in enumerate(series):
                inside = (grid >= steps[0]) & (grid <= steps[-1])
                stacked[i, inside] = np.interp(grid[inside], steps, values)
            counted = np.isfinite(stacked).any(axis=0)
            with np.errstate(all="ignore"):
                scalars[tag] = pd.DataFrame({"step": grid[counted], "value": np.nanmean(stacked[:, counted], axis=0),
                                             "low": np.nanmin(stacked[:, counted], axis=0),
                                             "high": np.nanmax(stacked[:, counted], axis=0)})
        merged.append(Curves(f"{label} (n={len(members)})", scalars, all(c.completed for c in members),
                             members[0].axes))
    return merged


def curve_figure(curves: list[Curves], tags: list[str], ylabel: str, subject: str, encoding: Encoding | None = None,
                 levels: dict[str, list[tuple[str, float]]] | None = None) -> Figure:
    """One panel per tag (at most ``MAX_COLUMNS`` side by side), one line per job (or cell) that logged it, coloured
    and styled by ``encoding``; ``levels``: horizontal random-init levels per tag (``reference_levels``). Each data
    line's label is its job (or cell), its gid the tag."""
    encoding = encoding or Encoding.of(curves)
    levels = levels or {}
    columns = min(MAX_COLUMNS, len(tags))
    rows = math.ceil(len(tags) / columns)
    with matplotlib.rc_context({"font.size": FONT_SIZE}):
        figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows + 0.9), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes[len(tags):]:
            ax.set_visible(False)
        drawn_levels: dict[str, Line2D] = {}
        for ax, tag in zip(axes, tags):
            for c in curves:
                if tag not in c.scalars:
                    continue
                series = c.scalars[tag]
                colour, alpha = encoding.colour(c), 1.0 if c.completed else INCOMPLETE_ALPHA
                # A marker keeps a lone finite point visible (the final kNN of a job without a kNN monitor).
                ax.plot(series["step"], series["value"], color=colour, linestyle=encoding.style(c), linewidth=1.8,
                        alpha=alpha, label=c.label, gid=tag, marker="o" if series["value"].notna().sum() < 2 else None)
                if "low" in series:
                    ax.fill_between(series["step"], series["low"], series["high"], color=colour, alpha=0.15,
                                    linewidth=0)
            for label, value in levels.get(tag, []):
                drawn_levels[label] = ax.axhline(value, label=label, gid="random_init", **REFERENCE_STYLE)
            ax.set_title(tag)
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        incomplete = not all(c.completed for c in curves)
        figure.suptitle(subject + (" (faded: not completed)" if incomplete else ""))
        handles = encoding.handles() + list(drawn_levels.values())
        if len(handles) <= 2 * MAX_LEGEND_ENTRIES:
            figure.legend(handles=handles, loc="outside lower center", title=encoding.title(),
                          ncols=max(1, min(6, len(handles))))
    return figure


def _has_values(table: Table) -> bool:
    return any(cell.n for row in table.cells for cell, column in zip(row, table.columns) if not column.delta_of)


def cell_bars(table: Table, metric: str) -> list[dict]:
    """The bars of one metric (a column label, e.g. ``kNN``): per table cell, in table order, its label
    (``byol / shared``), n, the mean and sample std over completed seeds, and the seeds' values."""
    bars = []
    for row, cells in zip(table.rows, table.cells):
        for cell, column in zip(cells, table.columns):
            if column.delta_of or column.label != metric:
                continue
            parts = [*row] + ([column.value] if column.value else [])
            bars.append({"cell": " / ".join(map(str, parts)), "n": cell.n, "mean": cell.mean, "std": cell.std,
                         "values": list(cell.values)})
    return bars


def _plot_cells(table: Table, path: Path, subject: str) -> None:
    """One panel per metric (stacked): a bar per cell (mean over seeds), the sample std as error bar, seeds as dots."""
    ranked = [c for c in table.columns if not c.delta_of and c.metric not in NOT_RANKED]  # accuracies, not cos
    metrics = list(dict.fromkeys(c.label for c in ranked))
    n_cells = len(table.rows) * max(1, len(ranked) // max(1, len(metrics)))
    figure = Figure(figsize=(min(20.0, max(6.0, 0.45 * n_cells)), 3.8 * len(metrics)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        bars = cell_bars(table, metric)
        labels = [f"{b['cell']} (n={b['n']})" for b in bars]
        means = [np.nan if b["mean"] is None else b["mean"] for b in bars]
        stds = [b["std"] or 0.0 for b in bars]
        dots = [b["values"] for b in bars]
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=stds, capsize=3, color="C0", alpha=0.6)
        for i, values in enumerate(dots):
            ax.scatter(np.full(len(values), x[i]), values, color="k", s=10, zorder=3)
        rotate = len(labels) > 4
        ax.set_xticks(x, labels, rotation=60 if rotate else 0, ha="right" if rotate else "center", fontsize="small")
        values = [v for vs in dots for v in vs]
        if values:  # zoom on the values: differences between cells are often a point or two
            low, high = min(values), max(values)
            margin = max(1.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - margin - max(stds, default=0)), min(100.0, high + margin + max(stds, default=0)))
        ax.set_xlabel(" / ".join(table.row_axes + ([table.column_axis] if table.column_axis else [])))
        ax.set_ylabel(f"{metric} top-1 (%)")
        ax.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{subject}\nbar: mean over completed seeds, error bar: sample std, dots: seeds "
                    f"(y axis zoomed on the values)", fontsize="medium")
    figure.savefig(path, dpi=100, bbox_inches="tight")
