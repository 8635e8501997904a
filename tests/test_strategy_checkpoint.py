"""Checkpoint / resume through ``start()`` with an in-process Grid."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flower_helpers import InProcessGrid, as_array_record, task_identity
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.checkpoint import checkpoint_path, load_checkpoint
from strategies.dpmf import array_to_numpy

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
                                noise_seed=99, seed=4, schedule="cosine", server_lr=0.8,
                                server_momentum=0.3, clipping="adaptive",
                                clip_count_stddev=1.0, epsilon=50.0,
                                participation_timeout=0.0, checkpoint_dir=str(tmp))
    base.update(kw)
    return DPConfig(**base)


def _init() -> ArrayRecord:
    return as_array_record({"w": np.zeros((3, 4), np.float32), "step": np.array(0, np.int64)})


def _run(cfg: DPConfig, *, crash_after: int | None = None, num_rounds: int = ROUNDS,
         ) -> tuple[DPMatrixFactorizationFedAvg, Any, InProcessGrid]:
    strategy = DPMatrixFactorizationFedAvg(config=cfg, fraction_evaluate=0.5)
    grid = InProcessGrid(_handler, list(range(1, 7)))

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
    _, first, _ = _run(_cfg(tmp_path, rounds=4), num_rounds=4)
    again, second, grid = _run(_cfg(tmp_path, rounds=4), num_rounds=4)
    assert [s for s in grid.sent if s[0] == "train"] == []
    np.testing.assert_array_equal(array_to_numpy(second.arrays["w"]),
                                  array_to_numpy(first.arrays["w"]))
    assert again.noise_round == 4


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
