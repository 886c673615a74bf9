"""Evaluation protocol (METHOD.md section 4): train fresh networks on a set, test on real data.

Per run: a fresh network, SGD (lr 0.01, momentum 0.9, weight decay 5e-4), cross-entropy, batches
of 256 reshuffled every epoch, DSA on every training batch (one family per batch, each image its
own parameters: the reference's mode 'S' without Siamese sharing), then one test on the whole
real test set after the last epoch (no best-epoch picking).

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

Randomness: everything comes from ``distill.generator(seed, purpose, run, ...)`` (initialisation
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
import os
import platform
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from .augment import DSA, DSAParams
from .data import ImageDataset
from .distill import derived_seed, generator, resolve_device
from .errors import ConfigError
from .io import write_json
from .models import build_model
from .synset import SyntheticSet

# Purposes for derived seeds; distinct from distill.py's 1..4 so evaluation never replays
# the distillation's random streams.
_EVAL_NET, _EVAL_SHUFFLE, _EVAL_DSA = 101, 102, 103

DEFAULT_DSA = "color_crop_cutout_flip_scale_rotate"
TEST_CHUNK = 1024   # test images per forward, summed over the networks run together


# ---- public API ---------------------------------------------------------------------------
def evaluate(synset: SyntheticSet, dataset: ImageDataset, models: Sequence[str] | str = ("convnet",),
             runs: int = 3, epochs: int = 300, *, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 5e-4, batch_size: int = 256, dsa: str | None = DEFAULT_DSA,
             seed: int = 0, device: str | torch.device = "auto", progress: bool = True,
             batched: bool | str = "auto", test: tuple[torch.Tensor, torch.Tensor] | None = None,
             max_parallel: int | None = None) -> dict[str, dict]:
    """Train `runs` fresh networks of each architecture on `synset`, test them on `dataset`'s test split.

    Returns ``{model: {"mean", "std", "accs", "seconds"}}`` with accuracies as fractions and
    ``std`` the population standard deviation (``np.std``), as the reference reports.
    `test`: (images, labels) already in the set's space (skips ``synset.prepare_real``).
    `max_parallel`: at most this many networks train together (bounds memory; same results)."""
    check_compatible(synset, dataset)
    if isinstance(models, str):
        models = [models]
    if test is None:
        test = (synset.prepare_real(dataset.test_images), dataset.test_labels)
    dev = resolve_device(device)
    images, labels = synset.images.detach().to(dev, torch.float32), training_targets(synset).to(dev)
    test_images, test_labels = test[0].detach().to(dev, torch.float32), test[1].to(dev, torch.long)
    results = {}
    for name in models:
        t0 = time.perf_counter()
        accs = train_and_test(images, labels, test_images, test_labels, name, runs, epochs, lr=lr,
                              momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, dsa=dsa,
                              seed=seed, device=dev, progress=progress, batched=batched,
                              num_classes=synset.num_classes, max_parallel=max_parallel)
        results[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs,
                         "seconds": time.perf_counter() - t0}
    return results


def training_targets(synset: SyntheticSet) -> torch.Tensor:
    """What the networks are trained towards: the set's soft labels (probabilities [N, K]) if it
    has them, else its hard labels [N]."""
    if synset.soft_labels is None:
        return synset.labels.long()
    from .interop import check_soft_labels
    return check_soft_labels(synset.soft_labels, len(synset.labels), synset.num_classes, "the set's soft labels")


def check_compatible(synset: SyntheticSet, dataset: ImageDataset) -> None:
    """Raise ConfigError unless `synset` was made from data shaped and normalised like `dataset`."""
    same_norm = (len(synset.mean) == len(dataset.mean) and len(synset.std) == len(dataset.std)
                 and np.allclose(synset.mean, dataset.mean, rtol=1e-5, atol=1e-6)
                 and np.allclose(synset.std, dataset.std, rtol=1e-5, atol=1e-6))
    if not same_norm:
        raise ConfigError(f"the set was made from another dataset or normalisation (mean/std {tuple(synset.mean)}/"
                          f"{tuple(synset.std)}, test data {tuple(dataset.mean)}/{tuple(dataset.std)}); evaluate it "
                          f"on the dataset it was distilled from ({synset.dataset or 'see its config'})")
    if (synset.channels, synset.image_size) != (dataset.channels, dataset.image_size):
        raise ConfigError(f"the set has {synset.channels}x{synset.image_size}px images but the test data "
                          f"{dataset.channels}x{dataset.image_size}px; load the dataset with the set's image size")
    if synset.num_classes != dataset.num_classes:
        raise ConfigError(f"the set has {synset.num_classes} classes but the test data {dataset.num_classes}; "
                          "load the dataset with the same classes as the set")


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, model_name: str, runs: int = 3, epochs: int = 300, *,
                   lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                   batch_size: int = 256, dsa: str | DSA | None = DEFAULT_DSA, seed: int = 0,
                   device: str | torch.device = "auto", progress: bool = True, batched: bool | str = "auto",
                   model_kwargs: dict | None = None, num_classes: int | None = None,
                   max_parallel: int | None = None, run_ids: Sequence[int] | None = None) -> list[float]:
    """The core of the protocol: test accuracy (fraction) of each run, in run order.

    `images` are in the model-input space; test images likewise. `model_kwargs` are build_model
    overrides (e.g. for NAS). `run_ids` picks which runs (default 0..runs-1), so any subset of
    the runs can be trained elsewhere and still get the draws it would get here. `batched`:
    True trains the runs together, False one after another, "auto" batches on a GPU only (on a
    CPU the work is compute-bound and the vmapped layers only add copies: batched was ~0.55x the
    speed of sequential on 2 EPYC cores, up to 0.85x with 5 runs)."""
    if runs < 1 or epochs < 0 or batch_size < 1:
        raise ConfigError(f"need runs >= 1, epochs >= 0 and batch_size >= 1; got {runs}, {epochs}, {batch_size}")
    if len(images) == 0:
        raise ConfigError("the set to train on is empty; pass a set with at least one image")
    dev = resolve_device(device)
    if batched == "auto":
        batched = dev.type == "cuda"
    elif not isinstance(batched, bool):
        raise ConfigError(f"batched must be True, False or 'auto'; got {batched!r}")
    run_ids = list(range(runs)) if run_ids is None else [int(r) for r in run_ids]
    aug = dsa if isinstance(dsa, DSA) else (DSA(dsa) if dsa else None)
    if aug is not None and not aug.families:
        aug = None
    soft = labels.is_floating_point()   # soft labels: class probabilities [N, K]
    spec = _Spec(model_name, dict(model_kwargs or {}), images.shape[1],
                 int(num_classes) if num_classes is not None else
                 (labels.shape[1] if soft else int(labels.max()) + 1), images.shape[-1])
    opt = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    images, labels = images.detach().to(dev, torch.float32), labels.to(dev, torch.float32 if soft else torch.long)
    test_images, test_labels = test_images.detach().to(dev, torch.float32), test_labels.to(dev, torch.long)
    group = len(run_ids) if batched else 1
    if max_parallel is not None:
        group = max(1, min(group, int(max_parallel)))
    groups = [run_ids[i:i + group] for i in range(0, len(run_ids), group)]
    passes = epochs + 1
    bar = tqdm(total=passes * len(groups), disable=not progress, unit="ep", dynamic_ncols=True,
               desc=f"{model_name} x{len(run_ids)}" + (" batched" if batched else ""))
    accs: list[float] = []
    try:
        for ids in groups:
            fn = _train_group if batched else _train_one
            accs += fn(spec, ids, images, labels, test_images, test_labels, epochs, batch_size, aug, seed,
                       dev, opt, bar)
    finally:
        bar.close()
    return accs


def full_training_set(dataset: ImageDataset) -> SyntheticSet:
    """The whole training split as a set (method 'full'): the upper reference of the tables."""
    return SyntheticSet(images=dataset.train_images, labels=dataset.train_labels.long(),
                        class_names=list(dataset.class_names), mean=tuple(dataset.mean), std=tuple(dataset.std),
                        zca=None, dataset=dataset.name, method="full", config={}, info={})


def evaluation_record(synset: SyntheticSet, results: dict, protocol: dict, path: str | os.PathLike | None = None,
                      *, device: str | torch.device | None = None, out: str | os.PathLike | None = None) -> dict:
    """The JSON evaluation record (format in notes/CONTEXT.md) that `atomdistill report` reads.

    `path`: where the set was loaded from (None for the full training set); `protocol`: the
    options evaluate() ran with (missing ones get evaluate()'s defaults); `out`: also write it there."""
    protocol = dict(protocol)
    device = resolve_device(device or protocol.pop("device", None) or "auto")
    protocol.pop("device", None)
    full = {"runs": 3, "epochs": 300, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
            "dsa": DEFAULT_DSA, "seed": 0}
    full.update(protocol)
    is_full = synset.method == "full"
    iterations = synset.info.get("iterations_done", synset.config.get("iterations"))
    record = {
        "set": {"path": None if path is None else str(path), "dataset": synset.dataset, "method": synset.method,
                "ipc": None if is_full else synset.ipc, "num_classes": synset.num_classes,
                "iterations": None if iterations is None else int(iterations),
                "seed": synset.config.get("seed")},
        "protocol": full,
        "results": {m: {"mean": float(r["mean"]), "std": float(r["std"]), "accs": [float(a) for a in r["accs"]],
                        "seconds": float(r["seconds"])} for m, r in results.items()},
        "hardware": hardware(device),
    }
    if out is not None:
        write_json(out, record)
    return record


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
@dataclasses.dataclass
class _Spec:
    name: str
    kwargs: dict
    channels: int
    num_classes: int
    image_size: int


def _fresh_model(spec: _Spec, seed: int, run: int, device: torch.device) -> torch.nn.Module:
    """Run `run`'s initial network: built on the CPU under its own seed, whatever else is running."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, _EVAL_NET, run))
        net = build_model(spec.name, spec.channels, spec.num_classes, spec.image_size, **spec.kwargs)
    return net.to(device).train()


def _shuffle(n: int, seed: int, run: int, epoch: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator(seed, _EVAL_SHUFFLE, run, epoch)).to(device)


def _draws(aug: DSA, n: int, seed: int, run: int, step: int) -> DSAParams:
    """One family for the whole batch (reference mode 'S'), each image its own parameters."""
    g = generator(seed, _EVAL_DSA, run, step)
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


def _sgd(params, lr: float, opt: dict) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=opt["momentum"], weight_decay=opt["weight_decay"])


def _train_one(spec, ids, images, labels, test_images, test_labels, epochs, batch_size, aug, seed, device,
               opt, bar) -> list[float]:
    """The plain reference loop, one network at a time."""
    (run,) = ids
    net = _fresh_model(spec, seed, run, device)
    lr = opt["lr"]
    optimizer = _sgd(net.parameters(), lr, opt)
    n, step = len(images), 0
    for ep in range(epochs + 1):
        for idx in _shuffle(n, seed, run, ep, device).split(batch_size):
            x = images[idx]
            if aug is not None:
                x = aug.apply(x, _draws(aug, len(idx), seed, run, step).to(device))
            loss = _loss(net(x).unsqueeze(0), labels[idx].unsqueeze(0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if ep == epochs // 2 + 1:   # the reference decays once, with a new optimiser
            lr *= 0.1
            optimizer = _sgd(net.parameters(), lr, opt)
        bar.update(1)
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum())
                      for x, y in zip(test_images.split(TEST_CHUNK), test_labels.split(TEST_CHUNK)))
    return [correct / len(test_labels)]


def _train_group(spec, ids, images, labels, test_images, test_labels, epochs, batch_size, aug, seed, device,
                 opt, bar) -> list[float]:
    """All networks of `ids` at once: stacked parameters, one vmapped forward and backward per step."""
    nets = [_fresh_model(spec, seed, run, device) for run in ids]
    params, buffers = stack_module_state(nets)
    # A stateless skeleton to call with the stacked tensors; on 'meta' so it holds no memory.
    skeleton = copy.deepcopy(nets[0]).to("meta")
    del nets

    def forward(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    forward_all = vmap(forward)                              # x [R, B, ...]: each network its own batch
    forward_shared = vmap(forward, in_dims=(0, 0, None))     # x [B, ...]: one batch for all (test)
    r, n, lr = len(ids), len(images), opt["lr"]
    optimizer = _sgd(params.values(), lr, opt)
    step = 0
    skeleton.train()
    for ep in range(epochs + 1):
        perms = torch.stack([_shuffle(n, seed, run, ep, device) for run in ids])   # [R, N]
        for start in range(0, n, batch_size):
            idx = perms[:, start:start + batch_size]                                  # [R, b]
            b = idx.shape[1]
            x = images[idx.flatten()]
            if aug is not None:
                draws = _cat_params([_draws(aug, b, seed, run, step) for run in ids])
                x = aug.apply(x, draws.to(device))
            logits = forward_all(params, buffers, x.view(r, b, *x.shape[1:]))
            loss = _loss(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if ep == epochs // 2 + 1:   # the reference decays once, with a new optimiser
            lr *= 0.1
            optimizer = _sgd(params.values(), lr, opt)
        bar.update(1)
    skeleton.eval()
    correct = torch.zeros(r, dtype=torch.long, device=device)
    chunk = max(1, TEST_CHUNK // r)
    with torch.no_grad():
        for x, y in zip(test_images.split(chunk), test_labels.split(chunk)):
            correct += (forward_shared(params, buffers, x).argmax(-1) == y).sum(1)
    return [c / len(test_labels) for c in correct.tolist()]
