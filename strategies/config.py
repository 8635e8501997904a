"""``DPConfig``: the strategy's part of the run configuration, validated once.

``DPConfig`` is the single source of the server optimizer (learning-rate schedule, momentum,
weight decay), the participation pattern (cohorts) and the mechanism, so the workload the
factorization is optimised for is *by construction* the one the strategy runs::

    cfg = DPConfig.from_run_config(context.run_config)
    cfg.spec()           # fedmf.mechanisms.MechanismSpec (method, schedule, participation, ...)
    cfg.factorization()  # cfg.spec().factorization()   (cached; None for fedavg / flower-dp)
    cfg.ledger()         # fedmf.ledger.PrivacyLedger   (noise multiplier, epsilon, ...)

Fields are run-config keys (``clients_per_round`` <-> ``clients-per-round``,
:mod:`fedmf.runconfig`), and their defaults are *the* defaults of those keys.  Validation happens
in ``__post_init__`` (a bad ``DPConfig`` can not exist) and raises ``ValueError`` whose message
starts with the key, e.g. ``"bands must be in [1, rounds=3], got 16"``.  The secret
``noise_seed`` is a field but never a run-config key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmf import runconfig
from fedmf.mechanisms import (
    MAX_OPTIMAL_ROUNDS,
    SAMPLINGS,
    MechanismSpec,
    check_noise_state,
    clamp_bands,
    cohort_participation,
)
from fedmf.mechanisms import MECHANISMS as _REGISTRY
from fedmf.mechanisms import mechanism as _mechanism
from fedmf.participation import Participation
from fedmf.schedules import SCHEDULES

__all__ = [
    "BANDED_METHODS",
    "CLIPPING_MODES",
    "DP_MECHANISMS",
    "MECHANISMS",
    "NOISE_MODES",
    "SAMPLINGS",
    "DPConfig",
]

#: All values accepted for ``mechanism`` (the registry :data:`fedmf.mechanisms.MECHANISMS`).
MECHANISMS = tuple(_REGISTRY)
#: Private mechanisms run by :class:`strategies.dpmf.DPMatrixFactorizationFedAvg`.
DP_MECHANISMS = tuple(m.name for m in _REGISTRY.values() if m.runner == "dpmf" and m.private)
#: Mechanisms whose factorization takes a number of bands.
BANDED_METHODS = tuple(m.name for m in _REGISTRY.values() if m.banded)
CLIPPING_MODES = ("server", "client", "adaptive")
NOISE_MODES = ("buffer", "seed")

OBJECTIVES = ("mean", "max")
_NOT_FINGERPRINTED = ("checkpoint_dir", "participation_timeout", "noise_seed", "min_clients")


@dataclass(frozen=True)
class DPConfig:
    """Validated, immutable configuration of a DP (or non-private baseline) strategy.

    Attributes:
        mechanism: a name of :data:`fedmf.mechanisms.MECHANISMS`.
        rounds: horizon ``n`` of the factorization (number of server rounds).
        clients_per_round: ``m``, the fixed denominator of the average and the cohort sample.
        num_clients: expected population ``N`` (for ``min_sep = 0`` -> auto cohorts).
        min_sep: number of cohorts ``b`` (``0`` -> ``num_clients // clients_per_round``).
        bands: number of bands of the banded methods (ignored otherwise).
        buffers: number of buffers of ``blt`` (ignored otherwise).
        objective: ``"mean"`` or ``"max"`` error of the optimised factorizations.
        schedule, server_lr, final_server_lr, server_gamma, server_milestones, warmup: the
            server learning-rate schedule (``fedmf.schedules.learning_rates``).
        server_momentum: ``beta`` of the server heavy-ball momentum.
        server_weight_decay: ``wd``; ``theta_t = (1 - wd) theta_{t-1} + eta_t m_t``.
        clip_norm: (initial) L2 clip of each client's model delta.
        clipping: ``"server"`` | ``"client"`` | ``"adaptive"`` (server-side, quantile tracking).
        clip_quantile, clip_lr, clip_count_stddev: adaptive clipping (Andrew et al. 2021):
            target quantile ``gamma``, step ``eta_C``, std ``sigma_b`` of the noise on the count
            of unclipped updates (``0`` -> ``clients_per_round / 20``).
        epsilon, delta: privacy target; used when ``noise_multiplier == 0``.
        noise_multiplier: ``z = sigma / clip`` (``> 0`` overrides ``epsilon``).
        sampling: who takes part in a round, one of :data:`SAMPLINGS`: ``cyclic`` (public
            cohorts from ``seed``, no amplification), ``balls-in-bins`` (each client in one of
            ``b`` secret cohorts drawn uniformly and independently; the whole cohort serves
            rounds ``t = c+1, c+1+b, ...``), ``poisson`` (every round each client joins with
            probability ``q = clients_per_round / num_clients``; dp-fedavg only) or
            ``cyclic-poisson`` (``b`` secret groups; round ``t`` samples each member of group
            ``(t-1) mod b`` with probability ``clients_per_round * b / num_clients``).
        release_participation: write who took part and the per-round counts to the output
            folder and logs even under amplified sampling, where they are secret (labelled not
            private; the amplified guarantee then no longer holds for whoever reads them).
        seed: public seed of the cohort assignment and the sampling within a cohort
            (``cyclic``); the amplified modes draw from a secret RNG instead.
        noise_mode: ``"buffer"`` or ``"seed"`` (``fedmf.noise.CorrelatedNoise``).
        participation_timeout: seconds to wait for enough eligible clients before skipping
            (and, before round 1, for the quorum ``min_clients``).
        min_clients: quorum: round 1 starts only once this many clients have registered their
            identity (``0`` -> ``clients_per_round``); if they do not within
            ``participation_timeout`` the run stops with an error and spends nothing.
        insecure_reproducible: allow a fixed ``noise_seed`` (reproducible experiments; whoever
            knows the seed can subtract the noise, so such a run is *not* private).
        checkpoint_dir: where to persist the server state after every round.  ``None`` (not
            set; also a run config's ``""``): a private folder under
            ``$FEDMF_STATE_DIR/checkpoints/`` keyed by this configuration, chosen when
            ``start()`` runs, so a relaunch with the same configuration resumes
            (``strategies.driver``); ``""`` given here: no checkpoint.
        noise_seed: secret seed of the noise (``-1`` -> ``secrets``).  Server-side only: never
            a run-config key (every ClientApp receives the run config); ``>= 0`` is refused
            unless ``insecure_reproducible``.
    """

    mechanism: str = "lr-bisr"
    rounds: int = 20
    clients_per_round: int = 5
    num_clients: int = 10
    min_sep: int = 0
    bands: int = 16
    buffers: int = 3
    objective: str = "mean"
    schedule: str = "cosine"
    server_lr: float = 1.0
    final_server_lr: float = 0.0
    server_gamma: float = 0.99
    server_milestones: tuple[int, ...] = ()
    warmup: int = 0
    server_momentum: float = 0.0
    server_weight_decay: float = 0.0
    clip_norm: float = 1.0
    clipping: str = "server"
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float = 0.0
    epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    seed: int = 0
    sampling: str = "cyclic"
    release_participation: bool = False
    noise_mode: str = "buffer"
    participation_timeout: float = 60.0
    min_clients: int = 0
    insecure_reproducible: bool = False
    checkpoint_dir: str | None = None
    noise_seed: int = field(default=-1, repr=False, metadata={"run_config": False})
    _cache: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        object.__setattr__(self, "server_milestones",
                           runconfig.int_tuple(self.server_milestones))
        bands, warning = clamp_bands(bands=self.bands, rounds=self.rounds)
        if warning is not None and self.mechanism in BANDED_METHODS:
            logging.getLogger("fedmf").warning("fedmf: %s", warning)
            object.__setattr__(self, "bands", bands)
        if isinstance(self.checkpoint_dir, os.PathLike):
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        self.validate()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> DPConfig:
        """Build from a Flower run config (its DP keys; others are ignored); ``overrides``
        (field names) win.  ``noise-seed`` is refused as a key: pass ``noise_seed=`` instead.
        ``checkpoint-dir = ""`` (pyproject's default) means unset: the default folder.
        """
        if "noise-seed" in run_config or "noise_seed" in run_config:
            raise ValueError(
                "noise-seed must never be a run-config key: every ClientApp receives the "
                "run config, and whoever knows the seed can remove the noise. Give it to "
                "the ServerApp only (environment variable FEDMF_NOISE_SEED, or "
                "`fedmf simulate --noise-seed`) together with insecure-reproducible = true"
            )
        items: dict[str, Any] = {}
        for key, value in run_config.items():
            if str(key).replace("_", "-") == "checkpoint-dir":
                if value is None or value == "":
                    continue  # not set: the default folder (a run config has no None)
                value = str(value)
            items[key] = value
        return runconfig.from_run_config(cls, items, **overrides)

    def to_run_config(self) -> dict[str, Any]:
        """The run-config keys of this part (never the noise seed; an unset
        ``checkpoint-dir`` as ``""``, which reads back as unset)."""
        out = runconfig.to_run_config(self)
        if out["checkpoint-dir"] is None:
            out["checkpoint-dir"] = ""
        return out

    def replace(self, **changes: Any) -> DPConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending run-config key on nonsense."""
        _mechanism(self.mechanism)  # raises naming "mechanism"
        _int_at_least("rounds", self.rounds, 1)
        if self.mechanism == "optimal" and self.rounds > MAX_OPTIMAL_ROUNDS:
            raise ValueError(f"rounds must be <= {MAX_OPTIMAL_ROUNDS} for mechanism 'optimal' "
                             f"(a dense reference), got {self.rounds}")
        _int_at_least("clients-per-round", self.clients_per_round, 1)
        _int_at_least("num-clients", self.num_clients, 1)
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients-per-round must be <= num-clients={self.num_clients}, "
                f"got {self.clients_per_round}"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        part = self.participation()  # checks min-sep
        cohort = self.num_clients // max(self.num_cohorts, 1)
        if self.sampling != "poisson" and self.clients_per_round > cohort:
            raise ValueError(
                f"clients-per-round must be <= the smallest cohort size num-clients // min-sep "
                f"= {self.num_clients} // {part.min_sep} = {cohort}, got {self.clients_per_round}"
            )
        check_noise_state(banded=self.mechanism in BANDED_METHODS,
                          buffered=_mechanism(self.mechanism).buffered, rounds=self.rounds,
                          bands=self.bands, buffers=self.buffers)
        if (self.mechanism == "bandmf" and self.max_participations > 1
                and self.bands > self.num_cohorts):
            raise ValueError(f"bands must be <= min-sep={self.num_cohorts} for bandmf with "
                             f"{self.max_participations} participations (exact sensitivity), "
                             f"got {self.bands}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _finite_positive("server-lr", self.server_lr)
        if not (math.isfinite(self.final_server_lr) and self.final_server_lr >= 0):
            raise ValueError(f"final-server-lr must be >= 0, got {self.final_server_lr!r}")
        if not (math.isfinite(self.server_gamma) and 0 < self.server_gamma <= 1):
            raise ValueError(f"server-gamma must be in (0, 1], got {self.server_gamma!r}")
        if any(m < 0 for m in self.server_milestones):
            raise ValueError(f"server-milestones must be >= 0, got {self.server_milestones!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.rounds:
            raise ValueError(f"warmup must be in [0, rounds={self.rounds}), got {self.warmup!r}")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server-momentum must be in [0, 1), got {self.server_momentum!r}")
        if not 0 <= self.server_weight_decay < 1:
            raise ValueError(
                f"server-weight-decay must be in [0, 1), got {self.server_weight_decay!r}"
            )
        _finite_positive("clip-norm", self.clip_norm)
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        if not 0 < self.clip_quantile < 1:
            raise ValueError(f"clip-quantile must be in (0, 1), got {self.clip_quantile!r}")
        _finite_positive("clip-lr", self.clip_lr)
        if not (math.isfinite(self.clip_count_stddev) and self.clip_count_stddev >= 0):
            raise ValueError(
                f"clip-count-stddev must be >= 0 (0 -> auto), got {self.clip_count_stddev!r}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise-multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if (self.is_private and self.noise_multiplier == 0
                and not (math.isfinite(self.epsilon) and self.epsilon > 0)):
            raise ValueError(
                f"epsilon must be > 0 when noise-multiplier is 0, got {self.epsilon!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise-mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        if not (math.isfinite(self.participation_timeout) and self.participation_timeout >= 0):
            raise ValueError(
                f"participation-timeout must be >= 0, got {self.participation_timeout!r}"
            )
        self._validate_sampling()
        if (isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int)
                or not 0 <= self.min_clients <= self.num_clients):
            raise ValueError(f"min-clients must be an int in [0, num-clients={self.num_clients}] "
                             f"(0 -> clients-per-round), got {self.min_clients!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise ValueError(f"checkpoint-dir must be a path, '' (none) or None (the default "
                             f"folder), got {self.checkpoint_dir!r}")
        if not isinstance(self.insecure_reproducible, bool):
            raise ValueError(
                f"insecure-reproducible must be a bool, got {self.insecure_reproducible!r}"
            )
        if not isinstance(self.noise_seed, int) or not -1 <= self.noise_seed < 2**63:
            raise ValueError("noise-seed must be -1 or in [0, 2**63)")  # never echo a seed
        if self.noise_seed >= 0 and not self.insecure_reproducible:
            raise ValueError(
                "noise-seed: a fixed noise seed lets whoever knows it remove the noise; it is "
                "refused unless insecure-reproducible = true (experiments only, not private)"
            )

    def _validate_sampling(self) -> None:
        """Pairs of sampling and mechanism the strategy can run and account."""
        if not isinstance(self.release_participation, bool):
            raise ValueError(f"release-participation must be a bool, got "
                             f"{self.release_participation!r}")
        if self.sampling == "cyclic":
            return
        if _mechanism(self.mechanism).runner != "dpmf":
            raise ValueError(f"sampling {self.sampling!r} is not available for mechanism "
                             f"{self.mechanism!r} (Flower's wrapper samples its own way): use "
                             "sampling 'cyclic', or dp-fedavg for independent noise")
        if self.clipping == "adaptive":
            raise ValueError(f"clipping: adaptive clipping is accounted only with sampling "
                             f"'cyclic', got sampling {self.sampling!r}; use clipping 'server' "
                             "or 'client'")
        if self.sampling == "poisson" and self.mechanism not in ("dp-fedavg", "fedavg"):
            raise ValueError(f"sampling 'poisson' is accounted only for independent noise "
                             f"(dp-fedavg), not for mechanism {self.mechanism!r}: use "
                             "'balls-in-bins' or 'cyclic-poisson' for correlated noise")
        if self.sampling == "cyclic-poisson" and self.sampling_rate > 1:
            raise ValueError(
                f"clients-per-round: cyclic-poisson samples each member of a group with "
                f"probability clients-per-round * min-sep / num-clients = "
                f"{self.clients_per_round} * {self.num_cohorts} / {self.num_clients} > 1; "
                "give fewer clients per round or fewer groups (min-sep)")

    # ------------------------------------------------------------------ derived values
    @property
    def amplified(self) -> bool:
        """Whether participation is drawn secretly (and accounted with amplification)."""
        return self.sampling != "cyclic"

    @property
    def sampling_rate(self) -> float:
        """``q``: a client's probability of joining a round it is eligible for (``poisson``:
        ``m / N``; ``cyclic-poisson``: ``m b / N``; ``1`` for the cohort modes)."""
        if self.sampling == "poisson":
            return self.clients_per_round / self.num_clients
        if self.sampling == "cyclic-poisson":
            return self.clients_per_round * self.num_cohorts / self.num_clients
        return 1.0

    @property
    def is_private(self) -> bool:
        """False only for the non-private ``fedavg`` baseline."""
        return _mechanism(self.mechanism).private

    @property
    def quorum(self) -> int:
        """Clients that must have registered before round 1 (``min_clients`` or ``m``)."""
        return self.min_clients or self.clients_per_round

    @property
    def num_cohorts(self) -> int:
        """``b``: ``min_sep`` or, when 0, ``num_clients // clients_per_round``."""
        return self.participation().min_sep

    @property
    def max_participations(self) -> int:
        """``k = ceil(rounds / b)``: the most rounds any client can take part in."""
        return math.ceil(self.rounds / self.num_cohorts)

    @property
    def adaptive_count_stddev(self) -> float | None:
        """``sigma_b`` of adaptive clipping (``None`` with fixed clipping)."""
        if self.clipping != "adaptive":
            return None
        return self.clip_count_stddev or self.clients_per_round / 20.0

    @property
    def server_optimizer(self) -> str:
        """One line naming the server optimizer the DP-MF strategy runs (results rows)."""
        if self.schedule == "constant":
            rate = f"lr {self.server_lr:g}"
        elif self.schedule in ("cosine", "linear"):
            rate = f"lr {self.server_lr:g}->{self.final_server_lr:g}"
        else:
            rate = f"lr {self.server_lr:g}, gamma {self.server_gamma:g}"
        if self.warmup:
            rate += f", warmup {self.warmup}"
        return (f"sgd {self.schedule} {rate}, momentum {self.server_momentum:g}, "
                f"wd {self.server_weight_decay:g}")

    def participation(self) -> Any:
        """The participation pattern the un-amplified bound covers: cyclic cohorts
        ``Participation.cyclic(max_participations=k, min_sep=b)``, or for ``poisson`` any
        rounds (``b = 1``, ``k = rounds``)."""
        if self.sampling == "poisson":
            return Participation.min_separation(min_sep=1, max_participations=self.rounds)
        return cohort_participation(rounds=self.rounds, min_sep=self.min_sep,
                                    num_clients=self.num_clients,
                                    clients_per_round=self.clients_per_round)

    def spec(self, method: str | None = None) -> MechanismSpec:
        """The :class:`~fedmf.mechanisms.MechanismSpec` of the run (``method`` defaults to the
        mechanism's factorization method; ``identity`` for the non-factorized ones)."""
        return MechanismSpec(
            method=method or _mechanism(self.mechanism).method or "identity",
            rounds=self.rounds, schedule=self.schedule, lr=self.server_lr,
            final_lr=self.final_server_lr, gamma=self.server_gamma,
            milestones=self.server_milestones, warmup=self.warmup,
            momentum=self.server_momentum, weight_decay=self.server_weight_decay,
            participation=self.participation(),
            bands=self.bands if self.mechanism in BANDED_METHODS else None,
            buffers=self.buffers if _mechanism(self.mechanism).buffered else None,
            objective=self.objective,
        )

    def schedule_rates(self) -> Any:
        """Server learning rates ``eta_0..eta_{n-1}``."""
        return self.spec().rates()

    def workload(self) -> Any:
        """``fedmf.workloads.sgd_workload`` of exactly the server optimizer the strategy runs."""
        return self._cached("spec", self.spec).workload()

    def factorization(self) -> Any:
        """The (cached) factorization for ``mechanism``; ``None`` for fedavg / flower-dp."""
        if _mechanism(self.mechanism).method is None:
            return None
        return self._cached("spec", self.spec).factorization()

    def ledger(self) -> Any:
        """The :class:`fedmf.ledger.PrivacyLedger` of the run (cached)."""
        from fedmf.ledger import privacy_ledger

        def build() -> Any:
            return privacy_ledger(
                factorization=self.factorization() if self.is_private else None,
                delta=self.delta, epsilon=self.epsilon, noise_multiplier=self.noise_multiplier,
                clip_count_stddev=self.adaptive_count_stddev,
                clients_per_round=self.clients_per_round, participation=self.participation(),
                rounds=self.rounds,
                **({} if not self.amplified else {"sampling": self.sampling,
                                                  "num_clients": self.num_clients}))

        return self._cached("ledger", build)

    def _cached(self, key: str, build: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def fingerprint(self) -> dict[str, Any]:
        """Fields that must not change across a checkpoint/resume (everything but paths and
        the secret seed, which the checkpointed noise state carries)."""
        return {k: v for k, v in self.to_run_config().items()
                if k.replace("-", "_") not in _NOT_FINGERPRINTED}


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _finite_positive(name: str, value: Any) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
