"""Evaluating weights that no mtssl job trained (`python -m mtssl.eval --weights`, mtssl/eval/weights.py): every
accepted file format gives the kNN of the same weights loaded directly; other architectures and truncated files
are refused naming what is wrong.

The files are built here from torchvision ResNet state dicts (random init, with their `fc` head; one block per stage
where a kNN runs, to keep it cheap) and from a job's backbone.pth; the kNN runs on 24 + 24 images of 32 px.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mtssl.config import ConfigError, compose_config, resolve_config
from mtssl.data.image_folder import EvalImageFolder
from mtssl.distributed.fsdp import state_sha256
from mtssl.eval.end_of_training import _frozen_backbone, eval_transform, evaluation_samples
from mtssl.eval.features import extract_features
from mtssl.eval.knn import knn_classify
from mtssl.eval.weights import find_timm_weights, load_backbone_weights
from mtssl.job_folder import RESULTS, JobStatus, read_results
from mtssl.model.siamese import backbone_kwargs, build_backbone
from tests.support.data import make_image_folder

EVAL = ["data.subset=null", "train.batch_size=8", "data.num_workers=0", "eval.linear_epochs=1", "eval.batch_size=48",
        "eval.linear_lrs=[0.1]", "eval.knn_k=[5]"]
# torchvision's ResNet (its 7x7 stem), one block per stage
IMAGENET_STEM = ["backbone=resnet18", "+backbone.kwargs.layers=[1,1,1,1]", "data.small_images=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=2, per_class=12)


def config(root: Path, *overrides: str):
    return resolve_config(compose_config([f"data.root={root}", *EVAL, *overrides]))


def knn_top1(cfg, state: dict) -> float:
    """kNN top-1 at the headline k (20) of a backbone state dict, computed here with the plain kNN."""
    backbone = _frozen_backbone(cfg, state, torch.device("cpu"))
    train, val = evaluation_samples(cfg, None)
    banks = [extract_features(backbone, EvalImageFolder(s, eval_transform(cfg)), 48) for s in (train, val)]
    return knn_classify(*banks[0], *banks[1], num_classes=2, ks=(20,))["k20"]["top1"]


def empty_backbone(cfg):
    return build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))


def torchvision_state(seed: int) -> dict:
    """A torchvision ResNet of BasicBlocks, one per stage (the naming of its resnet18, half the depth)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    return ResNet(BasicBlock, [1, 1, 1, 1]).state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def test_every_format_of_torchvision_weights_gives_their_knn(tmp_path, data_root):
    """A torchvision ResNet saved as MULAN's plain state dict, as a full checkpoint (online_model / target_model
    with module.backbone. prefixes and a projector), as a DDP state_dict checkpoint, as timm's train checkpoint
    (model) and as safetensors: each loads to the state dict of the weights loaded directly (same SHA-256) and
    gives their kNN top-1; the head (fc) and the projector are reported as left out. Eight kNN evaluations of 24 + 24
    images (~15 s on two shared cores)."""
    from safetensors.torch import save_file

    cfg = config(data_root, *IMAGENET_STEM)
    online, target = torchvision_state(0), torchvision_state(1)
    direct = {}
    for name, state in (("online", online), ("target", target)):
        backbone = empty_backbone(cfg)
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})  # strict
        direct[name] = backbone.state_dict()
    expected = {name: knn_top1(cfg, state) for name, state in direct.items()}

    projector = {"projector.0.weight": torch.zeros(4, 512), "predictor.0.weight": torch.zeros(4, 4)}
    files = {
        "mulan.pth": (online, "state_dict", ["fc.*"]),
        "full.pth": ({"online_model": prefixed({**prefixed(online, "backbone."), **projector}, "module."),
                      "target_model": prefixed({**prefixed(target, "backbone."), **projector}, "module."),
                      "epoch": 800}, "checkpoint", ["fc.*", "predictor.*", "projector.*"]),
        "ddp.pth": ({"state_dict": prefixed(online, "module."), "epoch": 3}, "checkpoint", ["fc.*"]),
        "timm_train.pth": ({"model": online, "arch": "resnet18"}, "checkpoint", ["fc.*"]),
    }
    for name, (content, _, _) in files.items():
        torch.save(content, tmp_path / name)
    save_file({k: v.contiguous() for k, v in online.items()}, tmp_path / "hub.safetensors")
    files["hub.safetensors"] = (None, "state_dict", ["fc.*"])
    for name, (_, fmt, dropped) in files.items():
        weights = load_backbone_weights(str(tmp_path / name), empty_backbone(cfg), "resnet18")
        assert (weights.format, weights.dropped_keys) == (fmt, dropped), name
        assert state_sha256(weights.state_dict) == state_sha256(direct["online"]), name
        assert knn_top1(cfg, weights.state_dict) == expected["online"], name
    weights = load_backbone_weights(str(tmp_path / "full.pth"), empty_backbone(cfg), "resnet18", branch="target")
    assert state_sha256(weights.state_dict) == state_sha256(direct["target"])
    assert knn_top1(cfg, weights.state_dict) == expected["target"]
    with pytest.raises(ConfigError, match="no EMA target entry"):
        load_backbone_weights(str(tmp_path / "mulan.pth"), empty_backbone(cfg), "resnet18", branch="target")


def test_a_jobs_backbone_export_online_and_target(tmp_path, data_root):
    """A job's backbone.pth (online and EMA target) and the same backbone in a full checkpoint: each branch gives
    the kNN of its state dict (four kNN evaluations, ~5-10 s on two shared cores)."""
    cfg = config(data_root, *IMAGENET_STEM)
    states = {}
    for seed, name in ((0, "online"), (1, "target")):
        torch.manual_seed(seed)
        states[name] = empty_backbone(cfg).state_dict()
    torch.save({"backbone": "resnet18", "state_dict": states["online"], "target_state_dict": states["target"]},
               tmp_path / "backbone.pth")
    torch.save({"online_model": prefixed(states["online"], "module.backbone.")}, tmp_path / "checkpoint.pth")
    for branch in ("online", "target"):
        weights = load_backbone_weights(str(tmp_path / "backbone.pth"), empty_backbone(cfg), "resnet18", branch)
        assert weights.format == "mtssl_export" and weights.dropped_keys == []
        assert knn_top1(cfg, weights.state_dict) == knn_top1(cfg, states[branch])
    weights = load_backbone_weights(str(tmp_path / "checkpoint.pth"), empty_backbone(cfg), "resnet18")
    assert state_sha256(weights.state_dict) == state_sha256(states["online"])


def test_another_architecture_is_refused_naming_keys(tmp_path, data_root):
    """A ResNet-34 file for a ResNet-18 backbone, and torchvision's 7x7 stem for the 32 px stem: ConfigError naming
    the unexpected keys and the shapes (never a strict=False load of half the network)."""
    import torchvision

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    cfg = config(data_root, "backbone=resnet18", "data.small_images=false")
    with pytest.raises(ConfigError, match=r"does not hold a resnet18 backbone: \d+ unexpected keys: layer1\.2\."):
        load_backbone_weights(str(tmp_path / "resnet34.pth"), empty_backbone(cfg), "resnet18")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    small = config(data_root, "backbone=resnet18", "data.small_images=true")
    with pytest.raises(ConfigError, match=r"conv1\.weight \(64, 3, 7, 7\) \(expected \(64, 3, 3, 3\)\).*data\.small_images"):
        load_backbone_weights(str(tmp_path / "resnet18.pth"), empty_backbone(small), "resnet18")
    missing = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
               if not k.startswith("layer4.1.")}
    torch.save(missing, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"missing keys: layer4\.1\.bn1\.bias"):
        load_backbone_weights(str(tmp_path / "partial.pth"), empty_backbone(cfg), "resnet18")


def test_a_truncated_file_is_refused(tmp_path, data_root):
    """Half a .pth or .safetensors file: ConfigError naming the file and saying it is truncated."""
    from safetensors.torch import save_file

    cfg = config(data_root, *IMAGENET_STEM)
    state = torchvision_state(0)
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ConfigError, match=rf"{name} \(\d+ bytes\) cannot be read .*truncated"):
            load_backbone_weights(str(tmp_path / name), empty_backbone(cfg), "resnet18")


def test_timm_weights_are_found_in_the_local_hub_cache(tmp_path, monkeypatch):
    """timm:resnet18 is read from the Hugging Face hub cache (laid out here as huggingface_hub lays it out), never
    downloaded; without a local copy the error says how to get one."""
    import huggingface_hub.constants

    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match=r"no local copy of timm's pretrained weights.*pretrained=True"):
        find_timm_weights("resnet18", hub_cache=tmp_path, torch_hub_dir=tmp_path)
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in torchvision_state(0).items()}, snapshot / "model.safetensors")
    assert find_timm_weights("resnet18", hub_cache=tmp_path) == snapshot / "model.safetensors"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    backbone = build_backbone("resnet18", layers=[1, 1, 1, 1])
    weights = load_backbone_weights("timm:resnet18", backbone, "resnet18")
    assert weights.source == "timm:resnet18" and weights.format == "state_dict"


def test_eval_weights_command_writes_an_evaluated_results_json(tmp_path, data_root, eval_cli):
    """`python -m mtssl.eval --weights FILE ... out_dir=DIR`: results.json with status evaluated, the file's SHA-256
    (of its bytes, computed here) and source, and the kNN of the weights loaded directly; a rerun with other eval
    settings merges; an out_dir of a trained job and a missing file are refused."""
    cfg = config(data_root, *IMAGENET_STEM)
    weights_file = tmp_path / "ckpt.pth"
    torch.save({"online_model": prefixed(torchvision_state(0), "module.backbone.")}, weights_file)
    out = tmp_path / "evaluated"

    def args(weights=weights_file, out_dir=out, knn_k="[5]"):
        overrides = [o for o in EVAL if not o.startswith("eval.knn_k=")] + [f"eval.knn_k={knn_k}"]
        return ["--weights", str(weights), f"data.root={data_root}", *overrides, *IMAGENET_STEM, f"out_dir={out_dir}"]

    assert eval_cli(args()) == 0
    results = read_results(out)
    assert results["status"] == JobStatus.EVALUATED
    assert results["weights_source"] == str(weights_file) and results["weights_format"] == "checkpoint"
    assert results["weights_file_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    weights = load_backbone_weights(str(weights_file), empty_backbone(cfg), "resnet18")
    assert results["weights_sha256"] == state_sha256(weights.state_dict)
    assert results["knn_top1"] == pytest.approx(knn_top1(cfg, weights.state_dict))
    assert set(results["knn"]) == {"k5", "k20"} and "linear_top1" in results

    assert eval_cli(args(knn_k="[3]")) == 0  # merged: k5 kept
    assert set(json.loads((out / RESULTS).read_text())["knn"]) == {"k3", "k5", "k20"}

    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / RESULTS).write_text(json.dumps({"status": "completed", "knn_top1": 1.0}))
    assert eval_cli(args(out_dir=trained)) == 2
    assert eval_cli(args(weights=tmp_path / "absent.pth")) == 2


def _evaluate_on_rank(rank: int, world_size: int, port: int, args: list[str], codes: Path) -> None:
    """One rank of `torchrun -m mtssl.eval ARGS` (a spawned process): its exit code into ``codes``/<rank>."""
    from mtssl.eval.__main__ import main
    from tests.support.ranks import set_rank_env

    set_rank_env(rank, world_size, port)
    (codes / str(rank)).write_text(str(main(args)))


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_results(tmp_path, data_root, eval_cli):
    """`--weights` on 2 ranks (spawned CPU processes, as torchrun starts them): exit 0 on both, one results.json
    with the kNN of one rank and world_size 2. Slow: two spawned processes importing torch and timm, ~40 s on two
    shared cores."""
    from tests.support.ranks import run_ranks

    weights_file = tmp_path / "mulan.pth"
    torch.save(torchvision_state(0), weights_file)
    overrides = [f"data.root={data_root}", *EVAL, *IMAGENET_STEM]
    assert eval_cli(["--weights", str(weights_file), *overrides, f"out_dir={tmp_path / 'one'}"]) == 0
    codes = tmp_path / "codes"
    codes.mkdir()
    run_ranks(_evaluate_on_rank, 2, ["--weights", str(weights_file), *overrides, f"out_dir={tmp_path / 'two'}"], codes)
    assert [(codes / str(rank)).read_text() for rank in range(2)] == ["0", "0"]
    one, two = read_results(tmp_path / "one"), read_results(tmp_path / "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["knn"] == one["knn"] and two["weights_file_sha256"] == one["weights_file_sha256"]
    assert two["linear"]["frozen_features"]["lr"] == one["linear"]["frozen_features"]["lr"]
