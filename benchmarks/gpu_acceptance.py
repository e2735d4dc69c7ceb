"""GPU acceptance run: every CUDA-only path of mtssl checked in one command of at most 8 minutes on one GPU.

    python3 benchmarks/gpu_acceptance.py --out DIR           # on a one-GPU machine (docs/gpu_acceptance.md)
    python3 benchmarks/gpu_acceptance.py --cpu-rehearsal --out DIR   # the same code paths at tiny sizes on CPU (CI)

It needs nothing but the checkout and the wheels of ``benchmarks/build_gpu_wheels.sh`` in ``.wheels/`` (installed
into a temporary folder when hydra-core, omegaconf, antlr4 or submitit are absent); it finds ``mtssl`` from its own
location and makes its data on the spot (synthetic JPEGs of ImageNet size: baseline, progressive, grayscale, CMYK
and corrupt ones). Stages run in priority order, each within a time budget, and each is reported pass / fail /
skipped with its numbers. After every stage DIR/gpu_acceptance.json and DIR/gpu_acceptance.md are rewritten (the
stage about to run is marked "in progress"), so a run cut short keeps everything it measured.

Stages (docs/gpu_acceptance.md lists each check and its pass criterion):
  preflight        versions, /dev/shm, imports, nccl and gloo at world size 1, CUDA JPEG decode of special files
  bf16_batchnorm   eager training_step, {per-view, ghost} x {NCHW, channels_last}: bf16 against fp32
  sync_audit       20 non-logging ``Trainer.fit`` steps under torch.cuda.set_sync_debug_mode("error"), six jobs
  gpu_pipeline     data.pipeline=gpu on CUDA against its CPU path, its float path and the fast pipeline
  prefetcher       a profiler trace over 10 steps: compute never waits on the side-stream copy, next() never syncs
  throughput       ResNet-50 224/96 at 128 per GPU: modes against a plain timm step, MFU, host time, memory
  resume           stopped halfway and resumed: bitwise equal to the uninterrupted run (cuda_deterministic)
  evaluation       sharded kNN against one process (ties, padded shards, collapsed features), the kNN monitor
  compile          compile time, graph breaks, recompiles, eager-vs-compiled loss, speed-up

Without CUDA (or with --cpu-rehearsal) every stage runs its code path at tiny sizes and CUDA-only checks are
reported as skipped, with the reason and what the CPU computed. Exit code 0 when no stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import gzip
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".wheels"  # benchmarks/build_gpu_wheels.sh writes them; ignored by git, carried to the GPU machine
BUILD_WHEELS = "benchmarks/build_gpu_wheels.sh"
# Import name -> distribution of the packages the GPU image lacks (they travel as wheels).
TRAVELLING_PACKAGES = {"omegaconf": "omegaconf", "hydra": "hydra-core", "antlr4": "antlr4-python3-runtime",
                       "submitit": "submitit"}
RESULTS_JSON, RESULTS_MD, TRACE_FILE = "gpu_acceptance.json", "gpu_acceptance.md", "prefetch_trace.json.gz"
TRACE_MAX_BYTES = 15 * 2**20  # files above 16 MiB do not come back from the device machine
# Stage and check statuses; "measured": a number without a pass criterion; "in progress": the stage running now.
PASS, FAIL, SKIPPED, MEASURED, RUNNING = "pass", "fail", "skipped", "measured", "in progress"
CUDA_ONLY = "needs CUDA: CPU rehearsal"


# ---------------------------------------------------------------------------------------------------------------
# Sizes: the GPU run and the CPU rehearsal differ only in these numbers.

@dataclass(frozen=True)
class Scale:
    name: str
    tiny: bool  # tiny backbones, heads and views (rehearsal)
    time_limit_s: float | None  # the whole run; stages that no longer fit are skipped
    image: tuple[int, int]  # (width, height) of most synthetic JPEGs: ImageNet's typical 500 x 375
    large_image: tuple[int, int]  # every 10th training image
    classes: int
    train_per_class: int
    val_per_class: int
    workers: int  # data.num_workers
    bn_batch: int
    bn_grad_tolerance: float  # bf16 vs fp32 gradient norm, relative
    audit_batch: int
    audit_checked_steps: int  # steps between logging steps checked under sync-debug "error"
    pipeline_batch: int
    large_crop: int  # side of the uint8 crop resized to 96 px (item 6: above ~47x CUDA's bicubic antialias fails)
    prefetch_batch: int
    prefetch_steps: int
    throughput_batch: int
    throughput_steps: int
    host_batch: int  # the batch at which a step's time is its host time (device work negligible)
    warmup_steps: int
    resume_batch: int
    resume_steps: int
    knn_bank: tuple[int, int, int]  # random bank: train rows, val rows, dim
    collapsed_bank: int  # rows of identical features (ImageNet's 1,281,167 train images on the GPU)
    knn_k: tuple[int, ...]
    eval_images: tuple[int, int]  # kNN monitor: train bank, val images
    compile_batch: int
    compile_steps: int


GPU = Scale(
    "gpu", tiny=False, time_limit_s=480, image=(500, 375), large_image=(1600, 1200), classes=4, train_per_class=128,
    val_per_class=32, workers=8, bn_batch=32, bn_grad_tolerance=2e-2, audit_batch=32, audit_checked_steps=20,
    pipeline_batch=32, large_crop=4800, prefetch_batch=64, prefetch_steps=10, throughput_batch=128,
    throughput_steps=15, host_batch=2, warmup_steps=3, resume_batch=32, resume_steps=8, knn_bank=(8192, 1024, 128),
    collapsed_bank=1_281_167, knn_k=(10, 20), eval_images=(256, 64), compile_batch=64, compile_steps=20)
# bn_grad_tolerance: the tiny network measured 3.1-3.6 % at batch 16 per view (BatchNorm over few values amplifies
# bf16 round-off: 38 % at batch 4); the GPU run keeps the 2e-2 for ResNet-50 at batch 32.
REHEARSAL = Scale(
    "cpu-rehearsal", tiny=True, time_limit_s=None, image=(64, 48), large_image=(96, 72), classes=2, train_per_class=12,
    val_per_class=4, workers=0, bn_batch=16, bn_grad_tolerance=0.1, audit_batch=4, audit_checked_steps=1,
    pipeline_batch=4, large_crop=960, prefetch_batch=4, prefetch_steps=2, throughput_batch=4, throughput_steps=2,
    host_batch=2, warmup_steps=1, resume_batch=4, resume_steps=4, knn_bank=(61, 23, 8), collapsed_bank=3000,
    knn_k=(2, 4), eval_images=(8, 8), compile_batch=4, compile_steps=3)

# Rehearsal backbones: the presets' classes at a fraction of the width and depth (timm arguments).
TINY_BACKBONES = {
    "resnet": ["+backbone.kwargs.layers=[1,1,1,1]", "+backbone.kwargs.channels=[8,16,32,64]",
               "+backbone.kwargs.stem_width=8"],
    "vit": ["+backbone.kwargs.depth=1", "+backbone.kwargs.embed_dim=24", "+backbone.kwargs.num_heads=2"],
}
TINY_JOB = ["method.projector.hidden_dims=[32]", "method.predictor.hidden_dims=[32]", "method.projector.out_dim=16",
            "method.predictor.out_dim=16", "+data.view_sizes.global=32", "+data.view_sizes.local=16",
            "+data.view_sizes.cutout=32", "data.eval_resize=36", "data.eval_crop=32"]


# ---------------------------------------------------------------------------------------------------------------
# The run: its context, its stages' records and the two result files.

@dataclass
class Data:
    root: Path  # ImageFolder: train/ and val/
    special: dict[str, Path]  # baseline, progressive, grayscale, cmyk, truncated, not_a_jpeg


@dataclass
class Run:
    args: argparse.Namespace
    scale: Scale
    out: Path
    work: Path  # temporary: data, checkpoints, traces
    started: float
    results: dict
    cuda: bool = False
    device: torch.device = torch.device("cpu")
    env: object = None  # mtssl DistEnv
    data: Data | None = None

    def time_left(self) -> float:
        limit = self.scale.time_limit_s
        return math.inf if limit is None else limit - (time.monotonic() - self.started)


class Stage:
    """One stage's record: its checks (pass / fail / skipped / measured) and numbers."""

    def __init__(self, name: str, title: str, budget_s: float, cuda: bool):
        self.name, self.title, self.budget_s, self.cuda = name, title, budget_s, cuda
        self.checks: list[dict] = []
        self.numbers: dict = {}
        self.started, self.cpu_started = time.monotonic(), time.process_time()
        self.status, self.reason, self.error = RUNNING, "", None

    def check(self, name: str, passed: bool, value: str, criterion: str, cuda_only: bool = False, **numbers) -> bool:
        """Record a pass/fail check; ``cuda_only`` on CPU records it as skipped, with what the CPU computed."""
        status = PASS if passed else FAIL
        reason = ""
        if cuda_only and not self.cuda:
            status, reason = SKIPPED, CUDA_ONLY
        self.checks.append({"name": name, "status": status, "value": value, "criterion": criterion, "reason": reason,
                            "numbers": numbers})
        return passed

    def measure(self, name: str, value: str, **numbers) -> None:
        self.checks.append({"name": name, "status": MEASURED, "value": value, "criterion": "", "reason": "",
                            "numbers": numbers})

    def skip(self, name: str, reason: str, criterion: str = "") -> None:
        self.checks.append({"name": name, "status": SKIPPED, "value": "", "criterion": criterion, "reason": reason,
                            "numbers": {}})

    def time_left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def finish(self, error: BaseException | None = None) -> None:
        self.seconds = time.monotonic() - self.started
        self.numbers["cpu_seconds"] = round(time.process_time() - self.cpu_started, 1)  # this process's, all threads
        if error is not None:
            self.error = error_summary(error)
            self.status = FAIL
        elif any(c["status"] == FAIL for c in self.checks):
            self.status = FAIL
        elif any(c["status"] == PASS for c in self.checks):
            self.status = PASS
        else:
            self.status, self.reason = SKIPPED, self.reason or "no check could run here"

    def record(self) -> dict:
        return {"name": self.name, "title": self.title, "status": self.status, "reason": self.reason,
                "error": self.error, "seconds": round(time.monotonic() - self.started if self.status == RUNNING
                                                      else self.seconds, 2),
                "budget_s": self.budget_s, "checks": self.checks, "numbers": self.numbers}


def error_summary(error: BaseException) -> str:
    """``Type: first line`` and where it was raised: the innermost frame in mtssl (else the innermost)."""
    message = str(error).strip().splitlines()
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/mtssl/" in f.filename.replace(os.sep, "/")]
    where = (ours or frames)[-1] if frames else None
    place = f" at {os.path.relpath(where.filename, REPO)}:{where.lineno} ({where.name})" if where else ""
    return f"{type(error).__name__}: {message[0][:300] if message else ''}{place}"


def write_results(run: Run) -> None:
    """Rewrite DIR/gpu_acceptance.json and .md (through a temporary file and a rename each)."""
    run.results["seconds"] = round(time.monotonic() - run.started, 1)
    for name, text in ((RESULTS_JSON, json.dumps(run.results, indent=1, default=str)),
                       (RESULTS_MD, markdown_report(run.results))):
        tmp = run.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run.out / name)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_report(results: dict) -> str:
    """One table: a row per check, the stage's status on its first row."""
    head = results.get("environment", {})
    lines = [f"# GPU acceptance run ({results.get('scale')})", "",
             f"{results.get('date')}, {head.get('device', '?')}, torch {head.get('torch', '?')}, "
             f"{results.get('seconds')} s; `{results.get('command')}`", "",
             "| stage | status | check | result | value | criterion |", "| --- | --- | --- | --- | --- | --- |"]
    for stage in results.get("stages", []):
        status = f"**{stage['status']}** ({stage['seconds']:.0f} s / {stage['budget_s']:.0f} s)"
        rows = stage["checks"] or [{"name": "-", "status": "", "value": "", "criterion": "", "reason": ""}]
        if stage.get("error"):
            rows = [*rows, {"name": "stage error", "status": FAIL, "value": stage["error"], "criterion": "", "reason": ""}]
        if stage.get("reason") and not stage["checks"]:
            rows = [{"name": "-", "status": SKIPPED, "value": "", "criterion": "", "reason": stage["reason"]}]
        for i, check in enumerate(rows):
            result = check["status"] + (f" ({check['reason']})" if check.get("reason") else "")
            lines.append("| " + " | ".join(_cell(c) for c in (stage["name"] if i == 0 else "", status if i == 0 else "",
                                                                check["name"], result, check["value"],
                                                                check["criterion"])) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Packages and the config: the only places that know how the checkout is laid out.

def ensure_packages(wheels: Path, site: Path) -> dict:
    """Install the travelling wheels into ``site`` (prepended to sys.path) when any of their packages is absent.

    Pure-python wheels built by benchmarks/build_gpu_wheels.sh; pip runs offline (--no-index) and without
    dependencies (their own needs, PyYAML, packaging, cloudpickle and typing_extensions, are on the GPU image).
    """
    missing = [name for name in TRAVELLING_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return {"installed": []}
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    needed = ", ".join(TRAVELLING_PACKAGES[m] for m in missing)
    if not files:
        raise SystemExit(f"gpu_acceptance: {needed} not installed and no wheels in {wheels}; build them where PyPI is "
                         f"reachable with `bash {BUILD_WHEELS}` and copy that folder with the checkout (git ignores it)")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"gpu_acceptance: installing {needed} from {wheels} failed:\n{done.stderr.strip()[-2000:]}")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    still = [m for m in missing if importlib.util.find_spec(m) is None]
    if still:
        raise SystemExit(f"gpu_acceptance: {', '.join(still)} still missing after installing {[f.name for f in files]}")
    return {"installed": [f.name for f in files], "site": str(site)}


def job_config(run: Run, *overrides: str, backbone: str = "resnet50"):
    """The job config of a stage: the ImageNet profile's job with the stage's overrides, composed, resolved and
    validated by mtssl.config. The one place this script composes configs.

    The base is what regime/imagenet_200ep.yaml runs (BYOL, global + local + cutout views, separate
    predictors, ResNet-50, the gpu pipeline, per-view mode, bf16 on CUDA), on the synthetic folder, with
    checkpoints only at the end of a fit and an epoch count no stage reaches (``train.max_steps`` stops fits).
    ``backbone``: the preset, given apart so the rehearsal can shrink it.
    """
    from mtssl.config import compose_config, resolve_config
    from mtssl.config.validate import validate_config

    base = [
        "method=byol", "views=global_local_cutout", "predictor=separate", f"backbone={backbone}", "data=imagefolder",
        "data.pipeline=gpu", f"data.root={run.data.root}", "data.subset=null", f"data.num_workers={run.scale.workers}",
        f"train.device={run.device.type}", f"out_dir={run.work / 'out'}", "train.epochs=1000",
        f"train.batch_size={run.scale.audit_batch}",
        "train.checkpoint_every_steps=1000000", "train.checkpoint_every_min=100000",
        f"eval.knn_k=[{','.join(map(str, run.scale.knn_k))}]",
    ]
    if run.scale.tiny:
        base += TINY_BACKBONES["vit" if backbone.startswith("vit") else "resnet"] + TINY_JOB
    cfg = resolve_config(compose_config(base + list(overrides)))
    validate_config(cfg, world_size=1)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data: photo-like JPEGs.

@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 4, (512, 512, 3)).round().astype(np.int16)


def photo_like(width: int, height: int, seed: int):
    """A PIL RGB image: two random colour fields (8 and 32 cells across) blended, plus sensor noise (a shifted
    tile of Gaussian noise, sigma 4 levels: drawing it per image would cost more than the JPEG encode)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, 6 * height // width), 8, 3), dtype=np.uint8))
    fine = Image.fromarray(rng.integers(0, 256, (max(2, 24 * height // width), 32, 3), dtype=np.uint8))
    image = Image.blend(coarse.resize((width, height), Image.BICUBIC), fine.resize((width, height), Image.BICUBIC), 0.3)
    tile = _noise_tile()
    dy, dx = (int(v) for v in rng.integers(0, tile.shape[0], 2))
    noise = np.tile(tile, (height // tile.shape[0] + 2, width // tile.shape[1] + 2, 1))[dy: dy + height, dx: dx + width]
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def write_jpeg(task: tuple[str, int, int, int, str]) -> None:
    """(path, width, height, seed, kind): kind baseline | progressive | grayscale | cmyk | truncated | not_a_jpeg."""
    import io

    path, width, height, seed, kind = task
    if kind == "not_a_jpeg":
        Path(path).write_bytes(b"this is not an image\n" * 64)
        return
    image = photo_like(width, height, seed).convert({"grayscale": "L", "cmyk": "CMYK"}.get(kind, "RGB"))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, progressive=kind == "progressive")
    data = buffer.getvalue()
    Path(path).write_bytes(data[: len(data) // 2] if kind == "truncated" else data)


def make_data(root: Path, scale: Scale) -> Data:
    """root/images/{train,val}/class_k/*.jpg (clean: baseline, every 8th progressive, every 16th grayscale, every
    10th large) and root/special/<kind>.jpg. In threads on the GPU machine (PIL resizes and encodes without the
    GIL; no forked process beside CUDA)."""
    tasks = []
    for split, per_class in (("train", scale.train_per_class), ("val", scale.val_per_class)):
        for c in range(scale.classes):
            folder = root / "images" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                kind = "progressive" if i % 8 == 5 else "grayscale" if i % 16 == 9 else "baseline"
                size = scale.large_image if i % 10 == 3 and split == "train" else scale.image
                seed = c * 100_003 + i + (0 if split == "train" else 50_000)
                tasks.append((str(folder / f"{i:04d}.jpg"), *size, seed, kind if split == "train" else "baseline"))
    special = {kind: root / "special" / f"{kind}.jpg"
               for kind in ("baseline", "progressive", "grayscale", "cmyk", "truncated", "not_a_jpeg")}
    (root / "special").mkdir(parents=True)
    tasks += [(str(path), *scale.image, 7_000 + i, kind) for i, (kind, path) in enumerate(special.items())]
    workers = min(16, os.cpu_count() or 1) if not scale.tiny else 1
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(write_jpeg, tasks))
    else:
        for task in tasks:
            write_jpeg(task)
    return Data(root / "images", special)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers of the stages.

def synchronize(run: Run) -> None:
    if run.cuda:
        torch.cuda.synchronize(run.device)


@contextlib.contextmanager
def sync_debug(run: Run, mode: str = "error"):
    """torch.cuda.set_sync_debug_mode for the block (CUDA only): a host synchronisation inside raises."""
    if not run.cuda:
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def release(run: Run) -> None:
    """Free what a stage left: garbage (Trainers, loaders), cached CUDA blocks, sync-debug mode."""
    gc.collect()
    if run.cuda:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(run.device)
        torch.cuda.empty_cache()


def fit(cfg, run: Run, out_dir: Path, sync_mode: str | None = None):
    """One ``Trainer.fit`` (resuming from out_dir's checkpoints); returns (outcome, trainer)."""
    from mtssl.distributed.preemption import StopRequest
    from mtssl.train.trainer import Trainer

    trainer = Trainer(cfg, run.env, out_dir)
    trainer.sync_debug_mode = sync_mode
    stop = StopRequest()
    try:
        return trainer.fit(stop), trainer
    finally:
        stop.restore()


def finite(values) -> bool:
    return bool(values) and all(math.isfinite(float(v)) for v in values)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


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


def pixel_differences(a: torch.Tensor, b: torch.Tensor, over: float = 3.0) -> dict:
    """Per-pixel |a - b| on the 0..255 scale: max, mean and the share of pixels more than ``over`` levels apart."""
    difference = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    return {"max": float(difference.max()), "mean": float(difference.mean()), "over": over,
            "share_over": float((difference > over).double().mean())}


def levels(views: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised views [B, 3, S, S] back on the 0..255 scale."""
    mean_t = torch.tensor(list(mean), dtype=torch.float64).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float64).view(1, 3, 1, 1)
    return (views.detach().double().cpu() * std_t + mean_t) * 255.0


def _fmt_diff(d: dict) -> str:
    return f"max {d['max']:.3g}, mean {d['mean']:.3g}, {100 * d['share_over']:.3g}% over {d['over']:g} levels"


# ---------------------------------------------------------------------------------------------------------------
# 1. preflight

def nvidia_driver() -> str | None:
    """The NVIDIA driver version as nvidia-smi reports it (torch has no public call for it)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def stage_preflight(run: Run, stage: Stage) -> None:
    import pkgutil

    import torch.distributed as dist

    import mtssl
    from mtssl.distributed.process_group import host_group

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist_name in ("torchvision", "timm", "numpy", "pillow", "tensorboard", "pandas", "tqdm", *TRAVELLING_PACKAGES.values()):
        try:
            versions[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            versions[dist_name] = None
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        versions.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                        nccl=".".join(map(str, nccl)) if isinstance(nccl := torch.cuda.nccl.version(), tuple) else str(nccl),
                        gpu=props.name,
                        capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        multiprocessors=props.multi_processor_count, driver=nvidia_driver())
    stage.numbers["versions"] = versions
    stage.measure("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))

    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    shm_gib = shm.f_frsize * shm.f_blocks / 2**30 if shm else 0.0
    stage.check("/dev/shm size", shm_gib >= 1.0, f"{shm_gib:.1f} GiB", ">= 1 GiB (DataLoader workers pass batches "
                "through it)", shm_gib=shm_gib)

    here = Path(mtssl.__file__).resolve()
    stage.check("mtssl found without PYTHONPATH", REPO in here.parents, str(here), f"under {REPO}")
    failed = {}
    names = [m.name for m in pkgutil.walk_packages(mtssl.__path__, "mtssl.")]
    for name in names + list(TRAVELLING_PACKAGES):
        try:
            importlib.import_module(name)
        except Exception as error:  # every import error is a finding
            failed[name] = error_summary(error)
    stage.check("imports", not failed, f"{len(names)} mtssl modules + {', '.join(TRAVELLING_PACKAGES)}"
                + (f"; failed: {failed}" if failed else ""), "every module imports", failed=failed)

    backend = dist.get_backend()
    x = torch.full((4,), 3.0, device=run.device)
    dist.all_reduce(x)
    stage.check("nccl at world size 1", "nccl" in backend and bool((x == 3.0).all()),
                f"default group {backend}, all_reduce {x.tolist()}", "nccl default group, all_reduce runs",
                cuda_only=True)
    y = torch.full((2,), 2.0)
    dist.all_reduce(y, group=host_group())
    stage.check("gloo host group at world size 1", dist.get_backend(host_group()) == "gloo" and y.tolist() == [2.0, 2.0],
                f"{dist.get_backend(host_group())}, all_reduce {y.tolist()}", "gloo, all_reduce runs")

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    for kind in ("baseline", "progressive", "grayscale", "cmyk"):
        path = run.data.special[kind]
        with Image.open(path) as image:
            expected = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        try:
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=run.device)
            synchronize(run)
            diff = pixel_differences(decoded, expected)
            ok = tuple(decoded.shape) == tuple(expected.shape) and diff["mean"] <= 2.0
            value, numbers = f"{tuple(decoded.shape)}, vs PIL {_fmt_diff(diff)}", diff
        except Exception as error:  # nvJPEG refuses some files (CMYK): the pipeline must then fall back
            ok = kind == "cmyk"
            value, numbers = f"refused: {error_summary(error)}", {}
        criterion = "decodes like PIL (mean |diff| <= 2 levels)" + (
            ", or refuses with an error (gpu_pipeline checks the fallback)" if kind == "cmyk" else "")
        stage.check(f"JPEG decode on {run.device.type}: {kind}", ok, value, criterion, cuda_only=True, **numbers)


# ---------------------------------------------------------------------------------------------------------------
# 2. bf16 BatchNorm kernels

BN_MODES = (("per_view", "none", False), ("per_view+cl", "none", True), ("ghost", "bn_per_view", False),
            ("ghost+cl", "bn_per_view", True))


@contextlib.contextmanager
def true_fp32(run: Run):
    """fp32 convolutions and matmuls without TF32 (cuDNN uses TF32 by default): the reference precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def batch_norm_dtypes(model: torch.nn.Module) -> tuple[dict, list]:
    """Record, in every BatchNorm's forward, the dtypes its input and its (unsharded) weight have: forward
    pre-hooks run after FSDP2's own, which puts the compute parameters in place."""
    from torch.nn.modules.batchnorm import _BatchNorm

    seen: dict[str, set] = {"input": set(), "weight": set()}

    def hook(module, args):
        seen["input"].add(str(args[0].dtype).replace("torch.", ""))
        if module.weight is not None:
            seen["weight"].add(str(module.weight.dtype).replace("torch.", ""))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _BatchNorm)]
    return seen, handles


def stage_bf16_batchnorm(run: Run, stage: Stage) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm
    from train_step import Mode, make_views, step_runner

    views = None
    for name, grouped, channels_last in BN_MODES:
        result = {}
        for precision in ("fp32", "bf16"):
            cfg = job_config(run, f"train.precision={precision}", f"train.batch_size={run.scale.bn_batch}")
            trainer = step_runner(cfg, Mode(name, grouped, channels_last), run.env, run.work / "bn" / name / precision)
            views = views if views is not None else make_views(trainer.layout, run.scale.bn_batch, run.device)
            seen, handles = batch_norm_dtypes(trainer.model)
            with true_fp32(run) if precision == "fp32" else contextlib.nullcontext():
                output = trainer.training_step(views, 0, measure_grad_norm=True)
            for handle in handles:
                handle.remove()
            stats = {str(b.dtype).replace("torch.", "") for m in trainer.model.modules() if isinstance(m, _BatchNorm)
                     for b in (m.running_mean, m.running_var) if b is not None}
            result[precision] = {"loss": float(output.loss), "grad_norm": float(output.grad_norm),
                                 "bn_input": sorted(seen["input"]), "bn_weight": sorted(seen["weight"]),
                                 "bn_running_stats": sorted(stats)}
            del trainer, output
            release(run)
        fp32, bf16 = result["fp32"], result["bf16"]
        stage.numbers[name] = result
        ok_finite = finite([fp32["loss"], fp32["grad_norm"], bf16["loss"], bf16["grad_norm"]])
        gap, tolerance = relative(bf16["grad_norm"], fp32["grad_norm"]), run.scale.bn_grad_tolerance
        stage.check(f"{name}: bf16 step finite, gradient norm vs fp32", ok_finite and gap <= tolerance,
                    f"|g| {bf16['grad_norm']:.5g} vs {fp32['grad_norm']:.5g} (rel {gap:.2e}); loss {bf16['loss']:.5f} "
                    f"vs {fp32['loss']:.5f}", f"finite; relative gap <= {tolerance:g}", relative_gap=gap)
        fp32_bn = bf16["bn_weight"] == ["float32"] and bf16["bn_running_stats"] == ["float32"]
        stage.check(f"{name}: BatchNorm in fp32 under bf16", fp32_bn,
                    f"weights {bf16['bn_weight']}, running stats {bf16['bn_running_stats']}, inputs {bf16['bn_input']}",
                    "weights and running statistics float32")


# ---------------------------------------------------------------------------------------------------------------
# 3. sync audit

AUDIT_JOBS = (  # (name, backbone preset, overrides): the ImageNet profile's job and its variants
    ("imagenet default (BYOL, gpu pipeline)", "resnet50", ()),
    ("MoCo v3 (LARS)", "resnet50", ("method=mocov3",)),
    ("SimSiam + SGD", "resnet50", ("method=simsiam",)),
    ("ViT-S + AdamW", "vit_small", ()),
    ("fast pipeline", "resnet50", ("data.pipeline=fast",)),
    ("gpu pipeline + gpu_decode", "resnet50", ("data.gpu_decode=true",)),
)


def stage_sync_audit(run: Run, stage: Stage) -> None:
    interval = run.scale.audit_checked_steps + 1  # fit checks the steps after its first logging interval
    steps = 2 * interval
    for i, (name, backbone, overrides) in enumerate(AUDIT_JOBS):
        if i and stage.time_left() < stage.budget_s / len(AUDIT_JOBS) / 2:
            stage.skip(name, f"stage budget {stage.budget_s:.0f} s spent")
            continue
        cfg = job_config(run, *overrides, f"train.batch_size={run.scale.audit_batch}",
                         f"train.log_every_steps={interval}", f"train.max_steps={steps}", backbone=backbone)
        start = time.monotonic()
        try:
            outcome, _ = fit(cfg, run, run.work / "audit" / f"job{i}", sync_mode="error")
        except Exception as error:  # a synchronising call raises here: report where, go on with the next job
            stage.check(f"{name}: no host sync in {interval - 1} steps", False, error_summary(error),
                        "no synchronising CUDA call in to_views + training_step", cuda_only=True)
            outcome = None
        if outcome is None:  # out of the except block: its traceback (and the job's Trainer) is gone
            release(run)
            continue
        seconds = time.monotonic() - start
        losses = list(outcome.final_losses.values())
        from mtssl.job_folder import JobStatus
        stage.check(f"{name}: fit completed", outcome.status == JobStatus.COMPLETED and outcome.steps == steps and finite(losses),
                    f"{outcome.status}, {outcome.steps} steps, loss {outcome.final_losses.get('loss', float('nan')):.4f}, "
                    f"{outcome.images_per_s:.0f} img/s, {seconds:.1f} s", f"completed {steps} steps, losses finite",
                    images_per_s=outcome.images_per_s, skipped_files=len(outcome.skipped_files))
        stage.check(f"{name}: no host sync in {interval - 1} steps", True, "none raised",
                    "no synchronising CUDA call in to_views + training_step", cuda_only=True)
        del outcome
        release(run)


# ---------------------------------------------------------------------------------------------------------------
# 4. the gpu pipeline

def stage_gpu_pipeline(run: Run, stage: Stage) -> None:
    import inspect
    from unittest import mock

    from PIL import Image

    import mtssl.data.gpu_augment as gpu_augment
    from mtssl.data.image_folder import AugmentedImageFolder, collate_views, sample_seed
    from mtssl.data.pipelines import AUGMENTATION_PIPELINES
    from mtssl.data.views import build_view_layout
    from mtssl.train.trainer import training_samples
    from omegaconf import OmegaConf

    cfg = job_config(run)
    mean, std, seed = cfg.data.mean, cfg.data.std, cfg.train.seed
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    samples = training_samples(cfg)[: run.scale.pipeline_batch]

    def batch_of(transform, items):
        dataset = AugmentedImageFolder(items, transform, seed)
        views, _, skipped = collate_views([dataset[(0, i)] for i in range(len(items))], transform.collate)
        return views, skipped

    gpu = AUGMENTATION_PIPELINES["gpu"](layout, mean, std)
    batch, _ = batch_of(gpu, samples)
    on_device = [levels(v, mean, std) for v in gpu.to_views(batch, run.device)]
    on_cpu = [levels(v, mean, std) for v in gpu.to_views(batch, torch.device("cpu"))]
    diff = pixel_differences(torch.cat([v.flatten() for v in on_device]), torch.cat([v.flatten() for v in on_cpu]))
    # The CUDA path resizes in float (no uint8 kernel there); on the CPU the float path against the uint8 kernel
    # measured mean 0.145 levels, 0.25% of pixels over 2 and 0.024% over 3 levels (16 photo-like 500 x 375 JPEGs).
    stage.check(f"{run.device.type} vs CPU (uint8 resize)", diff["mean"] <= 0.25 and diff["share_over"] <= 1e-3,
                _fmt_diff(diff), "mean <= 0.25 levels, <= 0.1% of pixels over 3 levels", cuda_only=True, **diff)

    if "uint8_kernel" in inspect.signature(gpu_augment.resize_crops).parameters:
        uint8_resize = gpu_augment.resize_crops

        def float_resize(crops, size, uint8_kernel=None):  # the float kernel, whatever the caller asks for
            return uint8_resize(crops, size, uint8_kernel=False)

        with mock.patch.object(gpu_augment, "resize_crops", float_resize):
            on_cpu_float = [levels(v, mean, std) for v in gpu.to_views(batch, torch.device("cpu"))]
        diff = pixel_differences(torch.cat([v.flatten() for v in on_device]),
                                 torch.cat([v.flatten() for v in on_cpu_float]), over=1.0)
        stage.check(f"{run.device.type} vs CPU float path", diff["mean"] <= 0.05 and diff["share_over"] <= 1e-3,
                    _fmt_diff(diff), "same arithmetic: mean <= 0.05 levels, <= 0.1% of pixels over 1 level",
                    cuda_only=True, **diff)
    else:
        stage.skip("vs CPU float path", "resize_crops has no uint8_kernel parameter any more")

    fast = AUGMENTATION_PIPELINES["fast"](layout, mean, std)
    expected = []
    for i, (path, _) in enumerate(samples):  # the same per-sample seeds as AugmentedImageFolder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(seed, 0, i))
            with Image.open(path) as image:
                expected.append(fast.float_views(image))
    diffs = [pixel_differences(on_device[v][i], expected[i][v].expand(3, -1, -1).unsqueeze(0))
             for i in range(len(samples)) for v in range(len(on_device))]
    diff = {"max": max(d["max"] for d in diffs), "mean": statistics.fmean(d["mean"] for d in diffs), "over": 3.0,
            "share_over": statistics.fmean(d["share_over"] for d in diffs)}
    stage.check(f"gpu on {run.device.type} vs fast (same seeds)", diff["mean"] <= 0.25 and diff["share_over"] <= 1e-3,
                _fmt_diff(diff), "mean <= 0.25 levels, <= 0.1% of pixels over 3 levels", **diff)

    decoding = AUGMENTATION_PIPELINES["gpu"](layout, mean, std)
    decoding.decode_on_device = True  # as the Trainer sets it for data.gpu_decode on CUDA
    try:
        device_batch, _ = batch_of(decoding, samples)
        decoded = [levels(v, mean, std) for v in decoding.to_views(device_batch, run.device)]
        diff = pixel_differences(torch.cat([v.flatten() for v in decoded]), torch.cat([v.flatten() for v in on_device]))
        stage.check("gpu_decode vs worker decode", diff["mean"] <= 1.0, _fmt_diff(diff),
                    "mean <= 1 level (two JPEG decoders)", cuda_only=True, **diff)
    except Exception as error:
        stage.check("gpu_decode vs worker decode", False, error_summary(error), "mean <= 1 level", cuda_only=True)

    special = run.data.special
    bad = [(str(special[k]), 0) for k in ("baseline", "cmyk", "truncated", "not_a_jpeg", "progressive", "grayscale")]
    for name, transform in (("worker decode", gpu), ("gpu_decode", decoding)):
        try:
            views, skipped = batch_of(transform, bad)
            out = transform.to_views(views, run.device)
            ok = all(bool(torch.isfinite(v).all()) for v in out)
            value = f"{out[0].shape[0]} samples, skipped {sorted(Path(p).name for p in skipped)}"
        except Exception as error:
            ok, value = False, error_summary(error)
        stage.check(f"{name}: a batch with CMYK, truncated and non-JPEG files", ok, value,
                    "no exception; the unreadable skipped, views finite", cuda_only=name == "gpu_decode")

    side = run.scale.large_crop  # a smooth colour field plus noise, uint8 [3, side, side]
    field = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 255
    crop = torch.nn.functional.interpolate(field, size=(side, side), mode="bilinear", align_corners=False)[0]
    crop = (crop + 4 * torch.randn(crop.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 255).to(torch.uint8)
    factor = run.scale.large_crop / 96
    try:
        got = gpu_augment.resize_crops([crop.to(run.device)], 96)
        reference = gpu_augment.resize_crops([crop], 96)
        diff = pixel_differences(got, reference)
        stage.check(f"resize {factor:.0f}x down on {run.device.type} (item 6)", diff["share_over"] <= 1e-3,
                    _fmt_diff(diff) + " vs CPU", "runs; <= 0.1% of pixels over 3 levels from the CPU's", cuda_only=True, **diff)
    except Exception as error:
        stage.check(f"resize {factor:.0f}x down on {run.device.type} (item 6)", False, error_summary(error), "runs",
                    cuda_only=True)


# ---------------------------------------------------------------------------------------------------------------
# 5. the prefetcher

NEXT_ANNOTATION = "gpu_acceptance.prefetcher_next"
TRACE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", "cuda_driver", "user_annotation",
                    "gpu_user_annotation"}
SYNCHRONISING_CALLS = {"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                       "cudaMemcpy2D", "cudaMemset", "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize"}


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intersection of two merged (sorted, disjoint) interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        start, end = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if start < end:
            out.append((start, end))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def analyse_prefetch_trace(events: list[dict], annotation: str = NEXT_ANNOTATION) -> dict:
    """From a Chrome trace of torch.profiler (``traceEvents``): where host-to-device copies ran, how much of the
    side-stream copy time overlapped kernels on the compute stream (the stream with the most kernel time), and
    the synchronising CUDA runtime calls made inside ``annotation`` ranges (the prefetcher's ``next()``).

    Overlap alone misjudges a host-bound step, whose compute stream is idle most of the time with nothing to
    run: a copy made then costs nothing. The copy delays training only where the compute stream is idle while a
    kernel already launched to it waits (``compute_wait_share``): a kernel is queued from the end of its launch
    call (matched by correlation id) to its start."""
    def stream(event):
        return (event.get("args") or {}).get("stream", event.get("tid"))

    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in complete if e.get("cat") == "kernel"]
    copies = [e for e in complete if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    busy: dict = {}
    for kernel in kernels:
        busy[stream(kernel)] = busy.get(stream(kernel), 0.0) + kernel["dur"]
    compute = max(busy, key=busy.get) if busy else None
    compute_kernels = _merged([(k["ts"], k["ts"] + k["dur"]) for k in kernels if stream(k) == compute])
    side = [c for c in copies if stream(c) != compute]
    side_time = sum(c["dur"] for c in side)
    side_copies = _merged([(c["ts"], c["ts"] + c["dur"]) for c in side])
    overlap = _length(_intersection(side_copies, compute_kernels))
    launched = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in complete
                if e.get("cat") == "cuda_runtime" and "correlation" in (e.get("args") or {})}
    queued = _merged([(launched[k["args"]["correlation"]], k["ts"]) for k in kernels if stream(k) == compute
                      and launched.get((k.get("args") or {}).get("correlation"), k["ts"]) < k["ts"]])
    copy_queued = _intersection(side_copies, queued)
    waited = _length(copy_queued) - _length(_intersection(copy_queued, compute_kernels))
    span = (compute_kernels[-1][1] - compute_kernels[0][0]) if compute_kernels else 0.0
    ranges = [(e["ts"], e["ts"] + e["dur"], e.get("tid")) for e in complete
              if e.get("cat") == "user_annotation" and e.get("name") == annotation]
    syncs = [e["name"] for e in complete if e.get("cat") in ("cuda_runtime", "cuda_driver")
             and e.get("name") in SYNCHRONISING_CALLS
             and any(a <= e["ts"] <= b and tid == e.get("tid") for a, b, tid in ranges)]
    copy_bytes = lambda items: int(sum((c.get("args") or {}).get("bytes", 0) for c in items))  # noqa: E731
    return {"compute_stream": compute, "side_streams": sorted({str(stream(c)) for c in side}),
            "side_stream_copies": len(side), "side_stream_copy_bytes": copy_bytes(side),
            "side_stream_pageable_copies": sum("Pageable" in c.get("name", "") for c in side),
            "compute_stream_copies": len(copies) - len(side), "compute_stream_copy_bytes": copy_bytes(copies) - copy_bytes(side),
            "side_copy_us": side_time, "overlap_share": overlap / side_time if side_time else None,
            "compute_wait_us": waited, "compute_wait_share": waited / side_time if side_time else None,
            "compute_busy_share": _length(compute_kernels) / span if span else None,
            "next_calls": len(ranges), "synchronising_calls_in_next": len(syncs), "synchronising_call_names": sorted(set(syncs))}


def stage_prefetcher(run: Run, stage: Stage) -> None:
    """``Trainer.fit``'s loop without its bookkeeping: the run-long loader, the DevicePrefetcher, ``to_views``
    and ``training_step``; every ``next()`` under sync-debug "error", the last steps under the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from mtssl.data.device_prefetch import DevicePrefetcher
    from mtssl.train.trainer import Trainer

    cfg = job_config(run, f"train.batch_size={run.scale.prefetch_batch}")
    trainer = Trainer(cfg, run.env, run.work / "prefetch")
    trainer.model.train()
    warm, steps = run.scale.warmup_steps, run.scale.prefetch_steps
    total = warm + steps
    batches = iter(DevicePrefetcher(trainer.train_loader(0, total), run.device))
    sync_error = None

    def one_step(step: int) -> None:
        nonlocal batches, sync_error
        with record_function(NEXT_ANNOTATION):
            try:
                with sync_debug(run):
                    views, _, _ = next(batches)
            except RuntimeError as error:  # a synchronising call ended the generator: a fresh one, unchecked
                sync_error = sync_error or error_summary(error)
                batches = iter(DevicePrefetcher(trainer.train_loader(step, total), run.device))
                views, _, _ = next(batches)
        trainer.training_step(trainer.transform.to_views(views, run.device), step)

    for step in range(warm):
        one_step(step)
    synchronize(run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    with profile(activities=activities) as prof:
        for step in range(warm, total):
            one_step(step)
        synchronize(run)
    trace = run.work / "prefetch_trace.json"
    prof.export_chrome_trace(str(trace))
    document = json.loads(trace.read_text())
    found = analyse_prefetch_trace(document.get("traceEvents", []))
    stage.numbers.update(found)
    stage.check("trace: one next() range per profiled step", found["next_calls"] == steps,
                f"{found['next_calls']} of {steps}", f"{steps}")
    stage.check(f"next() under sync-debug error ({total} calls)", sync_error is None, sync_error or "none raised",
                "no synchronising call", cuda_only=True)
    stage.check("synchronising CUDA calls inside next() (trace)", found["synchronising_calls_in_next"] == 0,
                f"{found['synchronising_calls_in_next']} {found['synchronising_call_names']}", "0", cuda_only=True)
    moved = found["side_stream_copy_bytes"] + found["compute_stream_copy_bytes"]
    share = found["side_stream_copy_bytes"] / moved if moved else 0.0
    stage.check("batch copies on the side stream, from pinned memory",
                found["side_stream_copies"] >= steps and share >= 0.9 and found["side_stream_pageable_copies"] == 0,
                f"{found['side_stream_copies']} copies ({found['side_stream_pageable_copies']} pageable), "
                f"{found['side_stream_copy_bytes'] / 2**20:.1f} MiB on streams {found['side_streams']}; "
                f"{found['compute_stream_copies']} copies on the compute stream",
                ">= 1 per step, >= 90% of host-to-device bytes, none pageable", cuda_only=True)
    overlap, wait, busy = found["overlap_share"], found["compute_wait_share"], found["compute_busy_share"]
    stage.check("compute stream waiting on side-stream copies", wait is not None and wait <= 0.1,
                "-" if wait is None else f"{100 * wait:.0f}% of {found['side_copy_us'] / 1e3:.2f} ms of copies; "
                f"the copies overlap compute for {100 * overlap:.0f}%, the compute stream is busy "
                f"{100 * (busy or 0):.0f}% of the profiled steps",
                "<= 10% (idle with a launched kernel waiting, while a copy runs)", cuda_only=True)
    if run.cuda:  # the device timeline, the runtime calls and the next() ranges (the CPU operators left out)
        document["traceEvents"] = [e for e in document.get("traceEvents", [])
                                   if e.get("ph") == "M" or e.get("cat") in TRACE_CATEGORIES]
        with gzip.open(run.out / TRACE_FILE, "wt") as target:
            json.dump(document, target)
        if (run.out / TRACE_FILE).stat().st_size > TRACE_MAX_BYTES:
            (run.out / TRACE_FILE).unlink()
        else:
            stage.numbers["trace_file"] = TRACE_FILE


# ---------------------------------------------------------------------------------------------------------------
# 6. throughput and memory

def plain_timm_step(cfg, layout, run: Run) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The baseline step on a list of views: the job's timm backbone, channels_last, bf16 autocast on CUDA, online on
    every view (one call per resolution) and a no-grad copy on the global views, a mean-feature loss and SGD. No
    heads, no FSDP."""
    import timm

    from mtssl.model.siamese import backbone_kwargs

    online = timm.create_model(cfg.backbone.timm_name, num_classes=0, **backbone_kwargs(cfg.backbone)).to(run.device)
    target = timm.create_model(cfg.backbone.timm_name, num_classes=0, **backbone_kwargs(cfg.backbone)).to(run.device)
    online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    target.requires_grad_(False)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.01, momentum=0.9)
    sizes: dict[int, list[int]] = {}
    for i, (name, _) in enumerate(layout.entries):
        sizes.setdefault(layout.type(name).size, []).append(i)
    globals_ = [i for i, (name, _) in enumerate(layout.entries) if name == "global"]

    def step(views: list[torch.Tensor]) -> torch.Tensor:
        autocast = torch.autocast("cuda", torch.bfloat16) if run.cuda else contextlib.nullcontext()
        with autocast:
            features = [online(torch.cat([views[i] for i in group]).contiguous(memory_format=torch.channels_last))
                        for group in sizes.values()]
            loss = sum(f.float().mean() for f in features)
            with torch.no_grad():
                target(torch.cat([views[i] for i in globals_]).contiguous(memory_format=torch.channels_last))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def timed(step: Callable[[int], object], steps: int, warmup: int, run: Run, batch: int) -> dict:
    """images/s and ms per step (wall over ``steps`` after ``warmup``, synchronised), host ms per call (median of
    the unsynchronised calls) and peak memory of the timed steps."""
    for i in range(warmup):
        step(i)
    synchronize(run)
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    host = []
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        call = time.perf_counter()
        step(i)
        host.append(time.perf_counter() - call)
    synchronize(run)
    wall = time.perf_counter() - start
    return {"images_per_s": batch * steps / wall, "step_ms": 1000 * wall / steps, "call_ms": 1000 * statistics.median(host),
            "peak_memory_gib": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.cuda else None}


def flops_of(step: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def stage_throughput(run: Run, stage: Stage) -> None:
    from omegaconf import OmegaConf
    from train_step import Mode, make_views, peak_flops, step_runner

    scale = run.scale
    batch = scale.throughput_batch
    cfg = job_config(run, f"train.batch_size={batch}")
    peak = peak_flops(run.device)
    modes = [(Mode("per_view", "none"), False), (Mode("ghost", "bn_per_view"), False),
             (Mode("ghost+cl", "bn_per_view", channels_last=True), False), (Mode("per_view", "none"), True)]
    rows: dict[str, dict] = {}
    views = small = layout = None
    for mode, checkpointing in modes:
        label = mode.name + (" + activation checkpointing" if checkpointing else "")
        mode_cfg = OmegaConf.merge(cfg, {"train": {"activation_checkpointing": checkpointing}})
        trainer = step_runner(mode_cfg, mode, run.env, run.work / "throughput" / label.replace(" ", "_"))
        if views is None:
            layout = trainer.layout
            views = make_views(layout, batch, run.device)
            small = [v[: scale.host_batch].contiguous() for v in views]
            stage.numbers["flops_per_step"] = flops = flops_of(lambda: trainer.training_step(views, 0))
        row = timed(lambda i: trainer.training_step(views, i), scale.throughput_steps, scale.warmup_steps, run, batch)
        # The same step at a tiny batch: the device work is negligible, so its time is the host's.
        row["host_ms"] = timed(lambda i: trainer.training_step(small, i), scale.throughput_steps, scale.warmup_steps,
                               run, scale.host_batch)["step_ms"]
        row["finite"] = bool(torch.isfinite(trainer.training_step(views, 0).loss))
        row["mfu"] = mfu(flops, 1000 / row["step_ms"], peak)
        rows[label] = row
        trainer = None
        release(run)
    baseline = plain_timm_step(cfg, layout, run)
    stage.numbers["baseline_flops_per_step"] = baseline_flops = flops_of(lambda: baseline(views))
    row = rows["plain timm"] = timed(lambda i: baseline(views), scale.throughput_steps, scale.warmup_steps, run, batch)
    row["host_ms"] = timed(lambda i: baseline(small), scale.throughput_steps, scale.warmup_steps, run,
                           scale.host_batch)["step_ms"]
    row["finite"] = bool(torch.isfinite(baseline(views)))
    row["mfu"] = mfu(baseline_flops, 1000 / row["step_ms"], peak)
    baseline = None
    release(run)
    stage.numbers["rows"] = rows
    reference = rows["plain timm"]["images_per_s"]
    for label, row in rows.items():
        memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f} GiB"
        efficiency = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        value = (f"{row['images_per_s']:.0f} img/s ({row['images_per_s'] / reference:.2f}x plain timm), MFU {efficiency}, "
                 f"{row['step_ms']:.1f} ms/step, host {row['host_ms']:.1f} ms/step, peak {memory}")
        stage.check(label, row["finite"], value, "runs, loss finite (numbers: measured)")
    with_ac, without = rows["per_view + activation checkpointing"], rows["per_view"]
    if run.cuda:
        stage.check("activation checkpointing lowers peak memory", with_ac["peak_memory_gib"] < without["peak_memory_gib"],
                    f"{with_ac['peak_memory_gib']:.1f} vs {without['peak_memory_gib']:.1f} GiB", "lower")
    else:
        stage.skip("activation checkpointing lowers peak memory", CUDA_ONLY, "lower")


# ---------------------------------------------------------------------------------------------------------------
# 7. bitwise resume

def stage_resume(run: Run, stage: Stage) -> None:
    from omegaconf import OmegaConf

    from mtssl.distributed.fsdp import full_state_dict
    from mtssl.train.trainer import configure_determinism

    total = run.scale.resume_steps
    half = total // 2
    cfg = job_config(run, "train.cuda_deterministic=true", f"train.batch_size={run.scale.resume_batch}",
                     f"train.log_every_steps={half}", backbone="resnet18")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    configure_determinism(cfg.train, run.device)
    try:
        # train.max_steps is not a training field: all three fits share the config hash (and the checkpoints).
        until = lambda steps: OmegaConf.merge(cfg, {"train": {"max_steps": steps}})  # noqa: E731
        with warnings.catch_warnings(record=True) as caught:  # ops without a deterministic kernel warn (warn_only)
            warnings.simplefilter("always")
            whole, trainer = fit(until(total), run, run.work / "resume" / "whole")
            uninterrupted = full_state_dict(trainer.model)
            del trainer
            first, _ = fit(until(half), run, run.work / "resume" / "stopped")
            resumed_outcome, trainer = fit(until(total), run, run.work / "resume" / "stopped")
            resumed = full_state_dict(trainer.model)
            del trainer
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    nondeterministic = sorted({str(w.message).splitlines()[0][:200] for w in caught if "determinis" in str(w.message)})
    stage.measure("ops without a deterministic kernel (warnings)", "; ".join(nondeterministic) or "none",
                  ops=nondeterministic)
    bitwise, largest = compare_states(uninterrupted, resumed)
    from mtssl.job_folder import JobStatus
    stage.check("runs completed", whole.status == first.status == resumed_outcome.status == JobStatus.COMPLETED
                and resumed_outcome.steps == total, f"{whole.steps} steps; {first.steps} + {total - first.steps} resumed",
                f"{total} steps each")
    stage.check(f"resumed at step {half} vs uninterrupted ({total} steps, ResNet-18, cuda_deterministic)", bitwise,
                "bitwise equal" if bitwise else f"max |diff| {largest:.3g}", "bitwise equal weights, BN statistics, "
                "target", max_abs_diff=largest, tensors=len(resumed))


# ---------------------------------------------------------------------------------------------------------------
# 8. evaluation

def stage_evaluation(run: Run, stage: Stage) -> None:
    from mtssl.distributed.fsdp import full_state_dict
    from mtssl.eval.features import FeatureShard
    from mtssl.eval.end_of_training import evaluate_states
    from mtssl.eval.knn import knn_classify, knn_classify_sharded
    from mtssl.eval.knn_monitor import KnnMonitor
    from mtssl.train.trainer import Trainer
    from train_step import make_views

    device, cpu = run.device, torch.device("cpu")
    n_train, n_val, dim = run.scale.knn_bank
    classes, ks, temperature = 10, run.scale.knn_k, 0.07

    def shard(features, labels, padding: int = 0) -> FeatureShard:
        """One rank's shard of the whole set; ``padding`` rows repeat the first ones, marked invalid, as the
        feature extraction pads the last rank's share."""
        n = features.shape[0]
        index = torch.cat([torch.arange(n), torch.arange(padding)])
        valid = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(padding, dtype=torch.bool)])
        move = lambda t: t.to(features.device)  # noqa: E731
        return FeatureShard(features[move(index)], labels[move(index)], move(index), move(valid), n)

    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(n_train, dim, generator=g), torch.randn(n_val, dim, generator=g)
    train_y, val_y = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_val,), generator=g)
    one = knn_classify(train.to(device), train_y.to(device), val.to(device), val_y.to(device), classes, ks, temperature)
    sharded = knn_classify_sharded(shard(train.to(device), train_y.to(device), 3), shard(val.to(device), val_y.to(device), 5),
                                   classes, ks, temperature)
    stage.check(f"sharded kNN (padded shards) vs one-process kNN on {device.type}", sharded == one,
                f"k{max(ks)} top-1 {sharded[f'k{max(ks)}']['top1']:.2f} vs {one[f'k{max(ks)}']['top1']:.2f}",
                "equal accuracies", sharded=sharded, one_process=one)

    # The tie rule (the k-th place goes to the smaller global index) decides the neighbours alone only where the
    # similarities are equal on every device: on a grid of 16 levels (exact in float32, ties at the k-th value in
    # every row), the neighbours chosen on the device must be those of an exact integer sort by (level, index).
    from mtssl.eval.knn import _top_k_by_index

    levels = torch.randint(0, 16, (n_val, n_train), generator=g)
    index = torch.randperm(n_train, generator=g)  # a shard's global indices, in no order
    expected = index[((15 - levels) * n_train + index).topk(max(ks), dim=1, largest=False).indices]
    chosen = index.to(device)[_top_k_by_index((levels.float() / 16).to(device), index.to(device), max(ks))[1]].cpu()
    differing = int((chosen != expected).any(dim=1).sum())
    stage.check(f"top-k with exact ties on {device.type}: the neighbours of an exact sort by (similarity, index)",
                differing == 0, f"{differing} of {n_val} queries with other neighbours",
                "0 (ties go to the smaller index on every device)")
    # End to end on tied features, the devices' float rounding differs (matmul, exp, the order of scatter_add),
    # which can flip a near-equal vote: measured, not judged.
    tied_train, tied_val = train.clone(), val.clone()
    quarter = n_train // 4
    tied_train[2 * quarter: 3 * quarter] = tied_train[:quarter] * 2.0  # exact cosine ties, other labels
    tied_val[: n_val // 4] = tied_train[: n_val // 4]
    results = [knn_classify_sharded(shard(tied_train.to(d), train_y.to(d), pad), shard(tied_val.to(d), val_y.to(d), pad),
                                    classes, ks, temperature) for d, pad in ((device, 3), (cpu, 0))]
    stage.measure(f"sharded kNN with exact ties: padded shards on {device.type} vs one unpadded shard on CPU",
                  ", ".join(f"k{k} top-1 {results[0][f'k{k}']['top1']:.2f} vs {results[1][f'k{k}']['top1']:.2f}" for k in ks),
                  device=results[0], cpu=results[1])

    # Collapsed features (item 8): every similarity ties; the neighbours must be the smallest indices.
    n = run.scale.collapsed_bank
    labels = (torch.arange(n) // 32) % classes  # the first 32 rows are class 0
    bank = torch.ones(n, 256, device=device)
    queries = torch.ones(1024 if run.cuda else 64, 256, device=device)
    if run.cuda:
        synchronize(run)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if run.cuda else 0
    start = time.monotonic()
    collapsed = knn_classify_sharded(shard(bank, labels.to(device)),
                                     shard(queries, torch.zeros(queries.shape[0], dtype=torch.int64, device=device)),
                                     classes, ks, temperature, chunk_size=queries.shape[0])
    seconds = time.monotonic() - start
    block = queries.shape[0] * n * 4  # the float32 similarities of one block of queries
    stage.check(f"collapsed features, {n} bank rows: neighbours are the smallest indices",
                all(v["top1"] == 100.0 for v in collapsed.values()), f"top-1 {collapsed}", "100% for every k",
                seconds=seconds)
    if run.cuda:
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        stage.check("collapsed features: peak memory of one block (item 8)", extra <= 3 * block / 2**30,
                    f"{extra:.1f} GiB for a {block / 2**30:.1f} GiB block, {seconds:.2f} s", "<= 3 x the block's similarities",
                    peak_gib=extra, block_gib=block / 2**30)
    else:
        stage.skip("collapsed features: peak memory of one block (item 8)", CUDA_ONLY, "<= 3 x the block's similarities")
    del bank, queries
    release(run)

    n_bank, n_val_images = run.scale.eval_images
    cfg = job_config(run, "monitor.knn_every_epochs=1", f"eval.train_subset={n_bank}", f"eval.val_subset={n_val_images}",
                     f"eval.batch_size={min(64, n_bank)}", "eval.linear_epochs=1", "eval.linear_lrs=[0.1]",
                     "train.precision=bf16", f"train.batch_size={run.scale.audit_batch}", backbone="resnet18")
    out = run.work / "evaluation"
    out.mkdir(parents=True)
    trainer = Trainer(cfg, run.env, out)
    trainer.model.train()
    trainer.training_step(make_views(trainer.layout, run.scale.audit_batch, device), 0)  # as at an epoch end
    monitor = KnnMonitor(cfg, run.env, trainer.model.online.backbone, trainer.train_samples, out)
    monitor(1, 0)
    during = monitor.evaluations[-1]
    stage.check("kNN monitor on the FSDP bf16 backbone", math.isfinite(during["top1"]),
                f"top-1 {during['top1']:.2f}, top-5 {during['top5']:.2f}, {during['seconds']:.1f} s", "runs, finite")
    final = evaluate_states(cfg, run.env, full_state_dict(trainer.model.online.backbone), None, trainer.train_samples, out)
    stage.measure("monitor vs end-of-job kNN (item 14)", f"top-1 {during['top1']:.2f} during training vs "
                  f"{final['knn_top1']:.2f} at the end (fp32 copy), linear {final['linear_top1']:.2f}",
                  during=during["top1"], final=final["knn_top1"])


# ---------------------------------------------------------------------------------------------------------------
# 9. compile

@contextlib.contextmanager
def rehearsal_compile_backend(run: Run):
    """CPU rehearsal: dynamo's "eager" backend (graphs, breaks and recompiles as with inductor, no code generation,
    which would take minutes on two cores). On CUDA, torch.compile's default."""
    if run.cuda:
        yield
        return
    original = torch.nn.Module.compile

    def eager(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, "backend": "eager"})

    torch.nn.Module.compile = eager
    try:
        yield
    finally:
        torch.nn.Module.compile = original


def stage_compile(run: Run, stage: Stage) -> None:
    from torch._dynamo.utils import counters
    from train_step import Mode, make_views, step_runner

    batch, steps = run.scale.compile_batch, run.scale.compile_steps
    cfg = job_config(run, f"train.batch_size={batch}")

    eager = step_runner(cfg, Mode("per_view", "none"), run.env, run.work / "compile" / "eager")
    views = make_views(eager.layout, batch, run.device)
    eager_losses, eager_seconds = timed_losses(eager, views, 0, steps, run)
    del eager
    release(run)
    torch._dynamo.reset()
    counters.clear()
    with rehearsal_compile_backend(run):
        compiled = step_runner(cfg, Mode("per_view+compile", "none", compile=True), run.env, run.work / "compile" / "compiled")
        start = time.perf_counter()
        first = float(compiled.training_step(views, 0).loss)
        synchronize(run)
        first_s = time.perf_counter() - start
        frames_first = counters["frames"]["ok"]
        losses, seconds = timed_losses(compiled, views, 1, steps, run)
    compiled_losses = [first] + losses
    breaks = sum(counters["graph_break"].values())
    recompiles = counters["frames"]["ok"] - frames_first
    reasons = [f"{count} x {reason[:160]}" for reason, count in counters["graph_break"].most_common(3)]
    stage.numbers.update(compile_s=first_s, frames=frames_first, unique_graphs=counters["stats"]["unique_graphs"],
                         graph_breaks=breaks, recompiles=recompiles, graph_break_reasons=reasons,
                         eager_losses=eager_losses, compiled_losses=compiled_losses)
    eager_step = statistics.median(eager_seconds[1:]) if steps > 1 else eager_seconds[0]
    compiled_step = statistics.median(seconds) if seconds else first_s
    stage.measure("compile time (first step)", f"{first_s - eager_step:.1f} s, {frames_first} frames, "
                  f"{counters['stats']['unique_graphs']} graphs", compile_s=first_s - eager_step)
    stage.measure(f"graph breaks and recompiles over {steps} steps", f"{breaks} breaks, {recompiles} recompiles"
                  + (f"; {reasons}" if reasons else ""), graph_breaks=breaks, recompiles=recompiles)
    gap = relative(compiled_losses[0], eager_losses[0])
    drift = max(relative(c, e) for c, e in zip(compiled_losses, eager_losses))
    stage.check("eager vs compiled loss", finite(compiled_losses) and gap <= 2e-2,
                f"first step rel {gap:.2e}, largest over {steps} steps {drift:.2e}",
                "finite; first step within 2e-2 (bf16), same weights and views", first=gap, largest=drift)
    stage.measure("speed-up", f"{eager_step / compiled_step:.2f}x ({1000 * eager_step:.1f} -> "
                  f"{1000 * compiled_step:.1f} ms/step)", speedup=eager_step / compiled_step)
    del compiled
    torch._dynamo.reset()


def timed_losses(trainer, views, first: int, stop: int, run: Run) -> tuple[list[float], list[float]]:
    """Losses and synchronised seconds of steps ``first`` .. ``stop`` - 1 (losses read at the end)."""
    losses, seconds = [], []
    for step in range(first, stop):
        start = time.perf_counter()
        losses.append(trainer.training_step(views, step).loss)
        synchronize(run)
        seconds.append(time.perf_counter() - start)
    return [float(v) for v in losses], seconds


# ---------------------------------------------------------------------------------------------------------------
# The run

STAGES: tuple[tuple[str, str, float, Callable[[Run, Stage], None]], ...] = (  # priority order; GPU budgets in s
    ("preflight", "versions, /dev/shm, imports, process groups, CUDA JPEG decode", 20, stage_preflight),
    ("bf16_batchnorm", "bf16 BatchNorm kernels: {per-view, ghost} x {NCHW, channels_last} vs fp32", 40, stage_bf16_batchnorm),
    ("sync_audit", "no host sync in 20 non-logging fit steps, six jobs", 90, stage_sync_audit),
    ("gpu_pipeline", "data.pipeline=gpu on CUDA vs CPU, float path and fast", 25, stage_gpu_pipeline),
    ("prefetcher", "side-stream copy overlap and a sync-free next()", 35, stage_prefetcher),
    ("throughput", "ResNet-50 224/96 at 128: modes vs plain timm, MFU, host time, memory", 60, stage_throughput),
    ("resume", "bitwise resume, ResNet-18, cuda_deterministic", 30, stage_resume),
    ("evaluation", "sharded kNN vs one process, collapsed features, the kNN monitor", 30, stage_evaluation),
    ("compile", "compile time, graph breaks, recompiles, loss, speed-up", 120, stage_compile),
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_acceptance.json / .md (and the trace)")
    parser.add_argument("--cpu-rehearsal", action="store_true", help="tiny sizes on CPU (automatic without CUDA)")
    parser.add_argument("--stages", nargs="+", choices=[s[0] for s in STAGES], help="run only these stages")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help=f"wheels of {BUILD_WHEELS} (default .wheels/)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (GPU default 480)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if str(REPO) not in sys.path:  # mtssl from this checkout, whatever the cwd and PYTHONPATH
        sys.path.insert(0, str(REPO))
    packages = ensure_packages(args.wheels, Path(tempfile.gettempdir()) / "mtssl-gpu-acceptance-site")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    cuda = torch.cuda.is_available() and not args.cpu_rehearsal
    scale = GPU if cuda else REHEARSAL
    if args.time_limit is not None:
        scale = dataclasses.replace(scale, time_limit_s=args.time_limit)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mtssl-gpu-acceptance-"))
    results = {"benchmark": "gpu_acceptance", "scale": scale.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(["python3", "benchmarks/gpu_acceptance.py", *(sys.argv[1:] if argv is None else argv)]),
               "packages": packages, "environment": {"torch": torch.__version__, "device": "CPU"}, "stages": []}
    run = Run(args, scale, args.out, work, started, results, cuda=cuda)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # one process, world size 1
        os.environ.pop(key, None)
    try:
        start = time.monotonic()
        run.data = make_data(work / "data", scale)
        results["data_seconds"] = round(time.monotonic() - start, 1)
        from mtssl.distributed.process_group import destroy_distributed, init_distributed

        run.env = init_distributed("cuda" if cuda else "cpu")
        run.device = run.env.device
        if cuda:
            results["environment"]["device"] = torch.cuda.get_device_name(run.device)
        print(f"gpu_acceptance ({scale.name}) on {results['environment']['device']}, torch {torch.__version__}; "
              f"results in {args.out}", flush=True)
        try:
            for name, title, budget, function in STAGES:
                if args.stages and name not in args.stages:
                    continue
                stage = Stage(name, title, budget, cuda)
                results["stages"].append(stage.record())
                if run.time_left() < budget / 2:
                    stage.reason = f"time: {run.time_left():.0f} s left of the run's {scale.time_limit_s:.0f} s, " \
                                   f"the stage needs about {budget:.0f} s"
                    stage.finish()
                else:
                    write_results(run)  # the stage shows as running: a run cut short says where
                    try:
                        function(run, stage)
                        stage.finish()
                    except Exception as error:  # a stage that breaks is a finding; the next ones still run
                        stage.finish(error)
                    try:
                        release(run)
                    except Exception as error:  # e.g. a CUDA error surfacing at the synchronisation
                        stage.error = stage.error or f"after the stage: {error_summary(error)}"
                        stage.status = FAIL
                results["stages"][-1] = stage.record()
                write_results(run)
                print(f"  {name}: {stage.status} ({stage.seconds:.1f} s, {stage.numbers.get('cpu_seconds', 0)} CPU-s)"
                      + (f" {stage.error}" if stage.error else "")
                      + "".join(f"\n    {c['status']:8} {c['name']}: {c['value']}" for c in stage.checks), flush=True)
        finally:
            destroy_distributed()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(run)
    print(summary(results) + f"\nwrote {args.out / RESULTS_JSON} and {args.out / RESULTS_MD}")
    return 1 if any(s["status"] == FAIL for s in results["stages"]) else 0


def summary(results: dict) -> str:
    """A line per stage with its check counts, then every failed check (the table is in the .md file)."""
    lines = [f"\ngpu_acceptance ({results['scale']}, {results['environment']['device']}, torch "
             f"{results['environment']['torch']}): {results['seconds']} s"]
    failed = []
    for stage in results["stages"]:
        counts = {status: sum(c["status"] == status for c in stage["checks"]) for status in (PASS, FAIL, SKIPPED, MEASURED)}
        lines.append(f"  {stage['name']:15} {stage['status']:8} {stage['seconds']:6.1f} s  "
                     + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + (f"  ({stage['reason']})" if stage["reason"] else ""))
        failed += [f"  {stage['name']}: {c['name']}: {c['value']}" for c in stage["checks"] if c["status"] == FAIL]
        failed += [f"  {stage['name']}: stage error: {stage['error']}"] if stage.get("error") else []
    return "\n".join(lines + (["failed:"] + failed if failed else []))


if __name__ == "__main__":
    sys.exit(main())
