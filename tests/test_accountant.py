"""Flower's ``PrivacyAccountant`` protocol answered for the correlated release
(``strategies.accountant``): the same epsilon as the ledger, prefixes, budgets and state."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from flower_helpers import InProcessGrid, as_array_record, make_train_reply, task_identity
from flwr.app import ConfigRecord
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    PrivacyAccountant,
    SamplingMethod,
)

from fedmf import accounting
from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.accountant import ACCOUNTING_METHOD, MatrixFactorizationAccountant

CFG = dict(mechanism="bisr", rounds=12, bands=2, min_sep=3, clients_per_round=2,
           num_clients=8, epsilon=3.0, participation_timeout=0.0)


def _accountant(**kw: object) -> tuple[MatrixFactorizationAccountant, DPConfig]:
    cfg = DPConfig(**{**CFG, **kw})  # type: ignore[arg-type]
    return MatrixFactorizationAccountant(ledger=cfg.ledger(), population_size=cfg.num_clients,
                                         max_epsilon=2.0), cfg


def _event(cfg: DPConfig, z: float | None = None) -> GaussianPrivacyEvent:
    return GaussianPrivacyEvent(noise_multiplier=z or cfg.ledger().noise_multiplier,
                                sample_size=cfg.clients_per_round,
                                population_size=cfg.num_clients)


def test_implements_flower_protocol() -> None:
    members = {n for n in dir(PrivacyAccountant) if not n.startswith("_")}
    for name in members:
        ours, theirs = getattr(MatrixFactorizationAccountant, name), getattr(
            PrivacyAccountant, name)
        if callable(theirs):
            assert list(inspect.signature(ours).parameters) == list(
                inspect.signature(theirs).parameters), name
        else:
            assert isinstance(ours, property), name
    acc, _ = _accountant()
    assert acc.config.sampling_method is SamplingMethod.NO_AMPLIFICATION


def test_epsilon_follows_the_ledger_prefix_by_prefix() -> None:
    acc, cfg = _accountant()
    ledger = cfg.ledger()
    assert acc.get_epsilon(cfg.delta) == 0.0 and acc.get_delta(1.0) == 0.0
    seen = []
    for t in range(1, cfg.rounds + 1):
        acc.compose(_event(cfg))
        spent = acc.get_privacy_spent()
        assert spent.num_releases == t and spent.delta == cfg.delta
        assert spent.accounting_method == ACCOUNTING_METHOD
        assert spent.epsilon == pytest.approx(ledger.epsilon_spent(t), rel=1e-12)
        seen.append(spent.epsilon)
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert seen[-1] == pytest.approx(3.0, rel=1e-4)  # the calibrated total
    # a prefix t < b holds one participation: sens = the largest column norm of C[:t, :t]
    C = np.asarray(cfg.factorization().strategy_matrix())
    col = float(np.linalg.norm(C[:2, :2], axis=0).max())
    assert ledger.epsilon_spent(2) == pytest.approx(float(
        accounting.analytic_gaussian_epsilon(noise_multiplier=ledger.noise_multiplier / col,
                                             sensitivity=1.0, delta=cfg.delta)), rel=1e-9)


def test_delta_and_epsilon_invert_each_other() -> None:
    acc, cfg = _accountant()
    acc.compose(_event(cfg), count=cfg.rounds)
    for delta in (1e-3, 1e-5, 1e-8):
        eps = acc.get_epsilon(delta)
        assert acc.get_delta(eps) == pytest.approx(delta, rel=1e-5)
    assert acc.get_epsilon(1e-8) > acc.get_epsilon(1e-5) > acc.get_epsilon(1e-3)


def test_would_exceed_looks_ahead_without_composing() -> None:
    acc, cfg = _accountant()
    ledger = cfg.ledger()
    first_over = next(t for t in range(1, cfg.rounds + 1) if ledger.epsilon_spent(t) > 2.0)
    acc.compose(_event(cfg), count=first_over - 1)
    assert acc.would_exceed(_event(cfg), max_epsilon=1e-3)
    assert not acc.would_exceed(_event(cfg), max_epsilon=100.0, count=3)
    assert acc.num_releases == first_over - 1
    assert acc.would_exceed(_event(cfg), count=1) is (ledger.epsilon_spent(first_over) > 2.0)


def test_bad_input_is_refused_by_name() -> None:
    acc, cfg = _accountant()
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.compose(_event(cfg, z=0.5 * cfg.ledger().noise_multiplier))
    with pytest.raises(ValueError, match="count"):
        acc.compose(_event(cfg), count=0)
    with pytest.raises(ValueError, match="rounds"):
        acc.compose(_event(cfg), count=cfg.rounds + 1)
    with pytest.raises(ValueError, match="delta"):
        acc.get_epsilon(0.0)
    with pytest.raises(ValueError, match="epsilon"):
        acc.get_delta(-1.0)
    no_budget = MatrixFactorizationAccountant(ledger=cfg.ledger(), population_size=8)
    with pytest.raises(ValueError, match="max_epsilon"):
        no_budget.would_exceed(_event(cfg))


def test_state_round_trip() -> None:
    acc, cfg = _accountant()
    acc.compose(_event(cfg), count=5)
    state = acc.state_dict()
    fresh, _ = _accountant()
    fresh.load_state_dict(state)
    assert fresh.num_releases == 5
    assert fresh.get_epsilon(cfg.delta) == acc.get_epsilon(cfg.delta)
    with pytest.raises(ValueError, match="accountant state"):
        fresh.load_state_dict({**state, "backend": "rdp"})
    other, _ = _accountant(epsilon=1.0)  # another release: other noise multiplier
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load_state_dict(state)


def test_strategy_exposes_the_accountant() -> None:
    """Code written against Flower's API reads the strategy's epsilon after each round."""
    cfg = DPConfig(**CFG, clipping="server")  # type: ignore[arg-type]
    s = DPMatrixFactorizationFedAvg(config=cfg, poll_interval=0.01)
    assert DPMatrixFactorizationFedAvg(config=DPConfig(mechanism="fedavg", rounds=4)
                                       ).accountant is None
    theta = np.zeros(3, np.float32)
    grid = InProcessGrid(lambda n, m: None, list(range(1, 9)))
    with task_identity():
        for t in (1, 2):
            msgs = list(s.configure_train(t, as_array_record({"w": theta}), ConfigRecord(),
                                          grid))
            replies = [make_train_reply(int(m.metadata.dst_node_id),
                                        {"w": theta + 0.1 * (i + 1)}) for i, m in enumerate(msgs)]
            _, metrics = s.aggregate_train(t, replies)
            spent = s.accountant.get_privacy_spent()
            assert spent.num_releases == t
            assert spent.epsilon == pytest.approx(metrics["epsilon_spent"], rel=1e-12)
            assert math.isfinite(spent.epsilon) and spent.epsilon < 3.0


def test_names_the_sampling_and_answers_the_amplified_ledger() -> None:
    cfg = DPConfig(mechanism="dp-fedavg", rounds=12, clients_per_round=2, num_clients=8,
                   epsilon=3.0, sampling="poisson", participation_timeout=0.0)
    acc = MatrixFactorizationAccountant(ledger=cfg.ledger(), population_size=cfg.num_clients)
    assert acc.config.sampling_method is SamplingMethod.POISSON and acc.sampling == "poisson"
    for _ in range(cfg.rounds):
        acc.compose(_event(cfg))
    assert acc.get_epsilon(cfg.delta) == pytest.approx(cfg.ledger().epsilon, rel=1e-9)
    assert acc.get_epsilon(cfg.delta) <= 3.0 * (1 + 1e-3)
    bins = DPConfig(**{**CFG, "sampling": "balls-in-bins", "mechanism": "bsr"})
    acc = MatrixFactorizationAccountant(ledger=bins.ledger(), population_size=8)
    assert acc.config.sampling_method is SamplingMethod.POISSON
    assert acc.sampling == "balls-in-bins"
