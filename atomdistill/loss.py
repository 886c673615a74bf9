"""The matching loss of ATOM and the methods it extends (docs/method.md, "The loss").

One parameterised loss: spatial attention, channel attention and final-layer (linear-kernel
MMD) terms. DM, DataDAM, channel-only and ATOM differ only in their `LossWeights`.

Each term turns a network's outputs into one vector per image; the loss compares the class
means of those vectors between real and synthetic images. Real class means can therefore be
accumulated chunk by chunk without an autograd graph (`ClassMeans`), which keeps memory
bounded by the chunk, not by the real batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class LossWeights:
    """L = scale * (spatial * L_spatial + channel * L_channel + mmd * L_mmd)."""

    spatial: float = 1.0
    channel: float = 1.0
    mmd: float = 0.01
    power: float = 4.0
    scale: float = 100.0
    # 1-based indices of the intermediate blocks whose attention enters; None = all (1..L-1).
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("spatial", "channel", "mmd", "scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.power <= 0:
            raise ConfigError(f"attention power p must be > 0, got {self.power}")
        if self.spatial == self.channel == self.mmd == 0:
            raise ConfigError("all loss weights are zero: set at least one of spatial, channel, mmd")


PRESETS: dict[str, LossWeights] = {
    "atom": LossWeights(spatial=1.0, channel=2.0, mmd=0.01, power=4.0, scale=100.0),  # w_c: README ablation
    "datadam": LossWeights(spatial=1.0, channel=0.0, mmd=0.01, power=4.0, scale=100.0),
    "dm": LossWeights(spatial=0.0, channel=0.0, mmd=1.0, power=4.0, scale=1.0),
    "channel": LossWeights(spatial=0.0, channel=1.0, mmd=0.01, power=4.0, scale=100.0),
}


def loss_weights(method: str, **overrides) -> LossWeights:
    """The preset `method` with any non-None override (e.g. channel=0.5, layers=(1,))."""
    if method not in PRESETS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "layers" in overrides:
        overrides["layers"] = tuple(int(x) for x in overrides["layers"])
    return dataclasses.replace(PRESETS[method], **overrides)


def abs_pow(f: torch.Tensor, power: float) -> torch.Tensor:
    """|f|^p. For p = 2, 4, 8, ... repeated squaring (no abs needed): on CPU, torch 2.14's pow
    kernel is several times slower than two multiplications, and this runs on every activation."""
    p = float(power)
    if p >= 2 and p.is_integer() and int(p) & (int(p) - 1) == 0:
        out = f.square()
        # Without a graph (the real images) the later squarings reuse the first result's memory.
        in_place = not (torch.is_grad_enabled() and f.requires_grad)
        for _ in range(int(p).bit_length() - 2):
            out = out.square_() if in_place else out.square()
        return out
    return f.abs().pow(p)


class MatchingLoss:
    """Per-image summary vectors, their class means, and the weighted distance between means."""

    def __init__(self, weights: LossWeights):
        self.weights = weights
        self.term_weights = {
            name: w for name, w in
            (("spatial", weights.spatial), ("channel", weights.channel), ("mmd", weights.mmd)) if w > 0
        }

    def _layers(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.weights.layers is None:
            return activations
        bad = [i for i in self.weights.layers if not 1 <= i <= len(activations)]
        if bad:
            raise ConfigError(f"layers {bad} out of range: this network has intermediate blocks "
                              f"1..{len(activations)}")
        return [activations[i - 1] for i in self.weights.layers]

    def vectors(self, activations: list[torch.Tensor], embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """One [B, D] vector per active term. Layers are concatenated: ||[a;b]||^2 sums over layers.

        spatial: a_s(f) = sum_c |f_c|^p, flattened to [B, H*W] and L2-normalised per image;
        channel: a_c(f) = sum_{h,w} |f_{:,h,w}|^p, [B, C], L2-normalised per image;
        mmd: the final embedding (a linear-kernel MMD between class means)."""
        out = {}
        if "spatial" in self.term_weights or "channel" in self.term_weights:
            # |f|^p once per layer, shared by both attention maps.
            powered = [abs_pow(f, self.weights.power) for f in self._layers(activations)]
        if "spatial" in self.term_weights:
            out["spatial"] = torch.cat([F.normalize(a.sum(dim=1).flatten(1), dim=1) for a in powered], 1)
        if "channel" in self.term_weights:
            out["channel"] = torch.cat([F.normalize(a.flatten(2).sum(dim=2), dim=1) for a in powered], 1)
        if "mmd" in self.term_weights:
            out["mmd"] = embedding.flatten(1)
        return out

    def __call__(self, real_means: dict[str, torch.Tensor], syn_means: dict[str, torch.Tensor]):
        """Sum over classes and terms of weighted squared distances between class means [K, D].

        Returns (loss, per-term unweighted sums as detached tensors)."""
        terms = {name: (real_means[name] - syn_means[name]).pow(2).sum() for name in self.term_weights}
        loss = self.weights.scale * sum(self.term_weights[n] * t for n, t in terms.items())
        return loss, {n: t.detach() for n, t in terms.items()}


class ClassMeans:
    """Running per-class sums of summary vectors; add chunks, then read the means."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None

    def add(self, vectors: dict[str, torch.Tensor], labels: torch.Tensor) -> "ClassMeans":
        for name, v in vectors.items():
            if name not in self.sums:
                self.sums[name] = v.new_zeros(self.num_classes, v.shape[1])
            # Out of place so that gradients flow when the vectors carry a graph.
            self.sums[name] = self.sums[name].index_add(0, labels, v)
        ones = torch.ones_like(labels, dtype=torch.float32)
        counts = ones.new_zeros(self.num_classes).index_add(0, labels, ones)
        self.counts = counts if self.counts is None else self.counts + counts
        return self

    def means(self) -> dict[str, torch.Tensor]:
        if self.counts is None or (self.counts == 0).any():
            raise ValueError("every class needs at least one image before its mean is read")
        return {n: s / self.counts.to(s.dtype).unsqueeze(1) for n, s in self.sums.items()}
