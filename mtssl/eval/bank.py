"""The kNN banks: which train images the evaluation (and the kNN during training) compare val images with, and the
check that ``eval.knn_k`` fits them, run by the config validation before anything is trained."""

from __future__ import annotations

from omegaconf import DictConfig

from mtssl.config.errors import ConfigError
from mtssl.data.image_folder import class_balanced_subset
from mtssl.eval.knn import headline_k


def bank_samples(cfg: DictConfig, all_train: list) -> list:
    """The end-of-training evaluation's train images: ``eval.train_subset`` of the train split when set, else the
    pretraining images (``data.subset`` of it, or all of it)."""
    subset = cfg.eval.train_subset if cfg.eval.train_subset is not None else cfg.data.subset
    return all_train if subset is None else class_balanced_subset(all_train, subset, cfg.data.subset_seed)


def monitor_bank_size(cfg: DictConfig, bank_size: int) -> int:
    """Images of the kNN bank during training (``monitor.knn_train_subset`` of the evaluation's bank)."""
    subset = cfg.monitor.knn_train_subset
    return bank_size if subset is None else min(subset, bank_size)


def check_knn_k(cfg: DictConfig, all_train: list) -> None:
    """Raise ConfigError when a k of ``eval.knn_k`` exceeds a kNN bank: the evaluation's and, with
    ``monitor.knn_every_epochs``, the one during training. ``all_train``: the samples of the train split."""
    largest = max(cfg.eval.knn_k)
    bank = len(bank_samples(cfg, all_train))
    banks = [(bank, "the end-of-training kNN bank (the train images after "
                    + ("eval.train_subset" if cfg.eval.train_subset is not None else "data.subset") + ")",
              "eval.train_subset" if cfg.eval.train_subset is not None else "data.subset")]
    if cfg.monitor.knn_every_epochs:
        banks.append((monitor_bank_size(cfg, bank), "the kNN bank during training (monitor.knn_train_subset)",
                      "monitor.knn_train_subset"))
    for size, what, field in banks:
        if largest > size:
            raise ConfigError(f"eval.knn_k: k={largest} exceeds the {size} images of {what}; use ks of at most "
                              f"{size} (e.g. eval.knn_k=[{headline_k(size)}]) or raise {field}")
