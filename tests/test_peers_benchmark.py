"""benchmarks/peers.py at a tiny size, so that it cannot rot.

Without the ``bench`` extra the peers are skipped, with the reason printed, and the mtssl rows are
checked; with it (``pip install -e '.[bench]'``) the 2-view BYOL loss and gradient rows must show
mtssl and each peer equal to float tolerance, and a wrong loss map must be caught.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peers  # noqa: E402

from mtssl.model.siamese import build_backbone  # noqa: E402

TINY = ["--images", "2", "--rounds", "2", "--batch", "2", "--steps", "1", "--warmup", "0",
        "--global-size", "32", "--local-size", "16"]
INSTALLED = {name: importlib.util.find_spec(module) is not None for name, (module, _) in peers.PEERS.items()}


@pytest.fixture
def no_launcher_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.slow
def test_tiny_run_reports_consistent_rows_and_the_skipped_peers(tmp_path, capsys, no_launcher_env):
    report = peers.main([*TINY, "--out", str(tmp_path / "peers.json")])
    output = capsys.readouterr()
    assert (tmp_path / "peers.json").exists()
    for name, installed in INSTALLED.items():
        if not installed:
            assert name in report["skipped"] and peers.INSTALL_HINT in report["skipped"][name]
            assert f"skipping {name}: " in output.err and f"skipped {name}: " in output.out
    present = [name for name in peers.PEERS if name not in report["skipped"]]
    assert sorted(report["peers"]) == sorted(present)

    rows = report["rows"]
    data = {r["implementation"]: r for r in rows if r["row"] == "data path"}
    step = {r["implementation"]: r for r in rows if r["row"] == "training step"}
    assert {"mtssl torchvision", "mtssl fast", "mtssl gpu (worker part)"} <= set(data)
    assert {"mtssl per_view", "mtssl ghost"} <= set(step)
    assert len(data) == 3 + len(present) and len(step) == 2 + len(present)
    for r in [*data.values(), *step.values()]:
        assert "error" not in r, r
        rates = r["images_per_s_all"]
        assert len(rates) == 2 and all(math.isfinite(x) and x > 0 for x in rates)
        assert min(rates) <= r["images_per_s"] <= max(rates)  # the median of the rounds
        # One torch thread: the process's CPU time per image cannot much exceed its wall time per image.
        assert 0 < r["cpu_ms_per_image"] <= 1.5 * 1000 / min(rates), r

    checks = [r for r in rows if "ok" in r]
    assert len(checks) == 2 * len(present)  # random heads and the whole network, per peer
    for r in checks:
        assert r["ok"], r
        assert r["loss_relative_difference"] <= 1e-4 and r["gradient_relative_difference"] <= 1e-4
        offset, slope = peers.LOSS_MAPS[r["implementation"]]
        assert r["mtssl_loss"] == pytest.approx(offset + slope * r["peer_loss"], rel=1e-4)
    backbone_tensors = len(list(build_backbone("resnet18").parameters()))
    for r in checks:
        if r["row"] == "loss through the network":  # every online tensor: backbone, projector, predictor (5 each)
            assert r["gradients_compared"] == backbone_tensors + 5 + 5


@pytest.mark.skipif(not any(INSTALLED.values()), reason="the bench extra is not installed (pip install -e '.[bench]')")
def test_loss_rows_catch_a_wrong_map(monkeypatch, one_thread):
    import torch

    present, _ = peers.load_peers([name for name, installed in INSTALLED.items() if installed])
    good = peers.head_loss_rows(present, torch.device("cpu"), batch=4, tolerance=1e-5)
    assert good and all(r["ok"] for r in good)
    monkeypatch.setattr(peers, "LOSS_MAPS", {name: (offset, slope * 1.001) for name, (offset, slope) in peers.LOSS_MAPS.items()})
    bad = peers.head_loss_rows(present, torch.device("cpu"), batch=4, tolerance=1e-5)
    assert bad and not any(r["ok"] for r in bad)
