"""The job folder (mtssl/job_folder.py): one status vocabulary read from hand-built folders, results.json's one
reader and writer, progress.json, which checkpoints count, and that no other module spells its file names or
status words (nor docs/job_folder.md leaves one out)."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import mtssl.job_folder as job_folder
from mtssl.job_folder import (FOLDER_STATUSES, STARTED_MARKERS, JobStatus, Results, job_state, last_checkpoint_step,
                              read_progress, read_results, record_start, update_progress, write_results)
from sweeps.status import job_progress

REPO = Path(__file__).resolve().parent.parent
COMPLETED = {"status": "completed", "knn_top1": 41.5, "knn": {"k20": {"top1": 41.5, "top5": 80.0}},
             "final_losses": {"loss": 1.25}, "monitor": {"rankme_final": {"global": 12.0}}}


def folder(tmp_path: Path, name: str, results: str | None = None, *parts: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    if results is not None:
        (out / "results.json").write_text(results)
    for part in parts:
        (out / part).mkdir() if part in ("tb", "checkpoints") else (out / part).write_text("x")
    return out


def test_status_of_each_kind_of_folder(tmp_path):
    assert job_state(tmp_path / "never_made").status == JobStatus.PENDING
    assert job_state(folder(tmp_path, "empty")).status == JobStatus.PENDING
    for marker in ("config.yaml", "train.log", "progress.json", "tb", "checkpoints"):
        assert job_state(folder(tmp_path, f"started_{marker}", None, marker)).status == JobStatus.UNFINISHED, marker
    assert set(STARTED_MARKERS) == {"config.yaml", "train.log", "progress.json", "tb", "checkpoints"}
    for status in ("completed", "diverged", "failed"):
        state = job_state(folder(tmp_path, status, json.dumps({**COMPLETED, "status": status}), "config.yaml"))
        assert (state.status, state.results["knn_top1"], state.problem) == (status, 41.5, None)
    malformed = {
        "half": ('{"status": "compl', "not valid JSON"),
        "list": ("[1, 2]", "holds a JSON list"),
        "no_status": ('{"knn_top1": 1.0}', "no 'status' field"),
        "unknown": ('{"status": "done"}', "'done' is not one of completed, diverged, failed"),
        "partial": ('{"status": "completed"}', "no 'knn_top1' field"),
        "text_metric": (json.dumps({**COMPLETED, "linear_top1": "high"}), "'linear_top1' is 'high'"),
        "nested_metric": (json.dumps({**COMPLETED, "knn": {"k20": {"top1": [1]}}}), "'knn.k20.top1' is [1]"),
        "monitor_metric": (json.dumps({**COMPLETED, "monitor": {"rankme_min": {"global": "x"}}}),
                           "'monitor.rankme_min.global' is 'x'"),
    }
    for name, (text, problem) in malformed.items():
        state = job_state(folder(tmp_path, name, text, "config.yaml"))
        assert state.status == JobStatus.MALFORMED and problem in state.problem and state.results is None, name
    # One word per status, written as the word (messages, tables, JSON).
    assert [str(s) for s in FOLDER_STATUSES] == ["completed", "diverged", "failed", "evaluated", "malformed", "unfinished",
                                                 "pending"]
    assert f"{JobStatus.QUEUED}" == "queued" and json.dumps({"s": JobStatus.FAILED}) == '{"s": "failed"}'


def test_results_are_written_whole_and_read_back(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    assert read_results(out) is None
    write_results(out, {**COMPLETED, "status": JobStatus.COMPLETED})
    write_results(out, {**COMPLETED, "knn_top1": 50.0})  # replaces the file
    assert read_results(out) == {**COMPLETED, "knn_top1": 50.0}
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no temporary file left


def test_progress_counts_starts_and_keeps_the_latest_step(tmp_path, caplog):
    out = tmp_path / "job"
    assert read_progress(out) is None and job_progress(out)["requeues"] is None
    record_start(out)  # makes the folder, as a Trainer run before its first checkpoint needs
    update_progress(out, step=0, total_steps=40, epoch=0)
    update_progress(out, step=10, total_steps=40, epoch=1, loss=1.5, images_per_s=12.5)
    record_start(out)  # requeued: the latest step stays until the next logging step
    progress = read_progress(out)
    assert {k: progress[k] for k in ("starts", "step", "total_steps", "epoch", "loss", "images_per_s")} == {
        "starts": 2, "step": 10, "total_steps": 40, "epoch": 1, "loss": 1.5, "images_per_s": 12.5}
    assert job_progress(out) == {"step": 10, "total": 40, "loss": 1.5, "images_per_s": 12.5, "requeues": 1}
    # A failed write only warns: progress.json must never end a training run.
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="mtssl.job_folder"):
        update_progress(blocked / "job", step=1)
    assert "could not update" in caplog.text


def test_the_newest_complete_checkpoint_is_the_one_a_resume_uses(tmp_path, single_process):
    """last_checkpoint_step (no torch) agrees with CheckpointManager on real checkpoints and partial folders."""
    import torch

    from mtssl.distributed.checkpoint import CheckpointManager, ModelAndOptimizer, TrainerState

    out = tmp_path / "job"
    model = torch.nn.Linear(2, 2)
    manager = CheckpointManager(out / "checkpoints", keep=3)
    for step in (2, 5):
        manager.save(TrainerState(step=step), ModelAndOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1)), "")
    (out / "checkpoints" / ".tmp_step_00000009").mkdir()  # being written
    (out / "checkpoints" / "step_00000007").mkdir()  # cut short: no trainer state, no buffers
    (out / "checkpoints" / "step_00000007" / ".metadata").write_bytes(b"")
    assert last_checkpoint_step(out) == 5
    assert [p.name for p in manager.checkpoints()] == ["step_00000005", "step_00000002"]
    assert last_checkpoint_step(tmp_path / "nothing") is None


def test_the_job_folder_module_imports_without_torch():
    code = "import sys, mtssl.job_folder, mtssl.utils.progress_bar; assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


JOB_FOLDER_NAMES = {v for k, v in vars(job_folder).items() if k.isupper() and isinstance(v, str)}
STATUS_WORDS = {s.value for s in JobStatus}
# String constants equal to a job-folder name or status word that mean something else.
OTHER_MEANINGS = {("sweeps/overrides.py", "config.yaml"),  # the sweep launcher's own Hydra config file
                  ("mtssl/eval/weights.py", "checkpoints"),  # torch hub's folder of downloaded weights
                  ("mtssl/train/scalar_logger.py", "wandb"),  # the package, beside the folder it writes
                  ("mtssl/__init__.py", "wandb")}  # the package, whose import is deferred


def _spelled(value: str) -> bool:
    return value in JOB_FOLDER_NAMES or value in STATUS_WORDS


def test_no_module_but_the_job_folder_spells_its_file_names_or_status_words():
    found = []
    for root in ("mtssl", "sweeps", "analysis", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative == "mtssl/job_folder.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and _spelled(node.value)
                        and (relative, node.value) not in OTHER_MEANINGS):
                    found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not found, "use the names of mtssl.job_folder instead:\n" + "\n".join(found)
    assert _spelled("results.json") and _spelled("unfinished")  # the check sees what it looks for


def test_the_docs_name_every_file_status_and_results_field():
    docs = (REPO / "docs" / "job_folder.md").read_text()
    quoted = {text.rstrip("/").split("/")[-1] for text in re.findall(r"`([^`]+)`", docs)}  # `<sweep_dir>/sweep.json`
    files = {getattr(job_folder, name) for name in ("CONFIG", "TRAIN_LOG", "PROGRESS", "CHECKPOINTS", "TENSORBOARD",
                                                     "KNN_DURING_TRAINING", "EVAL_STATE", "AUGMENTED_STATE", "WANDB",
                                                     "BACKBONE_EXPORT", "RESULTS", "SWEEP_SPEC", "TRAINER_STATE")}
    fields = set(Results.__annotations__) | set(job_folder.Progress.__annotations__)
    missing = sorted((files | STATUS_WORDS | fields) - quoted)
    assert not missing, f"docs/job_folder.md does not name: {missing}"
