"""Time the evaluation protocol: `runs` networks trained together (vmap) vs one after another.

Usage:
    python bench/eval_speed.py                          # embedded digits, IPC 10, 5 runs x 100 epochs
    python bench/eval_speed.py --runs 3 --epochs 20 --model convnet-bn --image-size 32
    python bench/eval_speed.py --dataset cifar10 --data-root DIR --ipc 10 --device cuda

The set is 'random real': the first `ipc` training images of each class. Both paths use the same
seed, so they see the same initial weights, shuffles and DSA draws; their accuracies agree up to
float rounding (vmapped convolutions sum in another order), reported as test images of difference.
"""
from __future__ import annotations

import argparse
import time

import torch

from atomdistill.data import load_dataset
from atomdistill.evaluate import EvalProtocol, cpu_name, train_and_test
from atomdistill.runtime import resolve_device


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


if __name__ == "__main__":
    main()
