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
    (["optim.schedule_per=week"], "optim.schedule_per", "epoch"),
    (["method=byol", "optim.weight_decay_1d=true"], "optim.weight_decay_1d", "optim.name=sgd"),
    (["optim.weight_decay_1d=maybe"], "optim.weight_decay_1d", "true or false"),
    (["optim.final_lr_ratio=2"], "optim.final_lr_ratio", "[0, 1]"),
    (["views.types.local.blur_kernel=8"], "views.types.local.blur_kernel", "odd"),
    (["views.types.local.size=8"], "views.types.local.blur_kernel", "blur_kernel=null"),
    (["views.types.global.jitter=[0.4,0.4,0.2]"], "views.types.global.jitter", "hue"),
    (["views.types.global.jitter=[0.4,0.4,0.2,0.7]"], "views.types.global.jitter", "hue <= 0.5"),
    (["data.eval_interpolation=lanczos"], "data.eval_interpolation", "bilinear"),
    (["backbone=vit_tiny", "+backbone.zero_init_last=false"], "backbone.zero_init_last", "zero_init_last=null"),
    (["backbone.drop_path_rate=1.5"], "backbone.drop_path_rate", "[0, 1)"),
    (["method.batch_size=0"], "method.batch_size", "positive integer"),
    (["method.projector.hidden_dims=[0]"], "method.projector.hidden_dims", "positive"),
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
