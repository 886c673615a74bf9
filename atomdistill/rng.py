"""Deterministic randomness: every draw comes from a generator seeded by (seed, stream, indices...).

Nothing draws from a global stream, so a draw depends only on what it is for, never on what ran
before it: a resumed run equals an uninterrupted one, a process that owns some classes draws
what one process would for them, and a run of an evaluation gets the same draws whether it
trains alone, beside others or on another rank.

`Stream` names every purpose. The numbers are part of the results (changing one changes every
set or accuracy drawn from it), and they must differ: numpy's SeedSequence pads its input with
zeros, so (seed, 101) and (seed, 101, 0) give the same seed, and two purposes sharing a number
share draws.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


@enum.unique
class Stream(enum.IntEnum):
    """Purposes of random draws; the value is the second part of the seed."""

    NET = 1             # distillation: the random network of an iteration (seed, NET, iteration)
    REAL = 2            # distillation: the real batch of a class (seed, REAL, iteration, class)
    DSA = 3             # distillation: the Siamese augmentation of an iteration (seed, DSA, iteration)
    INIT = 4            # the initial images of a class (seed, INIT, class); also the random baseline
    POOL_PICK = 11      # --nets pool: the member that matches at an iteration (seed, POOL_PICK, iteration)
    POOL_BATCH = 12     # --nets pool: a training batch of that member (seed, POOL_BATCH, iteration, step)
    EVAL_NET = 101      # evaluation: the initial network of a run (seed, EVAL_NET, run)
    EVAL_SHUFFLE = 102  # evaluation: the batch order of an epoch (seed, EVAL_SHUFFLE, run, epoch)
    EVAL_DSA = 103      # evaluation: the augmentation of a step (seed, EVAL_DSA, run, step)
    EMBED_NET = 201     # herding/k-center: the embedding network (seed, EMBED_NET)
    EMBED_SHUFFLE = 202  # herding/k-center: its training order (seed, EMBED_SHUFFLE, epoch)


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, iteration, class...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by derived_seed(*parts)."""
    return torch.Generator().manual_seed(derived_seed(*parts))


@contextmanager
def seeded(*parts: int) -> Iterator[None]:
    """torch's global CPU stream seeded by derived_seed(*parts) inside the block, and restored after:
    for code that draws from it (a network's initial weights), whatever else runs around it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(*parts))
        yield
