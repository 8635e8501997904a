"""Flower ``ClientApp`` of fedmf (Message API).

train request: ``ArrayRecord`` "arrays" (global model) + ``ConfigRecord`` "config" with
``server-round`` and, with client-side clipping, ``clip-norm``.  Local training follows the
node's run config (``clients.config.ClientConfig``, read once per process).
train reply: "arrays" = the updated (optionally clipped) model; "metrics" =
``num-examples``, ``train-loss``, ``delta-norm`` (pre-clip), ``clipped`` (0/1).
evaluate reply: "metrics" = ``num-examples``, ``eval-loss``, ``eval-acc`` on the client's
validation split (its training split when the validation split is empty).
identity query (``query.identity``): "identity" = ``ConfigRecord({"client-id": ...})``, the
node's stable client id (``strategies.participation.identity_reply``).

Any exception is logged and returned as an error reply (``Message(Error(...))``,
``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``), which the server sees as ``msg.has_error()``;
a failed client never sends an empty or partial update.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from logging import ERROR, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from strategies.participation import IDENTITY_ACTION, identity_reply

from .config import ClientConfig, client_config
from .data import warn_if_partitions_mismatch
from .task import cached_model, client_data, configure_threads, load_state, select_device
from .train import (
    check_finite,
    client_seed,
    clip_update,
    clone_state,
    delta_norm,
    evaluate_model,
    train_local,
)

app = ClientApp()


def error_reply(msg: Message, ex: BaseException) -> Message:
    """An error reply for ``msg`` in Flower's format ``"<class ...>:<'message'>"``."""
    reason = f"{type(ex)}:<'{ex}'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)


def _guarded(fn: Callable[[Message, Context], Message], msg: Message,
             context: Context) -> Message:
    try:
        return fn(msg, context)
    except Exception as ex:  # reported to the server, never swallowed
        log(ERROR, "fedmf client (node %s) failed: %s\n%s", context.node_id, ex,
            traceback.format_exc())
        return error_reply(msg, ex)


def _partition_id(context: Context, cfg: ClientConfig) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("partition-id missing from node_config")
    warn_if_partitions_mismatch(context.node_config.get("num-partitions"), cfg.num_clients)  # type: ignore[arg-type]
    pid = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    if not 0 <= pid < cfg.num_clients:
        raise ValueError(
            f"partition-id must be in [0, num-clients={cfg.num_clients}), got {pid}"
        )
    return pid


def request_config(msg: Message) -> dict[str, Any]:
    """The request's ``config`` ConfigRecord as a dict (empty if it has none)."""
    rec = msg.content.get("config")
    return dict(rec) if isinstance(rec, ConfigRecord) else {}


def request_arrays(msg: Message) -> ArrayRecord:
    """The request's model (``arrays``), or a ``ValueError`` naming it."""
    rec = msg.content.get("arrays")
    if not isinstance(rec, ArrayRecord):
        raise ValueError("arrays: the request carries no ArrayRecord 'arrays'")
    return rec


def _train(msg: Message, context: Context) -> Message:
    cfg = client_config(context.run_config)
    pid = _partition_id(context, cfg)
    conf = request_config(msg)
    server_round = int(conf.get("server-round", 0))
    clip = float(conf.get("clip-norm", 0.0) or 0.0)  # sent with client-side clipping only
    device = select_device()
    configure_threads(device)

    data = client_data(cfg, pid)
    model = cached_model(cfg)
    load_state(model, request_arrays(msg))
    old = clone_state(model)
    stats = train_local(model, data.train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                        lr=cfg.client_lr, momentum=cfg.client_momentum, device=device,
                        seed=client_seed(cfg.seed, pid, server_round))
    new = clone_state(model)
    check_finite(new)
    if clip > 0:
        new, norm, clipped = clip_update(old, new, clip)
    else:
        norm, clipped = delta_norm(old, new), False
    metrics = MetricRecord({
        "num-examples": int(stats.examples),
        "train-loss": float(stats.loss),
        "delta-norm": float(norm),
        "clipped": int(clipped),
    })
    content = RecordDict({"arrays": ArrayRecord(new), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    cfg = client_config(context.run_config)
    pid = _partition_id(context, cfg)
    device = select_device()
    configure_threads(device)
    data = client_data(cfg, pid)
    split = data.val
    if len(split) == 0:
        log(WARNING, "fedmf client %d: empty validation split, evaluating on train", pid)
        split = data.train
    model = cached_model(cfg)
    load_state(model, request_arrays(msg))
    loss, acc = evaluate_model(model, split, device=device,
                               batch_size=max(256, cfg.batch_size))
    metrics = MetricRecord({"num-examples": len(split), "eval-loss": float(loss),
                            "eval-acc": float(acc)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model locally and reply with the updated model and metrics."""
    return _guarded(_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local validation split."""
    return _guarded(_evaluate, msg, context)


@app.query(IDENTITY_ACTION)
def identity(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (its stable id, see
    ``strategies.participation``): node-config ``client-id``, else ``partition-id``."""
    return identity_reply(msg, context)
