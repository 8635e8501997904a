"""Tests for fedmf.optimize: opt-bisr (optimised banded-inverse Toeplitz) and the dense optimum.

Reference values: shared/papers/NOTES.md (prefix sum n = 512: BISR p=8 4.8651, sqrt 2.8892,
optimal 2.7409; jax_privacy optimised banded inverse n=2000 p=16: 3.8610).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from fedmf import optimize as opt
from fedmf.factorizations import factorize
from fedmf.participation import Participation
from fedmf.schedules import learning_rates
from fedmf.sensitivity import sensitivity
from fedmf.workloads import prefix_workload, sgd_workload


def _fd_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h
        g[j] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _dense_errors(A: np.ndarray, C: np.ndarray) -> tuple[float, float]:
    """(MeanSE, MaxSE) of a dense factorization, single participation."""
    n = A.shape[0]
    sens = math.sqrt(float(np.max(np.sum(C * C, axis=0))))
    B = scipy.linalg.solve_triangular(C, A.T, trans="T", lower=True).T  # A C^{-1}
    return (sens * float(np.linalg.norm(B)) / math.sqrt(n),
            sens * float(np.max(np.linalg.norm(B, axis=1))))


def _banded_toeplitz(m: np.ndarray, n: int) -> np.ndarray:
    M = np.zeros((n, n))
    for j, mj in enumerate(m):
        M += np.diag(np.full(n - j, mj), -j)
    return M


def _schedule(name: str, n: int) -> np.ndarray:
    if name == "exponential":
        return learning_rates(rounds=n, schedule="exponential", lr=1.0, gamma=0.99)
    return learning_rates(rounds=n, schedule=name, lr=1.0, final_lr=0.0)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("objective", ["mean", "max"])
@pytest.mark.parametrize(
    "participation",
    [Participation.single(), Participation.cyclic(max_participations=4, min_sep=24),
     Participation.min_separation(min_sep=10, max_participations=3)],
    ids=["single", "cyclic-k4", "minsep-k3"],
)
def test_gradient_matches_finite_differences(objective: str, participation) -> None:
    n, p = 96, 6
    wl = sgd_workload(rates=_schedule("cosine", n), momentum=0.5)
    prob = opt._Problem.build(workload=wl, participation=participation, bands=p,
                              rowwise=objective == "max")
    rng = np.random.default_rng(0)
    m = opt.bisr_coeffs(p) + 0.01 * rng.standard_normal(p)
    for q in (1.0, 16.0):
        _, g = prob.objective(m, objective, q)
        fd = _fd_grad(lambda x, q=q: prob.objective(x, objective, q)[0], m)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)
    # the sensitivity gradient alone (chain rule through the series inverse)
    _, gs, _ = prob.sens2(m)
    np.testing.assert_allclose(gs, _fd_grad(lambda x: prob.sens2(x)[0], m), rtol=1e-5)


def test_pattern_sensitivity_matches_dense_brute_force() -> None:
    n, p = 40, 4
    part = Participation.cyclic(max_participations=4, min_sep=10)
    m = opt.bisr_coeffs(p)
    prob = opt._Problem.build(workload=prefix_workload(n), participation=part, bands=p,
                              rowwise=True)
    s2, _, c = prob.sens2(m)
    C = scipy.linalg.solve_triangular(_banded_toeplitz(m, n), np.eye(n), lower=True)
    np.testing.assert_allclose(C[:, 0], c, rtol=1e-12)
    X = C.T @ C
    assert X.min() >= 0
    brute = max(X[np.ix_(P, P)].sum() for P in part.patterns(n))
    np.testing.assert_allclose(s2, brute, rtol=1e-12)
    # error pieces agree with the dense decoder B = A M
    A = prefix_workload(n).dense()
    B = A @ _banded_toeplitz(m, n)
    np.testing.assert_allclose(m @ prob.G @ m, np.sum(B * B), rtol=1e-12)
    np.testing.assert_allclose(prob.row_norms2(m), np.sum(B * B, axis=1), rtol=1e-12)


# ------------------------------------------------------------------------------ opt-bisr
def test_prefix_sum_beats_bisr_reference() -> None:
    wl = prefix_workload(512)
    base = opt.banded_inverse_errors(workload=wl, participation=None,
                                     coeffs=opt.bisr_coeffs(8))
    assert base.mean_error == pytest.approx(4.8651, abs=1e-4)
    m = opt.optimize_banded_inverse(workload=wl, participation=Participation.single(), bands=8)
    assert m.shape == (8,) and m[0] == 1.0
    res = opt.banded_inverse_errors(workload=wl, participation=None, coeffs=m)
    assert res.mean_error < 4.8651 * 0.8
    assert res.mean_error > 2.7409  # cannot beat the dense optimum
    assert res.sensitivity_exact
    # cross-check against dense matrices
    C = scipy.linalg.solve_triangular(_banded_toeplitz(m, 512), np.eye(512), lower=True)
    assert _dense_errors(wl.dense(), C)[0] == pytest.approx(res.mean_error, rel=1e-9)


def test_multi_participation_beats_bisr() -> None:
    wl = prefix_workload(512)
    part = Participation.cyclic(max_participations=4, min_sep=128)
    base = opt.banded_inverse_errors(workload=wl, participation=part,
                                     coeffs=opt.bisr_coeffs(8))
    assert base.mean_error == pytest.approx(9.7303, abs=1e-4)
    m = opt.optimize_banded_inverse(workload=wl, participation=part, bands=8)
    res = opt.banded_inverse_errors(workload=wl, participation=part, coeffs=m)
    assert res.sensitivity_exact
    assert res.mean_error < base.mean_error


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exponential"])
@pytest.mark.parametrize("bands", [8, 16])
def test_scheduled_workloads_beat_bisr_and_lr_bisr(schedule: str, bands: int) -> None:
    n = 256
    rates = _schedule(schedule, n)
    wl = sgd_workload(rates=rates)
    part = Participation.single()

    def mean_err(m: np.ndarray) -> float:
        return opt.banded_inverse_errors(workload=wl, participation=part,
                                         coeffs=m).mean_error

    bisr = mean_err(opt.bisr_coeffs(bands))
    lr_bisr = mean_err(opt.lr_bisr_coeffs(rates, bands))
    ours = mean_err(opt.optimize_banded_inverse(workload=wl, participation=part, bands=bands))
    assert ours <= bisr + 1e-9
    assert ours <= lr_bisr + 1e-9
    if schedule == "cosine" and bands == 16:
        assert 1.843 - 1e-3 < ours < 1.943  # above the dense optimum, below blind sqrt


def test_max_objective_reduces_max_error() -> None:
    n, p = 128, 8
    wl = sgd_workload(rates=_schedule("cosine", n))
    m_mean = opt.optimize_banded_inverse(workload=wl, bands=p, objective="mean")
    m_max = opt.optimize_banded_inverse(workload=wl, bands=p, objective="max")
    r_mean = opt.banded_inverse_errors(workload=wl, participation=None, coeffs=m_mean)
    r_max = opt.banded_inverse_errors(workload=wl, participation=None, coeffs=m_max)
    r_bisr = opt.banded_inverse_errors(workload=wl, participation=None,
                                       coeffs=opt.bisr_coeffs(p))
    assert r_max.max_error <= r_mean.max_error + 1e-9
    assert r_max.max_error <= r_bisr.max_error + 1e-9
    assert r_mean.mean_error <= r_max.mean_error + 1e-9


def test_init_and_momentum_workload() -> None:
    wl = sgd_workload(rates=_schedule("linear", 128), momentum=0.9)
    init = opt.bisr_coeffs(4) * 3.0
    m = opt.optimize_banded_inverse(workload=wl, bands=4, init=init)
    assert m[0] == 1.0
    r0 = opt.banded_inverse_errors(workload=wl, participation=None, coeffs=init)
    r1 = opt.banded_inverse_errors(workload=wl, participation=None, coeffs=m)
    assert r1.mean_error <= r0.mean_error
    # one band: C^{-1} = I up to scale, nothing to optimise
    np.testing.assert_array_equal(opt.optimize_banded_inverse(workload=wl, bands=1), [1.0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"bands": 0}, "bands"), ({"bands": 65}, "bands"), ({"bands": 4, "objective": "median"},
                                                          "objective"),
     ({"bands": 4, "init": np.ones(3)}, "init"), ({"bands": 4, "maxiter": 0}, "maxiter")],
)
def test_invalid_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}"):
        opt.optimize_banded_inverse(workload=prefix_workload(64), **kwargs)


def test_optimal_dense_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"^maxiter"):
        opt.optimal_dense(workload=prefix_workload(8), maxiter=0)
    with pytest.raises(ValueError, match=r"^tol"):
        opt.optimal_dense(workload=prefix_workload(8), tol=0.0)


# ------------------------------------------------------------------------- dense optimum
def test_reverse_cholesky() -> None:
    rng = np.random.default_rng(1)
    G = rng.standard_normal((12, 12))
    X = G @ G.T + 12 * np.eye(12)
    C = opt.reverse_cholesky(X)
    np.testing.assert_array_equal(np.triu(C, 1), 0.0)
    np.testing.assert_allclose(C.T @ C, X, rtol=1e-12, atol=1e-10)


def test_optimal_dense_small_prefix_sum() -> None:
    n = 64
    wl = prefix_workload(n)
    A = wl.dense()
    C = opt.optimal_dense(workload=wl)
    np.testing.assert_array_equal(np.triu(C, 1), 0.0)
    assert np.max(np.sum(C * C, axis=0)) == pytest.approx(1.0)
    B = scipy.linalg.solve_triangular(C, A.T, trans="T", lower=True).T
    np.testing.assert_allclose(B @ C, A, atol=1e-10)
    opt_mean, _ = _dense_errors(A, C)
    sqrt_mean, _ = _dense_errors(A, np.real(scipy.linalg.sqrtm(A)))
    assert opt_mean <= sqrt_mean + 1e-9
    # the optimum also beats every banded inverse
    m = opt.optimize_banded_inverse(workload=wl, bands=8)
    assert opt_mean <= opt.banded_inverse_errors(workload=wl, participation=None,
                                                 coeffs=m).mean_error + 1e-9


def test_optimal_dense_prefix_512_reference() -> None:
    wl = prefix_workload(512)
    C = opt.optimal_dense(workload=wl)
    np.testing.assert_array_equal(np.triu(C, 1), 0.0)
    mean, _ = _dense_errors(wl.dense(), C)
    assert mean == pytest.approx(2.7409, rel=1e-3)
    assert mean < 2.8892  # better than the square root


def test_optimal_dense_multi_epoch() -> None:
    n, k, b = 64, 4, 16
    wl = sgd_workload(rates=_schedule("cosine", n))
    part = Participation.cyclic(max_participations=k, min_sep=b)
    C = opt.optimal_dense(workload=wl, participation=part)
    np.testing.assert_array_equal(np.triu(C, 1), 0.0)
    X = C.T @ C
    # the true sensitivity: any x_i with ||x_i|| <= 1; columns in a class are orthogonal,
    # so it is sqrt(max_P sum_{i in P} ||C e_i||^2) <= 1
    worst = max(sum(X[i, i] for i in P) + sum(abs(X[i, j]) for i in P for j in P if i != j)
                for P in part.patterns(n))
    assert worst <= 1.0 + 1e-9
    assert worst >= 0.999
    A = wl.dense()
    B = scipy.linalg.solve_triangular(C, A.T, trans="T", lower=True).T
    dense_mean = float(np.linalg.norm(B)) / math.sqrt(n)
    bisr = opt.banded_inverse_errors(workload=wl, participation=part,
                                     coeffs=opt.bisr_coeffs(8)).mean_error
    assert dense_mean < bisr


# ----------------------------------------------------------------- slow reference targets
@pytest.mark.slow
def test_prefix_2000_p16_matches_jax_privacy_anchor() -> None:
    wl = prefix_workload(2000)
    m = opt.optimize_banded_inverse(workload=wl, participation=Participation.single(),
                                    bands=16)
    res = opt.banded_inverse_errors(workload=wl, participation=None, coeffs=m)
    # jax_privacy's optimised banded inverse reached 3.8610; we must match it (within 0.5%)
    # or do better, and cannot go below the optimised 2000-band Toeplitz value 3.2695.
    assert 3.2695 < res.mean_error <= 3.8610 * 1.005
    assert res.sensitivity_exact


@pytest.mark.slow
def test_prefix_2000_p16_k4_matches_jax_privacy_anchor() -> None:
    wl = prefix_workload(2000)
    part = Participation.cyclic(max_participations=4, min_sep=500)
    m = opt.optimize_banded_inverse(workload=wl, participation=part, bands=16)
    res = opt.banded_inverse_errors(workload=wl, participation=part, coeffs=m)
    assert res.mean_error <= 7.7749 * 1.005
    assert res.sensitivity_exact


# ----------------------------------------------- scheduled dense optimum (via factorize)
def _wl(schedule: str, n: int):
    return prefix_workload(n) if schedule == "prefix" else sgd_workload(
        rates=_schedule(schedule, n))


@pytest.mark.parametrize(("schedule", "expected"), [("cosine", 1.843), ("exponential", 1.456)])
def test_optimal_scheduled_n256_matches_notes(schedule: str, expected: float) -> None:
    fact = factorize(method="optimal", workload=_wl(schedule, 256),
                     participation=Participation.single())
    assert fact.sensitivity.exact
    assert fact.sensitivity.value == pytest.approx(1.0, rel=1e-9)
    assert fact.mean_error == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exponential"])
def test_optimal_beats_every_method_n128(schedule: str) -> None:
    wl = _wl(schedule, 128)
    part = Participation.single()
    best = factorize(method="optimal", workload=wl, participation=part).mean_error
    for method, bands in [("sqrt", None), ("lr-sqrt", None), ("bisr", 8), ("lr-bisr", 8),
                          ("opt-bisr", 8), ("opt-bisr", 16)]:
        other = factorize(method=method, workload=wl, participation=part, bands=bands)
        assert best <= other.mean_error * (1 + 1e-9), (method, bands, other.mean_error)


def test_optimal_dense_tiny_final_rates_converges() -> None:
    # cosine to 0: the last columns of A are ~1e-5 of the first; the old L-BFGS dual stalled
    n = 192
    wl = _wl("cosine", n)
    C = opt.optimal_dense(workload=wl)
    np.testing.assert_array_equal(np.triu(C, 1), 0.0)
    np.testing.assert_allclose(np.sum(C * C, axis=0), 1.0, rtol=1e-9)  # unit-diagonal X
    mean, _ = _dense_errors(wl.dense(), C)
    assert np.isfinite(mean)
    assert mean < factorize(method="sqrt", workload=wl).mean_error
    assert mean < factorize(method="lr-sqrt", workload=wl).mean_error


@pytest.mark.slow
def test_optimal_prefix_512_via_factorize() -> None:
    fact = factorize(method="optimal", workload=prefix_workload(512),
                     participation=Participation.single())
    assert fact.mean_error == pytest.approx(2.7394, abs=1e-4)
    cos = factorize(method="optimal", workload=_wl("cosine", 512),
                    participation=Participation.single())
    assert cos.mean_error < factorize(method="sqrt", workload=_wl("cosine", 512)).mean_error


# ------------------------------------ multi-participation: optimise the certified value
def test_cyclic_abs_objective_matches_certified_sensitivity() -> None:
    n, k, b, p = 96, 4, 24, 6
    part = Participation.cyclic(max_participations=k, min_sep=b)
    prob = opt._Problem.build(workload=prefix_workload(n), participation=part, bands=p,
                              rowwise=False)
    assert prob.cyclic_index is not None
    rng = np.random.default_rng(3)
    for m in (opt.bisr_coeffs(p), opt.bisr_coeffs(p) + 0.3 * rng.standard_normal(p)):
        s2, _, c = prob.sens2(m)
        cert = sensitivity(participation=part, rounds=n, toeplitz=c)
        assert s2 == pytest.approx(cert.value ** 2, rel=1e-10)
        # the |X| class bound is an upper bound of the brute-force worst pattern
        C = scipy.linalg.solve_triangular(_banded_toeplitz(m, n), np.eye(n), lower=True)
        X = C.T @ C
        worst = max(X[np.ix_(P, P)].sum() for P in part.patterns(n))
        assert s2 >= worst * (1 - 1e-12)


def _certified(method: str, wl, part, bands: int) -> tuple[float, bool]:
    fact = factorize(method=method, workload=wl, participation=part, bands=bands)
    return fact.mean_error, fact.sensitivity.exact


@pytest.mark.parametrize(("schedule", "n", "bands", "bisr_ref"),
                         [("prefix", 512, 8, 9.7303), ("cosine", 256, 16, None)])
def test_opt_bisr_multi_epoch_certified(schedule: str, n: int, bands: int,
                                        bisr_ref: float | None) -> None:
    k = 4
    wl = _wl(schedule, n)
    part = Participation.cyclic(max_participations=k, min_sep=n // k)
    bisr, _ = _certified("bisr", wl, part, bands)
    if bisr_ref is not None:
        assert bisr == pytest.approx(bisr_ref, abs=1e-4)
    lr_bisr, _ = _certified("lr-bisr", wl, part, bands)
    ours, exact = _certified("opt-bisr", wl, part, bands)
    assert exact  # the value the optimiser used is the certified (exact) sensitivity
    assert ours <= bisr and ours <= lr_bisr
    # the optimiser's own numbers agree with factorize()'s
    m = opt.optimize_banded_inverse(workload=wl, participation=part, bands=bands)
    res = opt.banded_inverse_errors(workload=wl, participation=part, coeffs=m)
    assert res.mean_error == pytest.approx(ours, rel=1e-8)
    assert res.sensitivity_exact


@pytest.mark.slow
def test_opt_bisr_2000_k4_certified_beats_jax_privacy() -> None:
    wl = prefix_workload(2000)
    part = Participation.cyclic(max_participations=4, min_sep=500)
    ours, exact = _certified("opt-bisr", wl, part, 16)
    assert exact
    assert ours <= 7.7749  # jax_privacy's optimised banded inverse
    assert ours <= _certified("bisr", wl, part, 16)[0]
    single = factorize(method="opt-bisr", workload=wl, participation=Participation.single(),
                       bands=16)
    assert single.mean_error == pytest.approx(3.7422, abs=1e-4)


def test_optimal_multi_participation_fails_loudly_when_the_dual_does_not_converge() -> None:
    """Strong server momentum makes the dense dual ill-conditioned: the solver must refuse
    rather than return a factorization worse than independent noise."""
    from fedmf.mechanisms import MechanismSpec, cohort_participation

    spec = MechanismSpec(method="optimal", rounds=60, momentum=0.9,
                         participation=cohort_participation(rounds=60, min_sep=4))
    with pytest.raises(ValueError, match=r"^optimal: the dense dual solver did not converge"):
        spec.factorization()
    ok = MechanismSpec(method="optimal", rounds=60, momentum=0.5,
                       participation=cohort_participation(rounds=60, min_sep=4))
    ident = MechanismSpec(method="identity", rounds=60, momentum=0.5,
                          participation=cohort_participation(rounds=60, min_sep=4))
    assert ok.factorization().mean_error < 0.6 * ident.factorization().mean_error  # 22.0 vs 41.6
