"""Seconds per distillation iteration and peak memory, per preset and IPC.

    python bench/distill_speed.py --data-root DIR                 # CIFAR-10, IPC 1 10 50, every preset
    python bench/distill_speed.py --data-root DIR --batch-real 64 --ipc 1 10 --iterations 15
    python bench/distill_speed.py --dataset digits                # the embedded set, no download
    python bench/distill_speed.py --data-root DIR --batch-real 64 --ipc 1 --methods atom --nets pool --pool-steps 2

Options of the loop (--factor, --nets, --pool-*, --mmd-kernel) apply to every row; with --nets
pool an iteration includes the pool network's training steps, as in a run.

Each (method, IPC) runs in its own process so that its peak memory is its own: peak RSS of
that process on the CPU, peak allocated memory on a GPU. s/iter is the median over the
iterations after the first `--warmup` (network build, data sampling, DSA, forward, backward,
step: everything of one iteration, nothing else). CPU s/iter is the process's CPU time for the
same iterations: on a machine shared with other jobs it counts this job's work, not its wait
(with several threads it sums over them). The hardware line names CPU, threads and torch
version; compare rows only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from atomdistill.evaluate import cpu_name


LOOP_OPTIONS = ("factor", "nets", "pool_size", "pool_steps", "pool_refresh", "mmd_kernel")


def measure(args) -> dict:
    """One configuration, in this process."""
    import torch

    from atomdistill.runtime import tune_cpu_allocator
    tune_cpu_allocator()   # as the command line does
    from atomdistill.data import load_dataset
    from atomdistill.distill import DistillConfig, Distiller

    data = load_dataset(args.dataset, args.data_root)
    cfg = DistillConfig(dataset=args.dataset, ipc=args.one_ipc, method=args.one_method, batch_real=args.batch_real,
                        zca=args.zca, device=args.device, iterations=args.iterations, seed=0,
                        real_chunk=args.real_chunk, **{k: getattr(args, k) for k in LOOP_OPTIONS})
    d = Distiller(cfg, data=data, progress=False)
    device = d.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    syn = d.train_images[torch.cat([i[:cfg.ipc] for i in d.cpu_class_indices])].clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=d.config.lr, momentum=0.5)
    times, cpu_times = [], []
    for it in range(args.iterations):
        t, c = time.perf_counter(), time.process_time()
        loss, _ = d.step_loss(syn, it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if d.pool is not None:
            d.pool.train(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        mem = f"{peak:.2f} GB GPU"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kB -> GB
        mem = f"{peak:.2f} GB RSS"
    return {"method": args.one_method, "ipc": args.one_ipc, "s_per_iter": statistics.median(times[args.warmup:]),
            "cpu_s_per_iter": statistics.median(cpu_times[args.warmup:]),
            "peak_gb": peak, "memory": mem, "device": str(device)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default="data")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--methods", nargs="+", default=["dm", "datadam", "channel", "atom"])
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--real-chunk", type=int, default=None)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zca", action="store_true", help="whiten (the default for CIFAR distillation; off in P1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--factor", type=int, default=1)
    p.add_argument("--nets", choices=("random", "pool"), default="random")
    p.add_argument("--pool-size", type=int, default=100)
    p.add_argument("--pool-steps", type=int, default=10)
    p.add_argument("--pool-refresh", type=int, default=30)
    p.add_argument("--mmd-kernel", choices=("linear", "gaussian"), default=None)
    p.add_argument("--one-method", help=argparse.SUPPRESS)
    p.add_argument("--one-ipc", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_method:
        print(json.dumps(measure(args)))
        return

    import torch
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() and args.device != 'cpu' else ''}")
    print(f"# {args.dataset}, batch_real {args.batch_real}, ZCA {'on' if args.zca else 'off'}, "
          f"median of iterations {args.warmup}..{args.iterations - 1}; "
          + ", ".join(f"{k} {getattr(args, k)}" for k in LOOP_OPTIONS) + "\n")
    print("| method | IPC | s/iter | CPU s/iter | peak memory |\n|---|---|---|---|---|")
    rows = []
    for ipc in args.ipc:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one-method", method, "--one-ipc", str(ipc)] + [
                a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                print(f"| {method} | {ipc} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {method} | {ipc} | {row['s_per_iter']:.3f} | {row['cpu_s_per_iter']:.3f} | {row['memory']} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
