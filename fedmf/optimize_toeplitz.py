"""Optimised Toeplitz strategy matrices: banded ``C`` (``bandmf``) and buffered linear
Toeplitz ``C^{-1}`` (``blt``).

Both minimise ``MeanSE = sens(C) ||A C^{-1}||_F / sqrt(n)`` for the *actual* workload ``A``
(schedule, momentum, weight decay) and participation, with analytic gradients and L-BFGS-B,
like ``opt-bisr`` (:mod:`fedmf.optimize`), but over other families:

* **BandMF** (McKenna 2024, "Scaling up the banded matrix factorization mechanism";
  Choquette-Choo et al. 2023, "(Amplified) banded matrix factorization"): ``C`` is
  lower-triangular banded Toeplitz with ``p`` coefficients ``c_0..c_{p-1}``.  With
  ``p <= b`` the columns of a participation pattern (``>= b`` apart) are orthogonal, so the
  sensitivity is exact, ``sens^2 = max_P sum_{i in P} ||C e_i||^2``, attained by the earliest
  pattern ``{0, b, .., (k-1) b}`` (column norms only shrink towards the end).  The noise is
  ``w_t = (z_t - sum_{j >= 1} c_j w_{t-j}) / c_0``: ``p - 1`` past outputs per parameter.
* **BLT** (Dvijotham et al. 2024, "Efficient and near-optimal noise generation for streaming
  differential privacy"; McMahan & Pillutla 2025): ``C^{-1}`` is lower-triangular Toeplitz with
  ``m_0 = 1`` and ``m_t = sum_i omega_i theta_i^{t-1}`` (``t >= 1``) for ``nb`` buffers, i.e.
  ``m(x) = 1 + sum_i omega_i x / (1 - theta_i x)``.  Parametrising the *inverse* with
  ``theta_i = sigmoid(u_i)`` in ``(0, 1)`` keeps the noise generator stable whatever the
  optimiser does (the parameterisation McMahan & Pillutla recommend); the noise is
  ``w_t = z_t + sum_i omega_i s_{i,t}``, ``s_{i,t} = theta_i s_{i,t-1} + z_{t-1}``:
  ``nb`` buffers per parameter, ``O(nb d)`` work per round.  ``C = 1/m(x)`` is rational, its
  first column one IIR filter.  The sensitivity is the one :func:`fedmf.sensitivity.sensitivity`
  certifies (single participation: ``||C e_0||``).

Maths (``n`` rounds, ``G`` the ``n x n`` Gram matrix with ``||A T(m)||_F^2 = m^T G m``,
``G[j, k] = sum_s <A[:, s+j], A[:, s+k]>``, precomputed once in ``O(n^2)``): ``C^{-1} = T(m)``
and ``C = T(c)`` with ``c = 1/m`` as power series, so ``dm = -m * dc * m`` and
``dc = -c * dm * c`` (series products).  Each evaluation costs ``O(n^2)`` (``G m``) plus
``O(n p)`` or ``O(n nb)``; ``n = 2000`` takes milliseconds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import scipy.signal
import scipy.special

from .optimize import (
    _cyclic_abs_sens2_and_grad,
    _cyclic_class_index,
    _gram_matrices,
    _participation_kb,
    _pattern_weights,
    _sens2_and_grad,
    _series_inverse,
    _workload_dense,
)
from .sensitivity import Sensitivity, sensitivity

logger = logging.getLogger(__name__)

__all__ = ["BLTParams", "blt_coeffs", "blt_inverse_coeffs", "optimize_banded_toeplitz",
           "optimize_blt"]

_BIG = 1e6  # objective value of an unusable iterate (exploding series)


def _corr_head(g: np.ndarray, h: np.ndarray, count: int) -> np.ndarray:
    """``out_j = sum_{t >= j} g_t h_{t-j}`` for ``j < count`` (FFT correlation)."""
    n = g.size
    full = scipy.signal.fftconvolve(g[::-1], h[:n])  # full[n-1-j] = sum_t g_t h_{t-j}
    return full[n - 1 - np.arange(count)]


@dataclass
class _Workload:
    """``G`` and the participation of one problem."""

    n: int
    G: np.ndarray
    kind: str
    k: int
    b: int
    participation: Any
    weights: list[tuple[int, float, np.ndarray]]
    cyclic_index: list[tuple[int, float, np.ndarray]] | None

    @classmethod
    def build(cls, workload: Any, participation: Any) -> _Workload:
        A = _workload_dense(workload)
        n = A.shape[0]
        kind, k, b = _participation_kb(participation, n)
        G, _ = _gram_matrices(A, n, False)
        full = kind == "cyclic" and k >= -(-n // b)
        return cls(n=n, G=G, kind=kind, k=k, b=b, participation=participation,
                   weights=_pattern_weights(n, k, b),
                   cyclic_index=_cyclic_class_index(n, -(-n // b), b) if full else None)

    def sens2_of_c(self, c: np.ndarray) -> tuple[float, np.ndarray]:
        """The sensitivity objective of a Toeplitz ``C`` (first column ``c``, length ``n``)
        and its gradient in ``c`` (as for ``opt-bisr``: certified class bound for full cyclic
        classes, the earliest pattern otherwise)."""
        if self.k == 1:
            return float(c @ c), 2.0 * c
        if self.cyclic_index is not None:
            return _cyclic_abs_sens2_and_grad(c, self.cyclic_index)
        return _sens2_and_grad(c, self.weights)

    def certified(self, c: np.ndarray) -> Sensitivity:
        if self.k == 1:
            return Sensitivity(math.sqrt(float(c @ c)), True)
        return sensitivity(participation=self.participation, rounds=self.n, toeplitz=c)


# ------------------------------------------------------------------------------- BandMF
def _banded_sens2(c: np.ndarray, n: int, k: int, b: int) -> tuple[float, np.ndarray]:
    """``sum_{u < k} ||c[: n - u b]||^2`` and its gradient (exact for ``p <= b``)."""
    s2, g = 0.0, np.zeros_like(c)
    for u in range(k):
        length = min(c.size, n - u * b)
        if length <= 0:
            break
        s2 += float(c[:length] @ c[:length])
        g[:length] += 2.0 * c[:length]
    return s2, g


def optimize_banded_toeplitz(*, workload: Any, participation: Any = None, bands: int,
                             init: np.ndarray | None = None, maxiter: int = 1000,
                             tol: float = 1e-12) -> np.ndarray:
    """The ``bandmf`` strategy: banded Toeplitz ``C`` (``bands`` coefficients, ``c_0 = 1``)
    minimising MeanSE for ``workload`` and ``participation`` (see the module docstring).

    With ``k > 1`` participations ``bands`` must be ``<= b`` (exact sensitivity).  Started from
    the band of the workload's Toeplitz square root (BSR) and ``init`` if given; the best
    result is returned.
    """
    from .factorizations import sqrt_coeffs

    prob = _Workload.build(workload, participation)
    n, p = prob.n, int(bands)
    if not 1 <= p <= n:
        raise ValueError(f"bands must be in [1, rounds={n}], got {bands}")
    if prob.k > 1 and p > prob.b:
        raise ValueError(f"bands must be <= min-sep={prob.b} for bandmf with {prob.k} "
                         f"participations (exact sensitivity needs bands <= min-sep), got {p}")
    kk = 1 if prob.k == 1 else prob.k

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        c = np.concatenate([[1.0], x])
        with np.errstate(over="ignore", invalid="ignore"):
            m = _series_inverse(c, n)
            if not np.all(np.isfinite(m)) or float(np.max(np.abs(m))) > 1e12:
                return _BIG, np.zeros_like(x)
            gm = prob.G @ m
            e2 = float(m @ gm)
        s2, gs = _banded_sens2(c, n, kk, prob.b)
        # dE/dc_j = -sum_t (2 G m)_t (m*m)_{t-j}
        mm = scipy.signal.fftconvolve(m, m)[:n]
        ge = -2.0 * _corr_head(gm, mm, p)
        grad = gs / s2 + ge / e2
        val = math.log(s2) + math.log(e2)
        if not math.isfinite(val) or not np.all(np.isfinite(grad)):
            return _BIG, np.zeros_like(x)
        return val, grad[1:]

    starts = [sqrt_coeffs(workload, p)]
    if init is not None:
        starts.append(np.asarray(init, dtype=np.float64)[:p])
    best, best_val = None, math.inf
    for c0 in starts:
        c0 = c0 / c0[0]
        if p == 1:
            cand = c0
        else:
            res = scipy.optimize.minimize(fun, c0[1:], jac=True, method="L-BFGS-B",
                                          options={"maxiter": maxiter, "ftol": tol,
                                                   "gtol": 1e-9, "maxcor": 30})
            cand = np.concatenate([[1.0], res.x])
        for c in (c0, cand):
            val = fun(c[1:])[0] if p > 1 else 0.0
            if val < best_val:
                best, best_val = c, val
    assert best is not None
    return best


# ---------------------------------------------------------------------------------- BLT
@dataclass(frozen=True)
class BLTParams:
    """``C^{-1} = T(m)``, ``m_0 = 1``, ``m_t = sum_i omega_i theta_i^{t-1}``."""

    omega: np.ndarray
    theta: np.ndarray

    @property
    def buffers(self) -> int:
        return int(self.theta.size)


def blt_inverse_coeffs(params: BLTParams, n: int) -> np.ndarray:
    """First column ``m`` (length ``n``) of ``C^{-1}``."""
    t = np.arange(n - 1, dtype=np.float64)
    m = np.empty(n)
    m[0] = 1.0
    m[1:] = (params.omega[None, :] * params.theta[None, :] ** t[:, None]).sum(axis=1)
    return m


def _rational(params: BLTParams) -> tuple[np.ndarray, np.ndarray]:
    """``m(x) = N(x) / D(x)`` as polynomial coefficient arrays (``D = prod (1 - theta_i x)``)."""
    D = np.array([1.0])
    for th in params.theta:
        D = np.convolve(D, [1.0, -th])
    N = D.copy()
    for i, (om, _) in enumerate(zip(params.omega, params.theta, strict=True)):
        others = np.array([1.0])
        for j, th in enumerate(params.theta):
            if j != i:
                others = np.convolve(others, [1.0, -th])
        term = np.concatenate([[0.0], om * others])  # omega_i x prod_{j != i} (1 - theta_j x)
        N = N + np.concatenate([term, np.zeros(N.size - term.size)])
    return N, D


def blt_coeffs(params: BLTParams, n: int) -> np.ndarray:
    """First column ``c`` (length ``n``) of ``C = T(1/m)``: one IIR filter ``D(x) / N(x)``."""
    N, D = _rational(params)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return scipy.signal.lfilter(D, N, impulse)


_U_MAX = 30.0


def _sigmoid(u: np.ndarray) -> np.ndarray:
    return scipy.special.expit(u)


def _blt_init(workload: Any, n: int, buffers: int) -> list[np.ndarray]:
    """Starting points ``(omega, u)``: ``theta`` on a geometric grid towards 1, ``omega``
    fitted by least squares to the inverse square root of the workload's Toeplitz part (the
    ``sqrt`` factorization's ``C^{-1}``)."""
    from .factorizations import inverse_sqrt_coeffs

    target = inverse_sqrt_coeffs(workload, n)[1:]
    t = np.arange(n - 1, dtype=np.float64)
    starts = []
    # decays 1 - 10^-lo ... 1 - 10^-hi; the last two reach down to small theta, where
    # strongly scheduled or momentum workloads put a buffer (the problem has local minima)
    for lo, hi in ((0.3, 3.0), (0.5, 4.0), (1.0, 2.5), (0.02, 1.0), (0.05, 2.0)):
        theta = 1.0 - np.logspace(-lo, -hi, buffers)
        V = theta[None, :] ** t[:, None]
        omega, *_ = np.linalg.lstsq(V, target, rcond=None)
        starts.append(np.concatenate([omega, np.log(theta / (1.0 - theta))]))
    return starts


def optimize_blt(*, workload: Any, participation: Any = None, buffers: int,
                 maxiter: int = 2000, tol: float = 1e-13) -> BLTParams:
    """The ``blt`` strategy: ``buffers`` exponentials (see the module docstring) minimising
    MeanSE for ``workload`` and ``participation``; several starts, best result kept."""
    prob = _Workload.build(workload, participation)
    n, nb = prob.n, int(buffers)
    if not 1 <= nb <= n - 1:
        raise ValueError(f"buffers must be in [1, rounds - 1 = {n - 1}], got {buffers}")
    t = np.arange(n - 1, dtype=np.float64)

    def unpack(x: np.ndarray) -> BLTParams:
        return BLTParams(omega=x[:nb].copy(), theta=_sigmoid(x[nb:]))

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        params = unpack(x)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            powers = params.theta[None, :] ** t[:, None]  # (n-1, nb): theta^(t-1), t >= 1
            m = np.concatenate([[1.0], powers @ params.omega])
            c = blt_coeffs(params, n)
            if not (np.all(np.isfinite(c)) and np.all(np.isfinite(m))) or float(
                    np.max(np.abs(c))) > 1e12:
                return _BIG, np.zeros_like(x)
            gm = prob.G @ m
            e2 = float(m @ gm)
            s2, gc = prob.sens2_of_c(c)
            # d s2 / d m_t = -sum_s gc_s (c*c)_{s-t}
            cc = scipy.signal.fftconvolve(c, c)[:n]
            gsm = -_corr_head(gc, cc, n)
            gm_total = gsm / s2 + 2.0 * gm / e2  # d L / d m
            g = gm_total[1:]
            g_omega = powers.T @ g
            dpow = np.zeros_like(powers)  # d theta^(t-1) / d theta = (t-1) theta^(t-2)
            dpow[1:] = t[1:, None] * powers[:-1]
            g_theta = params.omega * (dpow.T @ g)
            g_u = g_theta * params.theta * (1.0 - params.theta)
            val = math.log(s2) + math.log(e2)
        grad = np.concatenate([g_omega, g_u])
        if not math.isfinite(val) or not np.all(np.isfinite(grad)):
            return _BIG, np.zeros_like(x)
        return val, grad

    # |u| <= 30 keeps theta = sigmoid(u) strictly inside (0, 1) in float64 (a decay that
    # reaches 1.0 exactly is a buffer that never forgets: the generator is no longer stable)
    bounds = [(None, None)] * nb + [(-_U_MAX, _U_MAX)] * nb
    best, best_val = None, math.inf
    for x0 in _blt_init(workload, n, nb):
        res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                      options={"maxiter": maxiter, "ftol": tol, "gtol": 1e-10,
                                               "maxcor": 30})
        for x in (x0, res.x):
            val = fun(x)[0]
            if val < best_val:
                best, best_val = x, val
    assert best is not None
    return unpack(best)
