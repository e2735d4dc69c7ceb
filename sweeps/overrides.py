"""Split a launch command line into the launcher's overrides and the jobs' overrides.

``python sweeps/launch.py ablation=predictor_sharing data.subset=500 train.epochs=1``: ``ablation`` belongs
to the launcher's config (sweeps/conf/), ``data.subset`` and ``train.epochs`` to the job config (mtssl/conf).
Hydra parses the command line against the launcher's config only, so the job keys are taken out of
``sys.argv`` before ``hydra.main`` runs and forwarded to every job like ``job_overrides``. Overrides are
read with Hydra's own argument parser and override grammar, so quoting and ``+``/``~`` work as in Hydra.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.config import ConfigError
from mtssl.config.renames import RENAMED_SWEEP, renamed_message

LAUNCHER_CONFIG = Path(__file__).resolve().parent / "conf" / "config.yaml"
JOB_CONFIG = "mtssl/conf/config.yaml"
_ABSENT = object()


def dotted_keys(node, prefix: str = "") -> Iterable[str]:
    """Every key of a config, dotted: ``train``, ``train.epochs``, ... (lists are leaves)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            yield path
            yield from dotted_keys(node._get_node(key), path + ".")


@lru_cache(maxsize=1)
def launcher_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(config groups, plain keys) of the launcher's primary config, e.g. ({ablation, ...}, {sweep_dir, ...})."""
    raw = OmegaConf.load(LAUNCHER_CONFIG)
    groups = {"hydra"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            name = str(next(iter(entry)))
            if not name.startswith("override "):
                groups.add(name)
    plain = {key for key in dotted_keys(raw) if key != "defaults" and not key.startswith("hydra")}
    return frozenset(groups), frozenset(plain)


@lru_cache(maxsize=1)
def job_config() -> DictConfig:
    """The default job config, composed as ``python -m mtssl.run`` would (not resolved)."""
    from hydra.core.global_hydra import GlobalHydra

    from mtssl.config import compose_config

    if GlobalHydra.instance().is_initialized():  # never called under hydra.main, but keep its state intact
        raise RuntimeError("job_config() must run before hydra.main")
    return compose_config([])


def _exists(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT


def _unknown(key: str, job_cfg: DictConfig, groups: frozenset[str], plain: frozenset[str]) -> ConfigError:
    candidates = sorted(set(dotted_keys(job_cfg)) | groups | plain)
    nearest = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {nearest[0]}?" if nearest else ""
    return ConfigError(
        f"unknown key {key!r}: it is neither a key of the launcher's config ({LAUNCHER_CONFIG.relative_to(LAUNCHER_CONFIG.parents[2])}, "
        f"groups {sorted(groups - {'hydra'})}) nor of the job config ({JOB_CONFIG}, as composed with its defaults)"
        f"{hint} (python sweeps/launch.py --help lists the launcher's options, python -m mtssl.run --cfg job the job's)"
    )


def split_overrides(overrides: Sequence[str], job_cfg: DictConfig | None = None) -> tuple[list[str], list[str]]:
    """(launcher overrides, job overrides) of a command line's overrides, each in its given order.

    A key whose first part is a launcher group (``ablation``, ``budget``, ``launcher``, ``cluster``, ``hydra``)
    or a launcher key (``sweep_dir``, ``tables.plots``, ...) stays with the launcher; a key of the job config
    (``train.epochs``, ``method=simsiam``; with ``+``/``++``, any key under a job section) goes to the jobs.
    A renamed key raises ConfigError naming its replacement; anything else raises ConfigError naming the key,
    the configs searched and the nearest valid key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups, plain = launcher_keys()
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(str(error)) from error
    plain_tops = {k.split(".", 1)[0] for k in plain}
    launcher, jobs = [], []
    for override in parsed:
        key = override.key_or_group
        top = key.split(".", 1)[0]
        renamed = renamed_message(key, RENAMED_SWEEP) or renamed_message(key)
        if renamed:
            raise ConfigError(renamed)
        if key == "regime":
            raise ConfigError("regime: a sweep's jobs run the regime of its budget (budget=<name>, "
                              "sweeps/conf/budget/); choose a budget, or budget.regime=<regime> to keep its resources")
        if top in groups:
            launcher.append(override.input_line)
            continue
        if top in plain_tops:
            if not (key in plain or override.is_add() or override.is_force_add()):
                raise _unknown(key, job_config() if job_cfg is None else job_cfg, groups, plain)
            launcher.append(override.input_line)
            continue
        job_cfg = job_config() if job_cfg is None else job_cfg
        adds = override.is_add() or override.is_force_add()
        if override.package is None and (_exists(job_cfg, key) or (adds and _exists(job_cfg, top))):
            jobs.append(override.input_line)  # a +new.key is checked against the schema by validate_config
            continue
        if override.package is not None and _exists(job_cfg, top):
            jobs.append(override.input_line)  # a group selected into another package, e.g. data@x=y
            continue
        raise _unknown(key, job_cfg, groups, plain)
    return launcher, jobs

