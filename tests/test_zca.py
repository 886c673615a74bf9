"""Tests for atomdistill.zca against an independent numpy/scipy closed form."""

import numpy as np
import pytest
import scipy.linalg
import torch

from atomdistill.errors import ConfigError, DatasetError
from atomdistill.zca import ZCA

EPS = 0.1


def _correlated(n: int = 500, shape=(3, 4, 4), seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    mix = rng.normal(size=(d, d)) * np.linspace(0.05, 2.0, d)  # strongly anisotropic, correlated
    x = rng.normal(size=(n, d)) @ mix.T + rng.normal(size=d) * 3.0
    return torch.from_numpy(x.reshape((n,) + tuple(shape))).float()


def _closed_form(x: torch.Tensor, eps: float = EPS):
    xf = x.reshape(x.shape[0], -1).double().numpy()
    mu = xf.mean(0)
    cov = np.cov(xf, rowvar=False)  # unbiased (N - 1), as kornia's zca_mean(unbiased=True)
    lam, u = scipy.linalg.eigh(cov)
    w = u @ np.diag(1.0 / np.sqrt(lam + eps)) @ u.T
    winv = u @ np.diag(np.sqrt(lam + eps)) @ u.T
    return mu, cov, lam, u, w, winv


def test_matches_closed_form() -> None:
    x = _correlated()
    z = ZCA.fit(x, eps=EPS)
    mu, cov, lam, u, w, winv = _closed_form(x)
    np.testing.assert_allclose(z.mean.numpy(), mu, atol=1e-4)
    np.testing.assert_allclose(z.transform.numpy(), w, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(z.inverse_transform.numpy(), winv, atol=1e-4, rtol=1e-4)
    # whitened data: covariance W cov W^T = U diag(l / (l + eps)) U^T
    y = z(x).reshape(x.shape[0], -1).double().numpy()
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    target = u @ np.diag(lam / (lam + EPS)) @ u.T
    np.testing.assert_allclose(np.cov(y, rowvar=False), target, atol=1e-3)
    # and the output itself equals (x - mu) W^T
    ref = (x.reshape(x.shape[0], -1).double().numpy() - mu) @ w.T
    np.testing.assert_allclose(y, ref, atol=1e-3, rtol=1e-4)


def test_eps_matters() -> None:
    x = _correlated()
    a, b = ZCA.fit(x, eps=0.1), ZCA.fit(x, eps=1e-3)
    assert not torch.allclose(a.transform, b.transform, atol=1e-3)


def test_inverse_round_trip() -> None:
    x = _correlated()
    z = ZCA.fit(x)
    torch.testing.assert_close(z.inverse(z(x)), x, atol=1e-4, rtol=1e-4)
    assert z(x).shape == x.shape and z(x).dtype == torch.float32


def test_chunked_equals_unchunked() -> None:
    x = _correlated(n=300)
    a = ZCA.fit(x, chunk=7)
    b = ZCA.fit(x, chunk=100000)
    torch.testing.assert_close(a.transform, b.transform, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.mean, b.mean)
    a.chunk = 13  # chunked application too
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.inverse(x), b.inverse(x), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip() -> None:
    x = _correlated(n=200)
    z = ZCA.fit(x)
    sd = z.state_dict()
    assert set(sd) == {"mean", "transform", "inverse_transform"}
    z2 = ZCA.from_state_dict({k: v.clone() for k, v in sd.items()})
    assert torch.equal(z(x), z2(x))
    assert torch.equal(z.inverse(x), z2.inverse(x))
    with pytest.raises(ConfigError):
        ZCA.from_state_dict({"mean": sd["mean"]})


def test_to_device_and_grad() -> None:
    x = _correlated(n=100)
    z = ZCA.fit(x).to("cpu")
    s = x[:4].clone().requires_grad_(True)
    z.inverse(s).sum().backward()  # distilled images are shown through the inverse; stays differentiable
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_errors() -> None:
    with pytest.raises(DatasetError):
        ZCA.fit(torch.randn(1, 3, 2, 2))
    z = ZCA.fit(torch.randn(50, 3, 2, 2))
    with pytest.raises(DatasetError):
        z(torch.randn(5, 3, 4, 4))
