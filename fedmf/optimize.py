"""Numerical optimisation of matrix factorizations ``A = B C`` for correlated-noise DP training.

Two solvers, both used by :func:`fedmf.factorizations.factorize`:

* :func:`optimize_banded_inverse` (method ``"opt-bisr"``): the noising matrix
  ``C^{-1} = M`` is a lower-triangular *banded Toeplitz* matrix with ``p`` coefficients
  ``m_0..m_{p-1}`` (``M[t, t-j] = m_j``), so the streaming noise is ``w_t = sum_j m_j z_{t-j}``
  (O(p d) memory, as BISR of Kalinin & Lampert 2024, arXiv:2405.13763).  Unlike BISR, whose
  coefficients are the ``p``-band of ``A_1^{-1/2}``, and the schedule-aware ``lr-bisr`` of
  arXiv:2511.17994 (band of ``T(chi)^{-1/2}``), the coefficients are optimised for the *actual*
  workload ``A`` (learning-rate schedule, momentum, weight decay) and participation pattern,
  minimising ``MeanSE = sens(C) ||A C^{-1}||_F / sqrt(n)`` or (a smooth surrogate of)
  ``MaxSE = sens(C) max_i ||(A C^{-1})_i||_2`` with analytic gradients and L-BFGS-B.

* :func:`optimal_dense` (method ``"optimal"``): the optimal dense factorization,
  ``min tr(A X^{-1} A^T)`` over PSD ``X = C^T C`` under the sensitivity constraint, solved in
  the Lagrange dual (Denisov et al. 2022, "Improved differential privacy for SGD via optimal
  private linear operators on adaptive streams", NeurIPS; the dual / fixed point of their
  Thm. 3.2; single participation: damped multiplicative fixed point with a duality-gap stop,
  ``k > 1``: L-BFGS), followed by a "reverse Cholesky" factor ``C`` (lower triangular,
  ``C^T C = X``).

Conventions follow ``docs/CONTRACT.md`` and ``shared/papers/NOTES.md``: unit clip, unit noise,
``sens`` = max column norm (single participation) or the worst participation pattern.

Maths of ``opt-bisr`` (all O(n p) per evaluation after an O(n^2 p) precomputation):

* **Error.**  ``B = A M`` with ``B[:, s] = sum_j m_j A[:, s + j]``, hence
  ``||B||_F^2 = m^T G m`` with the ``p x p`` Gram matrix
  ``G[j, k] = sum_s <A[:, s+j], A[:, s+k]>`` (suffix sums of the near diagonals of ``A^T A``),
  and row-wise ``||B_i||^2 = m^T G_i m``.  Both are precomputed once.
* **Inverse.**  ``C = M^{-1}`` is lower-triangular Toeplitz whose first column ``c`` is the
  power-series inverse of ``m`` (``c = 1/m``, an IIR impulse response, O(n p)).  Its
  derivative is ``dc = -c * dm * c`` (series products), so for a loss ``L(c)`` with gradient
  ``g``: ``dL/dm_j = -sum_t g_t (c*c)_{t-j}``.
* **Sensitivity.**  Column ``i`` of ``C`` is ``c`` shifted down by ``i``, so
  ``<C e_i, C e_j> = sum_{s < n-j} c_s c_{s+j-i}`` (``i <= j``).  Single participation:
  ``sens^2 = ||c||^2`` (column 0 is the longest).  ``k`` participations ``b`` apart: the
  optimiser uses the value that :func:`fedmf.sensitivity.sensitivity` *certifies* (privacy
  is accounted with it).  Cyclic
  participation with full classes (``k >= ceil(n / b)``, e.g. ``n = k b``):
  ``sens^2 = max_o sum_{i, j in {o, o+b, ..}} |<C e_i, C e_j>|`` -- exact when the in-class
  products are non-negative, the certified upper bound otherwise -- so negative products are
  never credited (the signed pattern value would be, and the optimiser exploited that).
  Otherwise the pattern value ``1_P^T X 1_P``, ``P = {0, b, ..., (k-1) b}``, is optimised and
  every candidate (including the BISR / lr-BISR starting points) is ranked by its certified
  errors, so the result is never worse than those closed forms under the certified value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.signal

from .sensitivity import Sensitivity, sensitivity

logger = logging.getLogger(__name__)

__all__ = [
    "BandedInverseResult",
    "banded_inverse_errors",
    "bisr_coeffs",
    "lr_bisr_coeffs",
    "optimal_dense",
    "optimize_banded_inverse",
    "reverse_cholesky",
]

OBJECTIVES = ("mean", "max")

# Above this many entries (n * p^2) the row-wise Gram tensor is not stored and the MaxSE
# surrogate is evaluated from B = A M directly (O(n^2 p) per evaluation).
_ROW_GRAM_MAX_ENTRIES = 12_000_000
_STEP_SCALE = 1e-2
# p-norm sharpness schedule of the smooth MaxSE surrogate (warm-started continuation).
_SHARPNESS = (1.0, 8.0, 64.0, 512.0, 4096.0)
# optimal_dense (single participation): identity blend of the unit-diagonal primal iterate,
# ridge for numerically singular workloads, duality-gap check every few iterations.
_DENSE_RIDGE = (1e-10, 1e-8, 1e-6)
_DENSE_DROP = 1e-9
_W_RIDGE = 1e-14
_GAP_EVERY = 5


# --------------------------------------------------------------------------- helpers
def _participation_kb(participation: Any, n: int) -> tuple[str, int, int]:
    """Return ``(kind, k, b)``; ``None`` means single participation."""
    if participation is None:
        return "single", 1, 1
    kind = str(getattr(participation, "kind", "single"))
    if kind == "single":
        return "single", 1, 1
    if kind not in ("min_sep", "cyclic"):
        raise ValueError(f"participation kind must be single, min_sep or cyclic, got {kind!r}")
    k = int(participation.max_participations)
    b = int(participation.min_sep)
    if k < 1 or b < 1 or (k - 1) * b >= n:
        raise ValueError(
            f"participation needs k >= 1, b >= 1 and (k-1)*b < rounds={n}, got k={k}, b={b}"
        )
    return kind, k, b


def _workload_dense(workload: Any) -> np.ndarray:
    A = np.asarray(workload.dense(), dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"workload must give a square matrix, got shape {A.shape}")
    return A


def _series_inverse(m: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` coefficients of the power series ``1 / m(x)`` (IIR impulse response)."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return scipy.signal.lfilter([1.0], m, impulse)


def _series_sqrt(a: np.ndarray, p: int) -> np.ndarray:
    """First ``p`` coefficients of ``a(x)^{1/2}`` (``a_0 > 0``), by the square recursion."""
    a = np.zeros(p) if a.size == 0 else np.asarray(a, dtype=np.float64)
    a = np.concatenate([a[:p], np.zeros(max(0, p - a.size))])
    r = np.zeros(p)
    r[0] = math.sqrt(a[0])
    for t in range(1, p):
        r[t] = (a[t] - r[1:t] @ r[t - 1 : 0 : -1]) / (2.0 * r[0])
    return r


def _series_inv_sqrt(a: np.ndarray, p: int) -> np.ndarray:
    return _series_inverse(_series_sqrt(a, p), p)


def bisr_coeffs(bands: int) -> np.ndarray:
    """The ``p``-band of ``A_1^{-1/2}``: coefficients of ``(1 - x)^{1/2}`` (BISR init)."""
    m = np.ones(bands)
    for j in range(1, bands):
        m[j] = m[j - 1] * (j - 1.5) / j
    return m


def lr_bisr_coeffs(rates: np.ndarray, bands: int) -> np.ndarray:
    """The ``p``-band of ``T(chi)^{-1/2}``, ``chi_t = eta_t / eta_0`` (arXiv:2511.17994)."""
    rates = np.asarray(rates, dtype=np.float64)
    return _series_inv_sqrt(rates[:bands] / rates[0], bands)


def reverse_cholesky(X: np.ndarray) -> np.ndarray:
    """Lower-triangular ``C`` with ``C^T C = X`` (``X`` symmetric positive definite).

    With the exchange matrix ``J``: ``J X J = L L^T`` (Cholesky) gives ``C = J L^T J``, which
    is lower triangular and ``C^T C = J L L^T J = X``.
    """
    Xr = X[::-1, ::-1]
    L = np.linalg.cholesky(0.5 * (Xr + Xr.T))
    return np.ascontiguousarray(L.T[::-1, ::-1])


# ------------------------------------------------------------------ sensitivity (Toeplitz C)
def _pattern_weights(n: int, k: int, b: int) -> list[tuple[int, float, np.ndarray]]:
    """For each lag ``d = delta*b`` the weights ``w[t]`` (``t < n - d``) with
    ``sens^2 = sum_delta f_delta sum_t w[t] c_t c_{t+d}`` for ``P = {0, b, .., (k-1)b}``."""
    out = []
    for delta in range(k):
        d = delta * b
        diff = np.zeros(n - d + 1)
        for a2 in range(delta, k):  # pair (a, a2 = a + delta): sum_{t < n - a2 b} c_t c_{t+d}
            diff[0] += 1.0
            diff[n - a2 * b] -= 1.0
        w = np.cumsum(diff)[: n - d]
        out.append((d, 1.0 if delta == 0 else 2.0, w))
    return out


def _sens2_and_grad(c: np.ndarray, weights: list[tuple[int, float, np.ndarray]]
                    ) -> tuple[float, np.ndarray]:
    n = c.size
    s2 = 0.0
    g = np.zeros(n)
    for d, f, w in weights:
        head, tail = c[: n - d], c[d:]
        s2 += f * float(w @ (head * tail))
        g[: n - d] += f * w * tail
        g[d:] += f * w * head
    return s2, g


def _cyclic_class_index(n: int, k: int, b: int) -> list[tuple[int, float, np.ndarray]]:
    """For cyclic participation where every class ``{o, o+b, ...}`` is a full pattern
    (``k >=`` class size): per lag ``d = delta*b`` the positions ``m[o, u]`` with
    ``<C e_i, C e_j> = S_d[m]`` (``S_d[m] = sum_{s <= m} c_s c_{s+d}``) of the pairs
    ``(i, j) = (o + u b, o + (u + delta) b)`` of class ``o`` (``-1``: pair outside ``[0, n)``)."""
    out = []
    o = np.arange(min(b, n))[:, None]
    for delta in range(k):
        u = np.arange(k - delta)[None, :]
        m = n - 1 - (o + (u + delta) * b)
        out.append((delta * b, 1.0 if delta == 0 else 2.0, np.where(m >= 0, m, -1)))
    return out


def _cyclic_abs_sens2_and_grad(c: np.ndarray, index: list[tuple[int, float, np.ndarray]]
                               ) -> tuple[float, np.ndarray]:
    """``max_o sum_{i, j in class o} |<C e_i, C e_j>|`` and a (sub)gradient in ``c``.

    This is what :func:`fedmf.sensitivity.sensitivity` certifies for a Toeplitz ``C`` under
    cyclic participation with full classes: the exact value when all in-class products are
    non-negative, otherwise this upper bound (``exact=False``).  Optimising the signed
    pattern value instead lets the optimiser "earn" privacy from negative products that the
    certified bound does not credit.
    """
    n = c.size
    per_class = np.zeros(index[0][2].shape[0])
    sums = []
    for d, f, m in index:
        S = np.cumsum(c[: n - d] * c[d:])
        vals = np.where(m >= 0, S[np.maximum(m, 0)], 0.0)
        per_class += f * np.abs(vals).sum(axis=1)
        sums.append(vals)
    o = int(np.argmax(per_class))
    g = np.zeros(n)
    for (d, f, m), vals in zip(index, sums, strict=True):
        coef = np.zeros(n - d)
        ok = m[o] >= 0
        np.add.at(coef, m[o][ok], f * np.sign(vals[o][ok]))
        w = np.cumsum(coef[::-1])[::-1]  # w[t] = sum_{m >= t} coef[m]
        g[: n - d] += w * c[d:]
        g[d:] += w * c[: n - d]
    return float(per_class[o]), g


# ------------------------------------------------------------------------ error structure
def _gram_matrices(A: np.ndarray, p: int, rowwise: bool
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """``G`` (p x p) with ``||A M||_F^2 = m^T G m`` and optionally ``G_i`` (n x p x p) with
    ``||(A M)_i||^2 = m^T G_i m``: ``G_i[j, j+d] = sum_{u=j}^{n-1-d} A[i,u] A[i,u+d]``."""
    n = A.shape[0]
    G = np.zeros((p, p))
    Gi = np.zeros((n, p, p)) if rowwise else None
    if not rowwise:
        K = A.T @ A if p > 48 else None
        for d in range(p):
            # K[u, u+d] = <A[:, u], A[:, u+d]>, u = 0..n-1-d
            diag = (np.diagonal(K, d) if K is not None
                    else np.einsum("iu,iu->u", A[:, : n - d], A[:, d:]))
            suffix = np.cumsum(diag[::-1])[::-1]  # sum_{u >= j}
            idx = np.arange(p - d)
            G[idx, idx + d] = suffix[idx]
            G[idx + d, idx] = suffix[idx]
        return G, None
    for d in range(p):
        P = A[:, : n - d] * A[:, d:]  # P[i, u] = A[i, u] A[i, u+d]
        total = P.sum(axis=1)
        m = min(p - d, n - d)
        prefix = np.concatenate([np.zeros((n, 1)), np.cumsum(P[:, : m - 1], axis=1)], axis=1)
        vals = total[:, None] - prefix  # (n, m): sum_{u >= j}
        idx = np.arange(m)
        colsum = vals.sum(axis=0)
        G[idx, idx + d] = colsum
        G[idx + d, idx] = colsum
        if Gi is not None:
            Gi[:, idx, idx + d] = vals
            Gi[:, idx + d, idx] = vals
    return G, Gi


@dataclass
class _Problem:
    """Precomputed pieces of the opt-bisr objective for one workload / participation."""

    A: np.ndarray
    n: int
    p: int
    kind: str
    k: int
    b: int
    G: np.ndarray
    Gi: np.ndarray | None
    weights: list[tuple[int, float, np.ndarray]]
    # cyclic participation with full classes: the certified |.|-class objective
    cyclic_index: list[tuple[int, float, np.ndarray]] | None = None
    participation: Any = None

    @classmethod
    def build(cls, *, workload: Any, participation: Any, bands: int, rowwise: bool
              ) -> _Problem:
        A = _workload_dense(workload)
        n = A.shape[0]
        kind, k, b = _participation_kb(participation, n)
        rowwise_tensor = rowwise and n * bands * bands <= _ROW_GRAM_MAX_ENTRIES
        G, Gi = _gram_matrices(A, bands, rowwise_tensor)
        full_classes = kind == "cyclic" and k >= -(-n // b)
        return cls(A=A, n=n, p=bands, kind=kind, k=k, b=b, G=G, Gi=Gi,
                   weights=_pattern_weights(n, k, b),
                   cyclic_index=_cyclic_class_index(n, -(-n // b), b) if full_classes else None,
                   participation=participation)

    # -- pieces ---------------------------------------------------------------------
    def sens2(self, m: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(sens^2, d sens^2 / dm, c)``."""
        c = _series_inverse(m, self.n)
        if self.cyclic_index is not None:
            s2, gc = _cyclic_abs_sens2_and_grad(c, self.cyclic_index)
        else:
            s2, gc = _sens2_and_grad(c, self.weights)
        # dL/dm_j = -sum_t g_t (c*c)_{t-j}
        cc = scipy.signal.fftconvolve(c, c)[: self.n]
        gm = np.array([-(gc[j:] @ cc[: self.n - j]) for j in range(self.p)])
        return s2, gm, c

    def row_norms2(self, m: np.ndarray) -> np.ndarray:
        if self.Gi is not None:
            return np.einsum("ijk,j,k->i", self.Gi, m, m)
        return np.sum(self._decoder(m) ** 2, axis=1)

    def _decoder(self, m: np.ndarray) -> np.ndarray:
        B = np.zeros_like(self.A)
        for j in range(self.p):
            B[:, : self.n - j] += m[j] * self.A[:, j:]
        return B

    def _weighted_row_grad(self, m: np.ndarray, omega: np.ndarray) -> np.ndarray:
        """``sum_i omega_i d||B_i||^2 / dm``."""
        if self.Gi is not None:
            H = np.einsum("i,ijk->jk", omega, self.Gi)
            return 2.0 * H @ m
        WB = omega[:, None] * self._decoder(m)
        return np.array([2.0 * np.sum(WB[:, : self.n - j] * self.A[:, j:])
                         for j in range(self.p)])

    # -- objectives (log of squared error, scale invariant) ---------------------------
    def objective(self, m: np.ndarray, kind: str, q: float = 1.0) -> tuple[float, np.ndarray]:
        s2, gs2, _ = self.sens2(m)
        if kind == "mean":
            Gm = self.G @ m
            e2 = float(m @ Gm)
            ge2 = 2.0 * Gm
        else:  # smooth max of row norms^2: (1/q) log sum r_i^q
            r = self.row_norms2(m)
            rmax = float(np.max(r))
            z = (r / rmax) ** q
            sz = float(np.sum(z))
            e2 = rmax * sz ** (1.0 / q)
            omega = z / sz / r  # d/dm (1/q) log sum r^q = sum_i (pi_i / r_i) dr_i
            return (math.log(s2) + math.log(e2),
                    gs2 / s2 + self._weighted_row_grad(m, omega))
        return math.log(s2) + math.log(e2), gs2 / s2 + ge2 / e2

    def errors(self, m: np.ndarray) -> tuple[float, float, bool]:
        """``(MeanSE, MaxSE, sensitivity_exact)`` of coefficients ``m`` with the sensitivity
        certified by :func:`fedmf.sensitivity.sensitivity` (what privacy accounting uses)."""
        c = _series_inverse(m, self.n)
        if self.k == 1:
            sens = Sensitivity(math.sqrt(float(c @ c)), True)
        else:
            sens = sensitivity(participation=self.participation, rounds=self.n, toeplitz=c)
        s2 = sens.value ** 2
        mean = math.sqrt(s2 * float(m @ self.G @ m) / self.n)
        mx = math.sqrt(s2 * float(np.max(self.row_norms2(m))))
        return mean, mx, sens.exact


@dataclass(frozen=True)
class BandedInverseResult:
    """Errors of a banded-inverse Toeplitz noising matrix (unit clip and noise)."""

    coeffs: np.ndarray
    mean_error: float
    max_error: float
    sensitivity_exact: bool


def banded_inverse_errors(*, workload: Any, participation: Any, coeffs: np.ndarray
                          ) -> BandedInverseResult:
    """MeanSE / MaxSE of ``C^{-1} = `` banded Toeplitz(``coeffs``) via the pattern sensitivity.

    Useful to compare ``bisr`` / ``lr-bisr`` / ``opt-bisr`` on the same footing.
    """
    m = np.asarray(coeffs, dtype=np.float64)
    prob = _Problem.build(workload=workload, participation=participation, bands=m.size,
                          rowwise=True)
    mean, mx, exact = prob.errors(m)
    return BandedInverseResult(coeffs=m, mean_error=mean, max_error=mx, sensitivity_exact=exact)


# ---------------------------------------------------------------------------- opt-bisr
def _initial_points(workload: Any, bands: int) -> list[np.ndarray]:
    inits = [bisr_coeffs(bands)]
    rates = getattr(workload, "rates", None)
    if rates is not None:
        rates = np.asarray(rates, dtype=np.float64)
        if not np.allclose(rates, rates[0]):
            inits.append(lr_bisr_coeffs(rates, bands))
    toeplitz = getattr(workload, "toeplitz_coeffs", None)
    if callable(toeplitz) and (getattr(workload, "momentum", 0.0)
                               or getattr(workload, "weight_decay", 0.0)):
        t = np.asarray(toeplitz(), dtype=np.float64)
        inits.append(_series_inv_sqrt(t[:bands] / t[0], bands))
        if rates is not None and not np.allclose(rates, rates[0]):
            rate_toeplitz = getattr(workload, "rate_toeplitz_coeffs", None)
            if callable(rate_toeplitz):
                prod = np.asarray(rate_toeplitz(), dtype=np.float64)[:bands]
            else:
                prod = np.convolve(t[:bands] / t[0], rates[:bands] / rates[0])[:bands]
            inits.append(_series_inv_sqrt(prod / prod[0], bands))
    return [x / x[0] for x in inits if np.all(np.isfinite(x)) and x[0] != 0]


def _minimize(prob: _Problem, m0: np.ndarray, kind: str, q: float, maxiter: int, tol: float
              ) -> np.ndarray:
    """L-BFGS-B over ``m_1..m_{p-1}`` with ``m_0 = 1`` (errors are scale invariant)."""
    if prob.p == 1:
        return np.ones(1)

    # L-BFGS-B's first step has unit length; in m-space that overshoots into unstable m(x)
    # (exploding c), so optimise x = m_{1:} / _STEP_SCALE.
    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        m = np.concatenate([[1.0], _STEP_SCALE * x])
        try:
            with np.errstate(over="raise", invalid="raise"):
                f, g = prob.objective(m, kind, q)
        except (FloatingPointError, ValueError, ZeroDivisionError):
            return 1e6, np.zeros_like(x)
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return 1e6, np.zeros_like(x)
        return f, _STEP_SCALE * g[1:]

    res = scipy.optimize.minimize(
        fun, m0[1:] / m0[0] / _STEP_SCALE, jac=True, method="L-BFGS-B",
        options={"maxiter": maxiter, "ftol": tol, "gtol": tol * 1e-2, "maxcor": 20},
    )
    return np.concatenate([[1.0], _STEP_SCALE * res.x])


def optimize_banded_inverse(
    *,
    workload: Any,
    participation: Any = None,
    bands: int,
    objective: str = "mean",
    init: np.ndarray | None = None,
    maxiter: int = 500,
    tol: float = 1e-10,
) -> np.ndarray:
    """Optimised banded-inverse Toeplitz noising matrix (``opt-bisr``).

    Minimises ``sens(C) * ||A C^{-1}||_F / sqrt(n)`` (``objective="mean"``) or
    ``sens(C) * max_i ||(A C^{-1})_i||`` (``"max"``, through the smooth surrogate
    ``(sum_i r_i^q)^{1/q}`` of the squared row norms with ``q = 1, 8, 64, 512, 4096``; the
    iterate with the smallest exact MaxSE is returned) over the coefficients of
    ``C^{-1} = M``, ``M[t, t-j] = m_j`` for ``j < bands``.  Analytic gradients (see the module
    docstring), L-BFGS-B started from BISR (band of ``A_1^{-1/2}``), ``lr-bisr`` (band of
    ``T(chi)^{-1/2}``) and the band of the inverse root of the workload's Toeplitz part, best
    result kept; or from ``init`` only.

    Args:
        workload: a :class:`fedmf.workloads.Workload` (``dense()``, ``rates``, ...).
        participation: a :class:`fedmf.participation.Participation` (``None``: single).
        bands: number of coefficients ``p`` in ``[1, n]``.
        objective: ``"mean"`` or ``"max"``.
        init: optional starting coefficients, shape ``(bands,)``, ``init[0] != 0``.
        maxiter: L-BFGS-B iterations per start (per sharpness stage for ``"max"``).
        tol: L-BFGS-B ``ftol`` (relative decrease of the log objective).

    Returns:
        ``(bands,)`` coefficients ``m`` with ``m_0 = 1``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n = int(workload.n) if hasattr(workload, "n") else int(np.asarray(workload.rates).size)
    if not isinstance(bands, int | np.integer) or not 1 <= bands <= n:
        raise ValueError(f"bands must be in [1, rounds={n}], got {bands}")
    bands = int(bands)
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        if init.shape != (bands,) or init[0] == 0 or not np.all(np.isfinite(init)):
            raise ValueError(f"init must be finite with shape ({bands},) and init[0] != 0")
        starts = [init / init[0]]
    else:
        starts = _initial_points(workload, bands)

    prob = _Problem.build(workload=workload, participation=participation, bands=bands,
                          rowwise=objective == "max")
    best_m, best_val = None, math.inf
    for m0 in starts:
        if objective == "mean":
            m = _minimize(prob, m0, "mean", 1.0, maxiter, tol)
            cands = [(prob.errors(m0)[0], m0), (prob.errors(m)[0], m)]
        else:
            cands = [(prob.errors(m0)[1], m0)]
            m = m0
            for q in _SHARPNESS:
                m = _minimize(prob, m, "max", q, maxiter, tol)
                cands.append((prob.errors(m)[1], m))
        val, m = min(cands, key=lambda vm: vm[0])
        if val < best_val:
            best_val, best_m = val, m
    assert best_m is not None
    mean, mx, exact = prob.errors(best_m)
    logger.info("opt-bisr n=%d p=%d %s(k=%d,b=%d) objective=%s: MeanSE %.6g MaxSE %.6g",
                prob.n, bands, prob.kind, prob.k, prob.b, objective, mean, mx)
    if not exact:
        logger.info("opt-bisr: the certified sensitivity is an upper bound (C^T C has "
                    "negative in-class products); errors above use that bound")
    return best_m


# ------------------------------------------------------------------------- dense optimum
def _class_blocks(n: int, b: int) -> list[np.ndarray]:
    return [np.arange(i, n, b) for i in range(b)]


def optimal_dense(
    *,
    workload: Any,
    participation: Any = None,
    maxiter: int = 1000,
    tol: float | None = None,
) -> np.ndarray:
    """Optimal dense lower-triangular ``C`` (``sens(C) = 1``) minimising ``||A C^{-1}||_F``.

    Solves ``min tr(A X^{-1} A^T)`` over PSD ``X = C^T C`` (Denisov et al. 2022):

    * single participation: ``diag(X) <= 1``.  Lagrange dual (Denisov et al. 2022, Thm. 3.2
      and its fixed point): for ``D = diag(v) > 0`` the inner minimiser is
      ``X(D) = D^{-1/2} (D^{1/2} W D^{1/2})^{1/2} D^{-1/2}`` (``W = A^T A``) and the dual is
      ``g(v) = 2 tr((D^{1/2} W D^{1/2})^{1/2}) - sum(v)`` with ``dg/dv = diag(X) - 1``;
      solved by the damped multiplicative fixed point ``v <- v diag(X(v))^omega`` until the
      relative duality gap (primal: ``X(v)`` rescaled to unit diagonal) is below ``tol``
      (:func:`_dual_single`; scale-free, so tiny learning rates do not stall it).
    * ``k > 1`` participations ``b`` apart (``cyclic``; ``min_sep`` uses the same classes
      ``{i, i+b, ...}`` as the standard approximation): the constraint
      ``1_P^T X 1_P <= 1`` alone is unbounded below (``X`` may grow without bound on the
      orthogonal complement of the pattern indicators, where it turns negative and the
      pattern formula stops being the sensitivity).  We therefore use the exact
      multi-epoch formulation of Choquette-Choo et al. 2023 ("Multi-epoch matrix
      factorization mechanisms", ICML): columns of ``C`` in the same class are orthogonal
      (``X_ij = 0``, ``i != j`` same class) and ``X_ii <= 1/k``; then any ``k`` columns of a
      class have ``||sum_i C e_i x_i||^2 <= 1`` for unit ``x_i`` -- exact for cyclic
      participation, for any sign pattern of ``X``; for ``b``-min-separation it ignores
      patterns mixing classes (documented approximation; ``fedmf.sensitivity`` gives the
      real value).  The dual variable ``D`` is block diagonal over the classes,
      ``D = L L^T`` (see :func:`_dual_classes`).

    ``C`` is the reverse-Cholesky factor of ``X`` rescaled to unit sensitivity
    (max column norm; for ``k > 1`` the upper bound of :func:`_dense_class_sensitivity`,
    which also covers the tiny residual in-class inner products left by the solver).

    Args:
        workload: workload with ``dense()``.
        participation: ``Participation`` or ``None`` (single).
        maxiter: fixed-point iterations (single participation) or L-BFGS iterations on the
            dual (``k > 1``).
        tol: relative duality gap of the squared error (single participation; default
            ``1e-7``, about the floating-point floor) or gradient tolerance, i.e. max
            violation of the primal constraints (``k > 1``; default ``1e-9``).

    Returns:
        ``(n, n)`` lower-triangular ``C`` with ``A = B C``, ``B = A C^{-1}``.
    """
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    A = _workload_dense(workload)
    n = A.shape[0]
    _, k, b = _participation_kb(participation, n)
    if k == 1:
        return np.tril(_dual_single(A, maxiter=maxiter, tol=1e-7 if tol is None else tol))
    W = A.T @ A
    # the optimal X does not depend on the scale of W; L-BFGS on the dual does (momentum
    # workloads have entries ~1/(1-beta)), so solve for the unit-diagonal-scaled W
    W /= float(np.max(np.diag(W)))
    X = _dual_classes(W, b=b, k=k, maxiter=maxiter, tol=1e-9 if tol is None else tol)
    X = 0.5 * (X + X.T)
    # Primal recovery as for single participation: the dual's X is positive definite in exact
    # arithmetic but can be numerically singular (ill-conditioned momentum workloads); blend
    # it with the feasible I / k (diagonal only, so in-class orthogonality is kept) until the
    # reverse Cholesky factor exists, and fall back to I / k (independent noise) if the blend
    # is worse than that.
    ridge = np.eye(n) / k
    candidates = [ridge]
    lam, Q = scipy.linalg.eigh(X, check_finite=False)
    if lam.min() <= 0:  # round-off made it indefinite: the nearest PSD matrix
        X = (Q * np.clip(lam, 1e-12 * lam.max(), None)) @ Q.T
    for eps in (0.0, *_DENSE_RIDGE, 1e-4, 1e-2):
        try:
            candidates.append(reverse_cholesky((X + eps * ridge) / (1.0 + eps)))
            break
        except np.linalg.LinAlgError:
            continue
    best, best_err, best_i = None, math.inf, -1
    for i, cand in enumerate(candidates):
        C = np.linalg.cholesky(cand) if cand is ridge else cand
        C = np.tril(C / _dense_class_sensitivity(C, b=b, k=k))
        err = float(np.sum(scipy.linalg.solve_triangular(C.T, A.T, lower=False) ** 2))
        if np.isfinite(err) and err < best_err:
            best, best_err, best_i = C, err, i
    if best is None or best_i == 0:
        # Never return a worse-than-trivial "optimum" silently.
        raise ValueError(
            "optimal: the dense dual solver did not converge for this workload and "
            f"participation (k={k}, b={b}; ill-conditioned, e.g. strong server momentum); "
            "use opt-bisr")
    return best


def _dense_class_sensitivity(C: np.ndarray, *, b: int, k: int) -> float:
    """Max column norm for single participation (``b == 1``); otherwise the upper bound
    ``max_P max_{S in P, |S| <= k} sum_{i,j in S} |<C e_i, C e_j>|`` over the classes
    ``P = {c, c+b, ...}`` (bounded by the sum of the ``k`` largest row sums of ``|X_PP|``;
    exact when columns within a class are orthogonal)."""
    X = C.T @ C
    if b == 1:
        return float(np.sqrt(np.max(np.diag(X))))
    worst = 0.0
    for P in _class_blocks(len(X), b):
        rows = np.sort(np.abs(X[np.ix_(P, P)]).sum(axis=1))[::-1]
        worst = max(worst, float(rows[:k].sum()))
    return math.sqrt(worst)


def _sqrt_sym(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(eigenvalues^{1/2}, eigenvectors)`` of a symmetric PSD matrix."""
    lam, Q = scipy.linalg.eigh(Y, driver="evd", check_finite=False)
    return np.sqrt(np.clip(lam, 0.0, None)), Q


def _dual_single(A: np.ndarray, *, maxiter: int, tol: float) -> np.ndarray:
    """Single participation: ``min tr(W X^{-1})`` s.t. ``diag(X) = 1`` (``W = A^T A``).

    Dual variable ``v > 0`` (``D = diag(v)``): ``X(v) = D^{-1/2} (D^{1/2} W D^{1/2})^{1/2}
    D^{-1/2}`` and ``g(v) = 2 tr (D^{1/2} W D^{1/2})^{1/2} - sum(v)`` is a lower bound on the
    optimum for every ``v`` (weak duality), with ``dg/dv = diag(X(v)) - 1``.  Since
    ``X(c v) = c^{-1/2} X(v)``, the multiplicative fixed point ``v <- v diag(X(v))^omega``
    (Denisov et al. 2022 use ``omega = 1``) is a diagonally preconditioned Newton-type step on
    ``log v``; we use ``omega = 1.5`` and halve it whenever the dual bound decreases.  It is
    insensitive to the scale of the columns of ``A`` (tiny learning rates), unlike a
    gradient method on ``v`` whose gradient ``v (X_ii - 1)`` vanishes on such columns.

    Primal recovery from any ``v``: ``X_n`` = ``X(v)`` with unit diagonal, blended with the
    identity, ``X' = (X_n + eps I) / (1 + eps)`` (``eps = 1e-10``, more if the reverse
    Cholesky factorisation fails in floating point): still unit
    diagonal, ``tr(W X'^{-1}) <= (1 + eps) tr(W X_n^{-1})`` (``X_n + eps I >= X_n``), and
    well conditioned enough for the reverse Cholesky factor even when ``X_n`` is (nearly)
    singular.  Iterations stop when the relative duality gap ``(primal - dual) / primal``
    (squared errors) is below ``tol``; the best primal iterate is returned.  A column of
    ``A`` with ``||A e_i||^2 < 1e-14 max_j ||A e_j||^2`` makes ``W`` numerically singular; then
    ``1e-14 max_j W_jj`` is added to the diagonal of ``W`` for the dual iteration (the primal
    error is always that of the true ``W``; the dual bound is then approximate).
    """
    n_full = A.shape[0]
    W_full = A.T @ A
    dmax = float(np.max(np.diag(W_full)))
    if not dmax > 0:
        raise ValueError("workload must have a non-zero column")
    W_full /= dmax  # scale invariance: X is unchanged
    # Deflation: columns of A so small that even X_ii = 1, X_ij = 0 costs at most
    # _DENSE_DROP * (a lower bound on the optimum) in total are fixed to orthogonal unit
    # columns of C (their squared norms are lost to floating point in D^{1/2} W D^{1/2}).
    # tr(W X^{-1}) >= tr(W_kk (X_kk)^{-1}) (Schur complement), so the dual bound of the kept
    # block is a lower bound of the full problem and the loss is at most tr(W_dropped).
    lower = float(np.sum(_sqrt_sym(W_full)[0])) ** 2 / n_full  # (tr W^{1/2})^2 / tr X
    wd = np.diag(W_full)
    order = np.argsort(wd)
    n_drop = int(np.searchsorted(np.cumsum(wd[order]), _DENSE_DROP * lower, side="right"))
    n_drop = min(n_drop, n_full - 1)
    keep = np.sort(order[n_drop:])
    dropped = float(np.sum(wd[order[:n_drop]]))
    W = W_full[np.ix_(keep, keep)]
    n = keep.size
    if float(np.min(np.diag(W))) < _W_RIDGE:  # (near) zero columns: keep W > 0
        W[np.diag_indices(n)] += _W_RIDGE
    An = A / math.sqrt(dmax)

    def inner(v: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        s = np.sqrt(v)
        sl, Q = _sqrt_sym(s[:, None] * W * s[None, :])
        return 2.0 * float(np.sum(sl)) - float(np.sum(v)), sl, Q

    def primal(sl: np.ndarray, Q: np.ndarray) -> tuple[float, np.ndarray | None]:
        # X(v) with unit diagonal = S with unit diagonal (the D^{-1/2} scalings cancel)
        S = (Q * sl) @ Q.T
        r = 1.0 / np.sqrt(np.diag(S))
        Xk = r[:, None] * S * r[None, :]
        best: tuple[float, np.ndarray | None] = (math.inf, None)
        for eps in _DENSE_RIDGE:
            X = np.eye(n_full)
            X[np.ix_(keep, keep)] = (Xk + eps * np.eye(n)) / (1.0 + eps)
            try:
                C = reverse_cholesky(X)
            except np.linalg.LinAlgError:
                continue
            B = scipy.linalg.solve_triangular(C, An.T, trans="T", lower=True,
                                              check_finite=False)  # (A C^{-1})^T
            val = float(np.sum(B * B))
            if np.isfinite(val) and val < best[0]:
                best = (val, C)
            if val <= (1.0 + 10.0 * eps) * (best_dual + dropped):
                break  # a larger blend cannot gain more than it costs
        return best

    v = np.diag(W).copy()
    omega = 1.5
    dual, sl, Q = inner(v)
    best_dual, best_primal, best_C = dual, math.inf, None
    it = gap = 0
    for it in range(1, maxiter + 1):
        if it % _GAP_EVERY == 1 or it == maxiter:
            val, C = primal(sl, Q)
            if val < best_primal:
                best_primal, best_C = val, C
            gap = (best_primal - best_dual) / best_primal  # best_dual <= optimum
            if gap <= tol:
                break
        xd = np.einsum("ij,ij,j->i", Q, Q, sl) / v  # diag(X(v))
        v_new = v * xd ** omega
        dual_new, sl_new, Q_new = inner(v_new)
        if dual_new < dual - 1e-12 * abs(dual) and omega > 0.25:
            omega *= 0.5  # overshoot: retry from v with a shorter step
            continue
        v, dual, sl, Q = v_new, dual_new, sl_new, Q_new
        best_dual = max(best_dual, dual)
    if best_C is None:
        raise RuntimeError("optimal_dense: no positive definite iterate (workload singular?)")
    logger.info("optimal_dense: %d fixed-point iterations, MeanSE %.10g, dual bound %.10g, "
                "relative gap %.2e (%d negligible columns fixed)", it,
                math.sqrt(best_primal * dmax / n_full),
                math.sqrt(max(best_dual, 0.0) * dmax / n_full), gap, n_drop)
    if gap > max(tol, 1e-6):
        logger.warning("optimal_dense: not converged after %d iterations (relative duality "
                       "gap %.2e)", it, gap)
    return best_C


def _dual_classes(W: np.ndarray, *, b: int, k: int, maxiter: int, tol: float) -> np.ndarray:
    """Dual of ``min tr(W X^{-1})`` s.t. ``X_ij = 0`` (``i != j`` in the same class
    ``{c, c+b, ...}``) and ``X_ii <= 1/k_c`` (``k_c = min(k, class size)``, so that any
    ``k`` columns of a class have ``sum ||C e_i||^2 <= 1``).

    The multiplier ``D`` is block diagonal over the classes (any PD block: diagonal entries
    for ``X_ii <= 1/k``, off-diagonal ones for the orthogonality); we parametrise
    ``D = L L^T`` with ``L`` block lower triangular, so ``X(D) = L^{-T} (L^T W L)^{1/2} L^{-1}``
    (the geometric mean ``D^{-1} # W``), ``g = 2 tr (L^T W L)^{1/2} - tr(D K^{-1})`` and
    ``dg/dL = 2 (X - K^{-1}) L`` on the blocks (``K = diag(k_c)``).
    """
    n = W.shape[0]
    classes = _class_blocks(n, b)
    perm = np.concatenate(classes)
    Wp = W[np.ix_(perm, perm)]
    sizes = [len(P) for P in classes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    tril = [np.tril_indices(s) for s in sizes]
    counts = [len(t[0]) for t in tril]
    kinv = np.concatenate([np.full(s, 1.0 / min(k, s)) for s in sizes])

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L = np.zeros((n, n))
        Linv = np.zeros((n, n))
        pos = 0
        for c, s in enumerate(sizes):
            Lc = np.zeros((s, s))
            Lc[tril[c]] = theta[pos : pos + counts[c]]
            pos += counts[c]
            sl = slice(offsets[c], offsets[c + 1])
            L[sl, sl] = Lc
            Linv[sl, sl] = scipy.linalg.solve_triangular(Lc, np.eye(s), lower=True)
        return L, Linv

    def primal(theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        L, Linv = unpack(theta)
        sl_, Q = _sqrt_sym(L.T @ Wp @ L)
        S = (Q * sl_) @ Q.T
        X = Linv.T @ S @ Linv
        return float(np.sum(sl_)), 0.5 * (X + X.T), L

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            trS, X, L = primal(theta)
        except (np.linalg.LinAlgError, ValueError):
            return 1e300, np.zeros_like(theta)
        G = X - np.diag(kinv)
        D_diag = np.einsum("ij,ij->i", L, L)
        grad = np.empty_like(theta)
        pos = 0
        for c in range(len(sizes)):
            sl = slice(offsets[c], offsets[c + 1])
            grad[pos : pos + counts[c]] = (2.0 * G[sl, sl] @ L[sl, sl])[tril[c]]
            pos += counts[c]
        g = 2.0 * trS - float(D_diag @ kinv)
        if not np.isfinite(g):
            return 1e300, np.zeros_like(theta)
        return -g, -grad

    # start: D = v I with v from the single-participation scaling (X ~ I / k)
    v0 = (float(np.sum(_sqrt_sym(Wp)[0])) / n) * min(k, max(sizes))
    theta0 = np.concatenate([np.eye(s)[tril[c]] * math.sqrt(v0)
                             for c, s in enumerate(sizes)])
    res = scipy.optimize.minimize(
        fun, theta0, jac=True, method="L-BFGS-B",
        options={"maxiter": maxiter, "gtol": tol, "ftol": 1e-15, "maxcor": 30},
    )
    trS, Xp, L = primal(res.x)
    inv = np.empty(n, dtype=int)
    inv[perm] = np.arange(n)
    X = Xp[np.ix_(inv, inv)]
    dual = 2.0 * trS - float(np.einsum("ij,ij->i", L, L) @ kinv)
    logger.info("optimal_dense (k>1, b=%d): dual L-BFGS %d iterations (%s), "
                "sum|tr(W X^-1)| %.8g, dual bound %.8g", b, res.nit, res.message, trS, dual)
    return X
