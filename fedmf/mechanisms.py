"""The one registry of mechanism names (Flower-free).

A *mechanism* is what a run is configured with (``mechanism = "lr-bisr"``); most are a
factorization method of :mod:`fedmf.factorizations` run by the DP-MF strategy, three are
baselines:

* ``fedavg`` -- non-private: no clipping, no noise; same cohorts and server optimizer.
* ``dp-fedavg`` -- independent noise (``C = I``, factorization method ``identity``) with the
  *same* server optimizer, cohorts, clip, fixed denominator and accounting as the correlated
  mechanisms: the fair baseline, differing from them only in the noise.
* ``flower-dp`` -- Flower's own ``DifferentialPrivacyServerSideFixedClipping`` wrapper, a
  cross-check: server learning rate 1, no schedule, no momentum (results say so).

Every other name is a correlated-noise factorization run by the DP-MF strategy.

:class:`MechanismSpec` is the Flower-free description of what a DP-MF run computes -- the
factorization method, the horizon, the server optimizer (schedule, momentum, weight decay),
the participation pattern, bands and objective -- and yields the workload, the participation
and the factorization.  ``fedmf factorize | plan | calibrate`` and the Flower strategy both
build one, so the factorization a user plans with is the one the strategy runs.
:func:`cohort_participation` turns the cohort settings (``min-sep``, ``num-clients``,
``clients-per-round``) into a :class:`~fedmf.participation.Participation`, with one meaning
everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .factorizations import (
    BANDED_METHODS,
    BUFFERED_METHODS,
    METHODS,
    OBJECTIVES,
    Factorization,
    factorize,
)
from .participation import Participation
from .schedules import SCHEDULES, learning_rates
from .workloads import Workload, sgd_workload

__all__ = [
    "BASELINES",
    "CORRELATED",
    "MAX_OPTIMAL_ROUNDS",
    "MECHANISMS",
    "PARTICIPATION_KINDS",
    "Mechanism",
    "MechanismSpec",
    "arm_label",
    "cohort_participation",
    "mechanism",
    "parse_arm",
]

#: ``cyclic``: fixed cohorts, what the strategies enforce; ``min-sep``: any b-separated pattern.
PARTICIPATION_KINDS = ("cyclic", "min-sep")
#: The dense ``optimal`` factorization is offered up to this horizon (a reference method).
MAX_OPTIMAL_ROUNDS = 1024


@dataclass(frozen=True)
class Mechanism:
    """What a mechanism name means.

    Attributes:
        name: the run-config value.
        method: the :func:`fedmf.factorizations.factorize` method (``None``: no noise or
            Flower's own noise).
        private: whether the release is differentially private.
        runner: ``"dpmf"`` (:class:`strategies.DPMatrixFactorizationFedAvg`) or ``"flower"``
            (Flower's DP wrapper).
        banded: whether ``bands`` applies.
        label: one line for tables and logs.
        buffered: whether ``buffers`` applies.
    """

    name: str
    method: str | None
    private: bool
    runner: str
    banded: bool
    label: str
    buffered: bool = False

    @property
    def correlated(self) -> bool:
        """Correlated noise across rounds (a factorization other than the identity)."""
        return self.method is not None and self.method != "identity"


_LABELS = {
    "sqrt": "square-root factorization (prefix sum / schedule-blind)",
    "bsr": "banded square root",
    "bisr": "banded inverse square root",
    "lr-sqrt": "learning-rate-aware square root",
    "lr-bisr": "learning-rate-aware banded inverse square root",
    "opt-bisr": "banded inverse, optimised for the workload and participation",
    "bandmf": "banded C, optimised for the workload and participation",
    "blt": "buffered linear Toeplitz, optimised for the workload and participation",
    "optimal": "dense optimum (reference)",
}

_ALL = (
    Mechanism("fedavg", None, False, "dpmf", False, "FedAvg, non-private"),
    Mechanism("dp-fedavg", "identity", True, "dpmf", False,
              "independent noise, same server optimizer"),
    Mechanism("flower-dp", None, True, "flower", False,
              "Flower's DP wrapper (server lr 1, no schedule)"),
    *(Mechanism(m, m, True, "dpmf", m in BANDED_METHODS, _LABELS[m], m in BUFFERED_METHODS)
      for m in METHODS if m != "identity"),
)
#: name -> :class:`Mechanism`, in presentation order.
MECHANISMS: dict[str, Mechanism] = {m.name: m for m in _ALL}
#: The baselines (no correlated noise).
BASELINES = tuple(m.name for m in _ALL if not m.correlated)
#: The correlated-noise mechanisms.
CORRELATED = tuple(m.name for m in _ALL if m.correlated)


def mechanism(name: str) -> Mechanism:
    """The :class:`Mechanism` called ``name``; ``ValueError`` naming ``mechanism`` otherwise."""
    try:
        return MECHANISMS[name]
    except KeyError:
        hint = " ('identity' is now 'dp-fedavg')" if name == "identity" else ""
        raise ValueError(
            f"mechanism must be one of {list(MECHANISMS)}, got {name!r}{hint}"
        ) from None


#: Sampling modes: ``cyclic`` (public cohorts, no amplification) and the secret, amplified ones
#: (``fedmf.amplification`` accounts them; ``strategies.sampling`` draws them).
SAMPLINGS = ("cyclic", "balls-in-bins", "poisson", "cyclic-poisson")


def arm_label(mechanism: str, sampling: str = "cyclic") -> str:
    """The name of an experiment arm: ``mechanism``, or ``mechanism@sampling`` when the
    sampling is not ``cyclic`` (``dp-fedavg@poisson``)."""
    return mechanism if sampling == "cyclic" else f"{mechanism}@{sampling}"


def parse_arm(label: str) -> tuple[str, str]:
    """``"bsr@balls-in-bins"`` -> ``("bsr", "balls-in-bins")``; errors name ``mechanisms``."""
    name, _, sampling = str(label).partition("@")
    sampling = sampling or "cyclic"
    if name not in MECHANISMS:
        raise ValueError(f"mechanisms: unknown mechanism {name!r} in {label!r} (known: "
                         f"{', '.join(MECHANISMS)})")
    if sampling not in SAMPLINGS:
        raise ValueError(f"mechanisms: unknown sampling {sampling!r} in {label!r} (known: "
                         f"{', '.join(SAMPLINGS)}; write MECHANISM@SAMPLING)")
    return name, sampling


def clamp_bands(*, bands: int, rounds: int) -> tuple[int, str | None]:
    """``bands`` clamped to ``rounds`` (a banded ``C`` cannot have more bands than rows), and
    the warning to show when it was: the one rule for every entry point (``flwr run``, the
    ``fedmf`` commands, a ``DPConfig`` of your own)."""
    if (isinstance(bands, int) and not isinstance(bands, bool) and isinstance(rounds, int)
            and 1 <= rounds < bands):
        return rounds, (f"bands={bands} > rounds={rounds}: clamped to bands={rounds} (a banded "
                        "factorization has at most one band per round)")
    return bands, None


def cohort_participation(*, rounds: int, min_sep: int = 0, num_clients: int | None = None,
                         clients_per_round: int | None = None, kind: str = "cyclic",
                         max_participations: int | None = None) -> Participation:
    """The participation pattern of ``rounds`` rounds served by ``b`` cohorts.

    ``b = min_sep``, or ``num_clients // clients_per_round`` when ``min_sep`` is 0 (the
    strategies' default); ``k = max_participations`` or ``ceil(rounds / b)``.  ``kind``
    ``"cyclic"`` (fixed cohorts ``{i, i+b, ...}``, what the strategies enforce) or ``"min-sep"``
    (any pattern with participations ``>= b`` apart; a superset, for analysis).  ``b = 1`` with
    ``k = 1`` is single participation.  Errors name the run-config key.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if kind not in PARTICIPATION_KINDS:
        raise ValueError(f"participation must be one of {PARTICIPATION_KINDS}, got {kind!r}")
    if isinstance(min_sep, bool) or not isinstance(min_sep, int) or min_sep < 0:
        raise ValueError(f"min-sep must be an int >= 0 (0 -> num-clients // clients-per-round), "
                         f"got {min_sep!r}")
    b = min_sep
    if b == 0:
        if not num_clients or not clients_per_round:
            raise ValueError("min-sep: 0 (auto) needs num-clients and clients-per-round")
        b = num_clients // clients_per_round
        if b < 1:
            raise ValueError(f"min-sep: num-clients // clients-per-round = {num_clients} // "
                             f"{clients_per_round} is 0; give fewer clients per round")
    k_max = math.ceil(rounds / b)
    k = k_max if max_participations is None else max_participations
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_max:
        raise ValueError(f"max-participations must be in [1, ceil(rounds / min-sep) = {k_max}] "
                         f"(k participations >= {b} apart must fit in {rounds} rounds), "
                         f"got {k!r}")
    if k == 1 and b == 1:
        return Participation.single()
    if kind == "cyclic":
        return Participation.cyclic(max_participations=k, min_sep=b)
    return Participation.min_separation(min_sep=b, max_participations=k)


def check_noise_state(*, banded: bool, buffered: bool, rounds: int, bands: Any,
                      buffers: Any) -> None:
    """The one check of a mechanism's noise-state size (``MechanismSpec`` and the strategy's
    ``DPConfig``): ``bands`` in ``[1, rounds]`` for banded methods, ``buffers`` in ``[1,
    rounds - 1]`` for buffered ones (``[1, 1]`` when ``rounds = 1``)."""
    if banded and (not isinstance(bands, int) or not 1 <= bands <= rounds):
        raise ValueError(f"bands must be in [1, rounds={rounds}], got {bands!r}")
    if buffered and (not isinstance(buffers, int) or not 1 <= buffers < max(rounds, 2)):
        raise ValueError(f"buffers must be in [1, rounds - 1 = {rounds - 1}], got {buffers!r}")


@dataclass(frozen=True)
class MechanismSpec:
    """What a DP-MF run computes, without Flower: yields workload, participation, factorization.

    Attributes:
        method: a factorization method of :mod:`fedmf.factorizations` (``identity`` for
            independent noise).
        rounds: the horizon ``n``.
        schedule, lr, final_lr, gamma, milestones, warmup: the server learning-rate schedule
            (:func:`fedmf.schedules.learning_rates`).
        momentum, weight_decay: the server optimizer's ``beta`` and ``wd``; the workload is
            ``A = E(1 - wd) diag(eta) M(beta)`` (:func:`fedmf.workloads.sgd_workload`).
        participation: the participation pattern (:func:`cohort_participation`).
        bands: bands of the banded methods (``None`` otherwise).
        objective: ``"mean"`` or ``"max"`` error, for the optimised methods.
        buffers: buffers of ``blt`` (``None`` otherwise).
    """

    method: str
    rounds: int
    schedule: str = "constant"
    lr: float = 1.0
    final_lr: float = 0.0
    gamma: float = 0.99
    milestones: tuple[int, ...] = ()
    warmup: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0
    participation: Participation = field(default_factory=Participation.single)
    bands: int | None = None
    objective: str = "mean"
    buffers: int | None = None
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False,
                                   compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        check_noise_state(banded=self.method in BANDED_METHODS,
                          buffered=self.method in BUFFERED_METHODS, rounds=self.rounds,
                          bands=self.bands, buffers=self.buffers)
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def rates(self) -> np.ndarray:
        """Server learning rates ``eta_0..eta_{n-1}``."""
        return learning_rates(rounds=self.rounds, schedule=self.schedule, lr=self.lr,
                              final_lr=self.final_lr, gamma=self.gamma,
                              milestones=self.milestones, warmup=self.warmup)

    def workload(self) -> Workload:
        """``A = A_1 diag(eta) M(beta)`` with decay: exactly the server optimizer."""
        if "workload" not in self._cache:
            self._cache["workload"] = sgd_workload(rates=self.rates(), momentum=self.momentum,
                                                   weight_decay=self.weight_decay)
        return self._cache["workload"]

    def factorization(self) -> Factorization:
        """The (cached) factorization of :meth:`workload` for :attr:`participation`."""
        if "factorization" not in self._cache:
            kwargs: dict[str, Any] = {}
            if self.method in ("opt-bisr", "optimal"):
                kwargs["objective"] = self.objective
            self._cache["factorization"] = factorize(
                method=self.method, workload=self.workload(), participation=self.participation,
                bands=self.bands if self.method in BANDED_METHODS else None,
                buffers=self.buffers if self.method in BUFFERED_METHODS else None, **kwargs)
        return self._cache["factorization"]
