"""Cohort assignment, eligibility, participation limits and skip logic."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import InProcessGrid, as_array_record, make_train_reply, task_identity
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from strategies import CohortSchedule, DPConfig, DPMatrixFactorizationFedAvg


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def test_assignment_balanced_and_deterministic() -> None:
    nodes = [int(x) for x in np.random.default_rng(0).choice(10**9, size=23, replace=False)]
    a = CohortSchedule(num_cohorts=4, max_participations=3, seed=5)
    a.assign(nodes)
    b = CohortSchedule(num_cohorts=4, max_participations=3, seed=5)
    b.assign(list(reversed(nodes)))  # order of discovery does not matter
    assert a.cohorts() == b.cohorts()
    sizes = sorted(len(v) for v in a.cohorts().values())
    assert sizes == [5, 6, 6, 6]
    c = CohortSchedule(num_cohorts=4, max_participations=3, seed=6)
    c.assign(nodes)
    assert c.cohorts() != a.cohorts()
    # a late node is hash-assigned, independent of the instance and of other late nodes
    late = 10**9 + 17
    a.assign([*nodes, late, late + 1])
    b.assign([*nodes, late])
    assert a.cohort_of(late) == b.cohort_of(late) == a.hashed_cohort(late)
    assert sum(len(v) for v in a.cohorts().values()) == 25


def test_separation_and_max_participations_over_a_run() -> None:
    b, n, m, num = 3, 20, 2, 9
    k = math.ceil(n / b)
    sched = CohortSchedule(num_cohorts=b, max_participations=k, seed=1)
    rng = np.random.default_rng(0)
    nodes = list(range(100, 100 + num))
    for t in range(1, n + 1):
        picked = sched.sample(nodes, t, m, rng)
        assert all(sched.cohort_of(p) == (t - 1) % b for p in picked)
        sched.record(picked, t)
    sched.check_limits()
    for rounds in sched.history.values():
        assert len(rounds) <= k
        assert all(j - i >= b for i, j in itertools.pairwise(rounds))
    with pytest.raises(RuntimeError):  # an ineligible node can not be recorded
        sched.record([nodes[0]], n + 1 if sched.cohort_of(nodes[0]) != n % b else n + 2)


def test_max_participations_enforced_even_with_b1() -> None:
    sched = CohortSchedule(num_cohorts=1, max_participations=2, seed=0)
    rng = np.random.default_rng(0)
    sched.record(sched.sample([1, 2], 1, 2, rng), 1)
    sched.record(sched.sample([1, 2], 2, 2, rng), 2)
    assert sched.eligible([1, 2], 3) == []


def _init() -> ArrayRecord:
    return as_array_record({"w": np.zeros(8, np.float32)})


def _strategy(**kw: object) -> DPMatrixFactorizationFedAvg:
    cfg = dict(mechanism="bisr", bands=2, rounds=8, clients_per_round=2, num_clients=6,
               noise_multiplier=1.0, noise_seed=1, insecure_reproducible=True, seed=0,
               participation_timeout=0.0,
               schedule="constant")
    cfg.update(kw)
    return DPMatrixFactorizationFedAvg(config=DPConfig(**cfg), poll_interval=0.01)


def test_strategy_samples_only_eligible_nodes_and_respects_k() -> None:
    s = _strategy()
    assert s.config.num_cohorts == 3 and s.config.max_participations == 3
    grid = InProcessGrid(lambda n, m: None, list(range(1, 7)))
    arrays = _init()
    per_round = {}
    for t in range(1, 9):
        msgs = list(s.configure_train(t, arrays, ConfigRecord(), grid))
        ids = [int(m.metadata.dst_node_id) for m in msgs]
        assert len(ids) == 2
        assert all(s.cohorts.cohort_of(i) == (t - 1) % 3 for i in ids)
        per_round[t] = ids
        arrays, _ = s.aggregate_train(t, [make_train_reply(i, {"w": np.ones(8, np.float32)})
                                          for i in ids])
    s.cohorts.check_limits()
    counts = Counter(i for ids in per_round.values() for i in ids)
    assert max(counts.values()) <= 3


def _after_round_one() -> tuple[DPMatrixFactorizationFedAvg, InProcessGrid, ArrayRecord]:
    """A strategy after one full round on 6 connected nodes, its grid and the model."""
    s = _strategy()
    grid = InProcessGrid(lambda n, m: None, list(range(1, 7)))
    msgs = list(s.configure_train(1, _init(), ConfigRecord(), grid))
    arrays, _ = s.aggregate_train(1, [make_train_reply(int(m.metadata.dst_node_id),
                                                       {"w": np.ones(8, np.float32)})
                                      for m in msgs])
    assert arrays is not None
    return s, grid, arrays


def test_skip_when_too_few_eligible_nodes_then_continue() -> None:
    s, grid, arrays = _after_round_one()
    cohort1 = s.cohorts.cohorts()[1]
    grid.connected = [n for n in range(1, 7) if str(n) != cohort1[0]]  # one of cohort 1 left
    assert list(s.configure_train(2, arrays, ConfigRecord(), grid)) == []
    arrays, metrics = s.aggregate_train(2, [])
    assert metrics["skipped"] == 1
    assert s.noise_round == 2  # the skipped round consumed its noise draw
    grid.connected = list(range(1, 7))
    msgs = list(s.configure_train(3, arrays, ConfigRecord(), grid))
    assert len(msgs) == 2


def test_waits_for_eligible_nodes_before_skipping() -> None:
    s = _strategy(participation_timeout=5.0)
    calls = {"n": 0}

    class SlowGrid(InProcessGrid):
        def get_node_ids(self) -> list[int]:
            calls["n"] += 1
            return list(range(1, 7)) if calls["n"] >= 3 else [1]

    grid = SlowGrid(lambda n, m: RecordDict(), [])
    msgs = list(s.configure_train(1, _init(), ConfigRecord(), grid))
    assert len(msgs) == 2 and calls["n"] >= 3


def test_cohort_smaller_than_clients_per_round_fails() -> None:
    s = _strategy(num_clients=6, clients_per_round=2)
    grid = InProcessGrid(lambda n, m: None, [1, 2, 3, 4])  # 4 nodes / 3 cohorts -> size 1
    with pytest.raises(ValueError, match=r"^clients-per-round"):
        list(s.configure_train(1, _init(), ConfigRecord(), grid))


def test_no_quorum_stops_before_round_one_and_spends_nothing(tmp_path: object) -> None:
    s = _strategy(num_clients=6, clients_per_round=2, checkpoint_dir=str(tmp_path))
    empty = InProcessGrid(lambda n, m: None, [])
    with pytest.raises(RuntimeError, match=r"^min-clients: only 0 of the 2") as err:
        list(s.configure_train(1, _init(), ConfigRecord(), empty))
    assert "no privacy budget was spent" in str(err.value)
    assert s.noise_round == 0 and s.rounds_completed == 0  # no noise drawn, nothing saved
    assert not any(Path(str(tmp_path)).iterdir())
    # nodes that connect but never identify themselves: the error names the handler to register
    anonymous = InProcessGrid(lambda n, m: None, [1, 2, 3],
                              identities={1: None, 2: None, 3: None})
    with pytest.raises(RuntimeError, match="identity_reply") as err:
        list(_strategy(num_clients=6, clients_per_round=2).configure_train(
            1, _init(), ConfigRecord(), anonymous))
    assert "3 connected node(s) did not identify" in str(err.value)
    # min-clients raises the quorum above clients-per-round; beyond num-clients it is refused
    with pytest.raises(RuntimeError, match=r"only 3 of the 5"):
        list(_strategy(num_clients=6, clients_per_round=2, min_clients=5).configure_train(
            1, _init(), ConfigRecord(), InProcessGrid(lambda n, m: None, [1, 2, 3])))
    with pytest.raises(ValueError, match=r"^min-clients"):
        _strategy(min_clients=7)


def test_skipped_round_logs_its_epsilon_cost(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    s, grid, arrays = _after_round_one()
    grid.connected = [1]
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        assert list(s.configure_train(2, arrays, ConfigRecord(), grid)) == []
    finally:
        flwr_logger.removeHandler(caplog.handler)
    cost = s.epsilon_spent(2) - s.epsilon_spent(1)
    assert cost > 0 and f"costs epsilon {cost:.4g}" in caplog.text


def test_state_dict_round_trip_and_earlier_checkpoints() -> None:
    """The history travels as arrays (fast to checkpoint every round); it round-trips exactly,
    and a checkpoint written in the earlier dict-of-lists form still loads."""
    import io

    import numpy as np
    import torch

    from strategies.participation import CohortSchedule

    a = CohortSchedule(num_cohorts=3, max_participations=4, seed=1)
    a._cohort = {f"c{i}": i % 3 for i in range(7)}
    a.history = {f"c{i}": [i % 3 + 1 + 3 * j for j in range(i % 3)] for i in range(7)}
    state = a.state_dict()
    assert isinstance(state["history"]["rounds"], np.ndarray)
    buf = io.BytesIO()
    torch.save(state, buf)
    b = CohortSchedule(num_cohorts=3, max_participations=4, seed=1)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert b.history == a.history and b._cohort == a._cohort
    old = {**state, "cohort": dict(a._cohort), "history": {k: list(v)
                                                           for k, v in a.history.items()}}
    c = CohortSchedule(num_cohorts=3, max_participations=4, seed=1)
    c.load_state_dict(old)
    assert c.history == a.history and c._cohort == a._cohort
