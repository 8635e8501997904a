"""Flower's privacy-accounting protocol for the matrix-factorization release.

``flwr.supercore.privacy_accounting.PrivacyAccountant`` is the interface tools written for
Flower read epsilon from.  Flower's own ``RdpAccountant`` composes one sampled Gaussian per
round, which is right for independent noise and wrong for correlated noise: the rounds of a
DP-MF release are not independent mechanisms, the whole release is *one* Gaussian with
multiplier ``z / sens(C)`` (``fedmf.ledger``).  :class:`MatrixFactorizationAccountant` answers
the protocol for that release, with no amplification: after ``t`` releases its epsilon is the
ledger's epsilon of rounds ``1..t`` (top-left ``t x t`` block of ``C``, ``min(k, ceil(t/b))``
participations), so code written against Flower's API reads fedmf's epsilon.  With amplified
sampling (``DPConfig.sampling``) the epsilon is the ledger's, i.e. the smaller of the amplified
and the un-amplified bound; ``config.sampling_method`` is ``NO_AMPLIFICATION`` for ``cyclic``
and ``POISSON`` for the three amplified modes.  Flower's enum has no name for balls-in-bins or
cyclic Poisson (and accepts ``WITHOUT_REPLACEMENT`` only with replace-one neighbours), so
``POISSON`` there means "amplified by secret sampling, add/remove one client";
:attr:`sampling` gives fedmf's exact mode.  :meth:`get_delta` stays the un-amplified
delta (a valid, looser bound)::

    strategy = DPMatrixFactorizationFedAvg(config=cfg)
    spent = strategy.accountant.get_privacy_spent()   # PrivacySpent(epsilon, delta, ...)
"""

from __future__ import annotations

import math
from typing import Any

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

__all__ = ["ACCOUNTING_METHOD", "MatrixFactorizationAccountant"]

ACCOUNTING_METHOD = "fedmf-matrix-factorization"
_STATE_VERSION = 1
_FLOWER_SAMPLING = {"cyclic": SamplingMethod.NO_AMPLIFICATION,
                    "balls-in-bins": SamplingMethod.POISSON,
                    "poisson": SamplingMethod.POISSON,
                    "cyclic-poisson": SamplingMethod.POISSON}


class MatrixFactorizationAccountant:
    """``PrivacyAccountant`` of one DP-MF release (see the module docstring).

    Args:
        ledger: the run's :class:`fedmf.ledger.PrivacyLedger`.
        population_size: the client population ``N``.
        max_epsilon: optional budget for :meth:`would_exceed`.

    ``compose(event, count)`` records ``count`` more released rounds; the event's noise
    multiplier must be the ledger's (the correlated release is not a composition of
    independent events, so only the count matters).
    """

    def __init__(self, *, ledger: Any, population_size: int,
                 max_epsilon: float | None = None) -> None:
        self._ledger = ledger
        #: fedmf's sampling mode (``strategies.config.SAMPLINGS``)
        self.sampling = str(getattr(ledger, "sampling", "cyclic"))
        self._config = PrivacyConfig(
            target_delta=float(ledger.delta), population_size=int(population_size),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=_FLOWER_SAMPLING[self.sampling], max_epsilon=max_epsilon)
        self._releases = 0

    @property
    def config(self) -> PrivacyConfig:
        """The accounting model: add/remove one client, the run's sampling method."""
        return self._config

    @property
    def num_releases(self) -> int:
        """Rounds released so far."""
        return self._releases

    def _check(self, event: GaussianPrivacyEvent, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        if not math.isclose(event.noise_multiplier, self._ledger.noise_multiplier,
                            rel_tol=1e-9):
            raise ValueError(f"noise_multiplier {event.noise_multiplier} is not this "
                             f"release's ({self._ledger.noise_multiplier})")

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        """Record ``count`` more released rounds."""
        self._check(event, count)
        if self._releases + count > self._ledger.rounds:
            raise ValueError(f"the release has {self._ledger.rounds} rounds; "
                             f"{self._releases} + {count} exceeds it")
        self._releases += count

    def record_rounds(self, rounds: int) -> None:
        """Set the number of released rounds (the strategy's own bookkeeping)."""
        self._releases = int(rounds)

    def _epsilon(self, releases: int, delta: float) -> float:
        if isinstance(delta, bool) or not math.isfinite(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be finite and strictly between 0 and 1, got {delta!r}")
        return float(self._ledger.epsilon_spent(releases, delta=delta))

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of the rounds released so far, at ``delta``."""
        return self._epsilon(self._releases, delta)

    def get_delta(self, epsilon: float) -> float:
        """Delta of the rounds released so far, at ``epsilon``."""
        if isinstance(epsilon, bool) or not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be non-negative and finite, got {epsilon!r}")
        return float(self._ledger.delta_spent(self._releases, epsilon=epsilon))

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """``PrivacySpent`` at ``delta`` (default: the run's)."""
        target = self._config.target_delta if delta is None else float(delta)
        return PrivacySpent(epsilon=self.get_epsilon(target), delta=target,
                            num_releases=self._releases, accounting_method=ACCOUNTING_METHOD)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None,
                     count: int = 1) -> bool:
        """Whether ``count`` more rounds would exceed ``max_epsilon`` (or the config's)."""
        self._check(event, count)
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be supplied either in PrivacyConfig or to "
                             "would_exceed()")
        releases = min(self._releases + count, self._ledger.rounds)
        return self._epsilon(releases, self._config.target_delta) > limit

    def _release(self) -> dict[str, float]:
        """What fixes the release's privacy (a state must come from the same release)."""
        led = self._ledger
        return {"noise_multiplier": float(led.noise_multiplier),
                "sensitivity": float(led.sensitivity), "rounds": int(led.rounds),
                "target_delta": float(self._config.target_delta)}

    def state_dict(self) -> dict[str, object]:
        """Serializable state: the released rounds and what fixes the release's privacy."""
        return {"schema_version": _STATE_VERSION, "backend": ACCOUNTING_METHOD,
                "release": self._release(), "num_releases": self._releases}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` of the same release."""
        if state.get("schema_version") != _STATE_VERSION or state.get(
                "backend") != ACCOUNTING_METHOD:
            raise ValueError(f"not a {ACCOUNTING_METHOD} accountant state (schema "
                             f"{_STATE_VERSION})")
        saved = state.get("release")
        mine = self._release()
        if not isinstance(saved, dict) or set(saved) != set(mine):
            raise ValueError("accountant state has no release description")
        for key, value in mine.items():
            if not math.isclose(float(saved[key]), value, rel_tol=1e-12):
                raise ValueError(f"accountant state is of another release: {key} "
                                 f"{saved[key]} != {value}")
        releases = state.get("num_releases")
        if isinstance(releases, bool) or not isinstance(releases, int) or not (
                0 <= releases <= self._ledger.rounds):
            raise ValueError(f"num_releases must be an integer in [0, {self._ledger.rounds}], "
                             f"got {releases!r}")
        self._releases = releases
