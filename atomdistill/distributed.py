"""Scale out with torch.distributed: class-sharded distillation, evaluation runs spread over processes.

Started by ``torchrun`` (which sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the
command line joins a process group: gloo on a CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``.

Distillation: the classes are split into contiguous blocks, rank r taking classes
``[r*K//W + min(r, K%W) ...)`` (the first ``K % W`` ranks one class more), so that concatenating the
blocks in rank order is the global class order. Each rank loads only its classes
(``load_dataset(classes=...)``) and owns their synthetic images. With instance norm the matching
loss is a sum over classes of terms that involve only that class's images, and every random draw
comes from (seed, iteration, class), so each rank computes the gradients a single process computes
for those classes: no gradient all-reduce is needed. They are the same bits only when every rank's
inputs are: a ZCA fitted across ranks, or a folder dataset's mean and std pooled over ranks, differs
from a single process's in its last bits, and that grows over the iterations into a slightly
different set (docs/distributed.md). Per iteration one scalar all-reduce
sums the loss (for the log, and so that a NaN on any rank stops every rank at the same step).
Batch norm mixes the classes of a batch in its statistics, so sharding would change the result:
it is refused. ZCA needs the whole training split: each rank sums its images and their centred
outer products in float64, and two all-reduces give every rank the single-process moments
(``ZCA.from_moments``).

Files: only rank 0 writes (config, checkpoints, set, metrics, grid). A checkpoint is gathered on
rank 0 in global class order (images and momentum), so it is the same file a single process
writes, and a run resumes with any number of processes: each rank takes its rows of it.

Failures: a collective that fails or outlasts ``ATOMDISTILL_DIST_TIMEOUT`` seconds (default 300),
and a rendezvous that does not complete in that time, raise ``AtomDistillError("rank k failed:
...")``; the command line prints it and exits 2. Errors one rank finds in its own inputs (an IPC
larger than one of its classes, an existing --out) are exchanged, so every rank stops with the
same message instead of waiting for the others. Checkpoints are written atomically, so the last
one survives any of this.
"""
from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import errors
from .data import ImageDataset, count_classes, load_dataset
from .distill import DistillConfig, Distiller, RunState, _check_run_dir, check_ipc, has_batch_norm, load_run_config
from .errors import AtomDistillError, ConfigError, DatasetError
from .evaluate import EvalProtocol, check_compatible, summarise_runs, train_and_test, training_targets
from .models import build_model
from .runtime import resolve_device
from .synset import SyntheticSet
from .zca import ZCA

ENV_TIMEOUT = "ATOMDISTILL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0

__all__ = ["launched", "process_group", "ProcessGroup", "LocalGroup", "ShardedDistiller", "shard_classes",
           "count_classes", "check_shardable", "distributed_zca", "ENV_TIMEOUT"]


# ---- launch -------------------------------------------------------------------------------
def launched() -> bool:
    """True in a process started by torchrun (or anything setting RANK/WORLD_SIZE) with 2+ processes."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{ENV_TIMEOUT}={text!r} is not a positive number of seconds; set it to e.g. 300")
    return value


@contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator["ProcessGroup | None"]:
    """Join the torchrun process group for the duration of the block; None when not under torchrun."""
    if not launched():
        yield None
        return
    group = ProcessGroup.from_env(device)
    try:
        yield group
    except BaseException:
        group.close(synchronize=False)   # a peer may be gone: waiting for it would only delay the error
        raise
    group.close(synchronize=True)


class ProcessGroup:
    """This process's place in the group, and the few collectives the package needs, made fail-safe."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, timeout: float):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.timeout = device, timeout

    @classmethod
    def from_env(cls, device: str | torch.device = "auto") -> "ProcessGroup":
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK are missing or not integers ({e}); start the "
                              "processes with torchrun") from None
        dev = resolve_device(device)
        if dev.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                                  "start at most one process per GPU (--nproc_per_node)")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        timeout = timeout_seconds()
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            try:
                dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                        timeout=timedelta(seconds=timeout))
            except Exception as e:   # rendezvous timeout, refused connection, bad address ...
                raise AtomDistillError(
                    f"rank {rank} failed: could not join the {world} processes at {where} within "
                    f"{timeout:g} s ({_first_line(e)}); check that all processes were started with the same "
                    f"rendezvous endpoint and can reach it, or raise {ENV_TIMEOUT}") from e
        return cls(rank, world, local, dev, timeout)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self, synchronize: bool = True):
        """Leave the group. With `synchronize`, first wait until every rank got here: a rank that tore
        its gloo connections down while a peer was still finishing its last collective was seen to abort
        at exit now and then (SIGABRT, "terminate called without an active exception")."""
        if not dist.is_initialized():
            return
        if synchronize:
            try:
                dist.barrier()
            except Exception:   # a peer died after the last result was made: its own message says why
                pass
        try:
            dist.destroy_process_group()
        except Exception:   # a broken group: the process is ending anyway
            pass

    # ---- fail-safe collectives --------------------------------------------------------------
    @contextmanager
    def collective(self, what: str):
        """Turn a failed or timed-out collective into one clear AtomDistillError."""
        try:
            yield
        except AtomDistillError:
            raise
        except Exception as e:
            raise AtomDistillError(
                f"rank {self.rank} failed: {what} did not complete within {self.timeout:g} s "
                f"({_first_line(e)}); another process has probably stopped (see its message) or hangs. "
                f"Checkpoints are written whole: continue a run from its last one with --resume RUN_DIR, "
                f"with any number of processes") from e

    def all_gather_object(self, obj: Any, what: str = "exchanging metadata") -> list:
        out = [None] * self.world_size
        with self.collective(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str = "broadcasting from rank 0") -> Any:
        box = [obj if self.main else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor, what: str = "summing over processes") -> torch.Tensor:
        """Sum of `t` over the ranks (a new tensor on t's device)."""
        buf = t.detach().to(self.device, copy=True)
        with self.collective(what):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def all_gather_rows(self, t: torch.Tensor, what: str = "gathering tensors") -> torch.Tensor:
        """Concatenation over ranks, in rank order, of every rank's `t` (row counts may differ); on the CPU."""
        t = t.detach().to(self.device).contiguous()
        with self.collective(what):
            n = torch.tensor([t.shape[0]], device=self.device)
            sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
            dist.all_gather(sizes, n)
            sizes = [int(s) for s in sizes]
            padded = t.new_zeros((max(sizes), *t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()

    def on_main(self, fn: Callable, *args, **kwargs) -> Any:
        """Run `fn` on rank 0 only (file reads and writes); every rank gets its result or its error."""
        outcome, own = None, None
        if self.main:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except Exception as e:
                own, outcome = e, _describe(e)
        outcome = self.broadcast_object(outcome, "waiting for rank 0")
        if outcome[0] == "ok":
            return outcome[1]
        error = own if own is not None else _rebuild(0, outcome)
        error.every_rank = True   # the whole group stops here: the command line lets rank 0 say it
        raise error

    def agree(self, fn: Callable, *args, **kwargs) -> Any:
        """Run `fn` on every rank; if it fails on any, every rank raises (the lowest failing rank's error)."""
        result, own, outcome = None, None, ("ok",)
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            own, outcome = e, _describe(e)
        outcomes = self.all_gather_object(outcome, "checking the inputs of every process")
        failed = [(rank, o) for rank, o in enumerate(outcomes) if o[0] != "ok"]
        if failed:
            error = own if own is not None else _rebuild(*failed[0])
            error.every_rank = True   # the whole group stops here: the command line lets rank 0 say it
            raise error
        return result

    # ---- the package's operations, across the group ------------------------------------------
    def distill(self, dataset: str, ipc: int = 10, method: str = "atom", *, out: str | Path | None = None,
                resume: bool = False, overwrite: bool = False, progress: bool = True, **options) -> SyntheticSet:
        """Like atomdistill.distill (dataset by name), class-sharded over the group; every rank returns the set."""
        options.pop("dataset", None)
        config = self.agree(lambda: DistillConfig(dataset=dataset, ipc=ipc, method=method, **options))
        return ShardedDistiller(config, self, out=out, resume=resume, overwrite=overwrite, progress=progress).run()

    def resume(self, run_dir: str | Path, progress: bool = True, **overrides) -> SyntheticSet:
        """Like atomdistill.resume, with any number of processes (rank 0 reads the folder)."""
        config = self.on_main(load_run_config, run_dir, **overrides)
        return ShardedDistiller(config, self, out=run_dir, resume=True, progress=progress).run()

    def evaluate(self, synset: SyntheticSet, dataset: ImageDataset, models: Sequence[str] | str = ("convnet",),
                 protocol: EvalProtocol | None = None, *, device=None, progress: bool = True, batched="auto",
                 test=None, max_parallel: int | None = None, **fields) -> dict:
        """Like atomdistill.evaluate (the group's device replaces `device`), with the (model, run)
        trainings spread over the ranks; same results."""
        protocol = EvalProtocol.of(protocol, **fields)
        self.agree(check_compatible, synset, dataset)
        if test is None:
            test = (synset.prepare_real(dataset.test_images), dataset.test_labels)
        return self.evaluate_runs(synset.decoded()[0], training_targets(synset), test[0], test[1], models, protocol,
                                  num_classes=synset.num_classes, progress=progress, batched=batched,
                                  max_parallel=max_parallel)

    def evaluate_runs(self, images, labels, test_images, test_labels, models: Sequence[str] | str,
                      protocol: EvalProtocol, *, num_classes: int, progress: bool = True, **options) -> dict:
        """The jobs (model, run) are dealt round-robin over the ranks; each trains its share with
        train_and_test(run_ids=...), which gives every run the draws it gets in one process."""
        models = [models] if isinstance(models, str) else list(models)
        runs = protocol.runs
        jobs = [(m, r) for m in models for r in range(runs)][self.rank::self.world_size]
        mine = {}
        for m in models:
            ids = [r for mm, r in jobs if mm == m]
            if not ids:
                continue
            t0 = time.perf_counter()
            accs = _guarded(train_and_test, images, labels, test_images, test_labels, m, protocol,
                            device=self.device, progress=progress and self.main, num_classes=num_classes,
                            run_ids=ids, mark_diverged=True, **options)
            mine[m] = (ids, accs, time.perf_counter() - t0)
        # An error in one rank's training reaches the others here, instead of as a hang.
        gathered = self.agree(lambda: _raise_if_error(mine))
        shares = self.all_gather_object(gathered, "gathering evaluation results")
        results = {}
        for m in models:
            accs = [0.0] * runs
            seconds = 0.0
            for share in shares:
                if m in share:
                    ids, a, s = share[m]
                    for r, acc in zip(ids, a):
                        accs[r] = acc
                    seconds = max(seconds, s)   # wall time: the ranks train their shares side by side
            results[m] = summarise_runs(accs, seconds)
        return results

    def deal(self, items: Sequence, fn: Callable[[Any], dict], what: str = "gathering results"
             ) -> Iterator[tuple[list, dict]]:
        """Apply `fn` (item -> dict) to every item, one item per rank per round, in item order; yield
        each round's items and the union of its results, on every rank. A failure on any rank
        raises on every rank at the end of its round, instead of leaving the others waiting."""
        for start in range(0, len(items), self.world_size):
            round_ = list(items[start:start + self.world_size])
            mine = round_[self.rank] if self.rank < len(round_) else None
            own = self.agree(lambda: fn(mine) if self.rank < len(round_) else {})
            merged = {}
            for share in self.all_gather_object(own, what):
                merged.update(share)
            yield round_, merged


class LocalGroup:
    """The group of one process: the ProcessGroup operations the package uses, done here and now
    (so code written for a group runs unchanged without torchrun)."""

    rank, world_size, local_rank, main = 0, 1, 0, True

    def __init__(self, device: str | torch.device = "auto"):
        self.device = resolve_device(device)

    def on_main(self, fn: Callable, *args, **kwargs) -> Any:
        return fn(*args, **kwargs)

    agree = on_main

    def deal(self, items: Sequence, fn: Callable[[Any], dict], what: str = "") -> Iterator[tuple[list, dict]]:
        for item in items:
            yield [item], fn(item)


def _guarded(fn, *args, **kwargs):
    """Call fn; return the exception instead of raising it (raised after the ranks agree)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return e


def _raise_if_error(mine: dict) -> dict:
    for ids, accs, _ in mine.values():
        if isinstance(accs, Exception):
            raise accs
    return mine


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _describe(e: Exception) -> tuple:
    if isinstance(e, AtomDistillError):
        return ("error", type(e).__name__, str(e))
    return ("crash", _first_line(e))


def _rebuild(rank: int, outcome: tuple) -> AtomDistillError:
    if outcome[0] == "error":
        cls = getattr(errors, outcome[1], AtomDistillError)
        return cls(outcome[2])   # the user's own error, word for word as the rank that found it says it
    return AtomDistillError(f"rank {rank} failed: {outcome[1]}")


# ---- sharding -----------------------------------------------------------------------------
def shard_classes(num_classes: int, world_size: int, rank: int) -> list[int]:
    """Rank `rank`'s contiguous block of class ids; blocks in rank order are 0..K-1."""
    if world_size > num_classes:
        raise ConfigError(f"{world_size} processes but only {num_classes} classes: every process needs at least "
                          f"one class; start at most {num_classes} processes")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def check_shardable(net: str, channels: int, num_classes: int, image_size: int, world_size: int):
    """ConfigError if the distillation network has batch norm and the run has several processes."""
    if world_size <= 1:
        return
    model = build_model(net, channels, num_classes, image_size)
    if has_batch_norm(model):
        raise ConfigError(
            f"--net {net} has batch norm, whose statistics mix the classes of a batch, so a run split by class "
            f"over {world_size} processes would not match a single-process run; distil with an instance-norm "
            "network (e.g. --net convnet) or in one process")


def distributed_zca(train_images: torch.Tensor, group: ProcessGroup, eps: float = 0.1) -> ZCA:
    """The ZCA of the union of every rank's training images: what ZCA.fit of all of them gives."""
    n = group.all_reduce_sum(torch.tensor([float(train_images.shape[0])], dtype=torch.float64),
                             "summing image counts for ZCA")
    n = int(n.item())
    mean = group.all_reduce_sum(ZCA.sum(train_images), "summing images for ZCA") / n
    scatter = group.all_reduce_sum(ZCA.scatter(train_images, mean), "summing the ZCA covariance")
    # all_reduce leaves the same bits on every rank, so every rank decomposes the same matrix.
    return ZCA.from_moments(mean, scatter, n, eps)


def _global_normalisation(data: ImageDataset, group: ProcessGroup) -> ImageDataset:
    """Make every rank's data normalised with the whole training split's mean/std.

    Datasets with fixed statistics (CIFAR, TinyImageNet, digits) are already; folder datasets
    compute them from the classes loaded, so each rank renormalises with the pooled statistics."""
    n = data.train_images.shape[0] * data.image_size ** 2
    stats = group.all_gather_object((data.channels, data.image_size, tuple(data.mean), tuple(data.std), n))
    if len({(c, s) for c, s, *_ in stats}) > 1:
        raise DatasetError(f"the processes' classes load as different image shapes {[s[:2] for s in stats]} "
                           "(e.g. some class folders hold only grayscale images); convert the images to one "
                           "mode, or distil in one process")
    if all(s[2:4] == stats[0][2:4] for s in stats):
        return data
    m, sd, cnt = (np.array([s[i] for s in stats], dtype=np.float64) for i in (2, 3, 4))
    cnt = cnt[:, None]
    mean = (m * cnt).sum(0) / cnt.sum()
    std = np.sqrt(((sd ** 2 + m ** 2) * cnt).sum(0) / cnt.sum() - mean ** 2)
    std = np.where(std > 1e-8, std, 1.0)
    shape = (1, -1, 1, 1)
    old_m, old_s = torch.tensor(data.mean).view(shape), torch.tensor(data.std).view(shape)
    new_m, new_s = torch.tensor(mean, dtype=torch.float32).view(shape), torch.tensor(std, dtype=torch.float32).view(shape)

    def renorm(x):
        return ((x * old_s + old_m) - new_m) / new_s

    return dataclasses.replace(data, train_images=renorm(data.train_images), test_images=renorm(data.test_images),
                               mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


# ---- the sharded run ----------------------------------------------------------------------
class ShardedDistiller(Distiller):
    """A Distiller over this rank's block of classes, whose files and results cover all classes."""

    def __init__(self, config: DistillConfig, group: ProcessGroup, *, out: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True):
        self.group = group
        config = dataclasses.replace(config, device=str(group.device))

        def load_shard():
            total = count_classes(config.dataset, config.data_root)
            classes = shard_classes(total, group.world_size, group.rank)
            data = load_dataset(config.dataset, config.data_root, image_size=config.image_size, classes=classes)
            resolved = config.resolved(data.image_size)
            check_shardable(resolved.net, data.channels, total, data.image_size, group.world_size)
            check_ipc(data, config.ipc)
            return total, classes, data

        total, classes, data = group.agree(load_shard)
        data = _global_normalisation(data, group)
        self.class_names_total = [n for names in group.all_gather_object(list(data.class_names)) for n in names]
        zca = distributed_zca(data.train_images, group) if config.resolved(data.image_size).zca else None
        super().__init__(config, data=data, out=out, resume=resume, overwrite=overwrite,
                         progress=progress and group.main, classes=classes, num_classes_total=total, zca=zca)
        # Rows of this rank's images in a global (K * ipc) tensor.
        ipc = self.config.ipc
        self._rows = (torch.tensor(classes)[:, None] * ipc + torch.arange(ipc)).flatten()

    # ---- the seams of Distiller ---------------------------------------------------------------
    def _check_out(self, overwrite: bool):
        self.group.on_main(_check_run_dir, self.out, overwrite)

    def _claim_out(self):   # rank 0 writes, so rank 0 holds the lock (every rank hears a refusal)
        self.group.on_main(super()._claim_out)

    def _write_config(self):
        self.group.on_main(super()._write_config)

    def _reduce_loss(self, loss: torch.Tensor, terms: dict) -> tuple[torch.Tensor, dict]:
        # Every rank holds the same term names in the same order (same loss weights).
        names = list(terms)
        local = torch.stack([loss.detach(), *(terms[n].detach() for n in names)]).float()
        total = self.group.all_reduce_sum(local, "summing the loss")
        return total[0], {n: total[i + 1] for i, n in enumerate(names)}

    def _save_checkpoint(self, state: RunState):
        images = self.group.all_gather_rows(state.images.float(), "gathering the checkpoint")
        has_momentum = state.momentum is not None
        momentum = (self.group.all_gather_rows(state.momentum.float(), "gathering the checkpoint")
                    if has_momentum else None)
        self.group.on_main(super()._save_checkpoint, RunState(state.iteration, images, momentum, state.history))

    def _load_checkpoint(self) -> RunState | None:
        state = self.group.on_main(super()._load_checkpoint)
        if state is None:
            return None
        expected = self.num_classes_total * self.config.ipc
        if state.images.shape[0] != expected:
            raise ConfigError(f"the checkpoint in {self.out} holds {state.images.shape[0]} images, not "
                              f"{self.num_classes_total} classes x {self.config.ipc}; resume with the options "
                              "it was made with")
        return RunState(state.iteration, state.images[self._rows].clone(),
                        None if state.momentum is None else state.momentum[self._rows].clone(), state.history)

    def synthetic_set(self, syn: torch.Tensor, state_iteration: int | None = None, history=None) -> SyntheticSet:
        local = super().synthetic_set(syn, state_iteration, history)
        images = self.group.all_gather_rows(syn.detach().float(), "gathering the synthetic images")
        k = self.num_classes_total
        return dataclasses.replace(
            local, images=images, labels=torch.arange(k).repeat_interleave(self.config.ipc),
            class_names=list(self.class_names_total),
            info={**local.info, "classes": list(range(k)), "processes": self.group.world_size})

    def _finish(self, synset: SyntheticSet, history: list[dict]):
        self.group.on_main(super()._finish, synset, history)

    def evaluate(self, syn: torch.Tensor) -> dict:
        cfg = self.config
        synset = self.synthetic_set(syn)
        if self._eval_test is None:   # every rank needs the whole test split: gather it once
            test = synset.prepare_real(self.data.test_images)
            labels = torch.tensor(self.global_ids)[self.data.test_labels]
            self._eval_test = (self.group.all_gather_rows(test, "gathering the test split"),
                               self.group.all_gather_rows(labels, "gathering the test split"))
        results = self.group.evaluate_runs(*synset.decoded(), *self._eval_test, cfg.eval_models,
                                           cfg.eval_protocol(), num_classes=self.num_classes_total, progress=False)
        return {m: {"mean": r["mean"], "std": r["std"], "diverged": r["diverged"]} for m, r in results.items()}
