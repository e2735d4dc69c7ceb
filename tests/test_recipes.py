"""The official recipes, item by item: each run of the official commands composed as the sweep launcher
composes it (budget's regime + ablation + axis values, ``sweeps/launch.py: compose_job``), then compared with the
values of the official code, written out here from the reference (official-recipe.md), never taken from
mtssl. Where it matters the behaviour is checked too: the lr at chosen steps, which parameters get weight
decay, the blur kernels, the BN gamma at init, drop-path on the online network only, the kNN resize.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torchvision.transforms import v2

from mtssl.config import resolve_config
from mtssl.config.validate import validate_config
from mtssl.data.torchvision_augment import MultiViewTransform, build_eval_transform
from mtssl.data.views import build_view_layout
from mtssl.distributed.process_group import DistEnv
from mtssl.model.siamese import build_model
from mtssl.train.optim import set_learning_rate
from mtssl.train.trainer import Trainer
from sweeps.grid import expand_grid
from sweeps.launch import compose_job

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# The official runs (reference: "The official commands"; ResNet-50, 4 GPUs, 200 epochs unless noted)

BYOL = dict(
    batch=1024, optim="lars", base_lr=0.4, weight_decay=1.5e-6, decay_1d=False, warmup=10, per="step", final=0.001,
    tau=0.996, clip=None, projector=([4096], 256, False), predictor=([4096], 256, False), drop_path=0.0,
)
OFFICIAL = {
    "byol": BYOL,
    # SimSiam: batch 512, SGD 0.05, wd 1e-4 on every parameter, per-epoch cosine to 0.001 x peak (as every run of
    # the official code: "warmup 10 epochs then cosine to 0.001 x peak"; SimSiam's own code ends at 0), no
    # warmup, constant predictor lr, projector 2048-2048-2048 with output BN, predictor 512-2048.
    "simsiam": dict(
        batch=512, optim="sgd", base_lr=0.05, weight_decay=1e-4, decay_1d=True, warmup=0, per="epoch", final=0.001,
        tau=None, clip=None, projector=([2048, 2048], 2048, True), predictor=([512], 2048, False), drop_path=0.0,
    ),
    # MoCo v3: batch 1024, LARS base lr 0.4 (the --base-lr default), output BN on both heads, tau0 0.996.
    "mocov3": {**BYOL, "projector": ([4096], 256, True), "predictor": ([4096], 256, True)},
}
# BYOL-MT ViT-S / ViT-B: projector 4096-4096-256, AdamW (0.9, 0.98), 3e-4, wd 0.1, tau0 0.998, clip 0.5,
# drop-path 0.1 (online network only).
VIT = {**BYOL, "optim": "adamw", "base_lr": 3e-4, "weight_decay": 0.1, "tau": 0.998, "clip": 0.5,
       "projector": ([4096, 4096], 256, False), "drop_path": 0.1}
TASK_WEIGHT = {"byol": 1.0, "mocov3": 1.0, "simsiam": 1 / 3}  # official 0.333: see the README's differences
VIEW_COUNTS = {"global": 2, "local": 2, "cutout": 1}  # views 2 2 1
# The multi-task views (reference: they match): sizes, scales, blur/solarize probabilities, jitter, kernels.
MT_VIEWS = {
    "global": dict(size=224, scale=[0.25, 1.0], blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], blur_kernel=23),
    "local": dict(size=96, scale=[0.08, 0.25], blur_p=[0.5], solarize_p=[0.0], blur_kernel=23),  # 23 at 96 px
    "cutout": dict(size=224, scale=[0.25, 1.0], blur_p=[0.5], solarize_p=[0.0], blur_kernel=23,
                   cutout_area=[0.2, 0.4]),
}
STANDARD_JITTER = [0.4, 0.4, 0.2, 0.1]
# The 2-view baselines: each method's own transform (TrainTransformBYOL / SimSiam / MoCov3).
TWO_VIEW = {
    "byol": dict(scale=[0.08, 1.0], blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], jitter=STANDARD_JITTER, weight=2.0),
    "simsiam": dict(scale=[0.2, 1.0], blur_p=[0.5], solarize_p=[0.0], jitter=[0.4, 0.4, 0.4, 0.1], weight=1.0),
    "mocov3": dict(scale=[0.2, 1.0], blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2], jitter=STANDARD_JITTER, weight=2.0),
}
FAKE_ROOT = "/unused/imagenet"


def sweep_configs(*overrides: str) -> dict[str, object]:
    """{job name: resolved job config} of a sweep, composed as ``sweeps/launch.py`` composes its jobs."""
    with initialize_config_dir(config_dir=str(REPO / "sweeps" / "conf"), version_base="1.3"):
        sweep = compose("config", overrides=list(overrides))
        jobs = expand_grid(
            axes=OmegaConf.to_container(sweep.ablation.axes, resolve=True), seeds=list(sweep.ablation.seeds),
            fixed=list(sweep.ablation.fixed), regime=sweep.budget.regime, job_overrides=[f"data.root={FAKE_ROOT}"],
        )
        configs = {job.name: resolve_config(compose_job(list(job.overrides))) for job in jobs}
        ranks = int(sweep.budget.resources.ranks_per_job)
    for cfg in configs.values():
        validate_config(cfg, check_data=False, world_size=ranks)
    return configs


@pytest.fixture(scope="module")
def method_runs():
    return sweep_configs("ablation=method", "budget=imagenet_200ep")


@pytest.fixture(scope="module")
def baseline_runs():
    return sweep_configs("ablation=method", "budget=imagenet_200ep", "+ablation.axes.views=[global]")


@pytest.fixture(scope="module")
def backbone_runs():
    return sweep_configs("ablation=backbone", "budget=imagenet_200ep")


def official_runs(method_runs, backbone_runs):
    """(name, config, official values) of every 200-epoch multi-task run."""
    runs = [(name, method_runs[f"method={name}"], OFFICIAL[name]) for name in OFFICIAL]
    runs += [(name, backbone_runs[f"backbone={name}"], VIT) for name in ("vit_small", "vit_base")]
    return runs


# ---------------------------------------------------------------------------------------------------------------
# The resolved configs, item by item

def test_each_run_is_its_official_job(method_runs, backbone_runs):
    assert sorted(method_runs) == ["method=byol", "method=mocov3", "method=simsiam"]
    for name, cfg, _ in official_runs(method_runs, backbone_runs):
        assert cfg.train.epochs == 200, name
        assert cfg.data.name == "imagefolder" and cfg.data.root == FAKE_ROOT
        assert cfg.predictor.mode == "separate"
    assert [cfg.backbone.timm_name for cfg in method_runs.values()] == ["resnet50"] * 3
    assert backbone_runs["backbone=vit_small"].backbone.timm_name == "vit_small_patch16_224"
    assert backbone_runs["backbone=vit_base"].backbone.timm_name == "vit_base_patch16_224"
    assert all(cfg.method.name == "byol" for cfg in backbone_runs.values())


def test_heads(method_runs, backbone_runs):
    for name, cfg, official in official_runs(method_runs, backbone_runs):
        for head in ("projector", "predictor"):
            hidden, out, last_bn = official[head]
            got = cfg.method[head]
            assert (list(got.hidden_dims), got.out_dim, got.last_bn) == (hidden, out, last_bn), (name, head)


def test_batch_optimiser_lr_and_weight_decay(method_runs, backbone_runs):
    for name, cfg, official in official_runs(method_runs, backbone_runs):
        assert cfg.train.batch_size == official["batch"], name
        assert cfg.optim.name == official["optim"], name
        assert cfg.optim.base_lr == pytest.approx(official["base_lr"]), name
        assert cfg.optim.weight_decay == pytest.approx(official["weight_decay"]), name
        assert cfg.optim.weight_decay_1d is official["decay_1d"], name
    vit = backbone_runs["backbone=vit_small"].optim
    assert list(vit.betas) == [0.9, 0.98]
    assert method_runs["method=simsiam"].method.fixed_predictor_lr is True
    assert not method_runs["method=byol"].method.fixed_predictor_lr


def test_warmup_schedule_clipping_and_ema(method_runs, backbone_runs):
    for name, cfg, official in official_runs(method_runs, backbone_runs):
        assert cfg.optim.warmup_epochs == official["warmup"], name
        assert cfg.optim.schedule_per == official["per"], name
        assert cfg.optim.final_lr_ratio == pytest.approx(official["final"]), name
        assert cfg.optim.clip_grad == official["clip"], name
        if official["tau"] is not None:
            assert cfg.train.ema_tau == pytest.approx(official["tau"]), name
    assert method_runs["method=mocov3"].method.objective_kwargs.temperature == 1.0


def test_task_weights_views_and_augmentations(method_runs, backbone_runs):
    for name, cfg, _ in official_runs(method_runs, backbone_runs):
        method = cfg.method.name
        assert {t: v.count for t, v in cfg.views.types.items()} == VIEW_COUNTS, name
        for t, view in cfg.views.types.items():
            assert view.weight == pytest.approx(TASK_WEIGHT[method]), (name, t)
            assert list(view.jitter) == STANDARD_JITTER, (name, t)
            for key, value in MT_VIEWS[t].items():
                assert OmegaConf.to_container(view)[key] == value, (name, t, key)


def test_two_view_baselines_use_each_methods_transform(baseline_runs):
    assert sorted(baseline_runs) == ["method=byol,views=global", "method=mocov3,views=global", "method=simsiam,views=global"]
    for method, official in TWO_VIEW.items():
        cfg = baseline_runs[f"method={method},views=global"]
        assert list(cfg.views.types) == ["global"]
        view = OmegaConf.to_container(cfg.views.types["global"])
        assert view["count"] == 2 and view["size"] == 224 and view["blur_kernel"] == 23
        for key, value in official.items():
            assert view[key] == pytest.approx(value), (method, key)
        # the rest of each baseline is its method's recipe (SimSiam: as SimSiam-MT)
        assert cfg.train.batch_size == OFFICIAL[method]["batch"]
        assert cfg.optim.base_lr == pytest.approx(OFFICIAL[method]["base_lr"])


def test_two_view_transform_is_built_from_the_spec(baseline_runs):
    """The torchvision pipeline of the SimSiam baseline: crop scale, jitter, blur p and kernel, no solarize."""
    cfg = baseline_runs["method=simsiam,views=global"]
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    for transform in MultiViewTransform(layout, cfg.data.mean, cfg.data.std).transforms:
        ops = {type(op).__name__: op for op in transform.transforms}
        assert list(ops["RandomResizedCrop"].scale) == [0.2, 1.0]
        jitter_apply, blur_apply = [op for op in transform.transforms if isinstance(op, v2.RandomApply)]
        jitter = jitter_apply.transforms[0]
        assert jitter_apply.p == 0.8 and jitter.saturation == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.1, 0.1))
        assert blur_apply.p == 0.5 and list(blur_apply.transforms[0].kernel_size) == [23, 23]
        assert "RandomSolarize" not in ops
        assert ops["RandomGrayscale"].p == 0.2


def test_local_blur_kernel_is_23_at_96_px(method_runs):
    cfg = method_runs["method=byol"]
    layout = build_view_layout(OmegaConf.to_container(cfg.views.types), dict(cfg.data.view_sizes or {}))
    kernels = []
    for (name, _), transform in zip(layout.entries, MultiViewTransform(layout, cfg.data.mean, cfg.data.std).transforms):
        blur = [op for op in transform.transforms if isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], v2.GaussianBlur)]
        kernels.append((name, layout.type(name).size, list(blur[0].transforms[0].kernel_size)))
    assert kernels == [("global", 224, [23, 23])] * 2 + [("local", 96, [23, 23])] * 2 + [("cutout", 224, [23, 23])]


def test_800_epoch_run():
    runs = sweep_configs("ablation=method", "budget=imagenet_800ep", "ablation.axes.method=[byol]")
    (cfg,) = runs.values()
    assert cfg.method.name == "byol" and cfg.train.epochs == 800 and cfg.train.batch_size == 1024
    assert {t: v.count for t, v in cfg.views.types.items()} == {"global": 2, "local": 4, "cutout": 1}
    with initialize_config_dir(config_dir=str(REPO / "sweeps" / "conf"), version_base="1.3"):
        budget = compose("config", overrides=["budget=imagenet_800ep"]).budget
    assert budget.regime == "imagenet_800ep" and budget.resources.ranks_per_job == 8 and budget.resources.gpus


# ---------------------------------------------------------------------------------------------------------------
# Behaviour

def light(cfg, **changes):
    """The config with a smaller backbone/heads: the schedule and optimiser items stay the official ones."""
    return OmegaConf.merge(cfg, changes)


def trainer_for(cfg, tmp_path, steps_per_epoch=10):
    placeholders = [("unused", 0)] * (cfg.train.batch_size * steps_per_epoch)
    # The GPU regime resolves to bf16; one fp32 CPU process builds the same optimiser without a process group.
    cfg = OmegaConf.merge(cfg, {"train": {"device": "cpu", "precision": "fp32"}})
    return Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")), tmp_path, train_samples=placeholders)


SMALL = dict(backbone={"timm_name": "resnet18"}, method={"projector": {"hidden_dims": [64], "out_dim": 32},
                                                         "predictor": {"hidden_dims": [64], "out_dim": 32}})


def group_lrs(trainer, step):
    set_learning_rate(trainer.optimizer, trainer.learning_rate(step), trainer.peak_lr)
    return {g["fixed_lr"]: g["lr"] for g in trainer.optimizer.param_groups}


def test_simsiam_lr_is_set_once_per_epoch_without_warmup(method_runs, tmp_path):
    trainer = trainer_for(light(method_runs["method=simsiam"], **SMALL), tmp_path)  # 10 steps per epoch
    peak = 0.05 * 512 / 256
    final = 0.001 * peak  # the official multi-task code's end of the cosine, for every method
    official = lambda epoch: final + (peak - final) * 0.5 * (1 + math.cos(math.pi * epoch / 200))
    for step, epoch in [(0, 0), (9, 0), (10, 1), (19, 1), (1005, 100), (1999, 199)]:
        lrs = group_lrs(trainer, step)
        assert lrs[False] == pytest.approx(official(epoch), rel=1e-12), step
        assert lrs[True] == pytest.approx(peak)  # the predictor's constant lr


@pytest.mark.parametrize("run", ["method=byol", "method=mocov3"])
def test_byol_and_mocov3_lr_warm_up_then_decay_per_step(method_runs, tmp_path, run):
    trainer = trainer_for(light(method_runs[run], **SMALL), tmp_path)  # 10 steps per epoch, 2000 steps
    peak = 0.4 * 1024 / 256
    final = 0.001 * peak
    cosine = lambda step: final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (step - 100) / 1900))
    expected = {0: 0.0, 1: peak / 100, 50: peak / 2, 100: peak, 101: cosine(101), 1050: cosine(1050), 1999: cosine(1999)}
    for step, lr in expected.items():
        assert group_lrs(trainer, step)[False] == pytest.approx(lr, rel=1e-12), step


def test_per_epoch_schedule_after_a_per_step_warmup():
    from mtssl.train.optim import lr_at_step

    peak, final = 1.0, 0.0
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * (step - 5) / 95))  # 5 warmup steps of 100
    expected = {0: 0.0, 3: 0.6, 4: 0.8,  # warmup, per step
                5: cosine(5), 9: cosine(5),  # the rest of the first 10-step block holds the warmup's end
                10: cosine(10), 19: cosine(10), 55: cosine(50), 99: cosine(90)}
    for step, lr in expected.items():
        assert lr_at_step(step, 100, 5, peak, final, steps_per_update=10) == pytest.approx(lr, abs=1e-12), step


def decay_by_parameter(trainer):
    return {id(p): (g["weight_decay"], g.get("lars_exclude")) for g in trainer.optimizer.param_groups for p in g["params"]}


def test_which_parameters_get_weight_decay(method_runs, backbone_runs, tmp_path):
    simsiam = trainer_for(light(method_runs["method=simsiam"], **SMALL), tmp_path / "s")
    decay = decay_by_parameter(simsiam)
    assert {wd for wd, _ in decay.values()} == {1e-4}  # BN and biases included
    byol = trainer_for(light(method_runs["method=byol"], **SMALL), tmp_path / "b")
    decay = decay_by_parameter(byol)
    for name, p in byol.model.named_parameters():
        if p.requires_grad:  # LARS: biases and BN neither decayed nor adapted
            assert decay[id(p)] == ((0.0, True) if p.ndim == 1 else (1.5e-6, False)), name
    vit = light(backbone_runs["backbone=vit_small"], backbone={"kwargs": {"depth": 1}}, method=SMALL["method"])
    trainer = trainer_for(vit, tmp_path / "v")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    decay = decay_by_parameter(trainer)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert decay[id(p)][0] == (0.0 if p.ndim == 1 else 0.1), name


def test_resnet_last_bn_gamma_is_one_at_init(method_runs):
    cfg = method_runs["method=byol"]
    model = build_model(cfg, ["global", "local", "cutout"], small_images=False, ema_target=True)
    blocks = [m for m in model.online.backbone.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 16  # ResNet-50: 3 + 4 + 6 + 3
    for block in blocks:
        assert torch.equal(block.bn3.weight, torch.ones_like(block.bn3.weight))
    # timm's default (zero_init_last=True) would start them at 0
    zero = build_model(light(cfg, backbone={"zero_init_last": True}), ["global"], small_images=False, ema_target=False)
    assert all(not m.bn3.weight.any() for m in zero.online.backbone.modules() if type(m).__name__ == "Bottleneck")


def test_vit_drop_path_is_0_1_on_the_online_network_only(backbone_runs):
    cfg = light(backbone_runs["backbone=vit_small"], backbone={"kwargs": {"depth": 2}}, method=SMALL["method"])
    model = build_model(cfg, ["global"], small_images=False, ema_target=True).train()
    online = [m.drop_prob for m in model.online.backbone.modules() if type(m).__name__ == "DropPath"]
    assert max(online) == pytest.approx(0.1)  # timm's stochastic depth: linear up to drop_path_rate
    assert not [m for m in model.target.modules() if type(m).__name__ == "DropPath"]
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        torch.manual_seed(0)
        a, b = model.online.backbone(x), model.online.backbone(x)
        c, d = model.target.backbone(x), model.target.backbone(x)
    assert not torch.equal(a, b)  # samples dropped at random in train mode
    assert torch.equal(c, d)


def test_knn_transform_resizes_256_bilinear_then_crops_224(method_runs):
    cfg = method_runs["method=byol"]
    assert (cfg.data.eval_resize, cfg.data.eval_crop, cfg.data.eval_interpolation) == (256, 224, "bilinear")
    transform = build_eval_transform(cfg.data.mean, cfg.data.std, cfg.data.eval_resize, cfg.data.eval_crop, cfg.data.eval_interpolation)
    from PIL import Image

    pixels = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    # written out: shorter side to 256 (bilinear, antialiased), 224 centre crop, then normalise
    resized = v2.functional.resize(pixels, [256, 341], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    top, left = 16, 58  # (256 - 224) / 2 and round((341 - 224) / 2), ties to even as torchvision's CenterCrop
    crop = resized[:, top : top + 224, left : left + 224].float() / 255
    expected = (crop - torch.tensor(cfg.data.mean).view(3, 1, 1)) / torch.tensor(cfg.data.std).view(3, 1, 1)
    assert torch.allclose(transform(image), expected, atol=1e-6)


def test_augmented_probe_crops_bilinear_as_torchvisions_default():
    """The official linear probe's RandomResizedCrop(224) takes torchvision's default interpolation, bilinear."""
    from PIL import Image

    from mtssl.eval.augmented import augmented_train_transform

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(1)).numpy())

    def written_out(interpolation):
        return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, interpolation=interpolation, antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    outputs = {}
    for name, transform in (("mtssl", augmented_train_transform(mean, std, 224)),
                            ("bilinear", written_out(v2.InterpolationMode.BILINEAR)),
                            ("bicubic", written_out(v2.InterpolationMode.BICUBIC))):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same crop box and flip for all three
            outputs[name] = transform(image)
    assert torch.equal(outputs["mtssl"], outputs["bilinear"])
    assert not torch.equal(outputs["mtssl"], outputs["bicubic"])


def test_dry_run_shows_the_official_runs(tmp_path):
    from tests.support.data import make_image_folder

    root = make_image_folder(tmp_path / "imagenet", classes=2, per_class=520, size=8)  # >= one 1024 batch
    proc = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "launch.py"), "ablation=method", "budget=imagenet_200ep",
         f"data.root={root}", f"sweep_dir={tmp_path / 'sweep'}", "--dry-run"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "3 jobs, 4 rank(s) each" in out
    assert "200 ep, batch 1024; lars base lr 0.4 (peak 1.6), wd 1.5e-06 (not 1-D), warmup 10 ep, cosine per step" in out
    assert "200 ep, batch 512; sgd base lr 0.05 (peak 0.1), wd 0.0001 (every parameter), warmup 0 ep, cosine per epoch" in out
    assert out.count("lars base lr 0.4 (peak 1.6)") == 2  # BYOL and MoCo v3
    assert "local 2x96 w 1 scale [0.08, 0.25] blur k23" in out
    assert not (tmp_path / "sweep").exists()
