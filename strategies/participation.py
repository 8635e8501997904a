"""Cohort-based participation control: every client's participations are >= b rounds apart.

Assignment (deterministic from the public ``seed``):

* The nodes known when the schedule is first used (``assign(node_ids)``; the strategy calls it
  once enough nodes are connected) are sorted by node id, permuted with
  ``numpy.random.default_rng([seed, 0x636F686F7274])`` and dealt round-robin into the ``b``
  cohorts, so cohort sizes differ by at most one.
* A node that appears later (not in the initial set) is assigned to cohort
  ``sha256(f"{seed}:{node_id}") mod b``: deterministic, independent of arrival order and of the
  process, so a restarted server puts it in the same cohort.  Late nodes can unbalance the
  cohorts slightly; they never change an existing assignment.

Round ``t`` (1-based) is served by cohort ``(t - 1) mod b`` only.  A node of cohort ``c`` can
therefore only take part in rounds ``c + 1, c + 1 + b, ...`` -- participations are at least
``b`` apart and at most ``k = ceil(n / b)`` -- exactly ``Participation.cyclic(k, b)``.  The
schedule also keeps a participation history and re-checks both limits before sampling, so even a
hand-edited history or a mis-assigned node can not exceed them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np

__all__ = ["CohortSchedule", "max_participations", "select_cohort_nodes"]

_ASSIGN_TAG = 0x636F686F7274  # "cohort"


class CohortSchedule:
    """Cohort assignment, eligibility and participation history.

    Args:
        num_cohorts: ``b >= 1``.
        max_participations: ``k >= 1``; no node is ever sampled more than ``k`` times.
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
        self._cohort: dict[int, int] = {}
        self._initial: bool = False
        self.history: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ assignment
    @property
    def assigned(self) -> bool:
        """Whether the initial (balanced) assignment has been made."""
        return self._initial

    def assign(self, node_ids: Iterable[int]) -> None:
        """Balanced initial assignment of ``node_ids`` (first call) / hash-assign newcomers."""
        ids = sorted({int(i) for i in node_ids})
        if not self._initial:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, _ASSIGN_TAG])
            perm = rng.permutation(len(ids))
            for pos, idx in enumerate(perm):
                self._cohort[ids[int(idx)]] = pos % self.num_cohorts
            self._initial = True
            return
        for node in ids:
            if node not in self._cohort:
                self._cohort[node] = self.hashed_cohort(node)

    def hashed_cohort(self, node_id: int) -> int:
        """Cohort of a node that was not in the initial set."""
        digest = hashlib.sha256(f"{self.seed}:{int(node_id)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self.num_cohorts

    def cohort_of(self, node_id: int) -> int:
        """Cohort of ``node_id`` (assigning it by hash if unseen)."""
        node_id = int(node_id)
        if node_id not in self._cohort:
            self._cohort[node_id] = self.hashed_cohort(node_id)
        return self._cohort[node_id]

    def cohorts(self) -> dict[int, list[int]]:
        """Cohort index -> sorted node ids."""
        out: dict[int, list[int]] = {c: [] for c in range(self.num_cohorts)}
        for node, c in self._cohort.items():
            out[c].append(node)
        return {c: sorted(v) for c, v in out.items()}

    def cohort_for_round(self, server_round: int) -> int:
        """The cohort serving 1-based ``server_round``: ``(t - 1) mod b``."""
        return (int(server_round) - 1) % self.num_cohorts

    # ------------------------------------------------------------------ eligibility
    def is_eligible(self, node_id: int, server_round: int) -> bool:
        """In the round's cohort, under ``k`` participations, last one >= ``b`` rounds ago."""
        node_id = int(node_id)
        if self.cohort_of(node_id) != self.cohort_for_round(server_round):
            return False
        past = self.history.get(node_id, [])
        if len(past) >= self.max_participations:
            return False
        return not (past and server_round - past[-1] < self.num_cohorts)

    def eligible(self, node_ids: Iterable[int], server_round: int) -> list[int]:
        """Sorted eligible nodes among ``node_ids`` for ``server_round``."""
        self.assign(node_ids)
        return sorted(n for n in {int(i) for i in node_ids} if self.is_eligible(n, server_round))

    def sample(
        self,
        node_ids: Iterable[int],
        server_round: int,
        num: int,
        rng: np.random.Generator,
    ) -> list[int]:
        """``num`` eligible nodes drawn without replacement with ``rng``.

        Raises ``RuntimeError`` if fewer than ``num`` are eligible (callers check first).
        """
        pool = self.eligible(node_ids, server_round)
        if len(pool) < num:
            raise RuntimeError(
                f"round {server_round}: only {len(pool)} eligible nodes, need {num}"
            )
        picks = rng.choice(len(pool), size=num, replace=False)
        return sorted(pool[int(i)] for i in picks)

    def record(self, node_ids: Iterable[int], server_round: int) -> None:
        """Record that ``node_ids`` were sent a training task in ``server_round``."""
        for node in node_ids:
            node = int(node)
            if not self.is_eligible(node, server_round):
                raise RuntimeError(f"node {node} is not eligible in round {server_round}")
            self.history.setdefault(node, []).append(int(server_round))

    def min_cohort_size(self) -> int:
        """Size of the smallest cohort among the assigned nodes."""
        sizes = [len(v) for v in self.cohorts().values()]
        return min(sizes) if sizes else 0

    def check_limits(self) -> None:
        """Assert the history respects ``b`` and ``k`` (used by tests and after resume)."""
        for node, rounds in self.history.items():
            if len(rounds) > self.max_participations:
                raise AssertionError(f"node {node} participated {len(rounds)} times")
            gaps = np.diff(rounds)
            if gaps.size and int(gaps.min()) < self.num_cohorts:
                raise AssertionError(f"node {node} participated in rounds {rounds}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-python state (assignment and participation history)."""
        return {
            "num_cohorts": self.num_cohorts,
            "max_participations": self.max_participations,
            "seed": self.seed,
            "initial": self._initial,
            "cohort": {int(k): int(v) for k, v in self._cohort.items()},
            "history": {int(k): [int(r) for r in v] for k, v in self.history.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the schema (b, k, seed) must match."""
        for key in ("num_cohorts", "max_participations", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"{key} of the checkpoint ({state[key]}) differs from {getattr(self, key)}"
                )
        self._initial = bool(state["initial"])
        self._cohort = {int(k): int(v) for k, v in state["cohort"].items()}
        self.history = {int(k): [int(r) for r in v] for k, v in state["history"].items()}

    def __repr__(self) -> str:
        sizes = [len(v) for v in self.cohorts().values()]
        return (
            f"CohortSchedule(b={self.num_cohorts}, k={self.max_participations}, "
            f"cohort_sizes={sizes})"
        )


def max_participations(rounds: int, num_cohorts: int) -> int:
    """``ceil(rounds / b)``."""
    return math.ceil(rounds / num_cohorts)


def select_cohort_nodes(
    *,
    grid: Any,
    cohorts: CohortSchedule,
    rng: np.random.Generator,
    server_round: int,
    clients_per_round: int,
    num_clients: int,
    timeout: float,
    poll_interval: float = 1.0,
) -> tuple[list[int], str | None]:
    """Pick ``clients_per_round`` eligible nodes for ``server_round`` from a Flower ``Grid``.

    On first use waits (up to ``timeout`` s, polling ``grid.get_node_ids()``) for
    ``num_clients`` nodes and makes the balanced assignment, raising ``ValueError`` if the
    smallest cohort is smaller than ``clients_per_round``.  Then waits (within the same
    ``timeout``) for enough *eligible* nodes; if there are still too few, returns
    ``([], reason)``: the caller skips the round.  Never returns an ineligible node.  The
    chosen nodes are not yet recorded (call ``cohorts.record``).
    """
    from flwr.common.logger import log

    m = clients_per_round
    deadline = time.monotonic() + timeout

    def connected() -> list[int]:
        return sorted(int(n) for n in grid.get_node_ids())

    nodes = connected()
    if not cohorts.assigned:
        while len(nodes) < num_clients and time.monotonic() < deadline:
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), num_clients)
            time.sleep(poll_interval)
            nodes = connected()
        if len(nodes) < num_clients:
            log(WARNING, "Only %d of num-clients=%d nodes connected; assigning cohorts to "
                "those (later nodes are hash-assigned)", len(nodes), num_clients)
        cohorts.assign(nodes)
        smallest = cohorts.min_cohort_size()
        if nodes and smallest < m:
            raise ValueError(
                f"clients_per_round must be <= the smallest cohort size, got {m} > {smallest} "
                f"({len(nodes)} nodes in {cohorts.num_cohorts} cohorts)"
            )
        log(INFO, "Cohorts assigned: %s", cohorts)
    eligible = cohorts.eligible(nodes, server_round)
    while len(eligible) < m and time.monotonic() < deadline:
        log(INFO, "Round %d: %d eligible nodes connected, need %d; waiting", server_round,
            len(eligible), m)
        time.sleep(poll_interval)
        eligible = cohorts.eligible(connected(), server_round)
    if len(eligible) < m:
        reason = (
            f"only {len(eligible)} eligible nodes of cohort "
            f"{cohorts.cohort_for_round(server_round)} connected, need {m}"
        )
        log(WARNING, "Round %d SKIPPED: %s", server_round, reason)
        return [], reason
    return cohorts.sample(eligible, server_round, m, rng), None
