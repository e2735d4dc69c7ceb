"""benchmarks/gpu_acceptance.py: its CPU rehearsal (every stage's code path, CUDA-only checks skipped), and the
parts that decide its verdicts: state comparison, MFU, the prefetcher trace analysis, stage statuses, the
offline wheel install."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def ga():
    """The script as a module (it lives outside any package); removed from sys.modules afterwards."""
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_mfu_is_achieved_over_peak_flops(ga):
    # 2 TFLOP per step at 50 steps/s = 100 TFLOP/s, on a 989 TFLOP/s peak: 10.1 %
    assert ga.mfu(2e12, 50.0, 989e12) == pytest.approx(0.10111, rel=1e-4)
    assert ga.mfu(2e12, 50.0, None) is None


def test_compare_states_reports_bitwise_equality_and_largest_difference(ga):
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    assert ga.compare_states(a, {k: v.clone() for k, v in a.items()}) == (True, 0.0)
    b = {"w": torch.tensor([1.0, 2.5]), "n": torch.tensor(3)}
    assert ga.compare_states(a, b) == (False, 0.5)
    signed_zero = {"w": torch.tensor([-0.0, 2.0]), "n": torch.tensor(3)}
    zero = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    assert ga.compare_states(zero, signed_zero)[0] is False  # bitwise, not numerically equal
    with pytest.raises(ValueError, match="keys"):
        ga.compare_states(a, {"w": a["w"]})


def _event(cat, name, ts, dur, **extra):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, **extra}


def test_prefetch_trace_analysis_measures_overlap_streams_and_syncs(ga):
    # Compute stream 7: kernels over [0, 100] and [150, 200]. Side stream 20: a pageable copy over [90, 160]
    # overlaps them for 10 + 10 of its 70 us; a copy on the compute stream is counted apart, a device-to-host one
    # not at all. Inside the first next() range (thread 1, [0, 50]) one cudaStreamSynchronize; the one at 300 lies
    # outside every range, the one at 10 is on thread 2, and cudaMemcpyAsync does not synchronise.
    events = [
        _event("kernel", "conv", 0, 100, args={"stream": 7}), _event("kernel", "relu", 150, 50, args={"stream": 7}),
        _event("kernel", "tiny", 0, 5, args={"stream": 20}),
        _event("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 90, 70, args={"stream": 20, "bytes": 1000}),
        _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 1, args={"stream": 7, "bytes": 8}),
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 0, 1, args={"stream": 7, "bytes": 8}),
        _event("user_annotation", ga.NEXT_ANNOTATION, 0, 50, tid=1),
        _event("user_annotation", ga.NEXT_ANNOTATION, 200, 50, tid=1),
        _event("cuda_runtime", "cudaStreamSynchronize", 20, 1, tid=1),
        _event("cuda_runtime", "cudaStreamSynchronize", 10, 1, tid=2),
        _event("cuda_runtime", "cudaStreamSynchronize", 300, 1, tid=1),
        _event("cuda_runtime", "cudaMemcpyAsync", 210, 1, tid=1),
    ]
    found = ga.analyse_prefetch_trace(events)
    assert found["compute_stream"] == 7 and found["side_streams"] == ["20"]
    assert (found["side_stream_copies"], found["side_stream_copy_bytes"], found["side_stream_pageable_copies"]) == (1, 1000, 1)
    assert (found["compute_stream_copies"], found["compute_stream_copy_bytes"]) == (1, 8)
    assert found["overlap_share"] == pytest.approx(20 / 70)
    assert found["next_calls"] == 2
    assert found["synchronising_calls_in_next"] == 1 and found["synchronising_call_names"] == ["cudaStreamSynchronize"]
    assert ga.analyse_prefetch_trace([])["overlap_share"] is None


def test_compute_waits_on_a_copy_only_while_idle_with_a_kernel_launched(ga):
    # Compute stream 7: kernels over [0, 100] and [150, 200]; side-stream copy over [90, 160]. relu launched at
    # [95, 100]: it is queued over [100, 150], all inside the copy and with the stream idle, so compute waited
    # 50 of the copy's 70 us. Launched at [145, 150] instead (the host was late), it waits for nothing.
    def events(relu_launch):
        return [_event("kernel", "conv", 0, 100, args={"stream": 7, "correlation": 1}),
                _event("kernel", "relu", 150, 50, args={"stream": 7, "correlation": 2}),
                _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 90, 70, args={"stream": 20, "bytes": 1000}),
                _event("cuda_runtime", "cudaLaunchKernel", -5, 1, args={"correlation": 1}),
                _event("cuda_runtime", "cudaLaunchKernel", relu_launch, 5, args={"correlation": 2})]

    waiting = ga.analyse_prefetch_trace(events(95))
    assert waiting["compute_wait_us"] == pytest.approx(50) and waiting["compute_wait_share"] == pytest.approx(50 / 70)
    assert waiting["overlap_share"] == pytest.approx(20 / 70) and waiting["compute_busy_share"] == pytest.approx(150 / 200)
    assert ga.analyse_prefetch_trace(events(145))["compute_wait_us"] == 0


def test_stage_status_follows_its_checks(ga):
    gpu = ga.Stage("s", "t", 10, cuda=True)
    gpu.check("a", True, "1", "c")
    gpu.measure("m", "2")
    gpu.finish()
    assert gpu.status == ga.PASS
    gpu = ga.Stage("s", "t", 10, cuda=True)
    gpu.check("a", True, "1", "c")
    gpu.check("b", False, "2", "c", cuda_only=True)
    gpu.finish()
    assert gpu.status == ga.FAIL
    cpu = ga.Stage("s", "t", 10, cuda=False)
    assert cpu.check("b", False, "2", "c", cuda_only=True) is False  # on CPU: recorded as skipped, value kept
    cpu.finish()
    assert cpu.status == ga.SKIPPED and cpu.checks[0]["reason"] == ga.CUDA_ONLY and cpu.checks[0]["value"] == "2"
    broken = ga.Stage("s", "t", 10, cuda=True)
    broken.check("a", True, "1", "c")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError as error:
        broken.finish(error)
    assert broken.status == ga.FAIL and broken.error.startswith("RuntimeError: boom at tests/test_gpu_acceptance.py:")
    table = ga.markdown_report({"stages": [gpu.record(), cpu.record(), broken.record()]})
    assert table.count("\n| s |") == 3 and "stage error" in table and f"skipped ({ga.CUDA_ONLY})" in table


def _fake_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of one module ``name`` holding VALUE = 42."""
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_missing_packages_are_installed_offline_from_the_wheels_folder(ga, tmp_path, monkeypatch):
    name = "mtssl_gpu_acceptance_fake"
    monkeypatch.setattr(ga, "TRAVELLING_PACKAGES", {name: name})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    with pytest.raises(SystemExit, match="build_gpu_wheels.sh"):  # nothing to install from: says how to get it
        ga.ensure_packages(tmp_path / "no-wheels", tmp_path / "site")
    (tmp_path / "wheels").mkdir()
    _fake_wheel(tmp_path / "wheels", name)
    try:
        report = ga.ensure_packages(tmp_path / "wheels", tmp_path / "site")
        module = importlib.import_module(name)
        assert module.VALUE == 42 and Path(module.__file__).is_relative_to(tmp_path / "site")
        assert report["installed"] == [f"{name}-1.0-py3-none-any.whl"]
        assert str(tmp_path / "site") in os.environ["PYTHONPATH"].split(os.pathsep)  # for spawned processes too
        assert ga.ensure_packages(tmp_path / "wheels", tmp_path / "site") == {"installed": []}  # present: nothing to do
    finally:
        sys.modules.pop(name, None)


# Checks the CPU computes for real: they must pass in the rehearsal (the rest are CUDA-only, skipped).
CPU_CHECKS = {
    "preflight": ["mtssl found without PYTHONPATH", "imports", "gloo host group at world size 1"],
    "bf16_batchnorm": [f"{mode}: {check}" for mode in ("per_view", "per_view+cl", "ghost", "ghost+cl")
                       for check in ("bf16 step finite, gradient norm vs fp32", "BatchNorm in fp32 under bf16")],
    "sync_audit": [f"{name}: fit completed" for name in (
        "imagenet default (BYOL, gpu pipeline)", "MoCo v3 (LARS)", "SimSiam + SGD", "ViT-S + AdamW", "fast pipeline",
        "gpu pipeline + gpu_decode")],
    "gpu_pipeline": ["gpu on cpu vs fast (same seeds)", "worker decode: a batch with CMYK, truncated and non-JPEG files"],
    "prefetcher": ["trace: one next() range per profiled step"],
    "throughput": ["per_view", "ghost", "ghost+cl", "per_view + activation checkpointing", "plain timm"],
    "resume": ["runs completed", "resumed at step 2 vs uninterrupted (4 steps, ResNet-18, cuda_deterministic)"],
    "evaluation": ["sharded kNN (padded shards) vs one-process kNN on cpu",
                   "top-k with exact ties on cpu: the neighbours of an exact sort by (similarity, index)",
                   "collapsed features, 3000 bank rows: neighbours are the smallest indices", "kNN monitor on the FSDP bf16 backbone"],
    "compile": ["eager vs compiled loss"],
}


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage_and_passes(tmp_path):
    # Run as on the GPU machine: the script alone, from another directory, without PYTHONPATH.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "gpu_acceptance.json").read_text())
    assert results["scale"] == "cpu-rehearsal"
    stages = {s["name"]: s for s in results["stages"]}
    assert list(stages) == list(CPU_CHECKS)  # every stage, in priority order
    for name, stage in stages.items():
        assert stage["error"] is None and stage["status"] in ("pass", "skipped"), (name, stage)
        checks = {c["name"]: c for c in stage["checks"]}
        for check in CPU_CHECKS[name]:
            assert checks[check]["status"] == "pass", (name, checks[check])
        for check in checks.values():  # everything else ran its code path and says why it is not judged here
            assert check["status"] in ("pass", "measured") or check["reason"], (name, check)
    resume = next(c for c in stages["resume"]["checks"] if c["name"].startswith("resumed"))
    assert resume["value"] == "bitwise equal" and resume["numbers"]["max_abs_diff"] == 0.0
    gaps = [c["numbers"]["relative_gap"] for c in stages["bf16_batchnorm"]["checks"] if "relative_gap" in c["numbers"]]
    assert len(gaps) == 4 and all(0 < gap <= 0.1 for gap in gaps)  # bf16 differs from fp32, within the rehearsal's bound
    table = (out / "gpu_acceptance.md").read_text()
    assert all(f"| {name} |" in table for name in CPU_CHECKS) and "| stage | status | check |" in table
