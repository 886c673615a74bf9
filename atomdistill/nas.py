"""Neural architecture search with a proxy set (docs/evaluation.md, "Neural architecture search").

The DC/DM/DataDAM protocol: train every ConvNet of a search space on a small *proxy* (a
distilled set, a random real subset of the same size, or the whole data trained for only a few
epochs) and on the whole training set; a proxy is good for NAS when its ranking of the
architectures agrees with the whole-data ranking. Reported: the Spearman rank correlation over
the whole space and over its top 20% (by whole-data accuracy), the architecture the proxy picks
(argmax proxy accuracy) with its whole-data accuracy against the best one, the time per
candidate and in total, and the proxy's storage.

Spaces (``SPACES``; or your own grid, a JSON/YAML file or a dict mapping option -> values):

- ``paper``: the 720 ConvNets of the papers, depth {1,2,3,4} x width {32,64,128,256} x act
  {sigmoid, relu, leakyrelu} x norm {none, batch, layer, instance, group} x pool {none, max, avg}.
- ``small``: 24 candidates a 2-core CPU can search, depth {2,3} x width {32,64} x act
  {relu, sigmoid} x norm {instance, batch, none} x pool {avg}. Every axis kept is one that moves
  accuracy a lot after short training, so the ranking has something to find: sigmoid without a
  normalisation trains slowly (near chance after a few epochs), instance/batch norm rescue it to
  different degrees, depth 3 beats depth 2. Dropped: widths 128/256 (4-16x the compute of 32/64
  for a few points), depth 1 (no cheaper on a CPU: its 32x32 full-resolution maps and the
  augmentation dominate), depth 4, layer/group norm and max/no pooling (pool 'none' makes the
  linear head take all 32x32 maps: slow and poor; max vs avg differ by little).

Candidates are named ``convnet-d3-w128-relu-instance-avg``. Ones the image size cannot take
(depth 4 pools 8px digits below one pixel) are skipped with a note.

Ground truth: each candidate trained on the whole training set (normalised, never ZCA-whitened,
so it does not depend on the proxy) for ``full_epochs``. It is computed once and cached per
(dataset, full_epochs, full_runs, seed, dsa) in ``cache_dir`` (default
``$XDG_CACHE_HOME/atomdistill/nas``, i.e. ``~/.cache/atomdistill/nas``: shared by every run
folder and every proxy), one entry per candidate, so a later search over another space reuses
every candidate it shares (``small`` is a sub-grid of ``paper``).

Training is evaluate.train_and_test (the evaluation protocol: SGD, DSA, lr decay at the
midpoint); the ``runs`` networks of one candidate train together where batching helps
(``batched='auto'``: on a GPU; on a CPU one after another is faster). Different candidates are
different functions and cannot share a vmapped step. The proxy can be trained for fewer epochs
(``epochs``) than the whole data (``full_epochs``).

Resumable: each finished candidate is written at once (atomically) to ``out_dir/candidates.json``
and to the ground-truth cache; running the same search again skips what is done. Different
options than those recorded raise ConfigError naming them (``overwrite=True`` starts afresh).

Across processes (``group``, a distributed.ProcessGroup; ``torchrun ... -m atomdistill nas``): the
candidates not yet done are dealt (``ProcessGroup.deal``) in rounds of one per rank, round-robin in candidate order, for
the proxy and for the whole-data trainings alike. Every candidate's training draws only from
(seed, run), never from which rank or in what order it runs, so the results equal one process's.
After each round the results are gathered on every rank and rank 0, the only one that reads or
writes files, records them (candidates.json, the cache); an interruption loses at most the round
in training.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import ImageDataset
from .distributed import LocalGroup, ProcessGroup
from .errors import ConfigError, check_integer
from .evaluate import DEFAULT_DSA, EvalProtocol, check_compatible, train_and_test
from .io import hash_json, hash_tensors, write_json, write_text
from .models import _ACT_ALIASES, _NORM_ALIASES, _POOL_ALIASES, build_model
from .synset import SyntheticSet

KEYS = ("depth", "width", "act", "norm", "pool")
DEFAULTS = {"depth": 3, "width": 128, "act": "relu", "norm": "instance", "pool": "avg"}   # ConvNet
SPACES: dict[str, dict[str, list]] = {
    "paper": {"depth": [1, 2, 3, 4], "width": [32, 64, 128, 256], "act": ["sigmoid", "relu", "leakyrelu"],
              "norm": ["none", "batch", "layer", "instance", "group"], "pool": ["none", "max", "avg"]},
    "small": {"depth": [2, 3], "width": [32, 64], "act": ["relu", "sigmoid"],
              "norm": ["instance", "batch", "none"], "pool": ["avg"]},
}
DEFAULT_EPOCHS = EvalProtocol.epochs   # proxy epochs for a set (the evaluation default)
DEFAULT_FULL_PROXY_EPOCHS = 2   # proxy 'full': early-stopped whole data
DEFAULT_FULL_EPOCHS = 20    # whole-data ground truth
TOP_FRACTION = 0.2
_ALIASES = {"act": _ACT_ALIASES, "norm": _NORM_ALIASES, "pool": _POOL_ALIASES}


# ---- spaces -------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atomdistill" / "nas"


def _canon(key: str, value: Any) -> Any:
    if key not in KEYS:
        raise ConfigError(f"unknown search option {key!r}; use {', '.join(KEYS)}")
    if key in ("depth", "width"):
        try:
            v = int(str(value).strip()) if not isinstance(value, bool) else None
        except ValueError:
            v = None
        if v is None or v < 1:
            raise ConfigError(f"{key} values must be positive integers; got {value!r}")
        return v
    canon = _ALIASES[key].get(str(value).strip().lower())
    if canon is None:
        raise ConfigError(f"{key} must be one of {', '.join(sorted(set(_ALIASES[key].values())))}; got {value!r}")
    return canon


def normalise_grid(grid: dict) -> dict[str, list]:
    """All five options in KEYS order, values canonical and de-duplicated; missing options take
    the ConvNet default."""
    if not isinstance(grid, dict):
        raise ConfigError(f"a search grid maps option -> list of values, e.g. {{\"depth\": [2, 3]}}; got {grid!r}")
    unknown = [k for k in grid if k not in KEYS]
    if unknown:
        raise ConfigError(f"unknown search option(s) {', '.join(map(repr, unknown))}; use {', '.join(KEYS)}")
    out = {}
    for key in KEYS:
        values = grid.get(key, [DEFAULTS[key]])
        values = values if isinstance(values, (list, tuple)) else [values]
        canon = list(dict.fromkeys(_canon(key, v) for v in values))
        if not canon:
            raise ConfigError(f"the search grid gives no value for {key}; list at least one")
        out[key] = canon
    return out


def parse_grid_option(text: str) -> tuple[str, list[str]]:
    """``'depth=2,3'`` -> ``('depth', ['2', '3'])`` (values canonicalised by normalise_grid)."""
    key, sep, values = text.partition("=")
    key = key.strip().lower()
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not items:
        raise ConfigError(f"--grid takes KEY=V1,V2 (e.g. depth=2,3); got {text!r}")
    if key not in KEYS:
        raise ConfigError(f"unknown search option {key!r} in --grid; use {', '.join(KEYS)}")
    return key, items


def load_grid_file(path: str | os.PathLike) -> dict:
    """A grid from a JSON or YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no search-space file at {path}; pass 'small', 'paper' or a JSON/YAML grid file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml   # a declared dependency
        try:
            grid = yaml.safe_load(text)
        except yaml.YAMLError as e:   # its str() spans several lines with a caret drawing: one line here
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML ({where}{problem}); fix the grid file") from None
    else:
        try:
            grid = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix the grid file") from None
    return normalise_grid(grid)


def resolve_space(space: str | os.PathLike | dict = "small", grid: dict | Sequence[str] | None = None
                  ) -> dict[str, list]:
    """The grid of ``space`` (a SPACES name, a grid file or a dict), with ``grid`` options
    (a dict, or ``KEY=V1,V2`` strings) replacing those of the space."""
    if isinstance(space, dict):
        base = normalise_grid(space)
    elif str(space) in SPACES:
        base = normalise_grid(SPACES[str(space)])
    elif Path(space).suffix.lower() in (".json", ".yaml", ".yml") or Path(space).exists():
        base = load_grid_file(space)
    else:
        raise ConfigError(f"unknown search space {str(space)!r}; use {', '.join(SPACES)} or a JSON/YAML grid file")
    if grid:
        items = dict(parse_grid_option(g) for g in grid) if not isinstance(grid, dict) else grid
        base.update({k: v for k, v in normalise_grid({**base, **items}).items() if k in items})
    return base


def candidate_name(cfg: dict) -> str:
    return f"convnet-d{cfg['depth']}-w{cfg['width']}-{cfg['act']}-{cfg['norm']}-{cfg['pool']}"


def candidates(grid: dict) -> list[dict]:
    """Every combination of the grid, in KEYS-major order."""
    grid = normalise_grid(grid)
    return [dict(zip(KEYS, combo)) for combo in itertools.product(*(grid[k] for k in KEYS))]


def check_candidate(cfg: dict, channels: int, num_classes: int, image_size: int) -> str | None:
    """None if the candidate can be built for this data, else why not (on 'meta': no memory)."""
    try:
        build_model("convnet", channels, num_classes, image_size, device="meta", **cfg)
    except ConfigError as e:
        return str(e)
    return None


# ---- statistics ---------------------------------------------------------------------------
def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # start of each run of equal values, and each run's average of the 1-based positions
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the average ranks; NaN if either side is constant
    or has fewer than two values (as scipy)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of the same length; got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


# ---- the search ---------------------------------------------------------------------------
TrainFn = Callable[..., list]
# Part of the ground-truth cache key: the training the cached accuracies were made with.
_TRUTH_PROTOCOL = "evaluate.train_and_test defaults (SGD 0.01, momentum 0.9, wd 5e-4, batch 256)"


def search(proxy: SyntheticSet | str | os.PathLike, dataset: ImageDataset | str, space: str | os.PathLike | dict = "small",
           *, grid: dict | Sequence[str] | None = None, epochs: int | None = None,
           full_epochs: int = DEFAULT_FULL_EPOCHS, runs: int = 1, full_runs: int = 1, ipc: int | None = None,
           seed: int = 0, dsa: str | None = DEFAULT_DSA, device: str | torch.device = "auto",
           batched: bool | str = "auto", out_dir: str | os.PathLike | None = None,
           cache_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
           overwrite: bool = False, progress: bool = True, train_fn: TrainFn | None = None,
           group: ProcessGroup | None = None) -> dict:
    """Rank every candidate of ``space`` by training on ``proxy`` and on the whole data.

    ``proxy``: a SyntheticSet or its path; ``'random'`` (``ipc`` random real images per class,
    baselines.select_coreset, ZCA on CIFAR like a distilled set) or ``'full'`` (the whole training
    set, early-stopped at ``epochs``). ``epochs`` defaults to 300 for a set, 2 for 'full'.
    ``dsa``: the evaluation's DSA strategy, or None / "none".
    ``train_fn``: replaces evaluate.train_and_test (same call), e.g. in tests.
    ``group``: a distributed.ProcessGroup to deal the candidates over (its device replaces ``device``).
    Returns the summary written to ``out_dir/nas.json`` (also nas.md, nas.png, candidates.json);
    with a group, on every rank."""
    if dsa == "none":
        dsa = None
    data = _load(dataset, data_root)
    kind = proxy if isinstance(proxy, str) and proxy in ("random", "full") else "set"
    if epochs is None:
        epochs = DEFAULT_FULL_PROXY_EPOCHS if kind == "full" else DEFAULT_EPOCHS
    for what, v, least in (("epochs", epochs, 0), ("full_epochs", full_epochs, 0), ("seed", seed, 0),
                           ("runs", runs, 1), ("full_runs", full_runs, 1)):
        check_integer(what, v, least)
    # Files are read and written on rank 0 alone (group.on_main); every rank gets the result or the error.
    group = group if group is not None else LocalGroup(device)
    images, labels, test_images, stored, proxy_id, label = _proxy(proxy, kind, data, ipc, seed, epochs)
    storage = {"images": int(len(stored)), "bytes": int(stored.numel() * 4),
               "note": "float32 images in the model-input space, as stored"}
    grid_used, space_name, cands, skipped = _space(space, grid, data)

    ds_id = data.identity()
    options = {"dataset": ds_id, "proxy": proxy_id, "grid": grid_used, "epochs": epochs, "runs": runs,
               "full_epochs": full_epochs, "full_runs": full_runs, "seed": seed, "dsa": dsa}
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"nas-{_safe(data.name)}-{label}"
    record_path = out_dir / "candidates.json"
    done = group.on_main(_open_record, record_path, options, overwrite)
    gt_key = {"dataset": ds_id, "full_epochs": full_epochs, "full_runs": full_runs, "seed": seed, "dsa": dsa,
              "protocol": _TRUTH_PROTOCOL}
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = cache_dir / f"{_safe(data.name)}-{hash_json(gt_key)}.json"
    truth = group.on_main(_open_cache, cache_path, gt_key)

    trainer = _Trainer(cands, group, train_fn or train_and_test, progress,
                       dict(progress=False, batched=batched, num_classes=data.num_classes))
    trainer.run(done, record_path, images, labels, test_images, data.test_labels,
                EvalProtocol(runs=runs, epochs=epochs, seed=seed, dsa=dsa), f"proxy {label} ({epochs} ep)")
    trainer.run(truth, cache_path, data.train_images, data.train_labels, data.test_images, data.test_labels,
                EvalProtocol(runs=full_runs, epochs=full_epochs, seed=seed, dsa=dsa), f"whole data ({full_epochs} ep)")

    summary = summarise(cands, done["candidates"], truth["candidates"])
    path = str(proxy) if kind == "set" and not isinstance(proxy, SyntheticSet) else None
    result = {"dataset": data.name, "proxy": {**proxy_id, "path": path, "label": label, "storage": storage},
              "space": {"name": space_name, "grid": grid_used, "candidates": len(cands), "skipped": skipped},
              "options": {k: v for k, v in options.items() if k not in ("dataset", "proxy", "grid")},
              "device": group.device.type, "out_dir": str(out_dir), "cache": str(cache_path), **summary}
    group.on_main(_write_outputs, result, out_dir)
    return result


def _proxy(proxy, kind: str, data: ImageDataset, ipc: int | None, seed: int, epochs: int):
    """The proxy's training images and labels, its test images (in its own space: ZCA if it has one),
    the images it stores, what identifies it and its label."""
    if kind == "full":
        if ipc is not None:
            raise ConfigError("--ipc applies to the 'random' proxy only; the 'full' proxy is the whole training set")
        return (data.train_images, data.train_labels, data.test_images, data.train_images,
                {"kind": "full", "method": "full", "ipc": None}, f"full-e{epochs}")
    if kind == "random":
        if ipc is None:
            raise ConfigError("the 'random' proxy needs --ipc (images per class; use the distilled set's)")
        from .baselines import select_coreset
        synset = select_coreset(data, ipc, "random", seed=seed, device="cpu")
    else:
        if ipc is not None:
            raise ConfigError("--ipc applies to the 'random' proxy only; a synthetic set has its own size")
        synset = proxy if isinstance(proxy, SyntheticSet) else SyntheticSet.load(proxy)
        check_compatible(synset, data)
    # A multi-formation set trains on its decoded images; its storage is what it stores.
    images, labels = synset.decoded()
    # Identified by its content, not its path: the same set moved or named otherwise resumes.
    proxy_id = {"kind": kind, "method": synset.method or "set", "ipc": synset.ipc,
                "hash": hash_tensors(images, labels)}
    return (images, labels, synset.prepare_real(data.test_images), synset.images, proxy_id,
            f"{proxy_id['method']}-ipc{synset.ipc}")


def _space(space, grid, data: ImageDataset) -> tuple[dict, str, list[dict], list[dict]]:
    """The grid, its name, the candidates that fit the data and the ones skipped (with why)."""
    grid_used = resolve_space(space, grid)
    name = ("custom" if isinstance(space, dict) else str(space) if str(space) in SPACES else Path(space).name)
    if grid:   # name what replaced the space's options
        over = grid if isinstance(grid, dict) else dict(parse_grid_option(g) for g in grid)
        name += " with " + "; ".join(f"{k}={','.join(map(str, grid_used[k]))}" for k in KEYS if k in over)
    cands, skipped = [], []
    for cfg in candidates(grid_used):
        why = check_candidate(cfg, data.channels, data.num_classes, data.image_size)
        (skipped.append({"name": candidate_name(cfg), "reason": why}) if why else cands.append(cfg))
    if not cands:
        raise ConfigError(f"no candidate of the space fits {data.image_size}px images ({skipped[0]['reason']}); "
                          "choose a smaller depth or pool 'none'")
    return grid_used, name, cands, skipped


class _Trainer:
    """Trains the candidates not yet in a record, dealt over the group, recording each round at once."""

    def __init__(self, cands: list[dict], group: ProcessGroup | LocalGroup, train_fn: TrainFn, progress: bool, options: dict):
        self.cands, self.group, self.train_fn, self.progress, self.options = cands, group, train_fn, progress, options

    def run(self, record: dict, path: Path, x, y, xt, yt, protocol: EvalProtocol, what: str):
        todo = [c for c in self.cands if candidate_name(c) not in record["candidates"]]
        if not todo:
            return
        dev, world = self.group.device, self.group.world_size
        x, y = x.to(dev, torch.float32), y.to(dev, torch.long)
        xt, yt = xt.to(dev, torch.float32), yt.to(dev, torch.long)

        def train(cfg: dict) -> dict:
            t0 = time.perf_counter()
            accs = [float(a) for a in self.train_fn(x, y, xt, yt, "convnet", protocol, model_kwargs=dict(cfg),
                                                    device=dev, **self.options)]
            return {candidate_name(cfg): {"config": cfg, "acc": float(np.mean(accs)), "accs": accs,
                                          "seconds": time.perf_counter() - t0}}

        bar = tqdm(total=len(todo), desc=what, unit="net", disable=not (self.progress and self.group.main),
                   dynamic_ncols=True)
        trained = 0
        bar.set_postfix_str(", ".join(map(candidate_name, todo[:world])))   # what trains now, one per rank
        for round_, results in self.group.deal(todo, train, f"gathering the {what} results"):
            record["candidates"].update(results)
            self.group.on_main(write_json, path, record)   # at once: an interruption loses at most this round
            trained += len(round_)
            bar.update(len(round_))
            bar.set_postfix_str(", ".join(map(candidate_name, todo[trained:trained + world])))
        bar.close()


def _write_outputs(result: dict, out_dir: Path) -> None:
    write_json(out_dir / "nas.json", _json_safe(result))
    write_text(out_dir / "nas.md", format_markdown(result))
    plot(result, out_dir / "nas.png")


def summarise(cands: list[dict], proxy: dict, truth: dict) -> dict:
    """Correlations, pick and times from per-candidate {'acc', 'seconds'} records."""
    names = [candidate_name(c) for c in cands]
    p = np.array([proxy[n]["acc"] for n in names])
    w = np.array([truth[n]["acc"] for n in names])
    order = np.argsort(-w, kind="stable")           # best whole-data accuracy first
    k = max(2, math.ceil(TOP_FRACTION * len(names)))
    top = order[:k]
    pick, best = int(np.argmax(p)), int(order[0])
    rank_of = {int(i): r + 1 for r, i in enumerate(order)}
    ps, ws = [proxy[n]["seconds"] for n in names], [truth[n]["seconds"] for n in names]
    return {
        "spearman": spearman(p, w),
        "spearman_top": spearman(p[top], w[top]) if len(names) >= 2 else float("nan"),
        "top_count": min(k, len(names)),
        "pick": {"name": names[pick], "proxy_acc": float(p[pick]), "whole_acc": float(w[pick]),
                 "whole_rank": rank_of[pick]},
        "best": {"name": names[best], "whole_acc": float(w[best]), "proxy_acc": float(p[best])},
        "gap": float(w[best] - w[pick]),
        "time": {"proxy_per_candidate": float(np.mean(ps)), "proxy_total": float(np.sum(ps)),
                 "whole_per_candidate": float(np.mean(ws)), "whole_total": float(np.sum(ws))},
        "candidates": [{"name": n, "config": c, "proxy_acc": proxy[n]["acc"], "proxy_accs": proxy[n]["accs"],
                        "whole_acc": truth[n]["acc"], "whole_accs": truth[n]["accs"],
                        "proxy_seconds": proxy[n]["seconds"], "whole_seconds": truth[n]["seconds"]}
                       for n, c in zip(names, cands)],
    }


# ---- output -------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def format_markdown(r: dict) -> str:
    st, t, o = r["proxy"]["storage"], r["time"], r["options"]
    lines = [f"# NAS on {r['dataset']} with proxy `{r['proxy']['label']}`", "",
             "| | |", "|---|---|",
             f"| proxy | {r['proxy']['label']}: {st['images']} images, {_size(st['bytes'])} "
             f"(float32), {o['epochs']} epochs x {o['runs']} run(s) |",
             f"| whole data | {o['full_epochs']} epochs x {o['full_runs']} run(s), seed {o['seed']} |",
             f"| space | {r['space']['name']}: {r['space']['candidates']} candidates"
             + (f", {len(r['space']['skipped'])} skipped" if r['space']['skipped'] else "") + " |",
             f"| Spearman, all | {_fmt(r['spearman'])} |",
             f"| Spearman, top 20% ({r['top_count']}) | {_fmt(r['spearman_top'])} |",
             f"| proxy's pick | `{r['pick']['name']}`: whole-data {100 * r['pick']['whole_acc']:.2f}% "
             f"(rank {r['pick']['whole_rank']} of {r['space']['candidates']}) |",
             f"| best on whole data | `{r['best']['name']}`: {100 * r['best']['whole_acc']:.2f}% |",
             f"| time, proxy | {_duration(t['proxy_per_candidate'])} per candidate, {_duration(t['proxy_total'])} total |",
             f"| time, whole data | {_duration(t['whole_per_candidate'])} per candidate, "
             f"{_duration(t['whole_total'])} total |",
             f"| device | {r['device']} |", "",
             "| candidate | proxy acc % | whole-data acc % | proxy s | whole s |", "|---|---:|---:|---:|---:|"]
    for c in sorted(r["candidates"], key=lambda c: -c["whole_acc"]):
        mark = " (pick)" if c["name"] == r["pick"]["name"] else ""
        lines.append(f"| `{c['name']}`{mark} | {100 * c['proxy_acc']:.2f} | {100 * c['whole_acc']:.2f} | "
                     f"{c['proxy_seconds']:.1f} | {c['whole_seconds']:.1f} |")
    if r["space"]["skipped"]:
        lines += ["", "Skipped (cannot be built for this image size):", ""]
        lines += [f"- `{s['name']}`: {s['reason']}" for s in r["space"]["skipped"]]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str | os.PathLike) -> None:
    """Scatter of proxy accuracy against whole-data accuracy, the pick and the best marked."""
    from .io import atomic_path
    from .plots import _pyplot
    plt = _pyplot()
    c = r["candidates"]
    w, p = [100 * x["whole_acc"] for x in c], [100 * x["proxy_acc"] for x in c]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(w, p, s=16, alpha=0.7, label="candidates")
    ax.scatter([100 * r["best"]["whole_acc"]], [100 * r["best"]["proxy_acc"]], s=90, facecolors="none",
               edgecolors="tab:red", label="best on whole data")
    ax.scatter([100 * r["pick"]["whole_acc"]], [100 * r["pick"]["proxy_acc"]], marker="*", s=120,
               color="tab:orange", label="proxy's pick")
    ax.set_xlabel("whole-data test accuracy %")
    ax.set_ylabel(f"proxy ({r['proxy']['label']}) test accuracy %")
    ax.set_title(f"{r['dataset']}: Spearman {_fmt(r['spearman'], '.2f')} "
                 f"(top 20%: {_fmt(r['spearman_top'], '.2f')})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---- bookkeeping --------------------------------------------------------------------------
def _load(dataset: ImageDataset | str, data_root) -> ImageDataset:
    if isinstance(dataset, ImageDataset):
        return dataset
    from .data import load_dataset
    return load_dataset(dataset, data_root)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]} ({old!r} recorded, {new!r} now)"]


def _open_record(path: Path, options: dict, overwrite: bool) -> dict:
    if path.exists() and not overwrite:
        try:
            record = json.loads(path.read_text())
            recorded = record["options"]
            record["candidates"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a readable NAS record; delete it or pass --overwrite") from None
        diff = _diff(recorded, json.loads(json.dumps(options)))
        if diff:
            raise ConfigError(f"{path.parent} holds a search with other options: {'; '.join(diff)}; "
                              "rerun with the same options to continue, or pass another --out or --overwrite")
        return record
    record = {"options": options, "candidates": {}}
    write_json(path, record)
    return record


def _open_cache(path: Path, key: dict) -> dict:
    if path.exists():
        try:
            cache = json.loads(path.read_text())
            if cache.get("key") == json.loads(json.dumps(key)) and isinstance(cache.get("candidates"), dict):
                return cache
        except (OSError, ValueError):
            pass   # unreadable or another key (hash collision): recompute rather than trust it
    return {"key": key, "candidates": {}}


def _json_safe(obj):
    """NaN (a constant ranking) is not JSON: write null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
