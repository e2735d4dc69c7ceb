"""Result tables per ablation, written as Markdown, LaTeX (booktabs) and CSV.

Layouts (row axes; column axis), chosen by the sweep's ``ablation``:
  predictor_sharing  rows = methods; columns = shared, separate, each with kNN and linear, then
                     Δ(separate − shared) for kNN and linear;
  view_combination   rows = view sets;
  backbone           rows = backbones;
  method             rows = methods;
  anything else      a generic pivot over the axes that vary: the last varying axis becomes the columns
                     ("axis=value"), the others the rows.
Any other axis that varies within a known layout is added to the rows, so no jobs are merged by accident. Seeds
are never an axis of the table: they are what a cell aggregates. Jobs of different training configs never share
a cell either: when a cell would hold more than one ``config_hash_without_seed`` (say two sweeps of different
``job_overrides``, or a field no axis names), a ``config`` row axis (the hash's first 8 characters) keeps them
apart, and a message names the jobs. Sweeps of different ablations or profiles are
never mixed in one table; each (ablation, profile) gets its own.

Reference rows come first, marked in their label, never bold and never averaged with the grid: the random-init
jobs of a budget's ``random_init_reference`` ("random init (train.epochs=0)", per column the references of that
column's jobs), and weights evaluated only (status ``evaluated``: an ablation's ``references``, sweeps/references.py,
or a folder of ``python -m mtssl.eval --weights``), one row each, "reference: <name>", the same value in every
column group.

Metrics: "kNN" is ``knn_top1`` (weighted kNN, k=20: ``KNN_HEADLINE_K``, online backbone), "linear" is ``linear_top1``; both top-1 in
percent on the val split. "cos" (``cos_mean``, when a job ran the task-interference probe) is the mean cosine
between the tasks' gradients on the shared encoder, over probes and task pairs, two decimals, never bold. A metric
that no completed job reported is left out. A cell holding a job flagged ``unstable`` (its RankMe fell below
``monitor.rankme_threshold``) carries a dagger (``†``, ``$^\\dagger$`` in LaTeX; ``unstable`` count in CSV).

Cell format (accuracies with one decimal):
  ``72.3 ± 0.4 (n=3)``              mean ± sample standard deviation (ddof=1) over the completed seeds
  ``72.3 (n=1)``                    a single completed seed
  ``72.3 ± 0.4 (n=2); diverged``    jobs that did not complete are listed after the value, never averaged in
  ``diverged``, ``failed ×2, unfinished``   no completed seed: only the status marks
  ``n/a``                           completed jobs that did not report this metric
  ``—``                             no job for this cell
Status marks appear in the order diverged, failed, malformed, unfinished, pending, n/a, with "×k" when k > 1.
Δ cells are the difference of the two means, signed, one decimal (``+1.2``, ``-0.3``), ``—`` when either side has
no completed seed. The best (highest) mean of each accuracy column, compared at the displayed precision, is bold
(``**…**`` in Markdown, ``\\textbf{…}`` in LaTeX, ``best`` column in CSV); ties are all marked, and nothing is
marked in a column with fewer than two values or in Δ columns.

LaTeX output is a bare ``tabular`` (needs ``\\usepackage{booktabs}``) with ``\\toprule``/``\\midrule``/
``\\bottomrule``, ``\\multicolumn`` group headers with ``\\cmidrule``, escaped labels, ``$\\pm$``, and is meant to
be ``\\input`` inside the paper's own ``table`` environment. CSV output is long-format: one line per cell with the
row labels, column, metric, mean, std, n, the status marks, ``best`` and the displayed text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mtssl.job_folder import (EVALUATED_STATUSES, FOLDER_STATUSES, KNN_HEADLINE_K, REFERENCE_JOB_PREFIX,
                              WEIGHTS_REFERENCE, JobStatus)

HEADLINE_METRICS = [("kNN", "knn_top1"), ("linear", "linear_top1")]
MONITOR_METRICS = [("cos", "cos_mean")]  # shown when some completed job reports them
DECIMALS = {"cos_mean": 2}  # shown decimals per metric (default 1)
NOT_RANKED = {"cos_mean"}  # never bold: a higher value is not better
RANDOM_INIT = "random_init"  # sweep.json's mark of a reference job (sweeps/grid.py)
REFERENCE_LABEL = "random init (train.epochs=0)"
WEIGHTS_REFERENCE_LABEL = "reference: {name}"  # the row of weights evaluated only (status evaluated)
CELL_HASH = "config_hash_without_seed"  # the training config's hash without the seed: what one cell's jobs share
CONFIG_AXIS = "config"
N_A = "n/a"  # the mark of completed jobs that did not report a metric
MARK_ORDER = (*(s.value for s in FOLDER_STATUSES if s not in EVALUATED_STATUSES), N_A)
# Configuration fields that can be table axes even when sweep.json does not name them.
STANDARD_AXES = ["method", "views", "predictor", "backbone", "data"]
CANONICAL_ORDER = {
    "method": ["byol", "simsiam", "mocov3"],
    "views": ["global", "global_local", "global_cutout", "global_local_cutout"],
    "predictor": ["shared", "separate"],
    "backbone": ["resnet10t", "resnet18", "resnet50", "vit_micro", "vit_tiny", "vit_small", "vit_base"],
}


@dataclass(frozen=True)
class Layout:
    """How an ablation is laid out: row axes, an optional column axis, an optional Δ(a − b) of column values."""

    row_axes: tuple[str, ...]
    column_axis: str | None = None
    delta: tuple[str, str] | None = None


LAYOUTS = {
    "predictor_sharing": Layout(("method",), "predictor", ("separate", "shared")),
    "view_combination": Layout(("views",)),
    "backbone": Layout(("backbone",)),
    "method": Layout(("method",)),
}


@dataclass
class Cell:
    """The jobs of one table cell: completed values, counts of statuses not averaged in, or a Δ of two cells."""

    values: list[float] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)
    is_delta: bool = False
    delta: float | None = None
    best: bool = False
    decimals: int = 1
    unstable: int = 0  # jobs of the cell flagged unstable (results.json monitor.unstable)
    gain: float | None = None  # mean minus the mean of the cell's random-init reference jobs

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        return float(pd.Series(self.values).std(ddof=1)) if self.n > 1 else None


@dataclass
class Column:
    """One value column: a header group, a metric label, the results.json metric, and what the cells hold
    (jobs whose column axis equals ``value``, or the Δ of the two column values in ``delta_of``)."""

    group: str
    label: str
    metric: str
    value: str = ""
    delta_of: tuple[str, str] | None = None


@dataclass
class Table:
    """A result table: labelled rows x columns of cells, plus the jobs it was built from."""

    name: str
    title: str
    row_axes: list[str]
    rows: list[tuple[str, ...]]
    columns: list[Column]
    cells: list[list[Cell]]
    jobs: pd.DataFrame
    column_axis: str | None = None  # the axis whose values are the columns (None: columns are metrics only)
    reference_rows: int = 0  # leading rows that are references (random init, evaluated weights), not grid cells


def build_tables(frame: pd.DataFrame) -> tuple[list[Table], list[str]]:
    """One table per (ablation, profile) found in a gathered frame, and messages about how the input was split."""
    messages: list[str] = []
    if frame.empty:
        return [], ["no jobs to tabulate"]
    # Missing ablation/profile (no sweep.json) become "" so they group and compare like any other value.
    ablations = frame["ablation"].astype(object).fillna("").astype(str)
    profiles = frame["profile"].astype(object).fillna("").astype(str)
    keys = list(dict.fromkeys(zip(ablations, profiles)))
    if len(keys) > 1:
        described = "; ".join(
            f"ablation={a or '?'} profile={p or '?'} from "
            + ", ".join(sorted(set(frame.loc[(ablations == a) & (profiles == p), "sweep"])))
            for a, p in keys)
        messages.append(f"the sweeps are of different kinds and are tabulated separately, never averaged "
                        f"together: {described}")
    ablation_counts = Counter(a for a, _ in keys)
    tables = []
    for ablation, profile in keys:
        jobs = frame[(ablations == ablation) & (profiles == profile)]
        name = _safe_name(str(ablation) if ablation else "jobs")
        if ablation_counts[ablation] > 1 and profile:
            name = f"{name}_{_safe_name(str(profile))}"
        title = f"{ablation or 'jobs'} ({profile})" if profile else str(ablation or "jobs")
        table, table_messages = build_table(jobs, ablation, name, title)
        tables.append(table)
        messages.extend(table_messages)
    return tables, messages


def build_table(jobs: pd.DataFrame, ablation: str | None, name: str, title: str) -> tuple[Table, list[str]]:
    """Lay out the jobs of one sweep kind (see the module docstring for layouts and cell rules)."""
    messages = []
    # Weights evaluated only (an ablation's references, or a folder of python -m mtssl.eval --weights): their rows.
    is_weights = jobs["status"].eq(JobStatus.EVALUATED)
    if "reference" in jobs.columns:
        is_weights |= jobs["reference"].eq(WEIGHTS_REFERENCE)
    weights_references, jobs = jobs[is_weights], jobs[~is_weights]
    is_reference = jobs["reference"].eq(RANDOM_INIT) if "reference" in jobs.columns else pd.Series(False, jobs.index)
    references, jobs = jobs[is_reference], jobs[~is_reference]
    if jobs.empty:  # only references so far: tabulate them as the grid
        references, jobs = references.iloc[0:0], references
    if jobs.empty:
        weights_references, jobs = weights_references.iloc[0:0], weights_references
    varying = _varying_axes(jobs)
    layout = LAYOUTS.get(ablation or "")
    if layout is not None:
        column_axis = layout.column_axis if layout.column_axis in jobs.columns else None
        row_axes = list(layout.row_axes) + [a for a in varying if a not in layout.row_axes and a != column_axis]
        delta = layout.delta
    else:
        column_axis = varying[-1] if len(varying) >= 2 else None
        row_axes = varying[:-1] if len(varying) >= 2 else varying
        delta = None

    labels = pd.DataFrame(index=jobs.index)
    for axis in row_axes + ([column_axis] if column_axis else []):
        labels[axis] = jobs[axis].map(_label) if axis in jobs.columns else "?"
    if not row_axes:
        labels["config"] = "all"
        row_axes = ["config"]
    split = _split_configs(jobs, labels, row_axes + ([column_axis] if column_axis else []))
    if split is not None:
        labels[CONFIG_AXIS], mixed = split
        row_axes = [a for a in row_axes if a != "config"] + [CONFIG_AXIS]
        messages.append(f"{name}: jobs of different training configs would share a cell; a '{CONFIG_AXIS}' row axis "
                        f"(the first 8 characters of {CELL_HASH}) keeps them apart: " + "; ".join(mixed[:5]))
    rows = _ordered_rows(labels, row_axes)
    column_values = _ordered_values(labels[column_axis], column_axis) if column_axis else [""]
    if delta is not None and not all(v in column_values for v in delta):
        delta = None

    completed = jobs["status"] == JobStatus.COMPLETED
    metrics = [(label, metric) for label, metric in HEADLINE_METRICS
               if metric in jobs.columns and jobs.loc[completed, metric].notna().any()]
    if not metrics:
        metrics = [(label, metric) for label, metric in HEADLINE_METRICS if metric in jobs.columns] or [
            HEADLINE_METRICS[0]]
    metrics += [(label, metric) for label, metric in MONITOR_METRICS
                if metric in jobs.columns and jobs.loc[completed, metric].notna().any()]
    generic = layout is None and column_axis is not None
    columns = [Column(f"{column_axis}={value}" if generic else value, label, metric, value)
               for value in column_values for label, metric in metrics]
    if delta is not None:
        columns += [Column(f"Δ({delta[0]} − {delta[1]})", label, metric, delta_of=delta)
                    for label, metric in metrics]

    group_axes = row_axes + ([column_axis] if column_axis else [])
    groups = {(key if isinstance(key, tuple) else (key,)): part.index
              for key, part in labels.groupby(group_axes, sort=False)}
    cells = []
    for row in rows:
        row_cells = []
        for column in columns:
            if column.delta_of is None:
                key = row + ((column.value,) if column_axis else ())
                index = groups.get(key)
                row_cells.append(_cell(jobs.loc[index] if index is not None else jobs.iloc[0:0], column.metric))
            else:
                by_value = {c.value: cell for c, cell in zip(columns, row_cells)
                            if c.metric == column.metric and c.delta_of is None}
                minuend, subtrahend = by_value[column.delta_of[0]], by_value[column.delta_of[1]]
                difference = (None if minuend.mean is None or subtrahend.mean is None
                              else minuend.mean - subtrahend.mean)
                row_cells.append(Cell(is_delta=True, delta=difference, decimals=DECIMALS.get(column.metric, 1)))
        cells.append(row_cells)
    _mark_best(cells, columns)
    reference_rows = 0
    if not references.empty:
        reference_row = _reference_row(references, jobs, labels, column_axis, columns, groups, rows, cells)
        rows.insert(0, (REFERENCE_LABEL,) + ("",) * (len(row_axes) - 1))
        cells.insert(0, reference_row)
        reference_rows = 1
    for name, part in weights_references.groupby(weights_references["job"].astype(str), sort=False):
        label = WEIGHTS_REFERENCE_LABEL.format(name=name.removeprefix(REFERENCE_JOB_PREFIX))
        rows.insert(reference_rows, (label,) + ("",) * (len(row_axes) - 1))
        cells.insert(reference_rows, [Cell(is_delta=True) if c.delta_of is not None else _cell(part, c.metric)
                                      for c in columns])
        reference_rows += 1

    identity = [c for c in group_axes if c in jobs.columns] + ["seed"] + ([CELL_HASH] if CELL_HASH in jobs.columns else [])
    done = jobs[completed & jobs["seed"].notna()]
    duplicated = done[done.duplicated(subset=identity, keep=False)]
    if not duplicated.empty:
        messages.append(f"{name}: {len(duplicated)} completed jobs share their configuration and seed with another "
                        f"job (the same run gathered twice?); each is counted in n: "
                        + ", ".join(sorted(duplicated["job"].astype(str).unique())[:5]))
    return Table(name, title, row_axes, rows, columns, cells, jobs, column_axis, reference_rows), messages


def _reference_row(references: pd.DataFrame, jobs: pd.DataFrame, labels: pd.DataFrame, column_axis: str | None,
                   columns: list[Column], groups: dict, rows: list, cells: list[list[Cell]]) -> list[Cell]:
    """The random-init row (per column: the references of that column's jobs), and each grid cell's gain over
    the references of its own jobs (``reference_job``; every reference when the sweep does not name them)."""
    by_name = references.set_index(references["job"].astype(str))

    def references_of(index) -> pd.DataFrame:
        if "reference_job" not in jobs.columns or jobs.loc[index, "reference_job"].isna().all():
            return references
        names = [n for n in dict.fromkeys(jobs.loc[index, "reference_job"].dropna().astype(str)) if n in by_name.index]
        return by_name.loc[names]

    for row, row_cells in zip(rows, cells):
        for column, cell in zip(columns, row_cells):
            if column.delta_of is not None or cell.mean is None or column.metric in NOT_RANKED:
                continue
            index = groups.get(row + ((column.value,) if column_axis else ()))
            reference = _cell(references_of(index), column.metric)
            cell.gain = None if reference.mean is None else cell.mean - reference.mean
    reference_row = []
    for column in columns:
        if column.delta_of is not None or column.metric in NOT_RANKED:  # no Δ, no probe for an untrained network
            reference_row.append(Cell(is_delta=column.delta_of is not None))
            continue
        in_column = labels.index if not column_axis else labels.index[labels[column_axis] == column.value]
        reference_row.append(_cell(references_of(in_column), column.metric))
    return reference_row


def _split_configs(jobs: pd.DataFrame, labels: pd.DataFrame, cell_axes: list[str]) -> tuple[pd.Series, list[str]] | None:
    """Per-job config labels when some cell would hold jobs of several training configs, and those cells described
    (jobs by config); None when every cell holds one config. A job without a hash (not started) takes its cell's
    config when the cell has only one."""
    if CELL_HASH not in jobs.columns:
        return None
    hashes = jobs[CELL_HASH].where(jobs[CELL_HASH].map(lambda h: isinstance(h, str)))
    config = pd.Series("?", index=jobs.index, dtype=object)
    mixed, split = [], False
    for key, part in labels.groupby(cell_axes, sort=False):
        known = hashes.loc[part.index].dropna()
        distinct = list(dict.fromkeys(known))
        config.loc[known.index] = [h[:8] for h in known]
        if len(distinct) == 1:
            config.loc[part.index] = distinct[0][:8]
        elif len(distinct) > 1:
            split = True
            cell = ",".join(map(str, key if isinstance(key, tuple) else (key,)))
            by_config = {h[:8]: sorted(jobs.loc[known.index[known == h], "job_dir"].astype(str)) for h in distinct}
            mixed.append(f"cell {cell}: " + ", ".join(f"{h} ({', '.join(d)})" for h, d in by_config.items()))
    return (config, mixed) if split else None


def _varying_axes(jobs: pd.DataFrame) -> list[str]:
    """Axes (sweep.json axes, then standard config fields) that take more than one value; never the seed."""
    declared = [a for axes in jobs["axes"].dropna() for a in str(axes).split(",") if a]
    candidates = [a for a in dict.fromkeys(declared + STANDARD_AXES) if a != "seed" and a in jobs.columns]
    return [a for a in candidates if jobs[a].map(_label, na_action="ignore").nunique(dropna=True) > 1]


def _label(value: Any) -> str:
    """A display label for an axis value: integral floats without '.0', missing as '?'."""
    if value is None or (isinstance(value, float) and value != value):
        return "?"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _ordered_values(labels: pd.Series, axis: str) -> list[str]:
    seen = list(dict.fromkeys(labels))
    canonical = [v for v in CANONICAL_ORDER.get(axis, []) if v in seen]
    return canonical + [v for v in seen if v not in canonical]


def _ordered_rows(labels: pd.DataFrame, row_axes: list[str]) -> list[tuple[str, ...]]:
    orders = {axis: _ordered_values(labels[axis], axis) for axis in row_axes}
    rows = list(dict.fromkeys(map(tuple, labels[row_axes].itertuples(index=False))))
    return sorted(rows, key=lambda row: tuple(orders[a].index(v) for a, v in zip(row_axes, row)))


def _cell(jobs: pd.DataFrame, metric: str) -> Cell:
    evaluated = jobs["status"].isin([s.value for s in EVALUATED_STATUSES])  # completed, or weights evaluated only
    completed = jobs[evaluated]
    values = [float(v) for v in completed[metric].dropna()] if metric in jobs.columns else []
    marks = Counter(jobs.loc[~evaluated, "status"])
    if len(completed) > len(values):
        marks[N_A] = len(completed) - len(values)
    unstable = int((jobs["unstable"] == True).sum()) if "unstable" in jobs.columns else 0  # noqa: E712 (object column)
    return Cell(values=values, marks={m: marks[m] for m in MARK_ORDER if marks.get(m)},
                decimals=DECIMALS.get(metric, 1), unstable=unstable)


def _mark_best(cells: list[list[Cell]], columns: Sequence[Column]) -> None:
    """Bold the highest displayed mean of each accuracy column (ties included) when it has two or more values."""
    for column, cells_of_column in zip(columns, zip(*cells)) if cells else []:
        if column.metric in NOT_RANKED:
            continue
        valued = [c for c in cells_of_column if not c.is_delta and c.n > 0]
        if len(valued) < 2:
            continue
        best = max(float(f"{c.mean:.1f}") for c in valued)
        for c in valued:
            c.best = float(f"{c.mean:.1f}") == best


# ---------------------------------------------------------------------------------------------------- rendering

_EMPTY = {"markdown": "—", "latex": "---", "text": "—"}
_PM = {"markdown": " ± ", "latex": r" $\pm$ ", "text": " ± "}
_DAGGER = {"markdown": "†", "latex": r"$^\dagger$", "text": "†"}
_TIMES = {"markdown": " ×", "latex": r" $\times$", "text": " ×"}
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def escape_latex(text: str) -> str:
    """Escape LaTeX's special characters in a plain-text label."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def format_cell(cell: Cell, fmt: str = "text") -> str:
    """A cell's display text in ``fmt`` ("markdown", "latex" or "text"); see the module docstring."""
    if cell.is_delta:
        if cell.delta is None:
            return _EMPTY[fmt]
        d = cell.decimals
        shown = f"{float(f'{cell.delta:.{d}f}') + 0.0:+.{d}f}"  # + 0.0 turns -0.0 into +0.0
        return f"${shown}$" if fmt == "latex" else shown
    value = None
    if cell.n:
        d = cell.decimals
        value = f"{cell.mean:.{d}f}" + (f"{_PM[fmt]}{cell.std:.{d}f}" if cell.n > 1 else "") + f" (n={cell.n})"
        if cell.best and fmt == "markdown":
            value = f"**{value}**"
        elif cell.best and fmt == "latex":
            value = rf"\textbf{{{value}}}"
        if cell.gain is not None:
            gain = f"{float(f'{cell.gain:.1f}') + 0.0:+.1f}"
            value += f" [${gain}$]" if fmt == "latex" else f" [{gain}]"
    marks = ", ".join(m + (f"{_TIMES[fmt]}{k}" if k > 1 else "") for m, k in cell.marks.items())
    parts = [p for p in (value, marks) if p]
    return ("; ".join(parts) if parts else _EMPTY[fmt]) + (_DAGGER[fmt] if cell.unstable else "")


def _column_header(column: Column, fmt: str) -> tuple[str, str]:
    """(group, label) header texts of a column in ``fmt``."""
    if fmt == "latex":
        if column.delta_of:
            a, b = (escape_latex(v) for v in column.delta_of)
            return rf"$\Delta$({a} $-$ {b})", escape_latex(column.label)
        return escape_latex(column.group), escape_latex(column.label)
    return column.group, column.label


def to_markdown(table: Table) -> str:
    """The table as a GitHub-flavoured Markdown pipe table (best values bold)."""
    def row_text(items: list[str]) -> str:
        return "| " + " | ".join(item.replace("|", r"\|") for item in items) + " |"

    headers = [" ".join(p for p in _column_header(c, "markdown") if p) for c in table.columns]
    lines = [row_text(table.row_axes + headers),
             "|" + "|".join([":---"] * len(table.row_axes) + ["---:"] * len(table.columns)) + "|"]
    for row, cells in zip(table.rows, table.cells):
        lines.append(row_text(list(row) + [format_cell(c, "markdown") for c in cells]))
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    """The table as a booktabs ``tabular`` (best values in \\textbf, labels escaped)."""
    n_labels = len(table.row_axes)
    headers = [_column_header(c, "latex") for c in table.columns]
    lines = [r"% generated by analysis/make_tables.py; needs \usepackage{booktabs}",
             r"\begin{tabular}{" + "l" * n_labels + "c" * len(table.columns) + "}", r"\toprule"]
    if any(group for group, _ in headers):
        spans: list[tuple[str, int, int]] = []  # (group, first column, last column), 1-based
        for i, (group, _) in enumerate(headers, start=n_labels + 1):
            if spans and spans[-1][0] == group:
                spans[-1] = (group, spans[-1][1], i)
            else:
                spans.append((group, i, i))
        cells = [""] * n_labels + [rf"\multicolumn{{{last - first + 1}}}{{c}}{{{group}}}"
                                   for group, first, last in spans]
        lines.append(" & ".join(cells) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{first}-{last}}}" for group, first, last in spans if group))
    lines.append(" & ".join([escape_latex(a) for a in table.row_axes] + [label for _, label in headers]) + r" \\")
    lines.append(r"\midrule")
    for i, (row, cells) in enumerate(zip(table.rows, table.cells)):
        lines.append(" & ".join([escape_latex(v) for v in row] + [format_cell(c, "latex") for c in cells]) + r" \\")
        if i + 1 == table.reference_rows:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv_frame(table: Table) -> pd.DataFrame:
    """Long-format frame: one line per cell with row labels, column, metric, mean, std, n, marks, best, text."""
    records = []
    for row, cells in zip(table.rows, table.cells):
        for column, cell in zip(table.columns, cells):
            header = " ".join(p for p in _column_header(column, "text") if p)
            records.append({
                **dict(zip(table.row_axes, row)), "column": header, "metric": column.metric,
                "mean": cell.delta if cell.is_delta else cell.mean, "std": None if cell.is_delta else cell.std,
                "n": None if cell.is_delta else cell.n,
                "not_averaged": ", ".join(f"{m}={k}" for m, k in cell.marks.items()),
                "unstable": None if cell.is_delta else cell.unstable, "best": cell.best,
                "gain_over_random_init": cell.gain, "text": format_cell(cell, "text")})
    frame = pd.DataFrame.from_records(records)
    frame["n"] = frame["n"].astype("Int64")
    frame["unstable"] = frame["unstable"].astype("Int64")
    return frame


def write_table(table: Table, out_dir: Path) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` into out_dir; returns {"md"|"tex"|"csv": path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")}
    paths["md"].write_text(f"### {table.title}\n\n{to_markdown(table)}\n{legend([table])}\n", encoding="utf-8")
    paths["tex"].write_text(to_latex(table), encoding="utf-8")
    to_csv_frame(table).to_csv(paths["csv"], index=False)
    return paths


LEGEND = (f"kNN: weighted kNN top-1 (k={KNN_HEADLINE_K}), linear: linear-probe top-1, in % on the val split. Cells: mean ± sample "
          "std over completed seeds (n); jobs that did not complete are listed by status and not averaged in; "
          "best per column in bold.")
DELTA_LEGEND = " Δ is the difference of the means."
COS_LEGEND = (" cos: mean cosine between the tasks' gradients on the shared encoder (task-interference probe; mean "
              "over probes and task pairs; lower = more conflict).")
UNSTABLE_LEGEND = (" †: a job of the cell was flagged unstable (a view type's RankMe fell below "
                   "monitor.rankme_threshold; results.csv unstable_reason says which).")


def has_delta(table: Table) -> bool:
    """Whether the table has a Δ column."""
    return any(column.delta_of for column in table.columns)


REFERENCE_LEGEND = (" random init: the same backbone untrained (train.epochs=0, its own job: what any pretraining must "
                    "beat); [+x.x]: a cell's gain over it.")


def legend(tables: Sequence[Table]) -> str:
    """The caption of these tables; it explains Δ, cos, † and the random-init reference only when a table has them."""
    cos = any(c.metric in dict(MONITOR_METRICS).values() for t in tables for c in t.columns)
    unstable = any(cell.unstable for t in tables for row in t.cells for cell in row)
    return (LEGEND + (DELTA_LEGEND if any(has_delta(t) for t in tables) else "") + (COS_LEGEND if cos else "")
            + (UNSTABLE_LEGEND if unstable else "") + (REFERENCE_LEGEND if any(t.reference_rows for t in tables) else ""))


def _safe_name(text: str) -> str:
    """A file stem for a table; never one of the index files written beside the tables."""
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text) or "jobs"
    return f"table_{name}" if name.lower() in ("results", "readme") else name
