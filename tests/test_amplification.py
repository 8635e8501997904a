"""Amplification by sampling (``fedmf.amplification``) and its ledger integration: closed
events against ``dp_accounting``, Monte Carlo against exact Gaussians and brute-force
integration of the balls-in-bins pair, calibration, refusals, epsilon spent."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant

from fedmf import accounting
from fedmf import amplification as amp
from fedmf.factorizations import Factorization, factorize
from fedmf.ledger import privacy_ledger
from fedmf.mechanisms import MechanismSpec, cohort_participation
from fedmf.participation import Participation
from fedmf.workloads import prefix_workload

DELTA = 1e-5


def _pld(event: dp_accounting.DpEvent, delta: float) -> float:
    acc = PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _fact(method: str, *, n: int, b: int, bands: int | None = None,
          poisson: bool = False) -> Factorization:
    part = (Participation.min_separation(min_sep=1, max_participations=n) if poisson
            else cohort_participation(rounds=n, min_sep=b))
    return MechanismSpec(method=method, rounds=n, participation=part, bands=bands,
                         momentum=0.5).factorization()


def test_one_list_of_samplings() -> None:
    from fedmf.mechanisms import SAMPLINGS

    assert amp.SAMPLINGS == SAMPLINGS
    assert set(amp.ACCOUNTANTS) == set(SAMPLINGS)


# ---------------------------------------------------------------------------- closed events
def test_closed_events_match_dp_accounting() -> None:
    z, q, n = 2.0, 0.25, 12
    direct = _pld(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n), DELTA)
    assert amp.poisson_epsilon(noise_multiplier=z, sampling_rate=q, rounds=n,
                               delta=DELTA) == pytest.approx(direct, rel=1e-12)
    # cyclic Poisson: ceil(n / b) compositions at z / max column norm
    direct = _pld(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.5, dp_accounting.GaussianDpEvent(z / 1.5)), 4), DELTA)
    assert amp.cyclic_poisson_epsilon(noise_multiplier=z, sampling_rate=0.5, rounds=11, bins=3,
                                      column_norm=1.5, delta=DELTA) == pytest.approx(direct)
    # q >= 1: the plain Gaussian
    plain = accounting.dpfedavg_epsilon(noise_multiplier=z, participations=4, delta=DELTA)
    assert amp.cyclic_poisson_epsilon(noise_multiplier=z, sampling_rate=1.2, rounds=8, bins=2,
                                      column_norm=1.0, delta=DELTA) == pytest.approx(plain)


@pytest.mark.slow
def test_closed_calibration_is_tight() -> None:
    z = amp.calibrate_poisson(epsilon=4.0, delta=DELTA, sampling_rate=0.1, rounds=10)
    assert amp.poisson_epsilon(noise_multiplier=z, sampling_rate=0.1, rounds=10,
                               delta=DELTA) <= 4.0
    assert amp.poisson_epsilon(noise_multiplier=z * (1 - 1e-3), sampling_rate=0.1, rounds=10,
                               delta=DELTA) > 4.0


# ---------------------------------------------------------------------------- Monte Carlo
def test_gram_is_m_transpose_m() -> None:
    fact = _fact("bsr", n=11, b=3, bands=3)
    C = fact.strategy_matrix()
    X = np.zeros((11, 3))
    for s in range(3):
        X[s::3, s] = 1.0
    M = C @ X
    column = amp.strategy_first_column(fact)
    np.testing.assert_allclose(
        amp.balls_in_bins_gram(first_column=column, rounds=11, bins=3), M.T @ M, rtol=1e-12)
    np.testing.assert_allclose(
        amp.balls_in_bins_gram(first_column=column, rounds=11, bins=3, prefix=5),
        M[:5].T @ M[:5], rtol=1e-12)


def test_kl_bound() -> None:
    up = amp.kl_upper_confidence(mean=0.01, samples=10_000, log_inverse_confidence=5.0)
    assert 0.01 < up < 0.02
    kl = 0.01 * math.log(0.01 / up) + 0.99 * math.log(0.99 / (1 - up))
    assert 10_000 * kl == pytest.approx(5.0, rel=1e-9)
    assert amp.kl_upper_confidence(mean=0.0, samples=100, log_inverse_confidence=2.0) == \
        pytest.approx(1 - math.exp(-0.02))


def test_identity_one_bin_is_the_exact_gaussian() -> None:
    """b = 1: every client in every round, P = N(1_n, z^2 I): mu = sqrt(n) / z exactly."""
    n, z = 9, 2.5
    G = amp.balls_in_bins_gram(first_column=np.ones(1), rounds=n, bins=1)
    for eps in (0.3, 1.0):
        res = amp.monte_carlo_delta(gram=G, noise_multiplier=z, epsilon=eps, samples=200_000,
                                    beta=1e-4)
        exact = accounting.analytic_gaussian_delta(mu=math.sqrt(n) / z, epsilon=eps)
        assert res.delta_estimate <= res.delta_upper
        assert exact <= res.delta_upper
        assert res.delta_estimate == pytest.approx(exact, rel=0.03)
        # a Gaussian pair is symmetric: both directions estimate the same delta
        assert res.estimates[0] == pytest.approx(res.estimates[1], rel=0.05)


def _brute_force(M: np.ndarray, z: float, eps: float, points: int) -> tuple[float, float]:
    """``(delta_remove, delta_add)`` of P = mean_s N(M e_s, z^2 I), Q = N(0, z^2 I) by a
    midpoint rule on a tensor grid over R^n (n <= 3)."""
    n, b = M.shape
    lo, hi = M.min() - 7 * z, M.max() + 7 * z
    h = (hi - lo) / points
    axis = lo + h * (np.arange(points) + 0.5)
    rem = add = 0.0
    for first in axis:  # one slab at a time (bounded memory)
        grid = np.stack(np.meshgrid(*([np.array([first])] + [axis] * (n - 1)),
                                    indexing="ij"), axis=-1).reshape(-1, n)
        q = np.exp(-(grid**2).sum(1) / (2 * z * z))
        p = np.mean([np.exp(-((grid - M[:, s])**2).sum(1) / (2 * z * z)) for s in range(b)],
                    axis=0)
        rem += np.maximum(p - math.exp(eps) * q, 0).sum()
        add += np.maximum(q - math.exp(eps) * p, 0).sum()
    norm = h**n / (2 * math.pi * z * z) ** (n / 2)
    return rem * norm, add * norm


@pytest.mark.parametrize(("method", "n", "b"), [("identity", 2, 2), ("identity", 3, 3),
                                                ("sqrt", 3, 2), ("bsr", 3, 3), ("sqrt", 2, 2)])
def test_monte_carlo_matches_brute_force_integration(method: str, n: int, b: int) -> None:
    fact = _fact(method, n=n, b=b, bands=2 if method == "bsr" else None)
    C = fact.strategy_matrix()
    X = np.zeros((n, b))
    for s in range(b):
        X[s::b, s] = 1.0
    M = C @ X
    G = amp.balls_in_bins_gram(first_column=amp.strategy_first_column(fact), rounds=n, bins=b)
    z = 0.8
    for eps in (0.2, 1.0):
        exact = _brute_force(M, z, eps, points=120 if n == 3 else 600)
        res = amp.monte_carlo_delta(gram=G, noise_multiplier=z, epsilon=eps, samples=300_000,
                                    beta=1e-3)
        for est, ref in zip(res.estimates, exact, strict=True):
            sd = math.sqrt(max(ref, 1e-6) / 300_000)  # values in [0, 1]: var <= mean
            assert abs(est - ref) <= 5 * sd + 1e-3 * ref, (eps, res.estimates, exact)
        assert max(exact) <= res.delta_upper


def test_both_directions_are_reported() -> None:
    """The estimate reported is the larger direction's (both are checked against exact
    integration above)."""
    G = amp.balls_in_bins_gram(first_column=np.ones(1), rounds=3, bins=3)
    res = amp.monte_carlo_delta(gram=G, noise_multiplier=0.8, epsilon=0.01, samples=60_000)
    assert res.delta_estimate == max(res.estimates)
    assert res.direction == ("add" if res.estimates[1] > res.estimates[0] else "remove")


def test_fixed_seed_same_estimate_and_formal_above_plain() -> None:
    G = amp.balls_in_bins_gram(first_column=np.ones(1), rounds=8, bins=4)
    kw = {"gram": G, "noise_multiplier": 1.5, "delta": 1e-3, "samples": 100_000}
    a = amp.monte_carlo_epsilon(**kw, seed=3)
    amp._mc_epsilon_cached.cache_clear()
    b = amp.monte_carlo_epsilon(**kw, seed=3)
    assert (a.epsilon, a.delta_estimate, a.delta_upper) == (b.epsilon, b.delta_estimate,
                                                            b.delta_upper)
    c = amp.monte_carlo_epsilon(**kw, seed=4)
    assert c.epsilon != a.epsilon
    assert a.delta_estimate < a.delta_upper <= 1e-3
    # amplification helps: the un-amplified epsilon (2 participations of 4 bins) is larger
    unamplified = accounting.dpfedavg_epsilon(noise_multiplier=1.5, participations=2,
                                              delta=1e-3)
    assert a.epsilon < unamplified


def test_calibration_hits_the_target() -> None:
    fact = _fact("bsr", n=12, b=4, bands=4)
    G = amp.balls_in_bins_gram(first_column=amp.strategy_first_column(fact), rounds=12, bins=4)
    res = amp.calibrate_monte_carlo(gram=G, epsilon=1.0, delta=1e-3, samples=400_000, seed=1)
    assert res.epsilon <= 1.0 and res.delta_upper <= 1e-3
    assert res.delta_estimate <= res.delta_upper
    smaller = amp.monte_carlo_epsilon(gram=G, noise_multiplier=0.98 * res.noise_multiplier,
                                      delta=1e-3, samples=400_000, seed=1)
    assert smaller.epsilon > 1.0
    again = amp.calibrate_monte_carlo(gram=G, epsilon=1.0, delta=1e-3, samples=400_000, seed=1)
    assert again is res  # cached in process


def test_too_few_samples_is_refused() -> None:
    G = amp.balls_in_bins_gram(first_column=np.ones(1), rounds=4, bins=2)
    with pytest.raises(ValueError, match=r"^samples"):
        amp.calibrate_monte_carlo(gram=G, epsilon=1.0, delta=1e-5, samples=10_000)
    tiny = amp.monte_carlo_epsilon(gram=G, noise_multiplier=3.0, delta=1e-5, samples=1_000)
    assert tiny.epsilon == math.inf


# ---------------------------------------------------------------------------- refusals
def _negative_column_factorization(n: int, b: int) -> Factorization:
    c = np.array([1.0, -0.3, 0.1])
    from fedmf.linalg import series_inverse

    return Factorization(method="custom", workload=prefix_workload(n),
                         participation=cohort_participation(rounds=n, min_sep=b),
                         bands=None, c_coeffs=c, cinv_coeffs=series_inverse(c, n))


@pytest.mark.parametrize(("sampling", "fact", "words"), [
    ("poisson", lambda: _fact("bsr", n=8, b=1, bands=2, poisson=True), ["poisson", "bsr"]),
    ("cyclic-poisson", lambda: _fact("bisr", n=8, b=2, bands=2), ["cyclic-poisson", "bisr"]),
    ("cyclic-poisson", lambda: _fact("bsr", n=8, b=2, bands=3), ["cyclic-poisson", "bsr"]),
    ("balls-in-bins", lambda: _negative_column_factorization(8, 2),
     ["balls-in-bins", "custom", ">= 0"]),
    ("balls-in-bins", lambda: factorize(method="optimal", workload=prefix_workload(4),
                                        participation=cohort_participation(rounds=4,
                                                                           min_sep=2)),
     ["balls-in-bins", "optimal", "Toeplitz"]),
])
def test_unsupported_pairs_are_refused(sampling: str, fact, words: list[str]) -> None:
    f = fact()
    with pytest.raises(ValueError, match=r"^sampling") as err:
        privacy_ledger(factorization=f, delta=DELTA, epsilon=2.0, sampling=sampling,
                       clients_per_round=2, num_clients=20, mc_samples=100_000)
    for word in words:
        assert word in str(err.value)


def test_adaptive_clipping_and_bad_participation_are_refused() -> None:
    f = _fact("bsr", n=8, b=2, bands=2)
    with pytest.raises(ValueError, match=r"^clipping.*'cyclic'.*balls-in-bins"):
        privacy_ledger(factorization=f, delta=DELTA, noise_multiplier=2.0,
                       clip_count_stddev=0.5, clients_per_round=5, sampling="balls-in-bins")
    with pytest.raises(ValueError, match=r"^participation.*poisson"):
        privacy_ledger(factorization=_fact("identity", n=8, b=2), delta=DELTA,
                       noise_multiplier=2.0, sampling="poisson", clients_per_round=2,
                       num_clients=20)
    with pytest.raises(ValueError, match=r"^sampling must be one of"):
        privacy_ledger(factorization=f, delta=DELTA, noise_multiplier=2.0, sampling="uniform")


# ---------------------------------------------------------------------------- ledger
def test_cyclic_ledger_unchanged() -> None:
    f = _fact("bsr", n=8, b=2, bands=2)
    ledger = privacy_ledger(factorization=f, delta=DELTA, epsilon=3.0)
    assert ledger.sampling == "cyclic" and ledger.epsilon_bound == "un-amplified"
    assert ledger.accountant == "pld" and ledger.epsilon_amplified is None
    assert ledger.epsilon == ledger.epsilon_unamplified
    assert ledger.noise_multiplier == accounting.calibrate_noise_multiplier(
        epsilon=3.0, delta=DELTA, sensitivity=float(f.sensitivity.value))


@pytest.mark.parametrize(("eps", "z_notes"), [
    (1.0, 8.51), (2.0, 4.64), pytest.param(8.0, 1.57, marks=pytest.mark.slow)])
def test_poisson_dpfedavg_matches_notes(eps: float, z_notes: float) -> None:
    """NOTES: n = 80, N = 1000, m = 250 (q = 0.25), delta 1e-5."""
    f = _fact("identity", n=80, b=1, poisson=True)
    ledger = privacy_ledger(factorization=f, delta=DELTA, epsilon=eps, sampling="poisson",
                            clients_per_round=250, num_clients=1000)
    assert ledger.noise_multiplier == pytest.approx(z_notes, rel=0.01)
    assert ledger.epsilon_bound == "amplified" and ledger.accountant == "pld-poisson"
    assert ledger.epsilon <= eps and ledger.epsilon_unamplified > eps
    assert ledger.noise_multiplier_amplified == ledger.noise_multiplier
    assert ledger.noise_multiplier_unamplified > 3 * ledger.noise_multiplier
    d = ledger.as_dict()
    assert d["epsilon_bound"] == "amplified" and d["sampling_rate"] == 0.25


def test_poisson_epsilon_spent_is_the_t_fold_composition() -> None:
    f = _fact("identity", n=20, b=1, poisson=True)
    ledger = privacy_ledger(factorization=f, delta=DELTA, noise_multiplier=2.0,
                            sampling="poisson", clients_per_round=10, num_clients=100)
    ts = (0, 1, 2, 7, 13, 20)
    spent = {t: ledger.epsilon_spent(t) for t in ts}
    assert list(spent.values()) == sorted(spent.values()) and spent[20] == ledger.epsilon
    def direct(t: int) -> float:
        return _pld(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            0.1, dp_accounting.GaussianDpEvent(2.0)), t), DELTA)

    for t in (1, 7, 13):
        # the value at the next checkpoint t' >= t, PLD at a coarser pessimistic grid: an upper
        # bound on round t's epsilon, within 1% of the exact t'-fold composition
        later = next(c for c in ledger.checkpoints() if c >= t)
        assert spent[t] >= direct(later) * (1 - 1e-9) >= direct(t) * (1 - 1e-9)
        assert spent[t] == pytest.approx(direct(later), rel=0.01)
    assert spent[20] == pytest.approx(direct(20), rel=1e-9)


def test_cyclic_poisson_ledger() -> None:
    f = _fact("bsr", n=12, b=4, bands=4)
    ledger = privacy_ledger(factorization=f, delta=DELTA, epsilon=2.0,
                            sampling="cyclic-poisson", clients_per_round=5, num_clients=100)
    norm = float(np.linalg.norm(amp.strategy_first_column(f)))
    assert ledger.accountant == "pld-cyclic-poisson" and ledger.epsilon_bound == "amplified"
    assert ledger.epsilon == pytest.approx(_pld(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(
            ledger.noise_multiplier / norm)), 3), DELTA))
    assert ledger.epsilon <= 2.0
    spent = [ledger.epsilon_spent(t) for t in (0, 1, 4, 5, 9, 12)]
    assert spent == sorted(spent) and spent[-1] == ledger.epsilon
    assert spent[3] == pytest.approx(amp.cyclic_poisson_epsilon(
        noise_multiplier=ledger.noise_multiplier, sampling_rate=0.2, rounds=5, bins=4,
        column_norm=norm, delta=DELTA))


def test_balls_in_bins_ledger() -> None:
    f = _fact("identity", n=12, b=4)
    ledger = privacy_ledger(factorization=f, delta=1e-3, epsilon=1.0, sampling="balls-in-bins",
                            mc_samples=200_000)
    assert ledger.accountant == "monte-carlo" and ledger.epsilon_bound == "amplified"
    assert ledger.epsilon <= 1.0 and ledger.epsilon <= ledger.epsilon_unamplified
    assert ledger.noise_multiplier < ledger.noise_multiplier_unamplified
    mc = ledger.monte_carlo
    assert mc is not None and mc.samples == 200_000 and mc.delta_upper <= 1e-3
    d = ledger.as_dict()
    assert d["mc_delta_upper"] == mc.delta_upper and d["accountant"] == "monte-carlo"
    spent = [ledger.epsilon_spent(t) for t in range(13)]
    assert spent == sorted(spent) and spent[-1] == ledger.epsilon
    assert all(s <= ledger.epsilon for s in spent)
    assert all(s <= ledger._unamplified_spent(t, None) for t, s in enumerate(spent) if t)
    # a sweep of seeds in one process calibrates once
    again = privacy_ledger(factorization=f, delta=1e-3, epsilon=1.0,
                           sampling="balls-in-bins", mc_samples=200_000)
    assert again.monte_carlo is mc


def test_ledger_reports_the_unamplified_bound_when_it_is_smaller() -> None:
    """Strongly correlated C with few bins: little amplification, and the Monte Carlo slack
    can make the amplified bound the larger one; the ledger reports the minimum."""
    f = _fact("sqrt", n=8, b=2)
    ledger = privacy_ledger(factorization=f, delta=1e-3, noise_multiplier=3.0,
                            sampling="balls-in-bins", mc_samples=100_000)
    assert ledger.epsilon == min(ledger.epsilon_amplified, ledger.epsilon_unamplified)
    assert ledger.epsilon_bound == ("amplified" if ledger.epsilon_amplified
                                    < ledger.epsilon_unamplified else "un-amplified")


@pytest.mark.parametrize("b", [2, 3])
def test_every_method_with_nonnegative_column_is_accepted(b: int) -> None:
    for method, bands in itertools.product(("identity", "sqrt", "bsr", "bisr"), (None,)):
        f = _fact(method, n=6, b=b, bands=2 if method in ("bsr", "bisr") else bands)
        acc = amp.amplified_accountant(sampling="balls-in-bins", factorization=f)
        assert acc.accountant == "monte-carlo" and acc.bins == b
