"""One round of DP aggregation, in pure NumPy: screen, clip, average, noise, server step.

The Flower strategy (:mod:`strategies.dpmf`) turns replies into flat delta vectors
(:mod:`strategies.arrays`) and hands them here; nothing in this module knows about messages.

For clip ``c`` and the fixed cohort size ``m`` the round's update is

    u_t = (1/m) sum_{i accepted} min(1, c / ||d_i||) d_i  +  w_t,     w_t = (C^{-1} Z)_t

(``w_t`` from :class:`fedmf.noise.CorrelatedNoise` with std ``z c / m``), and the server
optimizer is exactly the factorization's workload ``A = E(1 - wd) diag(eta) M(beta)``::

    m_t = beta m_{t-1} + u_t ;   theta_t = (1 - wd) theta_{t-1} + eta_t m_t

Elementwise work stays in single-threaded NumPy: multi-threaded torch/BLAS kernels were up to 10x
slower on a loaded 2-core server (thread oversubscription).
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import sq_norm

__all__ = ["CLIENT_CLIP_TOL", "RoundSum", "ServerOptimizer", "adaptive_clip", "screen_update"]

#: A client-clipped update may exceed the clip by this relative amount (float32 rounding).
CLIENT_CLIP_TOL = 1e-6


def screen_update(delta: np.ndarray, *, clip: float, client_clipped: bool
                  ) -> tuple[float, str | None]:
    """``(||delta||, reason)``: ``reason`` says why the update is rejected (``None``: accept).

    Non-finite values are rejected; with client-side clipping (``client_clipped``) so is an
    update above ``clip * (1 + CLIENT_CLIP_TOL)``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        norm = math.sqrt(sq_norm(delta))
    if not math.isfinite(norm):
        return norm, "non-finite values"
    if client_clipped and norm > clip * (1.0 + CLIENT_CLIP_TOL):
        return norm, f"update norm {norm:.6g} exceeds the client clip {clip:.6g}"
    return norm, None


class RoundSum:
    """Sum of the round's clipped deltas, averaged over the fixed cohort size ``m``."""

    def __init__(self, size: int, dtype: np.dtype) -> None:
        self.total = np.zeros(size, dtype=dtype)

    def add(self, delta: np.ndarray, *, norm: float, clip: float | None) -> None:
        """Add ``min(1, clip / norm) * delta`` (``clip=None``: unclipped); ``delta`` is
        scaled in place."""
        if clip is not None and norm > clip:
            np.multiply(delta, clip / norm, out=delta)
        np.add(self.total, delta, out=self.total)

    def mean(self, m: int) -> np.ndarray:
        """``total / m`` in place (the fixed denominator, however many replied)."""
        np.multiply(self.total, 1.0 / m, out=self.total)
        return self.total


class ServerOptimizer:
    """SGD with heavy-ball momentum and weight decay on the flat model: the workload's step.

    Args:
        rates: ``eta_0..eta_{n-1}``.
        momentum: ``beta`` in ``[0, 1)``.
        weight_decay: ``wd`` in ``[0, 1)``.
    """

    def __init__(self, *, rates: np.ndarray, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.rates = np.asarray(rates, dtype=np.float64)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.buffer: np.ndarray | None = None  # m_{t-1}

    def step(self, theta: np.ndarray, update: np.ndarray, server_round: int) -> None:
        """``theta <- (1 - wd) theta + eta_t m_t`` in place (``update`` is used as scratch)."""
        eta = float(self.rates[server_round - 1])
        step = update
        if self.momentum > 0:
            if self.buffer is None:
                self.buffer = np.zeros_like(update)
            np.multiply(self.buffer, self.momentum, out=self.buffer)
            np.add(self.buffer, update, out=self.buffer)
            step = self.buffer
        if self.weight_decay > 0:
            np.multiply(theta, 1.0 - self.weight_decay, out=theta)
        np.multiply(step, eta, out=update)
        np.add(theta, update, out=theta)


def adaptive_clip(clip: float, *, unclipped: int, count_noise: float, clients_per_round: int,
                  quantile: float, lr: float) -> float:
    """Andrew et al. (2021) geometric update toward the ``quantile`` of the update norms:
    ``clip * exp(-lr (b_t - quantile))`` with ``b_t`` the noisy fraction of unclipped
    updates ``(unclipped + count_noise) / m``."""
    noisy = (unclipped + count_noise) / clients_per_round
    return float(clip * math.exp(-lr * (noisy - quantile)))
