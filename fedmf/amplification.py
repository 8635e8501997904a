"""Amplification by sampling: accounting when who takes part in a round is secret.

Neighbouring datasets differ by one client (add/remove, user-level); the sampling randomness
must stay secret (who took part in which round is never released).  Four sampling modes
(:data:`SAMPLINGS`), with ``n`` rounds, ``b`` cohorts/groups and unit clip (``z = std / clip``):

* ``cyclic`` -- public cohorts, no amplification: :mod:`fedmf.ledger` as without this module.
* ``poisson`` -- every round each client joins independently with probability
  ``q = clients_per_round / num_clients`` (DP-FedAvg, McMahan et al. 2018).  Independent noise
  only (``C = I``): ``SelfComposed(PoissonSampled(q, Gaussian(z)), n)`` (PLD).
* ``cyclic-poisson`` -- clients in ``b`` secret groups; round ``t`` samples each member of group
  ``(t-1) mod b`` with probability ``q = clients_per_round * b / num_clients`` (amplified
  BandMF, Choquette-Choo et al., NeurIPS 2023).  For a banded ``C`` with bandwidth ``<= b`` the
  columns of one client's rounds have disjoint supports, so the release is the composition
  ``SelfComposed(PoissonSampled(q, Gaussian(z / max_j ||C e_j||)), ceil(n / b))`` (PLD);
  ``q >= 1`` is the plain Gaussian.
* ``balls-in-bins`` -- each client is put in one of ``b`` bins uniformly, independently and
  secretly; round ``t`` is served by bin ``(t-1) mod b``.  For a lower-triangular Toeplitz ``C``
  with a non-negative first column the pair ``P = (1/b) sum_s N(C x_s, z^2 I_n)``,
  ``Q = N(0, z^2 I_n)`` (``x_s`` the 0/1 indicator of rounds ``s, s+b, ... < n``, 0-based)
  dominates the release (Choquette-Choo et al. 2024, arXiv 2410.06266; Chua et al. 2024,
  arXiv 2412.16802); its privacy curve is estimated by Monte Carlo (:func:`monte_carlo_delta`).

Monte Carlo (balls-in-bins).  With ``M = C X`` (``n x b``, column ``s`` is ``C x_s``) and
``G = M^T M``, the privacy loss ``L(y) = log dP/dQ(y) = log (1/b) sum_s exp(<m_s, y>/z^2 -
G_ss/(2 z^2))`` depends on ``y`` only through ``M^T y``, which is ``N(0, z^2 G)`` under ``Q`` and
``N(G e_s, z^2 G)`` under ``P`` given the bin ``s``: samples are ``b``-dimensional whatever
``n``.  Both directions of the pair are estimated, ``delta_PQ(eps) = E_P[(1 - e^{eps - L})_+]``
("remove": the client's data is in the release) and ``delta_QP(eps) = E_Q[(1 - e^{eps + L})_+]``
("add"), and the larger one is reported (for banded ``C`` at small ``eps`` the "add" direction
can dominate).  Bins are stratified (sample ``i`` uses bin ``i mod b``, the count rounded up to
a multiple of ``b``): the samples stay independent (not identically distributed) and their mean
is unbiased for the mixture; Hoeffding's bounds hold for independent ``[0, 1]`` values with the
average mean (Hoeffding 1963, Thm. 1).

Formal guarantee.  Every per-sample value lies in ``[0, 1]``, so Hoeffding's (Chernoff, KL)
bound gives an upper confidence bound ``p_u = sup{p >= mean: N kl(mean || p) <= log(1/beta')}``
that fails with probability ``<= beta'`` (arXiv 2412.16802, Fact 4.2; arXiv 2602.09338, App. A);
``beta`` is split evenly over the two directions.  The accountant's randomness is independent of
the data, so choosing ``z`` from the estimate and running the mechanism is a mixture over the
accountant's outcomes of Gaussian-type mechanisms; the hockey-stick divergence is jointly
convex, hence the mixture is ``(eps, E[delta_true])``-DP and ``E[delta_true] <= delta_ucb +
P(bound fails) <= delta_ucb + beta``: calibration (:func:`calibrate_monte_carlo`) therefore
guarantees ``(eps, delta)``-DP unconditionally when ``delta_upper = p_u + beta <= delta``.  Its
``j``-th confirmation (fresh samples, after a failed one) spends ``beta / 2^j``, so the failure
probabilities sum to at most ``beta``.  For a fixed ``z`` (:func:`monte_carlo_epsilon`) the
reported ``epsilon`` is the smallest one with ``delta_upper <= delta``; it is a (1 - beta)
confidence statement (``delta(eps)`` is monotone, so the data-dependent choice of ``eps`` costs
nothing: the bound fails only if it fails at the deterministic ``eps`` where the true delta
crosses ``delta - beta``).

Errors for bad input are ``ValueError`` whose message starts with the parameter name.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from scipy import optimize

from . import accounting
from .factorizations import Factorization
from .mechanisms import SAMPLINGS  # the one definition (module docstring explains each)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_SAMPLES",
    "SAMPLINGS",
    "AmplifiedAccountant",
    "AmplifiedEpsilon",
    "MonteCarloResult",
    "amplified_accountant",
    "balls_in_bins_gram",
    "calibrate_cyclic_poisson",
    "calibrate_monte_carlo",
    "calibrate_poisson",
    "cyclic_poisson_epsilon",
    "kl_upper_confidence",
    "monte_carlo_delta",
    "monte_carlo_epsilon",
    "poisson_epsilon",
    "strategy_first_column",
]

#: The accountant each sampling mode uses.
ACCOUNTANTS = {"cyclic": "pld", "poisson": "pld-poisson", "cyclic-poisson": "pld-cyclic-poisson",
               "balls-in-bins": "monte-carlo"}
#: Default Monte Carlo sample count (per direction; calibration also draws a pilot of this size).
DEFAULT_SAMPLES = 10_000_000
#: Default failure probability of the Monte Carlo bound, as a fraction of the target delta.
BETA_FRACTION = 0.1

_ZERO_TOL = 1e-12  # |c_j| <= _ZERO_TOL * max|c| counts as an exact zero of C's first column
_CHUNK_SAMPLES = 1 << 16
_TAIL_KEEP = 1 << 17
_PLD_RTOL = 1e-4
_COARSE = 1e-3
_MC_RTOL = 2e-4
_MAX_CHECKS = 8
_SAFE_SHIFT = 300.0


# ---------------------------------------------------------------------------- validation
_positive = accounting._positive  # the validators of fedmf.accounting, one definition each
_delta = accounting._delta
_count = accounting._count


def _beta(beta: float | None, delta: float) -> float:
    if beta is None:
        return BETA_FRACTION * delta
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < delta:
        raise ValueError(f"beta must be in (0, delta={delta:g}), got {beta!r}")
    return float(beta)


def _gram(gram: np.ndarray) -> np.ndarray:
    G = np.asarray(gram, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 1:
        raise ValueError(f"gram must be a square (b x b) matrix, got shape {G.shape}")
    if not np.all(np.isfinite(G)) or np.any(G < 0) or not np.allclose(G, G.T, rtol=1e-12,
                                                                       atol=0.0):
        raise ValueError("gram must be finite, symmetric and entrywise >= 0 (M = C X >= 0)")
    return np.ascontiguousarray(G)


# ---------------------------------------------------------------------------- closed forms
@functools.lru_cache(maxsize=8192)
def _sampled_epsilon(z: float, q: float, count: int, delta: float,
                     interval: float = 1e-4) -> float:
    """PLD epsilon of ``count`` compositions of a Poisson-sampled Gaussian (``q >= 1``: plain),
    pessimistic with value discretization ``interval`` (dp_accounting's default ``1e-4``)."""
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    if count != 1:
        event = dp_accounting.SelfComposedDpEvent(event, count)
    accountant = PLDAccountant(value_discretization_interval=interval)
    accountant.compose(event)
    return max(float(accountant.get_epsilon(delta)), 0.0)


def _calibrate_sampled(q: float, count: int, target: float, delta: float, start: float) -> float:
    """Smallest ``z`` (to 1e-4) with ``_sampled_epsilon(z, ...) <= target``: searched with a
    10x coarser (still pessimistic, 10x faster) discretization, then confirmed (and nudged up
    if needed) at the fine one, which differs by ~1e-5 relative."""
    z = _calibrate_decreasing(lambda m: _sampled_epsilon(m, q, count, delta, _COARSE), start,
                              target, rtol=_PLD_RTOL)
    while _sampled_epsilon(z, q, count, delta) > target:
        z *= 1.0 + _PLD_RTOL
    return z


def _calibrate_decreasing(eps_of: Callable[[float], float], start: float, target: float, *,
                          rtol: float, step: float = math.log(1.5)) -> float:
    """Smallest ``z`` (to ``rtol``) with ``eps_of(z) <= target``; ``eps_of`` non-increasing.

    Brent's method on ``log z`` from a bracket found by steps from ``start``; the result meets
    the target (checked) and is within ``rtol`` of the crossing.
    """

    def f(x: float) -> float:
        return eps_of(math.exp(x)) - target

    x0 = math.log(start)
    if f(x0) > 0:
        lo, hi = x0, x0 + step
        while f(hi) > 0:
            lo, hi, step = hi, hi + step, 2.0 * step
            if hi > math.log(1e8):
                raise RuntimeError("calibration failed to find a noise multiplier")
    else:
        lo, hi = x0 - step, x0
        while f(lo) <= 0:
            lo, hi, step = lo - step, lo, 2.0 * step
            if lo < math.log(1e-8):
                return math.exp(hi)
    x = float(optimize.brentq(f, lo, hi, xtol=rtol / 4.0, rtol=1e-12))
    z = max(math.exp(x), math.exp(lo))
    while eps_of(z) > target:
        z *= 1.0 + rtol / 4.0
    return min(z, math.exp(hi))


def _sampling_rate(q: float) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not (math.isfinite(q) and q > 0):
        raise ValueError(f"sampling_rate must be a finite number > 0, got {q!r}")
    return min(float(q), 1.0)


def poisson_epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int,
                    delta: float, coarse: bool = False) -> float:
    """Epsilon of DP-FedAvg with Poisson sampling: ``SelfComposedDpEvent(PoissonSampledDpEvent(
    q, GaussianDpEvent(z)), rounds)`` (McMahan et al. 2018), PLD (pessimistic; ``coarse``: a
    10x coarser discretization, still an upper bound, about 10x faster)."""
    z = _positive("noise_multiplier", noise_multiplier)
    q = _sampling_rate(sampling_rate)
    n = _count("rounds", rounds)
    return _sampled_epsilon(z, q, n, _delta(delta), _COARSE if coarse else 1e-4)


def calibrate_poisson(*, epsilon: float, delta: float, sampling_rate: float,
                      rounds: int) -> float:
    """Smallest ``z`` (relative tolerance 1e-4) with :func:`poisson_epsilon` ``<= epsilon``."""
    target = _positive("epsilon", epsilon)
    delta = _delta(delta)
    q = _sampling_rate(sampling_rate)
    n = _count("rounds", rounds)
    start = accounting.calibrate_noise_multiplier(epsilon=target, delta=delta, sensitivity=1.0)
    start *= max(q * math.sqrt(n), 1e-3)
    return _calibrate_sampled(q, n, target, delta, start)


def cyclic_poisson_epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int,
                           bins: int, column_norm: float, delta: float,
                           coarse: bool = False) -> float:
    """Epsilon of cyclic Poisson sampling with a banded ``C`` (bandwidth ``<= bins``):
    ``SelfComposed(PoissonSampled(q, Gaussian(z / column_norm)), ceil(rounds / bins))``
    (Choquette-Choo et al., NeurIPS 2023), PLD (pessimistic).

    Args:
        noise_multiplier: ``z``.
        sampling_rate: ``q = clients_per_round * b / num_clients`` (``>= 1``: no sampling).
        rounds: ``t``, the rounds released (``ceil(t / b)`` compositions).
        bins: ``b``, the number of groups.
        column_norm: ``max_j ||C e_j||``.
        delta: target delta.
        coarse: a 10x coarser PLD discretization (still an upper bound, about 10x faster).
    """
    z = _positive("noise_multiplier", noise_multiplier)
    q = _sampling_rate(sampling_rate)
    n = _count("rounds", rounds)
    b = _count("bins", bins)
    norm = _positive("column_norm", column_norm)
    return _sampled_epsilon(z / norm, q, math.ceil(n / b), _delta(delta),
                            _COARSE if coarse else 1e-4)


def calibrate_cyclic_poisson(*, epsilon: float, delta: float, sampling_rate: float, rounds: int,
                             bins: int, column_norm: float) -> float:
    """Smallest ``z`` (relative tolerance 1e-4) with :func:`cyclic_poisson_epsilon` ``<=
    epsilon``."""
    norm = _positive("column_norm", column_norm)
    b = _count("bins", bins)
    n = _count("rounds", rounds)
    return norm * calibrate_poisson(epsilon=epsilon, delta=delta, sampling_rate=sampling_rate,
                                    rounds=math.ceil(n / b))


# ---------------------------------------------------------------------------- strategy matrix
def strategy_first_column(factorization: Factorization) -> np.ndarray:
    """First column of ``C`` (length ``n``) of a Toeplitz factorization, exact zeros below
    ``1e-12 * max |c|`` (numerical dust of series inversions); ``ValueError`` otherwise."""
    if not factorization.is_toeplitz:
        raise ValueError(f"factorization: method {factorization.method!r} has a non-Toeplitz "
                         "C; amplification is accounted for lower-triangular Toeplitz C only")
    n = factorization.n
    coeffs = factorization.c_coeffs
    if coeffs is None:  # pragma: no cover - Toeplitz factorizations always carry it
        coeffs = factorization.strategy_matrix()[:, 0]
    c = np.zeros(n)
    c[:min(n, coeffs.size)] = np.asarray(coeffs, dtype=np.float64)[:n]
    if not np.all(np.isfinite(c)) or c[0] == 0:
        raise ValueError(f"factorization: method {factorization.method!r} has an invalid first "
                         "column of C")
    c[np.abs(c) <= _ZERO_TOL * np.max(np.abs(c))] = 0.0
    return c


def _bandwidth(column: np.ndarray) -> int:
    return int(np.flatnonzero(column)[-1]) + 1


def balls_in_bins_gram(*, first_column: np.ndarray, rounds: int, bins: int,
                       prefix: int | None = None) -> np.ndarray:
    """``G = M^T M`` with ``M = C X``: ``C`` lower-triangular Toeplitz with first column
    ``first_column``, ``X`` the ``n x b`` 0/1 matrix of bins (column ``s`` marks rounds
    ``s, s+b, ... < n``), ``M`` restricted to its first ``prefix`` rows (the release of rounds
    ``1..prefix``).

    ``M[i, s] = d[i - s]`` with ``d[r] = sum_l c[r - l b]`` (a strided cumulative sum), so this
    costs ``O(n b^2)`` and no ``n x n`` matrix.
    """
    n = _count("rounds", rounds)
    b = _count("bins", bins)
    t = n if prefix is None else _count("prefix", prefix)
    if t > n:
        raise ValueError(f"prefix must be <= rounds={n}, got {t}")
    c = np.zeros(n)
    col = np.asarray(first_column, dtype=np.float64).reshape(-1)
    c[:min(n, col.size)] = col[:n]
    if np.any(c < 0):
        raise ValueError("first_column must be entrywise >= 0")
    pad = np.zeros(b * math.ceil(n / b))
    pad[:n] = c
    d = np.cumsum(pad.reshape(-1, b), axis=0).reshape(-1)[:n]  # d[r] = c[r] + d[r - b]
    M = np.zeros((t, b))
    for s in range(min(b, t)):
        M[s:, s] = d[:t - s]
    G = M.T @ M
    return 0.5 * (G + G.T)


# ---------------------------------------------------------------------------- KL bound
def _kl(m: float, p: float) -> float:
    out = (1.0 - m) * (math.log1p(-m) - math.log1p(-p))
    if m > 0:
        out += m * math.log(m / p)
    return out


def kl_upper_confidence(*, mean: float, samples: int, log_inverse_confidence: float) -> float:
    """``sup{p >= mean: samples * kl(mean || p) <= log_inverse_confidence}``: Hoeffding's KL
    (Chernoff) upper confidence bound on the mean of independent ``[0, 1]`` values (fails with
    probability ``<= exp(-log_inverse_confidence)``; arXiv 2412.16802, Fact 4.2)."""
    n = _count("samples", samples)
    c = _positive("log_inverse_confidence", log_inverse_confidence) / n
    m = float(mean)
    if not 0 <= m <= 1:
        raise ValueError(f"mean must be in [0, 1], got {mean!r}")
    if m >= 1:
        return 1.0
    if m == 0:
        return -math.expm1(-c)
    top = 1.0 - 1e-16
    if _kl(m, top) <= c:
        return 1.0
    return float(optimize.brentq(lambda p: _kl(m, p) - c, m, top, xtol=1e-300, rtol=1e-14,
                                 maxiter=500))


def _max_mean_for(bound: float, samples: int, log_inv: float) -> float:
    """Largest mean whose KL upper confidence bound is ``<= bound`` (``0`` if none)."""
    if kl_upper_confidence(mean=0.0, samples=samples, log_inverse_confidence=log_inv) > bound:
        return 0.0
    return float(optimize.brentq(
        lambda m: kl_upper_confidence(mean=m, samples=samples, log_inverse_confidence=log_inv)
        - bound, 0.0, bound, xtol=1e-300, rtol=1e-12, maxiter=500))


# ---------------------------------------------------------------------------- Monte Carlo
@dataclass(frozen=True)
class MonteCarloResult:
    """A Monte Carlo privacy estimate of balls-in-bins sampling.

    Attributes:
        noise_multiplier: ``z``.
        epsilon: the epsilon the deltas below are evaluated at.
        delta: target delta (for :func:`monte_carlo_delta`: ``delta_upper``).
        delta_estimate: plain sample mean, the larger direction.
        delta_upper: formal bound ``max_dir p_u + beta`` (module docstring).
        beta: failure probability of the confidence bound (both directions together).
        samples: samples per direction of the estimate reported.
        seed: the accountant's seed (fixed seed, same estimate).
        direction: ``"remove"`` (``y ~ P``, the client's data in) or ``"add"`` -- which
            direction's bound is the larger.
        seconds: wall time.
        checks: confirmation passes calibration needed (``0`` without calibration).
        estimates: plain estimates ``(remove, add)`` at ``epsilon``.
    """

    noise_multiplier: float
    epsilon: float
    delta: float
    delta_estimate: float
    delta_upper: float
    beta: float
    samples: int
    seed: int
    direction: str
    seconds: float
    checks: int = 0
    estimates: tuple[float, float] = (math.nan, math.nan)


def _factor(G: np.ndarray) -> np.ndarray:
    """``F`` with ``F F^T = G`` (eigen-decomposition; ``G`` may be singular)."""
    w, V = np.linalg.eigh(G)
    return V * np.sqrt(np.clip(w, 0.0, None))


def _blocks(bins: int, samples: int, seed: int, stream: int) -> Iterator[np.ndarray]:
    """Standard normal blocks ``(b, c)``, ``c`` a multiple of ``b`` (bins stratified by the
    sample index); deterministic in ``(seed, stream)``."""
    rng = np.random.default_rng([int(seed), int(stream)])
    rows = bins * max(1, _CHUNK_SAMPLES // bins)
    done = 0
    while done < samples:
        c = min(rows, samples - done)
        yield rng.standard_normal((bins, c))
        done += c


class _Losses:
    """Privacy losses of the pair at one ``z``: ``V_remove = L(y), y ~ P`` and
    ``V_add = -L(y), y ~ Q`` for a block of standard normals."""

    def __init__(self, G: np.ndarray, F: np.ndarray, z: float) -> None:
        b = G.shape[0]
        self.b = b
        self.F = F / z
        self.half = (np.diag(G) / (2.0 * z * z))[:, None]
        self.log_b = math.log(b)
        rows = b * max(1, _CHUNK_SAMPLES // b)
        idx = np.arange(rows) % b
        self.shift = G[:, idx] / (z * z)  # row r, sample i: G[r, i mod b] / z^2
        self.safe = float(np.max(G)) / (z * z) <= _SAFE_SHIFT
        self.weight = np.exp(self.shift) if self.safe else None

    def __call__(self, xi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = xi.shape[1]
        a = self.F @ xi
        a -= self.half
        m = a.max(axis=0)
        e = np.exp(a - m)
        lq = m + np.log(e.sum(axis=0)) - self.log_b
        if self.weight is not None:
            lp = m + np.log(np.einsum("ij,ij->j", e, self.weight[:, :c])) - self.log_b
        else:
            a += self.shift[:, :c]
            mp = a.max(axis=0)
            lp = mp + np.log(np.exp(a - mp).sum(axis=0)) - self.log_b
        return lp, -lq


def _hinge(v: np.ndarray, eps: float) -> np.ndarray:
    x = v[v > eps]
    return -np.expm1(eps - x)


def _moments(G: np.ndarray, F: np.ndarray, z: float, eps: float, *, samples: int, seed: int,
             stream: int) -> np.ndarray:
    """``[[mean, mean of squares]]`` of the per-sample values, rows ``remove``, ``add``."""
    losses = _Losses(G, F, z)
    acc = np.zeros((2, 2))
    for xi in _blocks(G.shape[0], samples, seed, stream):
        for k, v in enumerate(losses(xi)):
            h = _hinge(v, eps)
            acc[k, 0] += h.sum()
            acc[k, 1] += h @ h
    return acc / samples


@dataclass(frozen=True)
class _Tails:
    """The largest ``V`` per direction (descending), from ``samples`` samples."""

    values: tuple[np.ndarray, np.ndarray]
    cumexp: tuple[np.ndarray, np.ndarray]
    floors: tuple[float, float]  # below these the tails are incomplete (-inf: complete)
    samples: int

    def mean(self, k: int, eps: float) -> float:
        v = self.values[k]
        j = int(np.searchsorted(-v, -eps, side="left"))  # count of v > eps
        if j == 0:
            return 0.0
        total = j - math.exp(eps) * float(self.cumexp[k][j - 1])
        return min(max(total, 0.0), float(j)) / self.samples


def _tails(G: np.ndarray, F: np.ndarray, z: float, *, samples: int, seed: int, stream: int,
           keep: int) -> _Tails:
    losses = _Losses(G, F, z)
    kept: list[np.ndarray] = [np.empty(0), np.empty(0)]
    floors = [-math.inf, -math.inf]
    for xi in _blocks(G.shape[0], samples, seed, stream):
        for k, v in enumerate(losses(xi)):
            v = np.concatenate([kept[k], v[v > floors[k]]])
            if v.size > keep:
                v = np.partition(v, v.size - keep)[v.size - keep:]
                floors[k] = float(v.min())
            kept[k] = v
    values = tuple(np.sort(v)[::-1] for v in kept)
    cumexp = tuple(np.cumsum(np.exp(-np.maximum(v, 0.0))) for v in values)
    return _Tails(values=values, cumexp=cumexp, floors=(floors[0], floors[1]),  # type: ignore
                  samples=samples)


def _formal(tails: _Tails, eps: float, log_inv: float,
            beta: float) -> tuple[float, float, int, tuple[float, float]]:
    """``(delta_upper, delta_estimate, dominating direction index, both estimates)`` at
    ``eps``."""
    means = (tails.mean(0, eps), tails.mean(1, eps))
    k = int(np.argmax(means))
    upper = kl_upper_confidence(mean=means[k], samples=tails.samples,
                                log_inverse_confidence=log_inv)
    return upper + beta, means[k], k, means


def _epsilon_from_tails(tails: _Tails, delta: float, log_inv: float,
                        beta: float) -> float | None:
    """Smallest ``eps >= 0`` with formal delta ``<= delta`` (``inf``: none; ``None``: the tails
    are too short to tell)."""
    hi = max(float(v[0]) if v.size else 0.0 for v in tails.values)
    hi = max(hi, 0.0)
    if _formal(tails, hi, log_inv, beta)[0] > delta:
        return math.inf
    lo = max(0.0, *tails.floors)
    if _formal(tails, lo, log_inv, beta)[0] <= delta:
        return 0.0 if lo == 0.0 else None
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if _formal(tails, mid, log_inv, beta)[0] > delta:
            lo = mid
        else:
            hi = mid
    return hi


_DIRECTIONS = ("remove", "add")


def _epsilon_result(G: np.ndarray, z: float, delta: float, *, samples: int, seed: int,
                    stream: int, beta: float, log_inv: float, t0: float,
                    checks: int = 0) -> tuple[MonteCarloResult, _Tails]:
    F = _factor(G)
    keep = _TAIL_KEEP
    while True:
        tails = _tails(G, F, z, samples=samples, seed=seed, stream=stream, keep=keep)
        eps = _epsilon_from_tails(tails, delta, log_inv, beta)
        if eps is not None:
            break
        keep *= 16  # rare: the answer lies below the kept tail
    upper, est, k, means = _formal(tails, 0.0 if math.isinf(eps) else eps, log_inv, beta)
    return MonteCarloResult(noise_multiplier=z, epsilon=eps, delta=delta, delta_estimate=est,
                            delta_upper=min(upper, 1.0), beta=beta, samples=samples, seed=seed,
                            direction=_DIRECTIONS[k], seconds=time.perf_counter() - t0,
                            checks=checks, estimates=means), tails


def _mc_args(gram: np.ndarray, samples: int, seed: int) -> tuple[np.ndarray, int, int]:
    G = _gram(gram)
    n = _count("samples", samples)
    n = G.shape[0] * math.ceil(n / G.shape[0])
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return G, n, int(seed)


def _min_samples(delta: float, beta: float, log_inv: float) -> int:
    return math.ceil(log_inv / (delta - beta)) + 1


def monte_carlo_delta(*, gram: np.ndarray, noise_multiplier: float, epsilon: float,
                      samples: int = DEFAULT_SAMPLES, seed: int = 0,
                      beta: float = 1e-6) -> MonteCarloResult:
    """Monte Carlo ``delta(epsilon)`` of balls-in-bins sampling at ``z`` (both directions).

    Args:
        gram: ``G = M^T M`` (:func:`balls_in_bins_gram`).
        noise_multiplier: ``z`` (unit clip).
        epsilon: where to evaluate ``delta``.
        samples: samples per direction (rounded up to a multiple of ``b``).
        seed: the accountant's seed.
        beta: failure probability of the formal bound ``delta_upper``.

    Returns:
        :class:`MonteCarloResult` with ``delta = delta_upper``.
    """
    t0 = time.perf_counter()
    G, n, seed = _mc_args(gram, samples, seed)
    z = _positive("noise_multiplier", noise_multiplier)
    eps = float(epsilon)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    mom = _moments(G, _factor(G), z, eps, samples=n, seed=seed, stream=1)
    k = int(np.argmax(mom[:, 0]))
    upper = kl_upper_confidence(mean=float(mom[k, 0]), samples=n,
                                log_inverse_confidence=math.log(2.0 / beta)) + beta
    return MonteCarloResult(noise_multiplier=z, epsilon=eps, delta=min(upper, 1.0),
                            delta_estimate=float(mom[k, 0]), delta_upper=min(upper, 1.0),
                            beta=beta, samples=n, seed=seed, direction=_DIRECTIONS[k],
                            seconds=time.perf_counter() - t0,
                            estimates=(float(mom[0, 0]), float(mom[1, 0])))


@functools.lru_cache(maxsize=256)
def _mc_epsilon_cached(key: bytes, b: int, z: float, delta: float, samples: int, seed: int,
                       beta: float) -> MonteCarloResult:
    G = np.frombuffer(key, dtype=np.float64).reshape(b, b)
    return _epsilon_result(G, z, delta, samples=samples, seed=seed, stream=1, beta=beta,
                           log_inv=math.log(2.0 / beta), t0=time.perf_counter())[0]


def monte_carlo_epsilon(*, gram: np.ndarray, noise_multiplier: float, delta: float,
                        samples: int = DEFAULT_SAMPLES, seed: int = 0,
                        beta: float | None = None) -> MonteCarloResult:
    """Smallest ``epsilon`` whose formal Monte Carlo delta is ``<= delta`` at ``z`` (bisection
    over ``epsilon`` on one fixed set of samples; ``inf`` when too few samples certify any).

    A ``(1 - beta)``-confidence statement (module docstring).  Cached in process.

    Args:
        gram: ``G = M^T M`` (:func:`balls_in_bins_gram`).
        noise_multiplier: ``z``.
        delta: target delta (includes ``beta``).
        samples: samples per direction.
        seed: the accountant's seed.
        beta: failure probability (default ``delta / 10``).
    """
    G, n, seed = _mc_args(gram, samples, seed)
    z = _positive("noise_multiplier", noise_multiplier)
    delta = _delta(delta)
    beta = _beta(beta, delta)
    return _mc_epsilon_cached(G.tobytes(), G.shape[0], z, delta, n, seed, beta)


def _log_slope(a: tuple[float, float], b: tuple[float, float]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


def _pilot_root(log_est: Callable[[float], tuple[float, np.ndarray]], goal: float, x: float,
                step: float, xtol: float) -> tuple[float, float, float, float, np.ndarray]:
    """Bracket and solve ``log_est(x) = goal`` (decreasing in ``x = log z``): Illinois regula
    falsi (the curve is smooth and nearly linear in log-log).  Returns ``(x_lo, f_lo, x_hi,
    f_hi, moments at x_hi)`` with ``f = log_est - goal``, ``f_lo > 0 >= f_hi``."""
    f, mom = log_est(x)
    f -= goal
    if f > 0:  # too little noise: walk up
        x_lo, f_lo = x, f
        x_hi = x + step
        f_hi, mom_hi = log_est(x_hi)
        f_hi -= goal
        while f_hi > 0:
            x_lo, f_lo, step = x_hi, f_hi, 2.0 * step
            x_hi += step
            f_hi, mom_hi = log_est(x_hi)
            f_hi -= goal
    else:  # walk down
        x_hi, f_hi, mom_hi = x, f, mom
        x_lo = x - step
        f_lo = log_est(x_lo)[0] - goal
        while f_lo <= 0:
            x_hi, f_hi, step = x_lo, f_lo, 2.0 * step
            x_lo -= step
            f_lo = log_est(x_lo)[0] - goal
    side = 0
    while x_hi - x_lo > xtol:
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        x = min(max(x, x_lo + 0.02 * (x_hi - x_lo)), x_hi - 0.02 * (x_hi - x_lo))
        f, mom = log_est(x)
        f -= goal
        if f > 0:
            x_lo, f_lo = x, f
            if side == -1:
                f_hi /= 2.0
            side = -1
        else:
            x_hi, f_hi, mom_hi = x, f, mom
            if side == 1:
                f_lo /= 2.0
            side = 1
    return x_lo, f_lo, x_hi, f_hi, mom_hi


@functools.lru_cache(maxsize=128)
def _calibrate_cached(key: bytes, b: int, target: float, delta: float, samples: int, seed: int,
                      beta: float, start: float) -> MonteCarloResult:
    t0 = time.perf_counter()
    G = np.frombuffer(key, dtype=np.float64).reshape(b, b)
    F = _factor(G)

    def estimator(n: int, stream: int) -> Callable[[float], tuple[float, np.ndarray]]:
        def log_est(log_z: float) -> tuple[float, np.ndarray]:
            mom = _moments(G, F, math.exp(log_z), target, samples=n, seed=seed, stream=stream)
            return math.log(max(float(mom[:, 0].max()), 1e-300)), mom
        return log_est

    # The pilot aims at the plain mean whose first-confirmation bound meets delta exactly:
    # first a small pilot (1/8 of the samples) to 1%, then the full one (common random
    # numbers for every z) to _MC_RTOL.
    goal = math.log(_max_mean_for(delta - beta, samples, math.log(2.0 / (beta / 2.0))))
    small = b * max(1, samples // (8 * b))
    x = _pilot_root(estimator(small, 1 << 20), goal, math.log(start), math.log(1.5), 1e-2)[2]
    x_lo, f_lo, x_hi, f_hi, mom_hi = _pilot_root(estimator(samples, 0), goal, x, 0.02,
                                                 _MC_RTOL)
    slope = min(-1.0, _log_slope((x_lo, f_lo), (x_hi, f_hi)))
    # Margin for the pilot's and the confirmation's sampling error (one standard deviation).
    k = int(np.argmax(mom_hi[:, 0]))
    m1, m2 = float(mom_hi[k, 0]), float(mom_hi[k, 1])
    rel_sd = min(math.sqrt(max(m2 - m1 * m1, 0.0) * 2.0 / samples) / max(m1, 1e-300), 0.5)
    log_z = x_hi + rel_sd / -slope
    for j in range(1, _MAX_CHECKS + 1):
        res, tails = _epsilon_result(G, math.exp(log_z), delta, samples=samples, seed=seed,
                                     stream=j, beta=beta,
                                     log_inv=math.log(2.0 / (beta / 2.0**j)), t0=t0, checks=j)
        if res.epsilon <= target:
            return res
        # Fresh check failed: move z by the shortfall of the fresh estimate, plus a margin.
        goal_j = _max_mean_for(delta - beta, samples, math.log(2.0 / (beta / 2.0**(j + 1))))
        if target >= max(tails.floors):
            est = max(tails.mean(0, target), tails.mean(1, target))
        else:
            est = math.exp(estimator(samples, j)(log_z)[0])
        shortfall = math.log(max(est, 1e-300) / max(goal_j, 1e-300))
        log_z += max(shortfall, 0.0) / -slope + max(rel_sd / -slope, 1e-3)
    raise RuntimeError("calibrate_monte_carlo: the confirmation failed repeatedly; use more "
                       "samples")


def calibrate_monte_carlo(*, gram: np.ndarray, epsilon: float, delta: float,
                          samples: int = DEFAULT_SAMPLES, seed: int = 0,
                          beta: float | None = None,
                          start: float | None = None) -> MonteCarloResult:
    """Smallest ``z`` (to ~2e-4, up to sampling error) whose formal Monte Carlo bound certifies
    ``(epsilon, delta)`` for balls-in-bins sampling.

    A pilot sample (``samples``, common random numbers for every ``z``) finds the ``z`` whose
    plain estimate meets the largest mean a confirmation can certify, plus a margin of one
    standard deviation of the sampling error; FRESH samples then confirm it (the returned
    ``epsilon``, ``delta_estimate`` and ``delta_upper`` come from them); if the confirmation
    fails, ``z`` is increased slightly and confirmed again on new samples (the ``j``-th spends
    ``beta / 2^j``).  The result guarantees ``(epsilon, delta)``-DP unconditionally (module
    docstring).  Cached in process (same ``gram``, target, samples, seed: one calibration).

    Args:
        gram: ``G = M^T M`` (:func:`balls_in_bins_gram`).
        epsilon: target epsilon.
        delta: target delta.
        samples: samples per pass (pilot and each confirmation).
        seed: the accountant's seed.
        beta: total failure probability (default ``delta / 10``).
        start: initial ``z`` of the bracket search (default: the un-amplified ``z`` of the
            worst bin, ``sqrt(max G_ss)`` times the Gaussian multiplier).
    """
    G, n, seed = _mc_args(gram, samples, seed)
    target = _positive("epsilon", epsilon)
    delta = _delta(delta)
    beta = _beta(beta, delta)
    need = _min_samples(delta, beta, math.log(2.0 / (beta / 2.0**_MAX_CHECKS)))
    if n < need:
        raise ValueError(f"samples must be >= {need} to certify delta={delta:g} with "
                         f"beta={beta:g}, got {samples}")
    if start is None:
        start = accounting.calibrate_noise_multiplier(
            epsilon=target, delta=delta, sensitivity=math.sqrt(float(np.max(np.diag(G)))))
    start = _positive("start", start)
    return _calibrate_cached(G.tobytes(), G.shape[0], target, delta, n, seed, beta, start)


# ---------------------------------------------------------------------------- one interface
@dataclass(frozen=True)
class AmplifiedEpsilon:
    """Epsilon of an amplified release.

    Attributes:
        sampling: the sampling mode.
        accountant: ``"pld-poisson"``, ``"pld-cyclic-poisson"`` or ``"monte-carlo"``.
        noise_multiplier: ``z``.
        epsilon: epsilon at ``delta`` (``inf``: the Monte Carlo sample certifies none).
        delta: target delta.
        rounds: rounds released (``1..rounds``).
        monte_carlo: the Monte Carlo details (``None`` for the closed forms).
    """

    sampling: str
    accountant: str
    noise_multiplier: float
    epsilon: float
    delta: float
    rounds: int
    monte_carlo: MonteCarloResult | None = None


@dataclass(frozen=True)
class AmplifiedAccountant:
    """Amplification-by-sampling accountant of one factorization (:func:`amplified_accountant`).

    Attributes:
        sampling: one of :data:`SAMPLINGS` other than ``cyclic``.
        method: the factorization method (for messages).
        rounds: ``n``.
        bins: ``b`` (``1`` for ``poisson``).
        sampling_rate: ``q`` (``None`` for ``balls-in-bins``).
        column_norm: ``max_j ||C e_j||`` (``cyclic-poisson``).
        samples, seed, beta: Monte Carlo settings (``balls-in-bins``; ``beta`` ``None``: delta/10).
        first_column: first column of ``C`` (``balls-in-bins``).
    """

    sampling: str
    method: str
    rounds: int
    bins: int
    sampling_rate: float | None
    column_norm: float
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    beta: float | None = None
    first_column: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def accountant(self) -> str:
        """The accountant's name (:data:`ACCOUNTANTS`)."""
        return ACCOUNTANTS[self.sampling]

    def gram(self, rounds: int | None = None) -> np.ndarray:
        """``G = M^T M`` of the release of rounds ``1..rounds`` (``balls-in-bins``)."""
        assert self.first_column is not None
        return balls_in_bins_gram(first_column=self.first_column, rounds=self.rounds,
                                  bins=self.bins, prefix=rounds)

    def _rounds(self, rounds: int | None) -> int:
        t = self.rounds if rounds is None else _count("rounds", rounds)
        if t > self.rounds:
            raise ValueError(f"rounds must be <= {self.rounds}, got {t}")
        return t

    def epsilon(self, *, noise_multiplier: float, delta: float,
                rounds: int | None = None, coarse: bool = False) -> AmplifiedEpsilon:
        """Epsilon of the release of rounds ``1..rounds`` (default all) at ``z`` (``coarse``:
        PLD modes use a 10x coarser, still pessimistic discretization)."""
        z = _positive("noise_multiplier", noise_multiplier)
        t = self._rounds(rounds)
        mc = None
        if self.sampling == "poisson":
            assert self.sampling_rate is not None
            eps = poisson_epsilon(noise_multiplier=z, sampling_rate=self.sampling_rate,
                                  rounds=t, delta=delta, coarse=coarse)
        elif self.sampling == "cyclic-poisson":
            assert self.sampling_rate is not None
            eps = cyclic_poisson_epsilon(noise_multiplier=z, sampling_rate=self.sampling_rate,
                                         rounds=t, bins=self.bins,
                                         column_norm=self.column_norm, delta=delta,
                                         coarse=coarse)
        else:
            mc = monte_carlo_epsilon(gram=self.gram(t), noise_multiplier=z, delta=delta,
                                     samples=self.samples, seed=self.seed, beta=self.beta)
            eps = mc.epsilon
        return AmplifiedEpsilon(sampling=self.sampling, accountant=self.accountant,
                                noise_multiplier=z, epsilon=float(eps), delta=float(delta),
                                rounds=t, monte_carlo=mc)

    def calibrate(self, *, epsilon: float, delta: float) -> AmplifiedEpsilon:
        """Smallest ``z`` meeting ``(epsilon, delta)`` for the whole release."""
        mc = None
        if self.sampling == "poisson":
            assert self.sampling_rate is not None
            z = calibrate_poisson(epsilon=epsilon, delta=delta,
                                  sampling_rate=self.sampling_rate, rounds=self.rounds)
            eps = poisson_epsilon(noise_multiplier=z, sampling_rate=self.sampling_rate,
                                  rounds=self.rounds, delta=delta)
        elif self.sampling == "cyclic-poisson":
            assert self.sampling_rate is not None
            z = calibrate_cyclic_poisson(epsilon=epsilon, delta=delta,
                                         sampling_rate=self.sampling_rate, rounds=self.rounds,
                                         bins=self.bins, column_norm=self.column_norm)
            eps = cyclic_poisson_epsilon(noise_multiplier=z, sampling_rate=self.sampling_rate,
                                         rounds=self.rounds, bins=self.bins,
                                         column_norm=self.column_norm, delta=delta)
        else:
            mc = calibrate_monte_carlo(gram=self.gram(), epsilon=epsilon, delta=delta,
                                       samples=self.samples, seed=self.seed, beta=self.beta)
            z, eps = mc.noise_multiplier, mc.epsilon
        return AmplifiedEpsilon(sampling=self.sampling, accountant=self.accountant,
                                noise_multiplier=float(z), epsilon=float(eps),
                                delta=float(delta), rounds=self.rounds, monte_carlo=mc)


def _label(method: str) -> str:
    return f"method {method!r}" + (" (dp-fedavg)" if method == "identity" else "")


def amplified_accountant(*, sampling: str, factorization: Factorization,
                         clients_per_round: int | None = None, num_clients: int | None = None,
                         samples: int = DEFAULT_SAMPLES, seed: int = 0,
                         beta: float | None = None) -> AmplifiedAccountant:
    """The amplification accountant of ``factorization`` under ``sampling``.

    ``b`` is ``factorization.participation.min_sep`` (the bins / groups); ``q`` comes from
    ``clients_per_round / num_clients`` (``poisson``) or ``clients_per_round * b / num_clients``
    (``cyclic-poisson``).  Pairs that cannot be accounted raise ``ValueError`` naming the
    sampling and the method: ``poisson`` with correlated noise, ``cyclic-poisson`` with a ``C``
    that is not banded with bandwidth ``<= b``, ``balls-in-bins`` with a non-Toeplitz ``C`` or a
    negative entry in its first column.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "cyclic":
        raise ValueError("sampling: 'cyclic' (public cohorts) has no amplification; "
                         "fedmf.ledger accounts it")
    if not isinstance(factorization, Factorization):
        raise ValueError(f"factorization must be a Factorization, got {type(factorization)}")
    method = factorization.method
    n = factorization.n
    b = factorization.participation.min_sep
    what = f"{sampling!r} with {_label(method)}"
    if not factorization.is_toeplitz:
        raise ValueError(f"sampling: {what} cannot be accounted: C is not Toeplitz; amplified "
                         "accounting supports lower-triangular Toeplitz C (every method but "
                         "'optimal'); use sampling 'cyclic'")
    column = strategy_first_column(factorization)
    q: float | None = None
    if sampling in ("poisson", "cyclic-poisson"):
        if not clients_per_round or not num_clients:
            raise ValueError(f"num_clients: sampling {sampling!r} needs num_clients and "
                             f"clients_per_round, got {num_clients!r} and {clients_per_round!r}")
        m = _count("clients_per_round", clients_per_round)
        big_n = _count("num_clients", num_clients)
        q = m / big_n if sampling == "poisson" else m * b / big_n
    if sampling == "poisson":
        if method != "identity" or _bandwidth(column) != 1:
            raise ValueError(f"sampling: {what} cannot be accounted: poisson sampling is "
                             "accounted only for independent noise (identity / dp-fedavg); use "
                             "'balls-in-bins' or 'cyclic-poisson' for correlated noise")
        b = 1
    elif sampling == "cyclic-poisson":
        p = _bandwidth(column)
        if p > b:
            raise ValueError(f"sampling: {what} cannot be accounted: cyclic-poisson needs a "
                             f"banded C with bandwidth <= b = {b} (identity, bsr, bandmf with "
                             f"bands <= b), got bandwidth {p}; use 'balls-in-bins' or 'cyclic'")
    elif np.any(column < 0):
        j = int(np.flatnonzero(column < 0)[0])
        raise ValueError(f"sampling: {what} cannot be accounted: balls-in-bins Monte Carlo "
                         f"needs C's first column >= 0 (entry {j} is {column[j]:.3g}); "
                         "supported: Toeplitz C with a non-negative first column (identity, "
                         "sqrt, bsr, bisr, lr-sqrt, lr-bisr, bandmf; opt-bisr and blt only when "
                         "their optimised coefficients happen to be); use sampling 'cyclic'")
    if sampling == "balls-in-bins":
        _count("samples", samples)
    return AmplifiedAccountant(sampling=sampling, method=method, rounds=n, bins=b,
                               sampling_rate=q, column_norm=float(np.linalg.norm(column)),
                               samples=int(samples), seed=int(seed), beta=beta,
                               first_column=column)
