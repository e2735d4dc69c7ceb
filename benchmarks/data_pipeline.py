"""Data-pipeline throughput: source images/s of one worker process producing the full view set.

Each source image, read from a JPEG file, becomes the ImageNet view set: 2 global 224 px, 2 local
96 px and 1 cutout 224 px views. One process, one torch thread (as one DataLoader worker), and
each sample augmented under its own seeded RNG exactly as ``AugmentedImageFolder`` does.

    python benchmarks/data_pipeline.py            # 48 JPEGs each of 500x375 and 1600x1200, 5 repetitions
    python benchmarks/data_pipeline.py --quick    # 16 JPEGs, 3 repetitions
    python benchmarks/data_pipeline.py --sizes 500x375             # ImageNet-size images only
    python benchmarks/data_pipeline.py --sizes photo --profile     # real photos, 375-640 px, and the per-stage split

Pipelines compared, side by side (interleaved within each repetition):
  torchvision_v2_float   the plain per-sample pipeline as the paper describes it: for each view,
                         v2.Compose([ToImage, ToDtype(float32), RandomResizedCrop, flip, (cutout),
                         ColorJitter p=0.8, RandomGrayscale, GaussianBlur, (solarize), Normalize])
                         applied to the decoded PIL image, every op on float
  official_order_v2      the official code's order of the same torchvision v2 ops: RandomResizedCrop and flip on
                         uint8, then ToDtype(float32) and every colour op, blur (23 px kernels) and Normalize on float
  mtssl_v2_uint8         mtssl.data.torchvision_augment.MultiViewTransform: the same v2 ops on uint8; its
                         views leave the worker as uint8 (normalisation runs on the device, to_views)
  mtssl_fast             mtssl.data.fast_augment.FastMultiViewTransform on the decoded image (what
                         AugmentedImageFolder passes it today)
  mtssl_fast_lazy_jpeg   FastMultiViewTransform on the undecoded JPEG (Image.open only), which
                         lets it decode at 1/2, 1/4 or 1/8 size when every crop allows
  mtssl_gpu              mtssl.data.gpu_augment.GpuMultiViewTransform's worker part (data.pipeline=gpu):
                         read, decode (reduced when every crop allows), draw every parameter, cut the
                         crops; its device part (``to_views``, batches of --batch images) is timed apart:
                         CPU time per image here for information, and CUDA-event time per image when a
                         GPU is present

Sources: ``WxH`` synthetic photo-like JPEGs of that size, or ``photo``: crops of a real photograph
(matplotlib's sample image grace_hopper.jpg) re-encoded at sizes drawn from 375-640 px per side,
as ImageNet's photos are.

``--profile`` adds the per-stage split of official_order_v2, mtssl_v2_uint8 and mtssl_fast_lazy_jpeg: one more pass
over the images with each stage's function wrapped by a timer (exclusive time: a stage called inside
another counts once), ms per source image and share of the total; "other" is the rest (random draws,
flip, float conversion, cutout, grayscale, Python).

Besides wall-clock images/s, each pipeline's CPU cost: core-milliseconds per source image
(``time.process_time`` of this one-thread process), what a DataLoader worker spends on it.

Ratios are given against torchvision_v2_float (speedup, CPU cost) and against official_order_v2.
Results: benchmarks/results/data_pipeline.json. Timings never fail; the goals are >= 2x the
torchvision_v2_float pipeline's images/s for mtssl_fast, and <= 1/10 of its CPU cost per image for
mtssl_gpu's worker part.

Each row also gives the bytes of one view set as it crosses from the worker to the main process
and the device, and those of a batch of 256 (float32 for the plain pipeline, uint8 for mtssl's).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

import mtssl.data.fast_augment as fast_augment
from mtssl.data.image_folder import load_rgb, sample_seed
from mtssl.data.fast_augment import FastMultiViewTransform
from mtssl.data.device_prefetch import to_device
from mtssl.data.gpu_augment import GpuMultiViewTransform
from mtssl.data.torchvision_augment import Cutout, MultiViewTransform
from mtssl.data.views import VIEW_TYPES, ViewLayout
from report import print_table, write_report

RESULTS = Path(__file__).parent / "results" / "data_pipeline.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEED = 0


class FloatCutout(torch.nn.Module):
    """Cutout on a float image (same box distribution as mtssl's), filled with the dataset mean."""

    def __init__(self, area, mean):
        super().__init__()
        self.area = area
        self.fill = torch.tensor(mean).view(-1, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = Cutout.sample_box(image.shape[-2], image.shape[-1], self.area, (3 / 4, 4 / 3))
        image = image.clone()
        image[..., top : top + h, left : left + w] = self.fill
        return image


class FloatV2MultiView:
    """The plain per-sample torchvision-v2 pipeline: each view converts to float first."""

    def __init__(self, layout: ViewLayout, mean, std):
        self.transforms = []
        for name, index in layout.entries:
            view = layout.type(name)
            ops = [
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.RandomResizedCrop(view.size, scale=view.scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
            ]
            if view.cutout_area is not None:
                ops.append(FloatCutout(view.cutout_area, mean))
            ops += [
                v2.RandomApply([v2.ColorJitter(*view.jitter)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(view.blur_kernel_px(), sigma=(0.1, 2.0))], p=view.blur_probability(index)),
            ]
            if view.solarize_probability(index) > 0:
                ops.append(v2.RandomSolarize(threshold=0.5, p=view.solarize_probability(index)))
            ops.append(v2.Normalize(mean, std))
            self.transforms.append(v2.Compose(ops))

    def __call__(self, image) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


class OfficialOrderMultiView:
    """The official code's per-view pipeline: crop and flip on uint8, every other op on float."""

    def __init__(self, layout: ViewLayout, mean, std):
        self.transforms = []
        for name, index in layout.entries:
            view = layout.type(name)
            ops = [
                v2.RandomResizedCrop(view.size, scale=view.scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.ToDtype(torch.float32, scale=True),
            ]
            if view.cutout_area is not None:
                ops.append(FloatCutout(view.cutout_area, mean))
            ops += [
                v2.RandomApply([v2.ColorJitter(*view.jitter)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(view.blur_kernel_px(), sigma=(0.1, 2.0))], p=view.blur_probability(index)),
            ]
            if view.solarize_probability(index) > 0:
                ops.append(v2.RandomSolarize(threshold=0.5, p=view.solarize_probability(index)))
            ops.append(v2.Normalize(mean, std))
            self.transforms.append(v2.Compose(ops))

    def __call__(self, image) -> list[torch.Tensor]:
        pixels = v2.functional.to_image(image)
        return [t(pixels) for t in self.transforms]


def imagenet_layout() -> ViewLayout:
    return ViewLayout(tuple(VIEW_TYPES[name] for name in ("global", "local", "cutout")))


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth random colour fields at three scales plus mild sensor noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = np.zeros((height, width, 3), dtype=np.float32)
        for cells, amplitude in ((4, 120.0), (16, 60.0), (64, 25.0)):
            field = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
            for c in range(3):
                channel = Image.fromarray(field[:, :, c], mode="F").resize((width, height), Image.BICUBIC)
                image[:, :, c] += amplitude * np.asarray(channel)
        image += rng.normal(0, 4, image.shape).astype(np.float32)
        pixels = np.clip(image + 128, 0, 255).astype(np.uint8)
        path = folder / f"{width}x{height}_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


PHOTO = "photo"  # --sizes token: crops of a real photograph at 375-640 px


def sample_photo() -> Image.Image:
    """A real photograph that ships with a dependency (matplotlib's grace_hopper.jpg, 512 x 600)."""
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def write_photo_jpegs(folder: Path, count: int, seed: int = 0, sizes: tuple[int, int] = (375, 640)) -> list[Path]:
    """``count`` JPEGs (quality 90) cut from the sample photo: a random crop of at least 300 px per side,
    resized to a width and height each drawn from ``sizes``, so the files hold real image detail."""
    rng = np.random.default_rng(seed)
    photo = sample_photo()
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        crop_w, crop_h = int(rng.integers(300, photo.width + 1)), int(rng.integers(300, photo.height + 1))
        left, top = int(rng.integers(0, photo.width - crop_w + 1)), int(rng.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        path = folder / f"photo_{i:03d}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def source_jpegs(folder: Path, size: str, count: int) -> list[Path]:
    """The JPEGs of one ``--sizes`` entry: ``photo`` or ``WxH``."""
    if size == PHOTO:
        return write_photo_jpegs(folder, count)
    width, height = (int(v) for v in size.lower().split("x"))
    return write_jpegs(folder, count, width, height)


class StageTimer:
    """Exclusive wall time per named stage: a stage called inside another is subtracted from it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, time spent in nested stages]

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, nested = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
                if self._stack:
                    self._stack[-1][1] += elapsed

        return timed


FAST_STAGES = {  # fast_augment function -> stage name
    "decode_for_crops": "decode (PIL, reduced when the crops allow)",
    "image_tensor": "pixels to a tensor",
    "sample_crop_box": "crop boxes",
    "crop_resize": "crop + resize (uint8)",
    "adjust_hue": "hue",
    "separable_blur": "blur",
    "solarize": "solarize",
    "_to_uint8": "rounding to uint8",
}


def _stage_name(op) -> str:
    if isinstance(op, v2.RandomApply):
        return "+".join(type(t).__name__ for t in op.transforms)
    return type(op).__name__


def profile_stages(paths: list[Path], pipelines: dict, names: list[str]) -> dict:
    """{pipeline: {stage: ms per source image}} from one timed pass over ``paths`` with every stage wrapped."""
    result = {}
    for name in names:
        loader, transform = pipelines[name]
        timer = StageTimer()
        restore = []
        if isinstance(transform, FastMultiViewTransform):
            for function, stage in FAST_STAGES.items():
                restore.append((fast_augment, function, getattr(fast_augment, function)))
                setattr(fast_augment, function, timer.wrap(stage, getattr(fast_augment, function)))
            jitter = transform._color_jitter
            transform._color_jitter = timer.wrap("colour jitter (brightness, contrast, saturation)", jitter)
        else:  # torchvision v2 pipelines: every op of every view's Compose
            for compose in transform.transforms:
                restore.append((compose, "transforms", list(compose.transforms)))
                compose.transforms = [timer.wrap(_stage_name(op), op) for op in compose.transforms]
            restore.append((v2.functional, "to_image", v2.functional.to_image))
            v2.functional.to_image = timer.wrap("pixels to a tensor", v2.functional.to_image)
        try:
            timed_loader = timer.wrap("decode (PIL)" if loader is load_rgb else "open (lazy)", loader)
            wall, _, _ = run_epoch(paths, timed_loader, transform, epoch=100)
        finally:
            for owner, attribute, value in restore:
                setattr(owner, attribute, value)
            if isinstance(transform, FastMultiViewTransform):
                del transform._color_jitter  # back to the class's method
        stages = {stage: 1000 * seconds / len(paths) for stage, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
        stages["other"] = max(0.0, 1000 * wall / len(paths) - sum(stages.values()))
        result[name] = {"total_ms_per_image": 1000 * wall / len(paths), "stages_ms_per_image": stages}
    return result


def print_profile(label: str, profile: dict) -> None:
    for name, entry in profile.items():
        total = entry["total_ms_per_image"]
        cells = [[stage, f"{ms:.2f}", f"{100 * ms / total:.0f}%"] for stage, ms in entry["stages_ms_per_image"].items()]
        print_table(f"Per-stage split of {name} on {label} ({total:.2f} ms per source image, with the timers)",
                    ["stage", "ms/image", "share"], cells)


def make_pipelines(layout: ViewLayout) -> dict:
    """name -> (loader, transform); the loader turns a path into what the transform receives."""
    fast = FastMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)
    fast_lazy = FastMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)
    return {
        "torchvision_v2_float": (load_rgb, FloatV2MultiView(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "official_order_v2": (load_rgb, OfficialOrderMultiView(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "mtssl_v2_uint8": (load_rgb, MultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "mtssl_fast": (load_rgb, fast),
        "mtssl_fast_lazy_jpeg": (Image.open, fast_lazy),
        "mtssl_gpu": (Image.open, GpuMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)),
    }


def run_epoch(paths: list[Path], loader, transform, epoch: int, keep: list | None = None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds) to turn every path into its views, each sample under its own seeded RNG,
    and the bytes of one sample's views (what a DataLoader worker hands over); ``keep`` collects the outputs."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for index, path in enumerate(paths):
        image = loader(str(path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(SEED, epoch, index))
            views = transform(image)
        assert len(views) in (5, 6)  # 5 views, or the gpu pipeline's parameters + 5 crops
        if keep is not None:
            keep.append(views)
    return time.perf_counter() - start, time.process_time() - start_cpu, sum(v.nbytes for v in views)


def time_device_part(transform: GpuMultiViewTransform, samples: list, batch: int, reps: int) -> dict:
    """ms per image of ``to_views`` on batches of ``batch`` samples: CPU time on the CPU (one thread), and
    CUDA-event time on the GPU when there is one (the batch copied there first, as the trainer does)."""
    batches = [transform.collate(samples[i : i + batch]) for i in range(0, len(samples) - batch + 1, batch)]
    images = len(batches) * batch
    result = {}
    cpu = torch.device("cpu")
    transform.to_views(batches[0], cpu)  # warm-up
    times = []
    for _ in range(reps):
        start = time.process_time()
        for b in batches:
            transform.to_views(b, cpu)
        times.append(time.process_time() - start)
    result["device_part_cpu_ms_per_image"] = 1000 * statistics.median(times) / images
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        on_gpu = [to_device(b, cuda) for b in batches]  # the prefetcher's copy: the tensors, not the layout
        transform.to_views(on_gpu[0], cuda)  # warm-up
        times = []
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for b in on_gpu:
                transform.to_views(b, cuda)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        result["device_part_cuda_ms_per_image"] = statistics.median(times) / images
        result["cuda_device"] = torch.cuda.get_device_name()
    return result


def benchmark(paths: list[Path], reps: int, label: str, batch: int) -> list[dict]:
    layout = imagenet_layout()
    pipelines = make_pipelines(layout)
    names = list(pipelines)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    gpu_samples: list = []
    view_set_bytes = {}
    for name in names:  # warm-up: first-call allocations, kernel selection
        run_epoch(paths[:2], *pipelines[name], epoch=-1)
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            keep = gpu_samples if name == "mtssl_gpu" and rep == 0 else None
            wall, cpu, view_set_bytes[name] = run_epoch(paths, *pipelines[name], epoch=rep, keep=keep)
            times[name].append(wall)
            cpu_times[name].append(cpu)
        print(f"  {label}: repetition {rep + 1}/{reps} done", file=sys.stderr)
    rows = []
    base = base_cpu = None
    official = statistics.median(times["official_order_v2"]), statistics.median(cpu_times["official_order_v2"])
    for name in names:
        rates = [len(paths) / t for t in times[name]]
        median = statistics.median(rates)
        cpu_ms = 1000 * statistics.median(cpu_times[name]) / len(paths)
        base, base_cpu = base or median, base_cpu or cpu_ms
        transform = pipelines[name][1]
        row = {
            "images": label,
            "pipeline": name,
            "images_per_s": median,
            "images_per_s_min": min(rates),
            "images_per_s_max": max(rates),
            "images_per_s_all": rates,
            "ms_per_image": 1000 / median,
            "speedup_vs_float_v2": median / base,
            "cpu_ms_per_image": cpu_ms,
            "cpu_cost_vs_float_v2": cpu_ms / base_cpu,
            "speedup_vs_official_order": official[0] / statistics.median(times[name]),
            "cpu_cost_vs_official_order": statistics.median(cpu_times[name]) / official[1],
            "view_set_bytes": view_set_bytes[name],
            "batch_256_mib": 256 * view_set_bytes[name] / 2**20,
        }
        if isinstance(transform, (FastMultiViewTransform, GpuMultiViewTransform)):
            calls = reps * len(paths) + 2  # timed images + warm-up
            row["reduced_decode_fraction"] = transform.reduced_decodes / calls
        if isinstance(transform, GpuMultiViewTransform):
            row.update(time_device_part(transform, gpu_samples, min(batch, len(gpu_samples)), reps))
        rows.append(row)
    return rows


def print_rows(rows: list[dict], device: str) -> None:
    header = ["images", "pipeline", "images/s", "[min-max]", "ms/image", "speedup", "CPU ms/image", "CPU cost",
              "vs official order", "reduced decode", "MiB/batch of 256", "device part ms/image"]
    cells = []
    for r in rows:
        device_part = "-"
        if "device_part_cpu_ms_per_image" in r:
            device_part = f"{r['device_part_cpu_ms_per_image']:.1f} on CPU"
            if "device_part_cuda_ms_per_image" in r:
                device_part += f", {r['device_part_cuda_ms_per_image']:.3f} on {r['cuda_device']}"
        cells.append([r["images"], r["pipeline"], f"{r['images_per_s']:.1f}", f"[{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}]",
                      f"{r['ms_per_image']:.2f}", f"{r['speedup_vs_float_v2']:.2f}x", f"{r['cpu_ms_per_image']:.2f}",
                      f"{r['cpu_cost_vs_float_v2']:.3f}x",
                      f"{r['speedup_vs_official_order']:.2f}x / {r['cpu_cost_vs_official_order']:.3f}x",
                      f"{100 * r['reduced_decode_fraction']:.0f}%" if "reduced_decode_fraction" in r else "-",
                      f"{r['batch_256_mib']:.1f}", device_part])
    print_table(f"Data pipeline, one worker process (1 torch thread) on {device}: source images/s, 5 views each; "
                "CPU cost = CPU ms per image relative to torchvision_v2_float (mtssl_gpu: its worker part); "
                "vs official order = images/s and CPU-cost ratios to official_order_v2",
                header, cells, left_columns=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 3 repetitions")
    parser.add_argument("--images", type=int, default=None, help="JPEGs per size (default 48, quick 16)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 3)")
    parser.add_argument("--sizes", nargs="+", default=["500x375", "1600x1200"],
                        help="JPEG sources: WxH synthetic photo-like images, or 'photo' (crops of a real photo at 375-640 px); default 500x375 1600x1200")
    parser.add_argument("--profile", action="store_true", help="also the per-stage split of official_order_v2, mtssl_v2_uint8 and mtssl_fast_lazy_jpeg")
    parser.add_argument("--batch", type=int, default=16, help="batch of the gpu pipeline's device part (default 16)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    count = args.images or (16 if args.quick else 48)
    reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(1)  # one DataLoader worker's share
    device = f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = Path(tmp) / size
            folder.mkdir()
            paths = source_jpegs(folder, size, count)
            rows += benchmark(paths, reps, size, args.batch)
            if args.profile:
                pipelines = make_pipelines(imagenet_layout())
                profiled = ["official_order_v2", "mtssl_v2_uint8", "mtssl_fast_lazy_jpeg"]
                for name in profiled:
                    run_epoch(paths[:2], *pipelines[name], epoch=-1)  # warm-up
                profiles[size] = profile_stages(paths, pipelines, profiled)
    print_rows(rows, device)
    for size, profile in profiles.items():
        print_profile(size, profile)
    write_report(args.out, "data_pipeline", argv, device=device, torch_threads=1, images_per_size=count, reps=reps, batch=args.batch,
                 views="2 global 224, 2 local 96, 1 cutout 224", rows=rows, stage_profiles=profiles)


if __name__ == "__main__":
    main()
