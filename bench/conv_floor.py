"""How close a P1 iteration's convolutions run to this CPU's matrix-multiply rate.

Times, in one process: a large fp32 matrix product (the rate that convolutions, computed as
matrix products, can hardly beat), each convolution of the P1 ConvNet on a 64-image
real chunk, the whole real forward of a P1 iteration (640 images, no graph) and the synthetic
forward and backward to the images at IPC 1 and 10. From those it prints the floor of one `dm`
iteration: the time of its convolution work if every convolution ran at the matrix-product rate.

    python bench/conv_floor.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atomdistill.models import build_model  # noqa: E402
from atomdistill.evaluate import cpu_name  # noqa: E402
from atomdistill.runtime import cpu_flags, tune_cpu_allocator  # noqa: E402

# The vector instruction sets that decide the fp32 and bf16 rates.
NAMED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def median_time(fn, repeats: int) -> float:
    fn()   # warm-up: allocations, weight reorders
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    tune_cpu_allocator()   # as the command line does
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = [f for f in NAMED_FLAGS if f in (cpu_flags() or ())]
    print(f"{cpu_name()} ({' '.join(flags) or 'none of ' + ' '.join(NAMED_FLAGS)}); torch {torch.__version__}; "
          f"{args.threads} threads")

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n ** 3 / median_time(lambda: a @ b, args.repeats) / 1e9
    print(f"\nfp32 matrix product {n}x{n}: {gemm:.1f} GFLOP/s")

    print("\n| convolution (64 images) | GFLOP | ms | GFLOP/s | of the matrix-product rate |\n|---|---|---|---|---|")
    conv_gflop = 0.0
    with torch.no_grad():
        for c_in, size in ((3, 32), (128, 16), (128, 8)):
            x, w = torch.randn(64, c_in, size, size), torch.randn(128, c_in, 3, 3)
            gflop = 2 * 64 * size * size * 128 * c_in * 9 / 1e9
            conv_gflop += gflop
            t = median_time(lambda: F.conv2d(x, w, padding=1), args.repeats)
            print(f"| {c_in}->128 at {size}x{size} | {gflop:.2f} | {t * 1e3:.1f} | {gflop / t:.1f} | {gflop / t / gemm:.0%} |")

    net = build_model("convnet", 3, 10, 32).requires_grad_(False)
    real = torch.randn(640, 3, 32, 32)

    def real_forward():
        with torch.no_grad():
            for chunk in real.split(64):
                net.features(chunk)

    t_real, g_real = median_time(real_forward, max(3, args.repeats // 2)), 10 * conv_gflop
    rows = [("real forward, 640 images (10 classes x 64)", t_real, g_real)]
    syn_passes = {}   # ipc -> (seconds, convolution GFLOP)
    for ipc in (1, 10):
        syn = torch.randn(10 * ipc, 3, 32, 32, requires_grad=True)

        def syn_pass():
            net.features(syn)[1].sum().backward()

        # forward plus the backward to the images (the network is frozen: no weight gradients),
        # twice the forward's convolution work
        syn_passes[ipc] = (median_time(syn_pass, args.repeats), 2 * conv_gflop * 10 * ipc / 64)
        rows.append((f"synthetic forward + backward, IPC {ipc}", *syn_passes[ipc]))
    print("\n| pass | s | convolution GFLOP | s at the matrix-product rate |\n|---|---|---|---|")
    for name, t, gflop in rows:
        print(f"| {name} | {t:.3f} | {gflop:.1f} | {gflop / gemm:.3f} |")
    for ipc, (t_syn, g_syn) in syn_passes.items():
        print(f"\nIPC {ipc}: measured real + synthetic passes {t_real + t_syn:.3f} s; the same convolution work "
              f"at the matrix-product rate {(g_real + g_syn) / gemm:.3f} s (the floor of a `dm` iteration "
              "without lower precision)")


if __name__ == "__main__":
    main()
