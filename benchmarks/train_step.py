"""Training-step throughput: the paper's per-view mode against every fast mode, side by side.

One step is exactly ``mtssl.train.trainer.Trainer.training_step``: the online network on every view,
the target on the global views, the multi-task loss, one backward, the optimiser step and the
EMA update, on a model built as the Trainer builds it (plain on one CPU rank, FSDP2-wrapped
otherwise). Views are synthetic
tensors already on the device, so the data pipeline is not measured here (see data_pipeline.py).

    python benchmarks/train_step.py --quick            # short CPU run: ResNet-18 at CIFAR size
    python benchmarks/train_step.py                    # ResNet-18 CIFAR, ResNet-50 224/96, ViT-S
    python benchmarks/train_step.py --compile          # also torch.compile'd backbones
    python benchmarks/train_step.py --end-to-end --models resnet18_cifar_preset --workers 2
                                                       # the real loader included, against synthetic views

Modes (all build the same network from the same seed; each is a job option):
  per_view          one encoder call per view, BN statistics per view (the paper)
  plain             train.view_batching=bn_shared: same-size views in one backbone call, BN over the
                    group (changes semantics)
  ghost             train.view_batching=bn_per_view: same-size views in one backbone call, all views in
                    one projector call, each predictor's views in one call; BN statistics per view
                    chunk (same results)
  per_view+cl       train.channels_last=true: channels_last inputs, hence channels_last activations
                    (parameters stay contiguous, which FSDP2 requires; convolutions follow the
                    input's layout)
  ghost+cl          both
  ghost+cl+compile  and train.compile=true: torch.compile'd backbones (--compile; the step itself,
                    which calls backward, is never compiled)
  ...+bf16          CUDA only: the step under bf16 autocast (FSDP already holds bf16 compute
                    parameters on CUDA; autocast also moves the remaining ops to bf16)

End to end (--end-to-end): the Trainer's own loader (AugmentedImageFolder, the run-long sampler, the
device prefetcher, ``to_views``) feeds the same step, and images/s of loader + step are reported
beside those of the step alone on synthetic views already on the device; the ratio shows how
data-bound the model is (1.0: the loader keeps up). CIFAR models read MTSSL_DATA_ROOT at 32 px;
224 px models read a temporary ImageFolder of photo-like 500x375 JPEGs (as data_pipeline.py
writes). On CPU the workers share the cores with the step, so the ratio there mixes data loading
with that contention; on a GPU node it is the data-bound share alone.

Modes run interleaved (round robin) within each repetition, so machine load drifts hit them
alike; the table reports the median over repetitions and the min-max spread. On CPU it also
reports images per second of process CPU time (img/CPU-s), which time spent descheduled by
other jobs on a shared machine does not inflate (use --threads 1 for it). Achieved FLOP/s
use the FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode``; on CUDA
MFU divides them by the GPU's dense bf16 peak. Results: benchmarks/results/train_step.json.

On CPU, glibc's malloc hands large freed blocks back to the OS, so a step that frees and
re-allocates tensors pays a minor page fault per fresh 4 KiB page (faults/step column; about
1.5 us each on the reference machine). Who pays more depends on tensor sizes and the allocator's
state: per-view mode sometimes takes tens of thousands per step (more calls, each with its own
oneDNN scratch buffers), grouped modes with large activations (the CIFAR stem) take more there. So
speedups under the default allocator move between runs, and the column shows why. To measure
without that effect, keep freed memory mapped:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/train_step.py ...

(jemalloc or tcmalloc via LD_PRELOAD have the same effect and speed up CPU training in general.)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from mtssl.config import compose_config, resolve_config
from mtssl.data.device_prefetch import DevicePrefetcher
from mtssl.distributed.process_group import DistEnv, init_distributed
from mtssl.train.trainer import Trainer
from data_pipeline import write_jpegs
from report import print_table, write_report

RESULTS = Path(__file__).parent / "results" / "train_step.json"
# timm backbones return a view of their pooled features; nothing here modifies it in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# Dense bf16 tensor-core peak (FLOP/s) by GPU name, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}

# model name -> (config overrides, CPU batch, GPU batch)
MODELS = {
    # CIFAR ResNet stem (3x3 conv, no max-pool): 12x the FLOPs of the ImageNet stem at 32 px
    "resnet18_cifar": (["backbone=resnet18", "data=cifar10", "data.small_images=true"], 32, 256),
    # the data=cifar10 preset as shipped: ImageNet stem on 32 px views (the demo and test scale)
    "resnet18_cifar_preset": (["backbone=resnet18", "data=cifar10"], 32, 256),
    "resnet50_224": (["backbone=resnet50", "data=imagefolder", "data.root=/unused"], 4, 64),
    "vit_small_224": (["backbone=vit_small", "data=imagefolder", "data.root=/unused"], 4, 64),
}


@dataclass(frozen=True)
class Mode:
    name: str
    view_batching: str  # train.view_batching
    channels_last: bool = False
    compile: bool = False
    bf16_autocast: bool = False


BASE_MODES = [
    Mode("per_view", "none"),
    Mode("plain", "bn_shared"),
    Mode("ghost", "bn_per_view"),
    Mode("per_view+cl", "none", channels_last=True),
    Mode("ghost+cl", "bn_per_view", channels_last=True),
]


def modes_for(device: torch.device, with_compile: bool) -> list[Mode]:
    modes = list(BASE_MODES)
    if with_compile:
        modes.append(Mode("per_view+cl+compile", "none", channels_last=True, compile=True))
        modes.append(Mode("ghost+cl+compile", "bn_per_view", channels_last=True, compile=True))
    if device.type == "cuda":
        modes += [
            Mode("per_view+bf16", "none", bf16_autocast=True),
            Mode("ghost+cl+bf16", "bn_per_view", channels_last=True, bf16_autocast=True),
        ]
        if with_compile:
            modes.append(Mode("ghost+cl+compile+bf16", "bn_per_view", channels_last=True, compile=True, bf16_autocast=True))
    return modes


def step_runner(cfg, mode: Mode, env: DistEnv, out_dir: Path, real_data: bool = False) -> Trainer:
    """The job's Trainer (plain on one CPU rank, FSDP2 otherwise) with ``mode`` applied.

    Its training samples are placeholders: only their count matters (the schedule length), since
    the benchmark feeds synthetic views to ``training_step`` and never reads images; with
    ``real_data`` they are the config's data folder (end to end).
    """
    train = {"view_batching": mode.view_batching, "channels_last": mode.channels_last, "compile": mode.compile, "epochs": 1000}
    cfg = OmegaConf.merge(cfg, {"train": train, "optim": {"warmup_epochs": 0}})
    placeholders = None if real_data else [("synthetic", 0)] * (cfg.train.batch_size * 1000)
    trainer = Trainer(cfg, env, out_dir, train_samples=placeholders)
    trainer.model.train()
    return trainer


def make_views(layout, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Contiguous views as the data loader delivers them (train.channels_last converts in the step)."""
    generator = torch.Generator().manual_seed(0)
    views = []
    for name, _ in layout.entries:
        size = layout.type(name).size
        x = torch.randn(batch, 3, size, size, generator=generator).to(device)
        views.append(x)
    return views


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Entry:
    mode: Mode
    trainer: Trainer
    views: list[torch.Tensor]
    step: int = 0
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    page_faults: list[float] = field(default_factory=list)  # minor page faults per step, per repetition
    error: str | None = None

    def run(self, steps: int, device: torch.device) -> tuple[float, float, float]:
        """Wall-clock and process CPU seconds of ``steps`` training steps, and minor page faults per step."""
        faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.mode.bf16_autocast else contextlib.nullcontext()
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            for _ in range(steps):
                self.trainer.training_step(self.views, self.step)
                self.step += 1
        sync(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return wall, cpu, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start) / max(steps, 1)


def count_step_flops(entry: Entry) -> int:
    """FLOPs of one full training step (forward of online and target, backward), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        entry.trainer.training_step(entry.views, entry.step)
    entry.step += 1
    return counter.get_total_flops()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def benchmark_model(model_name: str, args, env: DistEnv, out_dir: Path) -> dict:
    device = env.device
    overrides, cpu_batch, gpu_batch = MODELS[model_name]
    batch = args.batch or (gpu_batch if device.type == "cuda" else cpu_batch)
    cfg = resolve_config(compose_config(["method=byol", "views=global_local_cutout", *overrides, f"train.batch_size={batch}"]))
    entries = []
    for mode in modes_for(device, args.compile):
        trainer = step_runner(cfg, mode, env, out_dir)
        entries.append(Entry(mode, trainer, make_views(trainer.layout, batch, device)))
    flops = count_step_flops(entries[0])
    for entry in entries:  # warm-up (and compilation) outside the timed repetitions
        try:
            entry.run(args.warmup, device)
        except Exception as error:  # a mode that cannot run here is reported, not fatal
            entry.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(f"  {model_name} {entry.mode.name}: failed ({entry.error})", file=sys.stderr)
    for rep in range(args.reps):
        for entry in entries:
            if entry.error is None:
                wall, cpu, faults = entry.run(args.steps, device)
                entry.times.append(wall)
                entry.cpu_times.append(cpu)
                entry.page_faults.append(faults)
        print(f"  {model_name}: repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    peak = peak_flops(device)
    rows = []
    base = cpu_base = None
    for entry in entries:
        row = {"model": model_name, "mode": entry.mode.name, "batch": batch, "steps_per_rep": args.steps}
        if entry.error:
            rows.append({**row, "error": entry.error})
            continue
        rates = [batch * args.steps / t for t in entry.times]
        cpu_rates = [batch * args.steps / t for t in entry.cpu_times]
        median = statistics.median(rates)
        base = base or median  # the first mode is per_view
        cpu_base = cpu_base or statistics.median(cpu_rates)
        step_s = batch / median
        row.update(
            images_per_s=median,
            images_per_s_min=min(rates),
            images_per_s_max=max(rates),
            images_per_s_all=rates,
            speedup_vs_per_view=median / base,
            # Images per second of this process's CPU time: on a shared CPU, time spent
            # descheduled by other jobs does not count (meaningful with --threads 1).
            images_per_cpu_s=statistics.median(cpu_rates) if device.type == "cpu" else None,
            images_per_cpu_s_all=cpu_rates if device.type == "cpu" else None,
            cpu_time_speedup_vs_per_view=statistics.median(cpu_rates) / cpu_base if device.type == "cpu" else None,
            # Fresh pages the allocator had to map per step (CPU: glibc returns freed memory to the
            # OS, so every re-use costs page faults, ~1.5 us each here; see the module docstring).
            minor_page_faults_per_step=statistics.median(entry.page_faults),
            gflop_per_step=flops / 1e9,
            tflop_per_s=flops / step_s / 1e12,
            mfu=(flops / step_s / peak) if peak else None,
        )
        rows.append(row)
    return {"model": model_name, "batch": batch, "gflop_per_step": flops / 1e9, "rows": rows}


def end_to_end_rates(trainer: Trainer, steps: int, reps: int, warmup: int, device: torch.device) -> list[float]:
    """Images/s of loader + step over ``reps`` stretches of ``steps`` steps, after ``warmup`` steps
    (worker start and the first batches), all from one loader as ``Trainer.fit`` makes it."""
    batch = trainer.cfg.train.batch_size
    marks = []
    loader = DevicePrefetcher(trainer.train_loader(0, warmup + steps * reps), device)
    for step, (views, _, _) in enumerate(loader):
        if step >= warmup and (step - warmup) % steps == 0:
            sync(device)
            marks.append(time.perf_counter())
        trainer.training_step(trainer.transform.to_views(views, device), step)
    sync(device)
    marks.append(time.perf_counter())
    return [batch * steps / (b - a) for a, b in zip(marks, marks[1:])]


def image_folder_of_jpegs(root: Path, count: int) -> Path:
    """root/train/class_{0,1}/*.jpg: ``count`` photo-like 500x375 JPEGs (ImageNet's typical size)."""
    for c in range(2):
        folder = root / "train" / f"class_{c}"
        folder.mkdir(parents=True)
        write_jpegs(folder, count // 2, 500, 375, seed=c)
    return root


def benchmark_end_to_end(model_name: str, args, env: DistEnv, out_dir: Path, jpeg_root: Path) -> list[dict]:
    """Synthetic-views step against loader + step, per pipeline, for one model and ``args.e2e_mode``."""
    device = env.device
    overrides, cpu_batch, gpu_batch = MODELS[model_name]
    batch = args.batch or (gpu_batch if device.type == "cuda" else cpu_batch)
    cifar = "data=cifar10" in overrides
    data = ["data.subset=null"] if cifar else [f"data.root={jpeg_root}", "data.subset=null"]
    mode = next(m for m in modes_for(device, args.compile) if m.name == args.e2e_mode)
    rows = []
    for pipeline in args.pipelines:
        cfg = resolve_config(compose_config(["method=byol", "views=global_local_cutout", *overrides, *data, f"train.batch_size={batch}",
                                             f"data.pipeline={pipeline}", f"data.num_workers={args.workers}"]))
        trainer = step_runner(cfg, mode, env, out_dir, real_data=True)
        entry = Entry(mode, trainer, make_views(trainer.layout, batch, device))
        entry.run(args.warmup, device)
        synthetic = [batch * args.steps / entry.run(args.steps, device)[0] for _ in range(args.reps)]
        loaded = end_to_end_rates(trainer, args.steps, args.reps, max(args.warmup, 1), device)
        print(f"  {model_name} {pipeline}: done", file=sys.stderr)
        rows.append({
            "model": model_name, "mode": mode.name, "pipeline": pipeline, "workers": args.workers, "batch": batch,
            "data": "CIFAR-10 (32 px)" if cifar else "500x375 JPEGs", "steps_per_rep": args.steps,
            "synthetic_images_per_s": statistics.median(synthetic), "synthetic_images_per_s_all": synthetic,
            "end_to_end_images_per_s": statistics.median(loaded), "end_to_end_images_per_s_all": loaded,
            "ratio": statistics.median(loaded) / statistics.median(synthetic),
        })
    return rows


def print_end_to_end(rows: list[dict], device_name: str) -> None:
    cells = [[r["model"], r["mode"], r["pipeline"], str(r["workers"]), str(r["batch"]), r["data"],
              f"{r['synthetic_images_per_s']:.2f}", f"{r['end_to_end_images_per_s']:.2f}", f"{r['ratio']:.2f}"] for r in rows]
    header = ["model", "mode", "pipeline", "workers", "batch", "data", "step alone img/s", "loader+step img/s", "ratio"]
    print_table(f"End to end on {device_name} (images/s: median over repetitions)", header, cells, left_columns=3)


def optional(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def print_rows(rows: list[dict], device_name: str) -> None:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["model"], r["mode"], str(r["batch"]), f"failed: {r['error']}"])
            continue
        cells.append([
            r["model"], r["mode"], str(r["batch"]), f"{r['images_per_s']:.2f}",
            f"[{r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f}]", f"{r['speedup_vs_per_view']:.2f}x",
            f"{r['tflop_per_s']:.3f}", optional(r["mfu"] and 100 * r["mfu"], "{:.1f}%"),
            optional(r["images_per_cpu_s"], "{:.2f}"), optional(r["cpu_time_speedup_vs_per_view"], "{:.2f}x"),
            f"{r['minor_page_faults_per_step']:.0f}",
        ])
    header = ["model", "mode", "batch", "images/s", "[min-max]", "speedup", "TFLOP/s", "MFU", "img/CPU-s", "speedup", "faults/step"]
    print_table(f"Training step on {device_name} (images/s: median over repetitions, [min-max])", header, cells, left_columns=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CPU run: ResNet-18 at CIFAR size, few repetitions")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all (quick: resnet18_cifar)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="per-model default: 32/4/4 on CPU, 256/64/64 on CUDA (quick: 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per mode")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd modes (slow to start)")
    parser.add_argument("--end-to-end", action="store_true", help="the real loader + step against the step on synthetic views")
    parser.add_argument("--e2e-mode", default="per_view", help="end to end: the step's mode (a mode name above; default per_view)")
    parser.add_argument("--pipelines", nargs="+", default=["torchvision", "fast"], help="end to end: data.pipeline values")
    parser.add_argument("--workers", type=int, default=2, help="end to end: data.num_workers")
    parser.add_argument("--jpegs", type=int, default=256, help="end to end, 224 px models: JPEGs to generate")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        args.device = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    device = env.device
    quick = args.quick
    args.models = args.models or (["resnet18_cifar"] if quick else list(MODELS))
    cuda = device.type == "cuda"
    if quick and args.batch is None and not cuda:
        args.batch = 16
    args.steps = args.steps or (2 if quick else 10 if cuda else 3)
    args.reps = args.reps or (3 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3 if cuda else 1)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "peak_bf16_flops": peak_flops(device),
        "models": [],
        "rows": [],
    }
    if args.end_to_end:
        report["workers"] = args.workers
        with tempfile.TemporaryDirectory() as tmp:
            jpeg_root = None
            if any("data=cifar10" not in MODELS[name][0] for name in args.models):
                jpeg_root = image_folder_of_jpegs(Path(tmp) / "jpegs", args.jpegs)
            for name in args.models:
                print(f"end to end: {name} ...", file=sys.stderr)
                report["rows"] += benchmark_end_to_end(name, args, env, Path(tmp) / "out", jpeg_root)
                write_report(args.out.with_name("train_step_end_to_end.json"), "train_step", argv, **report)
        print_end_to_end(report["rows"], device_name)
        return
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as out_dir:  # the Trainer's (unused) checkpoint folder
            result = benchmark_model(name, args, env, Path(out_dir))
        report["models"].append({k: v for k, v in result.items() if k != "rows"})
        report["rows"] += result["rows"]
        write_report(args.out, "train_step", argv, **report)  # after each model: a partial run keeps its results
    print_rows(report["rows"], device_name)


if __name__ == "__main__":
    main()
