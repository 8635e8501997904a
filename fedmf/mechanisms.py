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
"""

from __future__ import annotations

from dataclasses import dataclass

from .factorizations import BANDED_METHODS, METHODS

__all__ = [
    "BASELINES",
    "CORRELATED",
    "MECHANISMS",
    "Mechanism",
    "mechanism",
]


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
    """

    name: str
    method: str | None
    private: bool
    runner: str
    banded: bool
    label: str

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
    "optimal": "dense optimum (reference)",
}

_ALL = (
    Mechanism("fedavg", None, False, "dpmf", False, "FedAvg, non-private"),
    Mechanism("dp-fedavg", "identity", True, "dpmf", False,
              "independent noise, same server optimizer"),
    Mechanism("flower-dp", None, True, "flower", False,
              "Flower's DP wrapper (server lr 1, no schedule)"),
    *(Mechanism(m, m, True, "dpmf", m in BANDED_METHODS, _LABELS[m])
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
