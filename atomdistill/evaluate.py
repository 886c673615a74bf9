"""Evaluation protocol (docs/evaluation.md): train fresh networks on a set, test on real data.

`EvalProtocol` holds the protocol's settings and their defaults, the reference's: per run a fresh
network, SGD (lr 0.01, momentum 0.9, weight decay 5e-4), cross-entropy, batches of 256 reshuffled
every epoch, DSA on every training batch (one family per batch, each image its own parameters:
the reference's mode 'S' without Siamese sharing), then one test on the whole real test set
after the last epoch (no best-epoch picking). Every evaluation record carries it.

Epochs and learning-rate decay follow the DC/DM reference ``evaluate_synset`` exactly::

    lr_schedule = [Epoch//2+1]
    for ep in range(Epoch+1):
        train one epoch
        if ep in lr_schedule: lr *= 0.1; optimizer = SGD(...)   # a new optimizer

so ``epochs=E`` makes E+1 passes over the set; passes 0..E//2+1 use ``lr``, the rest ``lr/10``;
and the momentum buffer is reset at the decay (the reference builds a new optimizer).

Speed: the ``runs`` networks of one architecture train together (``batched=True``, the default
on a GPU, where small sets leave it idle between kernel launches): their
parameters are stacked (``torch.func.stack_module_state``) and one ``vmap`` of
``functional_call`` runs all of them on a [runs, B, C, H, W] batch, each network with its own
shuffle and DSA draws. The loss is the sum over networks of each network's mean cross-entropy,
so every network gets exactly its own gradient, and one SGD over the stacked parameters equals
``runs`` separate optimisers (SGD with momentum and weight decay is elementwise). BatchNorm
networks batch too: their running statistics are stacked buffers that vmap updates in place.
On a CPU the training is compute-bound and batching only adds the layout copies of the vmapped
layers (measured 0.55-0.85x the sequential speed on 2 cores), so ``batched="auto"`` trains one network at a time there.

Randomness: everything comes from ``rng.generator(seed, stream, run, ...)`` (initialisation
per run, shuffle per (run, epoch), DSA per (run, step)), so a run's draws do not depend on how
many networks train beside it: batched and sequential training see identical data, augmentations
and initial weights. Their accuracies agree up to float rounding: a vmapped (grouped)
convolution does not add its products in the same order as a single one, and over hundreds of
SGD steps such last-bit differences can move a test prediction or two. The same seed on the
same machine and path reproduces accuracies bitwise (CPU).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from .augment import DSA, DSAParams
from .data import ImageDataset, load_dataset
from .errors import AtomDistillError, ConfigError, check_integer, check_option_names
from .io import hash_json, hash_tensors, write_json
from .models import build_model, model_info
from .rng import Stream, generator, seeded
from .runtime import autocast, check_precision, compiled, resolve_device
from .synset import SyntheticSet

DEFAULT_DSA = "color_crop_cutout_flip_scale_rotate"
TEST_CHUNK = 1024   # test images per forward, summed over the networks run together


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How a set is evaluated; the defaults are the reference's (DC/DM/DataDAM)."""

    runs: int = 3                    # fresh networks per architecture
    epochs: int = 300                # epochs + 1 passes over the set (the reference's count)
    lr: float = 0.01                 # x0.1 after pass epochs // 2 + 1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: str | None = DEFAULT_DSA    # DSA strategy; None or "none": no augmentation
    seed: int = 0                    # every run's draws come from (seed, run)
    precision: str = "fp32"          # "bf16": the networks run under bf16 autocast (an option, not the reference)
    compile: bool = False            # torch.compile the networks: faster after a warm-up; rounds differently

    def __post_init__(self):
        for name, least in (("runs", 1), ("epochs", 0), ("batch_size", 1), ("seed", 0)):
            check_integer(name, getattr(self, name), least)
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be below 1 (SGD diverges from 1 up), got {self.momentum!r}")
        check_precision(self.precision)

    @classmethod
    def of(cls, protocol: "EvalProtocol | Mapping[str, Any] | None" = None, **fields) -> "EvalProtocol":
        """`protocol` (an EvalProtocol, a mapping of its fields, or None for the defaults) with the
        non-None `fields` replacing its values."""
        base = dataclasses.asdict(protocol) if isinstance(protocol, EvalProtocol) else dict(protocol or {})
        base.update({k: v for k, v in fields.items() if v is not None})
        check_option_names(base, (f.name for f in dataclasses.fields(cls)), "evaluation")
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- public API ---------------------------------------------------------------------------
def evaluate(synset: SyntheticSet | str | os.PathLike, dataset: ImageDataset | str, models: Sequence[str] | str = ("convnet",),
             protocol: EvalProtocol | None = None, *, device: str | torch.device = "auto", progress: bool = True,
             batched: bool | str = "auto", test: tuple[torch.Tensor, torch.Tensor] | None = None,
             max_parallel: int | None = None, journal: "EvalJournal | str | os.PathLike | None" = None,
             **fields) -> dict[str, dict]:
    """Train `runs` fresh networks of each architecture on `synset`, test them on `dataset`'s test split.

    `synset` may be a set's path and `dataset` a name ("cifar10", loaded from ./data at its own size).
    A multi-formation set (factor > 1) trains on its decoded images (``synset.decoded()``).
    The protocol is `protocol` (default EvalProtocol()) with `fields` (runs=, epochs=, lr=, seed=,
    ...) replacing its values. Returns ``{model: {"mean", "std", "accs", "diverged", "seconds"}}``
    with accuracies as fractions and ``std`` the population standard deviation (``np.std``), as the
    reference reports. A run whose network's weights became non-finite (its training loss
    overflowed) has diverged: its entry in ``accs`` is None, it is left out of mean and std, and
    ``diverged`` counts such runs (mean and std are None when every run diverged). `test`:
    (images, labels) already in the set's space (skips ``synset.prepare_real``). `max_parallel`: at
    most this many networks train together (bounds memory; same results). `journal`: a file (or
    EvalJournal) where each finished run is kept; runs it already holds for this set, test data,
    protocol and device are taken from it, not trained again, so a killed evaluation continues
    where it stopped with the accuracies it would have had."""
    protocol = EvalProtocol.of(protocol, **fields)
    if isinstance(synset, (str, os.PathLike)):
        synset = SyntheticSet.load(synset)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    if not isinstance(synset, SyntheticSet) or not isinstance(dataset, ImageDataset):
        raise ConfigError("evaluate(synset, dataset) takes a SyntheticSet (or its path) and an ImageDataset (or "
                          f"a dataset name), got {type(synset).__name__} and {type(dataset).__name__}")
    check_compatible(synset, dataset)
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ConfigError("models names no architecture: give at least one, e.g. ('convnet', 'resnet18')")
    for name in models:   # an unknown name fails now, not after the networks before it have trained
        model_info(name)
    if test is None:
        test = (synset.prepare_real(dataset.test_images), dataset.test_labels)
    dev = resolve_device(device)
    # A multi-formation set (factor > 1) trains on its decoded images, each with its stored image's target.
    images, labels = synset.decoded()[0].detach().to(dev, torch.float32), training_targets(synset).to(dev)
    test_images, test_labels = test[0].detach().to(dev, torch.float32), test[1].to(dev, torch.long)
    if journal is not None and not isinstance(journal, EvalJournal):
        journal = EvalJournal(journal)
    context = journal.context(images, labels, test_images, test_labels, protocol, dev) if journal else None
    results = {}
    for name in models:
        t0 = time.perf_counter()
        done = journal.runs(context, name) if journal else {}   # run -> (accuracy, seconds)
        todo = [r for r in range(protocol.runs) if r not in done]
        if done and progress:
            print(f"{name}: {len(done)} of {protocol.runs} runs taken from {journal.path}", file=sys.stderr)
        new = train_and_test(images, labels, test_images, test_labels, name, protocol, device=dev,
                             progress=progress, batched=batched, num_classes=synset.num_classes,
                             max_parallel=max_parallel, run_ids=todo, mark_diverged=True,
                             on_runs=partial(journal.add, context, name) if journal else None) if todo else []
        accs = dict(zip(todo, new)) | {r: acc for r, (acc, _) in done.items()}
        seconds = time.perf_counter() - t0 + sum(secs for _, secs in done.values())
        results[name] = summarise_runs([accs[r] for r in range(protocol.runs)], seconds)
    return results


class EvalJournal:
    """The finished runs of evaluations, kept in a JSON file as they finish.

    A run's draws come from (seed, run) alone, so the runs left after an interruption train
    exactly as they would have in one go (bit for bit on a CPU). Runs are filed under a context,
    a hash of what decides their accuracy (training images and targets, test data, protocol,
    device type), and a model name: a journal never lends a run to another set or protocol."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, dict[str, dict[str, list]]] = {}   # context -> model -> run -> [acc, seconds]
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") != "atomdistill.EvalJournal":
                    raise ValueError("not a journal")
                self.entries = data["runs"]
            except (OSError, ValueError, KeyError, AttributeError, TypeError):
                raise AtomDistillError(f"{self.path} is not a readable evaluation journal; delete it to evaluate "
                                       "from the first run") from None

    @staticmethod
    def context(images, labels, test_images, test_labels, protocol: EvalProtocol, device: torch.device) -> str:
        return hash_json({"data": hash_tensors(images, labels, test_images, test_labels),
                          "protocol": protocol.to_dict(), "device": torch.device(device).type})

    def runs(self, context: str, model: str) -> dict[int, tuple[float, float]]:
        """run -> (accuracy, or NaN for a diverged run; seconds) of the runs kept for (context, model)."""
        kept = self.entries.get(context, {}).get(model, {})
        return {int(r): (float("nan") if acc is None else float(acc), float(secs)) for r, (acc, secs) in kept.items()}

    def add(self, context: str, model: str, ids: Sequence[int], accs: Sequence[float], seconds: float) -> None:
        """Keep the runs `ids` (trained together in `seconds`) and rewrite the file atomically."""
        kept = self.entries.setdefault(context, {}).setdefault(model, {})
        for r, acc in zip(ids, accs):
            kept[str(r)] = [None if not math.isfinite(acc) else float(acc), seconds / len(ids)]
        write_json(self.path, {"format": "atomdistill.EvalJournal", "runs": self.entries})


def training_targets(synset: SyntheticSet) -> torch.Tensor:
    """What the networks are trained towards, one per training image (a multi-formation set's
    decoded tiles take their stored image's): the set's soft labels (probabilities [N, K]) if it
    has them, else its hard labels [N]."""
    if synset.soft_labels is None:
        return synset.decoded_labels().long()
    from .interop import check_soft_labels
    soft = check_soft_labels(synset.soft_labels, len(synset.labels), synset.num_classes, "the set's soft labels")
    return soft.repeat_interleave(synset.factor ** 2, dim=0) if synset.factor > 1 else soft


def summarise_runs(accs: Sequence[float], seconds: float) -> dict:
    """Mean and population std over the runs that trained; NaN accuracies (diverged runs) become
    None in 'accs' and are counted in 'diverged' instead (mean/std None if no run trained)."""
    ok = [float(a) for a in accs if a is not None and np.isfinite(a)]
    return {"mean": float(np.mean(ok)) if ok else None, "std": float(np.std(ok)) if ok else None,
            "accs": [float(a) if a is not None and np.isfinite(a) else None for a in accs],
            "diverged": len(accs) - len(ok), "seconds": seconds}


def format_result(r: dict) -> str:
    """'mean ± std' in percent, with the diverged runs named; 'diverged (all N runs)' when none trained."""
    n, bad = len(r.get("accs") or []), r.get("diverged", 0)
    if r.get("mean") is None:
        return f"diverged (all {n} runs)" if n else "diverged"
    text = f"{100 * r['mean']:8.2f} ± {100 * r['std']:5.2f}"
    return text + (f" ({bad} of {n} runs diverged)" if bad else "")


def check_compatible(synset: SyntheticSet, dataset: ImageDataset) -> None:
    """Raise ConfigError unless `synset` was made from data shaped and normalised like `dataset`."""
    same_norm = (len(synset.mean) == len(dataset.mean) and len(synset.std) == len(dataset.std)
                 and np.allclose(synset.mean, dataset.mean, rtol=1e-5, atol=1e-6)
                 and np.allclose(synset.std, dataset.std, rtol=1e-5, atol=1e-6))
    if not same_norm:
        def norm(mean, std):
            return "mean " + ", ".join(f"{m:.4g}" for m in mean) + " / std " + ", ".join(f"{s:.4g}" for s in std)
        raise ConfigError(f"the set was made from another dataset or normalisation (the set's "
                          f"{norm(synset.mean, synset.std)}; the test data's {norm(dataset.mean, dataset.std)}); "
                          f"evaluate it on the dataset it was distilled from ({synset.dataset or 'see its config'})")
    if (synset.channels, synset.image_size) != (dataset.channels, dataset.image_size):
        raise ConfigError(f"the set has {synset.channels}x{synset.image_size}px images but the test data "
                          f"{dataset.channels}x{dataset.image_size}px; load the dataset with the set's image size")
    if synset.num_classes != dataset.num_classes:
        raise ConfigError(f"the set has {synset.num_classes} classes but the test data {dataset.num_classes}; "
                          "load the dataset with the same classes as the set")


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, model_name: str, protocol: EvalProtocol | None = None, *,
                   device: str | torch.device = "auto", progress: bool = True, batched: bool | str = "auto",
                   model_kwargs: dict | None = None, num_classes: int | None = None,
                   max_parallel: int | None = None, run_ids: Sequence[int] | None = None,
                   mark_diverged: bool = False,
                   on_runs: Callable[[list[int], list[float], float], None] | None = None) -> list[float]:
    """The core of the protocol: test accuracy (fraction) of each run, in run order.

    `images` are in the model-input space; test images likewise. `model_kwargs` are build_model
    overrides (e.g. for NAS). `run_ids` picks which runs (default 0..runs-1), so any subset of
    the runs can be trained elsewhere and still get the draws it would get here. `batched`:
    True trains the runs together, False one after another, "auto" batches on a GPU only (on a
    CPU the work is compute-bound and the vmapped layers only add copies: batched was ~0.55x the
    speed of sequential on 2 EPYC cores, up to 0.85x with 5 runs). `mark_diverged`: a run whose
    weights became non-finite gets NaN instead of the chance-level accuracy its network still scores.
    `on_runs(ids, accuracies, seconds)` hears each group of runs as it finishes (EvalJournal)."""
    protocol = protocol or EvalProtocol()
    if len(images) == 0:
        raise ConfigError("the set to train on is empty; pass a set with at least one image")
    dev = resolve_device(device)
    if batched == "auto":
        batched = dev.type == "cuda"
    elif not isinstance(batched, bool):
        raise ConfigError(f"batched must be True, False or 'auto'; got {batched!r}")
    run_ids = list(range(protocol.runs)) if run_ids is None else [int(r) for r in run_ids]
    aug = DSA(protocol.dsa) if protocol.dsa else None
    if aug is not None and not aug.families:
        aug = None
    soft = labels.is_floating_point()   # soft labels: class probabilities [N, K]
    spec = _Spec(model_name, dict(model_kwargs or {}), images.shape[1],
                 int(num_classes) if num_classes is not None else
                 (labels.shape[1] if soft else int(labels.max()) + 1), images.shape[-1],
                 check_precision(protocol.precision, dev), bool(protocol.compile))
    images, labels = images.detach().to(dev, torch.float32), labels.to(dev, torch.float32 if soft else torch.long)
    test_images, test_labels = test_images.detach().to(dev, torch.float32), test_labels.to(dev, torch.long)
    group = len(run_ids) if batched else 1
    if max_parallel is not None:
        group = max(1, min(group, int(max_parallel)))
    groups = [run_ids[i:i + group] for i in range(0, len(run_ids), group)]
    bar = tqdm(total=(protocol.epochs + 1) * len(groups), disable=not progress, unit="ep", dynamic_ncols=True,
               desc=f"{model_name} x{len(run_ids)}" + (" batched" if batched else ""))
    accs: list[float] = []
    try:
        for ids in groups:
            t0 = time.perf_counter()
            fn = _train_group if batched else _train_one
            done = [float("nan") if mark_diverged and isinstance(a, DivergedAccuracy) else float(a)
                    for a in fn(spec, ids, images, labels, test_images, test_labels, protocol, aug, dev, bar)]
            if on_runs is not None:
                on_runs(ids, done, time.perf_counter() - t0)
            accs += done
    finally:
        bar.close()
    return accs


def full_training_set(dataset: ImageDataset) -> SyntheticSet:
    """The whole training split as a set (method 'full'): the upper reference of the tables."""
    return SyntheticSet(images=dataset.train_images, labels=dataset.train_labels.long(),
                        class_names=list(dataset.class_names), mean=tuple(dataset.mean), std=tuple(dataset.std),
                        zca=None, dataset=dataset.name, method="full", config={}, info={})


def evaluation_record(synset: SyntheticSet, results: dict, protocol: EvalProtocol | Mapping[str, Any] | None,
                      path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                      out: str | os.PathLike | None = None) -> dict:
    """The JSON evaluation record that `atomdistill report` reads (format: docs/evaluation.md,
    "The evaluation record").

    ``{"set": {path, dataset, method, ipc, num_classes, iterations, seed}, "protocol": every
    EvalProtocol field, "results": {model: {mean, std, accs, seconds}}, "hardware": hardware()}``.
    `path`: where the set was loaded from (None for the full training set); `protocol`: what
    evaluate() ran with (an EvalProtocol, or a mapping of the fields that differ from the
    defaults); `device`: where it ran; `out`: also write the record there."""
    is_full = synset.method == "full"
    iterations = synset.info.get("iterations_done", synset.config.get("iterations"))
    record = {
        "set": {"path": None if path is None else str(path), "dataset": synset.dataset, "method": synset.method,
                "ipc": None if is_full else synset.ipc, "num_classes": synset.num_classes,
                "iterations": None if iterations is None else int(iterations),
                "seed": synset.config.get("seed"), "factor": synset.factor,
                # how the set was made, so that a report tells sets made with other options apart
                "config": dict(synset.config)},
        "protocol": EvalProtocol.of(protocol).to_dict(),
        "results": {m: _record_result(r) for m, r in results.items()},
        "hardware": hardware(resolve_device(device or "auto")),
    }
    if out is not None:
        write_json(out, record)
    return record


def _record_result(r: dict) -> dict:
    """One model's entry of a record: floats, None for a diverged run (JSON has no NaN)."""
    def num(x):
        return None if x is None or not np.isfinite(x) else float(x)

    accs = [num(a) for a in r["accs"]]
    return {"mean": num(r["mean"]), "std": num(r["std"]), "accs": accs,
            "diverged": int(r.get("diverged", sum(a is None for a in accs))), "seconds": float(r["seconds"])}


def hardware(device: str | torch.device = "cpu") -> dict:
    """What ran the evaluation: device, CPU name, torch threads and version (and the GPU, if any)."""
    device = torch.device(device)
    info = {"device": device.type, "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# ---- training -----------------------------------------------------------------------------
class DivergedAccuracy(float):
    """The test accuracy of a run whose weights became non-finite: its outputs are NaN, so the
    accuracy is an artefact (chance level or the share of one class), not a measurement."""


def _finite_runs(tensors, runs: int) -> torch.Tensor:
    """[runs] bool: whether all of each network's float tensors (stacked on dim 0) are finite."""
    ok = torch.ones(runs, dtype=torch.bool)
    for t in tensors:
        if t.is_floating_point():
            ok &= torch.isfinite(t.detach()).reshape(runs, -1).all(1).cpu()
    return ok


@dataclasses.dataclass
class _Spec:
    name: str
    kwargs: dict
    channels: int
    num_classes: int
    image_size: int
    precision: str = "fp32"
    compile: bool = False


def _fresh_model(spec: _Spec, seed: int, run: int, device: torch.device) -> torch.nn.Module:
    """Run `run`'s initial network: built on the CPU under its own seed, whatever else is running."""
    with seeded(seed, Stream.EVAL_NET, run):
        net = build_model(spec.name, spec.channels, spec.num_classes, spec.image_size, **spec.kwargs)
    return net.to(device).train()


def _shuffle(n: int, seed: int, run: int, epoch: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator(seed, Stream.EVAL_SHUFFLE, run, epoch)).to(device)


def _draws(aug: DSA, n: int, seed: int, run: int, step: int) -> DSAParams:
    """One family for the whole batch (reference mode 'S'), each image its own parameters."""
    g = generator(seed, Stream.EVAL_DSA, run, step)
    family = int(torch.randint(len(aug.families), (1,), generator=g))
    return aug.sample(n, g, families=torch.full((n,), family, dtype=torch.long))


def _cat_params(params: list[DSAParams]) -> DSAParams:
    return DSAParams(**{f.name: torch.cat([getattr(p, f.name) for p in params])
                        for f in dataclasses.fields(DSAParams)})


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over networks of each network's mean cross-entropy (logits [R, B, K], labels [R, B]).

    Soft labels (probabilities [R, B, K]) get the soft cross-entropy -sum_k p_k log softmax(z)_k,
    which is KL(p || softmax(z)) plus the labels' constant entropy: the same gradient as KL at T=1."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1) if labels.is_floating_point()
                         else labels.flatten(), reduction="none")
    return ce.view(labels.shape[:2]).mean(1).sum()


def _sgd(params: list[torch.Tensor], lr: float, protocol: EvalProtocol) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)


def _fit(params: list[torch.Tensor], protocol: EvalProtocol, batches: Callable[[int], Iterable],
         batch_loss: Callable[[Any, int], torch.Tensor], bar) -> None:
    """The reference schedule: passes 0..epochs over `batches(epoch)`, one SGD step per batch on
    `batch_loss(batch, step)`; after pass epochs // 2 + 1 the lr drops x0.1 with a new optimiser."""
    lr = protocol.lr
    optimizer = _sgd(params, lr, protocol)
    step = 0
    for ep in range(protocol.epochs + 1):
        for batch in batches(ep):
            loss = batch_loss(batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if ep == protocol.epochs // 2 + 1:   # the reference decays once, with a new optimiser
            lr *= 0.1
            optimizer = _sgd(params, lr, protocol)
        bar.update(1)


def _train_one(spec, ids, images, labels, test_images, test_labels, protocol, aug, device, bar) -> list[float]:
    """The plain reference loop, one network at a time."""
    (run,) = ids
    seed = protocol.seed
    net = _fresh_model(spec, seed, run, device)
    model = compiled(net, device) if spec.compile else net   # the same parameters either way

    def batch_loss(idx, step):
        x = images[idx]
        if aug is not None:
            x = aug.apply(x, _draws(aug, len(idx), seed, run, step).to(device))
        with autocast(device, spec.precision):
            logits = model(x)
        return _loss(logits.float().unsqueeze(0), labels[idx].unsqueeze(0))

    _fit(list(net.parameters()), protocol,
         lambda ep: _shuffle(len(images), seed, run, ep, device).split(protocol.batch_size), batch_loss, bar)
    net.eval()
    with torch.inference_mode(), autocast(device, spec.precision):
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in zip(test_images.split(TEST_CHUNK), test_labels.split(TEST_CHUNK)))
    finite = bool(_finite_runs([t.unsqueeze(0) for t in (*net.parameters(), *net.buffers())], 1)[0])
    return [correct / len(test_labels) if finite else DivergedAccuracy(correct / len(test_labels))]


def _train_group(spec, ids, images, labels, test_images, test_labels, protocol, aug, device, bar) -> list[float]:
    """All networks of `ids` at once: stacked parameters, one vmapped forward and backward per step."""
    seed = protocol.seed
    nets = [_fresh_model(spec, seed, run, device) for run in ids]
    params, buffers = stack_module_state(nets)
    # A stateless skeleton to call with the stacked tensors; on 'meta' so it holds no memory.
    skeleton = copy.deepcopy(nets[0]).to("meta")
    del nets

    def forward(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    forward_all = vmap(forward)                              # x [R, B, ...]: each network its own batch
    forward_shared = vmap(forward, in_dims=(0, 0, None))     # x [B, ...]: one batch for all (test)
    if spec.compile:
        forward_all, forward_shared = compiled(forward_all, device), compiled(forward_shared, device)
    r = len(ids)

    def batches(ep):   # [R, b] index blocks: each network its own shuffle
        perms = torch.stack([_shuffle(len(images), seed, run, ep, device) for run in ids])
        return perms.split(protocol.batch_size, dim=1)

    def batch_loss(idx, step):
        b = idx.shape[1]
        x = images[idx.flatten()]
        if aug is not None:
            x = aug.apply(x, _cat_params([_draws(aug, b, seed, run, step) for run in ids]).to(device))
        with autocast(device, spec.precision):
            logits = forward_all(params, buffers, x.view(r, b, *x.shape[1:]))
        return _loss(logits.float(), labels[idx])

    skeleton.train()
    _fit(list(params.values()), protocol, batches, batch_loss, bar)
    skeleton.eval()
    correct = torch.zeros(r, dtype=torch.long, device=device)
    chunk = max(1, TEST_CHUNK // r)
    with torch.no_grad(), autocast(device, spec.precision):
        for x, y in zip(test_images.split(chunk), test_labels.split(chunk)):
            correct += (forward_shared(params, buffers, x).argmax(-1) == y).sum(1)
    finite = _finite_runs([*params.values(), *buffers.values()], r).tolist()
    return [c / len(test_labels) if ok else DivergedAccuracy(c / len(test_labels))
            for c, ok in zip(correct.tolist(), finite)]
