"""Baselines built on Flower's own DP wrapper (independent noise, DP-FedAvg).

``FlowerDPFedAvg`` is ``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping``
with only what the experiments need added: ``privacy`` / ``last_train_metrics`` attributes and
per-round ledger metrics (``epsilon_spent``, ``noise_std``, ``clip_norm``, ``num_clipped``,
``num_failures``, norm statistics).  The clipping, averaging and noise are Flower's code,
unchanged -- including its noise source, the *unseeded global* ``np.random`` (runs are not
reproducible and the noise can not be checkpointed), and its handling of failures (a round
with any failed reply is not aggregated at all).

The inner strategy decides who trains:

* ``sampling="cohort"`` (default, :class:`CohortFedAvg`): the same cohorts as the DP-MF
  strategy (every client in at most ``k = ceil(n/b)`` rounds, ``>= b`` apart) and a *uniform*
  mean of the replies, so the noise calibration ``fedmf.accounting.calibrate_dpfedavg(
  participations=k)`` is a valid guarantee (Flower's std ``z * clip / m`` assumes equal
  weights; FedAvg's ``num-examples`` weighting would raise the sensitivity).
* ``sampling="uniform"``: Flower's ``FedAvg`` sampling (``random.sample`` of the connected
  nodes, example-weighted mean).  Without amplification a client can be sampled in every
  round, so the calibration uses ``participations = rounds`` (worst case).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from .config import DPConfig
from .dpmf import Layout, _sq_norm, array_from_numpy, array_to_numpy
from .participation import CohortSchedule, select_cohort_nodes

__all__ = ["CohortFedAvg", "FlowerDPFedAvg", "dpfedavg_privacy"]

_SAMPLING_TAG = 0x73616D706C65


class CohortFedAvg(FedAvg):
    """FedAvg that trains on ``m`` eligible nodes of cohort ``(t-1) mod b`` and averages
    the replies uniformly (denominator: number of valid replies, as in Flower).

    Args:
        config: supplies ``clients_per_round``, ``num_clients``, cohorts, ``seed`` and
            ``participation_timeout``.
        poll_interval: seconds between node polls.
        **fedavg_kwargs: forwarded to ``FedAvg`` (``fraction_evaluate``, ...).
    """

    def __init__(self, *, config: DPConfig, poll_interval: float = 1.0,
                 **fedavg_kwargs: Any) -> None:
        fedavg_kwargs.setdefault("min_train_nodes", config.clients_per_round)
        super().__init__(**fedavg_kwargs)
        self.config = config
        self.poll_interval = float(poll_interval)
        self.cohorts = CohortSchedule(num_cohorts=config.num_cohorts,
                                      max_participations=config.max_participations,
                                      seed=config.seed)
        self._rng = np.random.default_rng([config.seed & 0xFFFFFFFFFFFFFFFF, _SAMPLING_TAG])
        self.skipped: dict[int, str] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample from the round's cohort (``[]`` when too few eligible nodes)."""
        cfg = self.config
        nodes, reason = select_cohort_nodes(
            grid=grid, cohorts=self.cohorts, rng=self._rng, server_round=server_round,
            clients_per_round=cfg.clients_per_round, num_clients=cfg.num_clients,
            timeout=cfg.participation_timeout, poll_interval=self.poll_interval,
        )
        if reason is not None:
            self.skipped[server_round] = reason
            return []
        self.cohorts.record(nodes, server_round)
        log(INFO, "configure_train: round %d, cohort %d, sampled %d nodes", server_round,
            self.cohorts.cohort_for_round(server_round), len(nodes))
        train_config = ConfigRecord(dict(config))
        train_config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Uniform mean of the valid replies' arrays; example-weighted mean of metrics."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        records = [next(iter(msg.content.array_records.values())) for msg in valid]
        layout = Layout.from_record(records[0])
        out: dict[str, Any] = {}
        for e in layout.entries:
            total = np.zeros(e.shape, dtype=np.float64)
            for rec in records:
                total += array_to_numpy(rec[e.key])
            mean = total / len(records)
            out[e.key] = array_from_numpy(mean.astype(e.dtype) if e.is_float
                                          else np.rint(mean).astype(e.dtype))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(out), metrics


def dpfedavg_privacy(cfg: DPConfig, *, sampling: str = "cohort") -> dict[str, Any]:
    """Privacy of DP-FedAvg with independent noise (``fedmf.accounting``)."""
    from fedmf import accounting

    if sampling not in ("cohort", "uniform"):
        raise ValueError(f"sampling must be 'cohort' or 'uniform', got {sampling!r}")
    k = cfg.max_participations if sampling == "cohort" else cfg.rounds
    if cfg.noise_multiplier > 0:
        z = float(cfg.noise_multiplier)
    else:
        z = accounting.calibrate_dpfedavg(epsilon=cfg.epsilon, delta=cfg.delta, participations=k)
    eps = accounting.dpfedavg_epsilon(noise_multiplier=z, participations=k, delta=cfg.delta)
    return {
        "mechanism": "dp-fedavg",
        "sampling": sampling,
        "rounds": cfg.rounds,
        "min_sep": cfg.num_cohorts if sampling == "cohort" else 1,
        "max_participations": k,
        "clients_per_round": cfg.clients_per_round,
        "clip_norm": cfg.clip_norm,
        "clipping": "server",
        # k-fold composition of Gaussians == one Gaussian with sensitivity sqrt(k)
        "sensitivity": math.sqrt(k),
        "sensitivity_exact": True,
        "noise_multiplier": z,
        "epsilon": float(eps),
        "delta": cfg.delta,
        "rho": k / (2.0 * z * z),
        "clip_count_stddev": None,
    }


class FlowerDPFedAvg(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper + ``privacy``/``last_train_metrics``.

    Args:
        config: the run's :class:`DPConfig` (``mechanism`` should be ``"dp-fedavg"``; only
            ``server`` clipping is supported -- Flower's wrapper clips on the server).
        sampling: ``"cohort"`` (default) or ``"uniform"``; see the module docstring.
        poll_interval: seconds between node polls (cohort sampling).
        **fedavg_kwargs: forwarded to the inner ``FedAvg`` / :class:`CohortFedAvg`.
    """

    def __init__(self, *, config: DPConfig, sampling: str = "cohort", poll_interval: float = 1.0,
                 **fedavg_kwargs: Any) -> None:
        if config.clipping != "server":
            raise ValueError(
                f"clipping must be 'server' for Flower's dp-fedavg wrapper, got {config.clipping!r}"
            )
        privacy = dpfedavg_privacy(config, sampling=sampling)
        if sampling == "cohort":
            inner: FedAvg = CohortFedAvg(config=config, poll_interval=poll_interval,
                                         **fedavg_kwargs)
        else:
            n, m = config.num_clients, config.clients_per_round
            fedavg_kwargs.setdefault("fraction_train", m / n)
            fedavg_kwargs.setdefault("min_train_nodes", m)
            inner = FedAvg(**fedavg_kwargs)
        super().__init__(inner, privacy["noise_multiplier"], config.clip_norm,
                         config.clients_per_round)
        self.config = config
        self.privacy: dict[str, Any] = privacy
        self.last_train_metrics: dict[str, Any] = {}
        self._full_arrays: ArrayRecord | None = None
        log(INFO, "dp-fedavg: noise multiplier %.6g, (epsilon=%.6g, delta=%g), k=%d; noise from "
            "Flower's unseeded global np.random", privacy["noise_multiplier"], privacy["epsilon"],
            privacy["delta"], privacy["max_participations"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's ``configure_train``; remembers the float tensors as the clipping anchor."""
        messages = super().configure_train(server_round, arrays, config, grid)
        self._full_arrays = arrays
        self.current_arrays = _float_only(arrays)
        return messages

    def epsilon_spent(self, server_round: int) -> float:
        """Epsilon after ``server_round`` rounds (participations so far: ``ceil(t / b)``)."""
        from fedmf import accounting

        p = self.privacy
        k_t = max(1, min(p["max_participations"], math.ceil(server_round / p["min_sep"])))
        # k-fold composition of Gaussians is exactly one Gaussian with sensitivity sqrt(k):
        # closed form (Balle & Wang), capped by the PLD total of the whole run.
        eps = accounting.analytic_gaussian_epsilon(
            noise_multiplier=p["noise_multiplier"], sensitivity=math.sqrt(k_t), delta=p["delta"]
        )
        return float(min(eps, p["epsilon"]))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping + aggregation + noise, then the ledger metrics."""
        replies = list(replies)
        n_fail = sum(1 for r in replies if r.has_error())
        norms = self._norms([r for r in replies if not r.has_error()])
        # Flower's clipping/noise break on integer tensors (``array *= scale`` casting error,
        # integer noise): hand it only the float tensors and keep the server's integer ones.
        for reply in replies:
            if reply.has_content():
                for name, record in list(reply.content.array_records.items()):
                    reply.content[name] = _float_only(record)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            full = self._full_arrays
            if full is not None and len(full):
                arrays = ArrayRecord({k: arrays[k] if k in arrays else full[k] for k in full})
        if n_fail:
            log(WARNING, "dp-fedavg: %d failed replies; Flower's wrapper skips aggregation",
                n_fail)
        out: dict[str, Any] = dict(metrics) if metrics is not None else {}
        arr = np.asarray(norms, dtype=np.float64)
        released = arrays is not None
        out.update({
            "epsilon_spent": self.epsilon_spent(server_round),
            "noise_std": (self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
                          if released else 0.0),
            "clip_norm": float(self.clipping_norm),
            "num_accepted": len(norms) if released else 0,
            "num_clipped": int((arr > self.clipping_norm).sum()),
            "num_rejected": 0 if released else len(norms),
            "num_failures": n_fail,
            "norm_mean": float(arr.mean()) if arr.size else 0.0,
            "norm_max": float(arr.max()) if arr.size else 0.0,
            "norm_median": float(np.median(arr)) if arr.size else 0.0,
        })
        self.last_train_metrics = out
        return arrays, MetricRecord(out)

    def _norms(self, replies: list[Message]) -> list[float]:
        """Pre-clip delta norms (float tensors) of the replies, for the ledger."""
        if not len(self.current_arrays):
            return []
        layout = Layout.from_record(self.current_arrays)
        glob = {e.key: array_to_numpy(self.current_arrays[e.key]).astype(np.float64)
                for e in layout.float_entries}
        norms = []
        for msg in replies:
            try:
                rec = next(iter(msg.content.array_records.values()))
                sq = sum(_sq_norm((array_to_numpy(rec[k]).astype(np.float64) - g).reshape(-1))
                         for k, g in glob.items())
                norms.append(math.sqrt(sq))
            except (StopIteration, KeyError, ValueError):
                continue
        return norms


def _float_only(record: ArrayRecord) -> ArrayRecord:
    """The floating-point tensors of ``record`` (same order)."""
    return ArrayRecord({k: v for k, v in record.items()
                        if np.issubdtype(np.dtype(v.dtype), np.floating)})
