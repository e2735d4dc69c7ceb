"""Composition and resolution: the job config as Hydra composes it, then with every derived value filled in.

``compose_config`` composes ``mtssl/conf`` with Hydra's compose API, as ``python -m mtssl.run`` does;
``resolve_config`` resolves the interpolations and writes the values the job will use (the precision of
``train.precision=auto``, the absolute data root, every view type's fields), so the resolved config is the
effective one: it is what ``out_dir/config.yaml`` holds and what the run's hash covers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields as dataclass_fields
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.config.errors import ConfigError
from mtssl.config.quoting import check_override_syntax
from mtssl.config.renames import refuse_renamed
from mtssl.data.views import ViewType, build_view_layout

CONFIG_MODULE = "mtssl.conf"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_NAME = "config"  # the root of the job config: mtssl/conf/config.yaml
# The repository root: relative defaults (data.root of data=cifar10) resolve against it, not the cwd.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
if not OmegaConf.has_resolver("mtssl.repo"):
    OmegaConf.register_new_resolver("mtssl.repo", lambda: str(REPO_ROOT))


def available(group: str) -> list[str]:
    """Preset names of a config group, e.g. ``available('method')``."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the job config with Hydra's compose API (as ``python -m mtssl.run`` would); an override of a
    renamed field is refused, naming its replacement (``mtssl.config.renames``), and one whose value Hydra cannot
    read unquoted, showing it quoted (``mtssl.config.quoting``)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    refuse_renamed(overrides)
    check_override_syntax(overrides)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"bad override in {list(overrides)}: {error}") from error


# The config groups of a job in the order config.yaml's defaults list applies them (lowest precedence first).
SOURCE_GROUPS = ("method", "views", "predictor", "data", "backbone_family@_global_", "backbone", "regime",
                 "regime_method", "regime_family")


def recipe_sources(overrides: Sequence[str] = ()) -> list[str]:
    """The files a job config is composed from, lowest precedence first (config.yaml, method/byol.yaml, ...,
    regime/cpu.yaml with the regimes it inherits before it, regime_method/cpu_byol.yaml): what
    ``--show-recipe`` lists. Optional parts a regime does not have are left out."""
    from hydra import compose, initialize_config_module

    refuse_renamed(overrides)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        choices = compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True).hydra.runtime.choices
    sources = [f"{CONFIG_NAME}.yaml"]
    for key in SOURCE_GROUPS:
        group, choice = key.split("@", 1)[0], choices.get(key)
        if choice is None or not (CONFIG_DIR / group / f"{choice}.yaml").exists():
            continue
        if group == "regime":
            sources += [f"regime/{parent}.yaml" for parent in _inherited_regimes(choice)]
        sources.append(f"{group}/{choice}.yaml")
    return sources


def _inherited_regimes(regime: str) -> list[str]:
    """The regimes ``regime`` names in its defaults list (``defaults: [cpu]``), theirs first."""
    parents = []
    for entry in OmegaConf.load(CONFIG_DIR / "regime" / f"{regime}.yaml").get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            parents += _inherited_regimes(entry) + [entry]
    return parents


def resolve_config(cfg: DictConfig) -> DictConfig:
    """The effective config: interpolations resolved, ``train.precision=auto`` decided, the data root made
    absolute and every view type's fields written out. Nothing else is filled in: every recipe value comes
    from composition, by the precedence rule of ``mtssl.config``."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except OmegaConfBaseException as error:  # missing mandatory value, bad interpolation
        raise ConfigError(_omegaconf_message(error)) from error
    if cfg.train.get("precision", "auto") == "auto":
        cfg.train.precision = default_precision(cfg.train.device)
    if cfg.data.root is not None:
        cfg.data.root = os.path.abspath(os.path.expanduser(str(cfg.data.root)))
    _fill_view_types(cfg)
    return cfg


def default_precision(device: str) -> str:
    """``train.precision=auto``: bf16 where the job runs on CUDA (as ``train.device`` selects it), else fp32.

    Resolved before the config is hashed, so the hash names the precision that trained: a bf16
    checkpoint is not resumed in fp32 (set ``train.precision`` explicitly to move a run).
    """
    import torch

    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bf16" if on_cuda else "fp32"


def _fill_view_types(cfg: DictConfig) -> None:
    """Write every view type's effective fields into the config, so config.yaml shows them."""
    types = OmegaConf.to_container(cfg.views.types)
    try:
        layout = build_view_layout(types, dict(cfg.data.view_sizes or {}))
    except (ValueError, TypeError):
        return  # reported by validate_config with the field name
    preset_fields = {f.name for f in dataclass_fields(ViewType)} - {"name"}  # what a views preset gives each type
    for name, fields in types.items():
        if not isinstance(fields, dict) or not preset_fields <= set(fields):
            raise ConfigError(
                f"views.types.{name}: views={cfg.views.name} has no {name} views (its types: "
                f"{sorted(t for t, f in types.items() if isinstance(f, dict) and preset_fields <= set(f))}); only "
                f"{sorted(set(fields or {}))} of them were set, e.g. by a regime (imagenet_800ep sets "
                f"views.types.local.count). Choose views with {name} views (views=<preset>, presets: "
                f"{available('views')}) or another regime")
    for view in layout.types:
        fields = {k: v for k, v in asdict(view).items() if k != "name"}
        cfg.views.types[view.name] = OmegaConf.create(
            {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        )


def describe_recipe(cfg: DictConfig) -> str:
    """One line with the recipe items of a resolved job config (what a sweep's ``--dry-run`` shows per job and
    ``python -m mtssl.run ... --show-recipe`` prints)."""
    from mtssl.loss.objectives import build_objective

    o, m, b = cfg.optim, cfg.method, cfg.backbone
    tau = cfg.train.ema_tau if build_objective(m).ema_target else "- (no EMA)"
    peak = o.base_lr * cfg.train.batch_size / 256
    heads = "-".join(str(d) for d in [*m.projector.hidden_dims, m.projector.out_dim])
    views = ", ".join(
        f"{name} {v.count}x{v.size} w {v.weight:.4g} scale {list(v.scale)} blur k{v.blur_kernel}"
        for name, v in cfg.views.types.items()
    )
    return (
        f"{cfg.train.epochs} ep, batch {cfg.train.batch_size}; {o.name} base lr {o.base_lr:g} (peak {peak:g}), "
        f"wd {o.weight_decay:g} ({'every parameter' if o.weight_decay_1d else 'not 1-D'}), warmup {o.warmup_epochs} ep, "
        f"cosine per {o.schedule_per} to {o.final_lr_ratio:g} x peak, clip {o.clip_grad}; tau0 "
        f"{tau}; projector {heads}; drop-path {b.drop_path_rate:g}; zero_init_last {b.zero_init_last}; views: {views}"
    )


def _omegaconf_message(error: Exception) -> str:
    key = getattr(error, "full_key", None)
    if key:
        hint = " (e.g. data.root=/path/to/imagenet)" if key == "data.root" else ""
        return f"{key}: {error.msg if hasattr(error, 'msg') else error}. Set it on the command line: {key}=...{hint}"
    return str(error)


