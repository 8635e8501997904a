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

Amplification by sampling (``sampling`` other than ``"cyclic"``; :mod:`fedmf.amplification`):
the un-amplified bound above stays valid (it is the worst case over the secret choices) and the
amplified one is computed beside it; calibration takes the smaller ``z`` and the reported
``epsilon`` is the smaller of the two at that ``z`` (:attr:`PrivacyLedger.epsilon_bound` says
which).  ``delta_spent``, ``mu`` and ``rho`` stay un-amplified: valid upper bounds (sampling
only lowers the privacy curve), not the amplified values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import accounting
from .amplification import (
    DEFAULT_SAMPLES,
    SAMPLINGS,
    AmplifiedAccountant,
    AmplifiedEpsilon,
    amplified_accountant,
)
from .factorizations import Factorization
from .participation import Participation
from .sensitivity import sensitivity

__all__ = ["PLD_MAX_EPSILON", "PrivacyLedger", "privacy_ledger"]

#: Above this closed-form epsilon the exact closed form replaces PLD (which would take minutes).
PLD_MAX_EPSILON = 64.0
#: Prefix (per-round) epsilons need dense ``C`` blocks: up to this horizon.
MAX_PREFIX_ROUNDS = 4096
#: Amplified epsilon spent is computed at about this many rounds (the next one >= t is used;
#: valid since a prefix is post-processing of a longer release).
MC_CHECKPOINTS = 10


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
        sampling: ``"cyclic"`` (public cohorts) or an amplified mode of
            :data:`fedmf.amplification.SAMPLINGS`.
        epsilon_unamplified: epsilon of the un-amplified bound at :attr:`noise_multiplier`.
        epsilon_amplified: epsilon with amplification by sampling (``None`` for ``cyclic``).
        epsilon_bound: ``"amplified"`` or ``"un-amplified"``: which one :attr:`epsilon` is.
        accountant: ``"pld"`` (un-amplified), ``"pld-poisson"``, ``"pld-cyclic-poisson"`` or
            ``"monte-carlo"``.
        noise_multiplier_unamplified, noise_multiplier_amplified: the calibrated ``z`` of
            each bound (``None`` when ``z`` was given or there is no amplification).
        monte_carlo: the Monte Carlo details of the amplified epsilon (``balls-in-bins``).
    """

    def __init__(self, *, factorization: Factorization | None, participation: Participation,
                 rounds: int, delta: float, noise_multiplier: float, epsilon: float,
                 clip_count_stddev: float | None = None, sampling: str = "cyclic",
                 amplification: AmplifiedAccountant | None = None,
                 amplified: AmplifiedEpsilon | None = None,
                 noise_multiplier_unamplified: float | None = None,
                 noise_multiplier_amplified: float | None = None) -> None:
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
        self.sampling = sampling
        self._amp = amplification
        self.epsilon_unamplified = self.epsilon
        self.epsilon_amplified: float | None = None
        self.monte_carlo = None if amplified is None else amplified.monte_carlo
        self.accountant = "pld"
        self.noise_multiplier_unamplified = noise_multiplier_unamplified
        self.noise_multiplier_amplified = noise_multiplier_amplified
        if self.private and amplified is not None:
            self.accountant = amplified.accountant
            self.epsilon_amplified = float(amplified.epsilon)
            self.epsilon = min(self.epsilon_unamplified, self.epsilon_amplified)
        self.epsilon_bound = ("amplified" if self.epsilon_amplified is not None
                              and self.epsilon_amplified < self.epsilon_unamplified
                              else "un-amplified")
        self._amp_spent: dict[tuple[int, float], float] = {}

    def _mu2(self, sens: float, k: int) -> float:
        """``mu^2`` of the release: update stream plus adaptive clipping's count queries."""
        mu2 = (sens / self.noise_multiplier) ** 2
        if self.clip_count_stddev is not None:
            mu2 += k / self.clip_count_stddev**2
        return mu2

    def mu(self, server_round: int) -> float:
        """``mu`` of the release of rounds ``1..server_round`` (one Gaussian: ``mu``-GDP).
        Un-amplified: with amplified sampling a valid ``mu`` (sampling only lowers the privacy
        curve), not the amplified one."""
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
        :attr:`delta`).

        With amplification: the smaller of the un-amplified prefix bound and the amplified one
        at the next of about :data:`MC_CHECKPOINTS` computed rounds ``t' >= t`` (valid since a
        prefix is post-processing of a longer release; ``poisson``: ``t'`` compositions,
        ``cyclic-poisson``: ``ceil(t' / b)``, both PLD at a coarser pessimistic grid; Monte
        Carlo: the prefix Gram matrix), never above :attr:`epsilon`.
        """
        if not self.private:
            return math.inf
        t = int(server_round)
        if t < 1:
            return 0.0
        unamplified = self._unamplified_spent(t, delta)
        if self._amp is None:
            return unamplified
        same = delta is None or delta == self.delta
        cap = self.epsilon if same else math.inf
        if t >= self.rounds and same:
            return self.epsilon
        return min(unamplified, self._amplified_spent(t, self.delta if same else delta), cap)

    def _unamplified_spent(self, t: int, delta: float | None) -> float:
        if delta is None or delta == self.delta:
            if t >= self.rounds or not math.isfinite(self.epsilon_unamplified):
                return self.epsilon_unamplified
            if t not in self._spent:
                eps = accounting.analytic_gaussian_epsilon(
                    noise_multiplier=1.0 / self.mu(t), sensitivity=1.0, delta=self.delta)
                # the prefix is post-processing of the whole release: never above the total
                self._spent[t] = min(float(eps), self.epsilon_unamplified)
            return self._spent[t]
        return float(accounting.analytic_gaussian_epsilon(
            noise_multiplier=1.0 / self.mu(t), sensitivity=1.0, delta=delta))

    def checkpoints(self) -> list[int]:
        """Rounds at which the Monte Carlo epsilon spent is computed (increasing, ends at n)."""
        n = self.rounds
        return sorted({math.ceil(n * i / MC_CHECKPOINTS) for i in range(1, MC_CHECKPOINTS + 1)})

    def _amplified_spent(self, t: int, delta: float) -> float:
        amp = self._amp
        assert amp is not None
        t = next(c for c in self.checkpoints() if c >= min(t, self.rounds))
        t = min(t, self.rounds)
        key = (t, float(delta))
        if key not in self._amp_spent:
            if t == self.rounds and delta == self.delta and self.epsilon_amplified is not None:
                eps = self.epsilon_amplified
            else:
                # PLD prefixes at a coarser (still pessimistic) grid: ~10x faster
                eps = amp.epsilon(noise_multiplier=self.noise_multiplier, delta=delta,
                                  rounds=t, coarse=True).epsilon
            self._amp_spent[key] = float(eps)
        return self._amp_spent[key]

    def delta_spent(self, server_round: int, *, epsilon: float) -> float:
        """Delta of the releases of rounds ``1..server_round`` at ``epsilon`` (exact for one
        Gaussian, Balle & Wang 2018).  Un-amplified: with amplified sampling an upper bound,
        not the amplified delta."""
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
            "sampling": self.sampling,
            "epsilon_bound": self.epsilon_bound,
            "epsilon_amplified": self.epsilon_amplified,
            "epsilon_unamplified": self.epsilon_unamplified,
            "accountant": self.accountant,
            **self._amplification_dict(),
        }

    def _amplification_dict(self) -> dict[str, Any]:
        if self._amp is None:
            return {}
        out: dict[str, Any] = {
            "noise_multiplier_unamplified": self.noise_multiplier_unamplified,
            "noise_multiplier_amplified": self.noise_multiplier_amplified,
            "sampling_rate": self._amp.sampling_rate,
        }
        mc = self.monte_carlo
        if mc is not None:
            out.update(mc_samples=mc.samples, mc_seed=mc.seed, mc_beta=mc.beta,
                       mc_delta_estimate=mc.delta_estimate, mc_delta_upper=mc.delta_upper,
                       mc_direction=mc.direction)
        return out


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


def _check_participation(sampling: str, part: Participation, n: int) -> None:
    """The factorization's participation must be what the un-amplified bound covers."""
    if sampling == "poisson":
        if part.kind == "single" and n == 1:
            return
        if part.kind != "min_sep" or part.min_sep != 1 or part.effective_k(n) < n:
            raise ValueError(
                f"participation: sampling 'poisson' lets a client join any round, so the "
                f"factorization's participation must be min_sep with b = 1 and k = rounds = "
                f"{n} (Participation.min_separation(min_sep=1, max_participations={n})), got "
                f"{part}")
        return
    b = part.min_sep
    if part.kind == "single":
        return
    if part.effective_k(n) < math.ceil(n / b):
        raise ValueError(
            f"participation: sampling {sampling!r} puts a client in every round of its cohort, "
            f"ceil(rounds / b) = {math.ceil(n / b)} participations, but the factorization's "
            f"participation allows only {part.effective_k(n)}")


def privacy_ledger(*, factorization: Factorization | None, delta: float,
                   epsilon: float | None = None, noise_multiplier: float = 0.0,
                   clip_count_stddev: float | None = None,
                   clients_per_round: int | None = None,
                   participation: Participation | None = None,
                   rounds: int | None = None, sampling: str = "cyclic",
                   num_clients: int | None = None, mc_samples: int = DEFAULT_SAMPLES,
                   mc_seed: int = 0) -> PrivacyLedger:
    """The ledger of a release with ``factorization`` (``None``: not private).

    Args:
        factorization: its ``C``, participation pattern and sensitivity (identity for
            independent noise).  With amplified sampling its participation is what the
            un-amplified bound covers: ``cyclic`` ``(k = ceil(n / b), b)`` for ``balls-in-bins``
            and ``cyclic-poisson``, ``min_separation(min_sep=1, max_participations=n)`` for
            ``poisson``; ``b = participation.min_sep`` is the number of bins / groups.
        delta: target delta.
        epsilon: target epsilon; used to calibrate ``z`` when ``noise_multiplier`` is 0.
        noise_multiplier: a fixed ``z`` (``> 0`` overrides ``epsilon``).
        clip_count_stddev: ``sigma_b`` of adaptive clipping (``None``: fixed clipping; only
            with ``sampling="cyclic"``).
        clients_per_round: ``m`` (adaptive clipping's accounting API; ``q`` of the Poisson
            modes).
        participation: only for a non-private ledger (taken from ``factorization``
            otherwise).
        rounds: only for a non-private ledger (taken from ``factorization`` otherwise).
        sampling: one of :data:`fedmf.amplification.SAMPLINGS` (``"cyclic"``: no
            amplification, the accounting of the module docstring).
        num_clients: ``N`` (``q`` of the Poisson modes).
        mc_samples: Monte Carlo samples per pass (``balls-in-bins``; calibrations are
            cached in process on these, the seed and ``C``).
        mc_seed: the Monte Carlo accountant's seed.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if factorization is None:
        return PrivacyLedger(factorization=None,
                             participation=participation or Participation.single(),
                             rounds=int(rounds or 1), delta=delta, noise_multiplier=0.0,
                             epsilon=math.inf, sampling=sampling)
    part = factorization.participation
    n = factorization.workload.n
    k = part.effective_k(n)
    sens = float(factorization.sensitivity.value)
    amp: AmplifiedAccountant | None = None
    if sampling != "cyclic":
        if clip_count_stddev is not None:
            raise ValueError(f"clipping: adaptive clipping is accounted only with sampling "
                             f"'cyclic', got sampling {sampling!r} with method "
                             f"{factorization.method!r}; use fixed clipping")
        amp = amplified_accountant(sampling=sampling, factorization=factorization,
                                   clients_per_round=clients_per_round, num_clients=num_clients,
                                   samples=mc_samples, seed=mc_seed)
        _check_participation(sampling, part, n)
    amplified: AmplifiedEpsilon | None = None
    z_unamplified = z_amplified = None
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
        if amp is not None:
            z_unamplified = z
            amplified = amp.calibrate(epsilon=epsilon, delta=delta)
            z_amplified = amplified.noise_multiplier
            z = min(z_unamplified, z_amplified)
    if amp is not None and (amplified is None or amplified.noise_multiplier != z):
        amplified = amp.epsilon(noise_multiplier=z, delta=delta)
    eps = _release_epsilon(z=z, sens=sens, k=k, delta=delta, sigma_b=clip_count_stddev,
                           clients_per_round=clients_per_round)
    return PrivacyLedger(factorization=factorization, participation=part, rounds=n,
                         delta=delta, noise_multiplier=z, epsilon=eps,
                         clip_count_stddev=clip_count_stddev, sampling=sampling,
                         amplification=amp, amplified=amplified,
                         noise_multiplier_unamplified=z_unamplified,
                         noise_multiplier_amplified=z_amplified)
