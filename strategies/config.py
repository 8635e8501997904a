"""One configuration object for the DP strategies: run-config keys -> validated ``DPConfig``.

``DPConfig`` is the single source of the server optimizer (learning-rate schedule, momentum,
weight decay), the participation schema (cohorts) and the factorization, so the workload the
factorization is optimised for is *by construction* the one the strategy runs::

    cfg = DPConfig.from_run_config(context.run_config)
    cfg.workload()       # fedmf.workloads.sgd_workload(rates=cfg.schedule_rates(), ...)
    cfg.participation()  # Participation.cyclic(max_participations=k, min_sep=b)
    cfg.factorization()  # fedmf.factorizations.factorize(...)   (cached)

Run-config keys (``docs/CONTRACT.md``) map to fields by replacing ``-`` with ``_``; a few keys
beyond the contract are accepted too (``server-weight-decay``, ``server-milestones``,
``clip-quantile``, ``clip-lr``, ``clip-count-stddev``, ``participation-timeout``,
``objective``).  Unknown keys are ignored (the run config also carries client/data knobs).

Validation happens in ``__post_init__`` (so a bad ``DPConfig`` can not exist) and raises
``ValueError`` whose message starts with the parameter's run-config name, e.g.
``"bands must be in [1, rounds=3], got 16"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmf.mechanisms import MECHANISMS as _REGISTRY
from fedmf.mechanisms import mechanism as _mechanism

__all__ = [
    "BANDED_METHODS",
    "CLIPPING_MODES",
    "DP_MECHANISMS",
    "MECHANISMS",
    "DPConfig",
]

#: All values accepted for ``mechanism`` (the registry :data:`fedmf.mechanisms.MECHANISMS`).
MECHANISMS = tuple(_REGISTRY)
#: Mechanisms run by :class:`strategies.dpmf.DPMatrixFactorizationFedAvg` with a
#: factorization (``fedavg`` runs there too, without noise).
DP_MECHANISMS = tuple(m.name for m in _REGISTRY.values() if m.runner == "dpmf" and m.private)
#: Mechanisms whose factorization takes a number of bands.
BANDED_METHODS = tuple(m.name for m in _REGISTRY.values() if m.banded)
CLIPPING_MODES = ("server", "client", "adaptive")
NOISE_MODES = ("buffer", "seed")
SCHEDULES = ("constant", "exponential", "cosine", "linear", "step")
OBJECTIVES = ("mean", "max")


def _parse_milestones(value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(int(v) for v in value.replace(";", ",").split(",") if v.strip())
    if isinstance(value, int | np.integer):
        return (int(value),)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class DPConfig:
    """Validated, immutable configuration of a DP (or non-private baseline) strategy.

    Attributes:
        mechanism: one of :data:`MECHANISMS`.
        rounds: horizon ``n`` of the factorization (number of server rounds).
        clients_per_round: ``m``, the fixed denominator of the average and the cohort sample.
        num_clients: expected population ``N`` (used for ``min_sep = 0`` -> auto cohorts).
        min_sep: number of cohorts ``b`` (``0`` -> ``num_clients // clients_per_round``).
        bands: number of bands for banded methods (ignored otherwise).
        schedule, server_lr, final_server_lr, server_gamma, milestones, warmup: the server
            learning-rate schedule (``fedmf.schedules.learning_rates``).
        server_momentum: ``beta`` of the server heavy-ball momentum.
        server_weight_decay: ``wd``; ``theta_t = (1 - wd) theta_{t-1} + eta_t m_t``.
        clip_norm: (initial) L2 clip of each client's model delta.
        clipping: ``"server"`` | ``"client"`` | ``"adaptive"`` (server-side, quantile tracking).
        clip_quantile, clip_lr, clip_count_stddev: adaptive clipping (Andrew et al. 2021):
            target quantile ``gamma``, step ``eta_C``, std ``sigma_b`` of the noise on the count
            of unclipped updates (``0`` -> ``clients_per_round / 20``).
        epsilon, delta: privacy target; used when ``noise_multiplier == 0``.
        noise_multiplier: ``z = sigma / clip`` (``> 0`` overrides ``epsilon``).
        noise_seed: secret seed of the noise (``-1`` -> ``secrets``).  Server-side only: it is
            never a run-config key (every ClientApp receives the run config), and a fixed seed
            (``>= 0``) is refused unless ``insecure_reproducible`` is set.
        insecure_reproducible: allow a fixed ``noise_seed`` (reproducible experiments; whoever
            knows the seed can subtract the noise, so such a run is *not* private).
        seed: public seed of the cohort assignment and the sampling within a cohort.
        noise_mode: ``"buffer"`` or ``"seed"`` (``fedmf.noise.CorrelatedNoise``).
        checkpoint_dir: where to persist the server state after every round (``""`` -> off).
        participation_timeout: seconds to wait for enough eligible nodes before skipping.
        objective: ``"mean"`` or ``"max"`` error objective of optimised factorizations.
    """

    mechanism: str = "lr-bisr"
    rounds: int = 20
    clients_per_round: int = 5
    num_clients: int = 10
    min_sep: int = 0
    bands: int = 16
    schedule: str = "cosine"
    server_lr: float = 1.0
    final_server_lr: float = 0.0
    server_gamma: float = 0.99
    milestones: tuple[int, ...] = ()
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
    noise_seed: int = field(default=-1, repr=False)  # secret: never in repr/logs
    insecure_reproducible: bool = False
    seed: int = 0
    noise_mode: str = "buffer"
    checkpoint_dir: str = ""
    participation_timeout: float = 60.0
    objective: str = "mean"
    _cache: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", _parse_milestones(self.milestones))
        self.validate()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> DPConfig:
        """Build from a Flower run config (``context.run_config``); ``overrides`` win.

        Keys use ``-`` (``clients-per-round``); ``_`` spellings are accepted as well.  The
        secret ``noise_seed`` is refused as a run-config key (pass it as an override).
        """
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name == "noise_seed":
                raise ValueError(
                    "noise-seed must never be a run-config key: every ClientApp receives the "
                    "run config, and whoever knows the seed can remove the noise. Give it to "
                    "the ServerApp only (environment variable FEDMF_NOISE_SEED, or "
                    "`fedmf simulate --noise-seed`) together with insecure-reproducible = true"
                )
            if name == "server_milestones":
                name = "milestones"
            if name in names:
                kwargs[name] = value
        kwargs.update(overrides)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in list(kwargs.items()):
            kwargs[name] = _coerce(name, types[name], value)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> DPConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending run-config key on nonsense."""
        _mechanism(self.mechanism)  # raises naming "mechanism"
        _int_at_least("rounds", self.rounds, 1)
        _int_at_least("clients-per-round", self.clients_per_round, 1)
        _int_at_least("num-clients", self.num_clients, 1)
        if not isinstance(self.min_sep, int) or self.min_sep < 0:
            raise ValueError(f"min-sep must be an int >= 0 (0 -> auto), got {self.min_sep!r}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients-per-round must be <= num-clients={self.num_clients}, "
                f"got {self.clients_per_round}"
            )
        b = self.num_cohorts
        if b < 1:
            raise ValueError(f"min-sep must be >= 1, got {b}")
        cohort = self.num_clients // b
        if self.clients_per_round > cohort:
            raise ValueError(
                f"clients-per-round must be <= the smallest cohort size num-clients // min-sep "
                f"= {self.num_clients} // {b} = {cohort}, got {self.clients_per_round}"
            )
        if self.mechanism in BANDED_METHODS and (
            not isinstance(self.bands, int) or not 1 <= self.bands <= self.rounds
        ):
            raise ValueError(f"bands must be in [1, rounds={self.rounds}], got {self.bands!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _finite_positive("server-lr", self.server_lr)
        if not (math.isfinite(self.final_server_lr) and self.final_server_lr >= 0):
            raise ValueError(f"final-server-lr must be >= 0, got {self.final_server_lr!r}")
        if not (math.isfinite(self.server_gamma) and 0 < self.server_gamma <= 1):
            raise ValueError(f"server-gamma must be in (0, 1], got {self.server_gamma!r}")
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
        if not isinstance(self.noise_seed, int) or not -1 <= self.noise_seed < 2**63:
            raise ValueError("noise-seed must be -1 or in [0, 2**63)")  # never echo a seed
        if self.noise_seed >= 0 and not self.insecure_reproducible:
            raise ValueError(
                "noise-seed: a fixed noise seed lets whoever knows it remove the noise; it is "
                "refused unless insecure-reproducible = true (experiments only, not private)"
            )
        if not isinstance(self.insecure_reproducible, bool):
            raise ValueError(
                f"insecure-reproducible must be a bool, got {self.insecure_reproducible!r}"
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise-mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        if not (math.isfinite(self.participation_timeout) and self.participation_timeout >= 0):
            raise ValueError(
                f"participation-timeout must be >= 0, got {self.participation_timeout!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.schedule == "step" and any(m < 0 for m in self.milestones):
            raise ValueError(f"server-milestones must be >= 0, got {self.milestones!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def is_private(self) -> bool:
        """False only for the non-private ``fedavg`` baseline."""
        return _mechanism(self.mechanism).private

    @property
    def num_cohorts(self) -> int:
        """``b``: ``min_sep`` or, when 0, ``num_clients // clients_per_round``."""
        if self.min_sep > 0:
            return self.min_sep
        return self.num_clients // self.clients_per_round

    @property
    def max_participations(self) -> int:
        """``k = ceil(rounds / b)``: the most rounds any client can take part in."""
        return math.ceil(self.rounds / self.num_cohorts)

    @property
    def factorization_bands(self) -> int | None:
        """``bands`` for banded methods, else ``None``."""
        return self.bands if self.mechanism in BANDED_METHODS else None

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

    def schedule_rates(self, rounds: int | None = None) -> np.ndarray:
        """Server learning rates ``eta_0..eta_{n-1}`` (``fedmf.schedules.learning_rates``)."""
        from fedmf.schedules import learning_rates

        return np.asarray(
            learning_rates(
                rounds=self.rounds if rounds is None else rounds,
                schedule=self.schedule,
                lr=self.server_lr,
                final_lr=self.final_server_lr,
                gamma=self.server_gamma,
                milestones=self.milestones,
                warmup=self.warmup,
            ),
            dtype=np.float64,
        )

    def workload(self) -> Any:
        """``fedmf.workloads.sgd_workload`` of exactly the server optimizer the strategy runs."""
        if "workload" not in self._cache:
            from fedmf.workloads import sgd_workload

            self._cache["workload"] = sgd_workload(
                rates=self.schedule_rates(),
                momentum=self.server_momentum,
                weight_decay=self.server_weight_decay,
            )
        return self._cache["workload"]

    def participation(self) -> Any:
        """``Participation.cyclic(max_participations=k, min_sep=b)``."""
        from fedmf.participation import Participation

        return Participation.cyclic(
            max_participations=self.max_participations, min_sep=self.num_cohorts
        )

    def factorization(self) -> Any:
        """The (cached) factorization for ``mechanism``; ``None`` for fedavg / flower-dp."""
        method = _mechanism(self.mechanism).method
        if method is None:
            return None
        if "factorization" not in self._cache:
            self._cache["factorization"] = _factorize(
                method,
                self.workload(),
                self.participation(),
                self.factorization_bands,
                self.objective,
            )
        return self._cache["factorization"]

    def fingerprint(self) -> dict[str, Any]:
        """Fields that must not change across a checkpoint/resume (everything but paths and
        the secret seed, which the checkpointed noise state carries)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.name not in ("checkpoint_dir", "participation_timeout", "noise_seed")
        }
        out["milestones"] = list(self.milestones)
        return out


def _factorize(method: str, workload: Any, participation: Any, bands: int | None,
               objective: str) -> Any:
    from fedmf.factorizations import factorize

    kwargs: dict[str, Any] = {
        "method": method,
        "workload": workload,
        "participation": participation,
        "bands": bands,
    }
    if method in ("opt-bisr", "optimal"):
        kwargs["objective"] = objective
    return factorize(**kwargs)


@functools.cache
def _bool_words() -> dict[str, bool]:
    return {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _coerce(name: str, typ: Any, value: Any) -> Any:
    """Coerce run-config values (TOML gives int/float/str/bool) to the field type."""
    typ = str(typ)
    try:
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "str":
            return str(value)
        if typ == "bool":
            return _bool_words()[str(value).lower()] if isinstance(value, str) else bool(value)
        if name == "milestones":
            return _parse_milestones(value)
    except (TypeError, ValueError, KeyError):
        raise ValueError(
            f"{name.replace('_', '-')} must be of type {typ}, got {value!r}"
        ) from None
    return value


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _finite_positive(name: str, value: Any) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
