"""With zero client signal the strategy's noise across rounds has covariance
sigma^2 C^{-1} C^{-T} (statistical test, fixed seed, d = 20000 parameters)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flower_helpers import InProcessGrid, as_array_record, make_train_reply, task_identity
from flwr.app import ConfigRecord

from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.arrays import array_to_numpy

D = 20_000


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


@pytest.mark.parametrize(("mechanism", "bands", "momentum"), [
    ("bisr", 3, 0.0), ("bsr", 2, 0.0), ("lr-bisr", 3, 0.5), ("bandmf", 2, 0.5), ("blt", 2, 0.0),
])
def test_noise_covariance_matches_factorization(mechanism: str, bands: int,
                                                momentum: float) -> None:
    n, m, z, clip = 6, 2, 0.7, 1.5
    cfg = DPConfig(mechanism=mechanism, rounds=n, bands=bands, buffers=2, clients_per_round=m,
                   num_clients=4, noise_multiplier=z, clip_norm=clip, noise_seed=2024,
                   insecure_reproducible=True,
                   schedule="cosine", server_lr=0.5, final_server_lr=0.05,
                   server_momentum=momentum, participation_timeout=0.0)
    s = DPMatrixFactorizationFedAvg(config=cfg)
    grid = InProcessGrid(lambda node, msg: None, [1, 2, 3, 4])
    arrays = as_array_record({"w": np.full((100, 200), 0.25, np.float32)})
    thetas = [array_to_numpy(arrays["w"]).ravel().astype(np.float64)]
    for t in range(1, n + 1):
        msgs = list(s.configure_train(t, arrays, ConfigRecord(), grid))
        replies = [make_train_reply(int(mm.metadata.dst_node_id), arrays) for mm in msgs]
        arrays, metrics = s.aggregate_train(t, replies)  # replies == global: zero signal
        assert metrics["num_accepted"] == m and metrics["norm_max"] == 0.0
        thetas.append(array_to_numpy(arrays["w"]).ravel().astype(np.float64))
    # invert the server optimizer: eta_t m_t = theta_t - theta_{t-1}; u_t = m_t - beta m_{t-1}
    rates = cfg.schedule_rates()
    steps = np.diff(np.stack(thetas), axis=0) / rates[:, None]
    noise = steps.copy()
    noise[1:] -= momentum * steps[:-1]
    sigma = z * clip / m
    Cinv = cfg.factorization().noising_matrix()
    expected = sigma**2 * Cinv @ Cinv.T
    empirical = noise @ noise.T / D
    # entrywise standard error of a sample covariance ~ sqrt((S_ii S_jj + S_ij^2) / D)
    se = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected**2) / D)
    assert np.all(np.abs(empirical - expected) < 5 * se + 1e-6), (empirical, expected)
    # and the noise is not independent across rounds (the factorization is not the identity)
    off = expected - np.diag(np.diag(expected))
    assert np.abs(off).max() > 10 * se.max()
