"""Secret sampling: who takes part in a round when the guarantee uses amplification.

Under ``sampling = "cyclic"`` (:mod:`strategies.participation`) cohorts come from the public
``seed`` and no amplification is claimed.  The other modes of :data:`strategies.config.SAMPLINGS`
draw every choice from the server's **secret** RNG (seeded from ``secrets``, or from the fixed
noise seed of an ``insecure-reproducible`` run), which lives only in the private checkpoint:

* ``balls-in-bins``: each client is put in one of ``b`` bins uniformly and independently when
  the server first sees it (not an equal split); round ``t`` is served by every member of bin
  ``(t - 1) mod b``.  The amplification comes from hiding the assignment (Choquette-Choo et al.
  2024, arXiv:2410.06266).
* ``poisson``: every round each registered client joins independently with probability
  ``q = clients_per_round / num_clients`` (DP-FedAvg, McMahan et al. 2018).
* ``cyclic-poisson``: clients in ``b`` secret groups as in balls-in-bins; round ``t`` samples each
  member of group ``(t - 1) mod b`` with probability ``q = clients_per_round * b / num_clients``
  (amplified BandMF, Choquette-Choo et al., NeurIPS 2023).

The draws of a round cover every *registered* client of the round's group (sorted by client
id), connected or not, so the RNG stream does not depend on who happens to be online; a drawn
client that is not connected is a dropout and still counts in the fixed denominator.  The
participation limits (``k`` rounds, ``>= b`` apart) are enforced as under ``cyclic``
(:class:`SecretCohorts` re-checks them before every round).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np

from .participation import ClientDirectory, CohortSchedule

__all__ = ["SecretCohorts", "select_secret"]


class SecretCohorts(CohortSchedule):
    """Cohorts assigned by a secret RNG (one uniform draw per client, at first sight).

    Args:
        num_cohorts: ``b`` (``1`` for ``poisson``: every client in the one group).
        max_participations: ``k``.
        rng: the strategy's secret generator (its state is checkpointed by the strategy).
    """

    def __init__(self, *, num_cohorts: int, max_participations: int,
                 rng: np.random.Generator) -> None:
        super().__init__(num_cohorts=num_cohorts, max_participations=max_participations, seed=0)
        self._secret = rng

    def assign(self, client_ids: Iterable[str]) -> None:
        """Put every unseen client of ``client_ids`` (sorted) in a uniformly drawn cohort."""
        for cid in sorted({str(i) for i in client_ids}):
            if cid not in self._cohort:
                self._cohort[cid] = int(self._secret.integers(self.num_cohorts))
        self._initial = True

    def hashed_cohort(self, client_id: str) -> int:
        """A newcomer's cohort: a fresh secret draw (never a public hash)."""
        return int(self._secret.integers(self.num_cohorts))

    def members(self, server_round: int) -> list[str]:
        """Sorted registered clients eligible for ``server_round`` (connected or not)."""
        return sorted(c for c in self._cohort if self.is_eligible(c, server_round))

    def __repr__(self) -> str:  # never the sizes: they are part of the secret
        return f"SecretCohorts(b={self.num_cohorts}, k={self.max_participations})"


def select_secret(
    *,
    grid: Any,
    directory: ClientDirectory,
    cohorts: SecretCohorts,
    rng: np.random.Generator,
    rate: float,
    server_round: int,
    num_clients: int,
    timeout: float,
    poll_interval: float = 1.0,
) -> tuple[dict[str, int], int]:
    """The round's secret draw: ``({client id: node id} to train, number drawn)``.

    On first use waits (up to ``timeout`` s) for ``num_clients`` identified clients and assigns
    them.  Then every eligible member of the round's group is drawn with probability ``rate``
    (``1``: the whole group) from ``rng``; drawn clients that are not connected are waited for
    within ``timeout`` and otherwise dropped (they count in the fixed denominator).  Logs never
    name or count the participants.
    """
    from flwr.common.logger import log

    deadline = time.monotonic() + timeout
    clients = directory.refresh(grid)
    if not cohorts.assigned:
        while len(clients) < num_clients and time.monotonic() < deadline:
            log(INFO, "Waiting for clients: %d of %d identified", len(clients), num_clients)
            time.sleep(poll_interval)
            clients = directory.refresh(grid)
        if len(clients) < num_clients:
            log(WARNING, "Only %d of num-clients=%d clients connected; assigning those to "
                "secret groups (later clients are assigned on arrival)", len(clients),
                num_clients)
    cohorts.assign(clients)  # newcomers get a secret draw
    members = cohorts.members(server_round)
    if rate < 1.0:
        draws = rng.random(len(members)) < rate  # one draw per member, online or not
        drawn = [c for c, keep in zip(members, draws, strict=True) if keep]
    else:
        drawn = members
    missing = [c for c in drawn if c not in clients]
    while missing and time.monotonic() < deadline:
        time.sleep(poll_interval)
        clients = directory.refresh(grid)
        missing = [c for c in drawn if c not in clients]
    if missing:
        log(WARNING, "Round %d: some drawn clients are not connected; they count as dropouts "
            "(the count is secret under amplified sampling)", server_round)
    return {c: clients[c] for c in drawn if c in clients}, len(drawn)
