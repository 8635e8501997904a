"""The privacy ledger (``fedmf.ledger``) and the mechanism spec (``fedmf.mechanisms``): one
formula for every release, checked against brute force and ``dp_accounting`` routes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmf import accounting
from fedmf.factorizations import factorize
from fedmf.ledger import PLD_MAX_EPSILON, privacy_ledger
from fedmf.mechanisms import MECHANISMS, MechanismSpec, cohort_participation, mechanism
from fedmf.participation import Participation
from fedmf.schedules import learning_rates
from fedmf.sensitivity import brute_force_sensitivity
from fedmf.workloads import sgd_workload

DELTA = 1e-5


def test_cohort_participation_means_what_simulate_means() -> None:
    auto = cohort_participation(rounds=20, num_clients=10, clients_per_round=5)
    assert auto == Participation.cyclic(max_participations=10, min_sep=2)
    assert cohort_participation(rounds=20, min_sep=4) == Participation.cyclic(
        max_participations=5, min_sep=4)
    assert cohort_participation(rounds=20, min_sep=4, kind="min-sep",
                                max_participations=3) == Participation.min_separation(
        min_sep=4, max_participations=3)
    assert cohort_participation(rounds=1, min_sep=1) == Participation.single()
    for kwargs, key in (({"min_sep": 0}, "min-sep"), ({"min_sep": -1}, "min-sep"),
                        ({"min_sep": 8, "max_participations": 4}, "max-participations"),
                        ({"min_sep": 2, "kind": "poisson"}, "participation")):
        with pytest.raises(ValueError, match=rf"^{key}"):
            cohort_participation(rounds=16, **kwargs)


def test_spec_is_the_strategy_workload_and_factorization() -> None:
    part = cohort_participation(rounds=12, min_sep=3)
    spec = MechanismSpec(method="bisr", rounds=12, schedule="cosine", lr=0.5, final_lr=0.05,
                         momentum=0.3, participation=part, bands=3)
    rates = learning_rates(rounds=12, schedule="cosine", lr=0.5, final_lr=0.05)
    assert spec.workload() == sgd_workload(rates=rates, momentum=0.3)
    direct = factorize(method="bisr", workload=spec.workload(), participation=part, bands=3)
    assert spec.factorization() is spec.factorization()  # cached
    np.testing.assert_allclose(spec.factorization().strategy_matrix(),
                               direct.strategy_matrix())
    assert spec.factorization().mean_error == pytest.approx(direct.mean_error)
    with pytest.raises(ValueError, match=r"^bands"):
        MechanismSpec(method="bisr", rounds=4, bands=5)
    with pytest.raises(ValueError, match=r"^method"):
        MechanismSpec(method="dp-fedavg", rounds=4)


def test_registry() -> None:
    assert mechanism("dp-fedavg").method == "identity" and mechanism("dp-fedavg").private
    assert mechanism("fedavg").method is None and not mechanism("fedavg").private
    assert mechanism("flower-dp").runner == "flower"
    assert all(MECHANISMS[m].correlated for m in ("sqrt", "bisr", "lr-bisr", "opt-bisr"))
    with pytest.raises(ValueError, match=r"^mechanism .*'identity' is now 'dp-fedavg'"):
        mechanism("identity")


def _ledger(method: str, *, n: int = 8, b: int = 2, bands: int | None = 2, **kw: object):
    spec = MechanismSpec(method=method, rounds=n, participation=cohort_participation(
        rounds=n, min_sep=b), bands=bands, schedule="cosine", final_lr=0.1)
    return spec.factorization(), privacy_ledger(factorization=spec.factorization(),
                                                delta=DELTA, **kw)


def test_calibrated_ledger_meets_the_target() -> None:
    fact, ledger = _ledger("bisr", epsilon=4.0)
    sens = float(fact.sensitivity.value)
    assert ledger.sensitivity == sens and ledger.max_participations == 4
    assert ledger.epsilon <= 4.0 + 1e-9 and ledger.epsilon == pytest.approx(4.0, rel=1e-3)
    assert ledger.epsilon == accounting.epsilon(noise_multiplier=ledger.noise_multiplier,
                                                sensitivity=sens, delta=DELTA)
    assert ledger.rho == pytest.approx(sens**2 / (2 * ledger.noise_multiplier**2))


@pytest.mark.parametrize("method", ["bisr", "sqrt", "identity"])
def test_epsilon_spent_uses_the_prefix_sensitivity(method: str) -> None:
    """Round t's ledger = the Gaussian of C's top-left t x t block with ceil(t/b) participations
    (brute force over every cohort pattern), capped by the total."""
    fact, ledger = _ledger(method, noise_multiplier=2.0, bands=2 if method == "bisr" else None)
    C = fact.strategy_matrix()
    spent = [ledger.epsilon_spent(t) for t in range(0, 9)]
    assert spent[0] == 0.0 and spent[-1] == ledger.epsilon
    assert spent == sorted(spent)
    for t in range(1, 8):
        k_t = min(4, math.ceil(t / 2))
        part = (Participation.single() if k_t == 1
                else Participation.cyclic(max_participations=k_t, min_sep=2))
        sens_t = brute_force_sensitivity(C[:t, :t], part)
        expected = accounting.analytic_gaussian_epsilon(noise_multiplier=2.0,
                                                        sensitivity=sens_t, delta=DELTA)
        assert spent[t] == pytest.approx(min(expected, ledger.epsilon), rel=1e-9), t


def test_independent_noise_equals_k_fold_composition() -> None:
    """dp-fedavg (identity factorization) is one Gaussian with sensitivity sqrt(k): the same
    epsilon as dp_accounting's k-fold self-composition."""
    _, ledger = _ledger("identity", n=30, b=3, bands=None, noise_multiplier=3.0)
    assert ledger.sensitivity == pytest.approx(math.sqrt(10))
    composed = accounting.dpfedavg_epsilon(noise_multiplier=3.0, participations=10,
                                           delta=DELTA)
    assert ledger.epsilon == pytest.approx(composed, rel=1e-5)


def test_adaptive_clipping_is_composed_in() -> None:
    fact, ledger = _ledger("bisr", noise_multiplier=2.0, clip_count_stddev=0.5,
                           clients_per_round=10)
    sens = float(fact.sensitivity.value)
    assert ledger.epsilon == pytest.approx(accounting.adaptive_clipping_epsilon(
        noise_multiplier=2.0, clip_count_stddev=0.5, clients_per_round=10, participations=4,
        sensitivity=sens, delta=DELTA))
    assert ledger.rho == pytest.approx(sens**2 / 8 + 4 / (2 * 0.25))
    _, fixed = _ledger("bisr", noise_multiplier=2.0)
    assert ledger.epsilon > fixed.epsilon


def test_huge_epsilon_uses_the_exact_closed_form_and_non_private_is_inf() -> None:
    fact, ledger = _ledger("bisr", noise_multiplier=0.01)
    closed = accounting.analytic_gaussian_epsilon(
        noise_multiplier=0.01, sensitivity=float(fact.sensitivity.value), delta=DELTA)
    assert closed > PLD_MAX_EPSILON and ledger.epsilon == closed
    none = privacy_ledger(factorization=None, delta=DELTA, rounds=5)
    assert none.epsilon == none.rho == none.epsilon_spent(3) == math.inf
    with pytest.raises(ValueError, match=r"^epsilon"):
        privacy_ledger(factorization=fact, delta=DELTA)
