"""Time the evaluation protocol: `runs` networks trained together (vmap) vs one after another.

Usage:
    python bench/eval_speed.py                          # embedded digits, IPC 10, 5 runs x 100 epochs
    python bench/eval_speed.py --runs 3 --epochs 20 --model convnet-bn --image-size 32
    python bench/eval_speed.py --dataset cifar10 --data-root DIR --ipc 10 --device cuda
    python bench/eval_speed.py --dataset cifar10 --data-root DIR --runs 3 --epochs 30 --baseline main

The set is 'random real': the first `ipc` training images of each class. Both paths use the same
seed, so they see the same initial weights, shuffles and DSA draws; their accuracies agree up to
float rounding (vmapped convolutions sum in another order), reported as test images of difference.

`--baseline REF` instead times today's code beside the package at git revision REF (bench/baseline.py),
each network trained and tested alone (the CPU default), interleaved in this process: run 0 new,
run 0 base, run 1 base, run 1 new, ... so that load on a shared machine hits both alike.
`--precision bf16` runs today's code under bf16 autocast; `--compile` runs it compiled (torch.compile),
so `--compile --baseline HEAD` times compiled against eager (the first run of each includes its warm-up).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

from atomdistill.data import load_dataset
from atomdistill.evaluate import EvalProtocol, cpu_name, train_and_test
from atomdistill.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--image-size", type=int, default=None, help="resize the images (e.g. 32 for CIFAR-sized digits)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--model", default="convnet")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--baseline", default=None, help="git revision to time beside today's code, interleaved")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="today's code's precision")
    p.add_argument("--compile", action="store_true", help="with --baseline: today's code compiled")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset, args.data_root, image_size=args.image_size)
    idx = torch.cat([i[: args.ipc] for i in data.class_indices()])   # random-real: first ipc of each class
    images, labels = data.train_images[idx], data.train_labels[idx]
    device = resolve_device(args.device)
    print(f"cpu: {cpu_name()}  threads: {torch.get_num_threads()}  torch {torch.__version__}  device: {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{data.name}: {len(images)} training images ({args.ipc}/class, {tuple(images.shape[1:])}), "
          f"{len(data.test_labels)} test images; {args.model}, {args.runs} runs x {args.epochs} epochs")

    if args.baseline:
        return compare_with_baseline(args, images, labels, data, device)
    results = {}
    for batched in (True, False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        accs = train_and_test(images, labels, data.test_images, data.test_labels, args.model,
                              EvalProtocol(runs=args.runs, epochs=args.epochs, seed=args.seed), device=device,
                              batched=batched, progress=False, num_classes=data.num_classes)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[batched] = (time.perf_counter() - t0, accs)
        name = "batched   " if batched else "sequential"
        print(f"{name} {results[batched][0]:8.1f} s   accs: {' '.join(f'{a:.4f}' for a in accs)}")
    (tb, ab), (ts, as_) = results[True], results[False]
    diff = max(round(abs(a - b) * len(data.test_labels)) for a, b in zip(ab, as_))
    print(f"speed-up (sequential / batched): {ts / tb:.2f}x")
    print("accuracies: " + ("identical" if ab == as_ else f"differ by at most {diff} test image(s) (float rounding)"))



def compare_with_baseline(args, images, labels, data, device):
    import baseline
    from atomdistill.runtime import tune_cpu_allocator
    tune_cpu_allocator()   # as the command line does
    old = importlib.import_module(baseline.load(args.baseline).__name__ + ".evaluate")
    codes = {f"new {baseline.revision()}" + (f" {args.precision}" if args.precision != "fp32" else "")
             + (" compiled" if args.compile else ""):
             _trainer(importlib.import_module("atomdistill.evaluate"), args, precision=args.precision,
                      **({"compile": True} if args.compile else {})),
             f"base {baseline.revision(args.baseline)}": _trainer(old, args)}
    names = list(codes)
    seconds = {n: 0.0 for n in names}
    accs = {n: {} for n in names}
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    for run in range(args.runs):
        for name in (names if run % 2 == 0 else names[::-1]):   # A B, B A, ...
            t0 = time.perf_counter()
            accs[name][run] = codes[name](images, labels, data.test_images, data.test_labels, run_ids=[run],
                                          device=device, batched=False, progress=False,
                                          num_classes=data.num_classes)[0]
            seconds[name] += time.perf_counter() - t0
            print(f"  run {run} {name}: {time.perf_counter() - t0:.1f} s, acc {accs[name][run]:.4f}", flush=True)
    for name in names:
        a = [accs[name][r] for r in range(args.runs)]
        mean = sum(a) / len(a)
        std = (sum((x - mean) ** 2 for x in a) / len(a)) ** 0.5
        print(f"{name:24s} {seconds[name]:8.1f} s   accs: {' '.join(f'{x:.4f}' for x in a)}   "
              f"mean {100 * mean:.2f} +- {100 * std:.2f}")
    print(f"speed-up (base / new): {seconds[names[1]] / seconds[names[0]]:.2f}x; "
          f"load average at end {os.getloadavg()[0]:.2f}")



def _trainer(module, args, **protocol):
    """module.train_and_test with the bench's protocol, for the API with EvalProtocol and the one before it."""
    if hasattr(module, "EvalProtocol"):
        p = module.EvalProtocol(runs=args.runs, epochs=args.epochs, seed=args.seed, **protocol)
        return lambda *a, **k: module.train_and_test(*a, args.model, p, **k)
    return lambda *a, **k: module.train_and_test(*a, args.model, args.runs, args.epochs, seed=args.seed, **protocol, **k)


if __name__ == "__main__":
    main()
