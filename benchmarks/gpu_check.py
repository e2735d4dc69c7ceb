"""GPU acceptance check: one CUDA rank, bf16, ghost BatchNorm, channels_last and torch.compile.

    MTSSL_DATA_ROOT=/path/to/cifar10 python benchmarks/gpu_check.py        # about 5 minutes on one GPU

On CIFAR-10 (``--data-root``, default $MTSSL_DATA_ROOT) it checks, in one process:
  1. throughput: ``Trainer.training_step`` on synthetic views of the job's shapes, under
     ``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation in the step fails):
     images/s, TFLOP/s (FLOPs of one step counted by torch), MFU against the GPU's dense bf16
     peak, peak memory;
  2. an uninterrupted job of ``--steps`` steps through ``Trainer.fit`` (real data loader), every
     step between logging steps under the same sync check, then the end-of-job evaluation
     (kNN and linear probe) on the GPU;
  3. the same job stopped at a checkpoint halfway and resumed by a new Trainer: its final
     weights and BN statistics are compared with the uninterrupted run's.
Both jobs run with ``train.cuda_deterministic=true``, so the resumed weights must be bitwise
equal. One table at the end; exit code 0 when every check passed, 1 otherwise, and 1 at once
without CUDA. A JSON report goes to benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from report import print_table, write_report

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

JOB = [
    "method=byol", "views=global_local_cutout", "predictor=separate", "backbone=resnet18", "data=cifar10",
    "data.small_images=true", "train.precision=bf16", "train.view_batching=bn_per_view", "train.channels_last=true",
    "train.compile=true", "train.cuda_deterministic=true", "train.device=cuda", "optim.warmup_epochs=1",
]


def mfu(flops_per_step: float, steps_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the device's peak (None without a known peak)."""
    if not peak_flops:
        return None
    return flops_per_step * steps_per_s / peak_flops


def compare_states(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(bitwise equal, largest absolute difference) of two state dicts with the same keys."""
    if first.keys() != second.keys():
        missing = sorted(set(first) ^ set(second))
        raise ValueError(f"the state dicts differ in their keys: {missing[:5]}")
    bitwise, largest = True, 0.0
    for key in sorted(first):
        a, b = first[key], second[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        equal = torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True
        bitwise &= equal
        if not equal and a.is_floating_point():
            largest = max(largest, (a.double() - b.double()).abs().max().item())
        elif not equal:
            largest = float("inf") if largest == 0.0 else largest
    return bitwise, largest


def check_rows(results: dict) -> list[tuple[str, str, bool | None]]:
    """(check, value, passed) rows of the summary table; passed None for measurements."""
    rows: list[tuple[str, str, bool | None]] = [("device", results.get("device", "-"), None)]
    if "throughput_error" in results:
        rows.append(("training step under sync_debug_mode=error", results["throughput_error"], False))
    elif "images_per_s" in results:
        rows.append(("training step under sync_debug_mode=error", "no host sync", True))
        rows.append(("images/s", f"{results['images_per_s']:.0f}", None))
        rows.append(("TFLOP/s", f"{results['tflop_per_s']:.1f}", None))
        rows.append(("MFU", "-" if results["mfu"] is None else f"{100 * results['mfu']:.1f}%", None))
        rows.append(("peak memory", f"{results['peak_memory_gib']:.2f} GiB", None))
    if "job_error" in results:
        rows.append(("uninterrupted job", results["job_error"], False))
    elif "job_status" in results:
        rows.append((f"uninterrupted job ({results['steps']} steps, sync check between logging steps)",
                     f"{results['job_status']}, {results['job_images_per_s']:.0f} img/s", results["job_status"] == "completed"))
        rows.append(("final losses finite", str(results["losses_finite"]), results["losses_finite"]))
    if "eval_error" in results:
        rows.append(("end-of-job evaluation on the GPU", results["eval_error"], False))
    elif "knn_top1" in results:
        rows.append(("end-of-job evaluation on the GPU", f"kNN top-1 {results['knn_top1']:.2f}, linear top-1 {results['linear_top1']:.2f}", True))
    if "resume_error" in results:
        rows.append(("stop at a checkpoint, resume", results["resume_error"], False))
    elif "resume_bitwise" in results:
        value = "bitwise equal" if results["resume_bitwise"] else f"max |diff| {results['resume_max_abs_diff']:.3g}"
        rows.append(("resumed final weights vs uninterrupted", value, results["resume_bitwise"]))
    return rows


def all_passed(rows) -> bool:
    return all(passed is not False for _, _, passed in rows) and any(passed for _, _, passed in rows)


def print_summary(rows) -> None:
    cells = [[check, value, "-" if passed is None else ("ok" if passed else "FAIL")] for check, value, passed in rows]
    print_table("GPU acceptance check", ["check", "result", "pass"], cells, left_columns=2)


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}"


def measure_throughput(cfg, env, out_dir: Path, steps: int, results: dict) -> None:
    """images/s, TFLOP/s, MFU and peak memory of the job's training step (train_step.py helpers)."""
    from train_step import Mode, count_step_flops, Entry, make_views, peak_flops, step_runner

    eager = Mode("ghost+cl", "ghost", channels_last=True)  # FLOPs are counted eagerly: same network, same FLOPs
    counted = step_runner(cfg, eager, env, out_dir / "eager")
    views = make_views(counted.layout, cfg.train.batch_size, env.device)
    flops = count_step_flops(Entry(eager, counted, views))
    del counted
    mode = Mode("ghost+cl+compile", "ghost", channels_last=True, compile=True)
    trainer = step_runner(cfg, mode, env, out_dir / "compiled")
    entry = Entry(mode, trainer, views)
    for _ in range(3):  # compile every view size
        trainer.training_step(entry.views, entry.step)
        entry.step += 1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            trainer.training_step(entry.views, entry.step)
            entry.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    steps_per_s = steps / elapsed
    results.update(
        images_per_s=steps_per_s * cfg.train.batch_size,
        tflop_per_s=flops * steps_per_s / 1e12,
        gflop_per_step=flops / 1e9,
        mfu=mfu(flops, steps_per_s, peak_flops(env.device)),
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
    )


def run_fit(cfg, env, out_dir: Path):
    """One ``Trainer.fit`` with the host-sync check on; returns (outcome, trainer)."""
    from mtssl.train.trainer import StopRequest, Trainer

    trainer = Trainer(cfg, env, out_dir)
    trainer.sync_debug_mode = "error"
    stop = StopRequest()
    try:
        return trainer.fit(stop), trainer
    finally:
        stop.restore()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("MTSSL_DATA_ROOT"), help="CIFAR-10 ImageFolder (default $MTSSL_DATA_ROOT)")
    parser.add_argument("--steps", type=int, default=300, help="steps of the uninterrupted job (the resumed one stops halfway)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--throughput-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU node", file=sys.stderr)
        return 1
    if not args.data_root or not Path(args.data_root, "train").is_dir():
        print(f"gpu_check: no CIFAR-10 ImageFolder at {args.data_root!r}; pass --data-root or set MTSSL_DATA_ROOT", file=sys.stderr)
        return 1
    if args.steps < 20 or args.steps % 2:
        print("gpu_check: --steps must be an even number of at least 20", file=sys.stderr)
        return 1
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS handle

    from mtssl.config import compose_config, resolve_config
    from mtssl.config.validate import validate_config
    from mtssl.distributed.fsdp import full_state_dict
    from mtssl.distributed.process_group import destroy_distributed, init_distributed
    from mtssl.train.trainer import configure_determinism

    env = init_distributed("cuda")
    log_every = max(1, args.steps // 10)
    steps_per_epoch = args.steps // 2
    overrides = JOB + [
        f"data.root={args.data_root}", f"data.subset={steps_per_epoch * args.batch}", f"data.num_workers={args.workers}",
        f"train.batch_size={args.batch}", "train.epochs=2", f"train.log_every_steps={log_every}",
        "eval.train_subset=5000", "eval.val_subset=2000", "eval.linear_epochs=10", f"eval.batch_size={args.batch}",
    ]
    cfg = resolve_config(compose_config(overrides))
    validate_config(cfg, world_size=1)
    results: dict = {"device": torch.cuda.get_device_name(env.device), "torch": torch.__version__, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            measure_throughput(cfg, env, tmp / "throughput", args.throughput_steps, results)
        except Exception as error:
            results["throughput_error"] = _error(error)
        configure_determinism(cfg.train, env.device)
        full = None
        try:
            outcome, trainer = run_fit(cfg, env, tmp / "uninterrupted")
            results.update(job_status=outcome.status, job_images_per_s=outcome.images_per_s,
                           losses_finite=bool(outcome.final_losses) and all(math.isfinite(v) for v in outcome.final_losses.values()))
            full = full_state_dict(trainer.model)
            try:
                from mtssl.eval.job import evaluate_backbones

                fields = evaluate_backbones(cfg, env, outcome, tmp / "uninterrupted")
                results.update(knn_top1=fields["knn_top1"], linear_top1=fields["linear_top1"])
            except Exception as error:
                results["eval_error"] = _error(error)
        except Exception as error:
            results["job_error"] = _error(error)
        try:
            # max_steps is not a training field: the resumed run keeps the config hash
            half = OmegaConf.merge(cfg, {"train": {"max_steps": args.steps // 2}})
            run_fit(half, env, tmp / "resumed")
            _, resumed = run_fit(cfg, env, tmp / "resumed")
            if full is None:
                raise RuntimeError("no uninterrupted run to compare with")
            bitwise, diff = compare_states(full, full_state_dict(resumed.model))
            results.update(resume_bitwise=bitwise, resume_max_abs_diff=diff)
        except Exception as error:
            results["resume_error"] = _error(error)
    destroy_distributed()
    rows = check_rows(results)
    print_summary(rows)
    passed = all_passed(rows)
    write_report(args.out, "gpu_check", argv, passed=passed, **results)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
