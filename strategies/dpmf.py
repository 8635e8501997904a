"""DP-FedAvg with correlated (matrix-factorization) noise: ``DPMatrixFactorizationFedAvg``.

A drop-in Flower 1.41 Message-API strategy (subclass of ``flwr.serverapp.strategy.FedAvg``)::

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
   client signal).
2. ``aggregate_train``: each valid reply's float tensors are flattened once into a float32
   (float64 for float64 models) vector; the delta to the current global model is clipped to
   ``clip`` (server clipping; zero-norm safe) or verified (client clipping: rejected when above
   ``clip * (1 + 1e-6)``); replies with errors, from unsampled nodes, duplicated, wrongly
   keyed/shaped or non-finite are never averaged in and are counted.  The clipped deltas are
   summed and divided by the FIXED ``m`` (even if fewer replied), then round ``t``'s correlated
   noise ``w_t = (C^{-1} Z)_t`` with std ``z * clip / m`` is added, giving ``u_t``.
3. Server optimizer (exactly the factorization's workload
   ``sgd_workload(rates=eta, momentum=beta, weight_decay=wd)``)::

       m_t = beta m_{t-1} + u_t ;   theta_t = (1 - wd) theta_{t-1} + eta_t m_t

   Integer tensors (e.g. ``num_batches_tracked``) are excluded from the delta, the clip norm and
   the noise; the server keeps its own values for them (client values would leak data sizes).
4. The new state (model, momentum, noise stream, cohorts and participation history, sampling and
   clip RNG states, adaptive clip, metrics) is persisted atomically to ``checkpoint_dir``
   *before* the new model is returned (and thus before it leaves the server), so a restart never
   redraws the noise of a released round.

Privacy: without sampling amplification the whole release is one Gaussian mechanism with noise
multiplier ``z / sens(C)`` (``fedmf.accounting``).  With adaptive clipping the per-round noisy
count of unclipped updates (std ``sigma_b``) is composed in
(``fedmf.accounting.adaptive_clipping_epsilon``) and the correlated noise is scaled by the
current clip (post-processing of earlier releases).  The per-round metrics ``norm_mean``,
``norm_max``, ``norm_median``, ``num_clipped`` and the averaged client metrics are computed
from raw client updates: diagnostics for the operator, *not* differentially private.

The noise seed is secret server state: drawn with ``secrets`` unless ``noise_seed >= 0`` is
configured (reproducible experiments only); it is never logged nor sent in a message.
"""

from __future__ import annotations

import io
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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

from .config import DPConfig
from .driver import ResumableStart
from .participation import ClientDirectory, CohortSchedule, select_cohort

__all__ = [
    "DPMatrixFactorizationFedAvg",
    "Layout",
    "array_from_numpy",
    "array_to_numpy",
    "privacy_summary",
]

_CHECKPOINT_VERSION = 2  # 2: cohorts and history keyed by client id
_CLIENT_CLIP_TOL = 1e-6
_PLD_MAX_EPSILON = 64.0
_NORM_CHUNK = 1 << 16
_SAMPLING_TAG = 0x73616D706C65  # "sample"
_CLIP_TAG = 0x636C6970  # "clip"
_DIAGNOSTIC_KEYS = ("delta-norm", "clipped")
_NUMPY_STYPE = "numpy.ndarray"


# =============================================================================== arrays
def array_to_numpy(arr: Array) -> np.ndarray:
    """Values of a Flower ``Array``; a read-only zero-copy view for NumPy-serialised arrays.

    ``Array.numpy()`` runs ``np.load`` (a copy); here the ``.npy`` header is parsed and the
    data is viewed in place (falls back to ``Array.numpy()`` for other formats).
    """
    if arr.stype == _NUMPY_STYPE:
        try:
            bio = io.BytesIO(arr.data)
            version = np.lib.format.read_magic(bio)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(bio)
            if not dtype.hasobject:
                count = math.prod(shape)
                out = np.frombuffer(arr.data, dtype=dtype, count=count, offset=bio.tell())
                return out.reshape(shape, order="F" if fortran else "C")
        except (ValueError, TypeError):
            pass
    return arr.numpy()


def array_from_numpy(ndarray: np.ndarray) -> Array:
    """``Array(ndarray)`` (same bytes as ``np.save``) with a single copy of the data."""
    x = np.asarray(ndarray, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(x))
    parts: list[Any] = [header.getvalue()]
    if x.size:
        parts.append(memoryview(x.reshape(-1)).cast("B"))
    return Array(
        dtype=str(x.dtype),
        shape=tuple(int(s) for s in x.shape),
        stype=_NUMPY_STYPE,
        data=b"".join(parts),
    )


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    is_float: bool
    offset: int  # into the flat float vector (-1 for non-float tensors)
    size: int


@dataclass(frozen=True)
class Layout:
    """Order, shapes and dtypes of a model's tensors; the float ones map to one flat vector."""

    entries: tuple[_Entry, ...]
    num_params: int  # number of float parameters

    @classmethod
    def from_record(cls, record: ArrayRecord) -> Layout:
        """Layout of ``record`` (float tensors concatenated in record order)."""
        entries = []
        offset = 0
        for key, arr in record.items():
            dtype = np.dtype(arr.dtype)
            shape = tuple(int(s) for s in arr.shape)
            size = math.prod(shape)
            is_float = bool(np.issubdtype(dtype, np.floating))
            entries.append(_Entry(key, dtype, shape, is_float, offset if is_float else -1, size))
            if is_float:
                offset += size
        if offset == 0:
            raise ValueError("initial_arrays must contain at least one floating-point tensor")
        return cls(tuple(entries), offset)

    @property
    def float_entries(self) -> tuple[_Entry, ...]:
        return tuple(e for e in self.entries if e.is_float)

    @property
    def work_dtype(self) -> np.dtype:
        """float64 if any float tensor is float64, else float32."""
        if any(e.dtype == np.float64 for e in self.float_entries):
            return np.dtype(np.float64)
        return np.dtype(np.float32)

    def describe(self) -> list[tuple[str, str, tuple[int, ...], bool]]:
        """Plain-python description (checkpoints, comparisons)."""
        return [(e.key, e.dtype.str, e.shape, e.is_float) for e in self.entries]

    def check(self, record: ArrayRecord) -> str | None:
        """Why ``record`` does not match this layout, or ``None``."""
        keys = {e.key for e in self.entries}
        if set(record.keys()) != keys:
            missing = sorted(keys - set(record.keys()))[:3]
            extra = sorted(set(record.keys()) - keys)[:3]
            return f"keys differ (missing {missing}, unexpected {extra})"
        for e in self.entries:
            arr = record[e.key]
            shape = tuple(int(s) for s in arr.shape)
            if shape != e.shape:
                return f"{e.key!r} has shape {shape}, expected {e.shape}"
            if e.is_float:
                try:
                    dtype = np.dtype(arr.dtype)
                except TypeError:
                    return f"{e.key!r} has unknown dtype {arr.dtype!r}"
                if not np.issubdtype(dtype, np.floating):
                    return f"{e.key!r} has dtype {dtype}, expected a float dtype"
        return None


def _sq_norm(x: np.ndarray) -> float:
    """``||x||^2`` with float64 accumulation across chunks (float32 BLAS within a chunk).

    A plain float32 ``np.dot`` over 10^7 entries is off by ~1e-4 relative, too much for clip
    verification at 1e-6; chunking keeps it below 1e-8 at nearly BLAS speed.
    """
    if x.dtype == np.float64 or x.size <= _NORM_CHUNK:
        return float(np.dot(x, x)) if x.dtype == np.float64 else float(
            np.dot(x.astype(np.float64), x.astype(np.float64))
        )
    total = 0.0
    for i in range(0, x.size, _NORM_CHUNK):
        c = x[i : i + _NORM_CHUNK]
        total += float(np.dot(c, c))
    return total


# =============================================================================== privacy
def privacy_summary(cfg: DPConfig) -> dict[str, Any]:
    """Noise multiplier, sensitivity, epsilon and rho of ``cfg`` (``fedmf.accounting``).

    With ``cfg.noise_multiplier > 0`` it is used as is; otherwise it is calibrated to
    ``(cfg.epsilon, cfg.delta)``.  Adaptive clipping composes the noisy clip counts in.
    """
    from fedmf import accounting

    b, k, m = cfg.num_cohorts, cfg.max_participations, cfg.clients_per_round
    base: dict[str, Any] = {
        "mechanism": cfg.mechanism,
        "rounds": cfg.rounds,
        "min_sep": b,
        "max_participations": k,
        "clients_per_round": m,
        "clip_norm": cfg.clip_norm,
        "clipping": cfg.clipping,
        "delta": cfg.delta,
    }
    if not cfg.is_private:
        base.update(sensitivity=0.0, sensitivity_exact=True, noise_multiplier=0.0,
                    epsilon=math.inf, rho=math.inf, clip_count_stddev=None)
        return base
    fact = cfg.factorization()
    sens = float(fact.sensitivity.value)
    exact = bool(fact.sensitivity.exact)
    adaptive = cfg.clipping == "adaptive"
    sigma_b = (cfg.clip_count_stddev or m / 20.0) if adaptive else None
    if cfg.noise_multiplier > 0:
        z = float(cfg.noise_multiplier)
    elif adaptive:
        z = accounting.calibrate_adaptive_clipping(
            epsilon=cfg.epsilon, delta=cfg.delta, clip_count_stddev=sigma_b,
            clients_per_round=m, participations=k, sensitivity=sens,
        )
    else:
        z = accounting.calibrate_noise_multiplier(
            epsilon=cfg.epsilon, delta=cfg.delta, sensitivity=sens
        )
    mu2 = (sens / z) ** 2 + (k / sigma_b**2 if adaptive else 0.0)
    closed_form = accounting.analytic_gaussian_epsilon(
        noise_multiplier=1.0 / math.sqrt(mu2), sensitivity=1.0, delta=cfg.delta
    )
    try:
        if closed_form > _PLD_MAX_EPSILON:
            # dp_accounting's PLD takes minutes for huge epsilons; the closed form is exact
            eps = closed_form
        elif adaptive:
            eps = accounting.adaptive_clipping_epsilon(
                noise_multiplier=z, clip_count_stddev=sigma_b, clients_per_round=m,
                participations=k, sensitivity=sens, delta=cfg.delta,
            )
        else:
            eps = accounting.epsilon(noise_multiplier=z, sensitivity=sens, delta=cfg.delta)
    except (ValueError, OverflowError, MemoryError) as err:
        # dp_accounting's PLD can not represent enormous epsilons (z/sens ~ 0)
        log(WARNING, "epsilon could not be computed (%s); reporting inf", err)
        eps = math.inf
    rho = accounting.rho_zcdp(noise_multiplier=z, sensitivity=sens)
    if adaptive:
        rho += k / (2 * sigma_b**2)
    base.update(sensitivity=sens, sensitivity_exact=exact, noise_multiplier=z,
                epsilon=float(eps), rho=float(rho), clip_count_stddev=sigma_b)
    return base


# =============================================================================== strategy
class DPMatrixFactorizationFedAvg(ResumableStart, FedAvg):
    """FedAvg with clipping, correlated (DP-MF) noise, a server optimizer and cohorts.

    Args:
        config: the :class:`~strategies.config.DPConfig` (default ``DPConfig()``);
            ``**dp_options`` (``DPConfig`` field names) override its fields.
        fraction_evaluate, min_evaluate_nodes, min_available_nodes, weighted_by_key,
        arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn:
            as in ``flwr.serverapp.strategy.FedAvg`` (training sampling is replaced by the
            cohorts; ``train_metrics_aggr_fn`` receives the accepted replies only).
        poll_interval: seconds between ``grid.get_node_ids()`` polls while waiting for nodes.
        device: torch device on which the noise is generated (``None`` -> CPU); the model
            state and the aggregation stay in host memory (NumPy).

    Attributes:
        config: the validated configuration.
        privacy: mechanism, rounds, min_sep, max_participations, sensitivity,
            sensitivity_exact, noise_multiplier, epsilon, delta, rho (and a few more).
        last_train_metrics: the metrics of the last ``aggregate_train`` as a dict.

    Raises:
        ValueError: on nonsensical configuration, naming the parameter.
    """

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
            raise ValueError(
                f"mechanism {cfg.mechanism!r} is not run by DPMatrixFactorizationFedAvg; "
                "use strategies.build_strategy for it"
            )
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=cfg.clients_per_round,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self._user_train_aggr = train_metrics_aggr_fn
        self.config = cfg
        self.poll_interval = float(poll_interval)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rates = cfg.schedule_rates()
        self.privacy: dict[str, Any] = privacy_summary(cfg)
        self.last_train_metrics: dict[str, Any] = {}
        #: the server optimizer this strategy runs (the factorization's workload)
        self.server_optimizer = cfg.server_optimizer

        # Noise stream (secret seed) and the secret RNG of the adaptive-clipping count noise.
        self._noise: Any = None
        self._noise_spec: Any = None
        noise_seed = None if cfg.noise_seed < 0 else cfg.noise_seed
        if cfg.is_private:
            from fedmf.noise import CorrelatedNoise

            self._noise_spec = cfg.factorization().noise_spec
            z, m = self.privacy["noise_multiplier"], cfg.clients_per_round
            # Adaptive: unit-clip std, scaled by the round's clip; fixed: std folded in.
            std = z / m if cfg.clipping == "adaptive" else z * cfg.clip_norm / m
            self._noise = CorrelatedNoise(
                spec=self._noise_spec, std=std, seed=noise_seed, mode=cfg.noise_mode,
                device=self.device,
            )
        clip_seed = [noise_seed, _CLIP_TAG] if noise_seed is not None else secrets.randbits(128)
        self._clip_rng = np.random.default_rng(clip_seed)
        self._rng = np.random.default_rng([cfg.seed & 0xFFFFFFFFFFFFFFFF, _SAMPLING_TAG])
        self.cohorts = CohortSchedule(
            num_cohorts=cfg.num_cohorts, max_participations=cfg.max_participations, seed=cfg.seed
        )
        self.directory = ClientDirectory()
        # Server state.
        self._clip = float(cfg.clip_norm)
        self._round_done = 0
        self._layout: Layout | None = None
        self._theta: np.ndarray | None = None  # flat float vector (CPU, numpy)
        self._momentum: np.ndarray | None = None
        self._nonfloat: dict[str, Array] = {}
        self._last_emitted: ArrayRecord | None = None
        self._scratch: np.ndarray | None = None
        self._acc: np.ndarray | None = None
        self._sampled: dict[int, list[str]] = {}  # round -> client ids (durable)
        self._round_nodes: dict[int, str] = {}  # node id -> client id of the current round
        self._skipped: dict[int, str] = {}
        self._eps_cache: dict[int, float] = {}
        self._prefix_C: np.ndarray | None = None
        self._phase = "complete"
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
    def rounds_completed(self) -> int:
        """Last server round whose aggregate was computed."""
        return self._round_done

    @property
    def noise_memory_bytes(self) -> int | None:
        """``CorrelatedNoise.memory_bytes`` for the current model size (None before round 1)."""
        if self._noise is None or self._layout is None:
            return None
        return int(self._noise.memory_bytes(self._layout.num_params))

    def __repr__(self) -> str:
        return (
            f"DPMatrixFactorizationFedAvg(mechanism={self.config.mechanism!r}, "
            f"rounds={self.config.rounds}, clients_per_round={self.config.clients_per_round}, "
            f"cohorts={self.config.num_cohorts}, clipping={self.config.clipping!r})"
        )

    def summary(self) -> None:
        """Log the DP configuration and privacy ledger (never the noise seed)."""
        p, cfg = self.privacy, self.config
        log(INFO, "\t├──> DP matrix-factorization settings:")
        log(INFO, "\t│\t├── mechanism: %s (bands=%s, noise-mode=%s)", cfg.mechanism,
            cfg.factorization_bands, cfg.noise_mode)
        log(INFO, "\t│\t├── rounds n=%d, cohorts b=%d, max participations k=%d, "
            "clients/round m=%d, expected clients N=%d", cfg.rounds, cfg.num_cohorts,
            cfg.max_participations, cfg.clients_per_round, cfg.num_clients)
        log(INFO, "\t│\t├── clipping: %s, clip norm %g", cfg.clipping, cfg.clip_norm)
        log(INFO, "\t│\t├── server optimizer: schedule=%s lr=%g..%g momentum=%g wd=%g",
            cfg.schedule, float(self.rates[0]), float(self.rates[-1]), cfg.server_momentum,
            cfg.server_weight_decay)
        if cfg.is_private:
            log(INFO, "\t│\t├── sensitivity %.6g (%s), noise multiplier z=%.6g, "
                "noise std z*clip/m=%.6g", p["sensitivity"],
                "exact" if p["sensitivity_exact"] else "upper bound", p["noise_multiplier"],
                p["noise_multiplier"] * cfg.clip_norm / cfg.clients_per_round)
            if p.get("clip_count_stddev") is not None:
                log(INFO, "\t│\t├── adaptive clipping: quantile %g, lr %g, count std %g",
                    cfg.clip_quantile, cfg.clip_lr, p["clip_count_stddev"])
            log(INFO, "\t│\t└── privacy: (epsilon=%.6g, delta=%g)-DP, rho=%.6g zCDP",
                p["epsilon"], p["delta"], p["rho"])
        else:
            log(INFO, "\t│\t└── privacy: NONE (non-private fedavg baseline)")
        super().summary()

    # ------------------------------------------------------------------ model state
    def _set_global(self, arrays: ArrayRecord) -> None:
        """Adopt ``arrays`` as ``theta_{t-1}`` (unless it is the model this strategy emitted)."""
        if arrays is self._last_emitted and self._theta is not None:
            return
        layout = Layout.from_record(arrays)
        if self._layout is not None and layout.describe() != self._layout.describe():
            raise ValueError("arrays: the model layout changed between rounds")
        self._layout = layout
        theta = np.empty(layout.num_params, dtype=layout.work_dtype)
        for e in layout.float_entries:
            theta[e.offset : e.offset + e.size] = array_to_numpy(arrays[e.key]).reshape(-1)
        if not np.all(np.isfinite(theta)):
            raise ValueError("arrays: the global model contains NaN/Inf")
        self._theta = theta
        self._nonfloat = {e.key: arrays[e.key] for e in layout.entries if not e.is_float}
        self._last_emitted = arrays

    def _emit(self) -> ArrayRecord:
        """The current global model as an ``ArrayRecord`` (original keys, dtypes, shapes)."""
        assert self._layout is not None and self._theta is not None
        theta = self._theta
        out: dict[str, Array] = {}
        for e in self._layout.entries:
            if e.is_float:
                piece = theta[e.offset : e.offset + e.size].reshape(e.shape)
                out[e.key] = array_from_numpy(piece.astype(e.dtype, copy=False))
            else:
                out[e.key] = self._nonfloat[e.key]
        record = ArrayRecord(out)
        self._last_emitted = record
        return record

    # ------------------------------------------------------------------ training round
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample ``m`` eligible nodes of cohort ``(t-1) mod b``; ``[]`` if the round is skipped."""
        cfg = self.config
        if server_round != self._round_done + 1:
            raise ValueError(
                f"server_round must be {self._round_done + 1} (rounds run in order), "
                f"got {server_round}"
            )
        if server_round > cfg.rounds:
            raise ValueError(
                f"server_round {server_round} exceeds rounds={cfg.rounds} of the factorization"
            )
        self._set_global(arrays)
        picked = self._select_clients(server_round, grid)
        self._round_nodes = {node: cid for cid, node in picked.items()}
        if not picked:
            return []
        self.cohorts.record(picked, server_round)
        self._sampled[server_round] = sorted(picked)
        nodes = sorted(picked.values())
        train_config = ConfigRecord(dict(config))
        train_config["server-round"] = server_round
        if cfg.clipping == "client" and cfg.is_private:
            train_config["clip-norm"] = float(self._clip)
        log(INFO, "configure_train: round %d, cohort %d, sampled %d nodes", server_round,
            self.cohorts.cohort_for_round(server_round), len(nodes))
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def _select_clients(self, server_round: int, grid: Grid) -> dict[str, int]:
        cfg = self.config
        picked, reason = select_cohort(
            grid=grid, directory=self.directory, cohorts=self.cohorts, rng=self._rng,
            server_round=server_round, clients_per_round=cfg.clients_per_round,
            num_clients=cfg.num_clients, timeout=cfg.participation_timeout,
            poll_interval=self.poll_interval,
        )
        if reason is not None:
            log(WARNING, "Round %d: applying a noise-only update (stream index stays aligned)",
                server_round)
            self._skipped[server_round] = reason
        return picked

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average over the fixed ``m``, add round ``t``'s correlated noise, step."""
        cfg = self.config
        if server_round != self._round_done + 1:
            raise ValueError(
                f"server_round must be {self._round_done + 1} (rounds run in order), "
                f"got {server_round}"
            )
        if self._theta is None or self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        layout, t = self._layout, server_round
        d = layout.num_params
        if self._scratch is None or self._scratch.size != d or (
            self._scratch.dtype != layout.work_dtype
        ):
            self._scratch = np.empty(d, dtype=layout.work_dtype)
        scratch = self._scratch
        theta_np = self._theta
        # Elementwise work in single-threaded NumPy: multi-threaded torch/BLAS kernels were up
        # to 10x slower on a loaded 2-core server (thread oversubscription).
        if self._acc is None or self._acc.size != d or self._acc.dtype != theta_np.dtype:
            self._acc = np.zeros(d, dtype=theta_np.dtype)
        acc = self._acc
        acc.fill(0.0)
        expected = set(self._round_nodes) if t in self._sampled else set()
        seen: set[int] = set()
        clip = self._clip
        private = cfg.is_private
        n_fail = n_reject = n_clipped = n_unclipped = 0
        norms: list[float] = []
        accepted: list[Message] = []
        for msg in replies:
            if msg.has_error():
                n_fail += 1
                log(INFO, "aggregate_train: node %d replied with an error: %s",
                    msg.metadata.src_node_id, msg.error.reason)
                continue
            src = int(msg.metadata.src_node_id)
            reason = self._reply_problem(msg, src, expected, seen)
            record = None
            if reason is None:
                record = self._reply_arrays(msg)
                reason = "no ArrayRecord" if record is None else layout.check(record)
            if reason is None:
                assert record is not None
                try:
                    for e in layout.float_entries:
                        src_arr = array_to_numpy(record[e.key]).reshape(-1)
                        np.subtract(src_arr, theta_np[e.offset : e.offset + e.size],
                                    out=scratch[e.offset : e.offset + e.size],
                                    casting="same_kind")
                except (ValueError, TypeError) as err:
                    reason = f"unreadable arrays ({err})"
            norm = math.nan
            if reason is None:
                with np.errstate(over="ignore", invalid="ignore"):
                    norm = math.sqrt(_sq_norm(scratch))
                if not math.isfinite(norm):
                    reason = "non-finite values"
            if (reason is None and private and cfg.clipping == "client"
                    and norm > clip * (1.0 + _CLIENT_CLIP_TOL)):
                reason = f"update norm {norm:.6g} exceeds the client clip {clip:.6g}"
            seen.add(src)
            if reason is not None:
                n_reject += 1
                log(WARNING, "aggregate_train: rejected reply of node %d: %s", src, reason)
                continue
            accepted.append(msg)
            reported = self._reported(msg)
            pre_clip = norm
            if private and cfg.clipping == "client":
                pre_clip = float(reported.get("delta-norm", norm))
                n_clipped += int(bool(reported.get("clipped", pre_clip > clip)))
            elif private:
                n_clipped += int(norm > clip)
            n_unclipped += int(pre_clip <= clip)
            norms.append(pre_clip)
            scale = min(1.0, clip / norm) if (private and norm > 0) else 1.0
            if scale != 1.0:
                np.multiply(scratch, scale, out=scratch)
            np.add(acc, scratch, out=acc)

        m = cfg.clients_per_round
        np.multiply(acc, 1.0 / m, out=acc)  # fixed denominator
        noise_std = 0.0
        if self._noise is not None:
            if self._noise.round != t - 1:
                raise RuntimeError(
                    f"noise stream index {self._noise.round} != round {t} - 1; refusing to "
                    "reuse or skip a noise draw"
                )
            scale = clip if cfg.clipping == "adaptive" else 1.0
            like = (torch.from_numpy(acc) if self.device.type == "cpu"
                    else torch.empty(d, dtype=torch.float32, device=self.device))
            w = self._noise.next(like).detach().cpu().numpy()
            if scale != 1.0:
                w = w * scale
            np.add(acc, w, out=acc, casting="same_kind")
            noise_std = float(self._noise.std) * scale
        # Server optimizer: m_t = beta m_{t-1} + u_t ; theta_t = (1-wd) theta_{t-1} + eta_t m_t
        beta, wd, eta = cfg.server_momentum, cfg.server_weight_decay, float(self.rates[t - 1])
        if beta > 0:
            if self._momentum is None:
                self._momentum = np.zeros_like(acc)
            np.multiply(self._momentum, beta, out=self._momentum)
            np.add(self._momentum, acc, out=self._momentum)
            step = self._momentum
        else:
            step = acc
        if wd > 0:
            np.multiply(self._theta, 1.0 - wd, out=self._theta)
        np.multiply(step, eta, out=acc)  # acc is scratch from here on
        np.add(self._theta, acc, out=self._theta)

        # Adaptive clipping (Andrew et al. 2021): move the clip toward the gamma-quantile.
        clip_used = clip
        if private and cfg.clipping == "adaptive" and expected:
            sigma_b = float(self.privacy["clip_count_stddev"])
            noisy = (n_unclipped + float(self._clip_rng.normal(0.0, sigma_b))) / m
            self._clip = float(clip * math.exp(-cfg.clip_lr * (noisy - cfg.clip_quantile)))

        self._round_done = t
        metrics = self._round_metrics(
            t, accepted=accepted, norms=norms, n_fail=n_fail, n_reject=n_reject,
            n_clipped=n_clipped, clip_used=clip_used, noise_std=noise_std,
        )
        self.last_train_metrics = dict(metrics)
        self.history["train"][t] = dict(metrics)
        arrays = self._emit()
        self._phase = "trained"
        self.save()
        log(INFO, "aggregate_train: round %d, %d accepted, %d rejected, %d failures, "
            "noise std %.4g, epsilon spent %.4g", t, len(accepted), n_reject, n_fail,
            noise_std, metrics["epsilon_spent"])
        return arrays, metrics

    def _reply_problem(self, msg: Message, src: int, expected: set[int],
                       seen: set[int]) -> str | None:
        if src not in expected:
            return "node was not sampled for this round"
        if src in seen:
            return "duplicate reply"
        if not msg.has_content():
            return "empty reply"
        return None

    def _reply_arrays(self, msg: Message) -> ArrayRecord | None:
        records = msg.content.array_records
        if self.arrayrecord_key in records:
            return records[self.arrayrecord_key]
        if len(records) == 1:
            return next(iter(records.values()))
        return None

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
                       n_fail: int, n_reject: int, n_clipped: int, clip_used: float,
                       noise_std: float) -> MetricRecord:
        metrics: dict[str, Any] = self._client_metrics(accepted)
        arr = np.asarray(norms, dtype=np.float64)
        metrics.update({
            "epsilon_spent": float(self.epsilon_spent(t)),
            "noise_std": float(noise_std),
            "clip_norm": float(clip_used),
            "next_clip_norm": float(self._clip),
            "num_accepted": len(accepted),
            "num_clipped": int(n_clipped),
            "num_rejected": int(n_reject),
            "num_failures": int(n_fail),
            "num_sampled": len(self._sampled.get(t, [])),
            "skipped": int(t in self._skipped),
            "server_lr": float(self.rates[t - 1]),
            "norm_mean": float(arr.mean()) if arr.size else 0.0,
            "norm_max": float(arr.max()) if arr.size else 0.0,
            "norm_median": float(np.median(arr)) if arr.size else 0.0,
        })
        return MetricRecord(metrics)

    # ------------------------------------------------------------------ privacy ledger
    def epsilon_spent(self, server_round: int) -> float:
        """Epsilon of the releases of rounds ``1..server_round`` (at the configured delta).

        Uses the sensitivity of the top-left ``t x t`` block of ``C`` (a lower-triangular
        ``C`` makes the first ``t`` outputs depend on the first ``t`` inputs only) with
        ``min(k, ceil(t / b))`` participations.  Falls back to the full-run epsilon (an upper
        bound) when the prefix can not be computed (e.g. very long horizons).
        """
        cfg = self.config
        if not cfg.is_private:
            return math.inf
        t = int(server_round)
        if t >= cfg.rounds or not math.isfinite(self.privacy["epsilon"]):
            return float(self.privacy["epsilon"])
        if t not in self._eps_cache:
            try:
                # the prefix is post-processing of the whole release: never above the total
                self._eps_cache[t] = min(self._prefix_epsilon(t), float(self.privacy["epsilon"]))
            except Exception as err:
                log(WARNING, "epsilon_spent: prefix accounting failed (%s); reporting the "
                    "full-run epsilon", err)
                self._eps_cache[t] = float(self.privacy["epsilon"])
        return self._eps_cache[t]

    def _prefix_epsilon(self, t: int) -> float:
        from fedmf import accounting
        from fedmf.participation import Participation
        from fedmf.sensitivity import sensitivity

        cfg = self.config
        if cfg.rounds > 4096:
            return float(self.privacy["epsilon"])
        if self._prefix_C is None:
            self._prefix_C = np.asarray(cfg.factorization().strategy_matrix(), dtype=np.float64)
        b = cfg.num_cohorts
        k_t = min(cfg.max_participations, math.ceil(t / b))
        part = Participation.cyclic(max_participations=k_t, min_sep=b)
        sens_t = float(sensitivity(participation=part, rounds=t, C=self._prefix_C[:t, :t]).value)
        sens_t = min(sens_t, float(self.privacy["sensitivity"]))
        z = float(self.privacy["noise_multiplier"])
        # One Gaussian (adaptive: GDP composition with the k_t count queries, again exactly a
        # Gaussian), so the closed form of Balle & Wang is exact -- and ~1000x faster than PLD.
        mu2 = (sens_t / z) ** 2
        if cfg.clipping == "adaptive":
            mu2 += k_t / float(self.privacy["clip_count_stddev"]) ** 2
        return float(accounting.analytic_gaussian_epsilon(
            noise_multiplier=1.0 / math.sqrt(mu2), sensitivity=1.0, delta=cfg.delta
        ))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Complete server state (contains the secret noise seed: keep private)."""
        return {
            "version": _CHECKPOINT_VERSION,
            "fingerprint": self.config.fingerprint(),
            "round": self._round_done,
            "phase": self._phase,
            "layout": None if self._layout is None else self._layout.describe(),
            "theta": None if self._theta is None else self._theta.copy(),
            "nonfloat": {k: array_to_numpy(v).copy() for k, v in self._nonfloat.items()},
            "momentum": None if self._momentum is None else self._momentum.copy(),
            "noise": None if self._noise is None else self._noise.state_dict(),
            "cohorts": self.cohorts.state_dict(),
            "sampled": {int(k): list(v) for k, v in self._sampled.items()},  # client ids
            "skipped": dict(self._skipped),
            "sampling_rng": self._rng.bit_generator.state,
            "clip_rng": self._clip_rng.bit_generator.state,
            "clip": self._clip,
            "history": self.history,
            "last_train_metrics": self.last_train_metrics,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the configuration must be the same)."""
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not supported")
        saved, current = state["fingerprint"], self.config.fingerprint()
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            raise ValueError(
                f"checkpoint_dir holds a run with a different configuration ({diff}); "
                "use another checkpoint_dir"
            )
        from fedmf.noise import CorrelatedNoise

        self._round_done = int(state["round"])
        self._phase = str(state["phase"])
        if state["theta"] is not None:
            desc = [(k, np.dtype(dt), tuple(sh), f) for k, dt, sh, f in state["layout"]]
            entries, offset = [], 0
            for key, dtype, shape, is_float in desc:
                size = math.prod(shape)
                entries.append(_Entry(key, dtype, shape, is_float, offset if is_float else -1,
                                      size))
                offset += size if is_float else 0
            self._layout = Layout(tuple(entries), offset)
            self._theta = np.array(state["theta"], copy=True)
            self._nonfloat = {k: array_from_numpy(np.asarray(v))
                              for k, v in state["nonfloat"].items()}
            self._last_emitted = None
        self._momentum = (None if state["momentum"] is None
                          else np.array(state["momentum"], copy=True))
        if state["noise"] is not None:
            self._noise = CorrelatedNoise.from_state_dict(state["noise"], spec=self._noise_spec,
                                                          device=self.device)
        self.cohorts.load_state_dict(state["cohorts"])
        self._sampled = {int(k): [str(c) for c in v] for k, v in state["sampled"].items()}
        self._round_nodes = {}
        self._skipped = dict(state["skipped"])
        self._rng.bit_generator.state = state["sampling_rng"]
        self._clip_rng.bit_generator.state = state["clip_rng"]
        self._clip = float(state["clip"])
        self.history = state["history"]
        self.last_train_metrics = dict(state["last_train_metrics"])

    def global_arrays(self) -> ArrayRecord | None:
        """The global model held by the strategy (``None`` before the first round)."""
        return None if self._theta is None else self._emit()

    def participation_report(self) -> dict[str, Any]:
        """The ``participation.json`` object: limits and every client's rounds."""
        cfg = self.config
        return self.cohorts.report(rounds=cfg.rounds, clients_per_round=cfg.clients_per_round)
