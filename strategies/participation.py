"""Participation control keyed by a *stable client identity*, never by a Flower node id.

A Flower node id only says where a client is connected right now: the simulation engine draws
new random node ids every time it starts, and a SuperNode that comes back with a new key gets a
new one.  Cohorts, participation history and hence the privacy guarantee therefore follow the
**client id**:

* in simulation, the partition id (``node_config["partition-id"]``);
* in a deployment, the node-config key ``client-id`` (``flower-supernode --node-config
  "client-id=..."``), falling back to ``partition-id``.

The server learns who is behind a node by sending it one ``query.identity`` message
(:data:`IDENTITY_MESSAGE_TYPE`) the first time it sees the node id; the ClientApp answers with
:func:`identity_reply` (register it with ``@app.query("identity")``).  A node without an
identity (no such key, no handler, an error) is never sampled, and the log says why.  After a
restart the map node -> client is rebuilt the same way from the grid, so a client that
reconnects under a new node id keeps its cohort and its history (both in the checkpoint).

Cohorts (:class:`CohortSchedule`, deterministic from the public ``seed``):

* The client ids known when the schedule is first used are sorted, permuted with
  ``numpy.random.default_rng([seed, 0x636F686F7274])`` and dealt round-robin into the ``b``
  cohorts, so cohort sizes differ by at most one.
* A client that appears later is assigned to cohort ``sha256(f"{seed}:{client_id}") mod b``:
  deterministic, independent of arrival order and of the process.

Round ``t`` (1-based) is served by cohort ``(t - 1) mod b`` only, so a client of cohort ``c``
can only take part in rounds ``c + 1, c + 1 + b, ...``: participations are at least ``b``
apart and at most ``k = ceil(n / b)`` -- exactly ``Participation.cyclic(k, b)``.  The schedule
keeps the participation history and re-checks both limits before sampling, so even a
hand-edited history or a mis-assigned client can not exceed them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np

__all__ = [
    "CLIENT_ID_KEY",
    "IDENTITY_ACTION",
    "IDENTITY_MESSAGE_TYPE",
    "ClientDirectory",
    "CohortSchedule",
    "client_identity",
    "identity_reply",
    "max_participations",
    "require_quorum",
    "select_cohort",
]

_ASSIGN_TAG = 0x636F686F7274  # "cohort"

#: Node-config key naming a client in a deployment (falls back to ``partition-id``).
CLIENT_ID_KEY = "client-id"
#: ClientApp action answering the server's identity query: ``@app.query(IDENTITY_ACTION)``.
IDENTITY_ACTION = "identity"
#: Message type of the identity query.
IDENTITY_MESSAGE_TYPE = f"query.{IDENTITY_ACTION}"
_FALLBACK_KEY = "partition-id"


# =============================================================================== identity
def client_identity(node_config: Mapping[str, Any], *, key: str = CLIENT_ID_KEY) -> str | None:
    """The stable client id of a node: ``node_config[key]``, else its ``partition-id``."""
    for name in (key, _FALLBACK_KEY):
        value = node_config.get(name)
        if value is not None and str(value) != "":
            return str(value)
    return None


def identity_reply(msg: Any, context: Any, *, key: str = CLIENT_ID_KEY) -> Any:
    """ClientApp handler of the identity query (``@app.query("identity")``).

    Replies ``ConfigRecord({"client-id": ...})`` from the node's config, or an error reply when
    the node has no identity (it is then never sampled).
    """
    from flwr.app import ConfigRecord, Error, Message, RecordDict

    cid = client_identity(context.node_config, key=key)
    if cid is None:
        return Message(Error(code=0, reason=f"node_config has neither {key!r} nor "
                                            f"{_FALLBACK_KEY!r}"), reply_to=msg)
    return Message(RecordDict({"identity": ConfigRecord({CLIENT_ID_KEY: cid})}), reply_to=msg)


class ClientDirectory:
    """Which client (stable id) is behind which connected node id.

    :meth:`refresh` queries every node id it has not identified yet (one ``query.identity``
    message each, waiting at most ``query_timeout`` seconds; a node that does not answer in
    time is asked again at the next refresh) and forgets node ids that left.  A node that
    answers without an identity is remembered as anonymous (never sampled, logged once); if
    several connected nodes claim one client id, the newest node serves it (one message per
    client and round, whatever the duplicates).
    """

    def __init__(self, *, query_timeout: float = 60.0) -> None:
        self.query_timeout = float(query_timeout)
        self._client_of: dict[int, str | None] = {}
        self._order: dict[int, int] = {}  # node id -> order of discovery
        self._counter = 0

    def refresh(self, grid: Any) -> dict[str, int]:
        """Query new nodes of ``grid``; return client id -> node id of the connected clients."""
        connected = sorted(int(n) for n in grid.get_node_ids())
        alive = set(connected)
        for node in [n for n in self._client_of if n not in alive]:
            del self._client_of[node]
            del self._order[node]
        new = [n for n in connected if n not in self._client_of]
        if new:
            self._query(grid, new)
        out: dict[str, int] = {}
        for node in sorted(alive, key=lambda n: self._order.get(n, -1)):
            cid = self._client_of.get(node)
            if cid is not None:
                out[cid] = node  # the newest node claiming a client wins
        return out

    def _query(self, grid: Any, nodes: list[int]) -> None:
        from flwr.app import Message, RecordDict
        from flwr.common.logger import log

        messages = [Message(RecordDict(), node, IDENTITY_MESSAGE_TYPE) for node in nodes]
        answered: dict[int, str | None] = {}
        reasons: dict[int, str] = {}
        for reply in grid.send_and_receive(messages=messages, timeout=self.query_timeout):
            node = int(reply.metadata.src_node_id)
            if node not in nodes:
                continue
            answered[node] = None
            if reply.has_error():
                reasons[node] = str(reply.error.reason)
                continue
            cid = None
            for record in reply.content.config_records.values():
                if CLIENT_ID_KEY in record:
                    cid = str(record[CLIENT_ID_KEY])
            if cid:
                answered[node] = cid
            else:
                reasons[node] = f"the reply carries no {CLIENT_ID_KEY!r}"
        anonymous = [n for n, cid in answered.items() if cid is None]
        for node in nodes:
            if node in answered:  # silent nodes are asked again at the next refresh
                self._client_of[node] = answered[node]
                self._order[node] = self._counter
                self._counter += 1
        if len(answered) < len(nodes):
            log(WARNING, "%d node(s) did not answer the identity query within %g s; asking "
                "again at the next round", len(nodes) - len(answered), self.query_timeout)
        if anonymous:
            why = reasons[anonymous[0]]
            log(WARNING, "%d node(s) have no client identity and are never sampled (e.g. node "
                "%d: %s). Register clients with a node-config %r (or partition-id) and answer "
                "@app.query(%r) with strategies.participation.identity_reply", len(anonymous),
                anonymous[0], why, CLIENT_ID_KEY, IDENTITY_ACTION)

    def client_of(self, node_id: int) -> str | None:
        """Client id behind ``node_id`` (``None``: unknown or anonymous)."""
        return self._client_of.get(int(node_id))


# =============================================================================== cohorts
class CohortSchedule:
    """Cohort assignment, eligibility and participation history, keyed by client id.

    Args:
        num_cohorts: ``b >= 1``.
        max_participations: ``k >= 1``; no client is ever sampled more than ``k`` times.
        seed: public seed of the assignment.
    """

    def __init__(self, *, num_cohorts: int, max_participations: int, seed: int = 0) -> None:
        if not isinstance(num_cohorts, int) or num_cohorts < 1:
            raise ValueError(f"num_cohorts must be an int >= 1, got {num_cohorts!r}")
        if not isinstance(max_participations, int) or max_participations < 1:
            raise ValueError(f"max_participations must be an int >= 1, got {max_participations!r}")
        self.num_cohorts = num_cohorts
        self.max_participations = max_participations
        self.seed = int(seed)
        self._cohort: dict[str, int] = {}
        self._initial: bool = False
        self.history: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ assignment
    @property
    def assigned(self) -> bool:
        """Whether the initial (balanced) assignment has been made."""
        return self._initial

    def assign(self, client_ids: Iterable[str]) -> None:
        """Balanced initial assignment of ``client_ids`` (first call) / hash-assign newcomers."""
        ids = sorted({str(i) for i in client_ids})
        if not self._initial:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, _ASSIGN_TAG])
            perm = rng.permutation(len(ids))
            for pos, idx in enumerate(perm):
                self._cohort[ids[int(idx)]] = pos % self.num_cohorts
            self._initial = True
            return
        for cid in ids:
            if cid not in self._cohort:
                self._cohort[cid] = self.hashed_cohort(cid)

    def hashed_cohort(self, client_id: str) -> int:
        """Cohort of a client that was not in the initial set."""
        digest = hashlib.sha256(f"{self.seed}:{client_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self.num_cohorts

    def cohort_of(self, client_id: str) -> int:
        """Cohort of ``client_id`` (assigning it by hash if unseen)."""
        cid = str(client_id)
        if cid not in self._cohort:
            self._cohort[cid] = self.hashed_cohort(cid)
        return self._cohort[cid]

    def cohorts(self) -> dict[int, list[str]]:
        """Cohort index -> sorted client ids."""
        out: dict[int, list[str]] = {c: [] for c in range(self.num_cohorts)}
        for cid, c in self._cohort.items():
            out[c].append(cid)
        return {c: sorted(v) for c, v in out.items()}

    def cohort_for_round(self, server_round: int) -> int:
        """The cohort serving 1-based ``server_round``: ``(t - 1) mod b``."""
        return (int(server_round) - 1) % self.num_cohorts

    # ------------------------------------------------------------------ eligibility
    def is_eligible(self, client_id: str, server_round: int) -> bool:
        """In the round's cohort, under ``k`` participations, last one >= ``b`` rounds ago."""
        cid = str(client_id)
        if self.cohort_of(cid) != self.cohort_for_round(server_round):
            return False
        past = self.history.get(cid, [])
        if len(past) >= self.max_participations:
            return False
        return not (past and server_round - past[-1] < self.num_cohorts)

    def eligible(self, client_ids: Iterable[str], server_round: int) -> list[str]:
        """Sorted eligible clients among ``client_ids`` for ``server_round``."""
        ids = {str(i) for i in client_ids}
        self.assign(ids)
        return sorted(c for c in ids if self.is_eligible(c, server_round))

    def sample(self, client_ids: Iterable[str], server_round: int, num: int,
               rng: np.random.Generator) -> list[str]:
        """``num`` eligible clients drawn without replacement with ``rng``.

        Raises ``RuntimeError`` if fewer than ``num`` are eligible (callers check first).
        """
        pool = self.eligible(client_ids, server_round)
        if len(pool) < num:
            raise RuntimeError(
                f"round {server_round}: only {len(pool)} eligible clients, need {num}"
            )
        picks = rng.choice(len(pool), size=num, replace=False)
        return sorted(pool[int(i)] for i in picks)

    def record(self, client_ids: Iterable[str], server_round: int) -> None:
        """Record that ``client_ids`` were sent a training task in ``server_round``."""
        for cid in client_ids:
            cid = str(cid)
            if not self.is_eligible(cid, server_round):
                raise RuntimeError(f"client {cid!r} is not eligible in round {server_round}")
            self.history.setdefault(cid, []).append(int(server_round))

    def min_cohort_size(self) -> int:
        """Size of the smallest cohort among the assigned clients."""
        sizes = [len(v) for v in self.cohorts().values()]
        return min(sizes) if sizes else 0

    def check_limits(self) -> None:
        """Assert the history respects ``b`` and ``k`` (used by tests and after resume)."""
        for cid, rounds in self.history.items():
            if len(rounds) > self.max_participations:
                raise AssertionError(f"client {cid!r} participated {len(rounds)} times")
            gaps = np.diff(rounds)
            if gaps.size and int(gaps.min()) < self.num_cohorts:
                raise AssertionError(f"client {cid!r} participated in rounds {rounds}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-python state (assignment and participation history)."""
        # Arrays, not one python int per participation: the checkpoint is written every round
        # and pickling 10^4 small objects costs more than the round's aggregation.
        ids = list(self.history)
        return {
            "num_cohorts": self.num_cohorts,
            "max_participations": self.max_participations,
            "seed": self.seed,
            "initial": self._initial,
            "cohort": {"ids": list(self._cohort),
                       "values": np.fromiter(self._cohort.values(), dtype=np.int64,
                                             count=len(self._cohort))},
            "history": {"ids": ids,
                        "counts": np.fromiter((len(self.history[k]) for k in ids),
                                              dtype=np.int64, count=len(ids)),
                        "rounds": np.fromiter((r for k in ids for r in self.history[k]),
                                              dtype=np.int64)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the schema (b, k, seed) must match."""
        for key in ("num_cohorts", "max_participations", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"{key} of the checkpoint ({state[key]}) differs from {getattr(self, key)}"
                )
        self._initial = bool(state["initial"])
        cohort, history = state["cohort"], state["history"]
        if isinstance(cohort.get("values"), np.ndarray):  # arrays (see state_dict)
            self._cohort = {str(k): int(v) for k, v in zip(cohort["ids"], cohort["values"],
                                                           strict=True)}
        else:  # a dict, as earlier checkpoints stored it
            self._cohort = {str(k): int(v) for k, v in cohort.items()}
        if isinstance(history.get("counts"), np.ndarray):
            ends = np.cumsum(np.asarray(history["counts"], dtype=np.int64))
            flat = np.asarray(history["rounds"], dtype=np.int64)
            self.history = {str(k): [int(r) for r in flat[e - c:e]] for k, c, e in
                            zip(history["ids"], history["counts"], ends, strict=True)}
        else:
            self.history = {str(k): [int(r) for r in v] for k, v in history.items()}

    def report(self, *, rounds: int, clients_per_round: int) -> dict[str, Any]:
        """The ``participation.json`` object: limits and every client's rounds."""
        return {
            "min_sep": self.num_cohorts,
            "max_participations": self.max_participations,
            "clients_per_round": int(clients_per_round),
            "rounds": int(rounds),
            "clients": {cid: list(self.history[cid]) for cid in sorted(self.history)},
        }

    def __repr__(self) -> str:
        sizes = [len(v) for v in self.cohorts().values()]
        return (
            f"CohortSchedule(b={self.num_cohorts}, k={self.max_participations}, "
            f"cohort_sizes={sizes})"
        )


def require_quorum(*, grid: Any, directory: ClientDirectory, need: int, timeout: float,
                   poll_interval: float = 1.0) -> dict[str, int]:
    """Wait (up to ``timeout`` s) until ``need`` clients have registered their identity.

    Raises ``RuntimeError`` naming the fix when they do not: the caller has drawn no noise and
    released nothing yet, so a federation that cannot train spends no privacy budget.
    """
    from flwr.common.logger import log

    deadline = time.monotonic() + timeout
    clients = directory.refresh(grid)
    while len(clients) < need and time.monotonic() < deadline:
        log(INFO, "Waiting for a quorum before round 1: %d of min-clients=%d clients "
            "identified", len(clients), need)
        time.sleep(poll_interval)
        clients = directory.refresh(grid)
    if len(clients) >= need:
        return clients
    connected = len(list(grid.get_node_ids()))
    if connected > len(clients):
        fix = (f"{connected - len(clients)} connected node(s) did not identify themselves: "
               f"register strategies.participation.identity_reply in the ClientApp "
               f"(@app.query({IDENTITY_ACTION!r})) and give every SuperNode a client-id "
               f"(flower-supernode --node-config 'client-id=\"...\"')")
    else:
        fix = ("start more clients (SuperNodes), or lower min-clients / raise "
               "participation-timeout (run-config keys; --min-clients / "
               "--participation-timeout with `fedmf simulate`)")
    raise RuntimeError(
        f"min-clients: only {len(clients)} of the {need} clients needed before round 1 "
        f"registered an identity within participation-timeout={timeout:g} s ({connected} "
        f"node(s) connected); stopped before round 1: nothing was trained or released and no "
        f"privacy budget was spent. Fix: {fix}")


def max_participations(rounds: int, num_cohorts: int) -> int:
    """``ceil(rounds / b)``."""
    return math.ceil(rounds / num_cohorts)


def select_cohort(
    *,
    grid: Any,
    directory: ClientDirectory,
    cohorts: CohortSchedule,
    rng: np.random.Generator,
    server_round: int,
    clients_per_round: int,
    num_clients: int,
    timeout: float,
    poll_interval: float = 1.0,
) -> tuple[dict[str, int], str | None]:
    """Pick ``clients_per_round`` eligible clients for ``server_round`` from a Flower ``Grid``.

    Returns ``({client id: node id}, None)``, or ``({}, reason)`` when the round must be
    skipped.  On first use waits (up to ``timeout`` s, polling the grid) for ``num_clients``
    identified clients and makes the balanced assignment, raising ``ValueError`` if the smallest
    cohort is smaller than ``clients_per_round``.  Then waits (within the same ``timeout``) for
    enough *eligible* clients.  Never returns an ineligible client.  The chosen clients are not
    yet recorded (call ``cohorts.record``).
    """
    from flwr.common.logger import log

    m = clients_per_round
    deadline = time.monotonic() + timeout

    def connected() -> dict[str, int]:
        return directory.refresh(grid)

    clients = connected()
    if not cohorts.assigned:
        while len(clients) < num_clients and time.monotonic() < deadline:
            log(INFO, "Waiting for clients: %d of %d identified", len(clients), num_clients)
            time.sleep(poll_interval)
            clients = connected()
        if len(clients) < num_clients:
            log(WARNING, "Only %d of num-clients=%d clients connected; assigning cohorts to "
                "those (later clients are hash-assigned)", len(clients), num_clients)
        cohorts.assign(clients)
        smallest = cohorts.min_cohort_size()
        if clients and smallest < m:
            raise ValueError(
                f"clients-per-round must be <= the smallest cohort size, got {m} > {smallest} "
                f"({len(clients)} clients in {cohorts.num_cohorts} cohorts)"
            )
        log(INFO, "Cohorts assigned: %s", cohorts)
    eligible = cohorts.eligible(clients, server_round)
    while len(eligible) < m and time.monotonic() < deadline:
        log(INFO, "Round %d: %d eligible clients connected, need %d; waiting", server_round,
            len(eligible), m)
        time.sleep(poll_interval)
        clients = connected()
        eligible = cohorts.eligible(clients, server_round)
    if len(eligible) < m:
        reason = (
            f"only {len(eligible)} eligible clients of cohort "
            f"{cohorts.cohort_for_round(server_round)} connected, need {m}"
        )
        log(WARNING, "Round %d SKIPPED: %s", server_round, reason)
        return {}, reason
    picked = cohorts.sample(eligible, server_round, m, rng)
    return {cid: clients[cid] for cid in picked}, None
