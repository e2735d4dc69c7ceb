"""Bad input: every case fails at launch with one message naming the field and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtssl.config import ConfigError, compose_config, resolve_config, validate_config
from tests.conftest import make_image_folder


def check(overrides, world_size=1):
    validate_config(resolve_config(compose_config(overrides)), world_size=world_size)


@pytest.mark.parametrize("overrides,field,hint", [
    (["method.name=dino"], "method.name", "byol"),
    (["predictor.mode=both"], "predictor.mode", "separate"),
    (["backbone.name=resnet_typo"], "backbone.name", "timm"),
    (["views.types.global.count=1"], "views.types.global.count", "at least 2 global"),
    (["views.types.local.count=0"], "views.types.local.count", ">= 1"),
    (["views.types.local.size=0"], "views.types.local.size", "positive"),
    (["views.types.local.scale=[0.0,0.25]"], "views.types.local.scale", "0 < min"),
    (["views.types.global.scale=[0.25,1.5]"], "views.types.global.scale", "<= 1"),
    (["views.types.cutout.weight=-1"], "views.types.cutout.weight", ">= 0"),
    (["views=global", "views.types.local.weight=1"], "views.types.local.weight", "Could not override"),
    (["+views.types.jigsaw.count=2"], "views.types", "valid types"),
    (["optim.name=adam"], "optim.name", "lars"),
    (["data.pipeline=dali"], "data.pipeline", "fast"),
    (["train.batch_size=6"], "train.batch_size", "multiple of 4"),
    (["train.channels_last=yes please"], "train.channels_last", "true or false"),
])
def test_bad_config_names_field(tiny_folder, overrides, field, hint):
    with pytest.raises(ConfigError) as info:
        check([f"data.root={tiny_folder}", "train.batch_size=4", "data.subset=null"] + overrides, world_size=4)
    assert field in str(info.value) and hint in str(info.value)


def test_valid_config_passes(tiny_folder):
    check([f"data.root={tiny_folder}", "train.batch_size=4", "data.subset=null"])


def test_missing_root_and_split(tmp_path):
    with pytest.raises(ConfigError, match="data.root: folder .* does not exist"):
        check([f"data.root={tmp_path / 'nowhere'}", "data.download=false"])
    make_image_folder(tmp_path / "only_train", splits=("train",))
    with pytest.raises(ConfigError, match="has no 'val' folder"):
        check([f"data.root={tmp_path / 'only_train'}"])


def test_imagefolder_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        check(["data=imagefolder"])


def test_empty_split_and_single_class(tmp_path):
    root = tmp_path / "empty"
    (root / "train" / "a").mkdir(parents=True)
    (root / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        check([f"data.root={root}"])
    one = make_image_folder(tmp_path / "one", classes=1)
    with pytest.raises(ConfigError, match="at least 2 are needed"):
        check([f"data.root={one}", "train.batch_size=4"])


def test_batch_larger_than_subset(tiny_folder):
    with pytest.raises(ConfigError, match="train.batch_size: 64 is larger than the 10 training images"):
        check([f"data.root={tiny_folder}", "data.subset=10", "train.batch_size=64"])


def test_cli_bad_input_exits_2_with_one_message(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mtssl.run", "views.types.global.count=1", f"out_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "views.types.global.count" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()
    proc = subprocess.run([sys.executable, "-m", "mtssl.run", "method=dino"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "byol" in proc.stderr  # Hydra lists the available methods


def test_config_changes_name_training_fields_only():
    from mtssl.config import ABSENT, config_changes, config_hash, format_changes

    old = {"method": {"name": "byol", "projector": {"hidden_dims": [64]}}, "train": {"seed": 0, "epochs": 3,
           "log_every_steps": 1}, "eval": {"knn_k": [3, 5]}, "out_dir": "a", "hydra": {"x": 1}}
    new = {"method": {"name": "simsiam", "projector": {"hidden_dims": [64, 64]}, "extra": True},
           "train": {"seed": 0, "log_every_steps": 10}, "eval": {"knn_k": [3]}, "out_dir": "b"}
    changes = config_changes(old, new)
    assert changes == [("method.name", "byol", "simsiam"), ("method.projector.hidden_dims", [64], [64, 64]),
                       ("method.extra", ABSENT, True), ("train.epochs", 3, ABSENT)]
    assert format_changes(changes, limit=2) == "method.name: byol → simsiam, method.projector.hidden_dims: [64] → [64, 64], ... and 2 more"
    assert config_changes(old, {**old, "eval": {}, "out_dir": "c"}) == []
    assert old["hydra"] == {"x": 1} and "log_every_steps" in old["train"]  # inputs are not modified
    # The seed-free hash ignores the seed and nothing else.
    reseeded = {**old, "train": {**old["train"], "seed": 1}}
    assert config_hash(old) != config_hash(reseeded)
    assert config_hash(old, ignore=("train.seed",)) == config_hash(reseeded, ignore=("train.seed",))
    assert config_hash(old, ignore=("train.seed",)) != config_hash(new, ignore=("train.seed",))


def test_config_hash_survives_the_config_yaml_round_trip(tiny_folder, tmp_path):
    """Reruns compare with out_dir/config.yaml: reading it back gives the hash of the config that wrote it."""
    from omegaconf import OmegaConf

    from mtssl.config import changes_from_file, config_hash

    cfg = resolve_config(compose_config([f"data.root={tiny_folder}", "method=mocov3", "optim.weight_decay=1e-6"]))
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert config_hash(OmegaConf.load(tmp_path / "config.yaml")) == config_hash(cfg)
    assert changes_from_file(tmp_path / "config.yaml", cfg) == []
    assert changes_from_file(tmp_path / "missing.yaml", cfg) is None
