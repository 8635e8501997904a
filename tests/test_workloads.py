"""Workloads A = E(alpha) diag(eta) M(beta) (fedmf.workloads)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmf.schedules import learning_rates
from fedmf.workloads import Workload, prefix_workload, sgd_workload


def test_prefix_is_lower_triangular_ones() -> None:
    A = prefix_workload(7).dense()
    np.testing.assert_array_equal(A, np.tril(np.ones((7, 7))))
    assert prefix_workload(7).is_prefix_sum


def test_sgd_schedule_is_a1_diag_eta() -> None:
    eta = learning_rates(rounds=9, schedule="cosine")
    wl = sgd_workload(rates=eta)
    np.testing.assert_allclose(wl.dense(), np.tril(np.ones((9, 9))) @ np.diag(eta))
    assert not wl.is_constant_rate


def _geom(r: float, n: int) -> np.ndarray:
    i = np.arange(n)
    lag = i[:, None] - i[None, :]
    return np.where(lag >= 0, float(r) ** np.clip(lag, 0, None), 0.0)


@pytest.mark.parametrize("beta,wd", [(0.9, 0.0), (0.0, 0.1), (0.5, 0.05)])
def test_momentum_weight_decay_matches_bsr_definition(beta: float, wd: float) -> None:
    n = 12
    eta = learning_rates(rounds=n, schedule="exponential", gamma=0.9, warmup=3)
    wl = sgd_workload(rates=eta, momentum=beta, weight_decay=wd)
    expected = _geom(1 - wd, n) @ np.diag(eta) @ _geom(beta, n)
    np.testing.assert_allclose(wl.dense(), expected, atol=1e-14)


def test_workload_is_the_sgd_iteration() -> None:
    """theta_t = alpha theta_{t-1} - eta_t m_t, m_t = beta m_{t-1} + g_t  =>  theta = -A g."""
    n, beta, wd = 15, 0.8, 0.02
    rng = np.random.default_rng(0)
    eta = learning_rates(rounds=n, schedule="linear", lr=0.5)
    g = rng.standard_normal(n)
    theta, m, out = 0.0, 0.0, []
    for t in range(n):
        m = beta * m + g[t]
        theta = (1 - wd) * theta - eta[t] * m
        out.append(theta)
    wl = sgd_workload(rates=eta, momentum=beta, weight_decay=wd)
    np.testing.assert_allclose(out, -(wl.dense() @ g), atol=1e-12)


def test_toeplitz_coeffs() -> None:
    n = 20
    wl = sgd_workload(rates=np.full(n, 0.3), momentum=0.7, weight_decay=0.1)
    # constant rate: A = eta_0 T
    np.testing.assert_allclose(wl.dense()[:, 0], 0.3 * wl.toeplitz_coeffs(), atol=1e-14)
    np.testing.assert_allclose(prefix_workload(5).toeplitz_coeffs(), np.ones(5))
    eta = learning_rates(rounds=n, schedule="cosine")
    wl2 = sgd_workload(rates=eta)
    np.testing.assert_allclose(wl2.rate_toeplitz_coeffs(), eta / eta[0])
    # constant rate with momentum: the schedule-aware matrix is the blind T
    np.testing.assert_allclose(wl.rate_toeplitz_coeffs(), wl.toeplitz_coeffs(), atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rates": np.array([1.0, 0.0])}, "rates"),
        ({"rates": np.array([1.0, np.nan])}, "rates"),
        ({"rates": np.ones(3), "momentum": 1.0}, "momentum"),
        ({"rates": np.ones(3), "momentum": -0.1}, "momentum"),
        ({"rates": np.ones(3), "weight_decay": 1.0}, "weight_decay"),
    ],
)
def test_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}"):
        sgd_workload(**kwargs)
    with pytest.raises(ValueError, match=r"^n"):
        prefix_workload(0)


def test_hashable_and_equal() -> None:
    a = Workload(rates=np.ones(4))
    b = prefix_workload(4)
    assert a == b and hash(a) == hash(b)
    assert a != sgd_workload(rates=np.ones(4), momentum=0.1)
