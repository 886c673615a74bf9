"""Multi-formation (IDC, Kim et al., ICML 2022): several training images per stored image.

A stored n x n image holds factor x factor tiles of n/factor pixels. Decoding cuts the tiles
out and upsamples each back to n x n (bilinear, ``align_corners=False``: IDC's
``nn.Upsample(mode='bilinear')``), so a set of N stored images trains, and is matched, as
N * factor^2 images, each with the label of the image it came from. Storage, and so the IPC a
set is compared at, stays N.

Order: the tiles of stored image i are decoded images i*f^2 .. (i+1)*f^2 - 1, row by row
(IDC concatenates tile-major; only the order differs), so a class-sorted set decodes to a
class-sorted set. Factor 1 is the identity: the images are returned untouched.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .errors import ConfigError


def check_factor(factor: int, image_size: int | None = None) -> int:
    """`factor` as an int, or a ConfigError if it is not a positive divisor of the image size."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
        raise ConfigError(f"--factor must be a positive integer (1: whole images, 2: 2x2 tiles per image), got {factor!r}")
    factor = int(factor)
    if image_size is not None and image_size % factor:
        raise ConfigError(f"--factor {factor} does not divide the {image_size} px image side into equal tiles; "
                          f"use a factor that divides {image_size} (e.g. 2)")
    return factor


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, C, n, n] stored images -> [N * factor^2, C, n, n] training images (differentiable)."""
    if factor == 1:
        return images
    n, c, h, w = images.shape
    check_factor(factor, h)
    check_factor(factor, w)
    s, t = h // factor, w // factor
    tiles = images.reshape(n, c, factor, s, factor, t).permute(0, 2, 4, 1, 3, 5).reshape(n * factor ** 2, c, s, t)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


def decode_labels(labels: torch.Tensor, factor: int) -> torch.Tensor:
    """The label of every decoded image: each stored image's label, factor^2 times."""
    return labels if factor == 1 else labels.repeat_interleave(factor ** 2)


def encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N * factor^2, C, n, n] full-size images -> [N, C, n, n] stored images whose tiles hold them.

    Each image is downsampled to the tile size (bilinear, ``align_corners=False``, as IDM's
    ``downscale``; for factor 2 that is the mean of each 2x2 block) and image i*f^2 + k goes to
    tile k of stored image i: decode(encode(x)) is x at tile resolution."""
    if factor == 1:
        return images
    m, c, h, w = images.shape
    check_factor(factor, h)
    check_factor(factor, w)
    if m % factor ** 2:
        raise ConfigError(f"encoding needs a multiple of {factor ** 2} images, got {m}")
    s, t = h // factor, w // factor
    small = F.interpolate(images, size=(s, t), mode="bilinear", align_corners=False)
    return small.reshape(m // factor ** 2, factor, factor, c, s, t).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, h, w)
