"""Checkpoint / resume through ``start()`` with an in-process Grid."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flower_helpers import InProcessGrid, as_array_record, task_identity
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.arrays import array_to_numpy
from strategies.checkpoint import checkpoint_path, load_checkpoint

ROUNDS = 8


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


class CrashError(RuntimeError):
    pass


def _handler(node: int, msg: Message) -> RecordDict:
    """Deterministic client: w <- w - 0.1 * (w - target_node); also evaluates."""
    arrays = msg.content["arrays"]
    if msg.metadata.message_type == "evaluate":
        w = array_to_numpy(arrays["w"])
        return RecordDict({"metrics": MetricRecord({"num-examples": 1,
                                                    "eval-loss": float(np.sum(w**2))})})
    w = array_to_numpy(arrays["w"]).astype(np.float32)
    target = np.full_like(w, node / 10.0)
    new = w - 0.5 * (w - target)
    return RecordDict({
        "arrays": as_array_record({"w": new, "step": np.array(1, np.int64)}),
        "metrics": MetricRecord({"num-examples": 10, "train-loss": float(np.sum(w**2))}),
    })


def _cfg(tmp: Path | str, **kw: Any) -> DPConfig:
    base: dict[str, Any] = dict(mechanism="bisr", bands=3, rounds=ROUNDS, clients_per_round=2,
                                num_clients=6, noise_multiplier=0.8, clip_norm=0.5,
                                noise_seed=99, insecure_reproducible=True, seed=4,
                                schedule="cosine", server_lr=0.8, server_momentum=0.3,
                                clipping="adaptive",
                                clip_count_stddev=1.0, epsilon=50.0,
                                participation_timeout=0.0, checkpoint_dir=str(tmp))
    base.update(kw)
    return DPConfig(**base)


def _init() -> ArrayRecord:
    return as_array_record({"w": np.zeros((3, 4), np.float32), "step": np.array(0, np.int64)})


def _run(cfg: DPConfig, *, crash_after: int | None = None, num_rounds: int = ROUNDS,
         grid: InProcessGrid | None = None, strategy: Any = None,
         ) -> tuple[DPMatrixFactorizationFedAvg, Any, InProcessGrid]:
    strategy = strategy or DPMatrixFactorizationFedAvg(config=cfg, fraction_evaluate=0.5)
    grid = grid or InProcessGrid(_handler, list(range(1, 7)))

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        if crash_after is not None and rnd == crash_after:
            raise CrashError(f"killed after round {rnd}")
        return MetricRecord({"norm": float(np.linalg.norm(array_to_numpy(arrays["w"])))})

    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=num_rounds,
                            evaluate_fn=evaluate_fn)
    return strategy, result, grid


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    ref, ref_result, _ = _run(_cfg(tmp_path / "ref"))
    ref_w = array_to_numpy(ref_result.arrays["w"])

    ckpt = tmp_path / "run"
    with pytest.raises(CrashError):
        _run(_cfg(ckpt), crash_after=3)
    state = load_checkpoint(ckpt)
    assert state is not None and state["round"] == 3 and state["noise"]["round"] == 3
    mode = stat.S_IMODE(os.stat(checkpoint_path(ckpt)).st_mode)
    assert mode == 0o600
    assert not [p for p in os.listdir(ckpt) if p.endswith(".tmp")]

    # a second crash after round 5, then run to the end
    with pytest.raises(CrashError):
        _run(_cfg(ckpt), crash_after=5)
    resumed, result, grid = _run(_cfg(ckpt))
    np.testing.assert_array_equal(array_to_numpy(result.arrays["w"]), ref_w)
    assert int(array_to_numpy(result.arrays["step"])) == 0  # server keeps int buffers
    # the last process only trained rounds 6..8 and drew noise 5..7: no draw reused
    trained_rounds = sorted({r for kind, r, _ in grid.sent if kind == "train"})
    assert trained_rounds == [6, 7, 8]
    assert resumed.noise_round == ROUNDS
    # participation history across restarts == uninterrupted run, within the limits
    assert resumed.cohorts.history == ref.cohorts.history
    resumed.cohorts.check_limits()
    k = resumed.config.max_participations
    assert max(len(v) for v in resumed.cohorts.history.values()) <= k
    # the Result covers all rounds (metrics persisted with the checkpoint)
    assert sorted(result.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    assert sorted(result.evaluate_metrics_serverapp) == list(range(0, ROUNDS + 1))
    for t in range(1, ROUNDS + 1):
        assert dict(result.train_metrics_clientapp[t]) == dict(
            ref_result.train_metrics_clientapp[t])
    assert resumed.clip_norm == pytest.approx(ref.clip_norm)
    assert result.train_metrics_clientapp[ROUNDS]["epsilon_spent"] == pytest.approx(
        resumed.privacy["epsilon"])


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    with pytest.raises(CrashError):
        _run(_cfg(tmp_path), crash_after=1)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _run(_cfg(tmp_path, noise_multiplier=0.9))


def test_completed_run_is_not_rerun(tmp_path: Path) -> None:
    """A finished run deletes its secret state and leaves only finished.json (no secret);
    launching the same configuration again is an error naming checkpoint_dir, not a silent
    return of the old model nor a second spend of the budget."""
    import json

    from strategies.checkpoint import FINISHED_NAME, checkpoint_path

    cfg = _cfg(tmp_path, rounds=4, noise_seed=424242)
    _run(cfg, num_rounds=4)
    ckpt = Path(cfg.checkpoint_dir)
    assert not checkpoint_path(ckpt).exists()
    marker = (ckpt / FINISHED_NAME).read_text()
    assert json.loads(marker)["rounds"] == 4 and "424242" not in marker
    with pytest.raises(ValueError, match=r"^checkpoint_dir: .* finished all 4 rounds"):
        _run(_cfg(tmp_path, rounds=4, noise_seed=424242), num_rounds=4)
    # another configuration in the same folder is a new run
    _, _, grid = _run(_cfg(tmp_path, rounds=4, noise_seed=424242, clip_norm=0.7), num_rounds=4)
    assert [s for s in grid.sent if s[0] == "train"]


def test_seed_not_logged(tmp_path: Path) -> None:
    import io
    import logging

    # Capture every record of Flower's and fedmf's loggers directly: other tests (the CLI)
    # quiet Flower's logger, so relying on propagation would make this order-dependent.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("flwr", "fedmf", "strategies")]
    saved = [(lg.level, lg.disabled, list(lg.filters)) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        for f in list(lg.filters):
            lg.removeFilter(f)
    try:
        _run(_cfg(tmp_path, noise_seed=8675309123, rounds=2, bands=2), num_rounds=2)
    finally:
        for lg, (level, disabled, filters) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.disabled = disabled
            for f in filters:
                lg.addFilter(f)
    text = stream.getvalue()
    assert "8675309123" not in text
    assert "epsilon" in text


def _renumbered_grid(offset: int, order_seed: int) -> InProcessGrid:
    """Six clients c0..c5 behind node ids that change at every restart (like Flower's
    simulation engine, which draws new random node ids each time it starts)."""
    rng = np.random.default_rng(order_seed)
    nodes = [offset + int(i) for i in rng.choice(10**6, size=6, replace=False)]
    clients = [f"c{i}" for i in rng.permutation(6)]
    return InProcessGrid(_handler, nodes, identities=dict(zip(nodes, clients, strict=True)))


@pytest.mark.parametrize("mechanism", ["bisr", "flower-dp"])
def test_restart_with_new_node_ids_keeps_cohorts_and_limits(tmp_path: Path,
                                                            mechanism: str) -> None:
    """Limits follow the client, not the node id: three restarts, each with new node ids."""
    from strategies import build_strategy

    kw: dict[str, Any] = {"clipping": "server"} if mechanism == "flower-dp" else {}
    cfg = _cfg(tmp_path, mechanism=mechanism, min_sep=3, **kw)  # b = 3, k = 3, m = 2

    def fresh() -> Any:
        return build_strategy(cfg, fraction_evaluate=0.0, poll_interval=0.01)

    cohorts_seen: list[dict[int, list[str]]] = []
    for session, crash in enumerate([2, 5, 7, None]):
        grid = _renumbered_grid(10**7 * (session + 1), session)
        strategy = fresh()
        if crash is None:
            strategy, result, grid = _run(cfg, grid=grid, strategy=strategy)
        else:
            with pytest.raises(CrashError):
                _run(cfg, crash_after=crash, grid=grid, strategy=strategy)
        cohorts_seen.append(strategy.cohorts.cohorts())
        # the messages went to this session's node ids only
        assert {n for kind, _, n in grid.sent if kind == "train"} <= set(grid.connected)
    assert all(c == cohorts_seen[0] for c in cohorts_seen)  # same cohorts in every session
    report = strategy.participation_report()
    assert (report["min_sep"], report["max_participations"]) == (3, 3)
    assert report["rounds"] == ROUNDS and report["clients_per_round"] == 2
    assert set(report["clients"]) <= {f"c{i}" for i in range(6)}
    # every round trained exactly m = 2 clients (none skipped) ...
    assert sum(len(r) for r in report["clients"].values()) == 2 * ROUNDS
    # ... and every client's rounds are >= b apart and at most k
    for client, rounds in report["clients"].items():
        assert len(rounds) <= 3 and all(j - i >= 3 for i, j in pairwise(rounds)), client
    strategy.cohorts.check_limits()
    assert sorted(result.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    assert all(m["num_accepted"] == 2 for m in result.train_metrics_clientapp.values())
    # Flower's accountant (flower-dp) / ours (bisr) came back with the checkpoint
    spent = strategy.accountant.get_privacy_spent()
    assert spent.num_releases == ROUNDS
    assert spent.epsilon == pytest.approx(
        result.train_metrics_clientapp[ROUNDS]["flower_epsilon" if mechanism == "flower-dp"
                                               else "epsilon_spent"], rel=1e-12)


def test_nodes_without_identity_are_never_sampled() -> None:
    cfg = _cfg("", rounds=4, num_clients=4, min_sep=2, clipping="server")
    strategy = DPMatrixFactorizationFedAvg(config=cfg, poll_interval=0.01)
    # nodes 5 and 6 do not know who they are (no client-id, no partition-id)
    grid = InProcessGrid(_handler, list(range(1, 7)), identities={5: None, 6: None})
    _run(cfg, num_rounds=4, grid=grid, strategy=strategy)
    trained = {n for kind, _, n in grid.sent if kind == "train"}
    assert trained and trained <= {1, 2, 3, 4}
    assert set(strategy.participation_report()["clients"]) <= {"1", "2", "3", "4"}
    # each node was asked who it is exactly once, anonymous ones included
    queries = [n for kind, _, n in grid.sent if kind == "query.identity"]
    assert sorted(queries) == [1, 2, 3, 4, 5, 6]


def test_directory_reasks_silent_nodes_and_serves_a_client_once() -> None:
    from strategies.participation import ClientDirectory

    silent = {"on": True}
    asked: list[int] = []

    class Grid(InProcessGrid):
        def _answer(self, msg: Message) -> Message | None:
            asked.append(int(msg.metadata.dst_node_id))
            if silent["on"] and int(msg.metadata.dst_node_id) == 3:
                return None  # no reply within the timeout
            return super()._answer(msg)

    grid = Grid(_handler, [1, 2, 3, 4], identities={1: "a", 2: "b", 3: "c", 4: "a"})
    directory = ClientDirectory(query_timeout=0.1)
    assert directory.refresh(grid) == {"a": 4, "b": 2}  # "a" twice: the newest node serves it
    silent["on"] = False
    assert directory.refresh(grid) == {"a": 4, "b": 2, "c": 3}  # node 3 was asked again
    grid.connected = [1, 2, 3]  # node 4 left: node 1 serves "a" again
    assert directory.refresh(grid) == {"a": 1, "b": 2, "c": 3}
    assert asked == [1, 2, 3, 4, 3]  # each node once, the silent one twice
