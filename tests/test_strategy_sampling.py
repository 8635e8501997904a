"""Secret (amplified) sampling: rates, uniform bins, limits, resume, denominator, secrecy."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clients_fixtures import write_tiny_cifar
from flower_helpers import (
    InProcessGrid,
    as_array_record,
    make_error_reply,
    make_train_reply,
    task_identity,
)
from flwr.app import ArrayRecord, ConfigRecord
from scipy import stats

from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.participation import ClientDirectory
from strategies.sampling import SecretCohorts, select_secret


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def _draw_rounds(*, num: int, rounds: int, b: int, rate: float, k: int,
                 seed: int = 0) -> tuple[SecretCohorts, dict[int, list[str]]]:
    rng = np.random.default_rng(seed)
    cohorts = SecretCohorts(num_cohorts=b, max_participations=k, rng=rng)
    grid = InProcessGrid(lambda n, m: None, list(range(1, num + 1)))
    directory = ClientDirectory(query_timeout=5.0)
    picked: dict[int, list[str]] = {}
    for t in range(1, rounds + 1):
        chosen, drawn = select_secret(grid=grid, directory=directory, cohorts=cohorts, rng=rng,
                                      rate=rate, server_round=t, num_clients=num, timeout=0.0)
        assert drawn == len(chosen)  # everyone is connected: no dropouts
        cohorts.record(chosen, t)
        picked[t] = sorted(chosen)
    return cohorts, picked


def test_poisson_rate_per_client_within_4_sigma() -> None:
    num, rounds, q = 40, 300, 0.2
    cohorts, picked = _draw_rounds(num=num, rounds=rounds, b=1, rate=q, k=rounds)
    counts = Counter(c for ids in picked.values() for c in ids)
    sigma = math.sqrt(rounds * q * (1 - q))
    for cid in map(str, range(1, num + 1)):
        assert abs(counts[cid] - rounds * q) <= 4 * sigma, (cid, counts[cid])
    # independent of the round: the per-round count is Binomial(num, q)
    sizes = np.array([len(v) for v in picked.values()])
    assert abs(sizes.mean() - num * q) <= 4 * math.sqrt(num * q * (1 - q) / rounds)
    cohorts.check_limits()


def test_cyclic_poisson_only_in_group_rounds_at_rate_q() -> None:
    num, rounds, b, q = 60, 240, 3, 0.5
    cohorts, picked = _draw_rounds(num=num, rounds=rounds, b=b, rate=q, k=rounds // b)
    for t, ids in picked.items():
        assert all(cohorts.cohort_of(c) == (t - 1) % b for c in ids)
    per_client = Counter(c for ids in picked.values() for c in ids)
    opportunities = rounds // b
    sigma = math.sqrt(opportunities * q * (1 - q))
    for cid in map(str, range(1, num + 1)):
        assert abs(per_client[cid] - opportunities * q) <= 4 * sigma
    cohorts.check_limits()  # >= b apart, <= k


def test_balls_in_bins_uniform_and_independent() -> None:
    num, b = 4000, 4
    cohorts = SecretCohorts(num_cohorts=b, max_participations=1, rng=np.random.default_rng(3))
    ids = [f"c{i:05d}" for i in range(num)]
    cohorts.assign(ids)
    bins = np.array([cohorts.cohort_of(c) for c in ids])
    sizes = np.bincount(bins, minlength=b)
    assert len(set(sizes.tolist())) > 1  # not an equal split
    assert stats.chisquare(sizes).pvalue > 1e-3  # uniform
    pairs = np.zeros((b, b))
    for x, y in itertools.pairwise(bins):
        pairs[x, y] += 1
    assert stats.chi2_contingency(pairs).pvalue > 1e-3  # consecutive draws independent


def test_balls_in_bins_round_serves_its_whole_bin_and_respects_limits() -> None:
    num, rounds, b = 30, 12, 3
    cohorts, picked = _draw_rounds(num=num, rounds=rounds, b=b, rate=1.0,
                                   k=math.ceil(rounds / b))
    groups = cohorts.cohorts()
    for t, ids in picked.items():
        assert ids == groups[(t - 1) % b]
    cohorts.check_limits()
    assert max(len(v) for v in cohorts.history.values()) == math.ceil(rounds / b)


def test_secret_assignment_not_derived_from_the_public_seed() -> None:
    a = _strategy(sampling="balls-in-bins", noise_seed=-1, insecure_reproducible=False)
    b = _strategy(sampling="balls-in-bins", noise_seed=-1, insecure_reproducible=False)
    ids = [str(i) for i in range(200)]
    a.cohorts.assign(ids)
    b.cohorts.assign(ids)
    assert a.cohorts.cohorts() != b.cohorts.cohorts()  # same public seed, different secrets


# ------------------------------------------------------------------ strategy level
def _init() -> ArrayRecord:
    return as_array_record({"w": np.zeros(8, np.float32)})


def _strategy(**kw: Any) -> DPMatrixFactorizationFedAvg:
    cfg: dict[str, Any] = dict(mechanism="dp-fedavg", rounds=8, clients_per_round=3,
                               num_clients=12, noise_multiplier=1.0, noise_seed=1,
                               insecure_reproducible=True, seed=0, participation_timeout=0.0,
                               schedule="constant", sampling="poisson")
    cfg.update(kw)
    return DPMatrixFactorizationFedAvg(config=DPConfig(**cfg), poll_interval=0.01)


def _run(s: DPMatrixFactorizationFedAvg, grid: InProcessGrid, rounds: range,
         arrays: ArrayRecord, *, fail: set[int] = frozenset()) -> tuple[ArrayRecord,
                                                                          dict[int, list[int]]]:
    sent: dict[int, list[int]] = {}
    for t in rounds:
        msgs = list(s.configure_train(t, arrays, ConfigRecord(), grid))
        ids = sorted(int(m.metadata.dst_node_id) for m in msgs)
        sent[t] = ids
        replies = [make_error_reply(i) if i in fail else
                   make_train_reply(i, {"w": np.ones(8, np.float32)}) for i in ids]
        out, _ = s.aggregate_train(t, replies)
        arrays = out if out is not None else arrays
    return arrays, sent


@pytest.mark.parametrize("sampling", ["poisson", "balls-in-bins", "cyclic-poisson"])
def test_resume_keeps_the_secret_assignment_and_continues_its_rng(sampling: str,
                                                                  tmp_path: Path) -> None:
    kw = dict(sampling=sampling, checkpoint_dir=str(tmp_path / sampling),
              min_sep=0 if sampling == "poisson" else 2)
    nodes = list(range(1, 13))
    whole = _strategy(**{**kw, "checkpoint_dir": ""})
    _, expected = _run(whole, InProcessGrid(lambda n, m: None, nodes), range(1, 9), _init())

    first = _strategy(**kw)
    arrays, sent = _run(first, InProcessGrid(lambda n, m: None, nodes), range(1, 5), _init())
    assignment = first.cohorts.cohorts()
    second = _strategy(**kw)  # a restart: fresh object, state from the checkpoint
    second.resume()
    assert second.cohorts.cohorts() == assignment  # nothing is redrawn
    _, rest = _run(second, InProcessGrid(lambda n, m: None, nodes), range(5, 9),
                   second.global_arrays() or arrays)
    assert {**sent, **rest} == expected
    second.cohorts.check_limits()


def test_fixed_denominator_with_dropouts() -> None:
    s = _strategy(mechanism="fedavg", sampling="balls-in-bins", num_clients=12,
                  clients_per_round=4, min_sep=3, server_lr=1.0)
    grid = InProcessGrid(lambda n, m: None, list(range(1, 13)))
    cohort = [int(c) for c in s.cohorts.cohorts().get(0, [])]  # unassigned before round 1
    assert cohort == []
    msgs = list(s.configure_train(1, _init(), ConfigRecord(), grid))
    ids = sorted(int(m.metadata.dst_node_id) for m in msgs)
    assert ids, "the fixed seed draws a non-empty first bin"
    failing = set(ids[: len(ids) // 2])
    replies = [make_error_reply(i) if i in failing else
               make_train_reply(i, {"w": np.ones(8, np.float32)}) for i in ids]
    arrays, _ = s.aggregate_train(1, replies)
    ok = len(ids) - len(failing)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(8, ok / 4), rtol=1e-6)
    counts = s.participation_report()["counts"]["1"]
    assert counts["failures"] == len(failing) and counts["accepted"] == ok


def test_participation_withheld_from_metrics_and_logs(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    s = _strategy(sampling="poisson")
    grid = InProcessGrid(lambda n, m: None, list(range(1, 13)))
    with caplog.at_level(logging.DEBUG, logger="flwr"):
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.addHandler(caplog.handler)
        try:
            _run(s, grid, range(1, 4), _init(), fail={1, 2, 3})
        finally:
            flwr_logger.removeHandler(caplog.handler)
    metrics = s.last_train_metrics
    assert not {"num_accepted", "num_sampled", "num_failures", "norm_mean"} & set(metrics)
    text = caplog.text
    assert "accepted" not in text and "sampled" not in text and "node " not in text
    assert s.participation_secret
    released = _strategy(sampling="poisson", release_participation=True)
    _run(released, grid, range(1, 2), _init())
    assert "num_accepted" in released.last_train_metrics


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("backend", ["inprocess", "vectorized"])
def test_amplified_run_releases_no_participation(backend: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    monkeypatch.setenv("FEDMF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMF_DATA_DIR", raising=False)
    data = tmp_path / "data"
    write_tiny_cifar(data)
    out, ckpt = tmp_path / "run", tmp_path / "private"
    config = RunConfig.from_run_config(
        {"data-dir": str(data), "rounds": 4, "num-clients": 6, "clients-per-round": 3,
         "mechanism": "dp-fedavg", "sampling": "balls-in-bins", "min-sep": 2,
         "batch-size": 8, "output-dir": str(out), "checkpoint-dir": str(ckpt),
         "noise-multiplier": 2.0})
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            summary = run_simulation(config, backend=backend)
    finally:
        flwr_logger.removeHandler(caplog.handler)
    assert summary["sampling"] == "balls-in-bins"
    assert summary["participation_released"] is False and summary["failures"] is None
    assert not (out / "participation.json").exists()
    private = json.loads((ckpt / "participation.json").read_text())
    assert (ckpt / "participation.json").stat().st_mode & 0o077 == 0  # owner-only
    assert private["private"] is True and private["sampling"] == "balls-in-bins"
    lists = [json.dumps(sorted(r)) for r in
             _rounds_of(private["clients"], rounds=4).values() if r]
    assert lists, "some client took part"
    released = "\n".join(p.read_text() for p in out.rglob("*") if p.is_file())
    for item in [*lists, '"clients"']:
        assert item not in released and item not in caplog.text
    for row in (json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()):
        assert row["accepted"] is None and row["failures"] is None and row["clipped"] is None
    assert "sampled" not in caplog.text and "accepted" not in caplog.text


def _rounds_of(clients: dict[str, list[int]], *, rounds: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {t: [] for t in range(1, rounds + 1)}
    for cid, rs in clients.items():
        for t in rs:
            out[t].append(cid)
    return out
