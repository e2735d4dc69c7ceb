"""The parts of benchmarks/gpu_check.py that need no GPU: its verdicts, arithmetic and exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402


def test_mfu_is_achieved_over_peak_flops():
    # 2 TFLOP per step at 50 steps/s = 100 TFLOP/s, on a 989 TFLOP/s peak: 10.1 %
    assert gpu_check.mfu(2e12, 50.0, 989e12) == pytest.approx(0.10111, rel=1e-4)
    assert gpu_check.mfu(2e12, 50.0, None) is None


def test_compare_states_reports_bitwise_equality_and_largest_difference():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    assert gpu_check.compare_states(a, {k: v.clone() for k, v in a.items()}) == (True, 0.0)
    b = {"w": torch.tensor([1.0, 2.5]), "n": torch.tensor(3)}
    assert gpu_check.compare_states(a, b) == (False, 0.5)
    signed_zero = {"w": torch.tensor([-0.0, 2.0]), "n": torch.tensor(3)}
    zero = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    assert gpu_check.compare_states(zero, signed_zero)[0] is False  # bitwise, not numerically equal
    with pytest.raises(ValueError, match="keys"):
        gpu_check.compare_states(a, {"w": a["w"]})


RESULTS = {
    "device": "NVIDIA H200", "images_per_s": 12000.0, "tflop_per_s": 80.0, "mfu": 0.081, "peak_memory_gib": 9.5,
    "steps": 300, "job_status": "completed", "job_images_per_s": 9000.0, "losses_finite": True,
    "knn_top1": 40.0, "linear_top1": 45.0, "resume_bitwise": True, "resume_max_abs_diff": 0.0,
}


def test_table_passes_only_when_every_check_passed(capsys):
    rows = gpu_check.check_rows(RESULTS)
    assert gpu_check.all_passed(rows)
    gpu_check.print_summary(rows)
    out = capsys.readouterr().out
    assert "GPU acceptance check" in out and "8.1%" in out and "bitwise equal" in out and "FAIL" not in out
    for failure in ({"resume_bitwise": False, "resume_max_abs_diff": 1e-3}, {"throughput_error": "RuntimeError: sync"},
                    {"job_status": "diverged"}, {"losses_finite": False}, {"eval_error": "OOM"}):
        rows = gpu_check.check_rows({**RESULTS, **failure})
        assert not gpu_check.all_passed(rows), failure
    assert not gpu_check.all_passed(gpu_check.check_rows({"device": "x"}))  # nothing ran: no pass


def test_without_cuda_it_says_so_and_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 1
    assert "no CUDA device" in capsys.readouterr().err
