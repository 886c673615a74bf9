"""ZCA whitening (docs/method.md, "ZCA whitening"), in the kornia ``ZCAWhitening(eps=0.1)`` convention.

kornia's ``zca_mean`` uses the unbiased covariance ``(X - mu)^T (X - mu) / (N - 1)``, decomposes it
as ``U diag(S) U^T`` and builds ``T = U diag(1/sqrt(S + eps)) U^T`` (and ``U diag(sqrt(S + eps)) U^T``
for the inverse). Whitening is ``(x - mu) @ T``; T is symmetric so that equals ``(x - mu) @ T^T``.
We do the same, but accumulate the covariance in float64 over chunks (kornia works in the input
dtype on the whole matrix at once, which does not fit memory for large sets) and use a symmetric
eigensolver, which for a PSD matrix gives the same U and S as kornia's SVD.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atomdistill.errors import ConfigError, DatasetError

_KEYS = ("mean", "transform", "inverse_transform")


class ZCA:
    """A fitted ZCA whitening transform on flattened images (D = C*H*W)."""

    def __init__(self, mean: Tensor, transform: Tensor, inverse_transform: Tensor, chunk: int = 4096) -> None:
        d = mean.numel()
        if transform.shape != (d, d) or inverse_transform.shape != (d, d):
            raise ConfigError(
                f"ZCA matrices must be {d}x{d} to match a mean of {d} values; refit the ZCA or use a matching state."
            )
        # Stored in float32: applying a 3072x3072 float64 matrix to a whole dataset would double the cost
        # for no visible gain (kornia applies its float32 matrices the same way).
        self.mean = mean.reshape(d).float()
        self.transform = transform.float()
        self.inverse_transform = inverse_transform.float()
        self.chunk = int(chunk)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1, chunk: int = 4096) -> "ZCA":
        """Fit on images ``x`` [N, ...]: float64 chunked covariance (unbiased), eigendecomposition."""
        n = x.shape[0]
        if n < 2:
            raise DatasetError(f"ZCA needs at least 2 images to estimate a covariance, got {n}; fit on the training set.")
        mean = cls.sum(x, chunk) / n
        return cls.from_moments(mean, cls.scatter(x, mean, chunk), n, eps, chunk=chunk)

    # The fit in three parts, so that processes holding disjoint parts of the data can fit together
    # (atomdistill.distributed): sum -> all-reduce -> mean; scatter -> all-reduce -> from_moments.
    @staticmethod
    def sum(x: Tensor, chunk: int = 4096) -> Tensor:
        """Float64 sum of the flattened images ``x`` [N, ...] -> [D] (on x's device)."""
        flat = x.reshape(x.shape[0], -1)
        chunk = max(1, int(chunk))
        if flat.device.type == "cpu":
            total = np.zeros(flat.shape[1], dtype=np.float64)
            for i in range(0, flat.shape[0], chunk):
                total += flat[i : i + chunk].detach().double().sum(0).numpy()
            return torch.from_numpy(total)
        total_t = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
        for i in range(0, flat.shape[0], chunk):
            total_t += flat[i : i + chunk].detach().double().sum(0)
        return total_t

    @staticmethod
    def scatter(x: Tensor, mean: Tensor, chunk: int = 4096) -> Tensor:
        """Float64 ``sum_i (x_i - mean)(x_i - mean)^T`` -> [D, D]; centred first, so no cancellation."""
        flat = x.reshape(x.shape[0], -1)
        d = flat.shape[1]
        chunk = max(1, int(chunk))
        if flat.device.type == "cpu":
            # numpy's `a.T @ a` dispatches to BLAS syrk (half the flops of a general matmul).
            m = mean.detach().double().cpu().numpy()
            cov = np.zeros((d, d), dtype=np.float64)
            for i in range(0, flat.shape[0], chunk):
                c = flat[i : i + chunk].detach().double().numpy() - m
                cov += c.T @ c
            return torch.from_numpy(cov)
        m_t = mean.detach().double().to(flat.device)
        cov_t = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        for i in range(0, flat.shape[0], chunk):
            c = flat[i : i + chunk].detach().double() - m_t
            cov_t += c.T @ c
        return cov_t

    @classmethod
    def from_moments(cls, mean: Tensor, scatter: Tensor, n: int, eps: float = 0.1, chunk: int = 4096) -> "ZCA":
        """The transform from the mean [D] and centred scatter [D, D] of ``n`` images (unbiased covariance)."""
        if n < 2:
            raise DatasetError(f"ZCA needs at least 2 images to estimate a covariance, got {n}; fit on the training set.")
        if mean.device.type == "cpu":
            # numpy's LAPACK eigh is several times faster than torch's CPU eigh here (about 4 s vs 16 s at D=3072).
            cov = scatter.detach().double().cpu().numpy() / (n - 1)
            evals, evecs = np.linalg.eigh(cov)
            # Tiny negative eigenvalues are round-off of a PSD matrix (kornia's SVD returns them as |.|, but
            # they are swamped by eps either way).
            evals = np.clip(evals, 0.0, None)
            # W = A A^T with A = U diag((l + eps)^(-1/4)): numpy runs `A @ A.T` as syrk (half the flops).
            a = evecs * (evals + eps) ** -0.25
            w = a @ a.T
            a = evecs * (evals + eps) ** 0.25
            winv = a @ a.T
            return cls(mean.detach().double().cpu(), torch.from_numpy(w), torch.from_numpy(winv), chunk=chunk)
        cov_t = scatter.detach().double().to(mean.device) / (n - 1)
        evals_t, evecs_t = torch.linalg.eigh(cov_t)
        evals_t = evals_t.clamp_min(0.0)
        w_t = (evecs_t * torch.rsqrt(evals_t + eps)) @ evecs_t.T
        winv_t = (evecs_t * torch.sqrt(evals_t + eps)) @ evecs_t.T
        return cls(mean.detach().double(), w_t, winv_t, chunk=chunk)

    def _check(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise DatasetError(
                f"ZCA was fitted on {self.dim}-value images but got {flat.shape[1]} values per image; "
                "use the ZCA fitted on this dataset."
            )
        return flat

    def _apply(self, x: Tensor, matrix: Tensor, pre: Tensor | None, post: Tensor | None) -> Tensor:
        flat = self._check(x)
        dev = flat.device
        m = matrix.to(dev).T
        pre = None if pre is None else pre.to(dev)
        post = None if post is None else post.to(dev)
        outs = []
        # Chunked so a 50k x 3072 set does not need a second full-size float temporary per step.
        for i in range(0, max(flat.shape[0], 1), self.chunk):
            c = flat[i : i + self.chunk].float()
            if pre is not None:
                c = c - pre
            c = c @ m
            if post is not None:
                c = c + post
            outs.append(c)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return out.reshape(x.shape)

    def __call__(self, x: Tensor) -> Tensor:
        """Whiten: ``(flatten(x) - mean) @ W^T``, reshaped back; float32."""
        return self._apply(x, self.transform, self.mean, None)

    def inverse(self, x: Tensor) -> Tensor:
        """Unwhiten: ``flatten(x) @ Winv^T + mean``, reshaped back; float32."""
        return self._apply(x, self.inverse_transform, None, self.mean)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "transform": self.transform.clone(),
                "inverse_transform": self.inverse_transform.clone()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> "ZCA":
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ConfigError(f"ZCA state is missing {', '.join(missing)}; save it with ZCA.state_dict().")
        return cls(d["mean"], d["transform"], d["inverse_transform"])

    def to(self, device: torch.device | str) -> "ZCA":
        return ZCA(self.mean.to(device), self.transform.to(device), self.inverse_transform.to(device), chunk=self.chunk)

    def __repr__(self) -> str:
        return f"ZCA(dim={self.dim}, device={self.mean.device})"
