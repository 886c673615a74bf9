"""Tests for atomdistill.augment (DSA)."""

import math

import pytest
import torch
import torch.nn.functional as F

from atomdistill.augment import DSA, FAMILIES, DSAParams
from atomdistill.errors import ConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 6, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=_gen(seed))


def _one_family(dsa: DSA, name: str, n: int, seed: int = 1) -> DSAParams:
    fam = torch.full((n,), dsa.families.index(name), dtype=torch.long)
    return dsa.sample(n, _gen(seed), families=fam)


def test_strategy_parsing() -> None:
    assert DSA().families == list(FAMILIES)
    assert DSA("crop_flip").families == ["crop", "flip"]
    assert DSA("none").families == []
    with pytest.raises(ConfigError, match="Unknown DSA augmentation"):
        DSA("crop_blur")
    with pytest.raises(ConfigError):
        DSA("crop_crop")


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_shape_and_gradient(name: str) -> None:
    dsa = DSA(name)
    x = _images(8).requires_grad_(True)
    y = dsa(x, _gen(3))
    assert y.shape == x.shape
    if name != "flip":  # flip draws "no flip" for some images; it is checked exactly below
        assert not torch.allclose(y, x.detach())
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_full_strategy_gradient_and_shape() -> None:
    dsa = DSA()
    x = _images(32).requires_grad_(True)
    y = dsa(x, _gen(0))
    assert y.shape == x.shape
    y.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0


def test_family_distribution_uniform() -> None:
    dsa = DSA()
    p = dsa.sample(6000, _gen(0))
    counts = torch.bincount(p.family, minlength=6).float()
    assert (counts / 6000 - 1 / 6).abs().max() < 0.03
    assert (p.brightness.min() >= -0.5) and (p.brightness.max() < 0.5)
    assert (p.saturation.min() >= 0) and (p.saturation.max() < 2)
    assert (p.contrast.min() >= 0.5) and (p.contrast.max() < 1.5)
    assert (p.scale.min() >= 1 / 1.2 - 1e-6) and (p.scale.max() <= 1.2 + 1e-6)
    assert p.rotate.abs().max() <= 15 / 180 * math.pi + 1e-6
    assert 0.45 < p.flip.float().mean() < 0.55


def test_reproducible_and_seed_dependent() -> None:
    dsa = DSA()
    x = _images(16)
    a = dsa(x, _gen(7))
    b = dsa(x, _gen(7))
    c = dsa(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_siamese_shared_draw_identical() -> None:
    dsa = DSA()
    img = _images(1)
    x = torch.cat([img, img])
    for seed in range(12):  # covers every family
        p = dsa.sample(1, _gen(seed))
        y = dsa.apply(x, p, draw_index=torch.tensor([0, 0]))
        assert torch.equal(y[0], y[1])


def test_siamese_real_and_synthetic_share_class_params() -> None:
    dsa = DSA()
    n_classes = 4
    real_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    syn_labels = torch.tensor([0, 1, 2, 3])
    params = dsa.sample(n_classes, _gen(5))
    pr, ps = params.index(real_labels), params.index(syn_labels)
    for f in ("family", "brightness", "saturation", "contrast", "translate", "cutout", "flip", "scale", "rotate"):
        for i, lab in enumerate(real_labels.tolist()):
            assert torch.equal(getattr(pr, f)[i], getattr(ps, f)[lab])
    # different classes get different draws
    assert len(set(params.brightness.tolist())) == n_classes
    assert len(set(params.rotate.tolist())) == n_classes
    # the same image in the real and the synthetic batch, same class -> same output
    img = _images(1, seed=9)
    real = torch.cat([_images(2, seed=10), img])  # img is class 1 here
    syn = torch.cat([_images(1, seed=11), img])
    yr = dsa.apply(real, params, torch.tensor([0, 0, 1]))
    ys = dsa.apply(syn, params, torch.tensor([0, 1]))
    assert torch.equal(yr[2], ys[1])


def test_batch_equals_per_image() -> None:
    dsa = DSA()
    x = _images(40, h=12, w=10)
    p = dsa.sample(40, _gen(2))
    assert set(p.family.tolist()) == set(range(6))
    y = dsa.apply(x, p)
    for i in range(40):
        yi = dsa.apply(x[i : i + 1], p.index(torch.tensor([i])))
        torch.testing.assert_close(y[i : i + 1], yi, rtol=1e-5, atol=1e-6)


def test_flip_exact() -> None:
    dsa = DSA("flip")
    x = _images(64)
    p = dsa.sample(64, _gen(0))
    assert p.flip.any() and (~p.flip).any()
    y = dsa.apply(x, p)
    assert torch.equal(y[p.flip], x[p.flip].flip(-1))
    assert torch.equal(y[~p.flip], x[~p.flip])


def test_crop_zero_translation_identity_and_reference_shift() -> None:
    dsa = DSA("crop")
    x = _images(3, h=16, w=16)
    p = _one_family(dsa, "crop", 3)
    s = int(16 * 0.125 + 0.5)  # 2 -> shifts in [-2, 2], 5 values
    p.translate[:] = (2 + 0.5) / 5  # middle bin -> shift 0
    assert torch.equal(dsa.apply(x, p), x)
    # shift (tx, ty) = (-2, +1) in the reference's pad/clamp/gather form
    p.translate[:, 0] = 0.0
    p.translate[:, 1] = (s + 1 + 0.5) / 5
    y = dsa.apply(x, p)
    xp = F.pad(x, [1, 1, 1, 1])
    gi = torch.clamp(torch.arange(16).view(16, 1) - 2 + 1, 0, 17)
    gj = torch.clamp(torch.arange(16).view(1, 16) + 1 + 1, 0, 17)
    ref = xp[:, :, gi, gj]
    assert torch.equal(y, ref)


def test_cutout_matches_reference_mask() -> None:
    dsa = DSA("cutout")
    x = _images(5, h=16, w=16) + 5.0  # nonzero everywhere so zeros mark the cutout
    p = _one_family(dsa, "cutout", 5)
    y = dsa.apply(x, p)
    size = 8
    span = 16 + (1 - size % 2)  # reference: randint(0, H + 1 - size % 2)
    for i in range(5):
        ox = min(int(p.cutout[i, 0] * span), span - 1)
        oy = min(int(p.cutout[i, 1] * span), span - 1)
        mask = torch.ones(16, 16)
        rows = torch.clamp(torch.arange(size) + ox - size // 2, 0, 15)
        cols = torch.clamp(torch.arange(size) + oy - size // 2, 0, 15)
        mask[rows.view(-1, 1), cols.view(1, -1)] = 0
        assert torch.equal(y[i], x[i] * mask)


def test_color_matches_formula() -> None:
    dsa = DSA("color")
    x = _images(4)
    p = dsa.sample(4, _gen(1))
    y = dsa.apply(x, p)
    b = p.brightness.view(-1, 1, 1, 1)
    s = p.saturation.view(-1, 1, 1, 1)
    c = p.contrast.view(-1, 1, 1, 1)
    r = x + b
    r = (r - r.mean(1, keepdim=True)) * s + r.mean(1, keepdim=True)
    r = (r - r.mean((1, 2, 3), keepdim=True)) * c + r.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, r)


@pytest.mark.parametrize("name", ["scale", "rotate"])
def test_affine_matches_reference_theta(name: str) -> None:
    dsa = DSA(name)
    x = _images(4)
    p = dsa.sample(4, _gen(4))
    y = dsa.apply(x, p)
    if name == "scale":
        theta = torch.tensor([[[sx, 0, 0], [0, sy, 0]] for sx, sy in p.scale.tolist()])
    else:
        theta = torch.tensor([[[math.cos(a), math.sin(-a), 0], [math.sin(a), math.cos(a), 0]] for a in p.rotate.tolist()])
    ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True), align_corners=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_identity_affine_is_identity() -> None:
    dsa = DSA("rotate")
    x = _images(2)
    p = dsa.sample(2, _gen(0))
    p.rotate.zero_()
    torch.testing.assert_close(dsa.apply(x, p), x, rtol=1e-5, atol=1e-5)


def test_dtype_and_errors() -> None:
    dsa = DSA()
    x = _images(4).double().requires_grad_(True)
    y = dsa(x, _gen(0))
    assert y.dtype == torch.float64
    y.sum().backward()
    with pytest.raises(ConfigError):
        dsa.apply(_images(4), dsa.sample(3, _gen(0)))
    with pytest.raises(ConfigError):
        DSA("crop").sample(2, _gen(0), families=torch.tensor([0, 1]))
    assert torch.equal(DSA("none")(x, _gen(0)), x)
