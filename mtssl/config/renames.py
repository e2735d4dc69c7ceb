"""Fields and config groups that were renamed or removed: given on a command line, they are refused with a
message naming what replaced them (Hydra alone would answer "Could not override", or compose the old name
into a field nothing reads)."""

from __future__ import annotations

from typing import Sequence

from mtssl.config.errors import ConfigError

# Old key (a field, a section or a config group) -> (its replacement, a note). A key under an old section
# (method.optim.base_lr) is refused with the same replacement path (optim.base_lr).
RENAMED: dict[str, tuple[str, str]] = {
    "train.grouped_views": ("train.view_batching", "false -> none, ghost -> bn_per_view, plain or true -> bn_shared"),
    "eval.knn_every_epochs": ("monitor.knn_every_epochs", "the kNN during training is a monitor"),
    "eval.knn_during_training_val_subset": ("monitor.knn_val_subset", "the kNN during training is a monitor"),
    "eval.knn_during_training_train_subset": ("monitor.knn_train_subset", "the kNN during training is a monitor"),
    "scale": ("regime", "scale=cpu is regime=cpu (mtssl/conf/regime/)"),
    "scale_method": ("regime_method", "chosen by the regime and the method: regime_method/<regime>_<method>.yaml"),
    "scale_backbone": ("regime_family", "chosen by the regime and the backbone family: "
                                        "regime_family/<regime>_<family>.yaml"),
    "method.optim": ("optim", "a method's preset writes its optimiser to optim.* directly"),
    "backbone.optim": ("optim", "the ViT family (backbone_family/vit.yaml) writes its optimiser to optim.* directly"),
    "backbone.ema_tau": ("train.ema_tau", "the backbone family sets train.ema_tau directly"),
}
# The same for the sweep launcher's config (sweeps/conf/).
RENAMED_SWEEP: dict[str, tuple[str, str]] = {
    "profile": ("budget", "sweeps/conf/budget/<name>.yaml: a job regime, seeds and resources"),
    "profile.data_root": ("data.root", "a job key, forwarded to every job (or the IMAGENET_ROOT environment variable)"),
    "profile.epochs": ("train.epochs", "a job key, forwarded to every job"),
    "profile.overrides": ("job_overrides", "or give the job keys bare on the command line"),
}


def _key_of(override: str) -> str:
    """The key an override sets: ``+train.seed=1`` -> ``train.seed``, ``~scale`` -> ``scale``, ``data@x=y`` -> ``data``."""
    key = override.split("=", 1)[0].strip().lstrip("+~")
    return key.split("@", 1)[0]


def renamed_message(key: str, table: dict[str, tuple[str, str]] | None = None) -> str | None:
    """Why ``key`` is not a key any more and what to write instead; None when it was never renamed."""
    table = RENAMED if table is None else table
    for old, (new, note) in sorted(table.items(), key=lambda item: -len(item[0])):  # the longest match first
        if key == old or key.startswith(old + "."):
            replacement = new + key[len(old):]
            return f"{key}: renamed {replacement} ({note}); write {replacement}=... instead"
    return None


def refuse_renamed(overrides: Sequence[str], table: dict[str, tuple[str, str]] | None = None) -> None:
    """Raise ConfigError naming the replacement of the first override that sets an old key."""
    for override in overrides:
        message = renamed_message(_key_of(str(override)), table)
        if message:
            raise ConfigError(message)
