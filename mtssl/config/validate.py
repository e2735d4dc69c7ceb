"""Cross-field validation: what a job needs beyond each field's own check, before anything runs.

``validate_config`` checks every field (``mtssl.config.schema``), then what spans fields (views, batch per
rank, the backbone name in timm, the optimiser), the output directory, and with ``check_data`` the data
folder. It raises ``ConfigError`` with one message naming the field and the fix, so a bad override fails
at launch instead of an hour into a cluster job. It reads the filesystem but never the network: fetching
CIFAR-10 is a data step of the job (``mtssl.data.cifar10.prepare_data``).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtssl.config.compose import available
from mtssl.config.errors import ConfigError
from mtssl.config.schema import check_fields
from mtssl.data.views import TARGET_VIEW_TYPE, build_view_layout


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig, check_data: bool = True, world_size: int = 1) -> None:
    """Raise ConfigError for the first problem found; return None when the job can run.

    Every field's type and range first (``check_fields``), then what spans fields (views, batch per rank,
    the backbone name in timm), the output directory, and with ``check_data`` the data folder.
    """
    check_fields(cfg)
    _validate_backbone(cfg)
    _validate_views(cfg)
    _validate_optim(cfg)
    train = cfg.train
    _require(
        not (train.activation_checkpointing and train.compile),
        "train.activation_checkpointing: not supported with train.compile=true yet (the recomputation's BatchNorm "
        "handling is eager-only); set one of them to false",
    )
    if train.backward == "per_view":
        from mtssl.loss.objectives import build_objective  # deferred, as in describe_recipe

        _require(build_objective(cfg.method).ema_target, f"train.backward=per_view: {cfg.method.name}'s targets are the "
                 "online projections of the global views (no EMA target), which one view at a time does not have; "
                 "use train.backward=joint")
        _require(train.view_batching == "none", f"train.backward=per_view: runs one view per call, so "
                 f"train.view_batching={train.view_batching} cannot batch views; use train.view_batching=none or "
                 f"train.backward=joint")
        _require(not cfg.monitor.interference_every, "monitor.interference_every: the task-interference probe takes "
                 "each task's gradient from the step's joint graph, which train.backward=per_view does not build; "
                 "use train.backward=joint or monitor.interference_every=null")
    _require(
        train.batch_size % world_size == 0,
        f"train.batch_size: {train.batch_size} does not divide across {world_size} ranks; use a multiple of {world_size}",
    )
    _require(
        cfg.eval.augmented_batch_size % world_size == 0,
        f"eval.augmented_batch_size: {cfg.eval.augmented_batch_size} does not divide across {world_size} ranks; "
        f"use a multiple of {world_size}",
    )
    check_out_dir(cfg.out_dir)
    if cfg.eval.get("weights") is not None:  # evaluated only (mtssl.eval.evaluate_weights): the file is there
        from mtssl.eval.weights import check_weights_source

        check_weights_source(cfg)
    if check_data:
        validate_data(cfg)


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Raise ConfigError unless out_dir names a folder of the job's own that exists as a writable folder or can
    be created. Refused: an empty out_dir, a relative one when the current folder no longer exists, and one that
    is the current folder, one of its parents, the home folder or the repository (the job would scatter its
    checkpoints, logs and tb/ among other files). Creating a folder is tried in its nearest existing ancestor (a
    temporary folder, removed at once): permissions alone do not tell, e.g. for root under /proc or on a
    read-only mount."""
    import tempfile

    from mtssl.config.compose import REPO_ROOT

    expanded = os.path.expanduser(str(out_dir))
    try:
        cwd = Path(os.getcwd())
    except FileNotFoundError:  # the current folder was deleted: a relative out_dir is relative to nowhere
        if not os.path.isabs(expanded):
            raise ConfigError(f"out_dir: {str(out_dir)!r} is relative to the current folder, which no longer exists; "
                              f"give an absolute path (out_dir=/path/to/runs/demo) or run from an existing folder")
        cwd = None
    if not str(out_dir).strip():
        raise ConfigError(f"out_dir: {str(out_dir)!r} is empty, so the job would write into the current folder "
                          f"({cwd}); name a folder of its own, e.g. out_dir=runs/demo")
    path = Path(os.path.abspath(expanded))
    shared = {parent: "a parent of the current folder" for parent in (cwd.parents if cwd else ())}
    shared.update({Path.home(): "the home folder", REPO_ROOT: "the mtssl repository"})
    if cwd is not None:
        shared[cwd] = "the current folder"
    if path in shared:
        raise ConfigError(f"out_dir: {out_dir!s} is {shared[path]} ({path}), not a folder of the job's own: its "
                          f"checkpoints, logs and tb/ would land among other files; name a new folder, e.g. "
                          f"out_dir={Path(str(out_dir)) / 'runs' / 'demo'}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir: {path} cannot be created: {existing} is a file; choose another out_dir=...")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mtssl-write-check-", dir=existing))
    except OSError as error:
        raise ConfigError(f"out_dir: {path} cannot be {'written' if existing == path else 'created'}: a folder "
                          f"cannot be created in {existing} ({error.strerror or error}); choose a folder you can "
                          f"write, out_dir=...") from error


def check_device(cfg: DictConfig) -> None:
    """Raise ConfigError when ``train.device`` asks for CUDA on a machine where torch sees no GPU. Checked
    where the job runs (``python -m mtssl.run``), not at sweep launch: a login node may have no GPU."""
    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for, but torch sees no CUDA GPU on this machine "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False); use train.device=cpu "
                          "or train.device=auto, or run the job on a GPU node")


def _validate_backbone(cfg: DictConfig) -> None:
    import timm

    name = cfg.backbone.timm_name
    _require(
        timm.is_model(name),
        f"backbone.name: unknown backbone {name!r}; use a preset {available('backbone')} (backbone=<preset>) "
        f"or any timm model name (backbone.name=<timm name>, see timm.list_models())",
    )
    if cfg.backbone.zero_init_last is not None:
        _require(
            name in timm.list_models(module="resnet"),
            f"backbone.zero_init_last: only timm ResNets take it, not {name!r}; set backbone.zero_init_last=null",
        )


def _validate_views(cfg: DictConfig) -> None:
    """The view set and what spans a view type's fields (each field's type and range is in FIELD_CHECKS)."""
    try:  # unknown view types and fields: the registry's own check (mtssl.data.views)
        layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{error}; presets: {available('views')}") from error
    _require(
        TARGET_VIEW_TYPE in layout.task_names and layout.type(TARGET_VIEW_TYPE).count >= 2,
        f"views.types.{TARGET_VIEW_TYPE}.count: at least 2 global views are needed (they are the targets); "
        f"set views.types.global.count=2",
    )
    for view in layout.types:
        field = f"views.types.{view.name}"
        lo, hi = view.scale
        _require(0 < lo <= hi <= 1,
                 f"{field}.scale: RandomResizedCrop scale must satisfy 0 < min <= max <= 1, got {list(view.scale)}")
        if view.cutout_area is not None:
            a, b = view.cutout_area
            _require(0 < a <= b < 1, f"{field}.cutout_area: need 0 < min <= max < 1, got {list(view.cutout_area)}")
        _require(view.jitter[3] <= 0.5, f"{field}.jitter: [brightness, contrast, saturation, hue] with hue <= 0.5 "
                 f"is needed, got {list(view.jitter)}")
        k = view.blur_kernel_px()
        _require(
            k % 2 == 1 and k // 2 < view.size,
            f"{field}.blur_kernel: an odd number of pixels with half of it below the crop size {view.size} "
            f"is needed, got {k!r}; e.g. {field}.blur_kernel=null (about 10 % of the crop)",
        )
    _require(
        any(view.weight > 0 for view in layout.types),
        "views.types.*.weight: every task weight is 0; at least one task must be trained",
    )


def _validate_optim(cfg: DictConfig) -> None:
    """What spans optimiser fields (each field's own type and range is in FIELD_CHECKS)."""
    optim = cfg.optim
    _require(
        not (optim.weight_decay_1d and optim.name == "lars"),
        "optim.weight_decay_1d: LARS excludes 1-D parameters from weight decay and adaptation; "
        "use optim.weight_decay_1d=false with lars, or optim.name=sgd|adamw",
    )


def validate_data(cfg: DictConfig) -> None:
    """The data folder: it exists with both splits holding the same classes, none of them empty (at least 2),
    ``data.subset`` no larger than the training split, enough images for one batch, and a sample of its images
    decodes. A missing root that ``data.download`` will fetch is left to the job's data
    step (``mtssl.data.cifar10.prepare_data``), which validates it once downloaded."""
    from mtssl.data.image_folder import DataError, class_balanced_subset, list_splits, undecodable_sample

    data = cfg.data
    _require(data.root is not None, "data.root: set the data folder, e.g. data.root=/path/to/imagenet")
    if not Path(data.root).exists() and data.download:
        return
    try:  # both splits, with the same classes and no empty class folder (mtssl.data.image_folder)
        train_samples, val_samples, _ = list_splits(data.root, data.train_split, data.val_split)
    except DataError as error:
        raise ConfigError(str(error)) from error
    all_train = train_samples
    if data.subset is not None:
        _require(
            data.subset <= len(train_samples),
            f"data.subset: {data.subset} training images were asked for, but {Path(data.root) / data.train_split} "
            f"holds {len(train_samples)}; set data.subset={len(train_samples)} or lower, or data.subset=null for "
            f"all of them",
        )
        train_samples = class_balanced_subset(train_samples, data.subset, data.subset_seed)
    _require(
        cfg.train.batch_size <= len(train_samples),
        f"train.batch_size: {cfg.train.batch_size} is larger than the {len(train_samples)} training images "
        f"(data.subset={data.subset}); lower train.batch_size or raise data.subset",
    )
    from mtssl.eval.bank import check_knn_k  # the kNN banks' sizes: the evaluation owns what they hold

    check_knn_k(cfg, all_train)
    for split, samples in ((data.train_split, train_samples), (data.val_split, val_samples)):
        problem = undecodable_sample([path for path, _ in samples])
        _require(problem is None, f"data.root: {problem} in {Path(data.root) / split}; point data.root at a "
                 f"folder of images (JPEG, PNG, ...), <root>/{split}/<class>/<image>")
