"""Activation memory of the multi-task step, per view type, and its extrapolation to 256 images per GPU.

Counts the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), each
storage once, parameters and buffers excluded, while the job's own model (built by the Trainer,
``train.activation_checkpointing`` on or off) runs the forward of one BYOL multi-task step on
CPU at a small batch: the EMA target on the global views (no grad: saves nothing), the online
network and predictor on each view, the loss. Saved bytes are linear in the batch, so bytes
per image times 256 give the per-GPU activations at 256 images per GPU. With checkpointing, a
block's internals come back during backward, one block of one view at a time: the largest
block's saved bytes (measured without checkpointing) are added as the recomputation peak.

Totals add the fp32 parameters (online + predictors + EMA target), gradients and optimiser
state (LARS: one momentum buffer; AdamW: two moments) of one unsharded rank; FSDP2 divides
those by the number of ranks, and bf16 roughly halves the activations (not measured here).
Not counted: the backward's transient gradient buffers (about the largest activations, two
or three at a time), the allocator's fragmentation and the CUDA context.

    python benchmarks/activation_memory.py                     # ResNet-50 and ViT-B/16, batch 4 per view
    python benchmarks/activation_memory.py --models resnet50 --batch 2

Results: benchmarks/results/activation_memory.json.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from report import print_table, write_report

RESULTS = Path(__file__).parent / "results" / "activation_memory.json"
PER_GPU = 256
GOAL_BYTES = 80e9
# name -> overrides: 224 px global and cutout views, 96 px locals; ViT-B with its recipe (drop-path 0.1 online)
MODELS = {
    "resnet50": ["backbone=resnet50"],
    "vit_base": ["backbone=vit_base"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIMISER_STATES = {"lars": 1, "sgd": 1, "adamw": 2}  # parameter-sized fp32 tensors per trainable parameter


class SavedTensorBytes:
    """Context counting the bytes autograd saves for backward, by tag (``self.tag`` when saved).

    Each storage counts once (by ``data_ptr``; views of one tensor share it); storages of the
    tensors in ``exclude`` (parameters, buffers) are not counted. Saved tensors stay referenced
    by the graph, so a pointer is not reused while counting.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.by_tag: dict = defaultdict(int)
        self.tag = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.excluded and pointer not in self.seen:
            self.seen.add(pointer)
            self.by_tag[self.tag] += storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.by_tag.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def build_trainer(overrides: list[str], checkpointing: bool, out_dir: Path):
    from mtssl.config import compose_config, resolve_config
    from mtssl.distributed.process_group import DistEnv
    from mtssl.train.trainer import Trainer

    cfg = resolve_config(compose_config(["method=byol", "views=global_local_cutout", "data=imagefolder", "data.root=/unused",
                                         *overrides, f"train.activation_checkpointing={str(checkpointing).lower()}",
                                         "train.precision=fp32", "train.device=cpu"]))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(cfg, env, out_dir, train_samples=[("synthetic", 0)] * cfg.train.batch_size)
    trainer.model.train()
    return trainer


def measure(trainer, batch: int, per_block: bool, dtype: torch.dtype = torch.float32) -> dict:
    """Saved bytes per image of each view type (one view), of the target branch and of the loss;
    with ``per_block`` also the largest single backbone block's saved bytes per image (any view).
    ``dtype`` bf16: the model and views cast to bf16, as FSDP2's bf16 policy computes."""
    from mtssl.distributed.fsdp import backbone_blocks
    from mtssl.loss.multitask import multitask_loss

    model, layout = trainer.model, trainer.layout
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, layout.type(t).size, layout.type(t).size, generator=generator).to(dtype)
             for t in trainer.view_types]
    model.to(dtype)
    counter = SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()])
    hooks = []
    if per_block:  # tag each block's saved tensors with (view type, block index)
        def enter(index):
            def hook(module, args):
                counter.tag = (counter.tag, index)
            return hook

        def leave(module, args, output):
            counter.tag = counter.tag[0]

        for index, block in enumerate(backbone_blocks(model.online.backbone)):
            hooks += [block.register_forward_pre_hook(enter(index)), block.register_forward_hook(leave)]
    torch.manual_seed(0)
    with counter:
        counter.tag = "target"
        _, targets, _ = model(views, trainer.view_types, trainer.target_indices, branch="target")
        predictions = []
        for view, view_type in zip(views, trainer.view_types):
            counter.tag = view_type
            (prediction,), _, _ = model([view], [view_type], [], branch="online")
            predictions.append(prediction)
        counter.tag = "loss"
        prepared = [trainer.objective.prepare_target(z) for z in targets]
        multitask_loss(predictions, trainer.view_types, prepared, trainer.target_indices, trainer.objective.pair_loss, trainer.weights)
    for hook in hooks:
        hook.remove()
    per_type: dict[str, float] = defaultdict(float)
    blocks: dict = defaultdict(float)
    for tag, nbytes in counter.by_tag.items():
        view_type = tag[0] if isinstance(tag, tuple) else tag
        per_type[view_type] += nbytes
        if isinstance(tag, tuple):
            blocks[tag] += nbytes
    counts = {t: trainer.view_types.count(t) for t in set(trainer.view_types)}
    result = {"per_image_per_view": {t: per_type[t] / (batch * counts[t]) for t in counts},
              "target_per_image": per_type["target"] / batch, "loss_per_image": per_type["loss"] / batch}
    if per_block:  # one block of one view: divide by that type's view count
        result["largest_block_per_image"] = max(b / (batch * counts[t]) for (t, _), b in blocks.items())
    return result


def state_bytes(trainer) -> dict:
    """fp32 bytes of parameters (online, heads, target), gradients and optimiser state on one unsharded rank."""
    params = list(trainer.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad) * 4
    frozen = sum(p.numel() for p in params if not p.requires_grad) * 4
    states = OPTIMISER_STATES[trainer.cfg.optim.name]
    return {"parameters": trainable + frozen, "gradients": trainable, "optimiser": states * trainable,
            "optimiser_name": trainer.cfg.optim.name}


def per_gpu(measured: dict, counts: dict[str, int], images: int, per_view_backward: bool, checkpointing: bool,
            largest_block: float) -> float:
    """Activation bytes alive at the peak for ``images`` images per GPU."""
    views = {t: measured["per_image_per_view"][t] * images for t in counts}
    if per_view_backward:  # one view's graph at a time (plus the targets, kept all step)
        online = max(views.values())
    else:
        online = sum(views[t] * n for t, n in counts.items())
    peak = online + (measured["target_per_image"] + measured["loss_per_image"]) * images
    return peak + (largest_block * images if checkpointing else 0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=4, help="images per view in the measured step")
    parser.add_argument("--locals", type=int, nargs="+", default=[2, 4], help="local-view counts to extrapolate (200 ep: 2, 800 ep: 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as out:
        for name in args.models:
            results[name] = {}
            for precision in args.precisions:
                measured = {}
                for checkpointing in (False, True):
                    trainer = build_trainer(MODELS[name], checkpointing, Path(out) / name)
                    state = state_bytes(trainer)  # fp32: FSDP2 keeps fp32 shards under bf16 too
                    measured[checkpointing] = measure(trainer, args.batch, not checkpointing, DTYPES[precision])
                    print(name, precision, "checkpointing" if checkpointing else "plain", measured[checkpointing], flush=True)
                fixed = state["parameters"] + state["gradients"] + state["optimiser"]
                largest_block = measured[False]["largest_block_per_image"]
                entry = {"measured": {str(k).lower(): v for k, v in measured.items()}, "state_bytes_fp32": state, "totals": {}}
                for locals_ in args.locals:
                    counts = {"global": 2, "local": locals_, "cutout": 1}
                    totals = {}
                    for per_view_backward in (False, True):
                        for checkpointing in (False, True):
                            activations = per_gpu(measured[checkpointing], counts, PER_GPU, per_view_backward, checkpointing, largest_block)
                            key = f"locals={locals_} backward={'per_view' if per_view_backward else 'joint'} ac={checkpointing}"
                            totals[key] = entry["totals"][key] = {"activations": activations, "total": activations + fixed}
                    rows.append([name, precision, f"2+{locals_}+1",
                                 *(gb(measured[c]["per_image_per_view"][t] * PER_GPU) for c in (False, True) for t in ("global", "local")),
                                 gb(fixed), *(gb(t["total"]) for t in totals.values())])
                results[name][precision] = entry
    header = ["model", "activations", "views", "global/view", "local/view", "global/view AC", "local/view AC", "params+grads+optim",
              "joint", "joint + AC", "per-view", "per-view + AC"]  # the order of ``totals`` above
    print_table(f"GB per GPU at {PER_GPU} images per GPU, 1 unsharded rank (activations measured at batch {args.batch} on CPU)",
                header, rows, left_columns=3)
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    write_report(RESULTS, "activation_memory", argv, batch=args.batch, per_gpu=PER_GPU, results=results,
                 environment={"torch": torch.__version__, "threads": args.threads})


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f}"


if __name__ == "__main__":
    main()
