"""DP-FedAvg with correlated (matrix-factorization) noise: ``DPMatrixFactorizationFedAvg``.

A drop-in Flower Message-API strategy (subclass of ``flwr.serverapp.strategy.FedAvg``)::

    from strategies import DPConfig, DPMatrixFactorizationFedAvg

    @app.main()
    def main(grid, context):
        strategy = DPMatrixFactorizationFedAvg(config=DPConfig.from_run_config(context.run_config))
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=strategy.config.rounds)

Round ``t`` (1-based; noise stream index ``t - 1``):

1. ``configure_train`` samples ``m = clients_per_round`` clients from cohort ``(t - 1) mod b``
   (``strategies.participation``), never an ineligible one.  Cohorts and participation history
   follow the stable client id (partition id in simulation, node-config ``client-id`` in a
   deployment), learned once per node id with a ``query.identity`` message, so limits survive
   restarts that change node ids.  If fewer than ``m`` eligible clients are connected it polls
   the grid for ``participation_timeout`` seconds and then *skips* the round (logged; zero
   client signal, the round's noise draw is still consumed).
2. ``aggregate_train``: each valid reply becomes a flat delta to the current model
   (``strategies.arrays``), is screened, clipped (server clipping) or verified (client
   clipping), and summed; the sum is divided by the FIXED ``m`` and round ``t``'s correlated
   noise ``(C^{-1} Z)_t`` with std ``z * clip / m`` is added; the server optimizer -- exactly the
   factorization's workload -- takes the step (``strategies.aggregation``).  Replies with
   errors, from unsampled nodes, duplicated, wrongly keyed/shaped or non-finite are never
   averaged in and are counted.
3. The new state (model, momentum, noise stream, cohorts and participation history, sampling and
   clip RNG states, adaptive clip, metrics) is persisted atomically to ``checkpoint_dir`` (when
   unset, to a private folder under ``$FEDMF_STATE_DIR`` keyed by the configuration) *before*
   the new model is returned (and thus before it leaves the server), so a restart never redraws
   the noise of a released round (``strategies.driver``).

Privacy: ``DPConfig.ledger()`` (``fedmf.ledger``).  The per-round metrics ``norm_mean``,
``norm_max``, ``norm_median``, ``num_clipped`` and the averaged client metrics are computed from
raw client updates: diagnostics for the operator, *not* differentially private.  The noise seed
is secret server state (``secrets``, unless a fixed seed is configured for an
``insecure_reproducible`` experiment); it is never logged nor sent in a message.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .accountant import MatrixFactorizationAccountant
from .aggregation import RoundSum, ServerOptimizer, adaptive_clip, screen_update
from .arrays import Layout, array_to_numpy
from .config import DPConfig
from .driver import ResumableStart
from .participation import ClientDirectory, CohortSchedule, require_quorum, select_cohort
from .sampling import SecretCohorts, select_secret

__all__ = ["DPMatrixFactorizationFedAvg", "privacy_summary"]

_SAMPLING_TAG = 0x73616D706C65  # "sample"
_CLIP_TAG = 0x636C6970  # "clip"
_SECRET_TAG = 0x736563726574  # "secret"
_DIAGNOSTIC_KEYS = ("delta-norm", "clipped")


def privacy_summary(cfg: DPConfig) -> dict[str, Any]:
    """The strategy's ``privacy`` dict: the run's :meth:`DPConfig.ledger` plus its settings."""
    return {"mechanism": cfg.mechanism, "clients_per_round": cfg.clients_per_round,
            "clip_norm": cfg.clip_norm, "clipping": cfg.clipping, "sampling": cfg.sampling,
            "participation_released": not participation_secret(cfg),
            **cfg.ledger().as_dict()}


def participation_secret(cfg: DPConfig) -> bool:
    """Whether who took part (and how many) is withheld from files and logs: amplified
    sampling without ``release_participation``."""
    return cfg.amplified and not cfg.release_participation


class DPMatrixFactorizationFedAvg(ResumableStart, FedAvg):
    """FedAvg with clipping, correlated (DP-MF) noise, a server optimizer and cohorts.

    Args:
        config: the :class:`~strategies.config.DPConfig` (default ``DPConfig()``);
            ``**dp_options`` (``DPConfig`` field names) override its fields.
        fraction_evaluate: as in ``flwr.serverapp.strategy.FedAvg`` (client evaluation is
            off by default because its metrics would be released without noise).
        min_evaluate_nodes: as in ``FedAvg``.
        min_available_nodes: as in ``FedAvg``.
        weighted_by_key: as in ``FedAvg``.
        arrayrecord_key: as in ``FedAvg``.
        configrecord_key: as in ``FedAvg``.
        train_metrics_aggr_fn: as in ``FedAvg``.
        evaluate_metrics_aggr_fn: as in ``FedAvg`` (training sampling is replaced by the
            cohorts).
        poll_interval: seconds between grid polls while waiting for clients.
        device: torch device on which the noise is generated (``None`` -> CPU); the model
            state and the aggregation stay in host memory (NumPy).

    Attributes:
        config: the validated configuration.
        privacy: :func:`privacy_summary` (mechanism, ledger values).
        last_train_metrics: the metrics of the last ``aggregate_train`` as a dict.
        server_optimizer: one line naming the server optimizer (the workload).
        accountant: Flower's ``PrivacyAccountant`` protocol answering for this correlated
            release (``strategies.accountant``; ``None`` for fedavg).

    Raises:
        ValueError: on nonsensical configuration, naming the parameter.
    """

    checkpoint_version = 4  # 3: cohorts keyed by client id; 4: secret sampling

    def __init__(
        self,
        *,
        config: DPConfig | None = None,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        poll_interval: float = 1.0,
        device: str | torch.device | None = None,
        **dp_options: Any,
    ) -> None:
        cfg = config if config is not None else DPConfig()
        if dp_options:
            cfg = cfg.replace(**dp_options)
        from fedmf.mechanisms import mechanism

        if mechanism(cfg.mechanism).runner != "dpmf":
            raise ValueError(f"mechanism {cfg.mechanism!r} is not run by "
                             "DPMatrixFactorizationFedAvg; use strategies.build_strategy for it")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        super().__init__(
            fraction_train=1.0, fraction_evaluate=fraction_evaluate,
            min_train_nodes=cfg.clients_per_round, min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self._user_train_aggr = train_metrics_aggr_fn
        self.config = cfg
        self.poll_interval = float(poll_interval)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ledger = cfg.ledger()
        self.privacy: dict[str, Any] = privacy_summary(cfg)
        #: Flower's ``PrivacyAccountant`` protocol for this release (``None``: not private)
        self.accountant = (MatrixFactorizationAccountant(ledger=self.ledger,
                                                         population_size=cfg.num_clients)
                           if cfg.is_private else None)
        self.last_train_metrics: dict[str, Any] = {}
        self.server_optimizer = cfg.server_optimizer
        self.rates = cfg.schedule_rates()
        self.optimizer = ServerOptimizer(rates=self.rates, momentum=cfg.server_momentum,
                                         weight_decay=cfg.server_weight_decay)
        # Noise stream (secret seed) and the secret RNG of the adaptive-clipping count noise.
        self._noise: Any = None
        self._noise_spec: Any = None
        noise_seed = None if cfg.noise_seed < 0 else cfg.noise_seed
        if cfg.is_private:
            from fedmf.noise import CorrelatedNoise

            self._noise_spec = cfg.factorization().noise_spec
            z, m = self.ledger.noise_multiplier, cfg.clients_per_round
            # Adaptive: unit-clip std, scaled by the round's clip; fixed: std folded in.
            std = z / m if cfg.clipping == "adaptive" else z * cfg.clip_norm / m
            self._noise = CorrelatedNoise(spec=self._noise_spec, std=std, seed=noise_seed,
                                          mode=cfg.noise_mode, device=self.device)
        clip_seed = [noise_seed, _CLIP_TAG] if noise_seed is not None else secrets.randbits(128)
        self._clip_rng = np.random.default_rng(clip_seed)
        self._rng = np.random.default_rng([cfg.seed & 0xFFFFFFFFFFFFFFFF, _SAMPLING_TAG])
        # Amplified sampling: assignment and draws from a secret RNG (checkpointed, never
        # released); cyclic cohorts stay public and reproducible from ``seed``.
        secret_seed = ([noise_seed, _SECRET_TAG] if noise_seed is not None
                       else secrets.randbits(128))
        self._secret_rng = np.random.default_rng(secret_seed)
        #: whether participants and their counts are kept out of files and logs
        self.participation_secret = participation_secret(cfg)
        self.cohorts: CohortSchedule
        if cfg.amplified:
            self.cohorts = SecretCohorts(num_cohorts=cfg.num_cohorts,
                                         max_participations=cfg.max_participations,
                                         rng=self._secret_rng)
        else:
            self.cohorts = CohortSchedule(num_cohorts=cfg.num_cohorts,
                                          max_participations=cfg.max_participations,
                                          seed=cfg.seed)
        self.directory = ClientDirectory()
        # Server state.
        self._clip = float(cfg.clip_norm)
        self._round_done = 0
        self._phase = "complete"
        self._layout: Layout | None = None
        self._theta: np.ndarray | None = None  # flat float vector (CPU, numpy)
        self._nonfloat: dict[str, Array] = {}
        self._last_emitted: ArrayRecord | None = None
        self._scratch: np.ndarray | None = None
        self._sampled: dict[int, list[str]] = {}  # round -> client ids (durable)
        self._round_nodes: dict[int, str] = {}  # node id -> client id of the current round
        self._skipped: dict[int, str] = {}
        self._drawn: dict[int, int] = {}  # round -> clients drawn (dropouts included)
        self._counts: dict[int, dict[str, int]] = {}  # round -> participation counts
        self.history: dict[str, dict[int, dict[str, Any]]] = {
            "train": {}, "evaluate_clientapp": {}, "evaluate_serverapp": {},
        }

    # ------------------------------------------------------------------ introspection
    @property
    def clip_norm(self) -> float:
        """Current clip norm (changes each round with adaptive clipping)."""
        return self._clip

    @property
    def noise_round(self) -> int:
        """Index of the next noise draw (``== rounds completed``); ``-1`` without noise."""
        return -1 if self._noise is None else int(self._noise.round)

    @property
    def noise_memory_bytes(self) -> int | None:
        """``CorrelatedNoise.memory_bytes`` for the current model size (None before round 1)."""
        if self._noise is None or self._layout is None:
            return None
        return int(self._noise.memory_bytes(self._layout.num_params))

    def __repr__(self) -> str:
        cfg = self.config
        return (f"DPMatrixFactorizationFedAvg(mechanism={cfg.mechanism!r}, rounds={cfg.rounds}, "
                f"clients_per_round={cfg.clients_per_round}, cohorts={cfg.num_cohorts}, "
                f"clipping={cfg.clipping!r})")

    def summary(self) -> None:
        """Log the DP configuration and privacy ledger (never the noise seed)."""
        p, cfg = self.privacy, self.config
        log(INFO, "\t├──> DP matrix-factorization settings:")
        log(INFO, "\t│\t├── mechanism: %s (bands=%s, noise-mode=%s)", cfg.mechanism,
            cfg.bands if cfg.spec().bands else None, cfg.noise_mode)
        log(INFO, "\t│\t├── rounds n=%d, cohorts b=%d, max participations k=%d, "
            "clients/round m=%d, expected clients N=%d", cfg.rounds, cfg.num_cohorts,
            cfg.max_participations, cfg.clients_per_round, cfg.num_clients)
        log(INFO, "\t│\t├── sampling: %s%s", cfg.sampling,
            "" if not cfg.amplified else
            f" (secret, q={cfg.sampling_rate:.4g}; participation "
            f"{'withheld' if self.participation_secret else 'RELEASED (not private)'})")
        log(INFO, "\t│\t├── clipping: %s, clip norm %g", cfg.clipping, cfg.clip_norm)
        log(INFO, "\t│\t├── server optimizer: %s", self.server_optimizer)
        if cfg.is_private:
            log(INFO, "\t│\t├── sensitivity %.6g (%s), noise multiplier z=%.6g, "
                "noise std z*clip/m=%.6g", p["sensitivity"],
                "exact" if p["sensitivity_exact"] else "upper bound", p["noise_multiplier"],
                p["noise_multiplier"] * cfg.clip_norm / cfg.clients_per_round)
            if p.get("clip_count_stddev") is not None:
                log(INFO, "\t│\t├── adaptive clipping: quantile %g, lr %g, count std %g",
                    cfg.clip_quantile, cfg.clip_lr, p["clip_count_stddev"])
            log(INFO, "\t│\t└── privacy: (epsilon=%.6g, delta=%g)-DP (%s bound), rho=%.6g "
                "zCDP without amplification", p["epsilon"], p["delta"],
                p.get("epsilon_bound", "un-amplified"), p["rho"])
        else:
            log(INFO, "\t│\t└── privacy: NONE (non-private fedavg baseline)")
        super().summary()

    def epsilon_spent(self, server_round: int) -> float:
        """Epsilon of the releases of rounds ``1..server_round`` (``fedmf.ledger``)."""
        return self.ledger.epsilon_spent(server_round)

    # ------------------------------------------------------------------ model state
    def _set_global(self, arrays: ArrayRecord) -> None:
        """Adopt ``arrays`` as ``theta_{t-1}`` (unless it is the model this strategy emitted)."""
        if arrays is self._last_emitted and self._theta is not None:
            return
        layout = Layout.from_record(arrays)
        if self._layout is not None and layout.describe() != self._layout.describe():
            raise ValueError("arrays: the model layout changed between rounds")
        theta = layout.vector(arrays)
        if not np.all(np.isfinite(theta)):
            raise ValueError("arrays: the global model contains NaN/Inf")
        self._layout, self._theta = layout, theta
        self._nonfloat = {e.key: arrays[e.key] for e in layout.entries if not e.is_float}
        self._last_emitted = arrays

    def _emit(self) -> ArrayRecord:
        """The current global model as an ``ArrayRecord`` (original keys, dtypes, shapes)."""
        assert self._layout is not None and self._theta is not None
        self._last_emitted = self._layout.record(self._theta, self._nonfloat)
        return self._last_emitted

    def global_arrays(self) -> ArrayRecord | None:
        """The global model held by the strategy (``None`` before the first round)."""
        return None if self._theta is None else self._emit()

    def participation_report(self) -> dict[str, Any]:
        """The ``participation.json`` object: limits, every client's rounds and, under
        amplified sampling, the per-round counts (secret unless ``release_participation``)."""
        cfg = self.config
        report = self.cohorts.report(rounds=cfg.rounds,
                                     clients_per_round=cfg.clients_per_round)
        report["sampling"] = cfg.sampling
        if cfg.amplified:
            report["private"] = self.participation_secret
            report["counts"] = {str(t): dict(c) for t, c in sorted(self._counts.items())}
            if not self.participation_secret:
                report["note"] = ("released with release-participation: NOT private; the "
                                  "amplified guarantee does not hold against its readers")
        return report

    # ------------------------------------------------------------------ training round
    def _check_round(self, server_round: int) -> None:
        if server_round != self._round_done + 1:
            raise ValueError(f"server_round must be {self._round_done + 1} (rounds run in "
                             f"order), got {server_round}")
        if server_round > self.config.rounds:
            raise ValueError(f"server_round {server_round} exceeds rounds="
                             f"{self.config.rounds} of the factorization")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample ``m`` eligible clients of cohort ``(t-1) mod b``; ``[]`` if the round is
        skipped."""
        cfg = self.config
        self._check_round(server_round)
        self._set_global(arrays)
        if not self.cohorts.assigned:  # before any noise is drawn or any round released
            require_quorum(grid=grid, directory=self.directory, need=cfg.quorum,
                           timeout=cfg.participation_timeout, poll_interval=self.poll_interval)
        if cfg.amplified:
            return self._configure_secret(server_round, arrays, config, grid)
        picked, reason = select_cohort(
            grid=grid, directory=self.directory, cohorts=self.cohorts, rng=self._rng,
            server_round=server_round, clients_per_round=cfg.clients_per_round,
            num_clients=cfg.num_clients, timeout=cfg.participation_timeout,
            poll_interval=self.poll_interval)
        self._round_nodes = {node: cid for cid, node in picked.items()}
        if reason is not None:
            cost = (self.epsilon_spent(server_round) - self.epsilon_spent(server_round - 1)
                    if cfg.is_private else 0.0)
            log(WARNING, "Round %d: applying a noise-only update (stream index stays aligned); "
                "this skipped round costs epsilon %.4g of the budget", server_round, cost)
            self._skipped[server_round] = reason
            return []
        self.cohorts.record(picked, server_round)
        self._sampled[server_round] = sorted(picked)
        log(INFO, "configure_train: round %d, cohort %d, sampled %d clients", server_round,
            self.cohorts.cohort_for_round(server_round), len(picked))
        return self._train_messages(server_round, picked, arrays, config)

    def _configure_secret(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                          grid: Grid) -> Iterable[Message]:
        """Amplified sampling: the secret draw of ``strategies.sampling``; never skipped (an
        empty draw is a legitimate outcome and gets the round's noise)."""
        cfg = self.config
        picked, drawn = select_secret(
            grid=grid, directory=self.directory, cohorts=self.cohorts,  # type: ignore[arg-type]
            rng=self._secret_rng, rate=cfg.sampling_rate, server_round=server_round,
            num_clients=cfg.num_clients, timeout=cfg.participation_timeout,
            poll_interval=self.poll_interval)
        self._round_nodes = {node: cid for cid, node in picked.items()}
        self.cohorts.record(picked, server_round)
        self._sampled[server_round] = sorted(picked)
        self._drawn[server_round] = drawn
        if self.participation_secret:
            log(INFO, "configure_train: round %d (%s sampling; participants withheld)",
                server_round, cfg.sampling)
        else:
            log(INFO, "configure_train: round %d, %s sampling, drew %d clients (%d connected)",
                server_round, cfg.sampling, drawn, len(picked))
        if not picked:
            return []
        return self._train_messages(server_round, picked, arrays, config)

    def _train_messages(self, server_round: int, picked: Mapping[str, int],
                        arrays: ArrayRecord, config: ConfigRecord) -> Iterable[Message]:
        cfg = self.config
        train_config = ConfigRecord(dict(config))
        train_config["server-round"] = server_round
        if cfg.clipping == "client" and cfg.is_private:
            train_config["clip-norm"] = float(self._clip)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
        return self._construct_messages(record, sorted(picked.values()), MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average over the fixed ``m``, add round ``t``'s correlated noise, step."""
        cfg, t = self.config, server_round
        self._check_round(t)
        if self._theta is None or self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        layout, theta = self._layout, self._theta
        if self._scratch is None or self._scratch.size != layout.num_params:
            self._scratch = np.empty(layout.num_params, dtype=layout.work_dtype)
        total = RoundSum(layout.num_params, theta.dtype)
        expected = set(self._round_nodes) if t in self._sampled else set()
        private, clip = cfg.is_private, self._clip
        client_clipped = private and cfg.clipping == "client"
        seen: set[int] = set()
        counts = {"failures": 0, "rejected": 0, "clipped": 0, "unclipped": 0}
        norms: list[float] = []
        accepted: list[Message] = []
        for msg in replies:
            if msg.has_error():
                counts["failures"] += 1
                if not self.participation_secret:
                    log(INFO, "aggregate_train: node %d replied with an error: %s",
                        msg.metadata.src_node_id, msg.error.reason)
                continue
            src = int(msg.metadata.src_node_id)
            reason, norm = self._read_delta(msg, src, expected, seen, clip, client_clipped)
            seen.add(src)
            if reason is not None:
                counts["rejected"] += 1
                if not self.participation_secret:
                    log(WARNING, "aggregate_train: rejected reply of node %d: %s", src, reason)
                continue
            accepted.append(msg)
            pre_clip = norm
            if client_clipped:
                reported = self._reported(msg)
                pre_clip = float(reported.get("delta-norm", norm))
                counts["clipped"] += int(bool(reported.get("clipped", pre_clip > clip)))
            elif private:
                counts["clipped"] += int(norm > clip)
            counts["unclipped"] += int(pre_clip <= clip)
            norms.append(pre_clip)
            total.add(self._scratch, norm=norm, clip=clip if private else None)

        update = total.mean(cfg.clients_per_round)  # fixed denominator
        noise_std = self._add_noise(update, t, clip)
        self.optimizer.step(theta, update, t)
        clip_used = clip
        if private and cfg.clipping == "adaptive" and expected:
            sigma_b = float(self.privacy["clip_count_stddev"])
            self._clip = adaptive_clip(
                clip, unclipped=counts["unclipped"],
                count_noise=float(self._clip_rng.normal(0.0, sigma_b)),
                clients_per_round=cfg.clients_per_round, quantile=cfg.clip_quantile,
                lr=cfg.clip_lr)
        self._round_done = t
        if self.accountant is not None:
            self.accountant.record_rounds(t)
        metrics = self._round_metrics(t, accepted=accepted, norms=norms, counts=counts,
                                      clip_used=clip_used, noise_std=noise_std)
        self.last_train_metrics = dict(metrics)
        self.history["train"][t] = dict(metrics)
        if cfg.amplified:  # the private record (participation.json beside the checkpoint)
            self._counts[t] = {"drawn": self._drawn.get(t, 0),
                               "sampled": len(self._sampled.get(t, [])),
                               "accepted": len(accepted), **counts}
        arrays = self._emit()
        self._phase = "trained"
        self.save()
        if self.participation_secret:
            log(INFO, "aggregate_train: round %d, noise std %.4g, epsilon spent %.4g", t,
                noise_std, metrics["epsilon_spent"])
        else:
            log(INFO, "aggregate_train: round %d, %d accepted, %d rejected, %d failures, "
                "noise std %.4g, epsilon spent %.4g", t, len(accepted), counts["rejected"],
                counts["failures"], noise_std, metrics["epsilon_spent"])
        return arrays, metrics

    def _read_delta(self, msg: Message, src: int, expected: set[int], seen: set[int],
                    clip: float, client_clipped: bool) -> tuple[str | None, float]:
        """Write the reply's delta to the scratch vector; ``(reason to reject, norm)``."""
        assert self._layout is not None and self._theta is not None
        if src not in expected:
            return "node was not sampled for this round", math.nan
        if src in seen:
            return "duplicate reply", math.nan
        if not msg.has_content():
            return "empty reply", math.nan
        records = msg.content.array_records
        if self.arrayrecord_key in records:
            record = records[self.arrayrecord_key]
        else:
            record = next(iter(records.values())) if len(records) == 1 else None
        if record is None:
            return "no ArrayRecord", math.nan
        problem = self._layout.check(record)
        if problem is not None:
            return problem, math.nan
        try:
            self._layout.delta(record, self._theta, self._scratch)
        except (ValueError, TypeError) as err:
            return f"unreadable arrays ({err})", math.nan
        norm, problem = screen_update(self._scratch, clip=clip, client_clipped=client_clipped)
        return problem, norm

    def _add_noise(self, update: np.ndarray, t: int, clip: float) -> float:
        """Add round ``t``'s correlated noise to ``update`` in place; return its std."""
        if self._noise is None:
            return 0.0
        if self._noise.round != t - 1:
            raise RuntimeError(f"noise stream index {self._noise.round} != round {t} - 1; "
                               "refusing to reuse or skip a noise draw")
        scale = clip if self.config.clipping == "adaptive" else 1.0
        like = (torch.from_numpy(update) if self.device.type == "cpu"
                else torch.empty(update.size, dtype=torch.float32, device=self.device))
        w = self._noise.next(like).detach().cpu().numpy()
        if scale != 1.0:
            w = w * scale
        np.add(update, w, out=update, casting="same_kind")
        return float(self._noise.std) * scale

    @staticmethod
    def _reported(msg: Message) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for record in msg.content.metric_records.values():
            for key in _DIAGNOSTIC_KEYS:
                if key in record and isinstance(record[key], int | float):
                    out[key] = record[key]
        return out

    def _client_metrics(self, accepted: list[Message]) -> dict[str, float]:
        """Uniform mean of the clients' scalar metrics (or the user's aggregation fn)."""
        if not accepted:
            return {}
        contents = [msg.content for msg in accepted]
        if self._user_train_aggr is not None:
            try:
                return dict(self._user_train_aggr(contents, self.weighted_by_key))
            except Exception as err:
                log(WARNING, "train_metrics_aggr_fn failed: %s", err)
                return {}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for content in contents:
            for record in content.metric_records.values():
                for key, value in record.items():
                    if key in _DIAGNOSTIC_KEYS or isinstance(value, list):
                        continue
                    if isinstance(value, int | float) and math.isfinite(value):
                        sums[key] = sums.get(key, 0.0) + float(value)
                        counts[key] = counts.get(key, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    def _round_metrics(self, t: int, *, accepted: list[Message], norms: list[float],
                       counts: Mapping[str, int], clip_used: float,
                       noise_std: float) -> MetricRecord:
        arr = np.asarray(norms, dtype=np.float64)
        if self.participation_secret:
            # Counts, norms and the clients' own metrics would reveal who took part.
            return MetricRecord({
                "epsilon_spent": float(self.epsilon_spent(t)),
                "noise_std": float(noise_std),
                "clip_norm": float(clip_used),
                "next_clip_norm": float(self._clip),
                "server_lr": float(self.rates[t - 1]),
            })
        metrics: dict[str, Any] = self._client_metrics(accepted)
        metrics.update({
            "epsilon_spent": float(self.epsilon_spent(t)),
            "noise_std": float(noise_std),
            "clip_norm": float(clip_used),
            "next_clip_norm": float(self._clip),
            "num_accepted": len(accepted),
            "num_clipped": int(counts["clipped"]),
            "num_rejected": int(counts["rejected"]),
            "num_failures": int(counts["failures"]),
            "num_sampled": len(self._sampled.get(t, [])),
            **({"num_drawn": self._drawn.get(t, 0)} if self.config.amplified else {}),
            "skipped": int(t in self._skipped),
            "server_lr": float(self.rates[t - 1]),
            "norm_mean": float(arr.mean()) if arr.size else 0.0,
            "norm_max": float(arr.max()) if arr.size else 0.0,
            "norm_median": float(np.median(arr)) if arr.size else 0.0,
        })
        return MetricRecord(metrics)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Complete server state (contains the secret noise seed: keep private)."""
        return {
            **self._state_header(),
            "layout": None if self._layout is None else self._layout.describe(),
            "theta": None if self._theta is None else self._theta.copy(),
            "nonfloat": {k: array_to_numpy(v).copy() for k, v in self._nonfloat.items()},
            "momentum": None if self.optimizer.buffer is None else self.optimizer.buffer.copy(),
            "noise": None if self._noise is None else self._noise.state_dict(),
            "cohorts": self.cohorts.state_dict(),
            "sampled": {int(k): list(v) for k, v in self._sampled.items()},  # client ids
            "skipped": dict(self._skipped),
            "drawn": dict(self._drawn),
            "counts": {int(k): dict(v) for k, v in self._counts.items()},
            "sampling_rng": self._rng.bit_generator.state,
            "secret_rng": self._secret_rng.bit_generator.state,
            "clip_rng": self._clip_rng.bit_generator.state,
            "clip": self._clip,
            "history": self.history,
            "last_train_metrics": self.last_train_metrics,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the configuration must be the same)."""
        from fedmf.noise import CorrelatedNoise

        from .arrays import array_from_numpy

        self._restore_header(state)
        if self.accountant is not None:
            self.accountant.record_rounds(self._round_done)
        if state["theta"] is not None:
            self._layout = Layout.from_description(state["layout"])
            self._theta = np.array(state["theta"], copy=True)
            self._nonfloat = {k: array_from_numpy(np.asarray(v))
                              for k, v in state["nonfloat"].items()}
            self._last_emitted = None
        self.optimizer.buffer = (None if state["momentum"] is None
                                 else np.array(state["momentum"], copy=True))
        if state["noise"] is not None:
            self._noise = CorrelatedNoise.from_state_dict(state["noise"], spec=self._noise_spec,
                                                          device=self.device)
        self.cohorts.load_state_dict(state["cohorts"])
        self._sampled = {int(k): [str(c) for c in v] for k, v in state["sampled"].items()}
        self._round_nodes = {}
        self._skipped = dict(state["skipped"])
        self._drawn = {int(k): int(v) for k, v in state["drawn"].items()}
        self._counts = {int(k): dict(v) for k, v in state["counts"].items()}
        self._rng.bit_generator.state = state["sampling_rng"]
        self._secret_rng.bit_generator.state = state["secret_rng"]
        self._clip_rng.bit_generator.state = state["clip_rng"]
        self._clip = float(state["clip"])
        self.history = state["history"]
        self.last_train_metrics = dict(state["last_train_metrics"])
