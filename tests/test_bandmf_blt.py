"""BandMF (banded Toeplitz C) and BLT (buffered linear Toeplitz C^{-1}): factorization,
sensitivity against brute force, noise stream, anchors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fedmf.factorizations import NoiseSpec, factorize
from fedmf.mechanisms import MechanismSpec, cohort_participation
from fedmf.noise import CorrelatedNoise
from fedmf.optimize_toeplitz import BLTParams, blt_coeffs, blt_inverse_coeffs
from fedmf.participation import Participation
from fedmf.schedules import learning_rates
from fedmf.sensitivity import brute_force_sensitivity
from fedmf.workloads import prefix_workload, sgd_workload


def _workloads(n: int) -> list:
    return [prefix_workload(n),
            sgd_workload(rates=learning_rates(rounds=n, schedule="cosine", final_lr=0.1),
                         momentum=0.5)]


@pytest.mark.parametrize("method", ["bandmf", "blt"])
def test_factorization_reproduces_the_workload(method: str) -> None:
    """B C = A to 1e-8, and C C^{-1} = I, for a prefix and a scheduled momentum workload."""
    for workload in _workloads(48):
        fact = factorize(method=method, workload=workload, bands=6, buffers=3)
        A, B, C = workload.dense(), fact.decoder(), fact.strategy_matrix()
        np.testing.assert_allclose(B @ C, A, atol=1e-8 * np.abs(A).max())
        np.testing.assert_allclose(C @ fact.noising_matrix(), np.eye(48), atol=1e-8)
        assert np.allclose(C, np.tril(C))  # causal


def test_blt_decays_stay_inside_the_unit_interval() -> None:
    """Strong momentum with a cosine schedule drove a decay to exactly 1.0 (a buffer that never
    forgets, refused by the noise stream); the optimiser keeps every theta in (0, 1)."""
    workload = sgd_workload(rates=learning_rates(rounds=40, schedule="cosine"), momentum=0.9)
    part = Participation.cyclic(max_participations=10, min_sep=4)
    fact = factorize(method="blt", workload=workload, participation=part, buffers=3)
    theta = fact.blt.theta
    assert np.all((theta > 0) & (theta < 1)), theta
    A = workload.dense()
    np.testing.assert_allclose(fact.decoder() @ fact.strategy_matrix(), A,
                               atol=1e-8 * np.abs(A).max())


@pytest.mark.parametrize("kind", ["min_sep", "cyclic"])
def test_bandmf_sensitivity_is_exact_against_brute_force(kind: str) -> None:
    n, b, k = 13, 4, 3
    part = (Participation.min_separation(min_sep=b, max_participations=k) if kind == "min_sep"
            else Participation.cyclic(max_participations=k, min_sep=b))
    fact = factorize(method="bandmf", workload=prefix_workload(n), participation=part, bands=b)
    C = fact.strategy_matrix()
    assert np.count_nonzero(np.tril(C, -b)) == 0  # banded: p <= b
    assert fact.sensitivity.exact
    assert fact.sensitivity.value == pytest.approx(brute_force_sensitivity(C, part), rel=1e-12)
    with pytest.raises(ValueError, match=r"^bands must be <= min-sep=4"):
        factorize(method="bandmf", workload=prefix_workload(n), participation=part, bands=5)


@pytest.mark.parametrize("part", [Participation.single(),
                                  Participation.cyclic(max_participations=3, min_sep=4)])
def test_blt_sensitivity_never_below_brute_force(part: Participation) -> None:
    n = 12
    fact = factorize(method="blt", workload=prefix_workload(n), participation=part, buffers=2)
    truth = brute_force_sensitivity(fact.strategy_matrix(), part)
    if fact.sensitivity.exact:
        assert fact.sensitivity.value == pytest.approx(truth, rel=1e-10)
    else:  # a certified upper bound
        assert fact.sensitivity.value >= truth * (1 - 1e-12)
    params = fact.blt
    assert params is not None and params.buffers == 2 and np.all((params.theta > 0)
                                                                & (params.theta < 1))


def test_blt_closed_forms_agree_with_series_inversion() -> None:
    params = BLTParams(omega=np.array([-0.4, -0.05]), theta=np.array([0.3, 0.9]))
    n = 30
    m = blt_inverse_coeffs(params, n)
    c = blt_coeffs(params, n)
    t = np.arange(1, n)
    np.testing.assert_allclose(m[1:], -0.4 * 0.3 ** (t - 1) - 0.05 * 0.9 ** (t - 1))
    np.testing.assert_allclose(np.convolve(m, c)[:n], np.eye(1, n)[0], atol=1e-12)


def test_optimised_families_beat_their_closed_form_starts() -> None:
    """Optimising for the actual workload: bandmf <= bsr at equal bands, and blt (3 buffers)
    below the banded inverse square root of equal noise memory."""
    for workload in _workloads(96):
        part = cohort_participation(rounds=96, min_sep=8)
        bsr = factorize(method="bsr", workload=workload, participation=part, bands=8)
        band = factorize(method="bandmf", workload=workload, participation=part, bands=8)
        assert band.mean_error <= bsr.mean_error * (1 + 1e-9)
        blt = factorize(method="blt", workload=workload, buffers=3)
        bisr = factorize(method="bisr", workload=workload, bands=4)
        assert blt.mean_error < bisr.mean_error


@pytest.mark.parametrize("method", ["bandmf", "blt"])
def test_noise_stream_is_the_noising_matrix(method: str) -> None:
    n, d, std, seed = 10, 64, 1.3, 77
    fact = factorize(method=method, workload=prefix_workload(n), bands=3, buffers=2)
    spec = fact.noise_spec
    assert spec.state_floats == 2  # 2 buffers (blt) or bands - 1 = 2 past outputs (bandmf)
    gen = CorrelatedNoise(spec=spec, std=std, seed=seed, dtype=torch.float64)
    W = np.stack([gen.next(torch.zeros(d, dtype=torch.float64)).numpy() for _ in range(n)])
    ident = CorrelatedNoise(spec=NoiseSpec(kind="cinv_band", band=np.ones((n, 1))), std=1.0,
                            seed=seed, dtype=torch.float64)
    Z = np.stack([ident.next(torch.zeros(d, dtype=torch.float64)).numpy() for _ in range(n)])
    np.testing.assert_allclose(W, std * fact.noising_matrix() @ Z, atol=1e-12)
    assert gen.memory_bytes(d) > 0


def test_blt_noise_checkpoint_round_trip_and_modes() -> None:
    fact = factorize(method="blt", workload=prefix_workload(8), buffers=2)
    spec = fact.noise_spec
    like = torch.zeros(5)
    ref = CorrelatedNoise(spec=spec, std=1.0, seed=3)
    full = [ref.next(like) for _ in range(8)]
    gen = CorrelatedNoise(spec=spec, std=1.0, seed=3)
    for _ in range(3):
        gen.next(like)
    blob = io.BytesIO()
    torch.save(gen.state_dict(), blob)
    blob.seek(0)
    restored = CorrelatedNoise.from_state_dict(torch.load(blob, weights_only=True), spec=spec)
    for r in range(3, 8):
        assert torch.equal(restored.next(like), full[r])
    other = factorize(method="blt", workload=prefix_workload(8), buffers=3).noise_spec
    with pytest.raises(ValueError, match="spec does not match"):
        CorrelatedNoise.from_state_dict(gen.state_dict(), spec=other)
    with pytest.raises(ValueError, match="mode='seed' is not supported for kind='cinv_blt'"):
        CorrelatedNoise(spec=spec, std=1.0, mode="seed")


def test_spec_options_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"^buffers must be in \[1, rounds - 1 = 7\]"):
        MechanismSpec(method="blt", rounds=8, buffers=8)
    with pytest.raises(ValueError, match=r"^buffers must be given"):
        factorize(method="blt", workload=prefix_workload(8))


@pytest.mark.slow
def test_anchors_n2000() -> None:
    """jax_privacy: banded Toeplitz, 500 bands, k=4, b=500: 6.87; BLT 3 buffers: 3.2737."""
    band = factorize(method="bandmf", workload=prefix_workload(2000), bands=500,
                     participation=Participation.min_separation(min_sep=500,
                                                                max_participations=4))
    assert band.sensitivity.exact and band.mean_error <= 6.94
    blt = factorize(method="blt", workload=prefix_workload(2000), buffers=3)
    assert blt.mean_error <= 3.29
