"""DSA: differentiable Siamese augmentation (docs/method.md, "DSA"), vectorised over the batch.

Follows DiffAugment/ParamDiffAug of VICO-UoE/DatasetCondensation (and MTT's copy, which passes
``align_corners=True`` to affine_grid/grid_sample; we do the same) in its single-family mode 'S':
one family per draw. Unlike the reference, which draws one family for a whole call, every draw here
carries its own family; pass ``families=`` to :meth:`DSA.sample` to force one family for all draws.

Siamese use: draw once, then apply the same :class:`DSAParams` to the real and the synthetic batch
with ``draw_index`` = class label, so every image of a class (real or synthetic) gets one transform.

Parameters are stored size-free (uniforms in [0, 1) for the integer shifts and cutout centres) and
turned into pixels at apply time, so one draw can serve any image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from atomdistill.errors import ConfigError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"

# ParamDiffAug constants.
BRIGHTNESS = 1.0  # add (U(0,1) - 0.5) * 1.0
SATURATION = 2.0  # scale chroma by U(0,1) * 2
CONTRAST = 0.5  # scale by U(0,1) + 0.5
CROP_RATIO = 0.125  # max shift, fraction of the side
CUTOUT_RATIO = 0.5  # side of the zeroed square, fraction of the side
FLIP_P = 0.5
SCALE_RATIO = 1.2  # each axis in U(1/1.2, 1.2)
ROTATE_DEG = 15.0  # U(-15, 15) degrees


@dataclass
class DSAParams:
    """One row per draw; all tensors share the first dimension."""

    family: Tensor  # int64 [n], index into DSA.families (-1: no augmentation)
    brightness: Tensor  # [n] additive offset, U(-0.5, 0.5)
    saturation: Tensor  # [n] chroma factor, U(0, 2)
    contrast: Tensor  # [n] contrast factor, U(0.5, 1.5)
    translate: Tensor  # [n, 2] (rows, cols) uniforms in [0, 1) -> integer shift in [-s, s] at apply time
    cutout: Tensor  # [n, 2] (rows, cols) uniforms in [0, 1) -> square centre at apply time
    flip: Tensor  # bool [n], horizontal flip
    scale: Tensor  # [n, 2] (sx, sy) in U(1/1.2, 1.2)
    rotate: Tensor  # [n] angle in radians, U(-15, 15) degrees

    def __len__(self) -> int:
        return self.family.shape[0]

    def index(self, idx: Tensor) -> "DSAParams":
        """Rows ``idx`` (e.g. map each image to its draw)."""
        idx = idx.to(self.family.device, torch.long)
        return DSAParams(**{f.name: getattr(self, f.name).index_select(0, idx) for f in fields(self)})

    def to(self, device: torch.device | str) -> "DSAParams":
        return DSAParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def parse_strategy(strategy: str) -> list[str]:
    """'crop_flip' -> ['crop', 'flip']; '' or 'none' -> []."""
    if strategy is None or strategy.strip().lower() in ("", "none"):
        return []
    names = strategy.strip().split("_")
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise ConfigError(
            f"Unknown DSA augmentation {', '.join(map(repr, bad))} in strategy {strategy!r}; "
            f"use '_'-joined names from {', '.join(FAMILIES)}."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"DSA strategy {strategy!r} repeats a family; list each family at most once.")
    return names


class DSA:
    """Differentiable Siamese augmentation with one family per draw (reference mode 'S')."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY) -> None:
        self.strategy = strategy
        self.families: list[str] = parse_strategy(strategy)

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r})"

    # ----------------------------------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator, families: Tensor | None = None) -> DSAParams:
        """``n`` independent draws on the CPU from ``generator`` only (same seed -> same draws)."""
        g = generator
        k = len(self.families)
        if families is not None:
            fam = torch.as_tensor(families, dtype=torch.long).reshape(-1).cpu()
            if fam.numel() != n:
                raise ConfigError(f"families has {fam.numel()} entries for {n} draws; pass one family index per draw.")
            if fam.numel() and (fam.min() < 0 or fam.max() >= k):
                raise ConfigError(f"family indices must be in [0, {k}) for strategy {self.strategy!r}; fix `families`.")
        elif k == 0:
            fam = torch.full((n,), -1, dtype=torch.long)
        else:
            fam = torch.randint(0, k, (n,), generator=g)
        # All parameters are drawn for every draw (whatever its family) so a draw's values do not
        # depend on which family the other draws got.
        u = torch.rand(n, 11, generator=g, dtype=torch.float32)
        lo = 1.0 / SCALE_RATIO
        return DSAParams(
            family=fam,
            brightness=(u[:, 0] - 0.5) * BRIGHTNESS,
            saturation=u[:, 1] * SATURATION,
            contrast=u[:, 2] + CONTRAST,
            translate=u[:, 3:5].clone(),
            cutout=u[:, 5:7].clone(),
            flip=u[:, 7] < FLIP_P,
            scale=u[:, 8:10] * (SCALE_RATIO - lo) + lo,
            rotate=(u[:, 10] - 0.5) * 2 * ROTATE_DEG / 180 * math.pi,
        )

    def __call__(self, x: Tensor, generator: torch.Generator, draw_index: Tensor | None = None) -> Tensor:
        """Sample the needed draws from ``generator`` and apply them (one draw per image by default)."""
        n = x.shape[0] if draw_index is None else (int(draw_index.max()) + 1 if draw_index.numel() else 0)
        return self.apply(x, self.sample(n, generator), draw_index)

    # ----------------------------------------------------------------------------------------- applying
    def apply(self, x: Tensor, params: DSAParams, draw_index: Tensor | None = None) -> Tensor:
        """Augment ``x`` [B, C, H, W]; image i uses draw ``draw_index[i]`` (default i). Differentiable in x."""
        if x.dim() != 4:
            raise ConfigError(f"DSA expects images shaped [B, C, H, W], got {tuple(x.shape)}; add the missing axes.")
        b = x.shape[0]
        if not self.families or b == 0:
            return x
        if draw_index is None:
            if len(params) != b:
                raise ConfigError(f"got {len(params)} DSA draws for {b} images; pass draw_index or one draw per image.")
            p = params.to(x.device)
        else:
            draw_index = draw_index.reshape(-1)
            if draw_index.numel() != b:
                raise ConfigError(f"draw_index has {draw_index.numel()} entries for {b} images; give one per image.")
            p = params.to(x.device).index(draw_index.to(x.device))

        # One family for the whole batch (every real chunk of a distillation iteration, every training
        # batch of the evaluation): transform the batch as it is, without the gather and scatter.
        only = self._single_family(p)
        if only is not None:
            return _FNS[only](x, p)
        # Per family: gather its images, transform them, then put every image back in place with one
        # gather by the inverse permutation (out-of-place, so autograd sees a plain index op).
        # The loop is over at most 6 families, never over images or draws.
        order, pieces = [], []
        for k, name in enumerate(self.families):
            idx = (p.family == k).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            pieces.append(_FNS[name](x.index_select(0, idx), p.index(idx)))
            order.append(idx)
        if not pieces:  # only draws with family -1 (should not happen with a non-empty strategy)
            return x
        order_t = torch.cat(order)
        if order_t.numel() != b:
            raise ConfigError("some DSA draws have a family outside this strategy; sample them with this DSA.")
        return torch.cat(pieces).index_select(0, torch.argsort(order_t))


    def _single_family(self, p: DSAParams) -> str | None:
        """The family's name if every draw of `p` has the same (valid) family, else None."""
        first = int(p.family[0])
        if 0 <= first < len(self.families) and bool((p.family == first).all()):
            return self.families[first]
        return None


# --------------------------------------------------------------------------------------------- families
def _col(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _color(x: Tensor, p: DSAParams) -> Tensor:
    # brightness, then saturation (around the per-pixel channel mean), then contrast (around the image mean).
    x = x + _col(p.brightness, x)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * _col(p.saturation, x) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * _col(p.contrast, x) + m


def _uniform_int(u: Tensor, count: int) -> Tensor:
    """Uniform in [0, 1) -> integer in [0, count); clamp guards float round-up at u -> 1."""
    return (u.float() * count).floor().long().clamp_(0, count - 1)


def _crop(x: Tensor, p: DSAParams) -> Tensor:
    # Integer shift with zero fill, exactly the reference (pad by 1, clamp the index into the pad, gather):
    # out[i, j] = x[i + tx, j + ty] inside the image, 0 outside.
    n, c, h, w = x.shape
    sh, sw = int(h * CROP_RATIO + 0.5), int(w * CROP_RATIO + 0.5)
    tx = _uniform_int(p.translate[:, 0], 2 * sh + 1) - sh
    ty = _uniform_int(p.translate[:, 1], 2 * sw + 1) - sw
    rows = torch.arange(h, device=x.device).view(1, h, 1) + tx.view(n, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + ty.view(n, 1, 1)
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    src = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)  # [n, h, w]
    out = x.reshape(n, c, h * w).gather(2, src.reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)
    return out * valid.unsqueeze(1).to(x.dtype)


def _cutout(x: Tensor, p: DSAParams) -> Tensor:
    # Reference: centre offset ~ randint(0, H + 1 - size % 2), square rows [offset - size//2, offset - size//2 + size),
    # clipped to the image.
    n, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    ox = _uniform_int(p.cutout[:, 0], h + (1 - ch % 2)) - ch // 2
    oy = _uniform_int(p.cutout[:, 1], w + (1 - cw % 2)) - cw // 2
    r = torch.arange(h, device=x.device).view(1, h)
    cc = torch.arange(w, device=x.device).view(1, w)
    in_r = (r >= ox.view(n, 1)) & (r < ox.view(n, 1) + ch)
    in_c = (cc >= oy.view(n, 1)) & (cc < oy.view(n, 1) + cw)
    keep = ~(in_r.unsqueeze(2) & in_c.unsqueeze(1))  # [n, h, w]
    return x * keep.unsqueeze(1).to(x.dtype)


def _flip(x: Tensor, p: DSAParams) -> Tensor:
    return torch.where(p.flip.view(-1, 1, 1, 1), x.flip(3), x)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: Tensor, p: DSAParams) -> Tensor:
    s = p.scale.to(x.dtype)
    z = torch.zeros_like(s[:, 0])
    theta = torch.stack([torch.stack([s[:, 0], z, z], 1), torch.stack([z, s[:, 1], z], 1)], 1)
    return _warp(x, theta)


def _rotate(x: Tensor, p: DSAParams) -> Tensor:
    a = p.rotate.to(x.dtype)
    cos, sin, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, z], 1), torch.stack([sin, cos, z], 1)], 1)
    return _warp(x, theta)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}
