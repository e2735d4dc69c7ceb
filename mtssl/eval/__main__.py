"""Re-evaluate a finished job with other eval settings, without retraining.

    python -m mtssl.eval runs/byol-... eval.knn_k=[10,20,50] eval.linear_epochs=100
    torchrun --nproc-per-node 8 -m mtssl.eval runs/byol-... eval.feature_dtype=bf16
    mtssl-eval runs/byol-... eval.knn_k=[10,20,50]   # the same, as the installed command
    python -m mtssl.eval --weights FILE backbone=resnet50 data=imagefolder data.root=... out_dir=...  # other weights

Reads ``out_dir/config.yaml`` and the exported ``out_dir/backbone.pth`` (online and target backbones,
written at the end of training), applies the overrides, evaluates on every rank and merges the
evaluation fields into ``results.json`` (per-k and per-protocol results it did not recompute are kept); training
fields are left as they are. Overrides that would
change what was trained are refused (the fields outside ``NON_TRAINING_FIELDS`` of ``mtssl.config``).
Finished phases are kept in ``eval_state.json``, so an interrupted re-evaluation resumes when rerun.
Under submitit, submit ``reevaluate(out_dir, overrides)``. Exit codes: 0 done, 2 bad arguments, 1 failed.
``--weights`` evaluates a backbone that no mtssl job trained instead (``mtssl.eval.evaluate_weights``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mtssl.config import ConfigError, config_changes, format_changes
from mtssl.config.validate import validate_config
from mtssl.distributed.process_group import destroy_distributed, init_distributed
from mtssl.eval.end_of_training import evaluate_states, merge_evaluation
from mtssl.eval.weights import load_torch_file
from mtssl.job_folder import (BACKBONE_EXPORT, CHECKPOINTS, CONFIG, RESULTS, JobStatus, Results, job_state,
                              last_checkpoint_step, write_results)
from mtssl.utils.exit_codes import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

log = logging.getLogger("mtssl")


def load_job(out_dir: Path, overrides: Sequence[str]) -> tuple[DictConfig, Results]:
    """(config with the overrides applied, results.json) of a finished job; ConfigError when it cannot be re-evaluated."""
    out_dir = Path(out_dir)
    state = job_state(out_dir)
    if state.status == JobStatus.MALFORMED:
        raise ConfigError(f"{out_dir}: {state.problem}")
    try:
        trained = OmegaConf.load(out_dir / CONFIG)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{out_dir} is not a finished mtssl job ({CONFIG} and {RESULTS} are needed): {error}") from error
    if state.results is None:
        raise ConfigError(f"{out_dir} is not a finished mtssl job ({CONFIG} and {RESULTS} are needed): no {RESULTS} "
                          f"(status {state.status})")
    results = state.results
    if results["status"] == JobStatus.EVALUATED:
        raise ConfigError(f"{out_dir} holds weights evaluated only ({results.get('weights_source')}); rerun that "
                          f"evaluation with the new settings: python -m mtssl.eval --weights "
                          f"{results.get('weights_source')} ... out_dir={out_dir} eval.<key>=...")
    if results["status"] != JobStatus.COMPLETED:
        raise ConfigError(f"{out_dir}: {RESULTS} has status {results['status']!r}; only completed jobs are re-evaluated")
    if not (out_dir / BACKBONE_EXPORT).exists():
        raise ConfigError(f"{out_dir / BACKBONE_EXPORT} is missing; rerun the job (python -m mtssl.run) to export it")
    try:
        cfg = OmegaConf.merge(trained, OmegaConf.from_dotlist(list(overrides)))
    except Exception as error:  # omegaconf raises several types for a malformed dotlist
        raise ConfigError(f"bad override in {list(overrides)}: {error}") from error
    changes = config_changes(trained, cfg)
    if changes:
        raise ConfigError(f"{format_changes(changes)}: these overrides change the training config of {out_dir}; "
                          f"re-evaluation only takes fields outside it (eval.*, data.root, data.num_workers, train.device)")
    if cfg.eval.get("weights") is not None:
        raise ConfigError(f"eval.weights: a re-evaluation evaluates the backbone.pth of {out_dir}; evaluate other "
                          f"weights with python -m mtssl.eval --weights FILE ... out_dir=<another folder>")
    cfg.out_dir = str(out_dir)
    return cfg, results


def load_backbone_export(out_dir: Path) -> dict:
    """``out_dir/backbone.pth``; ConfigError naming the file and what to do when it is truncated or unreadable."""
    if last_checkpoint_step(out_dir) is not None:
        fix = (f"delete {out_dir / RESULTS} and rerun the job's command (python -m mtssl.run ... out_dir={out_dir}): "
               f"it resumes from its final checkpoint in {out_dir / CHECKPOINTS}, evaluates and writes "
               f"{BACKBONE_EXPORT} again")
    else:
        fix = f"copy {BACKBONE_EXPORT} again from where it came from (the job kept no checkpoint to export it from)"
    export = load_torch_file(out_dir / BACKBONE_EXPORT, fix)
    if not isinstance(export, dict) or not isinstance(export.get("state_dict"), dict):
        raise ConfigError(f"{out_dir / BACKBONE_EXPORT} holds no 'state_dict' entry: it is not the backbone export of "
                          f"an mtssl job; {fix}")
    return export


def reevaluate(out_dir: str | Path, overrides: Sequence[str] = ()) -> int:
    """Re-evaluate the job in ``out_dir`` on this process's rank; returns the exit code (a collective)."""
    out_dir = Path(out_dir)
    try:
        cfg, results = load_job(out_dir, overrides)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_CONFIG
    env = init_distributed(cfg.train.get("device", "auto"), cfg.train.get("collective_timeout_s"))
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    code = EXIT_FAILED
    try:
        validate_config(cfg, world_size=env.world_size)
        export = load_backbone_export(out_dir)
        fields = evaluate_states(cfg, env, export["state_dict"], export.get("target_state_dict"), None, out_dir)
        if fields["weights_sha256"] != results.get("weights_sha256"):
            raise ConfigError(f"{out_dir / BACKBONE_EXPORT} (sha256 {fields['weights_sha256'][:12]}) is not the network "
                              f"{RESULTS} describes ({str(results.get('weights_sha256'))[:12]})")
        if env.is_main:
            fields["eval_config"] = OmegaConf.to_container(cfg.eval, resolve=True)
            write_results(out_dir, merge_evaluation(results, fields))
            log.info("re-evaluated %s: kNN top-1 %.2f, linear top-1 %.2f", out_dir, fields["knn_top1"], fields["linear_top1"])
        code = EXIT_OK
    except ConfigError as error:
        log.error("%s", error)
        code = EXIT_BAD_CONFIG
    except Exception:
        log.exception("re-evaluation failed")
    finally:
        destroy_distributed(all_ranks_done=code == EXIT_OK)
    return code


USAGE = """\
usage: python -m mtssl.eval <job out_dir> [key=value ...]
       python -m mtssl.eval --weights FILE|timm:<name> [group=option ...] [key=value ...] out_dir=DIR
       torchrun --nproc-per-node N -m mtssl.eval ...      (either form, on N ranks)

<job out_dir>: re-evaluate a finished mtssl job (python -m mtssl.run) with other evaluation settings, without
retraining: reads out_dir/config.yaml and out_dir/backbone.pth, runs the weighted kNN (online and EMA-target
backbones) and the linear probes, and merges the results into out_dir/results.json (results it did not recompute
are kept; the training fields are left as they are). An interrupted re-evaluation resumes when rerun.

--weights: evaluate a backbone that no mtssl job trained (a released checkpoint, timm or torchvision weights,
another job's backbone.pth) with the same protocols, into out_dir (results.json status "evaluated", with the
file's SHA-256 and source). The job config comes from the overrides as for python -m mtssl.run: the backbone
(backbone=resnet50), the data (data=imagefolder data.root=/data/imagenet), eval.*. The format is detected;
keys that do not match the backbone are refused by name. eval.weights_branch=target: the EMA target of a
backbone.pth or of a full checkpoint.

Main overrides (re-evaluation: fields outside the training config; the others are refused):
  eval.knn_k=[10,20,50]      the ks of the kNN (results under knn.k<k>; the headline knn_top1 is always k=20)
  eval.linear_protocols=[frozen_features,augmented]   the linear probes to run
  eval.linear_epochs=100     eval.linear_lrs=[...]    the frozen-features probe
  eval.feature_dtype=bf16    the dtype of the feature banks (fp32 | bf16 | fp16)
  eval.train_subset=N        eval.val_subset=N        class-balanced subsets of the train bank and of val
  data.root=PATH             data.num_workers=N       train.device=cpu|cuda

Exit codes: 0 done, 1 failed, 2 bad arguments, 3 (--weights) stopped on a signal: rerun to resume.
Docs: docs/evaluation.md ("Re-evaluate a finished job", "Evaluate weights from elsewhere").
"""

WEIGHTS_FLAG = "--weights"


def take_weights(args: list[str]) -> tuple[str | None, list[str]]:
    """(the value of ``--weights FILE`` or ``--weights=FILE``, the other arguments); ConfigError without a value."""
    for i, arg in enumerate(args):
        if arg == WEIGHTS_FLAG:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                raise ConfigError(f"{WEIGHTS_FLAG}: give the weights, {WEIGHTS_FLAG} FILE or {WEIGHTS_FLAG} timm:<name>")
            return args[i + 1], args[:i] + args[i + 2:]
        if arg.startswith(WEIGHTS_FLAG + "="):
            return arg[len(WEIGHTS_FLAG) + 1:], args[:i] + args[i + 1:]
    return None, args


def evaluate_weights_command(weights: str, overrides: Sequence[str]) -> int:
    """``python -m mtssl.eval --weights ...``: ``python -m mtssl.run`` with ``eval.weights`` (evaluated only)."""
    from mtssl.config import compose_config
    from mtssl.run import run_job

    if not any(o.split("=", 1)[0].lstrip("+") == "out_dir" for o in overrides):
        print(f"python -m mtssl.eval {WEIGHTS_FLAG}: give out_dir=<folder> for results.json (python -m mtssl.eval "
              f"--help)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        cfg = compose_config(list(overrides))
    except ConfigError as error:
        print(f"invalid config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    cfg.eval.weights = weights  # set here, not as an override: a path needs no Hydra quoting
    code = run_job(cfg)
    destroy_distributed(all_ranks_done=code in (EXIT_OK, EXIT_INTERRUPTED))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mtssl.eval``: ``--help`` prints ``USAGE`` (exit 0); ``--weights`` evaluates a backbone file;
    otherwise re-evaluate the job in ``args[0]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE, end="")
        return EXIT_OK
    try:
        weights, args = take_weights(args)
    except ConfigError as error:
        print(f"python -m mtssl.eval: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if weights is not None:
        return evaluate_weights_command(weights, args)
    if not args or args[0].startswith("-") or "=" in args[0]:
        print(USAGE, end="", file=sys.stderr)
        print("\npython -m mtssl.eval: give the out_dir of a finished job first, or --weights FILE", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return reevaluate(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
