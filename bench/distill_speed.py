"""Seconds per distillation iteration and peak memory, per preset and IPC.

    python bench/distill_speed.py --data-root DIR                 # CIFAR-10, IPC 1 10 50, every preset
    python bench/distill_speed.py --data-root DIR --batch-real 64 --ipc 1 10 --iterations 15
    python bench/distill_speed.py --dataset digits                # the embedded set, no download
    python bench/distill_speed.py --data-root DIR --batch-real 64 --baseline main   # today's code beside main's
    python bench/distill_speed.py --data-root DIR --batch-real 64 --ipc 1 --methods atom --nets pool --pool-steps 2
    python bench/distill_speed.py --data-root DIR --batch-real 64 --ipc 1 10 --compile --baseline HEAD   # compiled vs eager

Options of the loop (--factor, --nets, --pool-*, --mmd-kernel) apply to every row; with --nets
pool an iteration includes the pool network's training steps, as in a run.

Each (method, IPC) runs in its own process so that its peak memory is its own: peak RSS of
that process on the CPU, peak allocated memory on a GPU. s/iter is the median over the
iterations after the first `--warmup` (network build, data sampling, DSA, forward, backward,
step: everything of one iteration, nothing else). The hardware line names CPU, threads and
torch version; compare rows only within one run.

`--baseline REF` also times the package as it was at git revision REF (bench/baseline.py), side
by side: per (method, IPC), `--rounds` rounds of one process of today's code then one of REF's
(A, B, A, B, ...), so that load on a shared machine hits both alike; s/iter is the median over
all their timed iterations, peak memory the largest of their processes, and new/base the ratio
of the s/iter medians. `--precision bf16` times today's code under bf16 autocast.
Options of the loop (--factor, --nets, --pool-*, --mmd-kernel) apply to both codes' rows, so that
new/base compares the same computation; --compile and --precision to today's code's rows only:
`--compile --baseline HEAD` times the compiled iteration beside the eager one of the same code.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atomdistill.evaluate import cpu_name  # noqa: E402


LOOP_OPTIONS = ("factor", "nets", "pool_size", "pool_steps", "pool_refresh", "mmd_kernel", "compile")
DEFAULTS = {"factor": 1, "nets": "random", "pool_size": 100, "pool_steps": 10, "pool_refresh": 30, "mmd_kernel": None}


def measure(args) -> dict:
    """One configuration, in this process."""
    import torch

    from atomdistill.runtime import tune_cpu_allocator
    tune_cpu_allocator()   # as the command line does
    import importlib

    from atomdistill.data import load_dataset
    if args.one_code == "base":
        import baseline
        distill = importlib.import_module(baseline.load(args.baseline).__name__ + ".distill")
        # The loop's options apply to both codes (but --compile: compiled against eager), so that
        # new/base compares the same computation; a revision without an option set here cannot.
        fields = {f.name for f in dataclasses.fields(distill.DistillConfig)}
        extra = {k: getattr(args, k) for k in LOOP_OPTIONS if k != "compile" and k in fields}
        missing = [k for k in LOOP_OPTIONS if k != "compile" and k not in fields and getattr(args, k) != DEFAULTS[k]]
        if missing:
            raise SystemExit(f"revision {args.baseline} has no option {', '.join('--' + k.replace('_', '-') for k in missing)}; "
                             "time it without that option or against a later revision")
    else:
        distill = importlib.import_module("atomdistill.distill")
        extra = {"precision": args.precision, **{k: getattr(args, k) for k in LOOP_OPTIONS}}

    data = load_dataset(args.dataset, args.data_root)
    cfg = distill.DistillConfig(dataset=args.dataset, ipc=args.one_ipc, method=args.one_method,
                                batch_real=args.batch_real, zca=args.zca, device=args.device,
                                iterations=args.iterations, seed=0, real_chunk=args.real_chunk, net=args.net, **extra)
    d = distill.Distiller(cfg, data=data, progress=False)
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
            "times": times[args.warmup:], "cpu_s_per_iter": statistics.median(cpu_times[args.warmup:]), "peak_gb": peak, "memory": mem, "device": str(device),
            "factor": getattr(d.config, "factor", 1)}


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
    p.add_argument("--net", default=None, help="distillation network (default convnet)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="today's code's precision")
    p.add_argument("--baseline", default=None, help="git revision to time beside today's code (A, B, A, B ...)")
    p.add_argument("--rounds", type=int, default=2, help="with --baseline: processes per code, alternating")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--factor", type=int, default=DEFAULTS["factor"])
    p.add_argument("--nets", choices=("random", "pool"), default=DEFAULTS["nets"])
    p.add_argument("--pool-size", type=int, default=DEFAULTS["pool_size"])
    p.add_argument("--pool-steps", type=int, default=DEFAULTS["pool_steps"])
    p.add_argument("--pool-refresh", type=int, default=DEFAULTS["pool_refresh"])
    p.add_argument("--mmd-kernel", choices=("linear", "gaussian"), default=DEFAULTS["mmd_kernel"])
    p.add_argument("--compile", action="store_true", help="today's code with torch.compile (warm-up excluded "
                   "by --warmup; beside --baseline HEAD it times compiled against eager)")
    p.add_argument("--one-method", help=argparse.SUPPRESS)
    p.add_argument("--one-ipc", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-code", default="new", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_method:
        print(json.dumps(measure(args)))
        return

    import torch
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() and args.device != 'cpu' else ''}")
    import baseline
    codes = ["new"] + (["base"] if args.baseline else [])
    names = {"new": f"new {baseline.revision()}" + (f" {args.precision}" if args.precision != "fp32" else ""),
             "base": f"base {baseline.revision(args.baseline)}" if args.baseline else ""}
    print(f"# {args.dataset}, batch_real {args.batch_real}, ZCA {'on' if args.zca else 'off'}, net {args.net or 'convnet'}, "
          f"median of iterations {args.warmup}..{args.iterations - 1}"
          + (f" of {args.rounds} processes per code, alternating" if args.baseline else "")
          + "; " + ", ".join(f"{k} {getattr(args, k)}" for k in LOOP_OPTIONS)
          + f"; load average at start {os.getloadavg()[0]:.2f}\n")
    print("| method | IPC | code | s/iter | peak memory |" + (" new/base |" if args.baseline else "")
          + "\n|---|---|---|---|---|" + ("---|" if args.baseline else ""))
    rows = []
    for ipc in args.ipc:
        for method in args.methods:
            got = {c: [] for c in codes}
            for _ in range(args.rounds if args.baseline else 1):
                for code in codes:
                    cmd = [sys.executable, __file__, "--one-method", method, "--one-ipc", str(ipc),
                           "--one-code", code] + sys.argv[1:]
                    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                    if out.returncode != 0:
                        print(f"| {method} | {ipc} | {names[code]} | failed: {out.stderr.strip().splitlines()[-1]} | |")
                        continue
                    got[code].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {}
            for code in codes:
                if not got[code]:
                    continue
                times = [t for r in got[code] for t in r["times"]]
                peak = max(got[code], key=lambda r: r["peak_gb"])
                row = {**peak, "code": names[code], "s_per_iter": statistics.median(times), "times": times}
                med[code] = row["s_per_iter"]
                rows.append(row)
                ratio = (f" {med['new'] / med['base']:.2f} |" if code == "base" and "new" in med else " |") \
                    if args.baseline else ""
                print(f"| {method} | {ipc} | {names[code]} | {row['s_per_iter']:.3f} | {row['memory']} |{ratio}",
                      flush=True)
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
