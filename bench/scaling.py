"""Class-sharded distillation: speed and memory per process, 1 vs N processes (gloo, CPU).

    python bench/scaling.py                                 # CIFAR-10 under ./data if there, else digits
    python bench/scaling.py --dataset cifar10 --data-root DATA --procs 1,2 --iterations 3 --zca auto

Every configuration runs in fresh processes (so peak RSS is that run's own), one after another,
on the same machine in one invocation: the ratios compare like with like. The cores are split
evenly (2 cores: 1 process x 2 threads vs 2 processes x 1 thread), so on one CPU the speed ratio
shows the overhead of sharding rather than a gain; the gain is N times the hardware. Memory is
what sharding buys on any machine: each process holds only its classes' training images.

Reported per configuration: setup seconds (load the shard, ZCA moments and all-reduce, first
images), seconds per iteration (after --warmup untimed ones; ranks move in step, so the slowest
rank sets the pace), iterations/s, and peak RSS per rank. Then the training-set bytes one rank
holds for more shardings, computed from the class sizes (no extra runs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, options: dict, result_dir: str):
    from atomdistill.distill import DistillConfig, Distiller
    from atomdistill.distributed import ShardedDistiller, process_group
    from atomdistill.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    config = DistillConfig(**options)
    t0 = time.perf_counter()
    with process_group("cpu") as group:
        d = (Distiller(config, progress=False) if group is None
             else ShardedDistiller(config, group, progress=False))
        setup_s = time.perf_counter() - t0
        rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Time each iteration from one step_loss call to the next (forward, backward, step, all-reduce).
        stamps, step_loss = [], d.step_loss

        def timed(syn, iteration):
            stamps.append(time.perf_counter())
            return step_loss(syn, iteration)

        d.step_loss = timed
        d.run()
        stamps.append(time.perf_counter())
    per_iter = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {"rank": rank, "setup_s": setup_s, "iter_s": per_iter, "classes": len(d.global_ids),
              "train_bytes": d.data.train_images.nelement() * 4,
              "class_sizes": [len(i) for i in d.data.class_indices()],
              "peak_rss_setup_mb": rss_setup / 1024,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_config(world: int, cores: int, options: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), max(1, cores // world), options, tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="default: cifar10 if --data-root holds it, else digits")
    p.add_argument("--data-root", default="data")
    p.add_argument("--procs", default="1,2", help="process counts to compare")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by each configuration")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--zca", choices=("auto", "on", "off"), default="off",
                   help="auto: on for CIFAR as in real runs; costs about a minute of setup per configuration "
                        "on 2 cores (the D x D moments), so the default run leaves it off")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    dataset = args.dataset or ("cifar10" if (Path(args.data_root) / "cifar-10-batches-py").is_dir() else "digits")
    options = dict(dataset=dataset, data_root=args.data_root, ipc=args.ipc, batch_real=args.batch_real,
                   iterations=args.warmup + args.iterations, log_every=1, device="cpu",
                   zca={"auto": None, "on": True, "off": False}[args.zca])
    print(f"{dataset}: ipc {args.ipc}, batch_real {args.batch_real}, {args.warmup} warm-up + {args.iterations} "
          f"timed iterations, {args.cores} cores split over the processes, gloo, torch {torch.__version__}")
    rows = {}
    for world in (int(x) for x in args.procs.split(",")):
        ranks = run_config(world, args.cores, options)
        step = [max(r["iter_s"][i] for r in ranks) for i in range(args.warmup, args.warmup + args.iterations)]
        rows[world] = {"ranks": ranks, "s_per_iter": sum(step) / len(step),
                       "setup_s": max(r["setup_s"] for r in ranks),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks)}
        rows[world]["it_per_s"] = 1 / rows[world]["s_per_iter"]
    base = rows[min(rows)]
    print(f"\n{'procs':>5} {'threads':>7} {'classes/rank':>12} {'setup s':>8} {'s/iter':>7} {'it/s':>6} "
          f"{'speed x':>7} {'peak RSS MB/rank':>16} {'memory x':>8} {'train MB/rank':>13}")
    for world, r in rows.items():
        print(f"{world:>5} {max(1, args.cores // world):>7} {max(x['classes'] for x in r['ranks']):>12} "
              f"{r['setup_s']:>8.1f} {r['s_per_iter']:>7.2f} {r['it_per_s']:>6.3f} "
              f"{r['it_per_s'] / base['it_per_s']:>7.2f} {r['peak_rss_mb']:>16.0f} "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:>8.2f} "
              f"{max(x['train_bytes'] for x in r['ranks']) / 2**20:>13.1f}")
    # Training images one rank holds under more shardings (contiguous blocks, as torchrun would split).
    from atomdistill.distributed import shard_classes
    sizes = base["ranks"][0]["class_sizes"]
    per_image = base["ranks"][0]["train_bytes"] / sum(sizes)
    k = len(sizes)
    shardings = [w for w in (1, 2, 4, 8, 10, 16, 20, 50, 100) if w <= k]
    print("\ntraining images held by the largest rank (MB): "
          + ", ".join(f"{w} procs {max(sum(sizes[c] for c in shard_classes(k, w, r)) for r in range(w)) * per_image / 2**20:.1f}"
                      for w in shardings))
    if args.out:
        Path(args.out).write_text(json.dumps({"options": options, "cores": args.cores, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
