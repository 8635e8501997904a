"""The vectorized cohort backend: one round's clients train together as one batched computation.

DP-FL needs hundreds to thousands of clients per round (the noise on a round's mean has norm
about ``z clip sqrt(d) / m``), and simulating them one ClientApp call at a time is bound by
per-message overhead.  Here the same ServerApp and strategy run unchanged -- clipping, noise,
accounting, cohorts and checkpoints are those of every other backend -- against a Grid
(:class:`VectorizedGrid`) that answers a round's train messages together: the clients'
parameters are stacked and :func:`clients.train.train_cohort` runs their local training with
``torch.func.vmap``, in chunks, on ``--device``.  The reply to each node is the Message the
ClientApp would have sent (the same ArrayRecord and MetricRecord: ``num-examples``,
``train-loss``, ``delta-norm``, ``clipped``): the training is the one module
:mod:`clients.train` defines for both, with the same batch order from the same seeds and the
same client-side clipping.

Client data stays put: every partition's training tensors are loaded once (``clients.task``),
padded into one tensor and kept on the device; a round gathers its clients' rows.  Supported
models: the GroupNorm CNN and linear heads over frozen features
(others raise an error naming the model); fedmf's own local training only (a custom ClientApp
needs the ray or inprocess backend).  ``--shards N`` splits the cohort over N Ray actors,
one device each (:mod:`.sharded`); the grid and its replies stay here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from clients.client_app import request_arrays, request_config
from clients.config import ClientConfig, client_config
from clients.data import prefetch_features
from clients.task import cached_model, client_data, load_state
from clients.train import (
    CohortOutput,
    client_seed,
    clip_deltas,
    delta_norms,
    evaluate_model,
    float_keys,
    stack_data,
    train_cohort,
    vectorizable,
)
from strategies.arrays import array_from_numpy
from strategies.participation import CLIENT_ID_KEY, IDENTITY_MESSAGE_TYPE

from . import BackendOptions, task_identity
from .inprocess import LocalGrid

__all__ = ["CohortTrainer", "VectorizedGrid", "default_device", "run", "run_on", "serve"]

_SERVER_NODE_ID = 0


def default_device() -> str:
    """CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class CohortTrainer:
    """The local training of cohorts drawn from a fixed set of partitions, on one device: what
    :class:`VectorizedGrid` runs in this process for every partition, and each shard actor of
    :class:`~simulations.backends.sharded.ShardedGrid` for its own partitions.

    The partitions' training tensors are loaded once (on the first :meth:`load` or
    :meth:`train`), padded into one tensor on ``device`` (default: :func:`default_device`,
    resolved where the trainer lives).
    """

    def __init__(self, *, config: ClientConfig, device: str | torch.device | None = None,
                 chunk_size: int = 512, partitions: Sequence[int] | None = None) -> None:
        self.config = config
        self.device = torch.device(device or default_device())
        self.chunk_size = int(chunk_size)
        self.partitions = (list(range(config.num_clients)) if partitions is None
                           else [int(pid) for pid in partitions])
        self._rows = {pid: row for row, pid in enumerate(self.partitions)}
        self._model = copy.deepcopy(cached_model(config))
        self._store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def load(self) -> int:
        """Load the partitions' training tensors now; their number of examples."""
        return int(self.data()[2].sum())

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, lengths)`` of the partitions' training splits (row ``i``:
        ``partitions[i]``), loaded once."""
        if self._store is None:
            if not self.partitions:
                raise ValueError("a cohort trainer needs at least one partition")
            prefetch_features(self.config.data_config(), self.config.representation(),
                              self.partitions)
            datas = [client_data(self.config, pid).train for pid in self.partitions]
            self._store = stack_data(datas, device=self.device)
        return self._store

    def train(self, state: Mapping[str, torch.Tensor], partitions: Sequence[int], *,
              server_round: int, to_cpu: bool = False) -> CohortOutput:
        """Train ``partitions`` (of :attr:`partitions`) from ``state`` for ``server_round``
        with :func:`clients.train.train_cohort` and the ClientApp's seeds; ``to_cpu``: the
        output's states on the CPU (to send them elsewhere)."""
        cfg = self.config
        x_all, y_all, n_all = self.data()
        rows = torch.tensor([self._rows[int(pid)] for pid in partitions], dtype=torch.long)
        self._model.load_state_dict(dict(state), strict=True)
        out = train_cohort(
            self._model, x_all, y_all, n_all, clients=rows,
            seeds=[client_seed(cfg.seed, int(pid), server_round) for pid in partitions],
            epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.client_lr,
            momentum=cfg.client_momentum, chunk_size=self.chunk_size)
        if to_cpu:
            out.state = {k: v.detach().cpu() for k, v in out.state.items()}
        return out


class VectorizedGrid(LocalGrid):
    """A Grid whose ``num_nodes`` simulated clients (node ``i`` = partition ``i - 1``) train
    together: all train messages pulled at once that carry the same model are one cohort."""

    def __init__(self, *, config: ClientConfig, num_nodes: int, device: str | torch.device,
                 chunk_size: int = 512, run_id: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"num-supernodes must be >= 1, got {num_nodes}")
        model = copy.deepcopy(cached_model(config))
        if not vectorizable(model):
            raise ValueError(
                f"model: {config.model!r} can not run on the vectorized backend (supported: the "
                "cnn and linear heads over frozen features); use --backend ray or inprocess")
        super().__init__(node_ids=range(1, num_nodes + 1), run_id=run_id)
        self.config = config
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self._model = model
        # every partition's training examples, padded, on the device (loaded on first use)
        self._trainer: CohortTrainer | None = None
        # audit canaries (simulations.audit): partition -> unit direction over float tensors
        self._canaries: dict[int, np.ndarray] = {}
        self._canary_layout: list[tuple[str, tuple[int, ...]]] = []
        self._canary_norm = 0.0

    def template_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict (its keys, shapes and dtypes; weights arbitrary)."""
        return self._model.state_dict()

    def set_canaries(self, directions: Mapping[int, np.ndarray], *,
                     layout: list[tuple[str, tuple[int, ...]]], norm: float) -> None:
        """Make partitions canary clients (``simulations.audit``): their reply to a train
        message is the model plus ``clip * direction`` (``norm`` where the message carries no
        clip), split over the float tensors of ``layout``, instead of local training."""
        if not norm > 0:
            raise ValueError(f"clip-norm must be > 0 for canaries, got {norm}")
        self._canaries = dict(directions)
        self._canary_layout = list(layout)
        self._canary_norm = float(norm)

    # ------------------------------------------------------------------ Grid
    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Answer the queued messages; train messages with the same model train together."""
        messages = [self._pending.pop(mid) for mid in message_ids if mid in self._pending]
        replies: list[Message] = []
        cohorts: dict[tuple[int, int, float], list[Message]] = {}
        for msg in messages:
            kind = msg.metadata.message_type
            if kind == MessageType.TRAIN:
                conf = request_config(msg)
                key = (id(msg.content), int(conf.get("server-round", 0)),
                       float(conf.get("clip-norm", 0.0) or 0.0))
                cohorts.setdefault(key, []).append(msg)
            elif kind == IDENTITY_MESSAGE_TYPE:
                replies.append(self._identity(msg))
            elif kind == MessageType.EVALUATE:
                replies.append(self._guarded(self._evaluate, msg))
            else:
                replies.append(_error(msg, f"message type {kind!r} is not simulated here"))
        for (_, server_round, clip), group in cohorts.items():
            replies += self._train_cohort(group, server_round=server_round, clip=clip)
        return replies

    def _answer(self, msg: Message) -> Message | None:  # pragma: no cover - batched above
        return self.pull_messages(self.push_messages([msg]))[0]

    # ------------------------------------------------------------------ handlers
    def _partition(self, msg: Message) -> int:
        pid = int(msg.metadata.dst_node_id) - 1
        if not 0 <= pid < self.config.num_clients:
            raise ValueError(f"partition-id must be in [0, num-clients="
                             f"{self.config.num_clients}), got {pid}")
        return pid

    def _identity(self, msg: Message) -> Message:
        pid = int(msg.metadata.dst_node_id) - 1
        return Message(RecordDict({"identity": ConfigRecord({CLIENT_ID_KEY: str(pid)})}),
                       reply_to=msg)

    def _train_cohort(self, group: list[Message], *, server_round: int,
                      clip: float) -> list[Message]:
        replies: list[Message] = []
        ready: list[tuple[Message, int]] = []
        for msg in group:
            try:
                ready.append((msg, self._partition(msg)))
            except Exception as err:  # like the ClientApp: an error reply, never a crash
                replies.append(_error(msg, f"{type(err).__name__}: {err}"))
        canaries = [(msg, pid) for msg, pid in ready if pid in self._canaries]
        if canaries:
            ready = [(msg, pid) for msg, pid in ready if pid not in self._canaries]
            replies += [self._canary_reply(msg, pid, clip) for msg, pid in canaries]
        if not ready:
            return replies
        old = request_arrays(ready[0][0]).to_torch_state_dict()
        out = self._train([pid for _, pid in ready], state=old, server_round=server_round)
        return replies + self._train_replies(ready, old=old, out=out, clip=clip)

    def _train(self, partitions: list[int], *, state: dict[str, torch.Tensor],
               server_round: int) -> CohortOutput:
        """The cohort's local training from ``state``: one :class:`CohortTrainer` over every
        partition, in this process."""
        if self._trainer is None:
            self._trainer = CohortTrainer(config=self.config, device=self.device,
                                          chunk_size=self.chunk_size)
        return self._trainer.train(state, partitions, server_round=server_round)

    def _train_replies(self, ready: list[tuple[Message, int]], *,
                       old: Mapping[str, torch.Tensor], out: CohortOutput,
                       clip: float) -> list[Message]:
        """The ClientApp's replies to a trained cohort (``out``'s row ``c``: ``ready[c]``)."""
        replies: list[Message] = []
        # the ClientApp's checks and client-side clipping, for the whole cohort at once
        if clip > 0:
            state, norms, clipped = clip_deltas(old, out.state, clip)
        else:
            state, norms = out.state, delta_norms(old, out.state)
            clipped = torch.zeros(len(ready), dtype=torch.bool)
        finite = torch.isfinite(norms)  # a non-finite value makes its client's norm non-finite
        for c in torch.nonzero(~finite).flatten().tolist():  # overflow only: check exactly
            finite[c] = all(bool(torch.isfinite(out.state[k][c]).all())
                            for k in float_keys(out.state))
        host = {k: v.detach().cpu().numpy() for k, v in state.items()}
        norms_l, clipped_l, finite_l = norms.tolist(), clipped.tolist(), finite.tolist()
        for c, (msg, _) in enumerate(ready):
            stats, error = out.stats[c], out.errors[c]
            if error is None and not finite_l[c]:
                error = "FloatingPointError: local training produced non-finite values"
            if error is not None or stats is None:
                replies.append(_error(msg, str(error)))
                continue
            arrays = ArrayRecord({k: array_from_numpy(v[c]) for k, v in host.items()})
            metrics = MetricRecord({"num-examples": int(stats.examples),
                                    "train-loss": float(stats.loss),
                                    "delta-norm": float(norms_l[c]),
                                    "clipped": int(clipped_l[c])})
            replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}),
                                   reply_to=msg))
        return replies

    def _canary_reply(self, msg: Message, pid: int, clip: float) -> Message:
        norm = clip if clip > 0 else self._canary_norm
        state = request_arrays(msg).to_torch_state_dict()
        direction, offset = self._canaries[pid], 0
        out: dict[str, Any] = {k: v.detach().cpu().numpy() for k, v in state.items()}
        for key, shape in self._canary_layout:
            size = int(np.prod(shape))
            step = direction[offset:offset + size].reshape(shape).astype(np.float64) * norm
            out[key] = (out[key].astype(np.float64) + step).astype(out[key].dtype)
            offset += size
        arrays = ArrayRecord({k: array_from_numpy(np.ascontiguousarray(v))
                              for k, v in out.items()})
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0, "delta-norm": norm,
                                "clipped": 0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    def _evaluate(self, msg: Message) -> Message:
        pid = self._partition(msg)
        data = client_data(self.config, pid)
        split = data.val if len(data.val) else data.train
        model = self._model
        load_state(model, request_arrays(msg))
        loss, acc = evaluate_model(model, split, device=self.device,
                                   batch_size=max(256, self.config.batch_size))
        metrics = MetricRecord({"num-examples": len(split), "eval-loss": float(loss),
                                "eval-acc": float(acc)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @staticmethod
    def _guarded(fn: Any, msg: Message) -> Message:
        try:
            return fn(msg)
        except Exception as err:
            return _error(msg, f"{type(err).__name__}: {err}")


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)


def run(*, server_app: Any, client_app: Any, num_supernodes: int,
        run_config: Mapping[str, Any], options: BackendOptions | None = None,
        run_id: int = 1) -> None:
    """Run ``server_app`` against ``num_supernodes`` clients trained by :class:`VectorizedGrid`
    (``client_app`` is not called: the training is ``clients.train``'s); with
    ``options.shards > 1`` by :class:`~simulations.backends.sharded.ShardedGrid`."""
    opts = options or BackendOptions()
    if opts.shards > 1:
        from . import sharded  # imports Ray

        sharded.run(server_app=server_app, num_supernodes=num_supernodes,
                    run_config=run_config, options=opts, run_id=run_id)
        return
    grid = VectorizedGrid(config=client_config(run_config), num_nodes=num_supernodes,
                          device=opts.device or default_device(), chunk_size=opts.chunk_size,
                          run_id=run_id)
    serve(grid, server_app=server_app, run_config=run_config, run_id=run_id)


def run_on(grid: VectorizedGrid) -> Any:
    """A backend (see :func:`simulations.backends.load_backend`) serving ``server_app`` with
    the prepared ``grid`` (the audit's canary grid) instead of a new one."""
    def backend(*, server_app: Any, client_app: Any, num_supernodes: int,
                run_config: Mapping[str, Any], options: BackendOptions | None = None,
                run_id: int = 1) -> None:
        if num_supernodes != len(grid.get_node_ids()):
            raise ValueError(f"num-supernodes={num_supernodes} differs from the grid's "
                             f"{len(grid.get_node_ids())} nodes")
        serve(grid, server_app=server_app, run_config=run_config, run_id=run_id)
    return backend


def serve(grid: VectorizedGrid, *, server_app: Any, run_config: Mapping[str, Any],
           run_id: int) -> None:
    """Run ``server_app`` (with ``run_config``) against ``grid`` in this thread."""
    context = Context(run_id=run_id, node_id=_SERVER_NODE_ID, node_config={},
                      state=RecordDict(), run_config=dict(run_config))
    with task_identity(run_id=run_id, node_id=_SERVER_NODE_ID):
        server_app(grid, context)
