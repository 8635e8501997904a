"""Privacy accounting for matrix-factorization (correlated-noise) and independent-noise DP-FL.

Conventions.  ``noise_multiplier`` ``z`` is the ratio of the std of each i.i.d. Gaussian draw to
the clip norm (``std = z * clip``).  Cohorts are fixed (no sampling), so there is no privacy
amplification.

* Matrix factorization (DP-MF / DP-FTRL): the whole release ``C X + Z`` is a single Gaussian
  mechanism whose L2 sensitivity is ``sens(C)`` clip norms (``fedmf.sensitivity``), i.e. a
  Gaussian with noise multiplier ``z / sens``.  It is ``mu``-GDP with ``mu = sens / z`` and
  ``rho``-zCDP with ``rho = sens^2 / (2 z^2)``.
* DP-FedAvg (independent noise, each client in at most ``k`` rounds): ``k``-fold composition of
  the Gaussian mechanism with multiplier ``z``, equal to one Gaussian with multiplier
  ``z / sqrt(k)``.

``epsilon(delta)`` is computed with ``dp_accounting``'s privacy-loss-distribution (PLD)
accountant (pessimistic discretisation, so an upper bound that is tight to ~1e-4); the exact
closed form of Balle & Wang (2018) is :func:`analytic_gaussian_epsilon`.  Calibration functions
start from the closed form (a lower bound on the PLD answer) and increase ``z`` geometrically in
tiny relative steps until the PLD epsilon meets the target, so the result achieves the target
under PLD and is within ``rtol`` of the smallest such ``z``.

Errors for bad input are ``ValueError`` whose message starts with the parameter name.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Callable

import dp_accounting
from dp_accounting.pld import PLDAccountant
from scipy import optimize, special

__all__ = [
    "adaptive_clipping_epsilon",
    "analytic_gaussian_delta",
    "analytic_gaussian_epsilon",
    "calibrate_adaptive_clipping",
    "calibrate_dpfedavg",
    "calibrate_noise_multiplier",
    "dpfedavg_epsilon",
    "epsilon",
    "rho_zcdp",
]

logger = logging.getLogger(__name__)

_CALIBRATION_RTOL = 1e-6


# ---------------------------------------------------------------------------- validation
def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- closed form
def analytic_gaussian_delta(*, mu: float, epsilon: float) -> float:
    """Exact ``delta(epsilon)`` of the Gaussian mechanism with ``mu = sensitivity / std``.

    ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle & Wang 2018, Thm. 8),
    evaluated with ``log_ndtr`` for the second term.
    """
    mu = _positive("mu", mu)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    a = float(special.ndtr(-epsilon / mu + mu / 2))
    b = math.exp(epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2)))
    return max(a - b, 0.0)


def analytic_gaussian_epsilon(
    *, noise_multiplier: float, sensitivity: float, delta: float
) -> float:
    """Exact epsilon of one Gaussian mechanism (Balle & Wang 2018), by root bracketing.

    Solves ``analytic_gaussian_delta(mu=sensitivity/noise_multiplier, epsilon) = delta`` for
    ``epsilon >= 0`` (``delta(eps)`` is decreasing) with Brent's method on a bracket found by
    doubling; returns 0 when ``delta(0) <= delta``.
    """
    z = _positive("noise_multiplier", noise_multiplier)
    sens = _positive("sensitivity", sensitivity)
    delta = _delta(delta)
    return _analytic_epsilon_mu(sens / z, delta)


def _analytic_epsilon_mu(mu: float, delta: float) -> float:
    def f(eps: float) -> float:
        return analytic_gaussian_delta(mu=mu, epsilon=eps) - delta

    if f(0.0) <= 0:
        return 0.0
    hi = max(1.0, mu * mu)
    while f(hi) > 0:
        hi *= 2.0
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-14, rtol=1e-13, maxiter=500))


# ---------------------------------------------------------------------------- PLD
@functools.lru_cache(maxsize=4096)
def _pld_epsilon(events: tuple[tuple[float, int], ...], delta: float) -> float:
    """PLD epsilon of a composition of Gaussians given as ``(noise_multiplier, count)`` pairs."""
    dp_events: list[dp_accounting.DpEvent] = []
    for z, count in events:
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if count != 1:
            event = dp_accounting.SelfComposedDpEvent(event, count)
        dp_events.append(event)
    accountant = PLDAccountant()
    accountant.compose(
        dp_events[0] if len(dp_events) == 1 else dp_accounting.ComposedDpEvent(dp_events)
    )
    return max(float(accountant.get_epsilon(delta)), 0.0)


def _calibrate(
    eps_of: Callable[[float], float], lower: float, target: float, *, rtol: float
) -> float:
    """Smallest (to ``rtol``) ``z >= lower`` with ``eps_of(z) <= target``; ``eps_of`` decreasing."""
    if eps_of(lower) <= target:
        return lower
    lo, step = lower, rtol
    hi = lower * (1.0 + step)
    while eps_of(hi) > target:
        lo, step = hi, 2.0 * step
        hi = lower * (1.0 + step)
        if step > 1e6:
            raise RuntimeError("calibration failed to find a noise multiplier")
    while hi - lo > rtol * hi:  # eps_of(lo) > target >= eps_of(hi)
        mid = 0.5 * (lo + hi)
        if eps_of(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


# ---------------------------------------------------------------------------- MF mechanism
def epsilon(*, noise_multiplier: float, sensitivity: float, delta: float) -> float:
    """Epsilon of the whole MF release: one Gaussian with multiplier ``noise_multiplier/sens``.

    Args:
        noise_multiplier: ``z = std / clip`` of the i.i.d. draws ``Z``.
        sensitivity: ``sens(C)`` for the participation schema (in clip units).
        delta: target delta in (0, 1).
    """
    z = _positive("noise_multiplier", noise_multiplier)
    sens = _positive("sensitivity", sensitivity)
    delta = _delta(delta)
    return _pld_epsilon(((z / sens, 1),), delta)


def rho_zcdp(*, noise_multiplier: float, sensitivity: float) -> float:
    """zCDP parameter of the MF release: ``rho = sensitivity^2 / (2 noise_multiplier^2)``."""
    z = _positive("noise_multiplier", noise_multiplier)
    sens = _positive("sensitivity", sensitivity)
    return sens * sens / (2.0 * z * z)


def calibrate_noise_multiplier(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise multiplier ``z`` whose MF release satisfies ``(epsilon, delta)``-DP.

    ``epsilon(noise_multiplier=z, sensitivity=sensitivity, delta=delta) <= epsilon`` holds for
    the returned ``z`` and fails for ``z * (1 - 1e-6)`` up to PLD discretisation.
    """
    target = _positive("epsilon", epsilon)
    delta = _delta(delta)
    sens = _positive("sensitivity", sensitivity)
    base = _gaussian_multiplier(target, delta)  # closed form for sensitivity 1
    z = _calibrate(lambda m: _pld_epsilon(((m, 1),), delta), base, target, rtol=_CALIBRATION_RTOL)
    return z * sens


def _gaussian_multiplier(eps: float, delta: float) -> float:
    """Closed-form multiplier (std / sensitivity) of one Gaussian achieving ``(eps, delta)``."""

    # analytic epsilon is decreasing in the multiplier m; bracket then solve.
    def f(log_m: float) -> float:
        return _analytic_epsilon_mu(math.exp(-log_m), delta) - eps

    lo, hi = -1.0, 1.0
    while f(lo) < 0:
        lo -= 2.0
    while f(hi) > 0:
        hi += 2.0
    return math.exp(optimize.brentq(f, lo, hi, xtol=1e-13, rtol=1e-13, maxiter=500))


# ---------------------------------------------------------------------------- DP-FedAvg
def dpfedavg_epsilon(*, noise_multiplier: float, participations: int, delta: float) -> float:
    """Epsilon of DP-FedAvg with independent noise and at most ``participations`` rounds per
    client: ``SelfComposedDpEvent(GaussianDpEvent(z), k)`` (no amplification)."""
    z = _positive("noise_multiplier", noise_multiplier)
    k = _count("participations", participations)
    delta = _delta(delta)
    return _pld_epsilon(((z, k),), delta)


def calibrate_dpfedavg(*, epsilon: float, delta: float, participations: int) -> float:
    """Smallest noise multiplier with ``dpfedavg_epsilon(...) <= epsilon``."""
    target = _positive("epsilon", epsilon)
    delta = _delta(delta)
    k = _count("participations", participations)
    base = _gaussian_multiplier(target, delta) * math.sqrt(k)
    return _calibrate(
        lambda m: _pld_epsilon(((m, k),), delta), base, target, rtol=_CALIBRATION_RTOL
    )


# ---------------------------------------------------------------------------- adaptive clipping
def _count_multiplier(
    clip_count_stddev: float | None, clients_per_round: int, count_sensitivity: float
) -> float:
    if clip_count_stddev is None:
        clip_count_stddev = clients_per_round / 20.0
    sigma_b = _positive("clip_count_stddev", clip_count_stddev)
    return sigma_b / count_sensitivity


def adaptive_clipping_epsilon(
    *,
    noise_multiplier: float,
    clip_count_stddev: float | None,
    clients_per_round: int,
    participations: int,
    sensitivity: float,
    delta: float,
    count_sensitivity: float = 1.0,
) -> float:
    """Epsilon of an MF release with adaptive (quantile) clipping, Andrew et al. (2021).

    Every round the server also releases the noisy count of clients whose update norm is within
    the clip, ``sum_i b_i + N(0, sigma_b^2)``, ``b_i in {0, 1}``, and updates the clip from it.
    Adding or removing one client changes that sum by at most ``count_sensitivity`` (1; 1/2 if
    the server uses the centred bits ``b_i - 1/2`` with a known cohort size, as in the paper),
    so each round is a Gaussian mechanism with multiplier ``sigma_b / count_sensitivity`` and a
    client that participates in at most ``k`` rounds contributes ``k`` of them.  The update
    stream is the MF Gaussian with multiplier ``noise_multiplier / sensitivity`` (the clip used
    each round only scales the noise with the clip, which is post-processing of earlier
    releases).  The total is the composition (PLD)

        Gaussian(noise_multiplier / sensitivity)  o  k x Gaussian(sigma_b / count_sensitivity),

    i.e. one Gaussian with ``mu^2 = (sensitivity / z)^2 + k (count_sensitivity / sigma_b)^2``.

    Args:
        noise_multiplier: ``z`` of the correlated update noise (std / current clip).
        clip_count_stddev: ``sigma_b``, std of the noise on the *sum* of the clipped-count bits
            (Andrew et al., TFF ``clipped_count_stddev``, Flower); ``None`` -> the paper's
            recommendation ``clients_per_round / 20``.  The noisy fraction is the noisy sum
            divided by ``clients_per_round``.
        clients_per_round: cohort size ``m`` (only used for the default ``sigma_b``).
        participations: ``k``, maximum number of rounds a client takes part in.
        sensitivity: ``sens(C)`` of the MF release.
        delta: target delta.
        count_sensitivity: L2 sensitivity of the count sum per participation.
    """
    z = _positive("noise_multiplier", noise_multiplier)
    m = _count("clients_per_round", clients_per_round)
    k = _count("participations", participations)
    sens = _positive("sensitivity", sensitivity)
    delta = _delta(delta)
    cs = _positive("count_sensitivity", count_sensitivity)
    zb = _count_multiplier(clip_count_stddev, m, cs)
    return _pld_epsilon(((z / sens, 1), (zb, k)), delta)


def calibrate_adaptive_clipping(
    *,
    epsilon: float,
    delta: float,
    clip_count_stddev: float | None,
    clients_per_round: int,
    participations: int,
    sensitivity: float,
    count_sensitivity: float = 1.0,
) -> float:
    """Smallest update noise multiplier ``z`` with ``adaptive_clipping_epsilon(...) <= epsilon``.

    Raises ``ValueError`` (naming ``clip_count_stddev``) when the count queries alone already
    spend the budget.
    """
    target = _positive("epsilon", epsilon)
    delta = _delta(delta)
    m = _count("clients_per_round", clients_per_round)
    k = _count("participations", participations)
    sens = _positive("sensitivity", sensitivity)
    cs = _positive("count_sensitivity", count_sensitivity)
    zb = _count_multiplier(clip_count_stddev, m, cs)
    mu_total = 1.0 / _gaussian_multiplier(target, delta)
    mu_count_sq = k / (zb * zb)
    if mu_count_sq >= mu_total * mu_total or _pld_epsilon(((zb, k),), delta) >= target:
        raise ValueError(
            f"clip_count_stddev={zb * cs:g} is too small: the clipped-count queries alone "
            f"spend epsilon >= {target:g}"
        )
    mu_update = math.sqrt(mu_total * mu_total - mu_count_sq)
    base = 1.0 / mu_update  # closed form (GDP composition), multiplier for sensitivity 1
    z = _calibrate(
        lambda m_: _pld_epsilon(((m_, 1), (zb, k)), delta), base, target, rtol=_CALIBRATION_RTOL
    )
    return z * sens
