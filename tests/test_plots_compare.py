"""The sweep curves pair what the ablation compares: read from the figure's matplotlib artists, not its pixels.

A predictor-sharing sweep written by hand (3 methods x shared/separate, real TensorBoard events, a random-init
reference job): the two jobs of one method share a colour, the two predictor modes each have one line style,
the random-init kNN is a level line, and the legend names the axes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.gather import gather_sweep
from analysis.plots import (DPI, INCOMPLETE_ALPHA, KNN_TAG, LINE_STYLES, REFERENCE_STYLE, curve_plots,
                            plot_jobs)
from tests.support.sweep_files import PNG_SIGNATURE, only_table, write_events, write_result, write_sweep

METHODS = ("byol", "simsiam", "mocov3")
MODES = ("separate", "shared")
RANDOM_INIT_KNN = 30.0


def write_predictor_sweep(sweep: Path, seeds=(0,), diverged=()) -> None:
    """The grid (method x predictor [x seed]), each job with a loss and a kNN curve, and its random-init job."""
    grid = [{"method": m, "predictor": p, **({"seed": s} if len(seeds) > 1 else {})}
            for m in METHODS for p in MODES for s in seeds]
    write_sweep(sweep, "predictor_sharing", grid)
    spec = json.loads((sweep / "sweep.json").read_text())
    spec["jobs"] = [{"name": "random_init", "overrides": [], "axes": grid[0], "reference": "random_init"}] + [
        {**job, "reference_job": "random_init"} for job in spec["jobs"]]
    (sweep / "sweep.json").write_text(json.dumps(spec))
    write_result(sweep, grid[0], knn=RANDOM_INIT_KNN, linear=33.0, epochs=0, steps=0).rename(sweep / "random_init")
    for i, axes in enumerate(grid):
        status = "diverged" if (axes["method"], axes["predictor"]) in diverged else "completed"
        job = write_result(sweep, axes, status=status, knn=40.0 + i, linear=45.0 + i)
        write_events(job, {"train/loss": [3.0, 2.0 - 0.1 * i, 1.0], KNN_TAG: [20.0, 30.0 + i, 40.0 + i]})


def knn_lines(figure) -> dict[str, tuple[str, object, float]]:
    """The kNN panel's data lines: {job or cell label: (colour, line style, alpha)}."""
    [ax] = [ax for ax in figure.axes if ax.get_visible()]
    return {line.get_label(): (line.get_color(), line.get_linestyle(), line.get_alpha())
            for line in ax.get_lines() if line.get_gid() == KNN_TAG}


def check_pairing(lines: dict, label) -> None:
    colour = {(m, p): lines[label(m, p)][0] for m in METHODS for p in MODES}
    style = {(m, p): lines[label(m, p)][1] for m in METHODS for p in MODES}
    assert all(colour[m, "separate"] == colour[m, "shared"] for m in METHODS)  # one colour per method
    assert len({colour[m, "shared"] for m in METHODS}) == len(METHODS)
    assert {style[m, "separate"] for m in METHODS} == {"-"} and {style[m, "shared"] for m in METHODS} == {"--"}


def test_the_predictor_sharing_curves_pair_shared_and_separate_of_each_method(tmp_path):
    sweep = tmp_path / "sweep"
    write_predictor_sweep(sweep, diverged=[("simsiam", "shared")])
    table = only_table(gather_sweep(sweep).frame)
    assert table.column_axis == "predictor"  # the compared setting of this ablation
    figures, messages = curve_plots(table.jobs, table.name, table)
    assert messages == [] and set(figures) == {"loss", "knn"}
    figure = figures["knn"]
    lines = knn_lines(figure)
    assert len(lines) == len(METHODS) * len(MODES)
    check_pairing(lines, lambda m, p: f"method={m},predictor={p}")
    assert lines["method=simsiam,predictor=shared"][2] == INCOMPLETE_ALPHA  # diverged: faded, style kept
    assert lines["method=byol,predictor=shared"][2] == 1.0

    [ax] = [ax for ax in figure.axes if ax.get_visible()]
    [level] = [line for line in ax.get_lines() if line.get_gid() == "random_init"]
    assert set(level.get_ydata()) == {RANDOM_INIT_KNN} and level.get_label() == "random init"
    assert level.get_color() == REFERENCE_STYLE["color"] and level.get_linestyle() == ":"

    [legend] = figure.legends
    assert legend.get_title().get_text() == "colour: method, line: predictor"
    assert [t.get_text() for t in legend.get_texts()] == [*METHODS, *MODES, "random init"]
    handles = {h.get_label(): (h.get_color(), h.get_linestyle()) for h in legend.legend_handles}
    assert all(handles[m][0] == lines[f"method={m},predictor=shared"][0] for m in METHODS)
    assert handles["separate"][1] == "-" and handles["shared"][1] == "--"

    # Readable on a laptop screen: a panel of about 700 x 480 pixels, text of 10 points or more.
    width, height = figure.get_size_inches() * DPI
    assert 600 <= width <= 1600 and 450 <= height <= 1000
    assert min(t.get_fontsize() for t in [ax.title, ax.xaxis.label, *ax.get_xticklabels(), *legend.get_texts()]) >= 10

    loss = figures["loss"]  # the same pairing in every figure
    [loss_ax] = [ax for ax in loss.axes if ax.get_visible()]
    assert {line.get_label(): line.get_color() for line in loss_ax.get_lines()} == {k: v[0] for k, v in lines.items()}


def test_the_cells_of_many_seeds_keep_the_pairing(tmp_path):
    """18 jobs (3 seeds per cell): one averaged line per cell, paired as above."""
    sweep = tmp_path / "sweep"
    write_predictor_sweep(sweep, seeds=(0, 1, 2))
    table = only_table(gather_sweep(sweep).frame)
    figures, _ = curve_plots(table.jobs, table.name, table)
    lines = knn_lines(figures["knn"])
    assert len(lines) == len(METHODS) * len(MODES)
    check_pairing(lines, lambda m, p: f"method={m},predictor={p} (n=3)")


def test_one_axis_is_one_colour_per_value_and_the_files_are_written(tmp_path):
    sweep = tmp_path / "sweep"
    grid = [{"views": v} for v in ("global", "global_local")]
    write_sweep(sweep, "view_combination", grid)
    for axes in grid:
        write_events(write_result(sweep, axes, knn=50.0, linear=55.0), {KNN_TAG: [20.0, 30.0]})
    table = only_table(gather_sweep(sweep).frame)
    paths, messages = plot_jobs(table.jobs, tmp_path / "plots", table.name, table)
    figure = curve_plots(table.jobs, table.name, table)[0]["knn"]
    lines = knn_lines(figure)
    assert {v[1] for v in lines.values()} == {LINE_STYLES[0]} and len({v[0] for v in lines.values()}) == 2
    assert figure.legends[0].get_title().get_text() == "colour: views"
    assert messages == [] and all(p.read_bytes().startswith(PNG_SIGNATURE) for p in paths)
    assert sorted(p.name for p in paths) == ["view_combination_cells.png", "view_combination_knn.png"]


@pytest.mark.parametrize("compared, expected", [(None, "predictor"), ("method", "method")])
def test_the_compared_setting_is_the_tables_column_axis_else_the_last(compared, expected):
    import pandas as pd

    from analysis.plots import Curves, Encoding

    curves = [Curves(f"{m},{p}", {KNN_TAG: pd.DataFrame({"step": [0], "value": [1.0]})}, True,
                     {"method": m, "predictor": p}) for m in METHODS for p in MODES]
    encoding = Encoding.of(curves, compared)
    assert encoding.style_axis == expected and encoding.colour_axes == [a for a in ("method", "predictor")
                                                                         if a != expected]
