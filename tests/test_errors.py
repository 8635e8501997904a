"""Structured decoder row norms / errors vs dense computations (fedmf.errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmf.errors import decoder_row_norms, max_error, mean_error
from fedmf.linalg import binomial_series, series_inverse, toeplitz_dense
from fedmf.schedules import learning_rates
from fedmf.workloads import Workload, prefix_workload, sgd_workload

N = 40


def _workloads() -> dict[str, Workload]:
    return {
        "prefix": prefix_workload(N),
        "cosine": sgd_workload(rates=learning_rates(rounds=N, schedule="cosine")),
        "momentum_wd": sgd_workload(rates=learning_rates(rounds=N, schedule="linear"),
                                    momentum=0.9, weight_decay=0.05),
        "exp_warmup": sgd_workload(rates=learning_rates(rounds=N, schedule="exponential",
                                                        gamma=0.95, warmup=6), momentum=0.5),
        "constant_wd": sgd_workload(rates=np.full(N, 0.2), momentum=0.3, weight_decay=0.1),
    }


def _cinvs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "bisr8": binomial_series(0.5, 8),
        "full": binomial_series(0.5, N),
        "short_signed": np.array([1.0, -0.4, 0.25]),
        "random": np.concatenate([[3.0], rng.standard_normal(15)]),
    }


@pytest.mark.parametrize("wname", list(_workloads()))
def test_row_norms_match_dense(wname: str) -> None:
    wl = _workloads()[wname]
    A = wl.dense()
    for cname, g in _cinvs().items():
        Ginv = toeplitz_dense(g, N)
        expected = np.linalg.norm(A @ Ginv, axis=1)
        got_cinv = decoder_row_norms(workload=wl, cinv=g)
        C = np.linalg.inv(Ginv)
        got_dense = decoder_row_norms(workload=wl, C=C)
        got_c = decoder_row_norms(workload=wl, c=series_inverse(g, N))
        for got in (got_cinv, got_dense, got_c):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{wname}/{cname}")


def test_errors_formulas() -> None:
    rn = np.array([1.0, 2.0, 2.0])
    assert max_error(sensitivity=2.0, row_norms=rn) == pytest.approx(4.0)
    assert mean_error(sensitivity=2.0, row_norms=rn) == pytest.approx(2.0 * math.sqrt(3.0))


def test_identity_prefix_reference() -> None:
    """MeanSE of C = I on A_1 (n = 512): sqrt((n + 1) / 2) = 16.0156 (NOTES.md)."""
    rn = decoder_row_norms(workload=prefix_workload(512), cinv=np.ones(1))
    assert mean_error(sensitivity=1.0, row_norms=rn) == pytest.approx(16.0156, abs=5e-5)


def test_large_n_banded_is_fast_and_consistent() -> None:
    """n = 20000 with a schedule and momentum: O(n p) path vs the Toeplitz path when the
    rate is constant, and monotone growth of the row norms for the prefix sum."""
    n = 20000
    g = binomial_series(0.5, 16)
    wl_c = sgd_workload(rates=np.full(n, 0.5), momentum=0.4)
    structured = decoder_row_norms(workload=wl_c, cinv=g)  # Toeplitz path
    from fedmf.errors import _row_norms_banded

    banded = _row_norms_banded(wl_c, g)
    np.testing.assert_allclose(banded, structured, rtol=1e-9)
    rn = decoder_row_norms(workload=prefix_workload(n), cinv=g)
    assert np.all(np.diff(rn) > 0)


def test_validation() -> None:
    wl = prefix_workload(4)
    with pytest.raises(ValueError, match=r"^cinv, c or C"):
        decoder_row_norms(workload=wl)
    with pytest.raises(ValueError, match=r"^C must"):
        decoder_row_norms(workload=wl, C=np.eye(3))
    with pytest.raises(ValueError, match=r"^cinv"):
        decoder_row_norms(workload=wl, cinv=np.array([0.0, 1.0]))
