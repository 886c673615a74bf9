"""--mmd-kernel gaussian: M3D's Gaussian-kernel MMD as the final-layer term, for any preset."""
import math

import pytest
import torch

from atomdistill import distill
from atomdistill.distill import DistillConfig
from atomdistill.errors import ConfigError
from atomdistill.loss import (GAUSSIAN_BANDWIDTH_MULTIPLIERS, GAUSSIAN_MMD_SCALE, PRESETS, ClassMeans, MatchingLoss, gaussian_mmd,
                              loss_weights)


def _direct_mmd(x, y):
    """Biased MMD^2 with M3D's kernel, by loops over pairs (float64)."""
    z = [v.double() for v in torch.cat([x, y])]
    n = len(z)
    d2 = [[float(((a - b) ** 2).sum()) for b in z] for a in z]
    beta = sum(d2[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)

    def k(i, j):
        return sum(math.exp(-d2[i][j] / (beta * m)) for m in GAUSSIAN_BANDWIDTH_MULTIPLIERS)

    nx = len(x)
    xs, ys = range(nx), range(nx, n)
    mean = lambda a, b: sum(k(i, j) for i in a for j in b) / (len(a) * len(b))
    return mean(xs, xs) - 2 * mean(xs, ys) + mean(ys, ys)


def test_gaussian_mmd_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), 0.5 + torch.randn(3, 5, generator=g)
    assert gaussian_mmd(x, y).item() == pytest.approx(_direct_mmd(x, y), rel=1e-4, abs=1e-6)


def test_gaussian_mmd_is_zero_for_identical_sets_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g)
    assert abs(gaussian_mmd(x, x.clone()).item()) < 1e-5
    assert abs(gaussian_mmd(x, x[torch.randperm(6, generator=g)]).item()) < 1e-5   # a set, not a sequence
    assert gaussian_mmd(x, x + 0.3).item() > 1e-3
    assert gaussian_mmd(x, x[:3]).item() > 1e-3   # same points, other distribution
    assert gaussian_mmd(torch.ones(2, 3), torch.ones(4, 3)).item() == 0.0   # no spread at all: no NaN


def test_gaussian_kernel_is_a_loss_option_of_every_preset_and_sums_over_classes():
    g = torch.Generator().manual_seed(2)
    acts = [torch.randn(10, 4, 6, 6, generator=g)]
    emb, y = torch.randn(10, 6, generator=g), torch.tensor([0, 1] * 5)
    syn_acts = [torch.randn(4, 4, 6, 6, generator=g)]
    syn_emb, syn_y = torch.randn(4, 6, generator=g, requires_grad=True), torch.tensor([0, 1, 0, 1])
    for method in PRESETS:
        linear = MatchingLoss(loss_weights(method))
        gauss = MatchingLoss(loss_weights(method, mmd_kernel="gaussian"))
        assert gauss.sample_terms == ("mmd",)
        stats = []
        for fn in (linear, gauss):
            real = ClassMeans(2, fn.sample_terms).add(fn.vectors(acts, emb), y)
            syn = ClassMeans(2, fn.sample_terms).add(fn.vectors(syn_acts, syn_emb), syn_y)
            stats.append(fn.compare(real, syn))
        (_, lin_terms), (loss, terms) = stats
        expected = GAUSSIAN_MMD_SCALE * sum(gaussian_mmd(emb[y == k], syn_emb[syn_y == k]) for k in range(2))
        assert torch.allclose(terms["mmd"], expected.detach())
        assert {n: t for n, t in terms.items() if n != "mmd"} == {n: t for n, t in lin_terms.items() if n != "mmd"} \
            or all(torch.allclose(terms[n], lin_terms[n]) for n in terms if n != "mmd")
        grad, = torch.autograd.grad(loss, syn_emb)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="compare"):
        gauss(real.means(), syn.means())


def test_a_gaussian_run_and_its_option_checks(toy):
    s = distill(toy, ipc=2, method="dm", mmd_kernel="gaussian", iterations=3, batch_real=5, progress=False,
                device="cpu")
    assert torch.isfinite(s.images).all() and s.config["mmd_kernel"] == "gaussian"
    with pytest.raises(ConfigError, match="unknown mmd kernel"):
        DistillConfig(mmd_kernel="laplace")
