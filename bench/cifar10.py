"""The CIFAR-10 benchmark: every method and baseline, one protocol, one table.

    atomdistill data cifar10 --data-root data --download    # once: CIFAR-10 into data/ (any official-layout copy works)
    python bench/cifar10.py --budget cpu --data-root data    # P1 of docs/benchmarks.md, about 75 min on 2 cores
    python bench/cifar10.py --budget paper --data-root data  # the published protocol, for a GPU
    python bench/cifar10.py --data-root data --methods atom --baselines --ipc 1 --options "--factor 2"
                                                             # P1 with extra distill options (issue 16's)
    python bench/cifar10.py --data-root data --ipc 10 --eval-models convnet,alexnet,vgg11,resnet18 --device cuda
                                                             # P1 sets on four architectures (a table of each)

Budgets:
  cpu    Protocol P1 of docs/benchmarks.md, so our rows sit beside the official
         code's: ConvNet-3 (instance norm), real init, Siamese DSA, no ZCA, 64 real images per
         class, SGD lr 1 momentum 0.5, 300 iterations at IPC 1 and 200 at IPC 10; evaluation
         3 fresh ConvNets x 300 epochs. The same iterations, real batch and evaluation for
         every method: at these iterations the methods have already separated from the
         random init by several points, which is what ranks them.
  paper  20,000 iterations, batch_real 256, ZCA, IPC 1/10/50, evaluation 5 x 1000 epochs on
         ConvNet, AlexNet, VGG-11 and ResNet-18.

Every step runs the `atomdistill` command line in a child process (the commands a user runs),
so that its peak RSS is its own. Finished steps are skipped when the command is run again,
so an interrupted benchmark continues. Output in --out: one run folder per method and IPC,
baseline sets, evaluation records, results.md (table) and accuracy.png (accuracy against
iterations: the random init at 0, each method at its last iteration), both of every set the
folder holds, whichever invocation made it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from atomdistill.evaluate import cpu_name, format_result
from atomdistill.io import atomic_path
from atomdistill.runtime import cpu_flags

BUDGETS = {
    "cpu": dict(ipcs=[1, 10], iterations={1: 300, 10: 200}, batch_real=64, zca=False, models=["convnet"],
                runs=3, epochs=300, speed_window=(20, 120), embed_epochs=1),
    "paper": dict(ipcs=[1, 10, 50], iterations={1: 20000, 10: 20000, 50: 20000}, batch_real=256, zca=True,
                  models=["convnet", "alexnet", "vgg11", "resnet18"], runs=5, epochs=1000,
                  speed_window=(20, 520), embed_epochs=10),
    # A minute-long check that every step runs (not a result).
    "smoke": dict(ipcs=[1], iterations={1: 3}, batch_real=8, zca=False, models=["convnet"], runs=1, epochs=1,
                  speed_window=(1, 3), embed_epochs=1),
}
METHODS = ["dm", "datadam", "channel", "atom"]
BASELINES = ["random", "herding", "kcenter"]

# The official code under P1 (docs/benchmarks.md), for the table's side-by-side rows, by CPU: A is an
# Intel Xeon (AVX-512, AMX-BF16), B an AMD EPYC with AVX2 only, C an AMD EPYC with avx512_bf16. B and C
# share a name, so the flags tell them apart. Their s/iter is from another day: divide ours by it only
# when measured side by side.
OFFICIAL_P1 = {
    "CPU B, AMD EPYC (AVX2)": (lambda cpu, flags: "AMD EPYC" in cpu and "avx512f" not in flags, [
        ("DM (ConvNet-IN), official", 1, "26.57 ± 0.47", "18.40 ± 0.24", 0.69, "2.6 GB"),
        ("DM (ConvNet-IN), official", 10, "43.24 ± 0.04", "31.33 ± 0.30", 0.90, "2.7 GB"),
        ("DataDAM (ConvNet-BN), official", 1, "30.59 ± 0.71", "19.39 ± 0.96", 1.85, "3.5 GB"),
        ("DataDAM (ConvNet-BN), official", 10, "45.69 ± 0.70", "29.87 ± 0.31", None, "–")]),
    "CPU C, AMD EPYC (avx512_bf16)": (lambda cpu, flags: "AMD EPYC" in cpu and "avx512_bf16" in flags, [
        ("DM (ConvNet-IN), official", 1, "–", "–", 0.664, "2.68 GB"),
        ("DM (ConvNet-IN), official", 10, "–", "–", 0.892, "2.78 GB"),
        ("DataDAM (ConvNet-BN), official", 1, "–", "–", 1.070, "3.42 GB"),
        ("DataDAM (ConvNet-BN), official", 10, "–", "–", 1.556, "3.47 GB")]),
    "CPU A, Intel Xeon (AVX-512, AMX-BF16)": (lambda cpu, flags: "Intel" in cpu and "Xeon" in cpu, [
        ("DM (ConvNet-IN), official", 1, "26.64 ± 0.64", "13.30 ± 0.22", 0.52, "2.8 GB"),
        ("DM (ConvNet-IN), official", 10, "44.66 ± 0.41", "30.57 ± 0.32", 0.64, "2.8 GB"),
        ("DataDAM (ConvNet-BN), official", 1, "29.24 ± 1.09", "19.59 ± 0.41", 1.20, "3.4 GB"),
        ("DataDAM (ConvNet-BN), official", 10, "43.78 ± 0.54", "29.79 ± 0.14", 1.45, "3.5 GB")]),
}


def run_step(cmd: list[str], log: Path) -> dict:
    """Run one atomdistill command; its wall time and peak RSS (from wait4, this child only)."""
    print("$ atomdistill " + " ".join(cmd), flush=True)
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "atomdistill", *cmd], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-2000:])
    # The child inherits this process's thread settings (OMP_NUM_THREADS).
    return {"wall_s": time.time() - t, "peak_rss_gb": usage.ru_maxrss / 2**20, "threads": torch.get_num_threads()}


def save_step(steps_file: Path, steps: dict, name: str, record: dict):
    """Add one step's record to steps.json, merging what other runs on the same folder wrote meanwhile
    (so that two invocations with different --seeds can share a results folder)."""
    on_disk = json.loads(steps_file.read_text()) if steps_file.exists() else {}
    steps.update({**on_disk, **steps, name: record})
    tmp = steps_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(steps, indent=2))
    tmp.replace(steps_file)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=BUDGETS, default="cpu")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=None, help="default results/cifar10-BUDGET")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--baselines", nargs="*", default=BASELINES, metavar="NAME",
                   help=f"baselines to run beside the methods (default all: {' '.join(BASELINES)}); "
                        "--baselines none (or with no names) runs none, as the README's option commands do")
    p.add_argument("--ipc", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="distillation (and evaluation) seeds; seed 0's steps have no suffix, seed s>0 "
                        "steps end in -seedS; the table adds mean ± std over the seeds")
    p.add_argument("--device", default="auto")
    p.add_argument("--net", default="convnet",
                   help="distillation network, also the evaluation model in place of convnet (e.g. convnet-bn, "
                        "the batch-norm ConvNet of the official DataDAM rows); default results/cifar10-BUDGET-NET")
    p.add_argument("--options", default="",
                   help="extra `atomdistill distill` options for every method, e.g. '--factor 2 --nets pool' "
                        "(default folder results/cifar10-BUDGET[-NET]-OPTIONS)")
    p.add_argument("--eval-models", default=None, metavar="M1,M2",
                   help="evaluation architectures, e.g. convnet,alexnet,vgg11,resnet18 for the cross-architecture "
                        "table (default: the budget's; the list must hold the distillation network, whose column "
                        "the main table shows; default folder gains -eval-M1_M2...)")
    p.add_argument("--table-only", action="store_true", help="rewrite results.md from the finished steps")
    args = p.parse_args()
    if args.baselines == ["none"]:
        args.baselines = []
    unknown = [k for k in args.baselines if k not in BASELINES]
    if unknown:
        p.error(f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}, or none")
    b = BUDGETS[args.budget]
    ipcs = args.ipc or b["ipcs"]
    extra = shlex.split(args.options)
    models = [args.net if m == "convnet" else m for m in b["models"]] if args.eval_models is None else \
        [m.strip() for m in args.eval_models.split(",") if m.strip()]
    if args.net not in models:
        p.error(f"--eval-models {args.eval_models} lacks the distillation network {args.net}, whose accuracy the "
                f"main table shows; add it (e.g. --eval-models {','.join([args.net, *models])})")
    out = Path(args.out or f"results/cifar10-{args.budget}" + ("" if args.net == "convnet" else f"-{args.net}")
               + "".join("-" + "".join(c if c.isalnum() or c in ".=" else "_" for c in t.lstrip("-")) for t in extra)
               + ("" if args.eval_models is None else "-eval-" + "_".join(models)))
    out.mkdir(parents=True, exist_ok=True)
    steps_file = out / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else {}
    data = ["--dataset", "cifar10", "--data-root", args.data_root]
    evaluate = ["--models", ",".join(models), "--runs", str(b["runs"]), "--epochs", str(b["epochs"]),
                "--device", args.device]

    def step(name: str, cmd: list[str]):
        if name not in steps:
            save_step(steps_file, steps, name, run_step(cmd, out / f"{name}.log"))
        return steps[name]

    def baseline(kind: str, ipc: int, seed: int):
        name = step_name(kind, ipc, seed)
        step(name, ["baseline", kind, "--ipc", str(ipc), "--seed", str(seed), "--out",
                    str(out / f"{name}.safetensors"), "--device", args.device,
                    "--embed-epochs", str(b.get("embed_epochs", 1)), "--zca" if b["zca"] else "--no-zca", *data])
        step(f"eval-{name}", ["evaluate", str(out / f"{name}.safetensors"), *data, *evaluate, "--seed", str(seed),
                              "--out", str(out / f"{name}.eval.json")])

    # Order: the cheap random baseline (= every method's iteration 0), the methods, then the
    # baselines that first train an embedding network; --table-only just rewrites the table.
    todo = [] if args.table_only else [(ipc, seed) for seed in args.seeds for ipc in ipcs]
    for ipc, seed in todo:
        if "random" in args.baselines:
            baseline("random", ipc, seed)
        for method in args.methods:
            name = step_name(method, ipc, seed)
            step(name, ["distill", *data, "--ipc", str(ipc), "--method", method, "--iterations",
                        str(b["iterations"][ipc]), "--batch-real", str(b["batch_real"]),
                        "--zca" if b["zca"] else "--no-zca", "--seed", str(seed), "--log-every", "1",
                        "--checkpoint-every", "50", "--net", args.net, "--device", args.device,
                        "--out", str(out / name), "--overwrite", *extra])
            step(f"eval-{name}", ["evaluate", str(out / name), *data, *evaluate, "--seed", str(seed), "--out",
                                  str(out / name / "eval.json")])
    for ipc, seed in todo:
        for kind in args.baselines:
            if kind != "random":
                baseline(kind, ipc, seed)
    write_table(out, args, b, steps, models)


def step_name(kind: str, ipc: int, seed: int) -> str:
    """Name of a method's run folder or a baseline's set; seed 0 (the single-seed table's) has no suffix."""
    return f"{kind}-ipc{ipc}" + ("" if seed == 0 else f"-seed{seed}")


def record_path(out: Path, kind: str, ipc: int, seed: int) -> Path:
    name = step_name(kind, ipc, seed)
    return out / name / "eval.json" if kind not in BASELINES else out / f"{name}.eval.json"


def finished(out: Path, steps: dict) -> list[tuple[str, int, int]]:
    """(kind, IPC, seed) of every set in the folder with an evaluation record, whichever invocation made
    it (several invocations share a folder: other seeds, methods or IPCs); by IPC, seed, then table order."""
    found = set()
    for name in steps:
        m = re.fullmatch(r"(?P<kind>[\w+.]+)-ipc(?P<ipc>\d+)(?:-seed(?P<seed>\d+))?", name)
        if m and record_path(out, m["kind"], int(m["ipc"]), int(m["seed"] or 0)).exists():
            found.add((m["kind"], int(m["ipc"]), int(m["seed"] or 0)))
    order = [*BASELINES, *METHODS]
    return sorted(found, key=lambda r: (r[1], r[2], order.index(r[0]) if r[0] in order else len(order), r[0]))


def seeds_table(out: Path, args, rows: list[tuple[str, int, int]]) -> list[str]:
    """Mean ± std over distillation seeds of each seed's mean accuracy (kinds with several seeds' records)."""
    per_kind: dict[tuple[int, str], dict[int, float]] = {}
    for kind, ipc, seed in rows:
        accs = json.loads(record_path(out, kind, ipc, seed).read_text())["results"][args.net]["accs"]
        per_kind.setdefault((ipc, kind), {})[seed] = statistics.mean(accs)
    lines = []
    for (ipc, kind), per_seed in per_kind.items():
        if len(per_seed) > 1:
            v = [100 * per_seed[s] for s in sorted(per_seed)]
            lines.append(f"| {kind} | {ipc} | {len(v)} ({', '.join(map(str, sorted(per_seed)))}) | "
                         f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} | " + ", ".join(f"{a:.2f}" for a in v) + " |")
    if not lines:
        return []
    return ["", "Over distillation seeds (each seed: its own init, networks, batches and evaluation; std over the "
                "seeds' means):", "",
            "| method | IPC | seeds | accuracy % | per seed |", "|---|---|---|---|---|", *lines]


def architectures_table(out: Path, rows: list[tuple[str, int, int]], models: list[str]) -> list[str]:
    """Every evaluated set on every evaluation architecture: mean ± std over its evaluation runs."""
    lines = ["", "Across architectures (accuracy %, mean ± std over each set's evaluation runs, as "
             "`atomdistill evaluate` prints it, diverged runs named):", "",
             "| method | IPC | seed | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    for kind, ipc, seed in rows:
        results = json.loads(record_path(out, kind, ipc, seed).read_text())["results"]
        cells = ["–" if m not in results else format_result(results[m]).strip() for m in models]
        lines.append(f"| {kind} | {ipc} | {seed} | " + " | ".join(cells) + " |")
    return lines


def write_table(out: Path, args, b: dict, steps: dict, models: list[str]):
    """results.md and accuracy.png of every finished set in the folder (not only this invocation's)."""
    lo, hi = b["speed_window"]
    rows = finished(out, steps)
    lines = [f"CIFAR-10, budget `{args.budget}`; {cpu_name()}, torch {torch.__version__}, device {args.device}; "
             "threads per step in the last column (s/iter and wall depend on them). "
             f"Distillation and evaluation network: {args.net}. Evaluation: {b['runs']} runs x {b['epochs']} "
             "epochs, mean ± std over the runs, accuracy %; one row per distillation seed, every set this folder "
             "holds." + (f" Extra distill options: `{args.options}`." if args.options else ""), "",
             "| method | IPC | seed | iterations | accuracy % | s/iter (median) | peak RSS | wall | threads |",
             "|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for label, ipc, seed in rows:
        name = step_name(label, ipc, seed)
        r = json.loads(record_path(out, label, ipc, seed).read_text())["results"][args.net]
        acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        its, speed = "–", "–"
        metrics = out / name / "metrics.jsonl"
        if metrics.exists():
            hist = [json.loads(x) for x in metrics.read_text().splitlines()]
            times = [h["s_iter"] for h in hist if "s_iter" in h and lo <= h["iteration"] <= hi]
            its = str(max(h["iteration"] for h in hist))
            speed = f"{statistics.median(times):.3f}" if times else "–"
            curves.setdefault(ipc, {}).setdefault(label, (int(its), 100 * r["mean"], 100 * r["std"]))   # lowest seed
        s = steps.get(name, {})
        wall = s.get("wall_s", 0)
        lines.append(f"| {label} | {ipc} | {seed} | {its} | {acc} | {speed} | {s.get('peak_rss_gb', 0):.2f} GB | "
                     f"{int(wall // 60)} min {int(wall % 60):02d} s | {s.get('threads', '?')} |")
    lines += seeds_table(out, args, rows)
    if len(models) > 1:
        lines += architectures_table(out, rows, models)
    cpu, flags = cpu_name(), cpu_flags() or set()
    for vendor, (matches, official) in OFFICIAL_P1.items():
        if args.budget == "cpu" and matches(cpu, flags):
            lines += ["", f"The official code under P1 on {vendor} (docs/benchmarks.md):", "",
                      "| method | IPC | final accuracy % | random-init accuracy % | s/iter | peak RSS |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {m} | {i} | {a} | {r} | {s if s else '–'} | {mem} |" for m, i, a, r, s, mem in official]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_curves(out, sorted({ipc for _, ipc, _ in rows}) or [1], curves, args.net)


def plot_curves(out: Path, ipcs, curves, net: str = "convnet"):
    from atomdistill.plots import _pyplot
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5 * len(ipcs), 3.6), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        rows = curves.get(ipc, {})
        base = json.loads((out / f"random-ipc{ipc}.eval.json").read_text())["results"][net] \
            if (out / f"random-ipc{ipc}.eval.json").exists() else None
        for label, (its, mean, std) in rows.items():
            xs, ys, es = [its], [mean], [std]
            if base is not None:   # iteration 0 is the random real init (same seed): the random baseline
                xs, ys, es = [0] + xs, [100 * base["mean"]] + ys, [100 * base["std"]] + es
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_title(f"CIFAR-10, IPC {ipc}")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{net} test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(out / "accuracy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    main()
