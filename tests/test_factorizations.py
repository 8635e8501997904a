"""Factorizations A = B C (fedmf.factorizations) and the Toeplitz/banded helpers (fedmf.linalg)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from scipy.linalg import fractional_matrix_power, sqrtm

from fedmf.factorizations import BANDED_METHODS, METHODS, NoiseSpec, factorize
from fedmf.linalg import (
    band_inverse,
    band_product,
    band_sqrt,
    band_to_dense,
    binomial_series,
    dense_to_band,
    series_inverse,
    series_mul,
    series_sqrt,
    toeplitz_dense,
)
from fedmf.participation import Participation
from fedmf.schedules import learning_rates
from fedmf.workloads import Workload, prefix_workload, sgd_workload

HAS_OPTIMIZE = importlib.util.find_spec("fedmf.optimize") is not None
CLOSED_FORM = ("identity", "sqrt", "bsr", "bisr", "lr-sqrt", "lr-bisr")


def _workloads(n: int) -> dict[str, Workload]:
    return {
        "prefix": prefix_workload(n),
        "cosine": sgd_workload(rates=learning_rates(rounds=n, schedule="cosine")),
        "momentum_wd": sgd_workload(rates=np.full(n, 0.1), momentum=0.9, weight_decay=0.01),
        "exp_warmup": sgd_workload(rates=learning_rates(rounds=n, schedule="exponential",
                                                        gamma=0.9, warmup=4),
                                   momentum=0.5, weight_decay=0.02),
    }


def _bands(method: str) -> int | None:
    return 5 if method in BANDED_METHODS else None


@pytest.mark.parametrize("method", METHODS)
def test_b_times_c_is_a(method: str) -> None:
    if method in ("opt-bisr", "optimal") and not HAS_OPTIMIZE:
        pytest.skip("fedmf.optimize not available")
    n = 16 if method in ("opt-bisr", "optimal") else 24
    for name, wl in _workloads(n).items():
        f = factorize(method=method, workload=wl, bands=_bands(method), buffers=2)
        A, B, C, Cinv = wl.dense(), f.decoder(), f.strategy_matrix(), f.noising_matrix()
        np.testing.assert_allclose(B @ C, A, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(C @ Cinv, np.eye(n), atol=1e-8, err_msg=name)
        np.testing.assert_allclose(C, np.tril(C), err_msg=name)
        np.testing.assert_allclose(f.row_norms(), np.linalg.norm(B, axis=1), rtol=1e-9,
                                   err_msg=name)
        s = f.sensitivity.value
        assert f.max_error == pytest.approx(s * np.linalg.norm(B, axis=1).max(), rel=1e-9)
        assert f.mean_error == pytest.approx(s * np.linalg.norm(B) / math.sqrt(n), rel=1e-9)


def test_closed_forms_match_matrix_functions() -> None:
    n, p = 20, 6
    for name, wl in _workloads(n).items():
        T = wl.toeplitz_coeffs()
        Td = toeplitz_dense(T, n)
        root = np.real(sqrtm(Td))
        inv_root = np.real(fractional_matrix_power(Td, -0.5))
        band = np.tril(np.triu(np.ones((n, n)), -(p - 1)))
        f = factorize(method="sqrt", workload=wl)
        np.testing.assert_allclose(f.strategy_matrix(), root, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(f.noising_matrix(), inv_root, atol=1e-10, err_msg=name)
        f = factorize(method="bsr", workload=wl, bands=p)
        np.testing.assert_allclose(f.strategy_matrix(), root * band, atol=1e-10)
        f = factorize(method="bisr", workload=wl, bands=p)
        np.testing.assert_allclose(f.noising_matrix(), inv_root * band, atol=1e-10)
        # lr-sqrt: (T(chi) A_1^{-1} T)^{1/2}
        chi = wl.rates / wl.rates[0]
        Tchi = toeplitz_dense(chi, n) @ np.linalg.inv(np.tril(np.ones((n, n)))) @ Td
        f = factorize(method="lr-sqrt", workload=wl)
        np.testing.assert_allclose(f.strategy_matrix(), np.real(sqrtm(Tchi)), atol=1e-9)
        f = factorize(method="lr-bisr", workload=wl, bands=p)
        np.testing.assert_allclose(f.noising_matrix(),
                                   np.real(fractional_matrix_power(Tchi, -0.5)) * band,
                                   atol=1e-9)


def test_prefix_sqrt_coefficients() -> None:
    k = np.arange(30)
    expected = np.array([math.comb(2 * int(i), int(i)) / 4.0**i for i in k])
    f = factorize(method="sqrt", workload=prefix_workload(30))
    np.testing.assert_allclose(f.c_coeffs, expected, rtol=1e-13)


@pytest.mark.parametrize(
    ("method", "bands", "expected"),
    [("identity", None, 16.0156), ("sqrt", None, 2.8892), ("bsr", 8, 6.8106),
     ("bisr", 8, 4.8651), ("lr-bisr", 8, 4.8651), ("lr-sqrt", None, 2.8892)],
)
def test_reference_prefix_n512(method: str, bands: int | None, expected: float) -> None:
    f = factorize(method=method, workload=prefix_workload(512), bands=bands)
    assert round(f.mean_error, 4) == pytest.approx(expected, abs=1.01e-4)
    assert f.sensitivity.exact


def test_reference_bisr_cyclic_n512() -> None:
    part = Participation.cyclic(max_participations=4, min_sep=128)
    f = factorize(method="bisr", workload=prefix_workload(512), bands=8, participation=part)
    assert round(f.mean_error, 4) == pytest.approx(9.7303, abs=1.01e-4)
    assert f.sensitivity.exact


@pytest.mark.parametrize(
    ("schedule", "blind_max", "aware_max", "blind_mean", "aware_mean"),
    [("cosine", 2.428, 2.261, 1.943, 1.928), ("linear", 2.273, 2.103, None, None),
     ("exponential", 2.129, 1.893, 1.552, 1.608)],
)
def test_reference_lr_sqrt_n256(schedule: str, blind_max: float, aware_max: float,
                                blind_mean: float | None, aware_mean: float | None) -> None:
    """NOTES.md (t / n convention, which this package uses): reproduced to 3 decimals."""
    wl = sgd_workload(rates=learning_rates(rounds=256, schedule=schedule, lr=1.0,
                                           final_lr=0.0, gamma=0.99))
    blind = factorize(method="sqrt", workload=wl)
    aware = factorize(method="lr-sqrt", workload=wl)
    assert blind.max_error == pytest.approx(blind_max, abs=6e-4)
    assert aware.max_error == pytest.approx(aware_max, abs=6e-4)
    if blind_mean is not None:
        assert blind.mean_error == pytest.approx(blind_mean, abs=6e-4)
        assert aware.mean_error == pytest.approx(aware_mean, abs=6e-4)


def test_naive_principal_root_is_worse() -> None:
    """Principal root of A_1 diag(eta) (cosine, n = 256): MeanSE 2.118 > blind 1.943."""
    n = 256
    wl = sgd_workload(rates=learning_rates(rounds=n, schedule="cosine"))
    A = wl.dense()
    C = np.real(sqrtm(A))
    B = np.linalg.solve(C.T, A.T).T
    mean = np.linalg.norm(C, axis=0).max() * np.linalg.norm(B) / math.sqrt(n)
    assert mean == pytest.approx(2.118, abs=2e-3)
    assert mean > factorize(method="sqrt", workload=wl).mean_error


def _realise(spec: NoiseSpec, Z: np.ndarray) -> np.ndarray:
    n, p = spec.band.shape
    W = np.zeros_like(Z)
    if spec.kind == "cinv_blt":  # w_t = z_t + sum_i omega_i s_i; s_i <- theta_i s_i + z_t
        s = np.zeros((spec.theta.size, Z.shape[1]))
        for t in range(n):
            W[t] = Z[t] + spec.omega @ s
            s = spec.theta[:, None] * s + Z[t]
        return W
    for t in range(n):
        if spec.kind == "cinv_band":
            for j in range(min(p, t + 1)):
                W[t] += spec.band[t, j] * Z[t - j]
        else:
            acc = Z[t].copy()
            for j in range(1, min(p, t + 1)):
                acc -= spec.band[t, j] * W[t - j]
            W[t] = acc / spec.band[t, 0]
    return W


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("opt-bisr", "optimal")])
def test_noise_spec_realises_cinv_z(method: str) -> None:
    n = 20
    wl = _workloads(n)["cosine"]
    f = factorize(method=method, workload=wl, bands=_bands(method), buffers=2)
    spec = f.noise_spec
    expected_kind = {"bsr": "c_band", "bandmf": "c_band", "blt": "cinv_blt"}.get(method,
                                                                                "cinv_band")
    assert spec.kind == expected_kind
    expected_p = {"identity": 1, "sqrt": n, "lr-sqrt": n, "blt": 1}.get(method, 5)
    assert spec.bands == expected_p and spec.rounds == n
    Z = np.random.default_rng(0).standard_normal((n, 3))
    np.testing.assert_allclose(_realise(spec, Z), f.noising_matrix() @ Z, atol=1e-10)


def test_multi_participation_sensitivity_matches_dense() -> None:
    from fedmf.sensitivity import brute_force_sensitivity

    n = 12
    wl = _workloads(n)["cosine"]
    for part in (Participation.min_separation(min_sep=3, max_participations=3),
                 Participation.cyclic(min_sep=4, max_participations=3)):
        for method in CLOSED_FORM:
            f = factorize(method=method, workload=wl, bands=_bands(method), buffers=2,
                          participation=part)
            bf = brute_force_sensitivity(f.strategy_matrix(), part)
            assert f.sensitivity.value >= bf * (1 - 1e-12)
            if f.sensitivity.exact:
                assert f.sensitivity.value == pytest.approx(bf, rel=1e-9)


def test_banded_constructions_scale_linearly() -> None:
    """n = 100000, p = 64: bisr / lr-bisr never build an n x n matrix (fast)."""
    import time

    n = 100_000
    wl = sgd_workload(rates=learning_rates(rounds=n, schedule="cosine"))
    part = Participation.cyclic(max_participations=4, min_sep=n // 4)
    t0 = time.perf_counter()
    for method in ("bisr", "lr-bisr"):
        f = factorize(method=method, workload=wl, bands=64, participation=part)
        assert np.isfinite(f.max_error) and np.isfinite(f.mean_error)
        assert f.noise_spec.band.shape == (n, 64)
    assert time.perf_counter() - t0 < 10.0


def test_validation() -> None:
    wl = prefix_workload(8)
    with pytest.raises(ValueError, match=r"^method"):
        factorize(method="cholesky", workload=wl)
    with pytest.raises(ValueError, match=r"^bands"):
        factorize(method="bisr", workload=wl)
    with pytest.raises(ValueError, match=r"^bands"):
        factorize(method="bsr", workload=wl, bands=9)
    with pytest.raises(ValueError, match=r"^bands"):
        factorize(method="bsr", workload=wl, bands=0)
    with pytest.raises(ValueError, match=r"^max_participations"):
        factorize(method="sqrt", workload=wl,
                  participation=Participation.min_separation(min_sep=4, max_participations=3))
    with pytest.raises(ValueError, match=r"^objective"):
        factorize(method="sqrt", workload=wl, objective="median")
    with pytest.raises(ValueError, match=r"^kind"):
        NoiseSpec(kind="dense", band=np.ones((2, 1)))


# ----------------------------------------------------------------------- linalg
def test_series_helpers() -> None:
    n = 3000  # above the Newton threshold
    a = 1.5 + np.cos(np.arange(n) / 300.0)
    r = series_sqrt(a, n)
    np.testing.assert_allclose(series_mul(r, r, n), a, atol=1e-11)
    np.testing.assert_allclose(r[:2048], series_sqrt(a[:2048], 2048), atol=1e-12)
    inv = series_inverse(r, n)
    np.testing.assert_allclose(series_mul(r, inv, n), np.eye(1, n)[0], atol=1e-11)
    np.testing.assert_allclose(series_sqrt(np.ones(n), n), binomial_series(-0.5, n),
                               atol=1e-13)


def test_band_helpers_match_dense() -> None:
    rng = np.random.default_rng(1)
    n, p = 25, 6
    L = np.tril(rng.random((n, n))) + 2 * np.eye(n)
    L2 = np.tril(rng.standard_normal((n, n)))
    band = np.tril(np.triu(np.ones((n, n)), -(p - 1)))
    np.testing.assert_allclose(band_to_dense(band_sqrt(dense_to_band(L, p))),
                               np.real(sqrtm(L)) * band, atol=1e-10)
    np.testing.assert_allclose(band_to_dense(band_inverse(dense_to_band(L, p))),
                               np.linalg.inv(L) * band, atol=1e-10)
    np.testing.assert_allclose(
        band_to_dense(band_product(dense_to_band(L, p), dense_to_band(L2, p), p)),
        (L @ L2) * band, atol=1e-10)


@pytest.mark.parametrize("method", [*CLOSED_FORM, "bandmf", "blt", "optimal"])
def test_noise_row_norms_are_the_row_norms_of_the_dense_inverse(method: str) -> None:
    """Against the dense C^{-1}: banded C (bsr, bandmf), banded C^{-1} (bisr), BLT, dense."""
    n = 24
    workload = _workloads(n)["momentum_wd"]
    kwargs: dict = {"bands": 4} if method in BANDED_METHODS else {}
    if method == "blt":
        kwargs["buffers"] = 2
    fact = factorize(method=method, workload=workload,
                     participation=Participation.min_separation(min_sep=6, max_participations=4),
                     **kwargs)
    cinv = np.linalg.inv(fact.strategy_matrix())
    np.testing.assert_allclose(fact.noise_row_norms(), np.linalg.norm(cinv, axis=1),
                               rtol=1e-8, atol=1e-12)
    if method == "identity":
        np.testing.assert_allclose(fact.noise_row_norms(), np.ones(n))
