"""Evaluate a backbone that no mtssl job trained (``eval.weights``): the end-of-job kNN and linear protocols on
1..N ranks, into an out_dir that the tables read like a job's (``results.json`` with status ``evaluated``).

    python -m mtssl.eval --weights byol_multitask_resnet50_800ep_ckpt.pth backbone=resnet50 data=imagefolder \
        data.root=/data/imagenet out_dir=runs/mulan-byol-800ep
    python -m mtssl.run eval.weights=timm:resnet50 backbone=resnet50 ... out_dir=...   # the same: a sweep's references

``python -m mtssl.run`` runs this instead of training when ``eval.weights`` is set. The weights are read and
converted by ``mtssl.eval.weights`` (formats detected, mismatched keys refused by name); the results hold, beside
the evaluation fields, where the weights came from: ``weights_source``, ``weights_file_sha256`` (the file's bytes),
``weights_sha256`` (the backbone state dict's, as a job's), ``weights_format`` and ``weights_dropped_keys``. A rerun
with other eval settings merges into the results, as ``python -m mtssl.eval <out_dir>`` does; an out_dir holding
a trained job, or the evaluation of other weights, is refused.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtssl.config.errors import ConfigError
from mtssl.distributed.process_group import DistEnv
from mtssl.eval.end_of_training import EvaluationInterrupted, evaluate_states, merge_evaluation
from mtssl.eval.weights import check_weights_source, load_backbone_weights
from mtssl.job_folder import CONFIG, JobStatus, Results, job_state, write_results
from mtssl.model.siamese import backbone_kwargs, build_backbone
from mtssl.utils.exit_codes import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from mtssl.utils.git_revision import git_revision

log = logging.getLogger(__name__)


def _previous_evaluation(out_dir: Path) -> Results | None:
    """The results of an earlier evaluation-only run in ``out_dir`` (None: nothing there); ConfigError when it holds
    a trained job."""
    state = job_state(out_dir)
    if state.status in (JobStatus.PENDING, JobStatus.UNFINISHED):
        return None
    if state.results is None or "weights_source" not in state.results:
        raise ConfigError(f"out_dir: {out_dir} holds the results of a trained job (status {state.status}); "
                          f"evaluate the weights into another out_dir=...")
    return state.results if state.status == JobStatus.EVALUATED else None


def evaluate_weights(cfg: DictConfig, env: DistEnv, stop=None) -> Results:
    """Evaluate ``cfg.eval.weights`` on every rank (a collective); rank 0 writes config.yaml and results.json.
    Returns the results. Raises ConfigError on bad weights, EvaluationInterrupted on a stop signal."""
    out_dir = Path(cfg.out_dir)
    start = time.monotonic()
    previous = _previous_evaluation(out_dir)
    check_weights_source(cfg)
    backbone = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))
    weights = load_backbone_weights(str(cfg.eval.weights), backbone, cfg.backbone.timm_name, cfg.eval.weights_branch)
    del backbone
    if previous is not None and previous.get("weights_file_sha256") != weights.file_sha256:
        raise ConfigError(f"out_dir: {out_dir} holds the evaluation of other weights ({previous.get('weights_source')}, "
                          f"sha256 {str(previous.get('weights_file_sha256'))[:12]}); use another out_dir=...")
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG).write_text(OmegaConf.to_yaml(cfg))
    fields = evaluate_states(cfg, env, weights.state_dict, None, None, out_dir, stop)

    results: Results = {
        "status": JobStatus.EVALUATED.value, "backbone": cfg.backbone.name, "data": cfg.data.name,
        "seed": cfg.train.seed, "world_size": env.world_size, "git_revision": git_revision(),
        "weights_source": weights.source, "weights_file_sha256": weights.file_sha256,
        "weights_format": weights.format, "weights_branch": cfg.eval.weights_branch,
        "weights_dropped_keys": weights.dropped_keys, **fields,
        "eval_time_s": time.monotonic() - start, "eval_config": OmegaConf.to_container(cfg.eval, resolve=True),
    }
    results["wall_time_s"] = results["eval_time_s"]
    if previous is not None:
        results = merge_evaluation(previous, results)
    if env.is_main:
        write_results(out_dir, results)
        log.info("evaluated %s: kNN top-1 %.2f, linear top-1 %.2f -> %s", weights.source, results["knn_top1"],
                 results["linear_top1"], out_dir)
    return results


def run_evaluation_only(cfg: DictConfig, env: DistEnv, stop=None) -> int:
    """``python -m mtssl.run`` with ``eval.weights`` (validated): evaluate, return mtssl.run's exit code (0 done,
    2 bad weights or out_dir, 3 stopped on a signal: rerun to resume, 1 failed, recorded in results.json).
    ``stop``: the caller's StopRequest; by default one is installed here for the evaluation."""
    from mtssl.distributed.preemption import StopRequest

    own_stop = stop is None
    stop = StopRequest() if own_stop else stop
    try:
        evaluate_weights(cfg, env, stop)
        return EXIT_OK
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_CONFIG
    except EvaluationInterrupted as interrupt:
        log.warning("%s; rerun the same command to resume", interrupt)
        return EXIT_INTERRUPTED
    except Exception as error:
        log.exception("evaluation failed")
        if env.is_main:
            write_results(cfg.out_dir, {"status": JobStatus.FAILED.value, "error": f"{type(error).__name__}: {error}",
                                        "backbone": cfg.backbone.name, "data": cfg.data.name,
                                        "weights_source": str(cfg.eval.weights)})
        return EXIT_FAILED
    finally:
        if own_stop:
            stop.restore()
