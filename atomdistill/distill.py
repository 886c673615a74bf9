"""The distillation loop (docs/method.md: "One distillation iteration"; every default and its reason).

Every iteration: draw a fresh random network seeded from (seed, iteration) (or, with
`nets="pool"`, a member of a pool of networks that train on real data: atomdistill.netpool);
sample a real batch per class; augment real and synthetic images of each class with one shared
DSA draw; push real images through the network without a graph, accumulating class means of the
matching vectors; push all synthetic images (decoded, with multi-formation `factor` > 1:
atomdistill.formation) through it in one forward; step the pixels.

All randomness is derived from (seed, iteration, class), never from a global stream, so a run
resumed from a checkpoint equals an uninterrupted one, and a process that owns only some of
the classes draws exactly what a single process would for them (class sharding).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .augment import DSA
from .data import DEFAULT_DATASET, ImageDataset, check_ipc, load_dataset, zca_by_default
from .errors import AtomDistillError, ConfigError, check_option_names
from .evaluate import EvalProtocol, evaluate
from .io import (FolderLock, atomic_path, check_writable, content_checksum, is_leftover, remove_stale_temporaries,
                 write_json)
from .formation import check_factor, decode, decode_labels, encode
from .loss import ClassMeans, MatchingLoss, loss_weights
from .models import build_model, model_info
from .netpool import NetworkPool, random_network
from .rng import Stream, generator, seeded
from .runtime import autocast, check_precision, compiled, resolve_device
from .synset import SyntheticSet, read_safetensors
from .zca import ZCA


@dataclass
class DistillConfig:
    """Everything that defines a distillation run; saved with every result."""

    dataset: str = DEFAULT_DATASET
    data_root: str | None = None
    image_size: int | None = None          # None: the dataset's own size
    ipc: int = 10
    method: str = "atom"                   # loss preset: atom, atom+, atom+gaussian, datadam, dm, channel
    # Overrides of the preset's loss weights (None keeps the preset's value).
    spatial: float | None = None
    channel: float | None = None
    mmd: float | None = None
    power: float | None = None
    scale: float | None = None
    layers: tuple[int, ...] | None = None
    net: str | None = None                 # None: convnet, convnet-d4 for 64 px
    iterations: int = 20000
    lr: float | None = None                # None: 1 up to IPC 50, 10 above
    momentum: float = 0.5
    batch_real: int = 256                  # real images per class per iteration
    real_chunk: int | None = None          # real images per forward (None: 64 on CPU, where cache-sized
                                           # chunks run fastest, 4096 on a GPU); bounds memory, not the
                                           # result; batch-norm networks take the whole batch at once
    init: str = "real"                     # real | noise
    zca: bool | None = None                # None: the dataset's default (on for CIFAR, data.DATASETS)
    dsa: str = "color_crop_cutout_flip_scale_rotate"   # "none" turns augmentation off
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"                # fp32 | bf16 (autocast of the forward passes; changes the set)
    compile: bool = False                  # torch.compile the forward passes and the loss's vectors: faster
                                           # after a warm-up (README Speed); rounds differently, so the set
                                           # is another draw, not the eager bits
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 0                    # 0: no evaluation during the run
    eval_models: tuple[str, ...] = ("convnet",)
    eval_runs: int = EvalProtocol.runs
    eval_epochs: int = EvalProtocol.epochs
    # Beyond ATOM (README "Options of the loss"): multi-formation, the network source, the kernel.
    factor: int | None = None              # each stored image holds factor x factor tiles (IDC); None: the
                                           # preset's (preset_factor: 2 for atom+ on 32 px and up, else 1)
    nets: str = "random"                   # random: a fresh network per iteration; pool: IDM's trained pool
    pool_size: int = 100                   # networks kept (IDM's net_num)
    pool_steps: int = 10                   # SGD steps the used network trains per iteration (IDM's model_train_steps)
    pool_refresh: int = 30                 # a network joins every this many iterations (IDM's net_generate_interval)
    mmd_kernel: str | None = None          # final-layer term: linear | gaussian (None: the preset's, linear)

    def __post_init__(self):
        if not isinstance(self.dataset, str):
            raise ConfigError(f"dataset must be a name such as 'cifar10' or 'folder:PATH', or a loaded ImageDataset; "
                              f"got {type(self.dataset).__name__}")
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
        self.eval_models = tuple(self.eval_models)
        if self.init not in ("real", "noise"):
            raise ConfigError(f"init must be 'real' or 'noise', got {self.init!r}")
        check_numbers(self)
        self.weights()   # validates the method, weights, layers and kernel now, not after the data has loaded
        if not self.eval_models:
            raise ConfigError("eval_models names no architecture: give at least one, e.g. ('convnet',)")
        for name in (self.net, *self.eval_models):   # an unknown name fails now, not when it is first built
            if name is not None:
                model_info(name)
        check_precision(self.precision)
        if self.factor is not None:
            self.factor = check_factor(self.factor)
        if self.nets not in ("random", "pool"):
            raise ConfigError(f"nets must be 'random' or 'pool', got {self.nets!r}")

    def resolved(self, image_size: int) -> "DistillConfig":
        """A copy with every automatic value made explicit for this dataset."""
        factor = self.factor if self.factor is not None else preset_factor(self.method, image_size)
        check_factor(factor, image_size)
        return dataclasses.replace(
            self,
            image_size=image_size,
            factor=factor,
            net=self.net or ("convnet-d4" if image_size >= 64 else "convnet"),
            lr=self.lr if self.lr is not None else (1.0 if self.ipc <= 50 else 10.0),
            zca=self.zca if self.zca is not None else zca_by_default(self.dataset),
        )

    def eval_protocol(self) -> EvalProtocol:
        """The protocol of the evaluations along the way (eval_every)."""
        return EvalProtocol(runs=self.eval_runs, epochs=self.eval_epochs, seed=self.seed, precision=self.precision,
                            compile=self.compile)

    def weights(self):
        return loss_weights(self.method, spatial=self.spatial, channel=self.channel, mmd=self.mmd,
                            power=self.power, scale=self.scale, layers=self.layers, mmd_kernel=self.mmd_kernel)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Options that change how a run is executed or logged but not the synthetic set it produces:
# the ones a resumed run may change.
EXECUTION_FIELDS = {"data_root", "device", "iterations", "real_chunk", "checkpoint_every", "log_every",
                    "eval_every", "eval_models", "eval_runs", "eval_epochs"}

# Numeric options: whole numbers with their least value, and real numbers that must be finite.
_INT_FIELDS = {"ipc": 1, "iterations": 0, "batch_real": 1, "real_chunk": 1, "image_size": 1, "seed": 0,
               "checkpoint_every": 1, "log_every": 1, "eval_every": 0, "eval_runs": 1, "eval_epochs": 0,
               "pool_size": 1, "pool_refresh": 1, "pool_steps": 0}
_FLOAT_FIELDS = ("lr", "momentum", "spatial", "channel", "mmd", "power", "scale")


def check_numbers(cfg: DistillConfig) -> None:
    """ConfigError for a numeric option that is not a number, NaN or infinite, or below its least value."""
    for name, least in _INT_FIELDS.items():
        v = getattr(cfg, name)
        if v is None and name in ("real_chunk", "image_size"):
            continue
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, got {v!r}")
        if v < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {v}")
    for name in _FLOAT_FIELDS:
        v = getattr(cfg, name)
        if v is None:
            continue
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"--{name} must be a finite number, got {v!r}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ConfigError(f"--lr must be greater than 0, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        # Heavy-ball SGD never forgets a step at momentum 1 and grows them past it: the run
        # would end later in a NaN loss blamed on --lr.
        raise ConfigError(f"--momentum must be at least 0 and below 1, got {cfg.momentum}")


# ---- deterministic randomness: every draw from (seed, stream, iteration, class), see rng.py ----
def has_batch_norm(net: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def real_batch_indices(class_indices: Sequence[torch.Tensor], global_ids: Sequence[int], batch: int,
                       seed: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """batch images per class without replacement (all of a smaller class); local labels."""
    idx, labels = [], []
    for local, (cls_idx, gid) in enumerate(zip(class_indices, global_ids)):
        perm = torch.randperm(len(cls_idx), generator=generator(seed, Stream.REAL, iteration, gid))[:batch]
        idx.append(cls_idx[perm])
        labels.append(torch.full((len(perm),), local, dtype=torch.long))
    return torch.cat(idx), torch.cat(labels)


def initial_images(train_images: torch.Tensor, class_indices: Sequence[torch.Tensor], global_ids: Sequence[int],
                   ipc: int, init: str, seed: int, factor: int = 1) -> torch.Tensor:
    """ipc random real images of each class (in the space of train_images), or Gaussian noise.

    With factor f > 1 each stored image holds f^2 random real images of its class, downsampled
    into its tiles, as IDC initialises (formation.encode)."""
    images = []
    for cls_idx, gid in zip(class_indices, global_ids):
        g = generator(seed, Stream.INIT, gid)
        if init == "real":
            picks = cls_idx[torch.randperm(len(cls_idx), generator=g)[:ipc * factor ** 2]]
            images.append(encode(train_images[picks].cpu(), factor))
        else:
            images.append(torch.randn(ipc, *train_images.shape[1:], generator=g))
    return torch.cat(images).float().clone()


# ---- the run ------------------------------------------------------------------------------
@dataclass
class RunState:
    iteration: int
    images: torch.Tensor
    momentum: torch.Tensor | None
    history: list[dict] = field(default_factory=list)
    pool: dict[str, torch.Tensor] | None = None   # NetworkPool.state_tensors() with --nets pool


def distill(dataset: ImageDataset | str | None = None, ipc: int = 10, method: str = "atom", *,
            out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
            progress: bool = True, **options) -> SyntheticSet:
    """Distil `dataset` into `ipc` synthetic images per class with a loss preset.

    `dataset` is a name ("cifar10", "folder:PATH", ...) or an already loaded ImageDataset;
    `options` are DistillConfig fields (iterations, lr, batch_real, seed, device, ...).
    With `out`, the run folder gets config, metrics, checkpoints, the set and its grid."""
    data = dataset if isinstance(dataset, ImageDataset) else None
    name = data.name if data is not None else (dataset or options.pop("dataset", "digits"))
    options.pop("dataset", None)
    check_option_names(options, (f.name for f in dataclasses.fields(DistillConfig)), "distillation")
    config = DistillConfig(dataset=name, ipc=ipc, method=method, **options)
    return Distiller(config, data=data, out=out, resume=resume, overwrite=overwrite, progress=progress).run()


def resume(run_dir: str | Path, progress: bool = True, **overrides) -> SyntheticSet:
    """Continue an interrupted run from its folder. `overrides` may change how it executes
    (EXECUTION_FIELDS: e.g. iterations to extend it, device); see load_run_config."""
    return Distiller(load_run_config(run_dir, **overrides), out=run_dir, resume=True, progress=progress).run()


def load_run_config(run_dir: str | Path, **overrides) -> DistillConfig:
    """The configuration saved in a run folder, with the non-None `overrides` applied.

    Only EXECUTION_FIELDS may change: any other option would make another set than the one the
    run is making, so it must equal the saved value (a ConfigError names it otherwise)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        if run_dir.is_dir() and all(is_leftover(p) for p in run_dir.iterdir()):
            raise AtomDistillError(f"{run_dir} holds no run to resume: it was stopped before it wrote its "
                                   "configuration; start it again with the original `atomdistill distill ... "
                                   f"--out {run_dir}` command")
        raise AtomDistillError(f"{run_dir} is not a run folder (no config.json); pass the --out folder of "
                               "an earlier `atomdistill distill`")
    try:
        saved = json.loads(cfg_path.read_text())["config"]
        before = DistillConfig.from_dict(saved)
    except Exception as e:   # unreadable, not JSON, not a config, or values no run could have had
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        raise AtomDistillError(f"{cfg_path} is damaged ({reason}); start the run again with its original "
                               "`atomdistill distill` command and --overwrite") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    check_option_names(given, (f.name for f in dataclasses.fields(DistillConfig)), "distillation")
    after = DistillConfig.from_dict({**saved, **given})
    for name in given:
        if name not in EXECUTION_FIELDS and getattr(after, name) != getattr(before, name):
            allowed = ", ".join(f"--{f.replace('_', '-')}" for f in sorted(EXECUTION_FIELDS))
            option = f"--{name.replace('_', '-')}"
            raise ConfigError(f"{option} {given[name]} would change the set that {run_dir} is making (made with "
                              f"{getattr(before, name)}); a resumed run may change only {allowed}; start a new run "
                              f"(another --out) to use another {option}")
    return after


class Distiller:
    """One distillation run; `classes` restricts it to a shard of the classes (by global id)."""

    def __init__(self, config: DistillConfig, *, data: ImageDataset | None = None, out: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True,
                 classes: Sequence[int] | None = None, num_classes_total: int | None = None,
                 zca: ZCA | None = None):
        self.out = Path(out) if out is not None else None
        self.resume, self.progress, self.overwrite = resume, progress, overwrite
        self._lock: FolderLock | None = None
        self._bar = None
        self._saved_iteration: int | None = None   # the last checkpoint this run wrote or resumed from
        if self.out is not None and not resume:
            self._check_out(overwrite)
        self.device = resolve_device(config.device)
        if data is None:
            data = load_dataset(config.dataset, config.data_root, image_size=config.image_size, classes=classes)
        self.data = data
        self.global_ids = list(classes) if classes is not None else list(range(data.num_classes))
        self.num_classes_total = num_classes_total or data.num_classes
        self.config = config.resolved(data.image_size)
        self.weights = self.config.weights()
        self._check_ipc()
        # ZCA: fitted on the whole training split (or handed in, e.g. fitted across processes).
        self.zca = zca
        if self.config.zca and self.zca is None:
            self.zca = ZCA.fit(data.train_images)
        # Real data stays on the device, in the space the synthetic images live in. The caller's
        # dataset is not modified.
        train = self.zca(data.train_images) if self.zca is not None else data.train_images
        self.train_images = train.to(self.device)
        self._eval_test = None   # test images in the set's space, made on the first evaluation
        self.cpu_class_indices = data.class_indices()
        self.dsa = DSA(self.config.dsa) if self.config.dsa != "none" else None
        self.loss_fn = MatchingLoss(self.weights)
        # The same function either way; compiled, its kernels fuse the norm, ReLU, pooling and the
        # attention reductions (one graph per input shape, reused by every fresh network).
        self.vectors = compiled(self._vectors, self.device) if self.config.compile else self._vectors
        check_precision(self.config.precision, self.device)   # warns once where bf16 is emulated
        # Batch norm normalises with the statistics of the batch it is given, and the synthetic
        # images of all classes go through in one batch: so must the real ones (as in the reference
        # code), or real features would be normalised per class and synthetic ones across classes.
        # Other norms act per image, so the real batch can go through in chunks.
        probe = build_model(self.config.net, data.channels, 2, data.image_size)
        self.real_in_one_batch = has_batch_norm(probe)
        self.loss_fn.check_layers(probe.num_blocks - 1)   # --layers 9 fails here, not after the bar starts
        self.syn_labels = torch.arange(data.num_classes, device=self.device).repeat_interleave(self.config.ipc)
        self.decoded_labels = decode_labels(self.syn_labels, self.config.factor)
        self.pool = None
        if self.config.nets == "pool":
            if self.global_ids != list(range(self.num_classes_total)):
                raise ConfigError("--nets pool trains its networks on the real images of every class, which a "
                                  "class-sharded run (torchrun with 2+ processes) splits over processes; run it in "
                                  "one process, or use --nets random")
            self.pool = NetworkPool(self.config, data.channels, self.num_classes_total, self.train_images,
                                    data.train_labels, self.device)

    def _check_ipc(self):
        check_ipc(self.data, self.config.ipc, self.config.factor if self.config.init == "real" else 1)

    # Seams for atomdistill.distributed.ShardedDistiller, which runs them across processes.
    def _check_out(self, overwrite: bool):
        _check_run_dir(self.out, overwrite)

    def _claim_out(self):
        """Lock the run folder for this process (a second writer is refused), then, under the lock,
        check it again, clear it for --overwrite and remove what killed writes left behind."""
        lock = FolderLock(self.out, "run folder").acquire()
        try:
            if not self.resume:
                _check_run_dir(self.out, self.overwrite, clear=True)
            remove_stale_temporaries(self.out, RUN_FILES)
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def _release_out(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _write_config(self):
        write_json(self.out / "config.json", {"config": self.config.to_dict(),
                                               "weights": dataclasses.asdict(self.weights)})

    def _reduce_loss(self, loss: torch.Tensor, terms: dict) -> tuple[torch.Tensor, dict]:
        """The loss to check and log: this process's own (a sharded run sums it over processes)."""
        return loss.detach(), terms

    # ---- one iteration ----------------------------------------------------------------------
    def step_loss(self, syn: torch.Tensor, iteration: int):
        cfg = self.config
        net = (self.pool.network(iteration) if self.pool is not None
               else random_network(cfg, self.data.channels, self.num_classes_total, iteration, self.device))
        draws = None
        if self.dsa is not None:   # one draw per class (Siamese), shared by its real and synthetic images
            draws = self.dsa.sample(self.num_classes_total, generator(cfg.seed, Stream.DSA, iteration))
            draws = draws.index(torch.tensor(self.global_ids)).to(self.device)
        real_idx, real_labels = real_batch_indices(self.cpu_class_indices, self.global_ids, cfg.batch_real,
                                                   cfg.seed, iteration)
        real_idx, real_labels = real_idx.to(self.device), real_labels.to(self.device)
        keep = self.loss_fn.sample_terms   # per-image vectors for a kernel MMD (none for the linear kernel)
        real = ClassMeans(self.data.num_classes, keep)
        with torch.no_grad():
            chunk = len(real_idx) if self.real_in_one_batch else cfg.real_chunk or (64 if self.device.type == "cpu"
                                                                                   else 4096)
            for idx, labels in zip(real_idx.split(chunk), real_labels.split(chunk)):
                x = self.train_images[idx]
                if draws is not None:
                    x = self.dsa.apply(x, draws, labels)
                real.add(self.vectors(net, x), labels)
        x = decode(syn, cfg.factor)   # factor 1: syn itself
        x = self.dsa.apply(x, draws, self.decoded_labels) if draws is not None else x
        fake = ClassMeans(self.data.num_classes, keep).add(self.vectors(net, x), self.decoded_labels)
        return self.loss_fn.compare(real, fake)

    def _vectors(self, net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss's vectors of the images x through net."""
        return self.loss_fn.vectors(*self._features(net, x))

    def _features(self, net: torch.nn.Module, x: torch.Tensor):
        """net.features(x); with precision bf16 under autocast, the outputs back in fp32 for the loss."""
        if self.config.precision == "fp32":
            return net.features(x)
        with autocast(self.device, self.config.precision):
            acts, embedding = net.features(x)
        return [a.float() for a in acts], embedding.float()

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> SyntheticSet:
        if self.out is not None:
            self._claim_out()
        try:
            return self._run()
        finally:
            if self._bar is not None:   # end the progress line before any error message
                self._bar.close()
            self._release_out()

    def _run(self) -> SyntheticSet:
        cfg = self.config
        state = self._load_checkpoint() if self.resume else None
        if state is not None:
            self._saved_iteration = state.iteration
            if state.iteration > cfg.iterations:   # else the config would say fewer than the set had
                error = ConfigError(f"{self.out} has done {state.iteration} iterations, more than --iterations "
                                    f"{cfg.iterations}, and a resumed run cannot undo them; pass --iterations "
                                    f"{state.iteration} or more, or start a new run")
                error.every_rank = True   # every process of a torchrun group holds the same checkpoint
                raise error
        if state is None:
            state = RunState(0, initial_images(self.train_images, self.cpu_class_indices, self.global_ids, cfg.ipc,
                                               cfg.init, cfg.seed, cfg.factor), None)
        if self.out is not None:   # on resume too: a later --resume continues with what this one changed
            self._write_config()
        syn = state.images.to(self.device).requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=cfg.lr, momentum=cfg.momentum)
        if state.momentum is not None:
            opt.state[syn]["momentum_buffer"] = state.momentum.to(self.device)
        if self.pool is not None and state.pool is not None:
            self.pool.load_state_tensors(state.pool)
        history = state.history
        bar = tqdm(total=cfg.iterations, initial=state.iteration, disable=not self.progress, unit="it",
                   desc=f"{cfg.method} ipc={cfg.ipc}", dynamic_ncols=True)
        self._bar = bar
        t0, done_at_start = time.perf_counter(), state.iteration
        for it in range(state.iteration, cfg.iterations):
            t_iter = time.perf_counter()
            loss, terms = self.step_loss(syn, it)
            total, terms = self._reduce_loss(loss, terms)
            if not torch.isfinite(total):
                raise self._diverged(f"the matching loss became {total.item()} at iteration {it}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.pool is not None:   # the network just used learns a little more
                self.pool.train(it)
            done = it + 1
            t_iter = time.perf_counter() - t_iter
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.iterations:
                elapsed = time.perf_counter() - t0
                row = {"iteration": done, "loss": total.item(), **{k: v.item() for k, v in terms.items()},
                       "s_iter": t_iter, "s_per_iter": elapsed / (done - done_at_start)}
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.iterations):
                history.append({"iteration": done, "eval": self.evaluate(syn)})
                bar.set_postfix(loss=f"{total.item():.4g}", acc=_acc_summary(history[-1]["eval"]))
            if self.out is not None and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
                self._save_checkpoint(RunState(done, syn.detach(), opt.state[syn].get("momentum_buffer"), history,
                                               self.pool.state_tensors() if self.pool is not None else None))
                self._saved_iteration = done
        bar.close()
        synset = self.synthetic_set(syn, state_iteration=max(cfg.iterations, state.iteration), history=history)
        if not torch.isfinite(synset.images).all():
            raise self._diverged(f"the synthetic images became non-finite by iteration {cfg.iterations}")
        if self.out is not None:
            self._finish(synset, history)
        return synset

    def _diverged(self, what: str) -> AtomDistillError:
        """The error that stops a diverged run: what happened, the fix, and what the folder still holds."""
        text = f"{what}: the images diverged with --lr {self.config.lr} and loss --scale {self.weights.scale}; " \
               "run again with a lower --lr or --scale"
        if self.out is not None:
            text += " and --overwrite" + (
                f" ({self.out} keeps its last checkpoint, iteration {self._saved_iteration}, whose images are "
                "finite; resuming it would repeat the same steps)" if self._saved_iteration is not None else
                f" ({self.out} has no checkpoint of this run)")
        return AtomDistillError(text)

    def evaluate(self, syn: torch.Tensor) -> dict:
        cfg = self.config
        synset = self.synthetic_set(syn)
        if self._eval_test is None:
            self._eval_test = (synset.prepare_real(self.data.test_images), self.data.test_labels)
        results = evaluate(synset, self.data, cfg.eval_models, cfg.eval_protocol(), device=self.device,
                           progress=False, test=self._eval_test)
        return {m: {"mean": r["mean"], "std": r["std"], "diverged": r["diverged"]} for m, r in results.items()}

    def synthetic_set(self, syn: torch.Tensor, state_iteration: int | None = None, history=None) -> SyntheticSet:
        info = {"iterations_done": state_iteration, "classes": self.global_ids}
        if history:
            losses = [h for h in history if "loss" in h]
            if losses:
                info["final_loss"] = losses[-1]["loss"]
                info["s_per_iter"] = losses[-1]["s_per_iter"]
        return SyntheticSet(images=syn.detach().float().cpu().clone(), labels=self.syn_labels.cpu(),
                            class_names=list(self.data.class_names), mean=tuple(self.data.mean),
                            std=tuple(self.data.std), zca=self.zca.to("cpu") if self.zca is not None else None,
                            dataset=self.config.dataset, method=self.config.method,
                            config=self.config.to_dict(), info=info, factor=self.config.factor)

    # ---- files ----------------------------------------------------------------------------------
    def _save_checkpoint(self, state: RunState):
        tensors = {"images": state.images.float().cpu().contiguous()}
        if state.momentum is not None:
            tensors["momentum"] = state.momentum.float().cpu().contiguous()
        if not all(torch.isfinite(t).all() for t in tensors.values()):   # never replace a good checkpoint
            raise self._diverged(f"the synthetic images became non-finite at iteration {state.iteration}")
        tensors.update({f"pool.{k}": v for k, v in (state.pool or {}).items()})
        meta = json.loads(json.dumps({"iteration": state.iteration, "config": self.config.to_dict(),
                                      "history": state.history}))
        meta["checksum"] = content_checksum(tensors, meta)
        with atomic_path(self.out / "checkpoint.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"atomdistill": json.dumps(meta)})
        write_metrics(self.out / "metrics.jsonl", state.history)

    def _load_checkpoint(self) -> RunState | None:
        path = self.out / "checkpoint.safetensors"
        if not path.exists():
            return None
        fix = (f"delete it and run `atomdistill distill --resume {self.out}` again to restart from iteration 0 "
               "with the same options, or start again with --overwrite")
        meta, tensors = read_safetensors(path, "checkpoint", fix)
        expected = (self.num_classes_total * self.config.ipc, self.data.channels, self.data.image_size,
                     self.data.image_size)
        reason = checkpoint_problem(meta, tensors, expected)
        if reason:
            raise AtomDistillError(f"checkpoint {path} is damaged ({reason}); {fix}")
        saved = DistillConfig.from_dict(meta["config"])
        if _result_fields(saved) != _result_fields(self.config):
            raise ConfigError(f"the checkpoint in {self.out} was made with another configuration; resume "
                              "with the same options (or none: `atomdistill distill --resume RUN_DIR`)")
        pool = {k[len("pool."):]: v for k, v in tensors.items() if k.startswith("pool.")}
        return RunState(meta["iteration"], tensors["images"], tensors.get("momentum"), meta["history"], pool or None)

    def _finish(self, synset: SyntheticSet, history: list[dict]):
        from .plots import plot_history
        synset.save(self.out / "synset.safetensors")
        synset.save_grid(self.out / "grid.png")
        write_metrics(self.out / "metrics.jsonl", history)
        plot_history(history, self.out / "curves.png", title=f"{self.config.dataset} {self.config.method} "
                                                               f"ipc={self.config.ipc}")


# What a run writes in its folder (and may find half-written temporaries of after a kill).
RUN_FILES = ("config.json", "checkpoint.safetensors", "metrics.jsonl", "synset.safetensors", "grid.png",
             "curves.png")


def checkpoint_problem(meta, tensors: dict, shape: tuple) -> str | None:
    """Why a checkpoint's content cannot be resumed from (None if it can): checksum, structure, values."""
    if not isinstance(meta, dict):
        return "no atomdistill metadata"
    if "checksum" in meta and meta["checksum"] != content_checksum(tensors, meta):
        return "its content does not match its checksum"
    it, history = meta.get("iteration"), meta.get("history")
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        return "no valid iteration count"
    if not isinstance(meta.get("config"), dict) or not isinstance(history, list) \
            or not all(isinstance(h, dict) for h in history):
        return "no valid configuration or history"
    try:
        DistillConfig.from_dict(meta["config"])
    except Exception as e:   # a config no run could have had
        return f"invalid configuration: {e}"
    for name in ("images", "momentum"):
        t = tensors.get(name)
        if t is None and name == "momentum":
            continue
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
            return f"{name} are not float32 of shape {shape}"
        if not torch.isfinite(t).all():
            return f"{name} hold NaN or infinite values"
    return None


def _result_fields(cfg: DistillConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS}


# Presets whose default is multi-formation (their loss weights are in loss.PRESETS).
TILED_PRESETS = ("atom+", "atom+gaussian")


def preset_factor(method: str, image_size: int) -> int:
    """The multi-formation factor a preset uses when --factor is not given. atom+ and atom+gaussian store
    2x2 tiles of at least 16 px (README "Beyond ATOM": +10.6 points at IPC 1 on CIFAR-10); on 8 px digits
    the 4 px tiles lose 15 points, so smaller images keep whole images."""
    return 2 if method in TILED_PRESETS and image_size >= 32 else 1


def write_metrics(path: Path, history: list[dict]):
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))


def _check_run_dir(out: Path, overwrite: bool, clear: bool = False):
    """ConfigError unless `out` can be a new run folder: absent, empty (leftovers of a run killed before
    it wrote anything count as empty), or --overwrite. `clear` removes the old run's files then."""
    check_writable(out, folder=True)
    if out.is_dir() and any(not is_leftover(p) for p in out.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {out} already exists and is not empty; continue it with "
                              f"`--resume {out}`, choose another --out, or pass --overwrite")
        if clear:
            for name in ("checkpoint.safetensors", "synset.safetensors", "metrics.jsonl", "config.json"):
                (out / name).unlink(missing_ok=True)


def _acc_summary(results: dict) -> str:
    return ",".join(f"{m}:{r['mean'] * 100:.1f}" if r["mean"] is not None else f"{m}:diverged"
                    for m, r in results.items())
