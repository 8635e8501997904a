"""Empirical privacy of a finished run from canary scores (no Flower, no torch).

A *canary* is a client whose update is a fixed random unit direction ``c`` scaled to the clip
norm.  Some canaries are inserted into the federation, others are held out (never clients).
After training, an observer who knows every direction scores it against what the run
released (:func:`cosine_scores`).  Inserted canaries score higher; how much higher measures
what the release reveals about one client:

* :func:`one_shot_epsilon` -- the one-shot estimate of Andrew et al., "One-shot empirical
  privacy estimation for federated learning" (ICLR 2024, arXiv 2302.03098, Sec. 3): fit a
  Gaussian to the held-out scores and one to the inserted scores, and report the epsilon at
  ``delta`` of the Gaussian mechanism whose output on neighbouring datasets is a draw from one
  or the other (:func:`gaussian_epsilon`).  An *estimate*, not a bound.
* :func:`epsilon_lower_bound` -- a one-sided Clopper-Pearson lower bound: for a threshold
  ``tau``, guessing "inserted" when a score is ``>= tau`` is a membership test whose true and
  false positive rates satisfy ``TPR <= exp(eps) FPR + delta`` under (eps, delta)-DP; bounding
  ``TPR`` from below and ``FPR`` from above with exact binomial intervals gives
  ``eps >= log((TPR_lo - delta) / FPR_hi)`` (Jagielski et al. 2020; Nasr et al. 2021).  The
  threshold is chosen on the same scores, so the intervals are Bonferroni-corrected over every
  candidate threshold (as jax_privacy's ``CanaryScoreAuditor`` does with ``Bonferroni``).  It
  treats the canaries' scores as independent trials, which they are only approximately (they
  share one noise draw; Andrew et al. Sec. 3 argue the dependence vanishes as the dimension
  grows).

A lower bound above the claimed epsilon shows the claim is wrong; one below it shows nothing
about the claim's tightness: a stronger attack could score higher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

__all__ = [
    "clopper_pearson",
    "cosine_scores",
    "epsilon_lower_bound",
    "gaussian_delta",
    "gaussian_epsilon",
    "one_shot_epsilon",
    "unit_directions",
]

_EPS_MAX = 100.0


def unit_directions(*, count: int, dim: int, seed: int | Sequence[int]) -> np.ndarray:
    """``count`` independent directions uniform on the unit sphere of ``R^dim`` (float32,
    shape ``(count, dim)``), reproducible from ``seed``.  Canary directions are public:
    they are the attacker's, not the mechanism's secret."""
    if count < 0 or dim < 1:
        raise ValueError(f"need count >= 0 and dim >= 1, got count={count}, dim={dim}")
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((count, dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-30)
    return out


def cosine_scores(directions: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Cosine of ``vector`` with each row of ``directions`` (unit rows); 0 for a zero vector."""
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not math.isfinite(norm):
        return np.zeros(directions.shape[0])
    return (directions @ (vector / norm).astype(directions.dtype)).astype(np.float64)


# --------------------------------------------------------------------------- one-shot estimate
def gaussian_delta(epsilon: float, *, mu: float) -> float:
    """``delta(eps)`` of distinguishing ``N(mu, 1)`` from ``N(0, 1)`` (the Gaussian mechanism
    with sensitivity over noise ``mu``; Balle and Wang 2018, Thm. 8):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``."""
    if mu <= 0:
        return 0.0
    if not math.isfinite(mu):
        return 1.0
    tail = stats.norm.logcdf(-epsilon / mu - mu / 2) + epsilon
    return max(0.0, float(stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(min(tail, 700.0))))


def gaussian_epsilon(*, mu: float, delta: float) -> float:
    """Smallest ``eps`` with :func:`gaussian_delta` ``<= delta`` (``inf`` past 100)."""
    if gaussian_delta(0.0, mu=mu) <= delta:
        return 0.0
    if gaussian_delta(_EPS_MAX, mu=mu) > delta:
        return math.inf
    return float(optimize.brentq(lambda e: gaussian_delta(e, mu=mu) - delta, 0.0, _EPS_MAX,
                                 xtol=1e-10, rtol=1e-12))


def one_shot_epsilon(*, inserted: Sequence[float], held_out: Sequence[float],
                     delta: float) -> dict[str, float]:
    """Andrew et al.'s one-shot estimate (arXiv 2302.03098, Sec. 3): the scores of held-out
    and inserted canaries, modelled as Gaussians of one (pooled) standard deviation, are the
    outputs of a Gaussian mechanism with ``mu = |mean_in - mean_out| / std``; the estimate is
    its epsilon at ``delta``.  Returns ``epsilon``, ``mu`` and the fitted means and stds."""
    ins, out = _scores(inserted, "inserted"), _scores(held_out, "held_out")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    mu1, mu0 = float(ins.mean()), float(out.mean())
    s1, s0 = float(ins.std(ddof=1)), float(out.std(ddof=1))
    pooled = math.sqrt(((len(ins) - 1) * s1**2 + (len(out) - 1) * s0**2)
                       / (len(ins) + len(out) - 2))
    mu = abs(mu1 - mu0) / pooled if pooled > 0 else (0.0 if mu1 == mu0 else math.inf)
    return {"epsilon": gaussian_epsilon(mu=mu, delta=delta), "mu": mu,
            "mean_inserted": mu1, "std_inserted": s1, "mean_held_out": mu0,
            "std_held_out": s0}


# --------------------------------------------------------------------------- formal lower bound
def clopper_pearson(successes: int, trials: int, *, alpha: float) -> tuple[float, float]:
    """One-sided exact binomial bounds ``(lo, hi)``: ``P(p < lo) <= alpha`` and
    ``P(p > hi) <= alpha`` (each side at level ``alpha``)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, trials >= 1; got {successes}/{trials}")
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(alpha, successes,
                                                         trials - successes + 1))
    hi = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha, successes + 1,
                                                              trials - successes))
    return lo, hi


def epsilon_lower_bound(*, inserted: Sequence[float], held_out: Sequence[float], delta: float,
                        confidence: float = 0.95) -> dict[str, float]:
    """Largest ``log((TPR_lo - delta) / FPR_hi)`` over thresholds, in both directions (high
    scores mean inserted, or low ones), Bonferroni-corrected over every candidate threshold so
    that the returned bound holds with probability ``>= confidence`` (for independent scores).

    Returns ``epsilon`` (0 when no threshold certifies anything), ``threshold``, the counts
    and ``confidence``.
    """
    ins, out = _scores(inserted, "inserted"), _scores(held_out, "held_out")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    candidates = np.unique(np.concatenate([ins, out]))
    # both directions, every threshold, two intervals each
    alpha = (1 - confidence) / (2 * 2 * len(candidates))
    n1, n0 = len(ins), len(out)
    best = {"epsilon": 0.0, "threshold": math.nan, "direction": "none",
            "true_positives": 0, "false_positives": 0}
    for sign, name in ((1.0, "high"), (-1.0, "low")):
        taus = sign * candidates
        tp = n1 - np.searchsorted(np.sort(sign * ins), taus, side="left")
        fp = n0 - np.searchsorted(np.sort(sign * out), taus, side="left")
        tpr_lo = _cp_lower(tp, n1, alpha=alpha)
        fpr_hi = _cp_upper(fp, n0, alpha=alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = np.where(tpr_lo > delta, np.log(np.maximum(tpr_lo - delta, 1e-300) / fpr_hi),
                           -np.inf)
        i = int(np.argmax(eps))
        if eps[i] > best["epsilon"]:
            best = {"epsilon": float(eps[i]), "threshold": float(taus[i] * sign),
                    "direction": name, "true_positives": int(tp[i]),
                    "false_positives": int(fp[i])}
    return {**best, "confidence": confidence, "inserted": n1, "held_out": n0}


def _cp_lower(k: np.ndarray, n: int, *, alpha: float) -> np.ndarray:
    """Vectorised lower end of :func:`clopper_pearson`."""
    k = np.asarray(k)
    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    return np.where(k == 0, 0.0, lo)


def _cp_upper(k: np.ndarray, n: int, *, alpha: float) -> np.ndarray:
    """Vectorised upper end of :func:`clopper_pearson`."""
    k = np.asarray(k)
    with np.errstate(invalid="ignore"):
        hi = stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1))
    return np.where(k == n, 1.0, hi)


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size < 2:
        raise ValueError(f"{name}: need at least 2 canary scores, got {arr.size}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: canary scores must be finite")
    return arr
