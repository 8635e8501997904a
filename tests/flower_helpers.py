"""Helpers to drive Flower (1.42, Message API) handlers directly in unit tests.

Flower stamps an *instruction* ``Message`` with the identity of the running task
(``flwr.supercore.task_identity.TaskIdentity``: run id, node id, task id), which is only
set inside a real run; constructing one outside raises ``RuntimeError``. ``make_message``
sets a throw-away identity just for the construction and restores the previous one.
Reply messages (``Message(content, reply_to=msg)``) take their metadata from the request
and need no identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict

from simulations.backends import task_identity as _task_identity
from simulations.backends.inprocess import LocalGrid

TEST_RUN_ID = 1
SERVER_NODE_ID = 0


@contextmanager
def task_identity(*, run_id: int = TEST_RUN_ID, node_id: int = SERVER_NODE_ID,
                  task_id: int = 1) -> Iterator[None]:
    """Flower's (internal) task identity for the block (``simulations.backends``)."""
    with _task_identity(run_id=run_id, node_id=node_id, task_id=task_id):
        yield


def make_message(content: RecordDict, message_type: str, *, dst_node_id: int = 1,
                 group_id: str = "1", run_id: int = TEST_RUN_ID) -> Message:
    """An instruction message (as a ServerApp would send) built outside a Flower run.

    ``message_type`` is e.g. ``flwr.app.MessageType.TRAIN`` ("train") or "evaluate".
    """
    with task_identity(run_id=run_id):
        return Message(content, dst_node_id, message_type, group_id=group_id)


def make_reply(request: Message, content: RecordDict | None = None, *,
               error: Any = None) -> Message:
    """A reply to ``request`` carrying ``content`` or an ``flwr.app.Error``."""
    if error is not None:
        return Message(error, reply_to=request)
    return Message(content if content is not None else RecordDict(), reply_to=request)


def make_context(run_config: Mapping[str, Any], *, partition_id: int = 0,
                 num_partitions: int = 1, node_id: int = 1,
                 run_id: int = TEST_RUN_ID) -> Context:
    """A ClientApp ``Context`` like the simulation engine builds for one virtual client."""
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(run_config),
    )


# ---------------------------------------------------------------------------------------------
# Server-side helpers (strategies): replies built from a node id, and an in-process Grid.
# ---------------------------------------------------------------------------------------------
def as_array_record(arrays: Mapping[str, Any]) -> Any:
    """``ArrayRecord`` from a dict of NumPy arrays, torch tensors or Flower ``Array``s."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    out = {}
    for key, value in arrays.items():
        if isinstance(value, Array):
            out[key] = value
        elif isinstance(value, np.ndarray | np.generic):
            out[key] = Array(np.asarray(value))
        else:  # torch tensor
            out[key] = Array(value)
    return ArrayRecord(out)


def make_train_reply(node_id: int, arrays: Any, metrics: Mapping[str, Any] | None = None, *,
                     run_id: int = TEST_RUN_ID, group_id: str = "1") -> Message:
    """A train reply from ``node_id`` carrying ``arrays`` (ArrayRecord or state dict)
    under "arrays" and ``metrics`` (default ``{"num-examples": 1}``) under "metrics"."""
    from flwr.app import ArrayRecord, MessageType, MetricRecord

    record = arrays if isinstance(arrays, ArrayRecord) else as_array_record(arrays)
    content = RecordDict({
        "arrays": record,
        "metrics": MetricRecord(dict(metrics) if metrics is not None else {"num-examples": 1}),
    })
    request = make_message(RecordDict(), MessageType.TRAIN, dst_node_id=node_id,
                           group_id=group_id, run_id=run_id)
    return make_reply(request, content)


def make_error_reply(node_id: int, *, reason: str = "client failed", code: int = 0,
                     run_id: int = TEST_RUN_ID) -> Message:
    """A failed train reply (``msg.has_error()``) from ``node_id``."""
    from flwr.app import Error, MessageType

    request = make_message(RecordDict(), MessageType.TRAIN, dst_node_id=node_id, run_id=run_id)
    return make_reply(request, error=Error(code=code, reason=reason))


class InProcessGrid(LocalGrid):
    """A scripted ``flwr.serverapp.Grid`` that answers messages by calling a Python function.

    ``handler(node_id, message) -> RecordDict | None`` runs for every message; returning
    ``None`` drops the reply (like a timeout) and raising produces an error reply.
    ``connected`` (a mutable list) is what ``get_node_ids`` returns.  ``sent`` records
    ``(message_type, server-round or group id, node_id)`` for every message. The queue
    plumbing is the library's (:class:`simulations.backends.inprocess.LocalGrid`).
    """

    def __init__(self, handler: Any, node_ids: list[int], *, run_id: int = TEST_RUN_ID,
                 identities: Mapping[int, str] | None = None) -> None:
        super().__init__(node_ids=node_ids, run_id=run_id)
        self.handler = handler
        self.sent: list[tuple[str, Any, int]] = []
        #: node id -> client id answered to identity queries (default: ``str(node id)``;
        #: ``None`` makes a node anonymous)
        self.identities: dict[int, str | None] = dict(identities or {})

    def _answer(self, msg: Message) -> Message | None:
        from flwr.app import ConfigRecord, Error

        from strategies.participation import CLIENT_ID_KEY, IDENTITY_MESSAGE_TYPE

        node = int(msg.metadata.dst_node_id)
        config = next(iter(msg.content.config_records.values()), {})
        self.sent.append((msg.metadata.message_type,
                          config.get("server-round", msg.metadata.group_id), node))
        if msg.metadata.message_type == IDENTITY_MESSAGE_TYPE:
            cid = self.identities.get(node, str(node))
            if cid is None:
                return Message(Error(code=0, reason="no identity"), reply_to=msg)
            return Message(RecordDict({"identity": ConfigRecord({CLIENT_ID_KEY: cid})}),
                           reply_to=msg)
        try:
            content = self.handler(node, msg)
        except Exception as err:
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
        if content is None:
            return None
        return Message(content, reply_to=msg)
