"""Peak host memory per rank of the end-of-training evaluation on a synthetic feature bank: 1 rank vs 2 ranks.

Each rank runs what ``mtssl.eval.end_of_training`` runs on its share of the data, on the CPU (gloo): sharded
feature extraction (``extract_feature_shard``) of a synthetic train and val set whose "images" are the
features themselves (an identity backbone, so the bank size is exact), distributed kNN
(``knn_classify_sharded``) and the lr-grid linear probe (``linear_probe_sharded``). Peak RSS growth
(``resource.getrusage``, from just before evaluation) is reported per rank next to the bank size.

    python benchmarks/eval_memory.py                 # 200k x 256 fp32 train bank (195 MiB)
    python benchmarks/eval_memory.py --quick         # 50k x 256

Goal: peak growth per rank <= bank / world size + a constant (the val set, the kNN chunk, the loader).
Results: benchmarks/results/eval_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from report import print_table, write_report

from mtssl.distributed.process_group import free_local_port

RESULTS = Path(__file__).parent / "results" / "eval_memory.json"


class SyntheticFeatures(torch.utils.data.Dataset):
    """Item i: a seeded random feature vector and label i % classes (generated on demand, never stored)."""

    def __init__(self, size: int, dim: int, classes: int, seed: int):
        self.size, self.dim, self.classes, self.seed = size, dim, classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 10_000_019 + index)
        return torch.randn(self.dim, generator=g) + (index % self.classes), index % self.classes


def measure_rank(rank: int, world_size: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mtssl.eval.features import extract_feature_shard
    from mtssl.eval.knn import knn_classify_sharded
    from mtssl.eval.linear import linear_probe_sharded

    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    train_set = SyntheticFeatures(args.train, args.dim, args.classes, seed=0)
    val_set = SyntheticFeatures(args.val, args.dim, args.classes, seed=1)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train = extract_feature_shard(lambda x: x, train_set, 1024)
    val = extract_feature_shard(lambda x: x, val_set, 1024)
    after_extract_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    knn = knn_classify_sharded(train, val, args.classes, ks=(20,))
    probe = linear_probe_sharded(train, val, args.classes, epochs=1, lr_grid=(0.01, 0.1), batch_size=1024)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out_dir, f"{rank}.json").write_text(json.dumps({
        "extract_growth_mib": (after_extract_kib - before_kib) / 1024, "peak_growth_mib": (peak_kib - before_kib) / 1024,
        "shard_mib": train.features.numel() * train.features.element_size() / 2**20,
        "knn_top1": knn["k20"]["top1"], "linear_top1": probe["top1"]}))
    if world_size > 1:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200_000)
    parser.add_argument("--val", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="50k train items")
    args = parser.parse_args(argv)
    if args.quick:
        args.train = 50_000
    bank_mib = args.train * args.dim * 4 / 2**20
    rows, runs = [], {}
    for world_size in (1, 2):
        with tempfile.TemporaryDirectory() as out_dir:
            mp.spawn(measure_rank, args=(world_size, free_local_port(), args, out_dir), nprocs=world_size, join=True)
            ranks = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world_size)]
        runs[world_size] = ranks
        for r, m in enumerate(ranks):
            rows.append((str(world_size), str(r), f"{bank_mib:.0f}", f"{m['shard_mib']:.0f}", f"{m['extract_growth_mib']:.0f}",
                         f"{m['peak_growth_mib']:.0f}", f"{m['peak_growth_mib'] / bank_mib:.2f}"))
    assert runs[1][0]["knn_top1"] == runs[2][0]["knn_top1"] == runs[2][1]["knn_top1"], "kNN differs between 1 and 2 ranks"
    print_table(f"Evaluation peak host memory per rank, {args.train} x {args.dim} fp32 train bank, {args.val} val",
                ("world", "rank", "bank MiB", "shard MiB", "extract growth MiB", "peak growth MiB", "peak / bank"), rows, left_columns=0)
    write_report(RESULTS, "eval_memory", argv, bank_mib=bank_mib, train=args.train, val=args.val, dim=args.dim, ranks=runs)


if __name__ == "__main__":
    main()
