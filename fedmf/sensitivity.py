"""L2 sensitivity of a strategy matrix ``C`` under a participation schema.

``sens(C) = sup ||sum_{i in pattern} C e_i g_i^T||_F`` over allowed patterns and contributions
``||g_i|| <= 1`` (unit clip).  With ``X = C^T C`` this is
``sup sum_{i,j} X_ij <g_i, g_j>``; where ``X >= 0`` on the entries a pattern can touch, the
supremum is attained at equal ``g_i`` and 0/1 patterns, so ``sens^2 = max_P 1_P^T X 1_P``
(exact).  Otherwise ``|X|`` gives an upper bound, reported with ``exact=False``.

Participation (``fedmf.participation``):

* ``single``: the maximum column norm (always exact).
* ``min_sep`` (``b``-min-separation, rounds ``i < j`` of one user need ``j - i >= b``; ``b = 1``
  allows consecutive rounds; at most ``k`` participations):

  - columns of a ``C`` with bandwidth ``<= b`` are orthogonal on a pattern, so
    ``sens^2 = max_P sum_{i in P} ||C e_i||^2`` — an ``O(n k)`` dynamic programme (exact);
  - Toeplitz ``C`` with non-negative, non-increasing coefficients: the pattern
    ``{0, b, ..., (k-1) b}`` is the worst one (Kalinin & Lampert 2024, arXiv:2405.13763,
    Thm. on Toeplitz sensitivity; checked against brute force in ``tests/test_sensitivity.py``);
  - otherwise (dense ``X``, ``n <= 2048``): an *upper bound* by dynamic programming,
    ``r_i = X_ii + max_{S ∋ i} sum_{j in S \\ i} X_ij`` (best ``b``-separated ``<= k``-set through
    ``i``, a DP over the row) and ``sens^2 <= max_P sum_{i in P} r_i`` (a DP over ``r``), and a
    *lower bound* from the DP's argmax pattern, evenly spaced patterns and a local search;
    ``exact`` when both agree to ``1e-9`` relative, else the upper bound is reported.
* ``cyclic`` (``k``, ``b``): subsets of at most ``k`` rounds of ``{i, i + b, ...}``; with
  ``X >= 0`` on a class and ``k >=`` its size, the full class is worst; the classes are
  enumerated (Toeplitz ``C``: per-class sums from truncated autocorrelations, ``O(n k)``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .linalg import _trim, band_to_dense, toeplitz_dense, toeplitz_gram
from .participation import Participation

logger = logging.getLogger(__name__)

__all__ = ["Sensitivity", "brute_force_sensitivity", "sensitivity"]

_DENSE_MAX = 2048
_REL_TOL = 1e-9
_CHUNK_ENTRIES = 8_000_000


@dataclass(frozen=True)
class Sensitivity:
    """``value``: the sensitivity (an upper bound when ``exact`` is False)."""

    value: float
    exact: bool

    def __float__(self) -> float:
        return float(self.value)


# ----------------------------------------------------------------------- brute force
def brute_force_sensitivity(C: np.ndarray, participation: Participation | None) -> float:
    """``max_P ||sum_{i in P} C e_i||`` over :meth:`Participation.patterns` (small ``n``).

    Equal to the sensitivity when ``C^T C >= 0``; a lower bound otherwise.
    """
    C = np.asarray(C, dtype=np.float64)
    n = C.shape[1]
    part = participation or Participation.single()
    best = 0.0
    for pat in part.patterns(n):
        v = C[:, list(pat)].sum(axis=1)
        best = max(best, float(v @ v))
    return math.sqrt(best)


# ----------------------------------------------------------------------- DP helpers
def _best_separated(weights: np.ndarray, k: int, b: int) -> tuple[float, list[int]]:
    """``max sum_{i in S} w_i`` over ``b``-separated sets of ``<= k`` indices, with argmax."""
    n = weights.size
    w = np.maximum(weights, 0.0)
    G = np.zeros((n + 1, k + 1))  # G[j+1, m]: best over indices <= j with <= m elements
    take = np.zeros((n, k + 1), dtype=bool)
    for j in range(n):
        prev = G[j]
        back = G[j + 1 - b] if j + 1 - b >= 0 else G[0]
        cand = np.empty(k + 1)
        cand[0] = -np.inf
        cand[1:] = back[:-1] + w[j]
        take[j] = cand > prev
        G[j + 1] = np.where(take[j], cand, prev)
    S: list[int] = []
    j, m = n - 1, k
    while j >= 0 and m > 0:
        if take[j, m]:
            S.append(j)
            j -= b
            m -= 1
        else:
            j -= 1
    return float(G[n, k]), sorted(S)


def _row_dp(W: np.ndarray, k: int, b: int) -> np.ndarray:
    """``L[i, a]`` = best sum of ``W[i, j]`` over ``b``-separated sets of ``<= a`` indices
    ``j <= i - b`` (``a = 0..k-1``); rows processed in chunks, ``O(n^2 k)`` time."""
    n = W.shape[0]
    L = np.zeros((n, k))
    if k == 1:
        return L
    rows_per_chunk = max(1, _CHUNK_ENTRIES // (k * (b + 1)))
    for r0 in range(b, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        Wc = W[r0:r1]
        hist = np.zeros((b + 1, r1 - r0, k))  # ring buffer of F_{j}, F_{-1..} = 0
        for j in range(0, r1 - b):
            prev = hist[(j - 1) % (b + 1)] if j >= 1 else np.zeros((r1 - r0, k))
            back = hist[(j - b) % (b + 1)] if j >= b else np.zeros((r1 - r0, k))
            cur = prev.copy()
            np.maximum(cur[:, 1:], back[:, :-1] + Wc[:, j, None], out=cur[:, 1:])
            hist[j % (b + 1)] = cur
            i = j + b  # row i reads F_{i-b}
            if r0 <= i < r1:
                L[i] = cur[i - r0]
    return L


def _pattern_value(W: np.ndarray, S: list[int] | np.ndarray) -> float:
    S = np.asarray(S, dtype=int)
    return float(W[np.ix_(S, S)].sum())


def _local_search(W: np.ndarray, S: list[int], b: int, passes: int = 20) -> list[int]:
    n = W.shape[0]
    S = sorted(S)
    idx = np.arange(n)
    diag = np.diagonal(W)
    for _ in range(passes):
        improved = False
        for pos in range(len(S)):
            others = S[:pos] + S[pos + 1 :]
            ok = np.ones(n, dtype=bool)
            for s in others:
                ok &= np.abs(idx - s) >= b
            gain = diag + 2.0 * W[:, others].sum(axis=1) if others else diag.copy()
            gain[~ok] = -np.inf
            j = int(np.argmax(gain))
            if gain[j] > gain[S[pos]] * (1 + 1e-14) + 1e-300:
                S = sorted([*others, j])
                improved = True
        if not improved:
            break
    return S


def _minsep_bounds(W: np.ndarray, k: int, b: int) -> tuple[float, float]:
    """``(upper, lower)`` bounds of ``max_P 1_P^T W 1_P`` over ``b``-separated ``<= k``-sets
    (``W >= 0`` symmetric)."""
    n = W.shape[0]
    k = min(k, (n - 1) // b + 1)
    if k == 1:
        v = float(np.max(np.diagonal(W)))
        return v, v
    Lf = _row_dp(W, k, b)
    Lr = _row_dp(W[::-1, ::-1], k, b)[::-1]
    r = np.diagonal(W) + np.max(Lf + Lr[:, ::-1], axis=1)  # a + c = k - 1
    upper, S = _best_separated(r, k, b)
    cands = [S]
    # evenly spaced patterns: spacing b (every start) and the widest spacing
    starts = np.arange(0, n - (k - 1) * b)
    vals = np.zeros(starts.size)
    for u in range(k):
        for v in range(k):
            vals += W[starts + u * b, starts + v * b]
    cands.append([int(starts[np.argmax(vals)]) + u * b for u in range(k)])
    wide = (n - 1) // (k - 1)
    cands.append([u * wide for u in range(k)])
    best = max(cands, key=lambda P: _pattern_value(W, P))
    best = _local_search(W, best, b)
    lower = max(_pattern_value(W, P) for P in [*cands, best])
    return max(upper, lower), lower


# ----------------------------------------------------------------------- strategies
class _Strategy:
    """Uniform access to a dense, Toeplitz or banded lower-triangular ``C``."""

    def __init__(self, n: int, C: np.ndarray | None, toeplitz: np.ndarray | None,
                 band: np.ndarray | None) -> None:
        self.n = n
        self.C = self.c = self.band = None
        if C is not None:
            C = np.asarray(C, dtype=np.float64)
            if C.shape != (n, n):
                raise ValueError(f"C must have shape ({n}, {n}), got {C.shape}")
            self.C = C
            first = C[:, 0]
            if np.array_equal(C, np.tril(C)) and np.allclose(
                    C, toeplitz_dense(first, n), rtol=0.0,
                    atol=1e-14 * float(np.max(np.abs(first)))):
                self.C, self.c = None, _trim(first.copy())  # Toeplitz: structured paths
        elif toeplitz is not None:
            c = np.asarray(toeplitz, dtype=np.float64).reshape(-1)[:n]
            if c.size == 0:
                raise ValueError("toeplitz must have at least one coefficient")
            self.c = _trim(c)
        else:
            band = np.asarray(band, dtype=np.float64)
            if band.ndim != 2 or band.shape[0] != n:
                raise ValueError(f"band must have shape ({n}, p), got {band.shape}")
            self.band = band

    def col_norms2(self) -> np.ndarray:
        n = self.n
        if self.c is not None:
            cum = np.cumsum(self.c * self.c)
            return cum[np.minimum(n - 1 - np.arange(n), self.c.size - 1)]
        if self.band is not None:
            out = np.zeros(n)
            for j in range(self.band.shape[1]):
                col = self.band[j:, j]
                out[: n - j] += col * col
            return out
        return np.einsum("ij,ij->j", self.C, self.C)

    def bandwidth(self) -> int:
        if self.c is not None:
            return int(self.c.size)
        if self.band is not None:
            nz = np.flatnonzero(np.any(self.band != 0, axis=0))
            return int(nz[-1] + 1) if nz.size else 1
        lags = np.subtract.outer(np.arange(self.n), np.arange(self.n))
        nz = lags[self.C != 0]
        return int(np.max(np.abs(nz)) + 1) if nz.size else 1

    def gram(self) -> np.ndarray:
        if self.c is not None:
            return toeplitz_gram(self.c, self.n)
        C = band_to_dense(self.band) if self.band is not None else self.C
        return C.T @ C

    def column_sum_norm2(self, pattern: list[int]) -> float:
        n = self.n
        if self.c is not None:
            v = np.zeros(n)
            for i in pattern:
                m = min(self.c.size, n - i)
                v[i : i + m] += self.c[:m]
            return float(v @ v)
        C = band_to_dense(self.band) if self.band is not None else self.C
        v = C[:, pattern].sum(axis=1)
        return float(v @ v)


def _orthogonal_columns(norms2: np.ndarray, kind: str, k: int, b: int) -> float:
    n = norms2.size
    if kind == "cyclic":
        K = -(-n // b)
        padded = np.zeros(K * b)
        padded[:n] = norms2
        cls = -np.sort(-padded.reshape(K, b), axis=0)  # per class, descending
        return float(np.max(cls[:k].sum(axis=0)))
    if np.all(np.diff(norms2) <= 1e-15 * norms2[0]):
        return float(norms2[[u * b for u in range(k)]].sum())
    return _best_separated(norms2, k, b)[0]


def _toeplitz_cyclic_full(c: np.ndarray, n: int, b: int) -> tuple[float, float, bool]:
    """Per-class sums for Toeplitz ``C`` when every class is a full pattern:
    ``(max signed sum, max |.| sum, all pair entries >= 0)``."""
    K = -(-n // b)
    cp = np.zeros(n)
    cp[: c.size] = c
    offsets = np.arange(min(b, n))
    signed = np.zeros(offsets.size)
    absol = np.zeros(offsets.size)
    nonneg = True
    tol = 1e-12 * float(c @ c)
    for delta in range(K):
        d = delta * b
        S = np.cumsum(cp[: n - d] * cp[d:])  # S[m] = sum_{s<=m} c_s c_{s+d}
        f = 1.0 if delta == 0 else 2.0
        for u in range(K - delta):
            y = offsets + (u + delta) * b  # larger index of the pair
            ok = y <= n - 1
            vals = np.where(ok, S[np.clip(n - 1 - y, 0, n - 1)], 0.0)
            if np.any(vals < -tol):
                nonneg = False
            signed += f * vals
            absol += f * np.abs(vals)
    return float(np.max(signed)), float(np.max(absol)), nonneg


def _dense_generic(X: np.ndarray, kind: str, k: int, b: int) -> Sensitivity:
    n = X.shape[0]
    tol = 1e-12 * float(np.max(np.abs(np.diagonal(X))))
    if kind == "cyclic":
        up_best, low_best, nonneg = 0.0, 0.0, True
        for off in range(min(b, n)):
            P = np.arange(off, n, b)
            W = X[np.ix_(P, P)]
            if np.min(W) < -tol:
                nonneg = False
                W = np.abs(W)
            if k >= P.size:
                up = low = float(W.sum())
            else:
                up, low = _minsep_bounds(W, k, 1)
            up_best, low_best = max(up_best, up), max(low_best, low)
        exact = nonneg and up_best - low_best <= _REL_TOL * up_best
        return Sensitivity(math.sqrt(up_best), bool(exact))
    lag = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    relevant = (lag >= b) | (lag == 0)
    W = np.where(relevant, X, 0.0)
    nonneg = not np.min(W) < -tol
    if not nonneg:
        W = np.abs(W)
    up, low = _minsep_bounds(W, k, b)
    exact = nonneg and up - low <= _REL_TOL * up
    return Sensitivity(math.sqrt(up), bool(exact))


# ----------------------------------------------------------------------- public
def sensitivity(
    *,
    participation: Participation | None,
    rounds: int,
    C: np.ndarray | None = None,
    toeplitz: np.ndarray | None = None,
    band: np.ndarray | None = None,
) -> Sensitivity:
    """Sensitivity of ``C`` (unit clip) under ``participation`` (``None``: single).

    Give exactly one of ``C`` (dense ``rounds x rounds`` lower triangular), ``toeplitz`` (first
    column of a lower-triangular Toeplitz ``C``; shorter arrays are zero-padded, i.e. banded)
    or ``band`` (``(rounds, p)``, ``band[t, j] = C[t, t - j]``).  See the module docstring for
    the algorithms and when the value is exact.
    """
    if sum(x is not None for x in (C, toeplitz, band)) != 1:
        raise ValueError("C, toeplitz or band: exactly one must be given")
    if isinstance(rounds, bool) or not hasattr(rounds, "__index__") or int(rounds) < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    n = int(rounds)
    part = participation or Participation.single()
    part.validate(n)
    strat = _Strategy(n, C, toeplitz, band)
    norms2 = strat.col_norms2()
    k = part.effective_k(n)
    b = part.min_sep
    if k == 1:
        return Sensitivity(math.sqrt(float(np.max(norms2))), True)
    kind = part.kind
    if strat.bandwidth() <= b:
        return Sensitivity(math.sqrt(_orthogonal_columns(norms2, kind, k, b)), True)
    K = -(-n // b)  # size of the largest cyclic class
    c = strat.c
    if c is not None:
        scale = float(np.max(np.abs(c)))
        nonneg = bool(np.min(c) >= -1e-14 * scale)
        monotone = nonneg and bool(np.all(np.diff(c) <= 1e-14 * scale))
        if monotone:  # packed pattern {0, b, ..} is the worst b-separated set
            return Sensitivity(math.sqrt(strat.column_sum_norm2([u * b for u in range(k)])),
                               True)
        if kind == "cyclic" and k >= K:
            if nonneg:  # class 0 dominates every other class elementwise
                comb = np.zeros(n)
                comb[::b] = 1.0
                v = fftconvolve(c, comb)[:n] if c.size > 64 else np.convolve(c, comb)[:n]
                return Sensitivity(math.sqrt(float(v @ v)), True)
            if n * K <= 50_000_000:
                signed, absol, ok = _toeplitz_cyclic_full(c, n, b)
                if ok:
                    return Sensitivity(math.sqrt(max(signed, 0.0)), True)
                return Sensitivity(math.sqrt(absol), False)
    if n <= _DENSE_MAX or (kind == "cyclic" and k >= K and n <= 4 * _DENSE_MAX):
        return _dense_generic(strat.gram(), kind, k, b)
    value = k * math.sqrt(float(np.max(norms2)))
    logger.warning("sensitivity: no structured bound for this C with n=%d > %d; using the "
                   "triangle bound k * max column norm = %.6g", n, _DENSE_MAX, value)
    return Sensitivity(value, False)
