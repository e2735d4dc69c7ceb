"""Regimes: every (regime x method x backbone family) trains with the optimiser, peak learning rate, batch and
schedule of its recipe, written out below from the recipes (../shared/reference/official-recipe.md for the
official and GPU regimes, the README quick start's measured CPU settings for cpu and cpu_quick), never taken
from mtssl. Then the precedence rule's shape (the defaults list and what each group may set), and the
command-line views of a recipe (--show-recipe, --cfg job) and of an old field name.
"""

from __future__ import annotations


import pytest
import yaml
from omegaconf import OmegaConf

from mtssl.config import available, compose_config, describe_recipe, resolve_config
from mtssl.config.compose import CONFIG_DIR, SOURCE_GROUPS
from mtssl.config.schema import check_fields

METHODS = ("byol", "simsiam", "mocov3")
FAMILIES = {"resnet": None, "vit": "vit_small"}  # None: the regime's own backbone (resnet18, or resnet50 on ImageNet)
# Plausible peak learning rates per optimiser: an lr of another optimiser's recipe lands outside (AdamW at a LARS
# lr of 0.5 was the measured bug of the CPU regime).
PEAK_RANGE = {"lars": (0.1, 5.0), "sgd": (0.01, 0.5), "adamw": (1e-5, 5e-3)}
EPOCHS = {"official": 100, "cpu": 20, "cpu_quick": 16, "cifar10_gpu": 400, "imagenet_200ep": 200, "imagenet_800ep": 800}

# (regime, method, family): optimiser, peak lr (base lr x batch / 256, by hand), global batch, warmup epochs,
# schedule_per, final lr ratio. Official: LARS base 0.4 (BYOL, MoCo v3), SGD base 0.05 per epoch without warmup
# (SimSiam), AdamW base 3e-4 with clip 0.5 (any method on ViT-S/B); cosine to 0.001 x peak for all; the
# official global batch 1024 (SimSiam 512) on ImageNet. CPU (README quick start): every method on a ResNet with
# the LARS recipe at peak 0.5 (base 1.0, batch 128); a ViT keeps AdamW at its recipe's base lr.
LARS, SGD, ADAMW = ("lars", 10, "step", 0.001), ("sgd", 0, "epoch", 0.001), ("adamw", 10, "step", 0.001)
TABLE = {
    **{("official", m, "resnet"): (SGD, 0.05, 256) if m == "simsiam" else (LARS, 0.4, 256) for m in METHODS},
    **{("official", m, "vit"): (ADAMW, 3e-4, 256) for m in METHODS},
    **{(r, m, "resnet"): (LARS, 0.5, 128) for r in ("cpu", "cpu_quick") for m in METHODS},
    **{(r, m, "vit"): (ADAMW, 1.5e-4, 128) for r in ("cpu", "cpu_quick") for m in METHODS},
    **{("cifar10_gpu", m, "resnet"): (SGD, 0.05, 256) if m == "simsiam" else (LARS, 0.4, 256) for m in METHODS},
    **{("cifar10_gpu", m, "vit"): (ADAMW, 3e-4, 256) for m in METHODS},
    **{(r, "byol", "resnet"): (LARS, 1.6, 1024) for r in ("imagenet_200ep", "imagenet_800ep")},
    **{(r, "mocov3", "resnet"): (LARS, 1.6, 1024) for r in ("imagenet_200ep", "imagenet_800ep")},
    **{(r, "simsiam", "resnet"): (SGD, 0.1, 512) for r in ("imagenet_200ep", "imagenet_800ep")},
    **{(r, m, "vit"): (ADAMW, 1.2e-3, 1024) for r in ("imagenet_200ep", "imagenet_800ep") for m in ("byol", "mocov3")},
    **{(r, "simsiam", "vit"): (ADAMW, 6e-4, 512) for r in ("imagenet_200ep", "imagenet_800ep")},
}


def test_the_table_covers_every_regime_method_and_family():
    assert {r for r, _, _ in TABLE} == set(available("regime")) == set(EPOCHS)
    assert {m for _, m, _ in TABLE} == set(available("method")) and {f for _, _, f in TABLE} == set(available("backbone_family"))
    assert len(TABLE) == len(EPOCHS) * len(METHODS) * len(FAMILIES)


def job(regime: str, method: str, family: str):
    overrides = [f"regime={regime}", f"method={method}", "data.root=/unused/imagenet"]
    if FAMILIES[family]:
        overrides.append(f"backbone={FAMILIES[family]}")
    cfg = resolve_config(compose_config(overrides))
    check_fields(cfg)
    return cfg


@pytest.mark.parametrize("regime", sorted(EPOCHS))
def test_each_regime_trains_every_method_and_family_with_its_recipe(regime):
    for method in METHODS:
        for family in FAMILIES:
            (name, warmup, per, final), peak, batch = TABLE[regime, method, family]
            cfg, cell = job(regime, method, family), (regime, method, family)
            o = cfg.optim
            assert (cfg.backbone.family, cfg.method.name) == (family, method), cell
            assert o.name == name, cell
            assert cfg.train.batch_size == batch and cfg.train.epochs == EPOCHS[regime], cell
            got = o.base_lr * cfg.train.batch_size / 256
            assert got == pytest.approx(peak, rel=1e-9), (cell, got)
            low, high = PEAK_RANGE[o.name]
            assert low <= got <= high, (cell, got)
            assert (o.warmup_epochs, o.schedule_per, o.final_lr_ratio) == (warmup, per, pytest.approx(final)), cell
            assert o.clip_grad == (0.5 if name == "adamw" else None), cell


# ---------------------------------------------------------------------------------------------------------------
# The precedence rule's shape

def test_the_defaults_list_applies_the_groups_in_the_order_of_the_rule():
    """config.yaml's defaults list is the rule (mtssl/config/__init__.py): the groups in SOURCE_GROUPS' order,
    config.yaml's own values first (lowest), the backbone family inside the backbone preset, before it."""
    entries = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["defaults"]
    groups = [e if isinstance(e, str) else next(iter(e)) for e in entries]
    groups = [g.removeprefix("optional ") for g in groups if not g.startswith("override ")]
    assert groups == ["_self_", *(g for g in SOURCE_GROUPS if "@" not in g)]
    for preset in available("backbone"):
        defaults = yaml.safe_load((CONFIG_DIR / "backbone" / f"{preset}.yaml").read_text())["defaults"]
        assert defaults[-1] == "_self_" and next(iter(defaults[0])) == "/backbone_family@_global_", preset


# What a group's files may set (their top-level sections): the rule's layers touch their own fields, so the
# order between data, views, predictor and method never decides a value. Regimes may set anything.
ALLOWED = {"method": {"method", "optim"}, "backbone_family": {"backbone", "optim", "train"},
           "data": None, "views": None, "predictor": None, "backbone": None}  # None: Hydra's package is the group


@pytest.mark.parametrize("group", sorted(ALLOWED))
def test_each_group_sets_only_its_own_fields(group):
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        text = path.read_text()
        keys = set(yaml.safe_load(text) or {}) - {"defaults"}
        if ALLOWED[group] is None:
            assert "@package" not in text, path  # packaged under the group's own name
        else:
            assert text.startswith("# @package _global_") and keys <= ALLOWED[group], (path, keys)
            if group == "backbone_family":
                assert set(yaml.safe_load(text).get("train", {})) <= {"ema_tau"}, path


# ---------------------------------------------------------------------------------------------------------------
# The command line

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m mtssl.run *args``, run in this process: its front
    (``mtssl.run.main``) answers these flags and bad names before Hydra or a job starts."""
    from mtssl.run import main

    with pytest.raises(SystemExit) as stop:
        main(["mtssl.run", *args])
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_show_recipe_prints_the_recipe_and_its_files_and_writes_nothing(tmp_path, capsys):
    overrides = ["regime=cpu", "backbone=vit_small", "method=mocov3"]
    code, out, err = run_cli(capsys, *overrides, f"out_dir={tmp_path / 'never'}", "--show-recipe")
    assert code == 0, err
    header, recipe = out.splitlines()
    assert recipe == describe_recipe(resolve_config(compose_config(overrides)))  # what a sweep's --dry-run prints
    assert "adamw base lr 0.0003 (peak 0.00015)" in recipe and "clip 0.5" in recipe
    assert header.endswith("config.yaml, method/mocov3.yaml, views/global_local_cutout.yaml, predictor/separate.yaml, "
                           "data/cifar10.yaml, backbone_family/vit.yaml, backbone/vit_small.yaml, regime/cpu.yaml, "
                           "regime_method/cpu_mocov3.yaml")  # no cpu_vit part: the ViT keeps its family's optimiser
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_the_effective_config_without_unset_values(tmp_path, capsys):
    overrides = ["regime=cpu_quick", "backbone=vit_small", f"out_dir={tmp_path / 'never'}"]
    code, out, err = run_cli(capsys, *overrides, "--cfg", "job")
    assert code == 0, err
    printed = OmegaConf.create(out)
    assert printed == resolve_config(compose_config(overrides))  # what run_job writes to out_dir/config.yaml
    assert "???" not in out and "${" not in out
    assert (printed.optim.name, printed.optim.base_lr, printed.train.ema_tau) == ("adamw", 3e-4, 0.9)
    assert printed.train.precision == "fp32" and printed.views.types["local"].blur_kernel == 23
    assert list(tmp_path.iterdir()) == []


def test_an_old_field_name_on_the_command_line_names_the_new_one(tmp_path, capsys):
    code, out, err = run_cli(capsys, "scale=cpu", "train.grouped_views=ghost", f"out_dir={tmp_path / 'never'}")
    assert code == 2 and "scale: renamed regime" in err and out == ""
    assert list(tmp_path.iterdir()) == []
