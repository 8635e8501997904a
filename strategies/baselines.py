"""``flower-dp``: Flower's own DP wrapper, kept as a labelled cross-check.

The fair independent-noise baseline is ``dp-fedavg``: :class:`~strategies.dpmf.
DPMatrixFactorizationFedAvg` with the identity factorization, i.e. the same server optimizer
(schedule, momentum, weight decay), cohorts, clip, fixed denominator and accounting as the
correlated mechanisms -- only the noise differs.

``flower-dp`` (:class:`FlowerDPFedAvg`) is ``flwr.serverapp.strategy.
DifferentialPrivacyServerSideFixedClipping`` around :class:`CohortFedAvg`.  Flower's code does
the clipping and the noise (its unseeded global ``np.random``); Flower applies the noisy mean
as the new model, i.e. **server learning rate 1, no schedule, no momentum** whatever the run
config says, and a round with any failed reply is not aggregated.  What is added here keeps
its guarantee valid and the comparison honest:

* :class:`CohortFedAvg` trains on the same cohorts as the DP-MF strategy (keyed by stable client
  id; ``sampling="uniform"`` uses one cohort, ``b = 1``, ``k = rounds``) and averages the
  clipped *deltas* uniformly with the **fixed denominator** ``m``: Flower's noise std
  ``z * clip / m`` assumes exactly that (dividing by the number of replies, or weighting by
  ``num-examples``, would raise the sensitivity above ``clip / m``);
* the privacy ledger (``fedmf.accounting``, ``k`` participations) and per-round metrics;
* checkpoint and resume (:class:`~strategies.driver.ResumableStart`): the global model,
  cohorts, participation history and sampling RNG, so a restart never re-runs a released
  round or lets a client exceed its limits (Flower's noise needs no state: every round's draw
  is fresh).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedmf.mechanisms import cohort_participation

from .arrays import Layout, array_from_numpy, array_to_numpy, sq_norm
from .config import DPConfig
from .driver import ResumableStart
from .participation import ClientDirectory, CohortSchedule, select_cohort

__all__ = ["SAMPLINGS", "CohortFedAvg", "FlowerDPFedAvg", "flower_dp_ledger"]

_SAMPLING_TAG = 0x73616D706C65
SAMPLINGS = ("cohort", "uniform")
FLOWER_SERVER_OPTIMIZER = "flower: noisy mean as the model (lr 1, constant, no momentum)"


def _schedule(config: DPConfig, sampling: str) -> CohortSchedule:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "uniform":  # one cohort: any client in any round, at most every round
        return CohortSchedule(num_cohorts=1, max_participations=config.rounds, seed=config.seed)
    return CohortSchedule(num_cohorts=config.num_cohorts,
                          max_participations=config.max_participations, seed=config.seed)


class CohortFedAvg(FedAvg):
    """FedAvg on cohorts with a uniform mean of the deltas over the fixed ``m``.

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
        self._round_nodes: set[int] = set()
        self._current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample from the round's cohort (``[]`` when too few eligible clients)."""
        cfg = self.config
        self._current = arrays
        picked, reason = select_cohort(
            grid=grid, directory=self.directory, cohorts=self.cohorts, rng=self._rng,
            server_round=server_round, clients_per_round=cfg.clients_per_round,
            num_clients=cfg.num_clients, timeout=cfg.participation_timeout,
            poll_interval=self.poll_interval,
        )
        self._round_nodes = set(picked.values())
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``theta + sum(delta_i) / m`` over the valid replies of sampled clients; metrics
        are a uniform mean of the clients' metrics."""
        current = self._current
        if current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        valid = [r for r in replies if not r.has_error() and r.has_content()
                 and int(r.metadata.src_node_id) in self._round_nodes]
        if not valid:
            return None, None
        m = self.config.clients_per_round
        out: dict[str, Any] = {}
        for e in Layout.from_record(current).entries:
            base = array_to_numpy(current[e.key])
            if not e.is_float:  # the server keeps its own integer buffers
                out[e.key] = current[e.key]
                continue
            acc = np.zeros(e.shape, dtype=np.float64)
            for msg in valid:
                rec = next(iter(msg.content.array_records.values()))
                acc += array_to_numpy(rec[e.key]).astype(np.float64) - base
            out[e.key] = array_from_numpy((base + acc / m).astype(e.dtype))
        metrics = _uniform_mean([msg.content for msg in valid])
        return ArrayRecord(out), metrics


def _uniform_mean(contents: list[RecordDict]) -> MetricRecord:
    """Uniform mean of the clients' finite scalar metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for content in contents:
        for record in content.metric_records.values():
            for key, value in record.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
    return MetricRecord({k: sums[k] / counts[k] for k in sums})


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
        super().__init__(inner, self.ledger.noise_multiplier, config.clip_norm,
                         config.clients_per_round)
        self.inner = inner
        self.config = config
        self.privacy: dict[str, Any] = {
            "mechanism": config.mechanism, "sampling": sampling,
            "clients_per_round": config.clients_per_round, "clip_norm": config.clip_norm,
            "clipping": "server", **self.ledger.as_dict()}
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping + aggregation + noise, then the ledger metrics and a checkpoint."""
        replies = list(replies)
        n_fail = sum(1 for r in replies if r.has_error())
        norms = self._norms([r for r in replies if not r.has_error()])
        # Flower's clipping/noise break on integer tensors: hand it the float tensors only
        for reply in replies:
            if reply.has_content():
                for name, record in list(reply.content.array_records.items()):
                    reply.content[name] = _float_only(record)
        arrays, metrics = super().aggregate_train(server_round, replies)
        full = self._full_arrays
        if arrays is not None and full is not None:
            arrays = ArrayRecord({k: arrays[k] if k in arrays else full[k] for k in full})
        if n_fail:
            log(WARNING, "flower-dp: %d failed replies; Flower's wrapper skips aggregation",
                n_fail)
        released = arrays is not None
        out: dict[str, Any] = dict(metrics) if metrics is not None else {}
        arr = np.asarray(norms, dtype=np.float64)
        out.update({
            "epsilon_spent": self.epsilon_spent(server_round),
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

    def _norms(self, replies: list[Message]) -> list[float]:
        """Pre-clip delta norms (float tensors) of the replies, for the ledger."""
        current = self.current_arrays
        if not len(current):
            return []
        glob = {k: array_to_numpy(v).astype(np.float64) for k, v in current.items()}
        norms = []
        for msg in replies:
            try:
                rec = next(iter(msg.content.array_records.values()))
                sq = sum(sq_norm((array_to_numpy(rec[k]).astype(np.float64) - g).reshape(-1))
                         for k, g in glob.items())
                norms.append(math.sqrt(sq))
            except (StopIteration, KeyError, ValueError):
                continue
        return norms

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
        self.history = state["history"]
        self.last_train_metrics = dict(state["last_train_metrics"])


def _float_only(record: ArrayRecord) -> ArrayRecord:
    """The floating-point tensors of ``record`` (same order)."""
    return ArrayRecord({k: v for k, v in record.items()
                        if np.issubdtype(np.dtype(v.dtype), np.floating)})
