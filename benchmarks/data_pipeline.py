"""Data-pipeline throughput: source images/s of one worker process producing the full view set.

Each source image, read from a JPEG file, becomes the ImageNet view set: 2 global 224 px, 2 local
96 px and 1 cutout 224 px views. One process, one torch thread (as one DataLoader worker), and
each sample augmented under its own seeded RNG exactly as ``AugmentedImageFolder`` does.

    python benchmarks/data_pipeline.py            # 48 JPEGs each of 500x375 and 1600x1200, 5 repetitions
    python benchmarks/data_pipeline.py --quick    # 16 JPEGs, 3 repetitions
    python benchmarks/data_pipeline.py --sizes 500x375             # ImageNet-size images only

Pipelines compared, side by side (interleaved within each repetition):
  torchvision_v2_float   the plain per-sample pipeline as the paper describes it: for each view,
                         v2.Compose([ToImage, ToDtype(float32), RandomResizedCrop, flip, (cutout),
                         ColorJitter p=0.8, RandomGrayscale, GaussianBlur, (solarize), Normalize])
                         applied to the decoded PIL image, every op on float
  mtssl_v2_uint8         mtssl.data.torchvision_augment.MultiViewTransform: the same v2 ops on uint8; its
                         views leave the worker as uint8 (normalisation runs on the device, to_views)
  mtssl_fast             mtssl.data.fast_augment.FastMultiViewTransform on the decoded image (what
                         AugmentedImageFolder passes it today)
  mtssl_fast_lazy_jpeg   FastMultiViewTransform on the undecoded JPEG (Image.open only), which
                         lets it decode at 1/2, 1/4 or 1/8 size when every crop allows

Each row also gives the bytes of one view set as it crosses from the worker to the main process
and the device, and those of a batch of 256 (float32 for the plain pipeline, uint8 for mtssl's).

Results: benchmarks/results/data_pipeline.json. Timings never fail; the goal is >= 2x the
torchvision_v2_float pipeline for mtssl_fast.
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

from mtssl.data.image_folder import load_rgb, sample_seed
from mtssl.data.fast_augment import FastMultiViewTransform
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


def make_pipelines(layout: ViewLayout) -> dict:
    """name -> (loader, transform); the loader turns a path into what the transform receives."""
    fast = FastMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)
    fast_lazy = FastMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)
    return {
        "torchvision_v2_float": (load_rgb, FloatV2MultiView(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "mtssl_v2_uint8": (load_rgb, MultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "mtssl_fast": (load_rgb, fast),
        "mtssl_fast_lazy_jpeg": (Image.open, fast_lazy),
    }


def run_epoch(paths: list[Path], loader, transform, epoch: int) -> tuple[float, int]:
    """Seconds to turn every path into its views, each sample under its own seeded RNG, and the
    bytes of one sample's views (what a DataLoader worker hands over)."""
    start = time.perf_counter()
    for index, path in enumerate(paths):
        image = loader(str(path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(SEED, epoch, index))
            views = transform(image)
        assert len(views) == 5
    return time.perf_counter() - start, sum(v.nbytes for v in views)


def benchmark(paths: list[Path], reps: int, label: str) -> list[dict]:
    layout = imagenet_layout()
    pipelines = make_pipelines(layout)
    names = list(pipelines)
    times = {name: [] for name in names}
    view_set_bytes = {}
    for name in names:  # warm-up: first-call allocations, kernel selection
        run_epoch(paths[:2], *pipelines[name], epoch=-1)
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            seconds, view_set_bytes[name] = run_epoch(paths, *pipelines[name], epoch=rep)
            times[name].append(seconds)
        print(f"  {label}: repetition {rep + 1}/{reps} done", file=sys.stderr)
    rows = []
    base = None
    for name in names:
        rates = [len(paths) / t for t in times[name]]
        median = statistics.median(rates)
        base = base or median
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
            "view_set_bytes": view_set_bytes[name],
            "batch_256_mib": 256 * view_set_bytes[name] / 2**20,
        }
        if isinstance(transform, FastMultiViewTransform):
            calls = reps * len(paths) + 2  # timed images + warm-up
            row["reduced_decode_fraction"] = transform.reduced_decodes / calls
        rows.append(row)
    return rows


def print_rows(rows: list[dict], device: str) -> None:
    header = ["images", "pipeline", "images/s", "[min-max]", "ms/image", "speedup", "reduced decode", "MiB/batch of 256"]
    cells = [[r["images"], r["pipeline"], f"{r['images_per_s']:.1f}", f"[{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}]",
              f"{r['ms_per_image']:.2f}", f"{r['speedup_vs_float_v2']:.2f}x",
              f"{100 * r['reduced_decode_fraction']:.0f}%" if "reduced_decode_fraction" in r else "-",
              f"{r['batch_256_mib']:.1f}"] for r in rows]
    print_table(f"Data pipeline, one worker process (1 torch thread) on {device}: source images/s, 5 views each",
                header, cells, left_columns=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 3 repetitions")
    parser.add_argument("--images", type=int, default=None, help="JPEGs per size (default 48, quick 16)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 3)")
    parser.add_argument("--sizes", nargs="+", default=["500x375", "1600x1200"], help="JPEG sizes WxH (default: ImageNet-like 500x375 and 1600x1200 photos)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    count = args.images or (16 if args.quick else 48)
    reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(1)  # one DataLoader worker's share
    device = f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(v) for v in size.lower().split("x"))
            paths = write_jpegs(Path(tmp), count, width, height)
            rows += benchmark(paths, reps, size)
    print_rows(rows, device)
    write_report(args.out, "data_pipeline", argv, device=device, torch_threads=1, images_per_size=count, reps=reps,
                 views="2 global 224, 2 local 96, 1 cutout 224", rows=rows)


if __name__ == "__main__":
    main()
