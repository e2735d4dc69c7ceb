"""Bad input: every case fails at launch with one message naming the field and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from mtssl.config import ConfigError, available, compose_config, resolve_config
from mtssl.config.schema import FIELD_CHECKS, OPEN_SECTIONS, check_fields, field_check
from mtssl.config.validate import validate_config
from tests.support.data import REPO, make_image_folder


def check(overrides, world_size=1):
    validate_config(resolve_config(compose_config(overrides)), world_size=world_size)


@pytest.mark.parametrize("overrides,field,hint", [
    (["method.name=dino"], "method.name", "byol"),
    (["predictor.mode=both"], "predictor.mode", "separate"),
    (["backbone.name=resnet_typo"], "backbone.name", "timm"),
    (["views.types.global.count=1"], "views.types.global.count", "at least 2 global"),
    (["views.types.local.count=0"], "views.types.local.count", ">= 1"),
    (["views.types.local.size=0"], "views.types.local.size", ">= 1"),
    (["views.types.local.scale=[0.0,0.25]"], "views.types.local.scale", "0 < min"),
    (["views.types.global.scale=[0.25,1.5]"], "views.types.global.scale", "<= 1"),
    (["views.types.cutout.weight=-1"], "views.types.cutout.weight", ">= 0"),
    (["views=global", "views.types.local.weight=1"], "views.types.local.weight", "Could not override"),
    (["+views.types.jigsaw.count=2"], "views.types", "valid types"),
    (["optim.name=adam"], "optim.name", "lars"),
    (["data.pipeline=dali"], "data.pipeline", "fast"),
    (["train.batch_size=6"], "train.batch_size", "multiple of 4"),
    (["train.channels_last=yes please"], "train.channels_last", "true or false"),
    # Every field's type and range, eval.* included, before anything runs.
    (["train.epochs=two"], "train.epochs", "must be an integer >= 0, got 'two' (str)"),
    (["train.epochs=2.5"], "train.epochs", "must be an integer"),
    (["eval.knn_k=5"], "eval.knn_k", "must be a list"),
    (["eval.knn_k=[0]"], "eval.knn_k", "element 0: must be >= 1"),
    (["eval.linear_lrs=[]"], "eval.linear_lrs", "at least 1"),
    (["eval.linear_holdout=1"], "eval.linear_holdout", "in (0, 1)"),
    (["eval.linear_epochs=0"], "eval.linear_epochs", ">= 1"),
    (["eval.knn_temperature=0"], "eval.knn_temperature", "positive"),
    (["eval.val_subset=many"], "eval.val_subset", "integer >= 1 or null"),
    (["eval.batch_size=true"], "eval.batch_size", "got True (bool)"),
    (["optim.betas=[0.9]"], "optim.betas", "must hold 2 values"),
    (["optim.base_lr=-1"], "optim.base_lr", "positive"),
    (["data.mean=0.5"], "data.mean", "must be a list of 3"),
    (["data.num_workers=-1"], "data.num_workers", ">= 0"),
    (["train.view_batching=maybe"], "train.view_batching", "'bn_per_view'"),
    (["train.keep_checkpoints=1"], "train.keep_checkpoints", ">= 2"),
    (["views.types.local.blur_p=0.5"], "views.types.local.blur_p", "must be a list"),
    # A key that does not exist, added with + as Hydra's error suggests: refused, with the nearest field.
    (["+train.epoch=2"], "train.epoch", "not a field of the job config; did you mean train.epochs?"),
    (["+eval.knn=[5]"], "eval.knn", "did you mean eval.knn_k?"),
    (["~train.epochs"], "train.epochs", "missing from the config"),
    (["optim.schedule_per=week"], "optim.schedule_per", "epoch"),
    (["method=byol", "optim.weight_decay_1d=true"], "optim.weight_decay_1d", "optim.name=sgd"),
    (["optim.weight_decay_1d=maybe"], "optim.weight_decay_1d", "true or false"),
    (["optim.final_lr_ratio=2"], "optim.final_lr_ratio", "[0, 1]"),
    (["views.types.local.blur_kernel=8"], "views.types.local.blur_kernel", "odd"),
    (["views.types.local.size=8"], "views.types.local.blur_kernel", "blur_kernel=null"),
    (["views.types.global.jitter=[0.4,0.4,0.2]"], "views.types.global.jitter", "must hold 4 values"),
    (["views.types.global.jitter=[0.4,0.4,0.2,0.7]"], "views.types.global.jitter", "hue <= 0.5"),
    (["data.eval_interpolation=lanczos"], "data.eval_interpolation", "bilinear"),
    (["backbone=vit_tiny", "backbone.zero_init_last=false"], "backbone.zero_init_last", "zero_init_last=null"),
    (["backbone.drop_path_rate=1.5"], "backbone.drop_path_rate", "[0, 1)"),
    (["method.batch_size=0"], "method.batch_size", "must be >= 1"),
    (["method.projector.hidden_dims=[0]"], "method.projector.hidden_dims", "must be >= 1"),
    # Renamed fields and groups: refused, naming what replaced them.
    (["train.grouped_views=ghost"], "train.grouped_views", "renamed train.view_batching"),
    (["eval.knn_every_epochs=2"], "eval.knn_every_epochs", "renamed monitor.knn_every_epochs"),
    (["eval.knn_during_training_val_subset=5"], "eval.knn_during_training_val_subset", "renamed monitor.knn_val_subset"),
    (["scale=cpu"], "scale", "renamed regime"),
    (["+method.optim.base_lr=1"], "method.optim.base_lr", "renamed optim.base_lr"),
    (["backbone.ema_tau=0.9"], "backbone.ema_tau", "renamed train.ema_tau"),
    # An out_dir under a tree where no folder can be created (root may write to /proc, but mkdir fails there).
    (["out_dir=/proc/mtssl-test/run"], "out_dir", "cannot be created"),
])
def test_bad_config_names_field(tiny_folder, overrides, field, hint):
    with pytest.raises(ConfigError) as info:
        check([f"data.root={tiny_folder}", "train.batch_size=4", "data.subset=null"] + overrides, world_size=4)
    assert field in str(info.value) and hint in str(info.value)


def test_valid_config_passes(tiny_folder):
    check([f"data.root={tiny_folder}", "train.batch_size=4", "data.subset=null", "eval.knn_k=[5]"])  # a 16-image bank
    check([f"data.root={tiny_folder}", "train.batch_size=4", "data.subset=null", "eval.knn_k=[5]",
           "+backbone.kwargs.drop_rate=0.1",
           "train.view_batching=bn_per_view", "eval.val_subset=8"])


def preset_configs():
    """The default config with each preset of each group in turn (every field any preset defines)."""
    yield compose_config([])
    for group in ("method", "views", "predictor", "backbone", "data"):
        for name in available(group):
            yield compose_config([f"{group}={name}"] + (["data.root=/x"] if name == "imagefolder" else []))
    for regime in available("regime"):  # each regime with each method and backbone family: their parts too
        for choice in [f"method={m}" for m in available("method")] + ["backbone=resnet18", "backbone=vit_small"]:
            yield compose_config([f"regime={regime}", choice, "data.root=/x"])


def leaf_paths(node, path=""):
    if isinstance(node, dict) and node and path not in OPEN_SECTIONS:
        for key, value in node.items():
            yield from leaf_paths(value, f"{path}.{key}" if path else key)
    else:
        yield path


def test_every_field_of_every_preset_has_a_check_and_every_check_a_field():
    seen_patterns = set()
    for cfg in preset_configs():
        cfg = resolve_config(cfg)
        check_fields(cfg)  # raises on any field without a check
        data = OmegaConf.to_container(cfg, resolve=True)
        for path in leaf_paths(data):
            assert field_check(path) is not None, path
            seen_patterns |= {p for p in FIELD_CHECKS if field_check(path) is FIELD_CHECKS[p]}
    # No stale check: each leaf pattern matches some field of some preset (sections are seen through their leaves).
    leaf_patterns = {p for p in FIELD_CHECKS if not any(q.startswith(p + ".") for q in FIELD_CHECKS)}
    assert leaf_patterns - seen_patterns - set(OPEN_SECTIONS) == set()


def test_a_new_field_without_a_check_is_refused():
    cfg = resolve_config(compose_config([]))
    with open_dict(cfg):
        cfg.train.new_option = 1  # as a new field in mtssl/conf/config.yaml would appear
    with pytest.raises(ConfigError, match=r"train.new_option: not a field of the job config"):
        check_fields(cfg)


def test_out_dir_that_cannot_be_created(tiny_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"out_dir: .* cannot be created: .*a_file is a file"):
        check([f"data.root={tiny_folder}", "train.batch_size=4", "data.subset=null", f"out_dir={blocker / 'run'}"])
    assert not (blocker.parent / "run").exists()


def test_cuda_device_without_a_gpu_is_refused(monkeypatch):
    import torch

    from mtssl.config.validate import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_device(compose_config(["train.device=cpu"]))
    with pytest.raises(ConfigError) as info:
        check_device(compose_config(["train.device=cuda"]))
    assert "train.device:" in str(info.value) and "train.device=cpu" in str(info.value)


def test_a_data_folder_of_unreadable_images_is_refused(tmp_path):
    """A few bad files are skipped and counted while training (tests/test_robustness.py); a folder where none
    of a sample decodes is refused before anything runs."""
    root = make_image_folder(tmp_path / "data", per_class=12)
    for path in (root / "train").rglob("*.jpg"):
        path.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"data.root: none of 8 sampled images decodes .* in .*train"):
        check([f"data.root={root}", "train.batch_size=4", "data.subset=null"])
    first = sorted((root / "train" / "class_0").glob("*.jpg"))[0]  # the first file of the split: in the sample
    first.write_bytes((root / "val" / "class_0" / "0.jpg").read_bytes())
    check([f"data.root={root}", "train.batch_size=4", "data.subset=null"])  # one good file in the sample: accepted


def test_missing_default_root_without_network_says_what_to_do(tmp_path, monkeypatch):
    """Validation never downloads; the job's data step does, and says what to do when it cannot."""
    import urllib.error

    import mtssl.data.cifar10
    from mtssl.data.cifar10 import prepare_data
    from mtssl.data.image_folder import DataError

    attempts = []

    def offline(root):
        attempts.append(root)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(mtssl.data.cifar10, "download_cifar10", offline)
    cfg = resolve_config(compose_config([f"data.root={tmp_path / 'cifar10'}"]))
    validate_config(cfg)  # no network I/O: the absent folder is left to the data step
    assert attempts == []
    with pytest.raises(DataError) as info:
        prepare_data(cfg)
    message = str(info.value)
    assert "data.root:" in message and "downloading CIFAR-10 there failed" in message
    assert "MTSSL_DATA_ROOT" in message and "data.download=false" in message
    assert len(attempts) == 1


def test_default_data_root_does_not_depend_on_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MTSSL_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    root = resolve_config(compose_config([])).data.root
    assert root == str((REPO.parent / "shared" / "data" / "cifar10").resolve()) or \
        root == os.path.abspath(str(REPO / ".." / "shared" / "data" / "cifar10"))


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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_a_gpu_exits_2_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mtssl.run", "train.device=cuda", f"out_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.device: cuda was asked for" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_cli_out_dir_that_cannot_be_created_exits_2_before_writing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "mtssl.run", f"out_dir={blocker / 'run'}", "train.epochs=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "out_dir:" in proc.stderr and "is a file" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr

def test_config_changes_name_training_fields_only():
    from mtssl.config import ABSENT, config_changes, config_hash, format_changes

    old = {"method": {"name": "byol", "projector": {"hidden_dims": [64]}}, "train": {"seed": 0, "epochs": 3,
           "log_every_steps": 1}, "eval": {"knn_k": [3, 5]}, "out_dir": "a", "hydra": {"x": 1}}
    new = {"method": {"name": "simsiam", "projector": {"hidden_dims": [64, 64]}, "extra": True},
           "train": {"seed": 0, "log_every_steps": 10}, "eval": {"knn_k": [3]}, "out_dir": "b"}
    changes = config_changes(old, new)
    assert changes == [("method.name", "byol", "simsiam"), ("method.projector.hidden_dims", [64], [64, 64]),
                       ("method.extra", ABSENT, True), ("train.epochs", 3, ABSENT)]
    # A changed preset is one entry with the count of the fields it brings; fields set on their own stay listed.
    assert format_changes(changes) == "method.name: byol → simsiam (+2 fields of the preset), train.epochs: 3 → (absent)"
    assert format_changes(changes, limit=1) == "method.name: byol → simsiam (+2 fields of the preset), ... and 1 more"
    assert format_changes(changes[1:2]) == "method.projector.hidden_dims: [64] → [64, 64]"
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


def test_regime_sets_its_values_and_the_command_line_wins(tiny_folder):
    """regime=cpu replaces config.yaml's and the presets' values, its per-method part applies to its method
    only, its ResNet part to ResNets only, and an explicit override still wins over all of them."""
    official = compose_config(["method=mocov3"])
    cpu = compose_config(["regime=cpu", "method=mocov3"])
    assert (official.train.epochs, official.method.objective_kwargs.temperature) == (100, 1.0)
    assert (cpu.train.epochs, cpu.train.batch_size, cpu.data.subset) == (20, 128, 2500)
    assert (cpu.method.objective_kwargs.temperature, cpu.train.ema_tau) == (0.2, 0.99)
    assert compose_config(["regime=cpu", "method=byol"]).train.ema_tau == 0.9
    assert "temperature" not in compose_config(["regime=cpu", "method=byol"]).method.objective_kwargs
    assert cpu.backbone.zero_init_last is True and official.backbone.zero_init_last is False
    assert compose_config(["regime=cpu", "backbone=vit_small"]).backbone.zero_init_last is None  # ResNets only
    mine = compose_config(["regime=cpu", "method=mocov3", "train.epochs=3", "method.objective_kwargs.temperature=0.5",
                           "optim.base_lr=0.1"])
    assert (mine.train.epochs, mine.method.objective_kwargs.temperature, mine.optim.base_lr) == (3, 0.5, 0.1)
    for method in available("method"):
        cfg = compose_config(["regime=cpu", f"method={method}", f"data.root={tiny_folder}", "train.batch_size=4",
                              "data.subset=null", "eval.val_subset=null", "eval.knn_k=[5]"])  # a 16-image bank
        validate_config(resolve_config(cfg))


def test_a_regime_inherits_its_parent_with_the_parents_parts():
    """cpu_quick is cpu with 16 epochs: cpu's values and its method and ResNet parts, its own values on top;
    imagenet_800ep is imagenet_200ep with 800 epochs and 4 local views."""
    for method in available("method"):
        cpu = resolve_config(compose_config(["regime=cpu", f"method={method}"]))
        quick = resolve_config(compose_config(["regime=cpu_quick", f"method={method}"]))
        assert (quick.train.epochs, quick.train.device, quick.monitor.interference_every) == (16, "cpu", 20)
        assert (cpu.train.epochs, cpu.monitor.interference_every) == (20, None)
        for section in ("optim", "method", "backbone", "data", "views"):
            assert quick[section] == cpu[section], (method, section)
        assert quick.train.ema_tau == cpu.train.ema_tau
    short = resolve_config(compose_config(["regime=imagenet_200ep", "data.root=/x"]))
    long = resolve_config(compose_config(["regime=imagenet_800ep", "data.root=/x"]))
    assert (short.train.epochs, long.train.epochs) == (200, 800)
    assert (short.views.types.local.count, long.views.types.local.count) == (2, 4)
    assert short.optim == long.optim and short.data == long.data and short.backbone == long.backbone


def test_a_regime_cannot_add_a_view_type_the_views_preset_lacks():
    """imagenet_800ep sets views.types.local.count=4; with views=global that would add a local task of default
    views: refused, naming the field, instead."""
    with pytest.raises(ConfigError, match=r"views.types.local: views=global has no local views"):
        resolve_config(compose_config(["regime=imagenet_800ep", "views=global", "data.root=/x"]))
