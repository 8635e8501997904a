"""A single-process backend: the same ServerApp and ClientApp, without Ray.

Flower's simulation engine runs every virtual client in a Ray actor, which costs tens of
milliseconds per message and seconds to start. For small models (a linear head over cached
embeddings, a tiny CNN) that overhead dominates a run, so sweeps of many seeds and
mechanisms are run here with this backend: the ServerApp's strategy sends real Flower
``Message`` objects through a :class:`flwr.serverapp.Grid`, and each one is answered by
calling the real ClientApp with that node's ``Context``, sequentially, in this process.
The strategy, the client code, the messages and the privacy accounting are identical to a
Ray or deployment run; only the transport differs. Use Ray (the default) for models whose
local training benefits from parallel clients or GPUs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import BackendOptions, task_identity

__all__ = ["InProcessGrid", "LocalGrid", "run"]

_SERVER_NODE_ID = 0


class LocalGrid(Grid):
    """A Grid answered in this process: the queue plumbing shared by :class:`InProcessGrid`
    and the test suite's scripted grid. Subclasses implement :meth:`_answer` (a reply, or
    ``None`` to drop it like a timeout) and may override :meth:`get_node_ids`."""

    def __init__(self, *, node_ids: Iterable[int], run_id: int = 1) -> None:
        from flwr.supercore.run import Run

        self.connected = list(node_ids)
        self._run = Run.create_empty(run_id=run_id)
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count()

    def set_run(self, run: Any) -> None:
        """Set the run (called by Flower's runtime; kept for interface compatibility)."""
        self._run = run

    @property
    def run(self) -> Any:
        """The current run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """An instruction message for ``dst_node_id`` (stamped with this run's identity)."""
        with task_identity(run_id=self._run.run_id, node_id=_SERVER_NODE_ID):
            return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        return list(self.connected)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue messages; they are answered when pulled."""
        ids = []
        for msg in messages:
            mid = str(next(self._ids))
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Answer the queued messages (dropped replies are left out)."""
        replies = (self._answer(self._pending.pop(mid)) for mid in message_ids
                   if mid in self._pending)
        return [r for r in replies if r is not None]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push and pull at once (``timeout`` is irrelevant in process)."""
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, msg: Message) -> Message | None:
        raise NotImplementedError


class InProcessGrid(LocalGrid):
    """A Grid whose nodes are ClientApp calls in this process.

    Node ``i`` (ids 1..N) gets ``node_config = {"partition-id": i-1, "num-partitions": N}``,
    like the simulation engine's virtual SuperNodes, and keeps its own ``Context.state``
    across rounds. A ClientApp that raises produces an error reply, as in Flower.
    """

    def __init__(self, *, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any],
                 run_id: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        super().__init__(node_ids=range(1, num_nodes + 1), run_id=run_id)
        self._client_app = client_app
        self._contexts = {
            node_id: Context(
                run_id=run_id, node_id=node_id,
                node_config={"partition-id": node_id - 1, "num-partitions": num_nodes},
                state=RecordDict(), run_config=dict(run_config),
            )
            for node_id in self.connected
        }

    def _answer(self, msg: Message) -> Message:
        node_id = int(msg.metadata.dst_node_id)
        context = self._contexts.get(node_id)
        if context is None:
            return Message(Error(code=0, reason=f"unknown node {node_id}"), reply_to=msg)
        try:
            return self._client_app(msg, context)
        except Exception as err:  # like Flower's runtime: an error reply, never a crash
            return Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


def run(*, server_app: ServerApp, client_app: ClientApp, num_supernodes: int,
        run_config: Mapping[str, Any], options: BackendOptions | None = None,
        run_id: int = 1) -> None:
    """Run ``server_app`` against ``num_supernodes`` in-process clients of ``client_app``
    (``options`` are Ray's; nothing applies here)."""
    grid = InProcessGrid(client_app=client_app, num_nodes=num_supernodes,
                         run_config=run_config, run_id=run_id)
    context = Context(run_id=run_id, node_id=_SERVER_NODE_ID, node_config={},
                      state=RecordDict(), run_config=dict(run_config))
    with task_identity(run_id=run_id, node_id=_SERVER_NODE_ID):
        server_app(grid, context)
