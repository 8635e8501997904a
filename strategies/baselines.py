"""``flower-dp``: Flower's own DP wrapper and accountant, kept as a labelled cross-check.

The fair independent-noise baseline is ``dp-fedavg``: :class:`~strategies.dpmf.
DPMatrixFactorizationFedAvg` with the identity factorization, i.e. the same server optimizer
(schedule, momentum, weight decay), cohorts, clip, fixed denominator and accounting as the
correlated mechanisms -- only the noise differs.

``flower-dp`` (:class:`FlowerDPFedAvg`) is ``flwr.serverapp.strategy.
DifferentialPrivacyServerSideFixedClipping`` around :class:`CohortFedAvg`, in Flower 1.42's
*accounted (strict) mode*: Flower's ``RdpAccountant`` (add/remove one client, no
amplification) composes one Gaussian per released round, and the wrapper releases a round only
when exactly ``m`` clients replied without error, so FedAvg's mean divides by the fixed ``m``
that its noise std ``z * clip / m`` assumes.  Flower's code does the clipping, the aggregation
(``FedAvg.aggregate_train``, which strict mode requires), the noise (its unseeded global
``np.random``) and applies the noisy mean as the new model, i.e. **server learning rate 1, no
schedule, no momentum** whatever the run config says.  What is added here keeps the
comparison honest:

* :class:`CohortFedAvg` trains on the same cohorts as the DP-MF strategy (keyed by stable client
  id; ``sampling="uniform"`` uses one cohort, ``b = 1``, ``k = rounds``);
* every reply is weighted uniformly (weight key :data:`UNIFORM_WEIGHT_KEY`, set to 1 by the
  server): weighting by ``num-examples`` would raise a client's weight above ``1/m`` and the
  sensitivity above ``clip / m`` (strict mode refuses unequal weights rather than fix them);
* two epsilons: ``epsilon`` from ``fedmf.ledger`` (``k`` participations, exact Gaussian
  conversion; this is what calibrates ``z``) and ``flower_epsilon`` from Flower's accountant,
  which assumes every client in every round (``k = rounds``) and RDP conversion, so it is
  larger -- both are valid upper bounds;
* checkpoint and resume (:class:`~strategies.driver.ResumableStart`): the global model, cohorts,
  participation history, sampling RNG and Flower's accountant state, so a restart never re-runs
  a released round or lets a client exceed its limits (Flower's noise needs no state: every
  round's draw is fresh).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.privacy_accounting import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedmf.mechanisms import cohort_participation

from .arrays import array_from_numpy, array_to_numpy, sq_norm
from .config import DPConfig
from .driver import ResumableStart
from .participation import ClientDirectory, CohortSchedule, select_cohort

__all__ = [
    "SAMPLINGS",
    "UNIFORM_WEIGHT_KEY",
    "CohortFedAvg",
    "FlowerDPFedAvg",
    "flower_accountant",
    "flower_dp_ledger",
]

_SAMPLING_TAG = 0x73616D706C65
SAMPLINGS = ("cohort", "uniform")
FLOWER_SERVER_OPTIMIZER = "flower: noisy mean as the model (lr 1, constant, no momentum)"
#: the metric FedAvg weighs replies by in ``flower-dp``: 1 for every reply (set by the server)
UNIFORM_WEIGHT_KEY = "dp-uniform-weight"


def _schedule(config: DPConfig, sampling: str) -> CohortSchedule:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "uniform":  # one cohort: any client in any round, at most every round
        return CohortSchedule(num_cohorts=1, max_participations=config.rounds, seed=config.seed)
    return CohortSchedule(num_cohorts=config.num_cohorts,
                          max_participations=config.max_participations, seed=config.seed)


class CohortFedAvg(FedAvg):
    """FedAvg that trains on the DP runs' cohorts; aggregation is ``FedAvg.aggregate_train``
    (Flower's accounted mode requires it) weighted by :data:`UNIFORM_WEIGHT_KEY`.

    Args:
        config: supplies ``clients_per_round``, ``num_clients``, cohorts, ``seed`` and
            ``participation_timeout``.
        sampling: ``"cohort"`` (the DP runs' cohorts) or ``"uniform"`` (one cohort).
        poll_interval: seconds between grid polls while waiting for clients.
        **fedavg_kwargs: forwarded to ``FedAvg`` (``fraction_evaluate``, ...).
    """

    def __init__(self, *, config: DPConfig, sampling: str = "cohort", poll_interval: float = 1.0,
                 **fedavg_kwargs: Any) -> None:
        fedavg_kwargs.setdefault("min_train_nodes", config.clients_per_round)
        fedavg_kwargs.setdefault("weighted_by_key", UNIFORM_WEIGHT_KEY)
        # client evaluation metrics would be released without noise: server-side only
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg_kwargs)
        self.config = config
        self.sampling = sampling
        self.poll_interval = float(poll_interval)
        self.cohorts = _schedule(config, sampling)
        self.directory = ClientDirectory()
        self._rng = np.random.default_rng([config.seed & 0xFFFFFFFFFFFFFFFF, _SAMPLING_TAG])
        self.skipped: dict[int, str] = {}
        self.sampled: dict[int, list[str]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample ``m`` clients from the round's cohort (``[]`` when too few are eligible)."""
        cfg = self.config
        picked, reason = select_cohort(
            grid=grid, directory=self.directory, cohorts=self.cohorts, rng=self._rng,
            server_round=server_round, clients_per_round=cfg.clients_per_round,
            num_clients=cfg.num_clients, timeout=cfg.participation_timeout,
            poll_interval=self.poll_interval,
        )
        if reason is not None:
            self.skipped[server_round] = reason
            return []
        self.cohorts.record(picked, server_round)
        self.sampled[server_round] = sorted(picked)
        log(INFO, "configure_train: round %d, cohort %d, sampled %d clients", server_round,
            self.cohorts.cohort_for_round(server_round), len(picked))
        train_config = ConfigRecord(dict(config))
        train_config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
        return self._construct_messages(record, sorted(picked.values()), MessageType.TRAIN)


def flower_accountant(cfg: DPConfig) -> RdpAccountant:
    """Flower's ``RdpAccountant`` for ``flower-dp``: add/remove one client of
    ``num_clients``, no amplification (every released round composes one Gaussian)."""
    return RdpAccountant(PrivacyConfig(
        target_delta=float(cfg.delta), population_size=int(cfg.num_clients),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))


def flower_dp_ledger(cfg: DPConfig, *, sampling: str = "cohort") -> Any:
    """The :class:`fedmf.ledger.PrivacyLedger` of Flower's wrapper: independent noise (the
    identity factorization) with ``k`` participations (``k = rounds`` for uniform sampling)."""
    from fedmf.ledger import privacy_ledger
    from fedmf.mechanisms import MechanismSpec

    part = _schedule(cfg, sampling)
    participation = cohort_participation(rounds=cfg.rounds, min_sep=part.num_cohorts,
                                         max_participations=part.max_participations)
    spec = MechanismSpec(method="identity", rounds=cfg.rounds, participation=participation)
    return privacy_ledger(factorization=spec.factorization(), delta=cfg.delta,
                          epsilon=cfg.epsilon, noise_multiplier=cfg.noise_multiplier)


class FlowerDPFedAvg(ResumableStart, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper around :class:`CohortFedAvg`.

    Args:
        config: the run's :class:`DPConfig` (only ``server`` clipping: Flower's wrapper clips
            on the server).
        sampling: ``"cohort"`` (default) or ``"uniform"``; see :class:`CohortFedAvg`.
        poll_interval: seconds between grid polls.
        **fedavg_kwargs: forwarded to the inner :class:`CohortFedAvg`.
    """

    def __init__(self, *, config: DPConfig, sampling: str = "cohort", poll_interval: float = 1.0,
                 **fedavg_kwargs: Any) -> None:
        if config.clipping != "server":
            raise ValueError(
                f"clipping must be 'server' for Flower's wrapper (flower-dp), got "
                f"{config.clipping!r}"
            )
        self.ledger = flower_dp_ledger(config, sampling=sampling)
        inner = CohortFedAvg(config=config, sampling=sampling, poll_interval=poll_interval,
                             **fedavg_kwargs)
        # accounted (strict) mode: exactly m error-free replies or no release
        super().__init__(inner, self.ledger.noise_multiplier, config.clip_norm,
                         config.clients_per_round, accountant=flower_accountant(config))
        self.inner = inner
        self.config = config
        self.privacy: dict[str, Any] = {
            "mechanism": config.mechanism, "sampling": sampling,
            "clients_per_round": config.clients_per_round, "clip_norm": config.clip_norm,
            "clipping": "server", **self.ledger.as_dict(), "flower_epsilon": 0.0}
        privacy = self.privacy
        self.last_train_metrics: dict[str, Any] = {}
        #: Flower applies the noisy mean as the new model, whatever the run config says
        self.server_optimizer = FLOWER_SERVER_OPTIMIZER
        self.history: dict[str, dict[int, dict[str, Any]]] = {
            "train": {}, "evaluate_clientapp": {}, "evaluate_serverapp": {},
        }
        self._round_done = 0
        self._phase = "complete"
        self._global: ArrayRecord | None = None  # the model after the last round
        self._full_arrays: ArrayRecord | None = None
        log(INFO, "flower-dp: noise multiplier %.6g, (epsilon=%.6g, delta=%g), k=%d; Flower's "
            "wrapper applies the noisy mean with server lr 1 (no schedule); noise from its "
            "unseeded global np.random", privacy["noise_multiplier"], privacy["epsilon"],
            privacy["delta"], privacy["max_participations"])

    @property
    def cohorts(self) -> CohortSchedule:
        """The inner strategy's cohorts and participation history."""
        return self.inner.cohorts

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's ``configure_train``; remembers the float tensors as the clipping anchor."""
        if server_round != self._round_done + 1:
            raise ValueError(f"server_round must be {self._round_done + 1} (rounds run in "
                             f"order), got {server_round}")
        self._global = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._full_arrays = arrays
        self.current_arrays = _float_only(arrays)  # Flower clips the float tensors only
        return messages

    def epsilon_spent(self, server_round: int) -> float:
        """Epsilon of the releases of rounds ``1..server_round`` (``fedmf.ledger``)."""
        return self.ledger.epsilon_spent(server_round)

    def flower_epsilon(self) -> float:
        """Flower's accountant's epsilon at the run's delta (every client in every round)."""
        accountant = self.accountant
        assert accountant is not None  # always accounted
        return 0.0 if accountant.num_releases == 0 else float(
            accountant.get_epsilon(self.ledger.delta))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping + aggregation + noise + accountant, then the ledger metrics and a
        checkpoint.  Every reply is weighted uniformly (:data:`UNIFORM_WEIGHT_KEY`)."""
        replies = [self._refuse_zero_update(r) for r in replies]
        n_fail = sum(1 for r in replies if r.has_error())
        norms = [n for n in map(self._norm, replies) if n is not None]
        for reply in replies:
            if reply.has_content():
                # Flower's clipping/noise break on integer tensors: hand it the float ones
                for name, record in list(reply.content.array_records.items()):
                    reply.content[name] = _float_only(record)
                for record in reply.content.metric_records.values():
                    record[UNIFORM_WEIGHT_KEY] = 1
        arrays, metrics = super().aggregate_train(server_round, replies)
        full = self._full_arrays
        if arrays is not None and full is not None:
            arrays = ArrayRecord({k: arrays[k] if k in arrays else full[k] for k in full})
        if arrays is None and replies:
            log(WARNING, "flower-dp: round %d not released (%d replies, %d failures; Flower's "
                "accounted mode needs exactly %d error-free replies)", server_round,
                len(replies), n_fail, self.num_sampled_clients)
        released = arrays is not None
        out: dict[str, Any] = dict(metrics) if metrics is not None else {}
        arr = np.asarray(norms, dtype=np.float64)
        out.pop(UNIFORM_WEIGHT_KEY, None)
        self.privacy["flower_epsilon"] = self.flower_epsilon()
        out.update({
            "epsilon_spent": self.epsilon_spent(server_round),
            "flower_epsilon": self.privacy["flower_epsilon"],
            "noise_std": (self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
                          if released else 0.0),
            "clip_norm": float(self.clipping_norm),
            "num_accepted": len(norms) if released else 0,
            "num_clipped": int((arr > self.clipping_norm).sum()),
            "num_rejected": 0 if released else len(norms),
            "num_failures": n_fail,
            "num_sampled": len(self.inner.sampled.get(server_round, [])),
            "skipped": int(server_round in self.inner.skipped),
            "server_lr": 1.0,
            "norm_mean": float(arr.mean()) if arr.size else 0.0,
            "norm_max": float(arr.max()) if arr.size else 0.0,
            "norm_median": float(np.median(arr)) if arr.size else 0.0,
        })
        self.last_train_metrics = out
        self.history["train"][server_round] = dict(out)
        if released:
            self._global = arrays
        self._round_done = server_round
        self._phase = "trained"
        self.save()
        return arrays, MetricRecord(out)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Client evaluation, weighted by ``num-examples`` like the other mechanisms."""
        replies = list(replies)
        for reply in replies:
            if reply.has_content():
                for record in reply.content.metric_records.values():
                    record[UNIFORM_WEIGHT_KEY] = record.get("num-examples", 1)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            metrics.pop(UNIFORM_WEIGHT_KEY, None)
        return metrics

    def _norm(self, reply: Message) -> float | None:
        """Pre-clip delta norm (float tensors) of a reply; ``None`` if it has none."""
        current = self.current_arrays
        if reply.has_error() or not len(current):
            return None
        try:
            rec = next(iter(reply.content.array_records.values()))
            sq = sum(sq_norm((array_to_numpy(rec[k]).astype(np.float64)
                              - array_to_numpy(v).astype(np.float64)).reshape(-1))
                     for k, v in current.items())
        except (StopIteration, KeyError, ValueError):
            return None
        return math.sqrt(sq)

    def _refuse_zero_update(self, reply: Message) -> Message:
        """A reply whose update is exactly zero as an error reply: Flower's clipping divides
        by the update's norm (``ZeroDivisionError``), so the round is not released rather
        than the run crashing on every resume."""
        if self._norm(reply) != 0.0:
            return reply
        log(WARNING, "flower-dp: node %d sent an unchanged model; Flower's clipping cannot "
            "take a zero update, counted as a failed reply", reply.metadata.src_node_id)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason="zero update (Flower's clipping divides by its norm)"),
                       reply_to=reply)

    # ------------------------------------------------------------------ checkpointing
    def participation_report(self) -> dict[str, Any]:
        """The ``participation.json`` object: limits and every client's rounds."""
        return self.cohorts.report(rounds=self.config.rounds,
                                   clients_per_round=self.config.clients_per_round)

    def global_arrays(self) -> ArrayRecord | None:
        """The global model after the last completed round (``None`` before round 1)."""
        return self._global

    def fingerprint(self) -> dict[str, Any]:
        """The configuration and the sampling (cohort / uniform)."""
        return {**self.config.fingerprint(), "sampling": self.inner.sampling}

    def state_dict(self) -> dict[str, Any]:
        """Model, cohorts, participation history, sampling RNG and metrics."""
        glob = self._global
        return {
            **self._state_header(),
            "arrays": None if glob is None else {
                k: array_to_numpy(v).copy() for k, v in glob.items()},
            "cohorts": self.cohorts.state_dict(),
            "sampled": dict(self.inner.sampled),
            "skipped": dict(self.inner.skipped),
            "sampling_rng": self.inner._rng.bit_generator.state,
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "history": self.history,
            "last_train_metrics": self.last_train_metrics,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the configuration must be the same)."""
        self._restore_header(state)
        arrays = state["arrays"]
        self._global = None if arrays is None else ArrayRecord(
            {k: array_from_numpy(np.asarray(v)) for k, v in arrays.items()})
        self.cohorts.load_state_dict(state["cohorts"])
        self.inner.sampled = {int(k): list(v) for k, v in state["sampled"].items()}
        self.inner.skipped = {int(k): str(v) for k, v in state["skipped"].items()}
        self.inner._rng.bit_generator.state = state["sampling_rng"]
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
            self.privacy["flower_epsilon"] = self.flower_epsilon()
        self.history = state["history"]
        self.last_train_metrics = dict(state["last_train_metrics"])


def _float_only(record: ArrayRecord) -> ArrayRecord:
    """The floating-point tensors of ``record`` (same order)."""
    return ArrayRecord({k: v for k, v in record.items()
                        if np.issubdtype(np.dtype(v.dtype), np.floating)})
