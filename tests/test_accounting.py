"""Tests for fedmf.accounting."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from fedmf import accounting as acc

DELTA = 1e-5


@pytest.mark.parametrize(("z", "sens"), [(0.7, 1.0), (1.0, 1.3), (2.5, 2.0), (8.0, 1.0)])
def test_pld_matches_analytic_gaussian(z: float, sens: float) -> None:
    pld = acc.epsilon(noise_multiplier=z, sensitivity=sens, delta=DELTA)
    exact = acc.analytic_gaussian_epsilon(noise_multiplier=z, sensitivity=sens, delta=DELTA)
    assert pld == pytest.approx(exact, rel=1e-3)
    assert pld >= exact * (1 - 1e-6)  # PLD (pessimistic) is an upper bound
    # cross-check the closed form with dp_accounting's own analytic Gaussian
    assert exact == pytest.approx(dp_accounting.get_epsilon_gaussian(z / sens, DELTA), rel=1e-6)


def test_analytic_delta_inverts_epsilon() -> None:
    eps = acc.analytic_gaussian_epsilon(noise_multiplier=1.1, sensitivity=1.0, delta=1e-6)
    assert acc.analytic_gaussian_delta(mu=1 / 1.1, epsilon=eps) == pytest.approx(1e-6, rel=1e-8)
    # delta(0) <= delta -> epsilon 0
    assert acc.analytic_gaussian_epsilon(noise_multiplier=1e4, sensitivity=1.0, delta=0.5) == 0.0


def test_epsilon_depends_on_ratio_and_is_monotone() -> None:
    a = acc.epsilon(noise_multiplier=2.0, sensitivity=1.0, delta=DELTA)
    b = acc.epsilon(noise_multiplier=4.0, sensitivity=2.0, delta=DELTA)
    assert a == pytest.approx(b, rel=1e-12)
    c = acc.epsilon(noise_multiplier=3.0, sensitivity=1.0, delta=DELTA)
    assert c < a
    assert acc.epsilon(noise_multiplier=2.0, sensitivity=1.0, delta=1e-3) < a


def test_rho_zcdp() -> None:
    assert acc.rho_zcdp(noise_multiplier=2.0, sensitivity=3.0) == pytest.approx(9 / 8)


@pytest.mark.parametrize(("eps", "sens"), [(1.0, 1.0), (4.0, 2.7)])
def test_calibrate_noise_multiplier(eps: float, sens: float) -> None:
    z = acc.calibrate_noise_multiplier(epsilon=eps, delta=DELTA, sensitivity=sens)
    achieved = acc.epsilon(noise_multiplier=z, sensitivity=sens, delta=DELTA)
    assert achieved <= eps
    assert achieved == pytest.approx(eps, rel=1e-3)
    assert acc.epsilon(noise_multiplier=0.99 * z, sensitivity=sens, delta=DELTA) > eps


@pytest.mark.parametrize("k", [1, 4, 16])
def test_dpfedavg_is_gaussian_with_scaled_multiplier(k: int) -> None:
    z = 3.0
    eps = acc.dpfedavg_epsilon(noise_multiplier=z, participations=k, delta=DELTA)
    single = acc.epsilon(noise_multiplier=z / math.sqrt(k), sensitivity=1.0, delta=DELTA)
    assert eps == pytest.approx(single, rel=1e-3)
    exact = acc.analytic_gaussian_epsilon(
        noise_multiplier=z / math.sqrt(k), sensitivity=1.0, delta=DELTA
    )
    assert eps == pytest.approx(exact, rel=1e-3)
    # explicit composition of k Gaussian events (not SelfComposed) agrees
    if k > 4:
        return
    explicit = PLDAccountant()
    for _ in range(k):
        explicit.compose(dp_accounting.GaussianDpEvent(z))
    assert eps == pytest.approx(explicit.get_epsilon(DELTA), rel=1e-3)


def test_calibrate_dpfedavg() -> None:
    z = acc.calibrate_dpfedavg(epsilon=2.0, delta=DELTA, participations=8)
    assert acc.dpfedavg_epsilon(noise_multiplier=z, participations=8, delta=DELTA) <= 2.0
    assert acc.dpfedavg_epsilon(noise_multiplier=0.99 * z, participations=8, delta=DELTA) > 2.0


def test_adaptive_clipping_composition() -> None:
    z, sens, k, sigma_b = 2.0, 1.5, 6, 4.0
    eps = acc.adaptive_clipping_epsilon(
        noise_multiplier=z,
        clip_count_stddev=sigma_b,
        clients_per_round=50,
        participations=k,
        sensitivity=sens,
        delta=DELTA,
    )
    # Gaussian composition: mu^2 = (sens/z)^2 + k (1/sigma_b)^2
    mu = math.sqrt((sens / z) ** 2 + k / sigma_b**2)
    exact = acc.analytic_gaussian_epsilon(noise_multiplier=1.0, sensitivity=mu, delta=DELTA)
    assert eps == pytest.approx(exact, rel=1e-3)
    assert eps > acc.epsilon(noise_multiplier=z, sensitivity=sens, delta=DELTA)
    # centred bits (sensitivity 1/2) cost less; default sigma_b = clients_per_round / 20
    centred = acc.adaptive_clipping_epsilon(
        noise_multiplier=z,
        clip_count_stddev=sigma_b,
        clients_per_round=50,
        participations=k,
        sensitivity=sens,
        delta=DELTA,
        count_sensitivity=0.5,
    )
    assert centred < eps
    default = acc.adaptive_clipping_epsilon(
        noise_multiplier=z,
        clip_count_stddev=None,
        clients_per_round=80,
        participations=k,
        sensitivity=sens,
        delta=DELTA,
    )
    assert default == pytest.approx(eps, rel=1e-9)  # 80 / 20 == 4


def test_calibrate_adaptive_clipping() -> None:
    kw = {"clip_count_stddev": 10.0, "clients_per_round": 100, "participations": 8}
    z = acc.calibrate_adaptive_clipping(epsilon=2.0, delta=DELTA, sensitivity=1.5, **kw)
    eps = acc.adaptive_clipping_epsilon(noise_multiplier=z, sensitivity=1.5, delta=DELTA, **kw)
    assert eps <= 2.0
    eps_less = acc.adaptive_clipping_epsilon(
        noise_multiplier=0.99 * z, sensitivity=1.5, delta=DELTA, **kw
    )
    assert eps_less > 2.0
    assert z > acc.calibrate_noise_multiplier(epsilon=2.0, delta=DELTA, sensitivity=1.5)
    with pytest.raises(ValueError, match=r"^clip_count_stddev"):
        acc.calibrate_adaptive_clipping(
            epsilon=0.5,
            delta=DELTA,
            sensitivity=1.0,
            clip_count_stddev=0.5,
            clients_per_round=10,
            participations=8,
        )


def test_validation() -> None:
    bad_z = [0.0, -1.0, float("nan"), float("inf")]
    for z in bad_z:
        with pytest.raises(ValueError, match=r"^noise_multiplier"):
            acc.epsilon(noise_multiplier=z, sensitivity=1.0, delta=DELTA)
        with pytest.raises(ValueError, match=r"^noise_multiplier"):
            acc.dpfedavg_epsilon(noise_multiplier=z, participations=1, delta=DELTA)
    for s in (0.0, -2.0):
        with pytest.raises(ValueError, match=r"^sensitivity"):
            acc.epsilon(noise_multiplier=1.0, sensitivity=s, delta=DELTA)
        with pytest.raises(ValueError, match=r"^sensitivity"):
            acc.calibrate_noise_multiplier(epsilon=1.0, delta=DELTA, sensitivity=s)
        with pytest.raises(ValueError, match=r"^sensitivity"):
            acc.rho_zcdp(noise_multiplier=1.0, sensitivity=s)
    for d in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match=r"^delta"):
            acc.epsilon(noise_multiplier=1.0, sensitivity=1.0, delta=d)
        with pytest.raises(ValueError, match=r"^delta"):
            acc.calibrate_dpfedavg(epsilon=1.0, delta=d, participations=2)
    for e in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"^epsilon"):
            acc.calibrate_noise_multiplier(epsilon=e, delta=DELTA, sensitivity=1.0)
        with pytest.raises(ValueError, match=r"^epsilon"):
            acc.calibrate_dpfedavg(epsilon=e, delta=DELTA, participations=2)
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"^participations"):
            acc.dpfedavg_epsilon(noise_multiplier=1.0, participations=k, delta=DELTA)
    with pytest.raises(ValueError, match=r"^clients_per_round"):
        acc.adaptive_clipping_epsilon(
            noise_multiplier=1.0,
            clip_count_stddev=None,
            clients_per_round=0,
            participations=1,
            sensitivity=1.0,
            delta=DELTA,
        )
