"""The matching loss of ATOM and the methods it extends (docs/method.md, "The loss").

One parameterised loss: spatial attention, channel attention and final-layer (linear-kernel
MMD) terms. DM, DataDAM, channel-only and ATOM differ only in their `LossWeights`.

Each term turns a network's outputs into one vector per image; the loss compares the class
means of those vectors between real and synthetic images. Real class means can therefore be
accumulated chunk by chunk without an autograd graph (`ClassMeans`), which keeps memory
bounded by the chunk, not by the real batch.

`mmd_kernel="gaussian"` replaces the final-layer term's linear kernel by M3D's (Zhang et al.,
AAAI 2024) Gaussian-kernel MMD per class, which compares whole feature distributions, not only
their means: it needs the per-image vectors of that term, which `ClassMeans` then keeps.
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
    mmd_kernel: str = "linear"   # final-layer term: "linear" (distance of class means) or "gaussian" (M3D)

    def __post_init__(self):
        for name in ("spatial", "channel", "mmd", "scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.power <= 0:
            raise ConfigError(f"attention power p must be > 0, got {self.power}")
        if self.spatial == self.channel == self.mmd == 0:
            raise ConfigError("all loss weights are zero: set at least one of spatial, channel, mmd")
        if self.layers is not None and not self.layers:
            raise ConfigError("layers names no block: give at least one (e.g. layers=(1, 2), --layers 1,2), or "
                              "leave it unset for all; to drop the attention terms set spatial and channel to 0")
        if self.mmd_kernel not in MMD_KERNELS:
            raise ConfigError(f"unknown mmd kernel {self.mmd_kernel!r}; choose one of {', '.join(MMD_KERNELS)}")


MMD_KERNELS = ("linear", "gaussian")
# M3D's RBF: 5 kernels whose bandwidths are the data's mean squared pairwise distance times 2^-2 .. 2^2.
GAUSSIAN_BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The Gaussian MMD's gradient on the images is ~1/200 of the linear term's at the real init (P1,
# CIFAR-10, mean of 4 iterations: 1/215 at IPC 1, 1/200 at IPC 10), and with the same weight it did
# nothing (atom IPC 1: 17.4 %, what λ = 0 gives). Scaled by 200, λ weighs either kernel alike.
GAUSSIAN_MMD_SCALE = 200.0


_ATOM = LossWeights(spatial=1.0, channel=2.0, mmd=0.01, power=4.0, scale=100.0)   # w_c: README ablation
PRESETS: dict[str, LossWeights] = {
    "atom": _ATOM,
    "atom+": _ATOM,   # atom's loss; the preset also stores 2x2 tiles per image (distill.preset_factor)
    # atom+ with the Gaussian-kernel final-layer term: the best measured at IPC 10 (README "Beyond ATOM":
    # 52.02 against atom+'s 51.04 over 3 seeds), not at IPC 1 (37.36 against 37.97).
    "atom+gaussian": dataclasses.replace(_ATOM, mmd_kernel="gaussian"),
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


# On a CPU, activations are reduced in batch slices of about this many bytes, so that |f|^p of a
# slice is still in cache when the two sums read it: on the first ConvNet block of a 64-image
# chunk (64 x 128 x 32 x 32) 1.5-2x faster than whole-tensor passes (AMD EPYC, 1 thread).
ATTENTION_SLICE_BYTES = 2 << 20


def _batch_slices(f: torch.Tensor) -> list[slice]:
    if f.device.type != "cpu":
        return [slice(None)]
    rows = max(1, ATTENTION_SLICE_BYTES // max(1, f[0].numel() * f.element_size()))
    return [slice(i, i + rows) for i in range(0, len(f), rows)]


class _AttentionSums(torch.autograd.Function):
    """sum_c |f|^p and sum_{h,w} |f|^p in one forward and one backward pass per batch slice.

    Autograd through abs_pow and the two sums writes |f|^2, |f|^4 and four full-size gradients,
    and keeps |f|^2 alive for the backward; here the forward keeps only f, and the backward is
    d/df = p |f|^(p-2) f * (g_spatial + g_channel), each slice computed while it is in cache."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, power: float, spatial: bool, channel: bool):
        ctx.save_for_backward(f)
        ctx.power, ctx.spatial, ctx.channel = power, spatial, channel
        # Grad mode is off in forward, so abs_pow squares each slice in place.
        parts = [_plain_attention_sums(f[sl], power, spatial, channel) for sl in _batch_slices(f)]
        return tuple(torch.cat(p) if p[0].numel() else p[0] for p in zip(*parts))

    @staticmethod
    def backward(ctx, grad_spatial: torch.Tensor, grad_channel: torch.Tensor):
        f, = ctx.saved_tensors
        p = ctx.power
        _, c, h, w = f.shape
        grad = torch.empty_like(f)
        for sl in _batch_slices(f):
            x = f[sl]
            n = len(x)
            weight = x.new_zeros(())
            if ctx.spatial:
                weight = weight + p * grad_spatial[sl].view(n, 1, h, w)
            if ctx.channel:
                weight = weight + p * grad_channel[sl].view(n, c, 1, 1)
            if p >= 2:   # p |x|^(p-2) x: no abs or sign needed, and for p = 4 two multiplications
                d = x if p == 2 else abs_pow(x, p - 2).mul_(x)
            else:
                d = x.abs().pow(p - 1).mul_(x.sign())
            torch.mul(d, weight, out=grad[sl])
        return grad, None, None, None


def attention_sums(f: torch.Tensor, power: float, spatial: bool = True, channel: bool = True):
    """(sum_c |f|^p as [B, H*W] or empty, sum_{h,w} |f|^p as [B, C] or empty) of activations f [B, C, H, W]."""
    if torch.compiler.is_compiling():   # inductor fuses the plain expression itself
        return _plain_attention_sums(f, power, spatial, channel)
    return _AttentionSums.apply(f, power, spatial, channel)


def _plain_attention_sums(f: torch.Tensor, power: float, spatial: bool, channel: bool):
    """attention_sums as plain tensor expressions, over the whole of f."""
    a = abs_pow(f, power)
    empty = f.new_empty(0)
    return (a.sum(1).flatten(1) if spatial else empty), (a.flatten(2).sum(2) if channel else empty)


class MatchingLoss:
    """Per-image summary vectors, their class means, and the weighted distance between means."""

    def __init__(self, weights: LossWeights):
        self.weights = weights
        self.term_weights = {
            name: w for name, w in
            (("spatial", weights.spatial), ("channel", weights.channel), ("mmd", weights.mmd)) if w > 0
        }

    def check_layers(self, num_intermediate: int) -> None:
        """ConfigError unless every chosen layer is one of the network's intermediate blocks."""
        bad = [i for i in self.weights.layers or () if not 1 <= i <= num_intermediate]
        if bad:
            raise ConfigError(f"layers {bad} out of range: this network has intermediate blocks "
                              f"1..{num_intermediate}")

    def _layers(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.weights.layers is None:
            return activations
        self.check_layers(len(activations))
        return [activations[i - 1] for i in self.weights.layers]

    def vectors(self, activations: list[torch.Tensor], embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """One [B, D] vector per active term. Layers are concatenated: ||[a;b]||^2 sums over layers.

        spatial: a_s(f) = sum_c |f_c|^p, flattened to [B, H*W] and L2-normalised per image;
        channel: a_c(f) = sum_{h,w} |f_{:,h,w}|^p, [B, C], L2-normalised per image;
        mmd: the final embedding (a linear-kernel MMD between class means)."""
        out = {}
        spatial, channel = "spatial" in self.term_weights, "channel" in self.term_weights
        if spatial or channel:
            # |f|^p once per layer, shared by both attention maps.
            sums = [attention_sums(f, self.weights.power, spatial, channel) for f in self._layers(activations)]
        if spatial:
            out["spatial"] = torch.cat([F.normalize(s, dim=1) for s, _ in sums], 1)
        if channel:
            out["channel"] = torch.cat([F.normalize(c, dim=1) for _, c in sums], 1)
        if "mmd" in self.term_weights:
            out["mmd"] = embedding.flatten(1)
        return out

    @property
    def sample_terms(self) -> tuple[str, ...]:
        """Terms compared through their per-image vectors (not only class means): keep them in ClassMeans."""
        return ("mmd",) if self.weights.mmd_kernel == "gaussian" and "mmd" in self.term_weights else ()

    def __call__(self, real_means: dict[str, torch.Tensor], syn_means: dict[str, torch.Tensor]):
        """Sum over classes and terms of weighted squared distances between class means [K, D].

        Returns (loss, per-term unweighted sums as detached tensors)."""
        if self.sample_terms:
            raise ConfigError("the gaussian mmd kernel needs the per-image vectors: call compare(real, syn) "
                              "with ClassMeans that keep them")
        terms = {name: (real_means[name] - syn_means[name]).pow(2).sum() for name in self.term_weights}
        return self._weighted(terms)

    def compare(self, real: "ClassMeans", syn: "ClassMeans"):
        """The loss from accumulated statistics: class means, and per-class samples for sample terms."""
        if not self.sample_terms:
            return self(real.means(), syn.means())
        real_means, syn_means = real.means(), syn.means()
        terms = {}
        for name in self.term_weights:
            if name in self.sample_terms:
                terms[name] = GAUSSIAN_MMD_SCALE * sum(gaussian_mmd(x, y)
                                                       for x, y in zip(real.by_class(name), syn.by_class(name)))
            else:
                terms[name] = (real_means[name] - syn_means[name]).pow(2).sum()
        return self._weighted(terms)

    def _weighted(self, terms: dict[str, torch.Tensor]):
        loss = self.weights.scale * sum(self.term_weights[n] * t for n, t in terms.items())
        return loss, {n: t.detach() for n, t in terms.items()}


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between samples x [n, D] and y [m, D] under M3D's sum of Gaussian kernels.

    k(a, b) = sum_j exp(-||a - b||^2 / (beta * m_j)), m_j in GAUSSIAN_BANDWIDTH_MULTIPLIERS, with
    beta the mean squared distance between distinct points of x and y pooled (no gradient flows
    through it, as in M3D's code); MMD^2 = mean k(x, x') - 2 mean k(x, y) + mean k(y, y')."""
    z = torch.cat([x, y]).flatten(1)
    sq = z.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    n = len(z)
    beta = d2.detach().sum() / max(n * n - n, 1)
    beta = beta.clamp_min(torch.finfo(d2.dtype).tiny)   # all points equal: every kernel is 1, MMD 0
    mult = torch.tensor(GAUSSIAN_BANDWIDTH_MULTIPLIERS, dtype=d2.dtype, device=d2.device)
    k = torch.exp(-d2[None] / (beta * mult)[:, None, None]).sum(0)
    nx = len(x)
    return k[:nx, :nx].mean() - 2 * k[:nx, nx:].mean() + k[nx:, nx:].mean()


class ClassMeans:
    """Running per-class sums of summary vectors; add chunks, then read the means.

    `keep`: terms whose per-image vectors are kept as well (`by_class`), for kernel MMDs."""

    def __init__(self, num_classes: int, keep: tuple[str, ...] = ()):
        self.num_classes = num_classes
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None
        self.kept: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in keep}

    def add(self, vectors: dict[str, torch.Tensor], labels: torch.Tensor) -> "ClassMeans":
        for name in self.kept:
            self.kept[name].append((vectors[name], labels))
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

    def by_class(self, name: str) -> list[torch.Tensor]:
        """The kept vectors of term `name`, one [n_k, D] tensor per class."""
        v = torch.cat([x for x, _ in self.kept[name]])
        labels = torch.cat([y for _, y in self.kept[name]])
        return [v[labels == k] for k in range(self.num_classes)]
