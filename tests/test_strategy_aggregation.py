"""Aggregation maths of DPMatrixFactorizationFedAvg on hand-built replies."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from flower_helpers import (
    InProcessGrid,
    as_array_record,
    make_error_reply,
    make_train_reply,
    task_identity,
)
from flwr.app import ArrayRecord, ConfigRecord

from fedmf.noise import CorrelatedNoise
from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.arrays import array_from_numpy, array_to_numpy

SHAPES = {"w": (4, 5), "b": (5,)}
D = 25


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def _cfg(**kw: Any) -> DPConfig:
    base: dict[str, Any] = dict(mechanism="dp-fedavg", rounds=4, clients_per_round=3,
                                num_clients=6, min_sep=2, schedule="constant", server_lr=1.0,
                                clip_norm=1.0, noise_multiplier=1.0, noise_seed=7, seed=3,
                                insecure_reproducible=True,
                                participation_timeout=0.0)
    base.update(kw)
    return DPConfig(**base)


def _init(with_int: bool = True) -> ArrayRecord:
    arrays: dict[str, Any] = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
    if with_int:
        arrays["num_batches_tracked"] = np.array(11, np.int64)
    return as_array_record(arrays)


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([array_to_numpy(record[k]).ravel().astype(np.float64) for k in SHAPES])


def _model(flat: np.ndarray, nbt: int = 11) -> dict[str, np.ndarray]:
    out = {"w": flat[:20].reshape(4, 5).astype(np.float32),
           "b": flat[20:].astype(np.float32), "num_batches_tracked": np.array(nbt, np.int64)}
    return out


def _round(strategy: DPMatrixFactorizationFedAvg, arrays: ArrayRecord, t: int = 1,
           nodes: int = 6) -> list[int]:
    grid = InProcessGrid(lambda n, m: None, list(range(1, nodes + 1)))
    msgs = list(strategy.configure_train(t, arrays, ConfigRecord({"lr": 0.1}), grid))
    return [int(m.metadata.dst_node_id) for m in msgs]


def _noise_free(**kw: Any) -> DPMatrixFactorizationFedAvg:
    """The fedavg (no noise, no clip) or a DP strategy with a negligible noise multiplier."""
    return DPMatrixFactorizationFedAvg(config=_cfg(**kw))


def test_clipping_fixed_denominator_and_int_buffers() -> None:
    s = DPMatrixFactorizationFedAvg(config=_cfg(noise_multiplier=1e-9, clip_norm=1.0))
    init = _init()
    nodes = _round(s, init)
    assert len(nodes) == 3
    g0 = _flat(init)
    rng = np.random.default_rng(0)
    dirs = [rng.normal(size=D) for _ in nodes]
    deltas = [dirs[0] / np.linalg.norm(dirs[0]) * 3.0,  # clipped to 1
              dirs[1] / np.linalg.norm(dirs[1]) * 0.5,  # unclipped
              np.zeros(D)]                               # zero-norm guard
    replies = [make_train_reply(n, _model(g0 + dl, nbt=999), {"num-examples": 5})
               for n, dl in zip(nodes[:2], deltas[:2], strict=True)]
    replies.append(make_train_reply(nodes[2], _model(g0, nbt=999), {"num-examples": 5}))
    out, metrics = s.aggregate_train(1, replies)
    assert out is not None and metrics is not None
    expected = g0 + (deltas[0] / 3.0 + deltas[1] + deltas[2]) / 3  # fixed denominator m=3
    np.testing.assert_allclose(_flat(out), expected, atol=1e-5)
    # integer buffers: server keeps its value, client values are ignored
    assert int(array_to_numpy(out["num_batches_tracked"])) == 11
    assert list(out.keys()) == list(init.keys())
    assert metrics["num_clipped"] == 1 and metrics["num_rejected"] == 0
    assert metrics["num_accepted"] == 3 and metrics["num_failures"] == 0
    assert metrics["norm_max"] == pytest.approx(3.0, rel=1e-5)
    assert metrics["norm_median"] == pytest.approx(0.5, rel=1e-5)
    assert metrics["clip_norm"] == 1.0
    assert s.last_train_metrics["num_clipped"] == 1


def test_failed_and_missing_replies_keep_denominator() -> None:
    s = _noise_free(mechanism="fedavg")
    init = _init()
    nodes = _round(s, init)
    g0 = _flat(init)
    delta = np.linspace(-1, 1, D)
    replies = [make_train_reply(nodes[0], _model(g0 + delta)), make_error_reply(nodes[1])]
    out, metrics = s.aggregate_train(1, replies)  # third node: no reply at all
    np.testing.assert_allclose(_flat(out), g0 + delta / 3, atol=1e-6)
    assert metrics["num_failures"] == 1 and metrics["num_accepted"] == 1
    assert metrics["epsilon_spent"] == math.inf


@pytest.mark.parametrize("bad", ["nan", "inf", "shape", "missing_key", "int_dtype",
                                 "unsampled", "duplicate"])
def test_bad_replies_are_rejected(bad: str) -> None:
    s = _noise_free(mechanism="fedavg")
    init = _init()
    nodes = _round(s, init)
    g0 = _flat(init)
    good = make_train_reply(nodes[0], _model(g0 + 0.1))
    model = _model(g0 + 0.2)
    node = nodes[1]
    if bad == "nan":
        model["w"][0, 0] = np.nan
    elif bad == "inf":
        model["b"][1] = np.inf
    elif bad == "shape":
        model["w"] = np.zeros((5, 4), np.float32)
    elif bad == "missing_key":
        del model["b"]
    elif bad == "int_dtype":
        model["b"] = np.zeros(5, np.int32)
    elif bad == "unsampled":
        node = next(n for n in range(1, 7) if n not in nodes)
    replies = [good, make_train_reply(node, model)]
    if bad == "duplicate":
        replies = [good, make_train_reply(nodes[0], _model(g0 + 5.0))]
    out, metrics = s.aggregate_train(1, replies)
    assert metrics["num_rejected"] == 1 and metrics["num_accepted"] == 1
    np.testing.assert_allclose(_flat(out), g0 + 0.1 / 3, atol=1e-6)
    assert np.all(np.isfinite(_flat(out)))


def test_exact_noise_for_fixed_seed_matches_correlated_noise() -> None:
    cfg = _cfg(mechanism="bisr", bands=2, rounds=4, clip_norm=2.0, noise_multiplier=1.5,
               noise_seed=12345, insecure_reproducible=True)
    s = DPMatrixFactorizationFedAvg(config=cfg)
    ref = CorrelatedNoise(spec=cfg.factorization().noise_spec, std=1.5 * 2.0 / 3, seed=12345)
    arrays = _init()
    for t in range(1, 5):
        g = _flat(arrays)
        nodes = _round(s, arrays, t)
        replies = [make_train_reply(n, _model(g)) for n in nodes]  # zero signal
        assert s.noise_round == t - 1
        out, metrics = s.aggregate_train(t, replies)
        expected = ref.next(torch.zeros(D)).numpy().astype(np.float64)
        np.testing.assert_allclose(_flat(out) - g, expected, atol=1e-5)
        assert metrics["noise_std"] == pytest.approx(1.0)
        arrays = out
    assert s.noise_round == 4


def test_server_optimizer_momentum_weight_decay_and_schedule() -> None:
    cfg = _cfg(mechanism="fedavg", rounds=4, schedule="exponential", server_lr=0.5,
               server_gamma=0.5, server_momentum=0.9, server_weight_decay=0.1)
    s = DPMatrixFactorizationFedAvg(config=cfg)
    rates = cfg.schedule_rates()
    np.testing.assert_allclose(cfg.workload().rates, rates)
    assert cfg.workload().momentum == 0.9 and cfg.workload().weight_decay == 0.1
    arrays = _init()
    theta = _flat(arrays)
    mom = np.zeros(D)
    delta = np.linspace(0, 0.3, D)
    for t in range(1, 5):
        g = _flat(arrays)
        nodes = _round(s, arrays, t)
        out, _ = s.aggregate_train(t, [make_train_reply(n, _model(g + delta)) for n in nodes])
        mom = 0.9 * mom + delta  # u_t = average delta (3 replies / m=3)
        theta = 0.9 * theta + rates[t - 1] * mom
        np.testing.assert_allclose(_flat(out), theta, atol=1e-5)
        arrays = out


def test_client_clipping_sends_clip_and_rejects_oversized() -> None:
    s = DPMatrixFactorizationFedAvg(config=_cfg(clipping="client", noise_multiplier=1e-9,
                                                clip_norm=0.5))
    init = _init()
    grid = InProcessGrid(lambda n, m: None, list(range(1, 7)))
    msgs = list(s.configure_train(1, init, ConfigRecord(), grid))
    assert msgs[0].content["config"]["clip-norm"] == 0.5
    nodes = [int(m.metadata.dst_node_id) for m in msgs]
    g0 = _flat(init)
    u = np.ones(D) / math.sqrt(D)
    replies = [
        make_train_reply(nodes[0], _model(g0 + 0.5 * u),
                         {"num-examples": 1, "delta-norm": 2.0, "clipped": 1}),
        make_train_reply(nodes[1], _model(g0 + 0.6 * u),  # lies: not clipped
                         {"num-examples": 1, "delta-norm": 0.3, "clipped": 0}),
        make_train_reply(nodes[2], _model(g0 + 0.2 * u),
                         {"num-examples": 1, "delta-norm": 0.2, "clipped": 0}),
    ]
    out, metrics = s.aggregate_train(1, replies)
    assert metrics["num_rejected"] == 1 and metrics["num_clipped"] == 1
    np.testing.assert_allclose(_flat(out), g0 + 0.7 * u / 3, atol=1e-5)


def test_adaptive_clip_moves_toward_target_quantile() -> None:
    # all updates far below the clip -> unclipped fraction ~1 > gamma -> the clip shrinks
    cfg = _cfg(clipping="adaptive", noise_multiplier=2.0, clip_count_stddev=0.5,
               clip_quantile=0.5, clip_lr=0.2, rounds=4)
    s = DPMatrixFactorizationFedAvg(config=cfg)
    count_rng = np.random.default_rng([7, 0x636C6970])  # the strategy's (seeded) count noise
    arrays = _init()
    clip = 1.0
    for t in range(1, 3):
        g = _flat(arrays)
        nodes = _round(s, arrays, t)
        arrays, m = s.aggregate_train(t, [make_train_reply(n, _model(g + 1e-3)) for n in nodes])
        assert m["clip_norm"] == pytest.approx(clip)
        assert m["noise_std"] == pytest.approx(2.0 * clip / 3)  # noise scales with the clip
        frac = (3 + count_rng.normal(0.0, 0.5)) / 3
        clip *= math.exp(-0.2 * (frac - 0.5))
        assert s.clip_norm == pytest.approx(clip)
    assert s.clip_norm < 1.0
    # all updates far above the clip -> fraction ~0 < gamma -> the clip grows
    s2 = DPMatrixFactorizationFedAvg(config=cfg)
    arrays = _init()
    g = _flat(arrays)
    nodes = _round(s2, arrays, 1)
    s2.aggregate_train(1, [make_train_reply(n, _model(g + 10.0)) for n in nodes])
    assert s2.clip_norm > 1.0
    # the count queries cost privacy
    fixed = DPMatrixFactorizationFedAvg(config=_cfg(noise_multiplier=2.0, rounds=4))
    assert s2.privacy["epsilon"] > fixed.privacy["epsilon"]
    assert s2.privacy["clip_count_stddev"] == 0.5


def test_noise_only_update_when_round_skipped() -> None:
    s = DPMatrixFactorizationFedAvg(config=_cfg(noise_multiplier=1.0))
    init = _init()
    nodes = _round(s, init)
    g = _flat(init)
    arrays, _ = s.aggregate_train(1, [make_train_reply(n, _model(g)) for n in nodes])
    # round 2 belongs to the other cohort; only round-1 nodes are connected -> skip
    grid = InProcessGrid(lambda n, m: None, nodes)
    assert list(s.configure_train(2, arrays, ConfigRecord(), grid)) == []
    out, metrics = s.aggregate_train(2, [])
    assert metrics["skipped"] == 1 and metrics["num_accepted"] == 0
    assert s.noise_round == 2
    assert not np.allclose(_flat(out), _flat(arrays))  # noise-only update applied


def test_rounds_must_be_in_order_and_within_horizon() -> None:
    s = DPMatrixFactorizationFedAvg(config=_cfg(rounds=2))
    init = _init()
    with pytest.raises(ValueError, match="server_round"):
        _round(s, init, t=2)
    with pytest.raises(RuntimeError):
        s.aggregate_train(1, [])


def test_array_roundtrip_helpers() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for arr in (x, np.asfortranarray(x), x.astype(np.float64), np.array(3, np.int64),
                np.zeros((0, 2), np.float32)):
        a = array_from_numpy(arr)
        assert array_to_numpy(a).shape == arr.shape == a.shape
        np.testing.assert_array_equal(array_to_numpy(a), arr)
        np.testing.assert_array_equal(a.numpy(), arr)
    from flwr.app import Array

    assert array_from_numpy(x).data == Array(x).data


def test_sq_norm_is_exact_to_float64() -> None:
    """Against ``math.fsum`` of the float64 squares (an exactly rounded reference)."""
    import math

    import numpy as np

    from strategies.arrays import sq_norm

    rng = np.random.default_rng(0)
    for x in (rng.standard_normal(1_000_003).astype(np.float32),
              (rng.random((37, 11)) * 1e3).astype(np.float32), np.zeros(5, np.float32),
              rng.standard_normal(999)):
        ref = math.fsum(float(v) ** 2 for v in x.astype(np.float64).ravel())
        assert sq_norm(x) == pytest.approx(ref, rel=1e-12, abs=0.0)
