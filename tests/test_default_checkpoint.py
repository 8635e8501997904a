"""A user's own ServerApp built from ``DPConfig`` checkpoints by default.

With ``checkpoint_dir`` unset, ``start()`` checkpoints to a folder under
``$FEDMF_STATE_DIR/checkpoints/`` keyed by the configuration (``strategies.driver``): a crashed
run relaunched with the same configuration resumes, a finished run leaves nothing behind, two
live runs of one configuration cannot share the folder, and ``checkpoint_dir=""`` turns it
off.  In-process Grid, no Ray.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flower_helpers import InProcessGrid, as_array_record, task_identity
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies import DPConfig, DPMatrixFactorizationFedAvg, build_strategy
from strategies.arrays import array_to_numpy
from strategies.checkpoint import FINISHED_NAME, checkpoint_path, load_checkpoint, locked

ROUNDS = 5


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "state"
    monkeypatch.setenv("FEDMF_STATE_DIR", str(state))
    with task_identity():
        yield state


class CrashError(RuntimeError):
    pass


def _handler(node: int, msg: Message) -> RecordDict:
    """Deterministic client: moves every float tensor half-way to ``node / 10``."""
    arrays = msg.content["arrays"]
    out = {}
    for key in arrays:
        w = array_to_numpy(arrays[key])
        out[key] = (w - 0.5 * (w - node / 10.0)).astype(w.dtype)
    return RecordDict({"arrays": as_array_record(out),
                       "metrics": MetricRecord({"num-examples": 10})})


def _cfg(**kw: Any) -> DPConfig:
    base: dict[str, Any] = dict(mechanism="bisr", bands=2, rounds=ROUNDS, clients_per_round=2,
                                num_clients=4, noise_multiplier=0.8, clip_norm=0.5,
                                noise_seed=7, insecure_reproducible=True, seed=3,
                                participation_timeout=0.0)
    base.update(kw)
    return DPConfig(**base)


def _init(shape: tuple[int, ...] = (3, 4)) -> ArrayRecord:
    return as_array_record({"w": np.zeros(shape, np.float32)})


def _run(cfg: DPConfig, *, crash_after: int | None = None, init: ArrayRecord | None = None,
         strategy: Any = None) -> tuple[Any, Any, InProcessGrid]:
    """One launch of a user's ServerApp: a fresh strategy from ``cfg`` (as after a restart)."""
    strategy = strategy or DPMatrixFactorizationFedAvg(config=cfg, poll_interval=0.01)
    grid = InProcessGrid(_handler, [1, 2, 3, 4])

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        if crash_after is not None and rnd == crash_after:
            raise CrashError(f"killed after round {rnd}")
        return MetricRecord({"norm": float(np.linalg.norm(array_to_numpy(arrays["w"])))})

    result = strategy.start(grid=grid, initial_arrays=init or _init(), num_rounds=cfg.rounds,
                            evaluate_fn=evaluate_fn)
    return strategy, result, grid


def _trained(grid: InProcessGrid) -> list[int]:
    return sorted({int(r) for kind, r, _ in grid.sent if kind == "train"})


def _captured_flower_log() -> tuple[io.StringIO, Any]:
    """Flower's logger at INFO into a buffer (other tests may have quietened it)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("flwr")
    saved = (logger.level, logger.disabled)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]

    return stream, restore


def test_checkpoint_dir_unset_is_none_and_a_run_configs_empty_string_means_unset() -> None:
    assert DPConfig().checkpoint_dir is None
    assert DPConfig.from_run_config({"checkpoint-dir": ""}).checkpoint_dir is None
    assert DPConfig.from_run_config({"checkpoint_dir": "/x/y"}).checkpoint_dir == "/x/y"
    assert DPConfig(checkpoint_dir="").checkpoint_dir == ""  # explicit opt-out (Python)
    assert DPConfig(checkpoint_dir=Path("/a/b")).checkpoint_dir == "/a/b"
    # a run config can not hold None: unset is written as "" and reads back as unset
    assert DPConfig().to_run_config()["checkpoint-dir"] == ""
    assert DPConfig.from_run_config(DPConfig().to_run_config()) == DPConfig()
    assert "checkpoint-dir" not in DPConfig().fingerprint()  # where is not what
    with pytest.raises(ValueError, match=r"^checkpoint-dir"):
        DPConfig(checkpoint_dir=5)  # type: ignore[arg-type]


def test_crash_then_relaunch_resumes_from_the_default_folder(_state_dir: Path) -> None:
    ref, ref_result, _ = _run(_cfg(checkpoint_dir=""))  # uninterrupted, no checkpoint
    assert not _state_dir.exists()  # "" is off: nothing written

    stream, restore = _captured_flower_log()
    try:
        crashed = DPMatrixFactorizationFedAvg(config=_cfg(), poll_interval=0.01)
        with pytest.raises(CrashError):
            _run(_cfg(), crash_after=2, strategy=crashed)
    finally:
        restore()
    folder = Path(crashed.checkpoint_dir)
    assert folder.parent == _state_dir.resolve() / "checkpoints"
    assert folder.name.startswith("bisr-config-")
    assert stream.getvalue().count(f"Checkpointing to {folder}") == 1  # logged once, at INFO
    state = load_checkpoint(folder)
    assert state is not None and state["round"] == 2 and state["noise"]["round"] == 2
    assert stat.S_IMODE(os.stat(checkpoint_path(folder)).st_mode) == 0o600

    # the same ServerApp launched again: a new strategy from an equal configuration
    resumed, result, grid = _run(_cfg())
    assert resumed.checkpoint_dir == str(folder)
    assert _trained(grid) == [3, 4, 5]  # rounds 1-2 were not trained (nor noised) again
    assert resumed.noise_round == ROUNDS
    np.testing.assert_array_equal(array_to_numpy(result.arrays["w"]),
                                  array_to_numpy(ref_result.arrays["w"]))
    assert resumed.cohorts.history == ref.cohorts.history
    assert sorted(result.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    # finished: the secret state is gone, and no marker blocks another run of the config
    assert not folder.exists()
    _, _, again = _run(_cfg())
    assert _trained(again) == list(range(1, ROUNDS + 1))
    assert not folder.exists() and not (folder / FINISHED_NAME).exists()


def test_each_configuration_has_its_own_folder() -> None:
    a = DPMatrixFactorizationFedAvg(config=_cfg(), poll_interval=0.01)
    b = DPMatrixFactorizationFedAvg(config=_cfg(clip_norm=0.7), poll_interval=0.01)
    for strategy in (a, b):
        with pytest.raises(CrashError):
            _run(strategy.config, crash_after=1, strategy=strategy)
    assert a.checkpoint_dir != b.checkpoint_dir
    # what is not fingerprinted (the timeout, the quorum) keeps the folder: a relaunch may
    # change them
    c = DPMatrixFactorizationFedAvg(config=_cfg(participation_timeout=5.0), poll_interval=0.01)
    _, _, grid = _run(c.config, strategy=c)
    assert c.checkpoint_dir == a.checkpoint_dir and _trained(grid) == [2, 3, 4, 5]


def test_a_second_live_run_of_the_same_configuration_is_refused() -> None:
    first = DPMatrixFactorizationFedAvg(config=_cfg(), poll_interval=0.01)
    with pytest.raises(CrashError):
        _run(first.config, crash_after=1, strategy=first)
    assert first.checkpoint_dir  # (never lock the working directory)
    with locked(first.checkpoint_dir), pytest.raises(ValueError,
                                                    match=r"^checkpoint_dir: another running"):
        _run(_cfg())  # as if the first were still running in another process
    _, _, grid = _run(_cfg())  # once it is gone, the relaunch resumes
    assert _trained(grid) == [2, 3, 4, 5]


def test_resuming_with_another_model_is_refused() -> None:
    with pytest.raises(CrashError):
        _run(_cfg(), crash_after=1)
    with pytest.raises(ValueError, match=r"^checkpoint_dir: .* another model"):
        _run(_cfg(), init=_init((5, 4)))


def test_flower_dp_checkpoints_by_default_too() -> None:
    cfg = _cfg(mechanism="flower-dp", clipping="server")
    first = build_strategy(cfg, poll_interval=0.01)
    with pytest.raises(CrashError):
        _run(cfg, crash_after=2, strategy=first)
    assert Path(first.checkpoint_dir).name.startswith("flower-dp-config-")
    assert load_checkpoint(first.checkpoint_dir)["round"] == 2
    resumed, _, grid = _run(cfg, strategy=build_strategy(cfg, poll_interval=0.01))
    assert _trained(grid) == [3, 4, 5]
    assert resumed.accountant.get_privacy_spent().num_releases == ROUNDS
    assert not Path(first.checkpoint_dir).exists()
