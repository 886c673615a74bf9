"""Where one distillation iteration spends its time, per section, for each preset and IPC.

    python bench/profile_iteration.py --data-root DIR                      # CIFAR-10 P1: dm datadam atom, IPC 1 10 50
    python bench/profile_iteration.py --data-root DIR --baseline main      # also the code at git revision main,
                                                                           # interleaved, for a before/after ratio
    python bench/profile_iteration.py --dataset digits --ipc 1 --iterations 3

P1 settings: 64 real images per class, DSA, no ZCA. `Distiller.step_loss` runs unchanged; thin
timing wrappers sit around what it calls: `random_network` (net build), `real_batch_indices`
(sampling), `DSA.sample` and `DSA.apply` (DSA; real under no_grad, synthetic with a graph),
`net.features` (forward, real / synthetic likewise), `MatchingLoss.vectors`, `ClassMeans` and
the loss itself (loss); `other` is the rest of step_loss (image gather, transfers). Backward and
the SGD step are timed around `loss.backward()` and `opt.step()`. Milliseconds, median over the
iterations after `--warmup`. With `--baseline REF`, both codes run one iteration each in turn in
this process (A B, B A, A B, ...), so that load on a shared machine hits both alike; the ratio
column is new total / baseline total.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

SECTIONS = ("build", "sample", "dsa real", "dsa syn", "fwd real", "fwd syn", "loss", "backward", "step", "other")


class Profiler:
    """Timing wrappers around what one package's step_loss calls; one record per iteration."""

    def __init__(self, pkg, distiller):
        self.pkg, self.d = pkg, distiller
        self.times: dict[str, float] = defaultdict(float)
        self.records: list[dict[str, float]] = []
        self.sync = (lambda: torch.cuda.synchronize(distiller.device)) if distiller.device.type == "cuda" else (lambda: None)
        dist = importlib.import_module(pkg.__name__ + ".distill")
        self._patches = []
        self._patch(dist, "random_network", self._wrap_net(dist.random_network))
        self._patch(dist, "real_batch_indices", self._timed("sample", dist.real_batch_indices))
        if distiller.dsa is not None:
            self._patch(distiller.dsa, "sample", self._timed("dsa real", distiller.dsa.sample))  # shared draws
            self._patch(distiller.dsa, "apply", self._split("dsa", distiller.dsa.apply))
        self._patch(distiller.loss_fn, "vectors", self._timed("loss", distiller.loss_fn.vectors))
        self._patch(distiller, "loss_fn", _Timed(distiller.loss_fn, self._timed("loss", distiller.loss_fn.__call__)))
        means = importlib.import_module(pkg.__name__ + ".loss").ClassMeans
        self._patch(means, "add", self._timed("loss", means.add))
        self._patch(means, "means", self._timed("loss", means.means))

    def _patch(self, obj, name, value):
        self._patches.append((obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING))
        setattr(obj, name, value)

    @contextmanager
    def active(self):
        """The wrappers of this package installed (module-level functions are shared per package)."""
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self._patches]
        for obj, name, value in self._installed:
            setattr(obj, name, value)
        try:
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    def freeze(self):
        """Remember the wrappers, then restore the originals (re-installed by active())."""
        self._installed = [(obj, name, getattr(obj, name)) for obj, name, _ in self._patches]
        for obj, name, old in reversed(self._patches):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

    def _timed(self, section, fn):
        def wrapper(*a, **k):
            self.sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            self.sync()
            self.times[section] += time.perf_counter() - t
            return out
        return wrapper

    def _split(self, what, fn):
        real, syn = self._timed(f"{what} real", fn), self._timed(f"{what} syn", fn)
        return lambda *a, **k: (syn if torch.is_grad_enabled() else real)(*a, **k)

    def _wrap_net(self, fn):
        build = self._timed("build", fn)

        def wrapper(*a, **k):
            net = build(*a, **k)
            net.features = self._split("fwd", net.features)
            return net
        return wrapper

    def iteration(self, syn, opt, it):
        self.times.clear()
        with self.active():
            self.sync()
            t0 = time.perf_counter()
            loss, _ = self.d.step_loss(syn, it)
            self.sync()
            t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sync()
        t2 = time.perf_counter()
        opt.step()
        self.sync()
        t3 = time.perf_counter()
        rec = dict(self.times)
        rec["other"] = (t1 - t0) - sum(rec.values())
        rec.update(backward=t2 - t1, step=t3 - t2, total=t3 - t0)
        self.records.append(rec)
        return loss.detach()

    def medians(self, warmup):
        recs = self.records[warmup:] or self.records
        return {s: statistics.median(r.get(s, 0.0) for r in recs) for s in (*SECTIONS, "total")}


class _Timed:
    """A callable stand-in for the MatchingLoss object: timed __call__, everything else passed through."""

    def __init__(self, inner, call):
        self._inner, self._call = inner, call

    def __call__(self, *a, **k):
        return self._call(*a, **k)

    def __getattr__(self, name):
        return getattr(self._inner, name)


_MISSING = object()


def setup(pkg, args, data, method, ipc):
    dist = importlib.import_module(pkg.__name__ + ".distill")
    cfg = dist.DistillConfig(dataset=args.dataset, ipc=ipc, method=method, batch_real=args.batch_real,
                                    zca=args.zca, device=args.device, iterations=args.iterations, seed=0,
                                    net=args.net, **({"precision": args.precision} if args.precision else {}))
    d = dist.Distiller(cfg, data=data, progress=False)
    syn = d.train_images[torch.cat([i[:ipc] for i in d.cpu_class_indices])].clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=d.config.lr, momentum=0.5)
    prof = Profiler(pkg, d)
    prof.freeze()
    return prof, syn, opt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default="data")
    p.add_argument("--methods", nargs="+", default=["dm", "datadam", "atom"])
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--net", default=None)
    p.add_argument("--zca", action="store_true", help="whiten (off in P1)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, help="fp32 or bf16 (today's code only)")
    p.add_argument("--baseline", default=None, help="git revision to time beside today's code, interleaved")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import atomdistill
    from atomdistill.data import load_dataset
    from atomdistill.evaluate import cpu_name
    from atomdistill.runtime import tune_cpu_allocator
    tune_cpu_allocator()   # as the command line does
    import baseline as baseline_mod
    codes = [("new " + baseline_mod.revision(), atomdistill)]
    if args.baseline:
        codes.append(("base " + baseline_mod.revision(args.baseline), baseline_mod.load(args.baseline)))
    data = load_dataset(args.dataset, args.data_root)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}; "
          f"load average at start {load:.2f}")
    print(f"# {args.dataset}, batch_real {args.batch_real}, DSA, ZCA {'on' if args.zca else 'off'}, "
          f"net {args.net or 'default'}; ms, median of iterations {args.warmup}..{args.iterations - 1}"
          + ("; codes interleaved per iteration" if args.baseline else "") + "\n")
    head = "| method | IPC | code | " + " | ".join(SECTIONS) + " | total |" + (" new/base |" if args.baseline else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for ipc in args.ipc:
        for method in args.methods:
            runs = [(label, *setup(pkg, args, data, method, ipc)) for label, pkg in codes]
            for it in range(args.iterations):
                for _, prof, syn, opt in (runs if it % 2 == 0 else runs[::-1]):   # A B, B A, ...
                    prof.iteration(syn, opt, it)
            meds = [(label, prof.medians(args.warmup)) for label, prof, _, _ in runs]
            for label, m in meds:
                cells = " | ".join(f"{m[s] * 1e3:.0f}" for s in SECTIONS)
                ratio = ""
                if args.baseline:
                    ratio = f" {m['total'] / meds[-1][1]['total']:.2f} |" if label.startswith("new") else " |"
                print(f"| {method} | {ipc} | {label} | {cells} | {m['total'] * 1e3:.0f} |{ratio}", flush=True)
            del runs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n# load average at end {load:.2f}")


if __name__ == "__main__":
    main()
