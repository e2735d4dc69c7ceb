"""mtssl side by side with lightly and stable-pretraining on the work the three share.

Neither peer has per-view-type predictors or a cutout view, so every side runs the 2 global (224 px)
+ 2 local (96 px) multi-crop BYOL setup, built from each library's own parts:

* data path: source images/s and CPU core-ms per source image to turn the same JPEG files into the
  4 views, for mtssl's pipelines (``torchvision``, ``fast``, and the worker part of ``gpu``) and each
  peer's multi-view transform: lightly's ``DINOTransform`` (2 global + n local crops, PIL ops) and
  stable-pretraining's ``MultiViewTransform`` of its per-view ``Compose`` (the layout of its
  benchmark transforms), both set to mtssl's crop scales, probabilities and jitter strengths;
* training step: images/s of one BYOL step (online backbone, projector and predictor on every view,
  the EMA target on the 2 global views, the loss over every (view, other global view) pair, backward,
  LARS, EMA update) on the same synthetic views and the same timm ResNet-18: mtssl's
  ``Trainer.training_step`` (per-view calls, as the peers' loops make them, and ``ghost``, its fastest
  mode with the same results) against a loop written with lightly's BYOL heads, loss, LARS and
  ``update_momentum``, and one with stable-pretraining's ``methods.BYOL`` parts, ``BYOLLoss``, LARS
  and ``update_teacher``;
* correctness where the formulas coincide: the 2-view BYOL loss and its gradients on the same
  inputs, once on random predictions and targets and once through the whole network (mtssl's weights
  copied into the peer's modules, the same 2 views). mtssl's 2-view loss is l(p1, z2) + l(p2, z1) with
  l = mean(2 - 2 cos); stable-pretraining's is half of it, lightly's (negative cosine) is
  (mtssl - 4) / 4, and the rows compare after that map.

All timings are side by side in one process: interleaved rounds (the order rotates), medians, one
fixed torch thread count (--threads, default 1). Install the peers with ``pip install -e '.[bench]'``;
a peer that is absent or fails to import is skipped with the reason printed.

    python benchmarks/peers.py                        # CPU: 48 photos, 5 rounds, batch 8 steps
    python benchmarks/peers.py --device cuda          # the training step and correctness on the GPU
    python benchmarks/peers.py --images 4 --rounds 1 --batch 2 --global-size 64 --local-size 32   # smoke

Results: benchmarks/results/peers.json. Timings never fail; the correctness rows carry ``ok``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mtssl.data.fast_augment import FastMultiViewTransform
from mtssl.data.gpu_augment import GpuMultiViewTransform
from mtssl.data.image_folder import load_rgb, sample_seed
from mtssl.data.torchvision_augment import MultiViewTransform
from mtssl.data.views import VIEW_TYPES, ViewLayout
from mtssl.distributed.process_group import destroy_distributed, init_distributed
from mtssl.loss.multitask import multitask_loss
from mtssl.loss.objectives import byol_pair_loss
from mtssl.model.siamese import backbone_kwargs, build_backbone
from data_pipeline import IMAGENET_MEAN, IMAGENET_STD, PHOTO, source_jpegs
from report import print_table, write_report
from train_step import Mode, make_views, step_runner

RESULTS = Path(__file__).parent / "results" / "peers.json"
# name -> (import name, the version the docs' table was measured with)
PEERS = {"lightly": ("lightly", "1.6.0"), "stable-pretraining": ("stable_pretraining", "0.1.8")}
INSTALL_HINT = "pip install -e '.[bench]'"
SEED = 0
HEADS = (4096, 256)  # BYOL projector and predictor: hidden, output (mtssl's byol preset)
EMA_TAU = 0.99


def load_peers(names: list[str]) -> tuple[dict, dict[str, str]]:
    """(name -> imported module, name -> why skipped) for the requested peers."""
    modules, skipped = {}, {}
    for name in names:
        module_name, tested = PEERS[name]
        try:
            modules[name] = importlib.import_module(module_name)
        except ImportError as error:
            skipped[name] = f"not installed ({type(error).__name__}: {error}); install the extra: {INSTALL_HINT}"
            continue
        except Exception as error:  # installed but broken here (e.g. built for another torch)
            skipped[name] = f"fails to import: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        version = importlib.metadata.version(name)
        if version != tested:
            print(f"note: {name} {version} installed; the documented table used {tested}", file=sys.stderr)
    return modules, skipped


def peer_versions(modules: dict) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in modules}


def multicrop_layout(global_size: int = 224, local_size: int = 96) -> ViewLayout:
    """mtssl's 2 global + 2 local view types (registry defaults) at the given sizes."""
    return ViewLayout((replace(VIEW_TYPES["global"], size=global_size), replace(VIEW_TYPES["local"], size=local_size)))


# ---------------------------------------------------------------------------------------------------- data path
def lightly_transform(lightly, layout: ViewLayout):
    """lightly's DINOTransform (2 global + n local crops) set to mtssl's view specs."""
    from lightly.transforms.dino_transform import DINOTransform

    g, local = layout.type("global"), layout.type("local")
    assert g.jitter == local.jitter
    brightness, contrast, saturation, hue = g.jitter
    # DINOTransform multiplies the strengths by cj_strength (0.5) for every view, but passes it to
    # only two of its three view transforms (the second global view takes DINOViewTransform's own
    # default, also 0.5): doubled strengths with the default cj_strength give the spec on all views.
    return DINOTransform(
        global_crop_size=g.size, global_crop_scale=tuple(g.scale), local_crop_size=local.size, local_crop_scale=tuple(local.scale),
        n_local_views=local.count, hf_prob=0.5, cj_prob=0.8, cj_bright=2 * brightness, cj_contrast=2 * contrast,
        cj_sat=2 * saturation, cj_hue=2 * hue, random_gray_scale=0.2,
        gaussian_blur=(g.blur_probability(0), g.blur_probability(1), local.blur_probability(0)), sigmas=(0.1, 2.0),
        solarization_prob=g.solarize_probability(1), normalize={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )


class SptTransform:
    """stable-pretraining's MultiViewTransform of one Compose per view, in the order of its benchmark
    transforms (crop, jitter, grayscale, PIL blur, solarize, flip, ToImage with normalisation), set to
    mtssl's view specs: bicubic crops (its default is bilinear) and solarize at 128 on the PIL image."""

    def __init__(self, spt, layout: ViewLayout):
        from torchvision.transforms import InterpolationMode

        T = spt.data.transforms
        views = []
        for name, index in layout.entries:
            view = layout.type(name)
            ops = [
                T.RGB(),
                T.RandomResizedCrop((view.size, view.size), scale=tuple(view.scale), interpolation=InterpolationMode.BICUBIC),
                T.ColorJitter(*view.jitter, p=0.8),
                T.RandomGrayscale(p=0.2),
                T.PILGaussianBlur(p=view.blur_probability(index)),
            ]
            if view.solarize_probability(index) > 0:
                ops.append(T.RandomSolarize(threshold=128, p=view.solarize_probability(index)))
            ops += [T.RandomHorizontalFlip(p=0.5), T.ToImage(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
            views.append(T.Compose(*ops))
        self.transform = T.MultiViewTransform(views)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view["image"] for view in self.transform({"image": image})["views"]]


def data_pipelines(layout: ViewLayout, peers: dict) -> dict[str, tuple[Callable, Callable]]:
    """name -> (loader: path -> what the transform takes, transform -> list of views)."""
    pipelines = {
        "mtssl torchvision": (load_rgb, MultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "mtssl fast": (Image.open, FastMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)),
        "mtssl gpu (worker part)": (Image.open, GpuMultiViewTransform(layout, IMAGENET_MEAN, IMAGENET_STD)),
    }
    if "lightly" in peers:
        pipelines["lightly DINOTransform"] = (load_rgb, lightly_transform(peers["lightly"], layout))
    if "stable-pretraining" in peers:
        pipelines["stable-pretraining MultiViewTransform"] = (load_rgb, SptTransform(peers["stable-pretraining"], layout))
    return pipelines


def run_images(paths: list[Path], loader, transform, epoch: int) -> tuple[float, float]:
    """(wall s, process CPU s) to turn every path into its views, each sample under its own seed
    (torch and NumPy: lightly draws from NumPy's global RNG)."""
    numpy_state = np.random.get_state()
    start, start_cpu = time.perf_counter(), time.process_time()
    for index, path in enumerate(paths):
        image = loader(str(path))
        seed = sample_seed(SEED, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            transform(image)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    np.random.set_state(numpy_state)
    return wall, cpu


def interleaved(entries: dict[str, Callable[[int], tuple[float, float]]], rounds: int, label: str) -> dict[str, dict[str, list[float]]]:
    """Run each entry once per round, the order rotating each round; {name: {"wall": [...], "cpu": [...]}}."""
    names = list(entries)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            wall, cpu = entries[name](r)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
        print(f"  {label}: round {r + 1}/{rounds} done", file=sys.stderr)
    return times


def benchmark_data(args, layout: ViewLayout, peers: dict, folder: Path) -> list[dict]:
    paths = source_jpegs(folder, args.jpegs, args.images)
    pipelines = data_pipelines(layout, peers)
    for loader, transform in pipelines.values():  # warm-up and a check of the view count
        image = loader(str(paths[0]))
        views = transform(image)
        if len(views) not in (layout.num_views, layout.num_views + 1):  # the gpu worker part adds its parameter table
            raise RuntimeError(f"{transform!r} made {len(views)} views, expected {layout.num_views}")
    entries = {name: (lambda r, lt=lt: run_images(paths, *lt, epoch=r)) for name, lt in pipelines.items()}
    times = interleaved(entries, args.rounds, "data path")
    rows = []
    for name, t in times.items():
        rates = [len(paths) / w for w in t["wall"]]
        rows.append({
            "row": "data path", "implementation": name, "source": f"{len(paths)} JPEGs ({args.jpegs})",
            "images_per_s": statistics.median(rates), "images_per_s_all": rates,
            "cpu_ms_per_image": 1000 * statistics.median(t["cpu"]) / len(paths),
        })
    return rows


# ---------------------------------------------------------------------------------------------------- training step
def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a parameter, gradient or buffer that may be an FSDP2 DTensor (the Trainer shards on CUDA)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(value).detach().cpu().clone() for name, value in module.state_dict().items()}


def peer_backbone(cfg, source: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of the Trainer's backbone for a peer: the same timm model, the same weights (on the CPU)."""
    backbone = build_backbone(cfg.backbone.timm_name, small_images=cfg.data.small_images, **backbone_kwargs(cfg.backbone))
    backbone.load_state_dict(plain_state(source))
    return backbone


def autocast(precision: str, device: torch.device):
    """The peers' step under bf16 autocast when mtssl's runs in bf16 (FSDP2's bf16 policy)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def byol_pairs(predictions: list[torch.Tensor], targets: list[torch.Tensor], target_indices: list[int], pair_loss) -> torch.Tensor:
    """Mean of ``pair_loss(p_v, z_g)`` over every view v and target view g != v (a single predictor: the peers' loop)."""
    terms = [pair_loss(p, z) for v, p in enumerate(predictions) for g, z in zip(target_indices, targets) if g != v]
    return torch.stack(terms).mean()


@dataclass
class StepEntry:
    """One implementation of the training step, on fixed views."""

    name: str
    step: Callable[[int], None]
    count: int = 0
    error: str | None = None


class LightlyByol:
    """BYOL multi-crop written with lightly's parts, as its examples write BYOL (one call per view)."""

    def __init__(self, lightly, backbone: torch.nn.Module, feature_dim: int, lr: float, weight_decay: float):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.utils.lars import LARS

        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, *HEADS)
        self.prediction_head = BYOLPredictionHead(HEADS[1], *HEADS)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.update_momentum = update_momentum
        online = [*self.backbone.parameters(), *self.projection_head.parameters(), *self.prediction_head.parameters()]
        self.optimizer = LARS(online, lr=lr, momentum=0.9, weight_decay=weight_decay)

    def modules(self) -> list[torch.nn.Module]:
        return [self.backbone, self.projection_head, self.prediction_head, self.backbone_momentum, self.projection_head_momentum]

    def loss(self, views: list[torch.Tensor], target_indices: list[int]) -> torch.Tensor:
        predictions = [self.prediction_head(self.projection_head(self.backbone(x))) for x in views]
        with torch.no_grad():
            targets = [self.projection_head_momentum(self.backbone_momentum(views[g])) for g in target_indices]
        return byol_pairs(predictions, targets, target_indices, self.criterion)

    def step(self, views: list[torch.Tensor], target_indices: list[int]) -> None:
        loss = self.loss(views, target_indices)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_momentum(self.backbone, self.backbone_momentum, m=EMA_TAU)
        self.update_momentum(self.projection_head, self.projection_head_momentum, m=EMA_TAU)


class SptByol:
    """BYOL multi-crop written with stable-pretraining's parts: ``methods.BYOL``'s teacher-student
    backbone and projector and its predictor, ``BYOLLoss``, its LARS, and ``update_teacher`` (what its
    TeacherStudentCallback calls after each step); its own forward takes exactly 2 views."""

    def __init__(self, spt, backbone: torch.nn.Module, lr: float, weight_decay: float):
        self.module = spt.methods.BYOL(encoder_name=backbone, projector_dims=HEADS, predictor_dims=HEADS,
                                       ema_decay_start=EMA_TAU, ema_decay_end=EMA_TAU)
        self.module.train()
        self.criterion = spt.losses.BYOLLoss()
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = spt.optim.LARS(trainable, lr=lr, momentum=0.9, weight_decay=weight_decay, exclude_bias_n_norm=True)

    def modules(self) -> list[torch.nn.Module]:
        return [self.module]

    def loss(self, views: list[torch.Tensor], target_indices: list[int]) -> torch.Tensor:
        m = self.module
        predictions = [m.predictor(m.projector.forward_student(m.backbone.forward_student(x))) for x in views]
        targets = [m.projector.forward_teacher(m.backbone.forward_teacher(views[g])) for g in target_indices]
        return byol_pairs(predictions, targets, target_indices, self.criterion)

    def step(self, views: list[torch.Tensor], target_indices: list[int]) -> None:
        loss = self.loss(views, target_indices)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.module.backbone.update_teacher()
        self.module.projector.update_teacher()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_config(args, views: str, batch: int, precision: str | None = None):
    from mtssl.config import compose_config, resolve_config

    overrides = ["method=byol", f"views={views}", "backbone=resnet18", "data=imagefolder", "data.root=/unused", f"train.batch_size={batch}",
                 f"train.precision={precision or args.precision}", f"views.types.global.size={args.global_size}"]
    if "local" in views:
        overrides.append(f"views.types.local.size={args.local_size}")
    return resolve_config(compose_config(overrides))


def benchmark_step(args, peers: dict, env, out_dir: Path) -> list[dict]:
    device = env.device
    batch = args.batch
    cfg = step_config(args, "global_local", batch)
    modes = [Mode("per_view", "none"), Mode("ghost", "bn_per_view")]
    trainers = {f"mtssl {m.name}": step_runner(cfg, m, env, out_dir) for m in modes}
    first = next(iter(trainers.values()))
    layout, target_indices = first.layout, list(first.target_indices)
    views = make_views(layout, batch, device)
    lr, weight_decay = first.peak_lr, float(cfg.optim.weight_decay)
    feature_dim = first.model.online.backbone.num_features
    entries = []
    for name, trainer in trainers.items():
        entries.append(StepEntry(name, lambda i, t=trainer: t.training_step(views, i)))
    backbone = first.model.online.backbone  # the same initial weights for the peers

    def under_autocast(step):
        def run(i):
            with autocast(args.precision, device):
                step()
        return run

    if "lightly" in peers:
        lightly_byol = LightlyByol(peers["lightly"], peer_backbone(cfg, backbone), feature_dim, lr, weight_decay)
        for module in lightly_byol.modules():
            module.to(device).train()
        entries.append(StepEntry("lightly (BYOL heads, LARS, update_momentum)", under_autocast(lambda: lightly_byol.step(views, target_indices))))
    if "stable-pretraining" in peers:
        spt_byol = SptByol(peers["stable-pretraining"], peer_backbone(cfg, backbone), lr, weight_decay)
        spt_byol.module.to(device)
        entries.append(StepEntry("stable-pretraining (methods.BYOL parts, LARS, update_teacher)",
                                 under_autocast(lambda: spt_byol.step(views, target_indices))))
    for entry in entries:  # warm-up outside the timed rounds
        try:
            for _ in range(args.warmup):
                entry.step(entry.count)
                entry.count += 1
        except Exception as error:  # an implementation that cannot run here is reported, not fatal
            entry.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(f"  training step {entry.name}: failed ({entry.error})", file=sys.stderr)
    runnable = [e for e in entries if e.error is None]

    def run(entry: StepEntry) -> tuple[float, float]:
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            entry.step(entry.count)
            entry.count += 1
        sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    times = interleaved({e.name: (lambda r, e=e: run(e)) for e in runnable}, args.rounds, "training step")
    rows = []
    for entry in entries:
        row = {"row": "training step", "implementation": entry.name, "batch": batch, "steps_per_round": args.steps,
               "views": f"2 x {args.global_size} + 2 x {args.local_size}", "precision": args.precision}
        if entry.error:
            rows.append({**row, "error": entry.error})
            continue
        rates = [batch * args.steps / w for w in times[entry.name]["wall"]]
        rows.append({**row, "images_per_s": statistics.median(rates), "images_per_s_all": rates,
                     "cpu_ms_per_image": 1000 * statistics.median(times[entry.name]["cpu"]) / (batch * args.steps)})
    return rows


# ---------------------------------------------------------------------------------------------------- correctness
def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (0 when both are 0)."""
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


# mtssl's 2-view loss from a peer's: stable-pretraining averages the two pair terms, lightly averages
# negative cosines (l = 2 - 2 cos). The gradients scale by the map's slope.
LOSS_MAPS = {"lightly": (4.0, 4.0), "stable-pretraining": (0.0, 2.0)}  # mtssl = offset + slope * peer


def head_loss_rows(peers: dict, device: torch.device, batch: int, tolerance: float) -> list[dict]:
    """The 2-view BYOL loss on random predictions and targets: mtssl's multitask_loss with its BYOL pair
    loss (views=global's weight 2) against each peer's loss function, and the gradients of the predictions."""
    generator = torch.Generator().manual_seed(SEED)
    p = [torch.randn(batch, HEADS[1], generator=generator).to(device).requires_grad_() for _ in range(2)]
    z = [torch.randn(batch, HEADS[1], generator=generator).to(device) for _ in range(2)]
    loss, _ = multitask_loss(p, ["global", "global"], z, [0, 1], byol_pair_loss, {"global": 2.0})
    grads = torch.autograd.grad(loss, p)
    peer_losses = {}
    if "lightly" in peers:
        from lightly.loss import NegativeCosineSimilarity

        criterion = NegativeCosineSimilarity()
        peer_losses["lightly"] = 0.5 * (criterion(p[0], z[1]) + criterion(p[1], z[0]))
    if "stable-pretraining" in peers:
        criterion = peers["stable-pretraining"].losses.BYOLLoss()
        peer_losses["stable-pretraining"] = (criterion(p[0], z[1]) + criterion(p[1], z[0])) / 2
    rows = []
    for name, peer_loss in peer_losses.items():
        offset, slope = LOSS_MAPS[name]
        peer_grads = torch.autograd.grad(peer_loss, p)
        loss_diff = abs(offset + slope * peer_loss.item() - loss.item()) / abs(loss.item())
        grad_diff = max(relative_difference(slope * g, e) for g, e in zip(peer_grads, grads))
        rows.append({"row": "loss", "implementation": name, "inputs": f"random predictions and targets [{batch}, {HEADS[1]}]",
                     "mtssl_loss": loss.item(), "peer_loss": peer_loss.item(), "loss_relative_difference": loss_diff,
                     "gradient_relative_difference": grad_diff, "ok": loss_diff <= tolerance and grad_diff <= tolerance})
    return rows


def copy_mlp(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """mtssl's Linear(no bias)-BN-ReLU-Linear into a peer's head of the same layers (lightly: the same
    tensors; stable-pretraining: plus a bias on the hidden Linear, set to 0, which BN cancels anyway)."""
    src = list(plain_state(source).values())
    names = [n for n in target.state_dict() if n != "0.bias"]  # all but stable-pretraining's hidden bias
    state = target.state_dict()
    if len(names) != len(src):
        raise RuntimeError(f"head layouts differ: {list(source.state_dict())} vs {list(state)}")
    for name, tensor in zip(names, src):
        if state[name].shape != tensor.shape:
            raise RuntimeError(f"head tensor {name}: {tuple(state[name].shape)} vs {tuple(tensor.shape)}")
        state[name] = tensor.clone()
    if "0.bias" in state:
        state["0.bias"] = torch.zeros_like(state["0.bias"])
    target.load_state_dict(state)


def network_rows(args, peers: dict, env, out_dir: Path, tolerance: float) -> list[dict]:
    """The 2-view BYOL step's loss and every online gradient: mtssl's Trainer (views=global) against each
    peer's modules holding the same weights, on the same 2 views; fp32 (on CUDA without TF32)."""
    cfg = step_config(args, "global", args.batch, precision="fp32")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _network_rows(args, peers, env, out_dir, tolerance, cfg)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _network_rows(args, peers: dict, env, out_dir: Path, tolerance: float, cfg) -> list[dict]:
    device = env.device
    trainer = step_runner(cfg, Mode("per_view", "none"), env, out_dir)
    model = trainer.model
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    views = [v + 0.1 * i for i, v in enumerate(make_views(trainer.layout, args.batch, device))]  # 2 distinct views
    targets = list(trainer.target_indices)
    trainer.optimizer.step = lambda closure=None: None  # keep the weights: read the gradients of this step
    loss = trainer.training_step(views, 0).loss.item()
    online = dict(model.online.backbone.named_parameters())
    expected = {
        "backbone": {n: full(p.grad).detach().clone() for n, p in online.items()},
        "projector": [full(p.grad).detach().clone() for p in model.online.projector.parameters()],
        "predictor": [full(p.grad).detach().clone() for p in model.predictors["global"].parameters()],
    }
    model.load_state_dict(weights)
    rows = []
    for name, peer in peers.items():
        backbone = peer_backbone(cfg, model.online.backbone)
        if name == "lightly":
            impl = LightlyByol(peer, backbone, backbone.num_features, lr=0.0, weight_decay=0.0)
            copy_mlp(model.online.projector, impl.projection_head.layers)
            copy_mlp(model.target.projector, impl.projection_head_momentum.layers)
            copy_mlp(model.predictors["global"], impl.prediction_head.layers)
            impl.backbone_momentum.load_state_dict(plain_state(model.target.backbone))
            backbone_params = dict(impl.backbone.named_parameters())
            heads = (list(impl.projection_head.parameters()), list(impl.prediction_head.parameters()))
        else:
            impl = SptByol(peer, backbone, lr=0.0, weight_decay=0.0)
            m = impl.module
            m.backbone.student.load_state_dict(plain_state(model.online.backbone))
            m.backbone.teacher.load_state_dict(plain_state(model.target.backbone))
            copy_mlp(model.online.projector, m.projector.student)
            copy_mlp(model.target.projector, m.projector.teacher)
            copy_mlp(model.predictors["global"], m.predictor)
            backbone_params = dict(m.backbone.student.named_parameters())
            skip_hidden_bias = lambda params: [p for i, p in enumerate(params) if i != 1]  # noqa: E731  the extra 0.bias
            heads = (skip_hidden_bias(list(m.projector.student.parameters())), skip_hidden_bias(list(m.predictor.parameters())))
        for module in impl.modules():
            module.to(device).train()
        peer_loss = impl.loss(views, targets)
        peer_loss.backward()
        offset, slope = LOSS_MAPS[name]
        loss_diff = abs(offset + slope * peer_loss.item() - loss) / abs(loss)
        diffs = [relative_difference(slope * backbone_params[n].grad, g) for n, g in expected["backbone"].items()]
        diffs += [relative_difference(slope * p.grad, g) for p, g in zip(heads[0], expected["projector"])]
        diffs += [relative_difference(slope * p.grad, g) for p, g in zip(heads[1], expected["predictor"])]
        grad_diff = max(diffs)
        rows.append({"row": "loss through the network", "implementation": name,
                     "inputs": f"ResNet-18 + heads {HEADS[0]}/{HEADS[1]}, 2 views of {args.batch} x {args.global_size} px",
                     "mtssl_loss": loss, "peer_loss": peer_loss.item(), "loss_relative_difference": loss_diff,
                     "gradient_relative_difference": grad_diff, "gradients_compared": len(diffs),
                     "ok": loss_diff <= tolerance and grad_diff <= tolerance})
    return rows


# ---------------------------------------------------------------------------------------------------- report
def ratio_rows(rows: list[dict], section: str, peers: list[str]) -> list[list[str]]:
    """mtssl rows' images/s and CPU cost against each peer's row of the same section."""
    present = {r["implementation"].split(" ")[0]: r for r in rows if r["row"] == section and "images_per_s" in r
               and not r["implementation"].startswith("mtssl")}
    cells = []
    for r in rows:
        if r["row"] != section or not r["implementation"].startswith("mtssl") or "images_per_s" not in r:
            continue
        row = [r["implementation"], f"{r['images_per_s']:.2f}", f"{r['cpu_ms_per_image']:.1f}"]
        for peer in peers:
            base = present.get(peer)
            row.append("-" if base is None else f"{r['images_per_s'] / base['images_per_s']:.2f}x / {r['cpu_ms_per_image'] / base['cpu_ms_per_image']:.2f}x")
        cells.append(row)
    return cells


def print_report(rows: list[dict], skipped: dict[str, str], device_name: str) -> None:
    peers = list(PEERS)
    for section in ("data path", "training step"):
        cells = []
        for r in rows:
            if r["row"] != section:
                continue
            if "error" in r:
                cells.append([r["implementation"], f"failed: {r['error']}"])
            else:
                cells.append([r["implementation"], f"{r['images_per_s']:.2f}", f"[{min(r['images_per_s_all']):.2f}-{max(r['images_per_s_all']):.2f}]",
                              f"{r['cpu_ms_per_image']:.1f}"])
        if cells:
            print_table(f"{section} on {device_name}: images/s (median of interleaved rounds), CPU core-ms per image",
                        ["implementation", "images/s", "[min-max]", "CPU ms/image"], cells)
            print_table(f"{section}: mtssl / peer (images/s ratio / CPU-cost ratio; > 1x images/s and < 1x CPU are better)",
                        ["implementation", "images/s", "CPU ms/image", *[f"vs {p}" for p in peers]], ratio_rows(rows, section, peers))
    cells = [[r["row"], r["implementation"], f"{r['mtssl_loss']:.6f}", f"{r['peer_loss']:.6f}", f"{r['loss_relative_difference']:.1e}",
              f"{r['gradient_relative_difference']:.1e}", "ok" if r["ok"] else "DIFFERS"] for r in rows if "ok" in r]
    if cells:
        print_table("2-view BYOL loss and gradients, mtssl against the peer (relative differences after the loss map)",
                    ["check", "peer", "mtssl loss", "peer loss", "loss diff", "max grad diff", "verdict"], cells, left_columns=2)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=list(PEERS))
    parser.add_argument("--sections", nargs="+", choices=["data", "step", "correctness"], default=["data", "step", "correctness"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the training step and correctness (the data path is CPU work)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every row (default 1)")
    parser.add_argument("--jpegs", default=PHOTO, help="JPEG source: 'photo' (a real photo at 375-640 px) or WxH synthetic (default photo)")
    parser.add_argument("--images", type=int, default=48, help="JPEGs for the data path (default 48)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--batch", type=int, default=None, help="images per view in a step (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation (default 1)")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="mtssl's train.precision; bf16 (CUDA only) runs the peers' step under bf16 autocast (default fp32)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative difference the correctness rows accept (default 1e-4)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16: CUDA only (CPU bf16 steps are not what users run)")
    args.batch = args.batch or (64 if args.device == "cuda" else 8)
    peers, skipped = load_peers(args.peers)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    device = env.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            if "correctness" in args.sections:
                rows += head_loss_rows(peers, device, args.batch, args.tolerance)
                rows += network_rows(args, peers, env, Path(tmp) / "net", args.tolerance)
            if "data" in args.sections:
                folder = Path(tmp) / "jpegs"
                folder.mkdir()
                rows += benchmark_data(args, multicrop_layout(args.global_size, args.local_size), peers, folder)
            if "step" in args.sections:
                rows += benchmark_step(args, peers, env, Path(tmp) / "step")
    finally:
        destroy_distributed()
        torch.set_num_threads(threads)
    print_report(rows, skipped, f"{device_name}, {args.threads} thread(s)")
    report = {"device": device_name, "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "peers": peer_versions(peers), "skipped": skipped, "rows": rows}
    write_report(args.out, "peers", argv, **report)
    return report


if __name__ == "__main__":
    main()
