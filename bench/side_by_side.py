"""Our presets beside the authors' DM and DataDAM code: P1 s/iter and peak memory, one CPU, one run.

    python bench/side_by_side.py --data-root data --official-dm DM_DIR --official-datadam DATADAM_DIR
    python bench/side_by_side.py --data-root data --official-dm DM_DIR --ipc 10 --compile

A speed ratio between two codes means something only when both ran on one CPU at one time (the
same official DataDAM took 1.85 s/iter on one "AMD EPYC" and 1.07 on another). This script runs
them one process after the other at P1's settings (CIFAR-10, 64 real images per
class, DSA, no ZCA, ConvNet-3, real-image init, SGD lr 1 on the images): per IPC, official DM
(its ConvNet, instance norm), our `dm`, `atom`, `datadam` on the same net, then official DataDAM
(its ConvNet, batch norm) and our `datadam`, `atom` on `convnet-bn`. `--compile` adds our `dm`
and `atom` compiled. s/iter is the median over the iterations from `--warmup` on of each
process; peak memory is the process's peak RSS (from the kernel, for both codes).

The official code is not part of atomdistill: DM_DIR holds `main_DM.py`, `utils.py`,
`networks.py` of VICO-UoE/DatasetCondensation, DATADAM_DIR those of DataDistillation/DataDAM
(`main_DataDAM.py`). They need the patches of docs/benchmarks.md ("Running the official code")
to run on current software, to skip their evaluation when NO_EVAL=1 is set, and to print
`ITER <iteration> <seconds>` for each iteration (network build to `loss.item()`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from atomdistill.evaluate import cpu_name  # noqa: E402
from atomdistill.runtime import cpu_flags  # noqa: E402

P1 = ["--dataset", "CIFAR10", "--model", "ConvNet", "--dsa_strategy", "color_crop_cutout_flip_scale_rotate",
      "--init", "real", "--lr_img", "1", "--batch_real", "64", "--num_exp", "1"]
OFFICIAL_SCRIPT = {"dm": "main_DM.py", "datadam": "main_DataDAM.py"}


def run_official(code: str, folder: Path, ipc: int, args) -> dict:
    """One run of the authors' code; its ITER lines give the times, the kernel its peak RSS."""
    script = folder / OFFICIAL_SCRIPT[code]
    cmd = [sys.executable, script.name, *P1, "--ipc", str(ipc), "--Iteration", str(args.iterations),
           "--data_path", str(Path(args.data_root).resolve()), "--save_path", str(Path(args.scratch).resolve())]
    env = {**os.environ, "NO_EVAL": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    times = {}
    for line in proc.stdout:
        if line.startswith("ITER "):
            _, it, sec = line.split()
            times[int(it)] = float(sec)
    _, status, usage = os.wait4(proc.pid, 0)
    timed = [t for it, t in times.items() if it >= args.warmup]
    if os.waitstatus_to_exitcode(status) != 0 or not timed:
        raise SystemExit(f"error: the official {code} run failed or printed no ITER lines (command: "
                         f"cd {folder} && NO_EVAL=1 {' '.join(cmd)}); see docs/benchmarks.md for the patches it needs")
    return {"s_per_iter": statistics.median(timed), "peak_gb": usage.ru_maxrss / 2**20}


def run_ours(method: str, net: str, ipc: int, args, compiled: bool) -> dict:
    """One process of bench/distill_speed.py's measurement (the same loop the CLI runs)."""
    cmd = [sys.executable, str(HERE / "distill_speed.py"), "--one-method", method, "--one-ipc", str(ipc),
           "--dataset", "cifar10", "--data-root", args.data_root, "--batch-real", "64", "--net", net,
           "--iterations", str(args.iterations), "--warmup", str(args.warmup)] + (["--compile"] if compiled else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: our {method} run failed: {out.stderr.strip().splitlines()[-1]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"s_per_iter": statistics.median(row["times"]), "peak_gb": row["peak_gb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data", help="folder holding cifar-10-batches-py")
    p.add_argument("--official-dm", type=Path, help="folder with the authors' main_DM.py (patched)")
    p.add_argument("--official-datadam", type=Path, help="folder with the authors' main_DataDAM.py (patched)")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time our dm and atom under torch.compile")
    p.add_argument("--scratch", default="/tmp/atomdistill-side-by-side", help="the official code's --save_path")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    if not (Path(args.data_root) / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"error: {args.data_root}/cifar-10-batches-py not found; pass --data-root")
    for code, folder in (("dm", args.official_dm), ("datadam", args.official_datadam)):
        if folder and not (folder / OFFICIAL_SCRIPT[code]).is_file():   # before any work, not an hour in
            raise SystemExit(f"error: {folder / OFFICIAL_SCRIPT[code]} not found; "
                             f"--official-{code} names the folder holding it")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)

    import torch
    flags = sorted((cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"# {cpu_name()} ({', '.join(flags) or 'flags unknown'}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; P1, median s/iter from iteration {args.warmup} of {args.iterations}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    print("| code | net | IPC | s/iter | peak RSS | vs. official peer |\n|---|---|---|---|---|---|")
    rows = []
    for ipc in args.ipc:
        # (code label, net, how to run it, official peer)
        plan = []
        if args.official_dm:
            plan.append(("official DM", "ConvNet-IN", lambda: run_official("dm", args.official_dm, ipc, args), None))
        for method in ("dm", "atom", "datadam"):   # the targets put atom and datadam beside our dm
            plan.append((f"ours `{method}`", "ConvNet-IN", lambda m=method: run_ours(m, "convnet", ipc, args, False),
                         "official DM" if method == "dm" else "ours `dm`"))
        if args.compile:
            for method in ("dm", "atom"):
                plan.append((f"ours `{method}` --compile", "ConvNet-IN",
                             lambda m=method: run_ours(m, "convnet", ipc, args, True), "official DM"))
        if args.official_datadam:
            plan.append(("official DataDAM", "ConvNet-BN",
                         lambda: run_official("datadam", args.official_datadam, ipc, args), None))
        for method in ("datadam", "atom"):
            plan.append((f"ours `{method}`", "ConvNet-BN",
                         lambda m=method: run_ours(m, "convnet-bn", ipc, args, False), "official DataDAM"))
        done = {}
        for label, net, run, peer in plan:
            r = run()
            done[label] = r
            ratio = f"{r['s_per_iter'] / done[peer]['s_per_iter']:.2f}x {peer}" if peer in done else ""
            rows.append({"code": label, "net": net, "ipc": ipc, **r})
            print(f"| {label} | {net} | {ipc} | {r['s_per_iter']:.3f} | {r['peak_gb']:.2f} GB | {ratio} |", flush=True)
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
