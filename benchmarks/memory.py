"""Per-rank memory of parameters, gradients and optimiser state: 1 rank vs 2 FSDP2 ranks.

Each rank builds the job's model as ``mtssl.train.trainer.Trainer`` does (``build_model`` ->
``shard_model`` -> ``build_optimizer``; one CPU rank keeps the plain model, as the Trainer
does), runs one full training step (so gradients and optimiser
state exist) and counts bytes from the tensors it actually holds: ``DTensor.to_local()`` of every
parameter, gradient and optimiser-state tensor, times its element size. That count is exact, not
a noisy allocator reading. Peak RSS (``resource.getrusage``) and, on CUDA, peak allocated memory
are reported next to it. Ranks are separate processes on the gloo backend (CPU) or nccl (CUDA).

    python benchmarks/memory.py                     # ResNet-18, ResNet-50 (LARS), ViT-S (AdamW)
    python benchmarks/memory.py --quick             # ResNet-18 only
    python benchmarks/memory.py --models resnet50

Goal: with 2 ranks each rank holds <= 0.6x the single-rank bytes of parameters + gradients +
optimiser state. Results: benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp
from report import print_table, write_report

from mtssl.distributed.process_group import free_local_port

RESULTS = Path(__file__).parent / "results" / "memory.json"
GOAL_RATIO = 0.6

# name -> config overrides (CIFAR-size views keep the one measured step short; sizes do not
# change parameter or optimiser-state bytes, only activations and so peak RSS)
MODELS = {
    "resnet18": ["backbone=resnet18"],
    "resnet50": ["backbone=resnet50"],
    "vit_small": ["backbone=vit_small"],
}


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds for ``tensor``: its local shard if it is a DTensor."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measure_rank(rank: int, world_size: int, port: int, overrides: list[str], batch: int, device_kind: str, out_dir: str) -> None:
    """One rank: build as the Trainer does, run one step, write this rank's byte counts as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # timm backbones return a view of their pooled features; nothing here modifies it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # The Trainer's own pieces, no copy; spawned ranks get the parent's sys.path, benchmarks/ first.
    from train_step import Mode, make_views, step_runner

    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.process_group import destroy_distributed, init_distributed

    env = init_distributed(device_kind)
    cfg = resolve_config(compose_config(["method=byol", "views=global_local_cutout", "data=cifar10", *overrides, f"train.batch_size={batch}"]))
    trainer = step_runner(cfg, Mode("per_view", False), env, Path(out_dir))
    views = make_views(trainer.layout, batch // world_size, env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    trainer.training_step(views, 0)
    model, optimizer = trainer.model, trainer.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]  # the EMA target
    state_tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    result = {
        "rank": rank,
        "world_size": world_size,
        "trainable_param_bytes": sum(local_bytes(p) for p in trainable),
        "target_param_bytes": sum(local_bytes(p) for p in frozen),
        "grad_bytes": sum(local_bytes(p.grad) for p in trainable if p.grad is not None),
        "optimizer_state_bytes": sum(local_bytes(t) for t in state_tensors),
        "buffer_bytes": sum(local_bytes(b) for b in model.buffers()),  # BN statistics: not sharded
        "full_param_count": sum(p.numel() for p in model.parameters()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else None,
    }
    result["state_bytes"] = result["trainable_param_bytes"] + result["target_param_bytes"] + result["grad_bytes"] + result["optimizer_state_bytes"]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    destroy_distributed()


def run_world(world_size: int, overrides: list[str], batch: int, device_kind: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(measure_rank, args=(world_size, free_local_port(), overrides, batch, device_kind, out_dir), nprocs=world_size, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def summarise(model: str, ranks_by_world: dict[int, list[dict]]) -> list[dict]:
    rows = []
    single = max(r["state_bytes"] for r in ranks_by_world[1])
    for world_size, ranks in ranks_by_world.items():
        worst = max(ranks, key=lambda r: r["state_bytes"])  # the most loaded rank (uneven shards)
        rows.append(
            {
                "model": model,
                "world_size": world_size,
                "full_param_count": worst["full_param_count"],
                **{k: worst[k] for k in ("trainable_param_bytes", "target_param_bytes", "grad_bytes", "optimizer_state_bytes", "buffer_bytes", "state_bytes")},
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
                "peak_cuda_allocated_bytes": worst["peak_cuda_allocated_bytes"],
                "ratio_vs_1_rank": worst["state_bytes"] / single,
                "meets_goal": world_size == 1 or worst["state_bytes"] / single <= GOAL_RATIO,
                "per_rank": ranks,
            }
        )
    return rows


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_rows(rows: list[dict], device: str) -> None:
    header = ["model", "ranks", "params", "target", "grads", "optim", "state", "x 1 rank", "buffers", "peak RSS", "peak CUDA"]
    cells = [[r["model"], str(r["world_size"]), mib(r["trainable_param_bytes"]), mib(r["target_param_bytes"]),
              mib(r["grad_bytes"]), mib(r["optimizer_state_bytes"]), mib(r["state_bytes"]), f"{r['ratio_vs_1_rank']:.3f}x",
              mib(r["buffer_bytes"]), mib(r["peak_rss_bytes"]), mib(r["peak_cuda_allocated_bytes"])] for r in rows]
    print_table(f"Per-rank memory on {device} (MiB; the most loaded rank; state = params + EMA target + grads + optimiser)",
                header, cells)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all (quick: resnet18)")
    parser.add_argument("--batch", type=int, default=4, help="global batch of the measured step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda needs 2 GPUs for 2 ranks")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = args.models or (["resnet18"] if args.quick else list(MODELS))
    rows = []
    for model in models:
        print(f"measuring {model} on 1 and 2 ranks ...", file=sys.stderr)
        ranks_by_world = {w: run_world(w, MODELS[model], args.batch, args.device) for w in (1, 2)}
        rows += summarise(model, ranks_by_world)
    device = f"{platform.machine()} CPU, gloo" if args.device == "cpu" else f"{torch.cuda.get_device_name()} x2, nccl"
    print_rows(rows, device)
    met = all(r["meets_goal"] for r in rows)
    print(f"\ngoal (2 ranks <= {GOAL_RATIO}x single-rank state bytes): {'met' if met else 'NOT met'}")
    write_report(args.out, "memory", argv, device=device, torch=torch.__version__, global_batch=args.batch,
                 goal_ratio=GOAL_RATIO, rows=rows)


if __name__ == "__main__":
    main()
