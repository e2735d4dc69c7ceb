"""Weight files: reading them with a clear error, and backbones that no mtssl job trained, converted to ours.

``load_backbone_weights(source, backbone, architecture, branch)`` returns the state dict of an mtssl backbone (``build_backbone``:
a timm model without classifier, ``num_classes=0``) from one of the ``FORMATS``, detected from the file's
structure, never guessed:

    mtssl_export   an mtssl job's ``backbone.pth``: ``{"backbone", "state_dict", "target_state_dict"}``; ``branch``
                   picks the online or the EMA-target backbone
    checkpoint     a full training checkpoint: the network under ``online_model`` (``target_model`` for
                   ``branch=target``), ``state_dict`` or ``model``, keys with ``module.`` (DDP) and ``backbone.``
                   prefixes; the parts besides the backbone (projector, predictors) are left out
    state_dict     a plain backbone state dict: the MULAN release's files (``*_ckpt.pth``; ``*_tgt_ckpt.pth`` hold
                   the EMA target), timm's and torchvision's weights (with their classifier head, left out)

Key naming: timm's ResNets name their layers as torchvision's do (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
classifier ``fc``), and timm's ViTs as the ViT releases do (classifier ``head``), so no key is renamed: the
converter only strips the prefixes above and the classifier head (the model's ``pretrained_cfg["classifier"]``).
Every other difference is an error naming the keys: missing keys, unexpected keys, shapes that differ (another
architecture, or the 32 px stem of ``data.small_images=true`` against an ImageNet stem). Only BatchNorm's
``num_batches_tracked`` counters, which evaluation never reads, may be missing.

A source is a file path, or ``timm:<name>`` for timm's pretrained weights of ``<name>`` found locally, in the
Hugging Face hub cache or torch hub's checkpoint folder (``find_timm_weights``; nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mtssl.config.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("mtssl_export", "checkpoint", "state_dict")
BRANCHES = ("online", "target")  # eval.weights_branch
TIMM_PREFIX = "timm:"
# Entries of a full checkpoint that hold the network, by branch, in the order they are looked for.
CHECKPOINT_ENTRIES = {"online": ("online_model", "state_dict", "model"), "target": ("target_model",)}
STRIPPED_PREFIXES = ("module.", "backbone.")
# Files of a timm model's weights in its Hugging Face hub repository, in timm's order of preference.
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_LISTED_KEYS = 8


@dataclass
class BackboneWeights:
    """A backbone state dict read from a weights source, and where and how it was found."""

    state_dict: dict[str, torch.Tensor]
    source: str  # the path, or timm:<name>
    file: Path  # the file read
    file_sha256: str
    format: str  # one of FORMATS
    dropped_keys: list[str] = field(default_factory=list)  # the classifier head, the parts besides the backbone


def load_torch_file(path: str | Path, fix: str) -> object:
    """``torch.load`` of a weights file (CPU, tensors only); ConfigError naming the file and ``fix`` when it is
    missing, truncated or not a torch file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise ConfigError(f"{path} ({path.stat().st_size} bytes) cannot be read as a torch file: it is truncated "
                              f"or not a checkpoint ({error}); {fix}") from error
        # Python objects besides tensors (an argparse Namespace, an optimiser's class): never unpickled here.
        raise ConfigError(f"{path} holds Python objects besides tensors, which are not unpickled (that could run "
                          f"code from the file); if you trust it, save the network's tensors once: "
                          f"torch.save(torch.load(FILE, weights_only=False)['<entry>'], 'backbone.pth'), then "
                          f"evaluate that file ({str(error).splitlines()[0][:200]})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        size = path.stat().st_size
        raise ConfigError(f"{path} ({size} bytes) cannot be read as a torch file: it is truncated (an interrupted "
                          f"copy or write?) or not a checkpoint ({type(error).__name__}: {str(error)[:200]}); "
                          f"{fix}") from error


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def find_timm_weights(name: str, hub_cache: str | Path | None = None, torch_hub_dir: str | Path | None = None) -> Path:
    """The local file of timm's pretrained weights of ``name`` (``resnet50`` or ``resnet50.a1_in1k``): in the
    Hugging Face hub cache (``hub_cache``, default huggingface_hub's) or torch hub's ``checkpoints`` folder
    (``torch_hub_dir``, default ``torch.hub.get_dir()``). ConfigError saying how to fetch them when absent."""
    import timm
    from timm.models import get_pretrained_cfg

    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        raise ConfigError(f"eval.weights: {TIMM_PREFIX}{name}: {architecture!r} is not a timm model "
                          f"(timm.list_models() lists them)")
    try:
        pretrained = get_pretrained_cfg(name, allow_unregistered=False)
    except (RuntimeError, ValueError, KeyError):  # an unknown tag
        pretrained = None
    if pretrained is None:
        raise ConfigError(f"eval.weights: {TIMM_PREFIX}{name}: timm has no pretrained weights of that name "
                          f"(timm.list_pretrained('{architecture}*') lists them)")
    looked: list[str] = []
    if pretrained.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = Path(hub_cache or HF_HUB_CACHE)
        repo = pretrained.hf_hub_id.split("@", 1)[0]
        for filename in ((pretrained.hf_hub_filename,) if pretrained.hf_hub_filename else TIMM_HUB_FILES):
            found = try_to_load_from_cache(repo, filename, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"{repo} in {cache}")
    if pretrained.url:
        candidate = Path(torch_hub_dir or torch.hub.get_dir()) / "checkpoints" / os.path.basename(pretrained.url)
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise ConfigError(f"eval.weights: {TIMM_PREFIX}{name}: no local copy of timm's pretrained weights (looked for "
                      f"{'; '.join(looked) or 'nothing: no hub id or url'}); on a machine with network run "
                      f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" to fill the cache "
                      f"(HF_HOME or TORCH_HOME point at it), or pass the file: eval.weights=/path/to/weights")


def check_weights_source(cfg) -> None:
    """What validate_config checks of ``eval.weights`` before anything runs: the file exists, or timm's weights
    are found locally and ``backbone.name`` is their architecture. The file itself is read by the job."""
    source = str(cfg.eval.weights)
    if source.startswith(TIMM_PREFIX):
        name = source[len(TIMM_PREFIX):]
        architecture = name.split(".", 1)[0]
        if cfg.backbone.timm_name.split(".", 1)[0] != architecture:
            raise ConfigError(f"eval.weights: {source} holds a {architecture}, but backbone.name is "
                              f"{cfg.backbone.timm_name}; set backbone.name={architecture} (or its preset, "
                              f"backbone=<name>)")
        find_timm_weights(name)
    elif not Path(source).expanduser().is_file():
        raise ConfigError(f"eval.weights: {source}: no such file; give a backbone file or timm:<name> "
                          f"(docs/evaluation.md, \"Evaluate weights from elsewhere\")")


def _read_source(source: str) -> tuple[object, Path]:
    if source.startswith(TIMM_PREFIX):
        path = find_timm_weights(source[len(TIMM_PREFIX):])
    else:
        path = Path(source).expanduser()
    fix = "check eval.weights (or --weights): a backbone file or timm:<name> (docs/evaluation.md)"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path), path
        except (SafetensorError, OSError, ValueError) as error:
            if not path.is_file():
                raise ConfigError(f"{path}: no such file; {fix}") from error
            raise ConfigError(f"{path} ({path.stat().st_size} bytes) cannot be read as a safetensors file: it is "
                              f"truncated or not a weights file ({error}); {fix}") from error
    return load_torch_file(path, fix), path


def _is_state_dict(entry: object) -> bool:
    return isinstance(entry, dict) and bool(entry) and all(isinstance(v, torch.Tensor) for v in entry.values())


def _detect(raw: object, branch: str, path: Path) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """(format, the network's state dict, the entry that holds it) of a loaded file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a state dict or a checkpoint (a dict); "
                          f"save the backbone's state_dict()")
    if isinstance(raw.get("backbone"), str) and _is_state_dict(raw.get("state_dict")):
        key = "state_dict" if branch == "online" else "target_state_dict"
        if not _is_state_dict(raw.get(key)):
            raise ConfigError(f"{path} is an mtssl backbone export without an EMA target (SimSiam: its target is "
                              f"the online network); use eval.weights_branch=online")
        return "mtssl_export", raw[key], key
    if _is_state_dict(raw):
        if branch == "target":
            raise ConfigError(f"{path} is a plain state dict of one network, with no EMA target entry; use "
                              f"eval.weights_branch=online (a MULAN *_tgt_ckpt.pth file is the target itself)")
        return "state_dict", raw, None
    for entry in CHECKPOINT_ENTRIES[branch]:
        if _is_state_dict(raw.get(entry)):
            return "checkpoint", raw[entry], entry
    entries = ", ".join(CHECKPOINT_ENTRIES[branch])
    raise ConfigError(f"{path}: no backbone found: a checkpoint with the network under {entries} (eval.weights_branch="
                      f"{branch}), an mtssl backbone.pth or a plain state dict was expected; its top-level keys are "
                      f"{_listed(sorted(map(str, raw)))}")


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys without ``module.`` and, when some keys are under ``backbone.``, only those, unprefixed (the others,
    a projector and predictors, are returned as dropped)."""
    dropped: list[str] = []
    for prefix in STRIPPED_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            dropped += [k for k in state if not k.startswith(prefix)]
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state, dropped


def convert_state_dict(state: dict[str, torch.Tensor], backbone: nn.Module, architecture: str,
                       what: str) -> tuple[dict, list[str]]:
    """``state`` as a state dict of ``backbone`` (the mtssl backbone of timm model ``architecture``) and the groups of
    keys left out (``fc.*``); ConfigError naming the keys when it is not the same architecture (missing or
    unexpected keys beyond the classifier head, other shapes). ``what`` names the weights in messages."""
    state, dropped = _strip_prefixes(dict(state))
    expected = backbone.state_dict()
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    heads = [k for k in state if k not in expected and k.split(".", 1)[0] == classifier.split(".", 1)[0]]
    dropped += heads
    state = {k: v for k, v in state.items() if k not in heads}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in set(state) & set(expected)
                    if state[k].shape != expected[k].shape)
    if unexpected or missing or shapes:
        problems = [f"{len(missing)} missing keys: {_listed(missing)}"] if missing else []
        problems += [f"{len(unexpected)} unexpected keys: {_listed(unexpected)}"] if unexpected else []
        problems += [f"{len(shapes)} keys of another shape: {_listed(shapes)}"] if shapes else []
        stem = any(k.startswith("conv1.") for k in shapes)
        raise ConfigError(
            f"{what} does not hold a {architecture} backbone: "
            + "; ".join(problems) + ". Set backbone=<preset> or backbone.name=<timm name> to the architecture the "
            "file holds" + (", and data.small_images to the stem it was trained with (false: the ImageNet 7x7 "
                            "stem)" if stem else ""))
    for key in set(expected) - set(state):  # num_batches_tracked: never read in eval mode
        state[key] = expected[key]
    return state, _groups(dropped)


def _groups(keys: list[str]) -> list[str]:
    """Key names collapsed to their first component: ``fc.weight``, ``fc.bias`` -> ``fc.*``."""
    return sorted({f"{k.split('.', 1)[0]}.*" if "." in k else k for k in keys})


def load_backbone_weights(source: str, backbone: nn.Module, architecture: str,
                          branch: str = "online") -> BackboneWeights:
    """The weights of ``source`` (a file or ``timm:<name>``) as a state dict of ``backbone``; ConfigError when they
    cannot be read or are not of its architecture (the module docstring lists what is accepted)."""
    if branch not in BRANCHES:
        raise ConfigError(f"eval.weights_branch: unknown value {branch!r}; valid values are {list(BRANCHES)}")
    raw, path = _read_source(source)
    fmt, state, entry = _detect(raw, branch, path)
    what = f"{source} ({fmt}{f', entry {entry!r}' if entry else ''})"
    state, dropped = convert_state_dict(state, backbone, architecture, what)
    weights = BackboneWeights(state, source, path, file_sha256(path), fmt, dropped)
    log.info("weights %s: %d tensors%s", what, len(state),
             f"; left out: {_listed(weights.dropped_keys)}" if weights.dropped_keys else "")
    return weights
