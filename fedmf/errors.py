"""Expected errors of a factorization ``A = B C`` (unit clip norm, unit noise).

* ``MaxSE = sens(C) · max_i ||B_i||_2``
* ``MeanSE = sens(C) · ||B||_F / sqrt(n)``

(``shared/papers/NOTES.md``; jax_privacy's ``sqrt(reduce(per-query error) · sens^2)``.)

The decoder ``B = A C^{-1}`` is never materialised when the structure allows:

* ``A`` Toeplitz (constant rate) and ``C^{-1}`` Toeplitz: ``B`` is Toeplitz with first column
  ``b = a * c^{-1}`` (series product), row norms are ``sqrt(cumsum(b^2))`` — ``O(n log n)``.
* ``A = E(alpha) diag(eta) M(beta)`` with a *banded* Toeplitz ``C^{-1} = G`` (``p`` bands):
  ``U = M G``, ``B_i = alpha B_{i-1} + eta_i U_i``, ``U_i = beta U_{i-1} + G_i`` give scalar
  linear recurrences for ``||U_i||^2``, ``<B_i, U_i>`` and ``||B_i||^2`` whose only non-scalar
  inputs (``<B_{i-1}, G_i>``, ``<U_{i-1}, G_i>``) live in the ``p``-wide window next to the
  diagonal — ``O(n p)`` time and memory, vectorised.
  A full Toeplitz ``C^{-1}`` (``p = n``, e.g. ``sqrt`` with a schedule) costs ``O(n^2)`` time
  and ``O(n)`` memory the same way.  Dense ``C``: triangular solve.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solve_triangular
from scipy.signal import lfilter

from .linalg import _trim, series_inverse, series_mul
from .workloads import Workload

__all__ = ["decoder_row_norms", "errors", "max_error", "mean_error"]


def _toeplitz_a_coeffs(workload: Workload) -> np.ndarray:
    return float(workload.rates[0]) * workload.toeplitz_coeffs()


def _row_norms_toeplitz(b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.cumsum(b * b))


def _row_norms_banded(workload: Workload, g: np.ndarray) -> np.ndarray:
    """Row norms of ``B = E(alpha) diag(eta) M(beta) G``, ``G`` banded Toeplitz (coeffs ``g``)."""
    n = workload.n
    p = min(g.size, n)
    g = g[:p]
    alpha, beta, eta = workload.alpha, workload.beta, workload.rates
    # h: lags < p of H = M G (only those enter the window)
    h = lfilter([1.0], [1.0, -beta], g) if beta else g.copy()
    # Window column e: w_e[i] = B_i[i - e] (rows i >= e), streamed over e (O(n) memory):
    #   w_e[i] = alpha w_{e-1}[i-1] + eta_i h_e
    #   q_i = <B_{i-1}, G_i> = sum_{d>=1} w_{d-1}[i-1] g_d
    q = np.zeros(n)
    w = eta * h[0]  # w_0[i], i = 0..n-1
    for e in range(1, p):
        # contribution of w_{e-1} (entries i-1 >= e-1) to q_i with g_e
        q[e:] += w[: n - e] * g[e]
        # w_e[i] for i >= e from w_{e-1}[i-1], stored at positions 0..n-1-e
        w = alpha * w[: n - e] + eta[e:] * h[e]
    # ||G_i||^2 and <U_{i-1}, G_i> = sum_{d=1}^{min(p-1, i)} h_{d-1} g_d
    gg = np.cumsum(g * g)
    G2 = gg[np.minimum(np.arange(n), p - 1)]
    hg = np.concatenate([[0.0], np.cumsum(h[: p - 1] * g[1:])])
    UG = hg[np.minimum(np.arange(n), p - 1)]
    # X_i = ||U_i||^2 = beta^2 X_{i-1} + 2 beta <U_{i-1}, G_i> + ||G_i||^2
    X = lfilter([1.0], [1.0, -beta * beta], 2.0 * beta * UG + G2) if beta else G2
    # P_i = <B_{i-1}, U_i> = beta Y_{i-1} + q_i,  Y_i = <B_i, U_i> = alpha P_i + eta_i X_i
    #   => Y_i = alpha beta Y_{i-1} + alpha q_i + eta_i X_i
    Y = lfilter([1.0], [1.0, -alpha * beta], alpha * q + eta * X) if beta else alpha * q + eta * X
    P = q.copy()
    if beta:
        P[1:] += beta * Y[:-1]
    # Z_i = ||B_i||^2 = alpha^2 Z_{i-1} + 2 alpha eta_i P_i + eta_i^2 X_i
    Z = lfilter([1.0], [1.0, -alpha * alpha], 2.0 * alpha * eta * P + eta * eta * X)
    return np.sqrt(np.maximum(Z, 0.0))


def decoder_row_norms(
    *,
    workload: Workload,
    cinv: np.ndarray | None = None,
    c: np.ndarray | None = None,
    C: np.ndarray | None = None,
) -> np.ndarray:
    """``||B_i||_2`` for ``B = A C^{-1}``, ``i = 0..n-1``.

    Give exactly one of ``cinv`` (first column of a Toeplitz ``C^{-1}``, possibly only its
    ``p`` non-zero band coefficients), ``c`` (first column of a Toeplitz ``C``; its inverse is
    formed as a power series) or ``C`` (dense lower-triangular).
    """
    given = [x is not None for x in (cinv, c, C)]
    if sum(given) != 1:
        raise ValueError("cinv, c or C: exactly one must be given")
    n = workload.n
    if C is not None:
        C = np.asarray(C, dtype=np.float64)
        if C.shape != (n, n):
            raise ValueError(f"C must have shape ({n}, {n}), got {C.shape}")
        A = workload.dense()
        Bt = solve_triangular(C, A.T, trans="T", lower=True)  # C^T B^T = A^T
        return np.sqrt(np.einsum("ij,ij->j", Bt, Bt))
    if c is not None:
        c = _trim(np.asarray(c, dtype=np.float64)[:n])
        if workload.is_constant_rate:
            # B = A C^{-1}: b = a / c as a power series (IIR filter when c is short)
            a = _toeplitz_a_coeffs(workload)
            b = lfilter([1.0], c, a) if c.size * n <= 50_000_000 else series_mul(
                a, series_inverse(c, n), n)
            return _row_norms_toeplitz(b)
        cinv = series_inverse(c, n)
    assert cinv is not None
    g = _trim(np.asarray(cinv, dtype=np.float64)[:n])
    if g[0] == 0:
        raise ValueError("cinv must have a non-zero first coefficient")
    if workload.is_constant_rate:
        return _row_norms_toeplitz(series_mul(_toeplitz_a_coeffs(workload), g, n))
    return _row_norms_banded(workload, g)


def max_error(*, sensitivity: float, row_norms: np.ndarray) -> float:
    """``MaxSE = sens · max_i ||B_i||``."""
    return float(sensitivity) * float(np.max(row_norms))


def mean_error(*, sensitivity: float, row_norms: np.ndarray) -> float:
    """``MeanSE = sens · ||B||_F / sqrt(n)`` from the row norms."""
    rn = np.asarray(row_norms, dtype=np.float64)
    return float(sensitivity) * math.sqrt(float(rn @ rn) / rn.size)


def errors(*, sensitivity: float, row_norms: np.ndarray) -> tuple[float, float]:
    """``(MaxSE, MeanSE)``."""
    return (max_error(sensitivity=sensitivity, row_norms=row_norms),
            mean_error(sensitivity=sensitivity, row_norms=row_norms))
