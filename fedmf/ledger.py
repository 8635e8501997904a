"""One privacy ledger: noise multiplier, epsilon, rho and epsilon spent after round ``t``.

Every release of a fedmf run -- correlated noise (any factorization), independent noise (the
identity factorization: ``dp-fedavg``, and Flower's wrapper ``flower-dp``), with or without
adaptive clipping -- is accounted here, so each formula exists once.  The strategies, the
baselines, ``fedmf plan`` / ``calibrate`` and the results all read a :class:`PrivacyLedger`.

Without amplification the whole release is one Gaussian mechanism with noise multiplier
``z / sens(C)`` (:mod:`fedmf.accounting`); adaptive clipping (Andrew et al. 2021) composes ``k``
Gaussian count queries with std ``sigma_b``, which is again exactly one Gaussian with
``mu^2 = (sens / z)^2 + k / sigma_b^2``.  Epsilon is ``dp_accounting``'s PLD (pessimistic, an
upper bound tight to ~1e-4) unless the closed form exceeds :data:`PLD_MAX_EPSILON`, where PLD
takes minutes and the closed form (Balle & Wang 2018, exact for one Gaussian) is used.

Epsilon spent after round ``t`` uses the sensitivity of the top-left ``t x t`` block of ``C``
(the first ``t`` outputs of a lower-triangular ``C`` depend on the first ``t`` inputs only) with
``min(k, ceil(t / b))`` participations, in closed form, capped by the total.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import accounting
from .factorizations import Factorization
from .participation import Participation
from .sensitivity import sensitivity

__all__ = ["PLD_MAX_EPSILON", "PrivacyLedger", "privacy_ledger"]

#: Above this closed-form epsilon the exact closed form replaces PLD (which would take minutes).
PLD_MAX_EPSILON = 64.0
#: Prefix (per-round) epsilons need dense ``C`` blocks: up to this horizon.
MAX_PREFIX_ROUNDS = 4096


class PrivacyLedger:
    """The privacy of one run (see the module docstring); ``private=False`` for ``fedavg``.

    Attributes:
        rounds, min_sep, max_participations: horizon ``n``, ``b`` and ``k``.
        delta: target delta.
        noise_multiplier: ``z = std / clip`` of the i.i.d. draws ``Z``.
        sensitivity, sensitivity_exact: ``sens(C)`` under the participation pattern, and
            whether it is exact or a certified upper bound.
        epsilon, rho: of the whole release (``inf`` when not private).
        clip_count_stddev: ``sigma_b`` of adaptive clipping's count queries (``None``: fixed).
    """

    def __init__(self, *, factorization: Factorization | None, participation: Participation,
                 rounds: int, delta: float, noise_multiplier: float, epsilon: float,
                 clip_count_stddev: float | None = None) -> None:
        self._fact = factorization
        self.participation = participation
        self.rounds = int(rounds)
        self.min_sep = participation.min_sep
        self.max_participations = participation.effective_k(rounds)
        self.delta = float(delta)
        self.private = factorization is not None
        self.noise_multiplier = float(noise_multiplier)
        self.clip_count_stddev = clip_count_stddev
        if self.private:
            assert factorization is not None
            self.sensitivity = float(factorization.sensitivity.value)
            self.sensitivity_exact = bool(factorization.sensitivity.exact)
            self.epsilon = float(epsilon)
            self.rho = self._mu2(self.sensitivity, self.max_participations) / 2.0
        else:
            self.sensitivity, self.sensitivity_exact = 0.0, True
            self.epsilon = self.rho = math.inf
        self._spent: dict[int, float] = {}
        self._dense: np.ndarray | None = None

    def _mu2(self, sens: float, k: int) -> float:
        """``mu^2`` of the release: update stream plus adaptive clipping's count queries."""
        mu2 = (sens / self.noise_multiplier) ** 2
        if self.clip_count_stddev is not None:
            mu2 += k / self.clip_count_stddev**2
        return mu2

    def mu(self, server_round: int) -> float:
        """``mu`` of the release of rounds ``1..server_round`` (one Gaussian: ``mu``-GDP)."""
        t = min(int(server_round), self.rounds)
        if t < 1:
            return 0.0
        k_t = min(self.max_participations, math.ceil(t / self.min_sep))
        sens_t = self.sensitivity if t >= self.rounds else self._prefix_sensitivity(t, k_t)
        if sens_t is None:  # too long a horizon for dense blocks: the total bounds it
            sens_t, k_t = self.sensitivity, self.max_participations
        return math.sqrt(self._mu2(sens_t, k_t))

    def epsilon_spent(self, server_round: int, *, delta: float | None = None) -> float:
        """Epsilon of the releases of rounds ``1..server_round`` at ``delta`` (default
        :attr:`delta`)."""
        if not self.private:
            return math.inf
        t = int(server_round)
        if t < 1:
            return 0.0
        if delta is None or delta == self.delta:
            if t >= self.rounds or not math.isfinite(self.epsilon):
                return self.epsilon
            if t not in self._spent:
                eps = accounting.analytic_gaussian_epsilon(
                    noise_multiplier=1.0 / self.mu(t), sensitivity=1.0, delta=self.delta)
                # the prefix is post-processing of the whole release: never above the total
                self._spent[t] = min(float(eps), self.epsilon)
            return self._spent[t]
        return float(accounting.analytic_gaussian_epsilon(
            noise_multiplier=1.0 / self.mu(t), sensitivity=1.0, delta=delta))

    def delta_spent(self, server_round: int, *, epsilon: float) -> float:
        """Delta of the releases of rounds ``1..server_round`` at ``epsilon`` (exact for one
        Gaussian, Balle & Wang 2018)."""
        if not self.private:
            return 1.0
        mu = self.mu(server_round)
        return 0.0 if mu == 0 else float(accounting.analytic_gaussian_delta(mu=mu,
                                                                            epsilon=epsilon))

    def _prefix_sensitivity(self, t: int, k_t: int) -> float | None:
        fact = self._fact
        assert fact is not None
        if fact.method == "identity":  # k_t orthogonal unit columns
            return math.sqrt(k_t)
        if self.rounds > MAX_PREFIX_ROUNDS:
            return None
        if self._dense is None:
            self._dense = np.asarray(fact.strategy_matrix(), dtype=np.float64)
        part = self.participation
        if k_t == 1:
            prefix = Participation.single()
        elif part.kind == "cyclic":
            prefix = Participation.cyclic(max_participations=k_t, min_sep=part.min_sep)
        else:
            prefix = Participation.min_separation(min_sep=part.min_sep, max_participations=k_t)
        value = sensitivity(participation=prefix, rounds=t, C=self._dense[:t, :t]).value
        return min(float(value), self.sensitivity)  # (a prefix is post-processing)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for logs and results (never anything secret)."""
        return {
            "rounds": self.rounds,
            "min_sep": self.min_sep,
            "max_participations": self.max_participations,
            "delta": self.delta,
            "sensitivity": self.sensitivity,
            "sensitivity_exact": self.sensitivity_exact,
            "noise_multiplier": self.noise_multiplier,
            "epsilon": self.epsilon,
            "rho": self.rho,
            "clip_count_stddev": self.clip_count_stddev,
        }


def _release_epsilon(*, z: float, sens: float, k: int, delta: float,
                     sigma_b: float | None, clients_per_round: int | None) -> float:
    mu2 = (sens / z) ** 2 + (k / sigma_b**2 if sigma_b is not None else 0.0)
    closed = accounting.analytic_gaussian_epsilon(
        noise_multiplier=1.0 / math.sqrt(mu2), sensitivity=1.0, delta=delta)
    if closed > PLD_MAX_EPSILON:
        return float(closed)
    try:
        if sigma_b is not None:
            return float(accounting.adaptive_clipping_epsilon(
                noise_multiplier=z, clip_count_stddev=sigma_b,
                clients_per_round=clients_per_round or 1, participations=k,
                sensitivity=sens, delta=delta))
        return float(accounting.epsilon(noise_multiplier=z, sensitivity=sens, delta=delta))
    except (ValueError, OverflowError, MemoryError):  # PLD can not represent it: exact form
        return float(closed)


def privacy_ledger(*, factorization: Factorization | None, delta: float,
                   epsilon: float | None = None, noise_multiplier: float = 0.0,
                   clip_count_stddev: float | None = None,
                   clients_per_round: int | None = None,
                   participation: Participation | None = None,
                   rounds: int | None = None) -> PrivacyLedger:
    """The ledger of a release with ``factorization`` (``None``: not private).

    Args:
        factorization: its ``C``, participation pattern and sensitivity (identity for
            independent noise).
        delta: target delta.
        epsilon: target epsilon; used to calibrate ``z`` when ``noise_multiplier`` is 0.
        noise_multiplier: a fixed ``z`` (``> 0`` overrides ``epsilon``).
        clip_count_stddev: ``sigma_b`` of adaptive clipping (``None``: fixed clipping).
        clients_per_round: ``m`` (adaptive clipping's accounting API).
        participation, rounds: only for a non-private ledger (taken from ``factorization``
            otherwise).
    """
    if factorization is None:
        return PrivacyLedger(factorization=None,
                             participation=participation or Participation.single(),
                             rounds=int(rounds or 1), delta=delta, noise_multiplier=0.0,
                             epsilon=math.inf)
    part = factorization.participation
    n = factorization.workload.n
    k = part.effective_k(n)
    sens = float(factorization.sensitivity.value)
    if noise_multiplier > 0:
        z = float(noise_multiplier)
    elif epsilon is None:
        raise ValueError("epsilon must be given when noise-multiplier is 0")
    elif clip_count_stddev is not None:
        z = accounting.calibrate_adaptive_clipping(
            epsilon=epsilon, delta=delta, clip_count_stddev=clip_count_stddev,
            clients_per_round=clients_per_round or 1, participations=k, sensitivity=sens)
    else:
        z = accounting.calibrate_noise_multiplier(epsilon=epsilon, delta=delta,
                                                  sensitivity=sens)
    eps = _release_epsilon(z=z, sens=sens, k=k, delta=delta, sigma_b=clip_count_stddev,
                           clients_per_round=clients_per_round)
    return PrivacyLedger(factorization=factorization, participation=part, rounds=n,
                         delta=delta, noise_multiplier=z, epsilon=eps,
                         clip_count_stddev=clip_count_stddev)
