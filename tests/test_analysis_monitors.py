"""The research monitors in analysis/: results.json ``monitor`` entries become columns, the tables' mean-cosine
column (two decimals, never bold, with its Δ) and unstable dagger, and the monitor plots from TensorBoard events.

Expected cells are computed by hand in the comments."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.gather import gather_sweep
from analysis.make_tables import make_tables
from analysis.tables import legend, to_csv_frame, to_latex, to_markdown
from tests.support.sweep_files import PNG_SIGNATURE, job_name, only_table, table_rows, write_events, write_result, write_sweep


def monitor(cosines: tuple[float, float, float], unstable: bool = False) -> dict:
    pairs = dict(zip(("global_local", "global_cutout", "local_cutout"), cosines))
    return {"interference_every": 4, "interference_probes": 4, "interference_mean_cos": pairs,
            "interference_mean_gradnorm": {"global": 2.0, "local": 1.0, "cutout": 3.0},
            "rankme_final": {"global": 40.0, "local": 1.0 if unstable else 38.0, "cutout": 39.0},
            "rankme_min": {"global": 35.0, "local": 1.0 if unstable else 30.0, "cutout": 31.0},
            "rankme_threshold": 2.0, "unstable": unstable,
            "unstable_reason": "RankMe of the local embeddings fell to 1" if unstable else None}


@pytest.fixture
def monitored_sweep(tmp_path: Path) -> Path:
    """predictor_sharing, byol x {shared, separate} x seeds {0, 1}, simsiam x {shared, separate} x seed 0:

    byol shared       kNN 70, 72 -> 71.0 ± 1.4   linear 60, 62 -> 61.0 ± 1.4   cos_mean 0.2, 0.4 -> 0.30 ± 0.14
    byol separate     kNN 74, 76 -> 75.0 ± 1.4   linear 63, 65 -> 64.0 ± 1.4   cos_mean 0.5, 0.7 -> 0.60 ± 0.14,
                      seed 1 unstable
    simsiam shared    kNN 60, linear 50, cos_mean 0.0;   simsiam separate  kNN 62, linear 52, cos_mean 0.1
    Δ: byol kNN +4.0, linear +3.0, cos +0.30 (0.6 - 0.3); simsiam +2.0, +2.0, +0.10
    """
    sweep = tmp_path / "monitored"
    jobs = {("byol", "shared", 0): (70.0, 60.0, (0.1, 0.2, 0.3), False),
            ("byol", "shared", 1): (72.0, 62.0, (0.3, 0.4, 0.5), False),
            ("byol", "separate", 0): (74.0, 63.0, (0.5, 0.5, 0.5), False),
            ("byol", "separate", 1): (76.0, 65.0, (0.6, 0.7, 0.8), True),
            ("simsiam", "shared", 0): (60.0, 50.0, (0.0, 0.0, 0.0), False),
            ("simsiam", "separate", 0): (62.0, 52.0, (0.1, 0.1, 0.1), False)}
    write_sweep(sweep, "predictor_sharing", [{"method": m, "predictor": p, "seed": s} for m, p, s in jobs])
    for (method, predictor, seed), (knn, linear, cosines, unstable) in jobs.items():
        write_result(sweep, {"method": method, "predictor": predictor, "seed": seed}, knn=knn, linear=linear,
                     monitor=monitor(cosines, unstable))
    return sweep


def test_gather_flattens_the_monitor_entry(monitored_sweep: Path) -> None:
    frame = gather_sweep(monitored_sweep).frame.set_index("job")
    job = frame.loc[job_name({"method": "byol", "predictor": "shared", "seed": 0})]
    assert job["cos_global_local"] == 0.1 and job["cos_local_cutout"] == 0.3
    assert job["cos_mean"] == pytest.approx(0.2)  # (0.1 + 0.2 + 0.3) / 3
    assert job["gradnorm_cutout"] == 3.0 and job["rankme_global"] == 40.0 and job["rankme_min_local"] == 30.0
    assert job["unstable"] == False  # noqa: E712 (an object column)
    flagged = frame.loc[job_name({"method": "byol", "predictor": "separate", "seed": 1})]
    assert flagged["unstable"] == True and "local" in flagged["unstable_reason"]  # noqa: E712
    assert frame["cos_mean"].dtype == "float64"


def test_table_shows_the_mean_cosine_its_delta_and_the_unstable_dagger(monitored_sweep: Path) -> None:
    table = only_table(gather_sweep(monitored_sweep).frame)
    rows = table_rows(to_markdown(table))
    assert rows[0] == ["method", "shared kNN", "shared linear", "shared cos", "separate kNN", "separate linear",
                       "separate cos", "Δ(separate − shared) kNN", "Δ(separate − shared) linear",
                       "Δ(separate − shared) cos"]
    # The higher cosine is not bold (only accuracies are ranked); every cell of the flagged job's group has †.
    assert rows[1] == ["byol", "**71.0 ± 1.4 (n=2)**", "**61.0 ± 1.4 (n=2)**", "0.30 ± 0.14 (n=2)",
                       "**75.0 ± 1.4 (n=2)**†", "**64.0 ± 1.4 (n=2)**†", "0.60 ± 0.14 (n=2)†", "+4.0", "+3.0", "+0.30"]
    assert rows[2] == ["simsiam", "60.0 (n=1)", "50.0 (n=1)", "0.00 (n=1)", "62.0 (n=1)", "52.0 (n=1)", "0.10 (n=1)",
                       "+2.0", "+2.0", "+0.10"]
    caption = legend([table])
    assert "cos: mean cosine between the tasks' gradients" in caption and "†: a job of the cell was flagged" in caption
    assert r"0.60 $\pm$ 0.14 (n=2)$^\dagger$" in to_latex(table)
    csv = to_csv_frame(table)
    csv = csv[csv["method"] == "byol"].set_index("column")
    assert csv.loc["separate cos", "unstable"] == 1 and csv.loc["shared cos", "unstable"] == 0
    assert csv.loc["separate cos", "mean"] == pytest.approx(0.6) and not csv.loc["separate cos", "best"]


def test_jobs_without_the_probe_get_no_cosine_column_nor_dagger(tmp_path: Path) -> None:
    sweep = tmp_path / "plain"
    write_sweep(sweep, "view_combination", [{"views": "global"}, {"views": "global_local"}])
    write_result(sweep, {"views": "global"}, knn=40.0)
    write_result(sweep, {"views": "global_local"}, knn=45.0)
    table = only_table(gather_sweep(sweep).frame)
    assert [c.label for c in table.columns] == ["kNN"]
    assert "†" not in to_markdown(table) and "cos:" not in legend([table])


def test_monitor_curves_are_plotted(monitored_sweep: Path) -> None:
    for seed, cos in ((0, [0.1, 0.2, 0.3]), (1, [0.3, 0.2, 0.1])):
        write_events(monitored_sweep / job_name({"method": "byol", "predictor": "shared", "seed": seed}), {
            "train/loss": [3.0, 2.0, 1.0], "monitor/cos_global_local": cos, "monitor/cos_global_cutout": cos,
            "monitor/cos_local_cutout": cos, "monitor/gradnorm_global": [3.0, 2.0, 1.0],
            "monitor/rankme_global": [50.0, 40.0, 30.0], "monitor/rankme_local": [50.0, 10.0, 1.0]})
    out = make_tables([monitored_sweep])
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["predictor_sharing_cells.png", "predictor_sharing_gradnorm.png",
                     "predictor_sharing_interference.png", "predictor_sharing_loss.png", "predictor_sharing_rankme.png"]
    for name in plots:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    readme = (out / "README.md").read_text()
    assert "](plots/predictor_sharing_interference.png)" in readme and "0.60 ± 0.14 (n=2)†" in readme
    assert pd.read_csv(out / "results.csv")["cos_mean"].notna().sum() == 6
