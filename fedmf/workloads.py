"""Workload matrices ``A`` (n x n, lower triangular) of (scheduled) SGD.

``A = E(alpha) · diag(eta) · M(beta)`` with ``E(alpha)_{ik} = alpha^{i-k}`` (weight decay,
``alpha = 1 - weight_decay``) and ``M(beta)_{ts} = beta^{t-s}`` (heavy-ball momentum), the
Toeplitz workload of Kalinin & Lampert 2024 (BSR, arXiv:2405.13763, Sec. 2) extended by a
learning-rate schedule as in arXiv:2511.17994 (``A_chi = A_1 · diag(eta)``).  The iterates are

    m_t = beta m_{t-1} + g_t,   theta_t = alpha theta_{t-1} - eta_t m_t,

so ``theta_t - alpha^{t+1} theta_{-1} = -(A g)_t``.  ``E(1) = A_1`` is the prefix sum.

The *schedule-blind Toeplitz part* is ``T = E(alpha) · M(beta)`` with generating function
``1 / ((1 - alpha x)(1 - beta x))``; ``A = eta_0 · T`` when the rate is constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import fftconvolve, lfilter

__all__ = ["Workload", "prefix_workload", "sgd_workload"]


def _geometric(ratio: float, n: int) -> np.ndarray:
    if ratio == 0.0:
        out = np.zeros(n)
        out[0] = 1.0
        return out
    return ratio ** np.arange(n, dtype=np.float64)


@dataclass(frozen=True)
class Workload:
    """``A = E(1 - weight_decay) · diag(rates) · M(momentum)``.

    Attributes:
        rates: learning rates ``eta_t > 0``, shape ``(n,)``.
        momentum: ``beta`` in ``[0, 1)``.
        weight_decay: in ``[0, 1)``; ``alpha = 1 - weight_decay`` in ``(0, 1]``.
    """

    rates: np.ndarray = field(repr=False)
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        rates = np.array(self.rates, dtype=np.float64, copy=True).reshape(-1)
        if rates.size < 1:
            raise ValueError("rates must have at least one entry")
        if not np.all(np.isfinite(rates)) or np.min(rates) <= 0:
            raise ValueError("rates must be finite and > 0")
        rates.setflags(write=False)
        object.__setattr__(self, "rates", rates)
        beta = float(self.momentum)
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        wd = float(self.weight_decay)
        if not (0.0 <= wd < 1.0):
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        object.__setattr__(self, "momentum", beta)
        object.__setattr__(self, "weight_decay", wd)

    # ----------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        """Number of rounds."""
        return int(self.rates.size)

    @property
    def alpha(self) -> float:
        """``1 - weight_decay``."""
        return 1.0 - self.weight_decay

    @property
    def beta(self) -> float:
        """Momentum."""
        return self.momentum

    @property
    def is_constant_rate(self) -> bool:
        """Whether all rates are equal (then ``A = eta_0 T`` is Toeplitz)."""
        r = self.rates
        return bool(np.all(r == r[0]))

    @property
    def is_prefix_sum(self) -> bool:
        """``A = eta_0 · A_1`` (constant rate, no momentum, no weight decay)."""
        return self.is_constant_rate and self.momentum == 0.0 and self.weight_decay == 0.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Workload):
            return NotImplemented
        return (self.momentum == other.momentum and self.weight_decay == other.weight_decay
                and self.rates.shape == other.rates.shape
                and bool(np.array_equal(self.rates, other.rates)))

    def __hash__(self) -> int:
        return hash((self.momentum, self.weight_decay, self.rates.tobytes()))

    def __repr__(self) -> str:
        return (f"Workload(n={self.n}, rates=[{self.rates[0]:.4g}..{self.rates[-1]:.4g}], "
                f"momentum={self.momentum}, weight_decay={self.weight_decay})")

    # ----------------------------------------------------------------- matrices
    def toeplitz_coeffs(self, length: int | None = None) -> np.ndarray:
        """First column of ``T = E(alpha) · M(beta)`` (``length`` entries, default ``n``):
        ``t_k = sum_{j=0}^{k} alpha^j beta^{k-j}``."""
        n = self.n if length is None else int(length)
        e = _geometric(self.alpha, n)
        if self.momentum == 0.0:
            return e
        return lfilter([1.0], [1.0, -self.momentum], e)  # e * (1, beta, beta^2, ...)

    def rate_toeplitz_coeffs(self, length: int | None = None) -> np.ndarray:
        """First column of the schedule-aware Toeplitz matrix ``T(chi) · A_1^{-1} · T``,
        ``chi_t = eta_t / eta_0`` (arXiv:2511.17994).

        For plain SGD (``T = A_1``) this is the paper's ``T(chi)``; for a constant rate it is
        the schedule-blind ``T``.  With momentum / weight decay the schedule ratio replaces the
        prefix-sum factor ``1 / (1 - x)`` of ``T``'s generating function:
        ``chi(x) · (1 - x) / ((1 - alpha x)(1 - beta x))`` (all factors commute).
        """
        n = self.n if length is None else int(length)
        chi = self.rates[:n] / self.rates[0]
        if self.momentum == 0.0 and self.weight_decay == 0.0:
            return chi.copy()
        t = self.toeplitz_coeffs(n)
        d = t.copy()
        d[1:] -= t[:-1]  # (1 - x) t(x)
        return fftconvolve(chi, d)[:n] if n > 64 else np.convolve(chi, d)[:n]

    def dense(self) -> np.ndarray:
        """``A`` as a dense ``n x n`` lower-triangular array (small ``n`` only)."""
        n = self.n
        idx = np.arange(n)
        lag = idx[:, None] - idx[None, :]
        low = lag >= 0
        lagc = np.where(low, lag, 0)
        E = np.where(low, self.alpha ** lagc.astype(np.float64), 0.0)
        if self.momentum == 0.0:
            return E * self.rates[None, :]
        M = np.where(low, self.momentum ** lagc.astype(np.float64), 0.0)
        return (E * self.rates[None, :]) @ M


def prefix_workload(n: int) -> Workload:
    """The prefix-sum workload ``A_1`` (``n`` rounds, unit rate)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return Workload(rates=np.ones(int(n)))


def sgd_workload(*, rates: np.ndarray, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> Workload:
    """SGD with learning rates ``rates``, heavy-ball ``momentum`` and ``weight_decay``."""
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim != 1 or rates.size < 1:
        raise ValueError(f"rates must be a non-empty 1-d array, got shape {rates.shape}")
    if not np.all(np.isfinite(rates)) or float(np.min(rates)) <= 0:
        raise ValueError("rates must be finite and > 0")
    if not math.isfinite(momentum):
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return Workload(rates=rates, momentum=momentum, weight_decay=weight_decay)
