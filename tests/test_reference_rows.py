"""An ablation's reference weights (sweeps/references.py): one evaluate-only job each, shown by the tables as rows
marked as references next to the grid's jobs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from analysis.gather import gather_sweep
from analysis.make_tables import make_tables
from analysis.tables import to_markdown
from mtssl.config import ConfigError, compose_config, resolve_config
from sweeps.grid import SweepJob
from sweeps.references import reference_jobs
from tests.support.data import make_image_folder
from tests.support.sweep_files import only_table, table_rows, write_result, write_sweep

REPO = Path(__file__).resolve().parents[1]
GRID = [SweepJob("method=byol", ("regime=cpu_quick", "method=byol", "train.seed=0"), {"method": "byol"})]


def test_references_become_evaluate_only_jobs_of_the_grids_config():
    """A timm name and a file with a name, a backbone and a branch: jobs named reference=<name>, marked as weights
    references, with the grid's first job's overrides plus eval.weights (composing to the same source)."""
    ablation = OmegaConf.create({"name": "method", "references": [
        "timm:resnet50", {"weights": "/releases/mulan/byol_multitask_resnet50_800ep_ckpt.pth", "name": "mulan",
                          "backbone": "resnet50", "branch": "target", "overrides": ["data.small_images=false"]}]})
    timm_job, mulan = reference_jobs(ablation, GRID)
    assert (timm_job.name, mulan.name) == ("reference=resnet50", "reference=mulan")
    assert timm_job.reference == mulan.reference == "reference_weights" and timm_job.axes == {}
    assert timm_job.overrides[:3] == GRID[0].overrides and "backbone=resnet50" in timm_job.overrides  # its preset
    vit = reference_jobs(OmegaConf.create({"name": "method", "references": ["timm:vit_small_patch16_224"]}), GRID)[0]
    assert "backbone.name=vit_small_patch16_224" in vit.overrides  # no preset of that name
    assert {"backbone=resnet50", "eval.weights_branch=target", "data.small_images=false"} <= set(mulan.overrides)
    cfg = resolve_config(compose_config([*mulan.overrides, "out_dir=x"]))
    assert cfg.eval.weights == "/releases/mulan/byol_multitask_resnet50_800ep_ckpt.pth"
    assert (cfg.eval.weights_branch, cfg.backbone.name, cfg.method.name) == ("target", "resnet50", "byol")
    assert reference_jobs(OmegaConf.create({"name": "method"}), GRID) == []


@pytest.mark.parametrize(("references", "expected"), [
    (["a.pth", {"name": "x"}], r"ablation\.references\[1\]: give a weights file"),
    ([{"weights": "a.pth", "branchh": "target"}], r"unknown keys \['branchh'\]"),
    (["runs/a/model.pth", "runs/b/model.pth"], r"two references named \['reference=model'\]"),
])
def test_bad_references_are_refused_naming_the_entry(references, expected):
    with pytest.raises(ConfigError, match=expected):
        reference_jobs(OmegaConf.create({"name": "method", "references": references}), GRID)


def test_tables_show_evaluated_weights_as_reference_rows(tmp_path):
    """Two grid jobs and two references, one evaluated (status evaluated) and one not run yet: the references are
    the first rows, labelled, never bold although the best, and not listed among the jobs that did not complete."""
    sweep = tmp_path / "sweep"
    grid = [{"method": "byol"}, {"method": "simsiam"}]
    write_sweep(sweep, "method", grid)
    spec = json.loads((sweep / "sweep.json").read_text())
    spec["jobs"] += [{"name": f"reference={name}", "overrides": [], "axes": {}, "reference": "reference_weights"}
                     for name in ("mulan", "resnet50")]
    (sweep / "sweep.json").write_text(json.dumps(spec))
    write_result(sweep, grid[0], knn=40.0, linear=45.0)
    write_result(sweep, grid[1], knn=38.0, linear=44.0)
    write_result(sweep, {"reference": "mulan"}, status="evaluated", knn=61.0, linear=64.0,
                 weights_source="/releases/mulan.pth")

    table = only_table(gather_sweep(sweep).frame)
    rows = table_rows(to_markdown(table))
    assert rows[0] == ["method", "kNN", "linear"]
    assert rows[1] == ["reference: mulan", "61.0 (n=1)", "64.0 (n=1)"]
    assert rows[2] == ["reference: resnet50", "pending", "pending"]
    assert rows[3:] == [["byol", "**40.0 (n=1)**", "**45.0 (n=1)**"], ["simsiam", "38.0 (n=1)", "44.0 (n=1)"]]
    assert table.reference_rows == 2
    index = (make_tables([sweep], tmp_path / "tables", plots=False) / "README.md").read_text()
    not_completed = index.split("## Jobs not completed", 1)[1]
    assert "reference=resnet50 | pending" in not_completed and "reference=mulan" not in not_completed


@pytest.mark.slow
def test_dry_run_plans_one_evaluate_only_job_per_reference(tmp_path):
    """`sweeps/launch.py --dry-run` of an ablation listing a reference file: the reference job is planned (composed
    and validated with the grid's settings) and named; a missing reference file fails the launch naming it. Two
    launcher subprocesses: ~20 s."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "released.pth")
    config_dir = tmp_path / "conf"
    (config_dir / "ablation").mkdir(parents=True)
    ablation = {"name": "pair", "axes": {"predictor": ["separate", "shared"]}, "seeds": [0],
                "fixed": ["method=byol", f"data.root={data}", "data.download=false", "data.subset=null",
                          "train.batch_size=8", "eval.knn_k=[3]"],
                "references": [{"weights": str(tmp_path / "released.pth"), "name": "released"}]}
    (config_dir / "ablation" / "pair.yaml").write_text(yaml.safe_dump(ablation))
    launch = [sys.executable, "sweeps/launch.py", "--config-dir", str(config_dir), "ablation=pair",
              f"sweep_dir={tmp_path / 'sweep'}", "--dry-run"]
    out = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"reference=released\s+submit\s+" + re.escape(str(tmp_path / "sweep" / "reference=released")),
                     out.stdout)
    (tmp_path / "released.pth").unlink()
    out = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "job 'reference=released': eval.weights:" in out.stderr
