"""The ablation that sets the `atom` preset's open constants (docs/method.md, "The ablation").

    python bench/ablation.py --data-root data                 # IPC 1, P1 budget, one change at a time
    python bench/ablation.py --data-root data --ipc 10 --seeds 0 1 2

Starting from a fixed base point, the preset's values before the ablation (w_s 1, w_c 1, lambda 0.01, p 4,
all intermediate layers; pinned here, so the table does not move when the preset does), each
variant changes one constant: the weight of channel against spatial attention,
the power p, lambda, and which layers enter. Every variant is distilled and evaluated exactly
as `bench/cifar10.py --budget cpu` does (protocol P1: ConvNet-3 instance norm, real init,
Siamese DSA, no ZCA, 64 real images per class, 300 iterations at IPC 1 / 200 at IPC 10,
3 ConvNets x 300 epochs), through the same command-line steps, and finished steps are skipped
on a re-run. Several --seeds distil several sets per variant: accuracy is then mean ± std over
every (seed, model), and the table gives the std over seeds too, since the run-to-run spread
of one method is larger than the spread over evaluation models (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cifar10 import BUDGETS, cpu_name, run_step, save_step

# The base point, passed explicitly on top of the atom preset; a variant's options come after
# it and override it (argparse keeps the last value).
# (layers: all intermediate, the preset's.)
BASE = ["--spatial", "1", "--channel", "1", "--mmd", "0.01", "--power", "4", "--scale", "100"]
VARIANTS = {   # name: the one option that differs from BASE
    "base": [],
    "channel=0.25": ["--channel", "0.25"],
    "channel=0.5": ["--channel", "0.5"],
    "channel=2": ["--channel", "2"],
    "channel=4": ["--channel", "4"],
    "channel=8": ["--channel", "8"],
    "channel=0": ["--channel", "0"],   # = the datadam preset
    "p=1": ["--power", "1"],
    "p=2": ["--power", "2"],
    "lambda=0": ["--mmd", "0"],
    "lambda=0.1": ["--mmd", "0.1"],
    "layers=1": ["--layers", "1"],
    "layers=2": ["--layers", "2"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="data")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None, help="default results/ablation-ipcN")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", choices=["cpu", "smoke"], default="cpu",
                   help="cpu = protocol P1 (the README table); smoke = a seconds-long check that every step runs")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite ablation.md from the finished runs (missing (variant, seed) pairs are left out)")
    args = p.parse_args()
    b = BUDGETS[args.budget]
    if args.ipc not in b["iterations"]:
        raise SystemExit(f"the {args.budget} budget has no IPC {args.ipc}; use one of {sorted(b['iterations'])}")
    out = Path(args.out or f"results/ablation-ipc{args.ipc}")
    out.mkdir(parents=True, exist_ok=True)
    steps_file = out / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else {}
    data = ["--dataset", "cifar10", "--data-root", args.data_root]

    for variant in [] if args.table_only else args.variants:
        for seed in args.seeds:
            name = f"{slug(variant)}-seed{seed}"
            run = out / name
            todo = [(name, ["distill", *data, "--ipc", str(args.ipc), "--method", "atom", *BASE, *VARIANTS[variant],
                            "--iterations", str(b["iterations"][args.ipc]), "--batch-real", str(b["batch_real"]),
                            "--no-zca", "--seed", str(seed), "--log-every", "10", "--device", args.device,
                            "--out", str(run), "--overwrite"]),
                    (f"eval-{name}", ["evaluate", str(run), *data, "--models", "convnet", "--runs", str(b["runs"]),
                                      "--epochs", str(b["epochs"]), "--seed", str(seed), "--device", args.device,
                                      "--out", str(run / "eval.json")])]
            for step, cmd in todo:
                if step not in steps:
                    save_step(steps_file, steps, step, run_step(cmd, out / f"{step}.log"))

    import torch
    protocol = "protocol P1 (cpu budget)" if args.budget == "cpu" else f"{args.budget} budget"
    lines = [f"ATOM ablation on CIFAR-10, IPC {args.ipc}, {protocol}, seeds {args.seeds}; "
             f"{cpu_name()}, torch {torch.__version__}; accuracy only (no timings).", "",
             "| variant | seeds | accuracy % (mean ± std over seeds x models) | std over seeds |", "|---|---|---|---|"]
    for variant in args.variants:
        accs, per_seed = [], []
        for seed in args.seeds:
            record = out / f"{slug(variant)}-seed{seed}" / "eval.json"
            if record.exists():
                a = json.loads(record.read_text())["results"]["convnet"]["accs"]
                accs += a
                per_seed.append(statistics.mean(a))
        if accs:
            spread = f"{100 * statistics.stdev(per_seed):.2f}" if len(per_seed) > 1 else "–"
            lines.append(f"| {variant} | {len(per_seed)} | {100 * statistics.mean(accs):.2f} ± "
                         f"{100 * statistics.pstdev(accs):.2f} | {spread} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
