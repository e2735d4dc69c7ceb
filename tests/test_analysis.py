"""Tests of analysis/: gathering sweep directories, the tables per ablation, LaTeX structure, plots and the CLI.

Fixture sweeps are written in tmp_path with known metrics; expected cells are computed by hand in the comments
(mean, sample std with ddof=1, n) so the tests fail if the aggregation or the formatting changes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.gather import AnalysisError, gather_sweep, gather_sweeps
from analysis.make_tables import main, make_tables
from analysis.plots import read_scalars
from analysis.tables import build_tables, to_csv_frame, to_latex, to_markdown
from tests.support.sweep_files import (
    PNG_SIGNATURE, job_name, only_table, table_rows, write_events, write_result, write_sweep, write_unfinished,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def predictor_sweep(tmp_path: Path) -> Path:
    """predictor_sharing: {byol, simsiam} x {shared, separate} x seeds {0, 1, 2}, with known kNN/linear values.

    byol    shared    kNN 70, 71, 72  -> 71.0 ± 1.0   linear 60, 61, 62 -> 61.0 ± 1.0
    byol    separate  kNN 74, 75, 76  -> 75.0 ± 1.0   linear 63, 63, 63 -> 63.0 ± 0.0
    simsiam shared    kNN 60, 62 + diverged -> 61.0 ± 1.4 (sqrt 2)   linear 50, 52 -> 51.0 ± 1.4
    simsiam separate  kNN 59.5 + unfinished + pending                linear 64.0
    Δ kNN:    byol 75 - 71 = +4.0, simsiam 59.5 - 61 = -1.5
    Δ linear: byol 63 - 61 = +2.0, simsiam 64 - 51 = +13.0
    """
    sweep = tmp_path / "predictor_sweep"
    grid = [{"method": m, "predictor": p, "seed": s}
            for m in ("byol", "simsiam") for p in ("shared", "separate") for s in (0, 1, 2)]
    write_sweep(sweep, "predictor_sharing", grid)
    values = {("byol", "shared"): ([70.0, 71.0, 72.0], [60.0, 61.0, 62.0]),
              ("byol", "separate"): ([74.0, 75.0, 76.0], [63.0, 63.0, 63.0]),
              ("simsiam", "shared"): ([60.0, 62.0], [50.0, 52.0]),
              ("simsiam", "separate"): ([59.5], [64.0])}
    for (method, predictor), (knns, linears) in values.items():
        for seed, (knn, linear) in enumerate(zip(knns, linears)):
            write_result(sweep, {"method": method, "predictor": predictor, "seed": seed}, knn=knn, linear=linear)
    write_result(sweep, {"method": "simsiam", "predictor": "shared", "seed": 2}, status="diverged",
                 error="loss became nan at step 7\nTraceback details", final_losses={"loss": float("nan")})
    write_unfinished(sweep, {"method": "simsiam", "predictor": "separate", "seed": 2})
    # simsiam/separate/seed=1 has an empty directory (created, never started): pending.
    (sweep / job_name({"method": "simsiam", "predictor": "separate", "seed": 1})).mkdir()
    return sweep


@pytest.fixture
def view_sweep(tmp_path: Path) -> Path:
    """view_combination over 4 view sets, one seed, listed out of order; linear probe not run (null)."""
    sweep = tmp_path / "view_sweep"
    views = ["global_local_cutout", "global", "global_cutout", "global_local"]
    write_sweep(sweep, "view_combination", [{"views": v} for v in views])
    write_result(sweep, {"views": "global"}, knn=40.25)
    write_result(sweep, {"views": "global_local"}, knn=45.0)
    write_result(sweep, {"views": "global_cutout"}, status="failed", error="CUDA out of memory")
    write_result(sweep, {"views": "global_local_cutout"}, knn=47.96)
    return sweep


# -------------------------------------------------------------------------------------------------------- gather

def test_gather_statuses_seeds_and_checkpoint_progress(predictor_sweep: Path) -> None:
    frame = gather_sweep(predictor_sweep).frame
    assert len(frame) == 12
    status = dict(zip(frame["job"], frame["status"]))
    assert status["method=simsiam,predictor=shared,seed=2"] == "diverged"
    assert status["method=simsiam,predictor=separate,seed=1"] == "pending"
    assert status["method=simsiam,predictor=separate,seed=2"] == "unfinished"
    assert sum(s == "completed" for s in status.values()) == 9
    running = frame.set_index("job").loc["method=simsiam,predictor=separate,seed=2"]
    assert running["last_checkpoint_step"] == 40  # step 60 has only .metadata: incomplete
    assert running["method"] == "simsiam" and running["predictor"] == "separate"
    assert str(frame["seed"].dtype) == "Int64"
    assert list(frame["seed"]) == [0, 1, 2] * 4
    byol_shared = frame[(frame["method"] == "byol") & (frame["predictor"] == "shared")]
    assert list(byol_shared["knn_top1"]) == [70.0, 71.0, 72.0]
    assert list(byol_shared["knn_k10_top1"]) == [70.0, 71.0, 72.0]
    assert list(byol_shared["final_loss_local"]) == [0.5, 0.5, 0.5]
    assert frame["ablation"].unique().tolist() == ["predictor_sharing"]


def test_gather_without_sweep_json_reads_config_of_unfinished_jobs(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    write_result(loose, {"method": "byol", "seed": 1}, knn=50.0)
    write_unfinished(loose, {"method": "mocov3", "seed": 3})
    (loose / "notes").mkdir()  # not a job: no results.json or config.yaml
    gathered = gather_sweep(loose)
    frame = gathered.frame.set_index("job")
    assert sorted(frame.index) == ["method=byol,seed=1", "method=mocov3,seed=3"]
    assert frame.loc["method=mocov3,seed=3", "status"] == "unfinished"
    assert frame.loc["method=mocov3,seed=3", "method"] == "mocov3"  # from config.yaml method.name
    assert frame.loc["method=mocov3,seed=3", "seed"] == 3  # from config.yaml train.seed


def test_malformed_and_partial_results_are_marked_not_raised(tmp_path: Path) -> None:
    sweep = tmp_path / "bad"
    grid = [{"method": "byol", "seed": s} for s in range(6)]
    write_sweep(sweep, "method", grid)
    write_result(sweep, grid[0], knn=50.0)
    for axes, text in [(grid[1], '{"status": "compl'), (grid[2], "[1, 2]"), (grid[3], '{"status": "done"}'),
                       (grid[4], '{"status": "completed", "method": "byol"}'),
                       (grid[5], '{"status": "completed", "knn_top1": "high"}')]:
        job_dir = sweep / job_name(axes)
        job_dir.mkdir()
        (job_dir / "results.json").write_text(text)
    gathered = gather_sweep(sweep)
    frame = gathered.frame.set_index("job")
    messages = {job: frame.loc[job_name(g), "message"] for job, g in enumerate(grid)}
    assert list(frame["status"]) == ["completed"] + ["malformed"] * 5
    assert "not valid JSON" in messages[1]
    assert "JSON list" in messages[2]
    assert "'done' is not one of completed, diverged, failed" in messages[3]
    assert "no 'knn_top1' field" in messages[4]
    assert "'knn_top1' is 'high', expected a number or null" in messages[5]
    # Three malformed jobs are named in the messages, the rest counted.
    assert len([m for m in gathered.messages if "bad/method=byol" in m]) == 3
    assert any("2 more jobs with a malformed results.json" in m for m in gathered.messages)
    table = only_table(gathered.frame)
    assert table_rows(to_markdown(table))[1] == ["byol", "50.0 (n=1); malformed ×5"]


def test_unreadable_sweep_json_falls_back_to_the_job_directories(tmp_path: Path) -> None:
    sweep = tmp_path / "broken"
    write_result(sweep, {"method": "byol"}, knn=50.0)
    write_result(sweep, {"method": "simsiam"}, knn=40.0)
    (sweep / "sweep.json").write_text('{"ablation": ')
    out = make_tables([sweep], plots=False)
    readme = (out / "README.md").read_text()
    assert "sweep.json is not valid JSON" in readme
    # No ablation known: a generic table over the axis that varies, named "jobs"; no linear results, no column.
    assert table_rows((out / "jobs.md").read_text()) == [
        ["method", "kNN"], ["byol", "**50.0 (n=1)**"], ["simsiam", "40.0 (n=1)"]]


# -------------------------------------------------------------------------------------------------------- tables

def test_predictor_sharing_table_cells_delta_marks_and_best(predictor_sweep: Path) -> None:
    table = only_table(gather_sweep(predictor_sweep).frame)
    assert table_rows(to_markdown(table)) == [
        ["method", "shared kNN", "shared linear", "separate kNN", "separate linear",
         "Δ(separate − shared) kNN", "Δ(separate − shared) linear"],
        ["byol", "**71.0 ± 1.0 (n=3)**", "**61.0 ± 1.0 (n=3)**", "**75.0 ± 1.0 (n=3)**", "63.0 ± 0.0 (n=3)",
         "+4.0", "+2.0"],
        ["simsiam", "61.0 ± 1.4 (n=2); diverged", "51.0 ± 1.4 (n=2); diverged", "59.5 (n=1); unfinished, pending",
         "**64.0 (n=1)**; unfinished, pending", "-1.5", "+13.0"],
    ]


def assert_well_formed_latex(latex: str, n_columns: int) -> list[str]:
    """Structure checks of a booktabs tabular; returns its body rows."""
    assert latex.count(r"\begin{tabular}") == 1 and latex.count(r"\end{tabular}") == 1
    positions = [latex.index(token) for token in
                 (r"\begin{tabular}{", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}")]
    assert positions == sorted(positions)
    assert latex.count(r"\toprule") == latex.count(r"\midrule") == latex.count(r"\bottomrule") == 1
    code = "\n".join(line for line in latex.splitlines() if not line.startswith("%"))
    assert re.search(r"(?<!\\)_", code) is None  # every underscore outside comments escaped
    assert code.count("{") - code.count(r"\{") == code.count("}") - code.count(r"\}")
    assert code.count("$") % 2 == 0
    body = code.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert all(len(re.findall(r"(?<!\\)&", row)) == n_columns - 1 for row in body)
    assert all(row.endswith(r"\\") for row in body)
    return body


def test_latex_is_well_formed_booktabs(predictor_sweep: Path, view_sweep: Path) -> None:
    latex = to_latex(only_table(gather_sweep(predictor_sweep).frame))
    assert r"\begin{tabular}{lcccccc}" in latex
    body = assert_well_formed_latex(latex, n_columns=7)
    assert body[0] == (r"byol & \textbf{71.0 $\pm$ 1.0 (n=3)} & \textbf{61.0 $\pm$ 1.0 (n=3)} & "
                       r"\textbf{75.0 $\pm$ 1.0 (n=3)} & 63.0 $\pm$ 0.0 (n=3) & $+4.0$ & $+2.0$ \\")
    assert r"\multicolumn{2}{c}{shared} & \multicolumn{2}{c}{separate}" in latex
    assert r"\multicolumn{2}{c}{$\Delta$(separate $-$ shared)}" in latex
    assert r"\cmidrule(lr){2-3} \cmidrule(lr){4-5} \cmidrule(lr){6-7}" in latex

    latex = to_latex(only_table(gather_sweep(view_sweep).frame))
    body = assert_well_formed_latex(latex, n_columns=2)
    assert body == [r"global & 40.2 (n=1) \\", r"global\_local & 45.0 (n=1) \\",
                    r"global\_cutout & failed \\", r"global\_local\_cutout & \textbf{48.0 (n=1)} \\"]
    assert r"\multicolumn" not in latex  # no column groups: a single header line


def test_view_combination_rows_failed_mark_and_single_metric(view_sweep: Path) -> None:
    table = only_table(gather_sweep(view_sweep).frame)
    # Canonical view order; linear is null everywhere so only kNN is shown; 47.96 rounds to 48.0.
    assert table_rows(to_markdown(table)) == [
        ["views", "kNN"],
        ["global", "40.2 (n=1)"],
        ["global_local", "45.0 (n=1)"],
        ["global_cutout", "failed"],
        ["global_local_cutout", "**48.0 (n=1)**"],
    ]


def test_csv_is_long_format_with_numbers(predictor_sweep: Path) -> None:
    csv = to_csv_frame(only_table(gather_sweep(predictor_sweep).frame)).set_index(["method", "column"])
    byol = csv.loc[("byol", "shared kNN")]
    assert (byol["mean"], byol["std"], byol["n"], bool(byol["best"])) == (71.0, 1.0, 3, True)
    simsiam = csv.loc[("simsiam", "shared kNN")]
    assert simsiam["std"] == pytest.approx(2 ** 0.5)
    assert simsiam["not_averaged"] == "diverged=1"
    assert simsiam["text"] == "61.0 ± 1.4 (n=2); diverged"
    assert csv.loc[("simsiam", "Δ(separate − shared) kNN"), "mean"] == pytest.approx(-1.5)


def test_generic_pivot_for_unknown_ablation(tmp_path: Path) -> None:
    sweep = tmp_path / "lr"
    grid = [{"optim.base_lr": lr, "method": m} for lr in (0.1, 0.2) for m in ("simsiam", "byol")]
    write_sweep(sweep, "lr_scan", grid)
    for i, axes in enumerate(grid):
        write_result(sweep, axes, knn=10.0 + i)
    table = only_table(gather_sweep(sweep).frame)
    assert table_rows(to_markdown(table)) == [
        ["optim.base_lr", "method=byol kNN", "method=simsiam kNN"],
        ["0.1", "11.0 (n=1)", "10.0 (n=1)"],
        ["0.2", "**13.0 (n=1)**", "**12.0 (n=1)**"],
    ]
    assert r"optim.base\_lr" in to_latex(table)


def test_n_a_mark_and_no_best_with_a_single_value(tmp_path: Path) -> None:
    sweep = tmp_path / "method"
    grid = [{"method": "byol", "seed": 0}, {"method": "byol", "seed": 1}, {"method": "simsiam", "seed": 0}]
    write_sweep(sweep, "method", grid)
    write_result(sweep, grid[0], knn=30.0, linear=20.0)
    write_result(sweep, grid[1], knn=32.0, linear=None)
    write_result(sweep, grid[2], status="diverged", error="nan")
    assert table_rows(to_markdown(only_table(gather_sweep(sweep).frame)))[1:] == [
        ["byol", "31.0 ± 1.4 (n=2)", "20.0 (n=1); n/a"],
        ["simsiam", "diverged", "diverged"],
    ]


# --------------------------------------------------------------------------------------------- combining sweeps

def test_sweeps_of_the_same_ablation_pool_their_seeds(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_sweep(first, "method", [{"method": "byol", "seed": 0}, {"method": "byol", "seed": 1}])
    write_sweep(second, "method", [{"method": "byol", "seed": 2}])
    for sweep, knns in ((first, (10.0, 20.0)), (second, (30.0,))):
        for seed, knn in enumerate(knns, start=0 if sweep is first else 2):
            write_result(sweep, {"method": "byol", "seed": seed}, knn=knn)
    out = make_tables([first, second], plots=False)
    assert out == tmp_path / "tables_combined"
    assert table_rows((out / "method.md").read_text())[1] == ["byol", "20.0 ± 10.0 (n=3)"]


def test_jobs_of_different_training_configs_never_share_a_cell(tmp_path: Path) -> None:
    """Two sweeps of one ablation and profile, run with different job_overrides (train.epochs 1 vs 2, which no axis
    names): their seeds pool only within one training config; results.json of older versions (no hash) fall back to
    the job's config.yaml."""
    from omegaconf import OmegaConf

    from mtssl.config import config_hash

    short, long = tmp_path / "short", tmp_path / "long"
    write_sweep(short, "method", [{"method": "byol", "seed": 0}, {"method": "byol", "seed": 1}])
    write_sweep(long, "method", [{"method": "byol", "seed": 2}, {"method": "byol", "seed": 3}])
    hash_short, hash_long = "a" * 64, "b" * 64
    write_result(short, {"method": "byol", "seed": 0}, knn=10.0, config_hash_without_seed=hash_short)
    write_result(short, {"method": "byol", "seed": 1}, knn=20.0, config_hash_without_seed=hash_short)
    write_result(long, {"method": "byol", "seed": 2}, knn=40.0, config_hash_without_seed=hash_long)
    # An older results.json without the hash: read from config.yaml (seed 3 vs 2 must not matter).
    legacy = write_result(long, {"method": "byol", "seed": 3}, knn=50.0)
    config = {"method": {"name": "byol"}, "train": {"seed": 3, "epochs": 2}, "eval": {"knn_k": [20]}}
    (legacy / "config.yaml").write_text(OmegaConf.to_yaml(config))
    legacy_hash = config_hash(OmegaConf.create(config), ignore=("train.seed",))
    assert legacy_hash == config_hash({**config, "train": {"seed": 2, "epochs": 2}}, ignore=("train.seed",))

    frame = gather_sweeps([short, long]).frame
    assert list(frame["config_hash_without_seed"]) == [hash_short, hash_short, hash_long, legacy_hash]
    tables, messages = build_tables(frame)
    [table] = tables
    # Three configs: 10, 20 -> 15.0 ± 7.1 (n=2); 40 alone; 50 alone. Never 30.0 ± 17.3 (n=4).
    assert table_rows(to_markdown(table))[1:] == [
        ["byol", "aaaaaaaa", "15.0 ± 7.1 (n=2)"],
        ["byol", "bbbbbbbb", "40.0 (n=1)"],
        ["byol", legacy_hash[:8], "**50.0 (n=1)**"],
    ]
    [note] = [m for m in messages if "different training configs" in m]
    assert str(short / "method=byol,seed=0") in note and str(long / "method=byol,seed=2") in note


def test_mixed_ablations_get_separate_tables_and_a_note(predictor_sweep: Path, view_sweep: Path,
                                                         tmp_path: Path) -> None:
    out = make_tables([predictor_sweep, view_sweep], tmp_path / "out", plots=False)
    for name in ("predictor_sharing", "view_combination"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    readme = (out / "README.md").read_text()
    assert "different kinds and are tabulated separately" in readme
    assert "ablation=predictor_sharing profile=cpu_quick from predictor_sweep" in readme
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 16 and set(results["sweep"]) == {"predictor_sweep", "view_sweep"}


# ---------------------------------------------------------------------------------------- plots, index and CLI

def test_read_scalars_returns_the_logged_values(tmp_path: Path) -> None:
    write_events(tmp_path / "job", {"train/loss": [2.0, 1.5, float("inf")], "eval/knn_top1": [10.0, 20.0]})
    scalars = read_scalars(tmp_path / "job" / "tb")
    assert list(scalars["train/loss"]["step"]) == [0, 10, 20]
    assert scalars["train/loss"]["value"].tolist()[:2] == [2.0, 1.5]
    assert pd.isna(scalars["train/loss"]["value"].iloc[2])  # non-finite kept as a gap
    assert scalars["eval/knn_top1"]["value"].tolist() == [10.0, 20.0]


def test_make_tables_writes_plots_and_index(predictor_sweep: Path) -> None:
    for axes, loss in (({"method": "byol", "predictor": "shared", "seed": 0}, [4.0, 3.0, 2.5]),
                       ({"method": "byol", "predictor": "separate", "seed": 0}, [4.0, 2.0, 1.0])):
        write_events(predictor_sweep / job_name(axes), {
            "train/loss": loss, "train/loss_global": loss, "train/loss_local": [x / 2 for x in loss],
            "train/embedding_std": [0.06, 0.05, 0.05], "eval/knn_top1": [20.0, 40.0]})
    write_events(predictor_sweep / job_name({"method": "simsiam", "predictor": "shared", "seed": 2}),
                 {"train/loss": [1.0, float("nan")]})

    out = make_tables([predictor_sweep])
    assert out == predictor_sweep / "tables"
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["predictor_sharing_cells.png", "predictor_sharing_embedding_std.png",
                     "predictor_sharing_knn.png", "predictor_sharing_loss.png"]
    for name in plots:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    readme = (out / "README.md").read_text()
    assert "](plots/predictor_sharing_loss.png)" in readme
    assert "[LaTeX](predictor_sharing.tex)" in readme and "[results.csv](results.csv)" in readme
    assert "Jobs: 9 completed, 1 diverged, 1 unfinished, 1 pending." in readme
    assert "| predictor_sweep | method=simsiam,predictor=shared,seed=2 | diverged | loss became nan at step 7 |" \
        in readme
    assert "no results.json yet; last checkpoint at step 40" in readme
    assert "| predictor_sweep | method=simsiam,predictor=separate,seed=1 | pending | not started |" in readme
    assert "**75.0 ± 1.0 (n=3)**" in readme  # the table is inline
    # A second run over the same sweep ignores its own tables/ directory.
    make_tables([predictor_sweep], plots=False)
    assert len(pd.read_csv(out / "results.csv")) == 12


def test_no_event_files_means_no_curve_plots_and_a_note(view_sweep: Path) -> None:
    out = make_tables([view_sweep])
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["view_combination_cells.png"]  # from the table
    assert "no TensorBoard scalars found" in (out / "README.md").read_text()


def test_cli_reports_bad_input_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnalysisError, match="no jobs found"):
        make_tables([empty])
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no jobs found in") and "Traceback" not in err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(AnalysisError, match="does not exist"):
        gather_sweeps([tmp_path / "nowhere"])


def test_script_runs_from_the_repository_root(view_sweep: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "analysis/make_tables.py", str(view_sweep), "--no-plots"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {view_sweep / 'tables' / 'README.md'}"
    assert table_rows((view_sweep / "tables" / "view_combination.md").read_text())[3] == ["global_cutout", "failed"]


def test_caption_mentions_delta_only_for_tables_with_a_delta_column(predictor_sweep: Path, view_sweep: Path) -> None:
    view_out = make_tables([view_sweep], plots=False)
    assert "Δ" not in (view_out / "view_combination.md").read_text()
    assert "Δ" not in (view_out / "README.md").read_text()
    predictor_out = make_tables([predictor_sweep], plots=False)
    assert "Δ is the difference of the means." in (predictor_out / "predictor_sharing.md").read_text()


# ------------------------------------------------------------------------------------- bounded reading of curves

def write_long_events(tb_dir: Path, steps: range, tags: list[str], purge_step: int | None = None,
                      offset: float = 0.0) -> None:
    """A SummaryWriter log with value = offset + step + tag index at each step (a known value everywhere)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)
    for step in steps:
        for k, tag in enumerate(tags):
            writer.add_scalar(tag, offset + step + k, global_step=step)
    writer.close()


def test_large_event_files_are_sampled_with_exact_values_first_last_and_purge(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import analysis.events as events

    tags = ["train/loss", "train/loss_global", "train/lr"]
    tb = tmp_path / "job" / "tb"
    write_long_events(tb, range(1, 1501), tags)
    # Resumed at step 1200: the new file rewrites steps >= 1200 (value + 10000), then the final eval.
    write_long_events(tb, range(1200, 1601), tags, purge_step=1200, offset=10000.0)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(tb))
    writer.add_scalar("eval/knn_top1", 42.5, global_step=1600)
    writer.close()
    monkeypatch.setattr(events, "FULL_READ_BYTES", 4096)  # sample anything larger
    curves = events.read_scalars(tb, max_points=40)
    assert set(curves) == set(tags) | {"eval/knn_top1"}
    assert curves["eval/knn_top1"].values.tolist() == [[1600, 42.5]]
    for k, tag in enumerate(tags):
        steps, values = curves[tag]["step"].tolist(), curves[tag]["value"].tolist()
        assert len(steps) <= 3 * 40 + 2 * 200  # bounded: sampled steps plus the fully read edges of 2 files
        assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 1600
        expected = [(10000.0 if s >= 1200 else 0.0) + s + k for s in steps]  # purged steps come from the new file
        assert values == expected
        assert any(200 < s < 1100 for s in steps) and any(1250 < s < 1550 for s in steps)  # sampled inside
    # Fully read, the same function returns every step.
    monkeypatch.setattr(events, "FULL_READ_BYTES", 1 << 30)
    assert events.read_scalars(tb)["train/lr"]["step"].tolist() == list(range(1, 1601))


def test_cells_of_many_jobs_are_averaged_over_seeds_with_their_range() -> None:
    from collections import namedtuple

    from analysis.plots import Curves, _cell_means

    Job = namedtuple("Job", "job axes method seed")
    line = lambda slope: {"train/loss": pd.DataFrame({"step": [0, 100], "value": [10.0, 10.0 + slope * 100]})}
    per_job = [(Job("method=byol,seed=0", "method,seed", "byol", 0), Curves("a", line(-0.05), True)),
               (Job("method=byol,seed=1", "method,seed", "byol", 1), Curves("b", line(-0.03), True)),
               (Job("method=simsiam,seed=0", "method,seed", "simsiam", 0), Curves("c", line(0.0), False))]
    cells = {c.label: c for c in _cell_means(per_job)}
    assert set(cells) == {"method=byol (n=2)", "method=simsiam (n=1)"}
    byol = cells["method=byol (n=2)"].scalars["train/loss"].set_index("step")
    assert byol.loc[100, "value"] == pytest.approx(6.0)  # mean of 5 and 7
    assert (byol.loc[100, "low"], byol.loc[100, "high"]) == pytest.approx((5.0, 7.0))
    # On the common grid (interpolated): the mean slope -0.04, the range between slopes -0.05 and -0.03.
    assert len(byol) > 10
    for step, row in byol.iterrows():
        assert (row["value"], row["low"], row["high"]) == pytest.approx((10 - 0.04 * step, 10 - 0.05 * step,
                                                                          10 - 0.03 * step))
    assert not cells["method=simsiam (n=1)"].completed


def test_bar_chart_data_is_the_tables_cells(predictor_sweep: Path) -> None:
    from analysis.plots import cell_bars

    table = only_table(gather_sweep(predictor_sweep).frame)
    bars = {b["cell"]: b for b in cell_bars(table, "kNN")}
    assert (bars["byol / shared"]["mean"], bars["byol / shared"]["std"], bars["byol / shared"]["n"]) == (71.0, 1.0, 3)
    assert sorted(bars["simsiam / shared"]["values"]) == [60.0, 62.0]  # the diverged seed is not averaged in
    assert bars["simsiam / shared"]["std"] == pytest.approx(2 ** 0.5)
    assert len(bars) == 4  # no bar for the Δ column


def test_knn_during_training_is_drawn_as_a_curve_per_job(tmp_path: Path) -> None:
    """eval/knn_top1 logged at several steps (monitor.knn_every_epochs) gets its figure, one line per job that has it."""
    from analysis.plots import Curves, curve_figures, plot_jobs

    write_events(tmp_path / "a", {"train/loss": [3.0, 2.0, 1.0], "eval/knn_top1": [20.0, 30.0, 45.0]})
    write_events(tmp_path / "b", {"train/loss": [3.0, 2.5, 2.0]})
    curves = [Curves(job, read_scalars(tmp_path / job / "tb"), True) for job in ("a", "b")]
    assert curve_figures(curves) == [("loss", ["train/loss"], "loss"), ("knn", ["eval/knn_top1"], "kNN top-1 (%)")]
    knn = curves[0].scalars["eval/knn_top1"]
    assert knn["step"].tolist() == [0, 10, 20] and knn["value"].tolist() == [20.0, 30.0, 45.0]
    assert "eval/knn_top1" not in curves[1].scalars
    assert curve_figures(curves[1:]) == [("loss", ["train/loss"], "loss")]  # no kNN logged: no kNN figure

    jobs = pd.DataFrame({"job": ["a", "b"], "job_dir": [str(tmp_path / j) for j in ("a", "b")], "status": ["completed"] * 2})
    paths, messages = plot_jobs(jobs, tmp_path / "plots", "sweep")
    assert sorted(p.name for p in paths) == ["sweep_knn.png", "sweep_loss.png"] and messages == []


def test_random_init_reference_row_and_each_cells_gain(tmp_path: Path) -> None:
    """The sweep's random-init jobs (sweep.json ``reference``) form the first row, not a grid cell; each cell shows
    its gain over its own jobs' reference (``reference_job``), here by hand: 45.0 - 30.0 and the seeds' means."""
    sweep = tmp_path / "sweep"
    grid = [{"method": m, "predictor": p} for m in ("byol", "simsiam") for p in ("shared", "separate")]
    write_sweep(sweep, "predictor_sharing", grid)
    spec = json.loads((sweep / "sweep.json").read_text())
    spec["jobs"] = [{"name": "random_init", "overrides": [], "axes": grid[0], "reference": "random_init"}] + [
        {**job, "reference_job": "random_init"} for job in spec["jobs"]]
    (sweep / "sweep.json").write_text(json.dumps(spec))
    reference = write_result(sweep, grid[0], knn=30.0, linear=33.0, epochs=0, steps=0)
    reference.rename(sweep / "random_init")
    for axes, knn in zip(grid, (45.0, 47.5, 36.0, 29.0)):
        write_result(sweep, axes, knn=knn, linear=knn + 5)
    (table,), _ = build_tables(gather_sweep(sweep).frame)
    rows = table_rows(to_markdown(table))[1:]  # without the header
    assert rows[0][0] == "random init (train.epochs=0)"
    assert rows[0][1:5] == ["30.0 (n=1)", "33.0 (n=1)", "30.0 (n=1)", "33.0 (n=1)"]  # shared kNN, linear; separate
    assert rows[0][5:] == ["—", "—"]  # no Δ for the reference
    byol, simsiam = rows[1], rows[2]
    assert byol[0] == "byol" and byol[1] == "**45.0 (n=1)** [+15.0]" and byol[2] == "**50.0 (n=1)** [+17.0]"
    assert byol[3] == "**47.5 (n=1)** [+17.5]" and byol[5] == "+2.5"  # Δ(separate − shared) of the grid only
    assert simsiam[3] == "29.0 (n=1) [-1.0]"
    csv = to_csv_frame(table)
    assert csv.loc[(csv["method"] == "simsiam") & (csv["column"] == "separate kNN"), "gain_over_random_init"].item() == -1.0
    assert "random init: the same backbone untrained" in (make_tables([sweep], plots=False) / "README.md").read_text()
