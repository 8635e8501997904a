"""Power series, lower-triangular Toeplitz and banded helpers.

A lower-triangular Toeplitz matrix ``T`` with first column ``a`` is the multiplication operator
of the power series ``a(x) = sum_k a_k x^k`` truncated to ``n`` terms, so products, inverses
and (principal) square roots of such matrices are the corresponding operations on power
series: ``T(a)^{1/2} = T(sqrt(a))`` (principal root when ``a_0 > 0``).  E.g. for the prefix
sum ``a(x) = 1/(1 - x)``, ``A_1^{1/2}`` has the coefficients ``r_k = binom(2k, k) / 4^k`` of
``(1 - x)^{-1/2}`` and ``A_1^{-1/2}`` those of ``(1 - x)^{1/2}`` (Kalinin & Lampert 2024,
arXiv:2405.13763, Sec. 3; Fichtenberger et al. 2023).

For the ``p``-band of a lower-triangular matrix, entries at lag ``d`` of a product, inverse or
square root depend only on the entries at lags ``<= d`` of the operands, which gives
``O(n p^2)`` banded constructions (:func:`band_sqrt`, :func:`band_inverse`,
:func:`band_product`); a band is stored as an ``(n, p)`` array ``band[t, j] = M[t, t - j]``
(``0`` where ``t - j < 0``), the layout of :class:`fedmf.factorizations.NoiseSpec`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import fftconvolve, lfilter

__all__ = [
    "band_inverse",
    "band_product",
    "band_sqrt",
    "band_to_dense",
    "binomial_series",
    "dense_to_band",
    "series_inverse",
    "series_inverse_sqrt",
    "series_mul",
    "series_sqrt",
    "toeplitz_band",
    "toeplitz_dense",
    "toeplitz_gram",
]

# Series longer than this use FFT Newton iterations instead of the O(n^2) recursions.
_NEWTON_MIN = 2048
# Direct (lfilter) inversion cost n * len(a) above which Newton is used.
_LFILTER_MAX_WORK = 4_000_000


def _as_series(a: np.ndarray | list[float], n: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size >= n:
        return a[:n].copy()
    return np.concatenate([a, np.zeros(n - a.size)])


def _trim(a: np.ndarray) -> np.ndarray:
    nz = np.flatnonzero(a)
    return a[: nz[-1] + 1] if nz.size else a[:1]


# ----------------------------------------------------------------------- power series
def binomial_series(exponent: float, n: int, *, ratio: float = 1.0) -> np.ndarray:
    """First ``n`` coefficients of ``(1 - ratio x)^exponent`` in ``O(n)``.

    ``c_0 = 1``, ``c_k = c_{k-1} (k - 1 - exponent) / k · ratio``; e.g. exponent ``-1/2``
    gives ``binom(2k, k) / 4^k`` (the coefficients of ``A_1^{1/2}``).
    """
    if n < 1:
        return np.zeros(0)
    k = np.arange(1, n, dtype=np.float64)
    factors = (k - 1.0 - exponent) / k * ratio
    out = np.empty(n)
    out[0] = 1.0
    if n > 1:
        with np.errstate(under="ignore"):
            out[1:] = np.cumprod(factors)
    return out


def series_mul(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` coefficients of ``a(x) b(x)`` (Toeplitz product ``T(a) T(b)``)."""
    a = _as_series(a, min(n, np.size(a)) or 1)
    b = _as_series(b, min(n, np.size(b)) or 1)
    out = np.convolve(a, b) if min(a.size, b.size) <= 64 else fftconvolve(a, b)
    return _as_series(out, n)


def series_inverse(a: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` coefficients of ``1 / a(x)`` (``a_0 != 0``): Toeplitz ``T(a)^{-1}``.

    Short ``a`` (a band of ``p`` coefficients): IIR filter, ``O(n p)``.  Long ``a``: Newton
    iteration ``y <- y (2 - a y)`` with FFT products, ``O(n log n)``.
    """
    a = _trim(_as_series(a, n))
    if a[0] == 0:
        raise ValueError("a must have a non-zero constant coefficient a[0]")
    if a.size * n <= _LFILTER_MAX_WORK or a.size <= 64 or n <= _NEWTON_MIN:
        impulse = np.zeros(n)
        impulse[0] = 1.0
        return lfilter([1.0], a, impulse)
    y = np.array([1.0 / a[0]])
    m = 1
    while m < n:
        m = min(2 * m, n)
        ay = fftconvolve(a[:m], y)[:m]
        corr = -ay
        corr[0] += 2.0
        y = fftconvolve(y, corr)[:m]
    return y


def series_sqrt(a: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` coefficients of the principal ``a(x)^{1/2}`` (``a_0 > 0``): ``T(a)^{1/2}``.

    ``O(n^2)`` recursion ``2 r_0 r_t = a_t - sum_{j=1}^{t-1} r_j r_{t-j}`` for ``n <= 2048``,
    Newton ``r <- (r + a / r) / 2`` with FFT products (``O(n log n)``) beyond.
    """
    a = _as_series(a, n)
    if a[0] <= 0:
        raise ValueError("a must have a positive constant coefficient a[0]")
    if n <= _NEWTON_MIN:
        r = np.zeros(n)
        r[0] = math.sqrt(a[0])
        two_r0 = 2.0 * r[0]
        for t in range(1, n):
            r[t] = (a[t] - r[1:t] @ r[t - 1 : 0 : -1]) / two_r0
        return r
    r = series_sqrt(a, _NEWTON_MIN)
    m = _NEWTON_MIN
    while m < n:
        m = min(2 * m, n)
        r_ext = _as_series(r, m)
        q = fftconvolve(a[:m], series_inverse(r_ext, m))[:m]
        r = 0.5 * (r_ext + q)
    return r


def series_inverse_sqrt(a: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` coefficients of ``a(x)^{-1/2}``: ``T(a)^{-1/2}``.

    Only the first ``n`` coefficients of ``a`` are used, so the ``p``-band of ``T(a)^{-1/2}``
    costs ``O(p^2)`` whatever the size of ``T``.
    """
    return series_inverse(series_sqrt(a, n), n)


# ----------------------------------------------------------------------- Toeplitz matrices
def toeplitz_dense(c: np.ndarray, n: int) -> np.ndarray:
    """Dense ``n x n`` lower-triangular Toeplitz matrix with first column ``c`` (padded)."""
    c = _as_series(c, n)
    idx = np.arange(n)
    lag = idx[:, None] - idx[None, :]
    return np.where(lag >= 0, c[np.clip(lag, 0, n - 1)], 0.0)


def toeplitz_band(c: np.ndarray, n: int, p: int | None = None) -> np.ndarray:
    """``(n, p)`` band ``band[t, j] = c_j`` for ``j <= t`` (else ``0``); ``p`` defaults to
    ``len(c)`` capped at ``n``."""
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    p = min(c.size, n) if p is None else int(p)
    c = _as_series(c, p)
    band = np.broadcast_to(c, (n, p)).copy()
    t = np.arange(n)[:, None]
    band[np.arange(p)[None, :] > t] = 0.0
    return band


def toeplitz_gram(c: np.ndarray, n: int) -> np.ndarray:
    """``X = C^T C`` for the ``n x n`` lower-triangular Toeplitz ``C`` with first column ``c``.

    ``X[i, j] = sum_{s=0}^{n-1-max(i,j)} c_s c_{s+|j-i|}`` (truncated autocorrelation), built
    lag by lag from cumulative sums in ``O(n L)`` for ``L = len(trim(c))`` (no ``n^3``).
    """
    c = _as_series(c, n)
    L = _trim(c).size
    X = np.zeros((n, n))
    for d in range(min(L, n)):
        cum = np.cumsum(c[: n - d] * c[d:n])  # cum[m] = sum_{s<=m} c_s c_{s+d}
        i = np.arange(n - d)
        vals = cum[n - 1 - (i + d)]
        X[i, i + d] = vals
        X[i + d, i] = vals
    return X


# ----------------------------------------------------------------------- bands
def dense_to_band(M: np.ndarray, p: int) -> np.ndarray:
    """``(n, p)`` band of a lower-triangular matrix: ``band[t, j] = M[t, t - j]``."""
    M = np.asarray(M, dtype=np.float64)
    n = M.shape[0]
    band = np.zeros((n, p))
    for j in range(min(p, n)):
        band[j:, j] = np.diagonal(M, -j)
    return band


def band_to_dense(band: np.ndarray) -> np.ndarray:
    """Dense lower-triangular matrix from an ``(n, p)`` band."""
    band = np.asarray(band, dtype=np.float64)
    n, p = band.shape
    M = np.zeros((n, n))
    for j in range(min(p, n)):
        idx = np.arange(j, n)
        M[idx, idx - j] = band[j:, j]
    return M


def band_product(a: np.ndarray, b: np.ndarray, p: int | None = None) -> np.ndarray:
    """``p``-band of ``L_a L_b`` for lower-triangular ``L_a, L_b`` given by their bands
    (``O(n p^2)``): ``(L_a L_b)[t, t-d] = sum_{e=0}^{d} a[t, e] b[t-e, d-e]``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[0]
    p = min(a.shape[1] + b.shape[1] - 1, n) if p is None else int(p)
    out = np.zeros((n, p))
    for d in range(p):
        for e in range(min(d, a.shape[1] - 1) + 1):
            if d - e >= b.shape[1]:
                continue
            # rows t >= d: a[t, e] * b[t - e, d - e]
            out[d:, d] += a[d:, e] * b[d - e : n - e, d - e]
    return out


def band_inverse(band: np.ndarray, p: int | None = None) -> np.ndarray:
    """``p``-band of ``L^{-1}`` from the band of lower-triangular ``L`` (``O(n p^2)``).

    From ``sum_{e=0}^{d} L[t, t-e] Y[t-e, t-d] = 0`` (``d >= 1``):
    ``Y[t, t-d] = -(1 / L[t, t]) sum_{e=1}^{d} L[t, t-e] Y[t-e, t-d]``.
    """
    band = np.asarray(band, dtype=np.float64)
    n, q = band.shape
    p = q if p is None else int(p)
    diag = band[:, 0]
    if np.any(diag == 0):
        raise ValueError("band must have a non-zero diagonal (band[:, 0])")
    Y = np.zeros((n, p))
    Y[:, 0] = 1.0 / diag
    for d in range(1, min(p, n)):
        acc = np.zeros(n - d)
        for e in range(1, min(d, q - 1) + 1):
            # t = d..n-1 : L[t, t-e] * Y[t-e, (t-e)-(d-e)]
            acc += band[d:, e] * Y[d - e : n - e, d - e]
        Y[d:, d] = -acc / diag[d:]
    return Y


def band_sqrt(band: np.ndarray, p: int | None = None) -> np.ndarray:
    """``p``-band of the principal square root ``R`` of lower-triangular ``L`` (positive
    diagonal) from the band of ``L``, ``O(n p^2)`` (no ``n x n`` matrix):
    ``R[t, t-d] (R[t, t] + R[t-d, t-d]) = L[t, t-d] - sum_{e=1}^{d-1} R[t, t-e] R[t-e, t-d]``.
    """
    band = np.asarray(band, dtype=np.float64)
    n, q = band.shape
    p = q if p is None else int(p)
    if np.any(band[:, 0] <= 0):
        raise ValueError("band must have a positive diagonal (band[:, 0])")
    R = np.zeros((n, p))
    R[:, 0] = np.sqrt(band[:, 0])
    for d in range(1, min(p, n)):
        rhs = band[d:, d].copy() if d < q else np.zeros(n - d)
        for e in range(1, d):
            rhs -= R[d:, e] * R[d - e : n - e, d - e]
        R[d:, d] = rhs / (R[d:, 0] + R[: n - d, 0])
    return R
