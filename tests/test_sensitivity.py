"""Sensitivity under participation schemas vs brute force (fedmf.sensitivity)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmf.linalg import binomial_series, dense_to_band, series_inverse, toeplitz_dense
from fedmf.participation import Participation
from fedmf.sensitivity import brute_force_sensitivity, sensitivity


def _schemas(n: int) -> Iterator[Participation]:
    yield Participation.single()
    for b in (1, 2, 3, 5):
        for k in (2, 3, 4):
            if (k - 1) * b < n:
                yield Participation.min_separation(min_sep=b, max_participations=k)
                yield Participation.cyclic(min_sep=b, max_participations=k)


def _nonneg_gram_matrices(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "random_nonneg": np.tril(rng.random((n, n))),
        "sqrt_toeplitz": toeplitz_dense(binomial_series(-0.5, n), n),
        "bisr": toeplitz_dense(series_inverse(binomial_series(0.5, 3), n), n),
        "banded": np.triu(np.tril(rng.random((n, n))), -2),
        "nonmonotone_toeplitz": toeplitz_dense(rng.random(n), n),
    }


def test_patterns_count() -> None:
    part = Participation.min_separation(min_sep=2, max_participations=2)
    pats = list(part.patterns(5))
    # singles + pairs with j - i >= 2
    assert len(pats) == 5 + sum(1 for i in range(5) for j in range(i + 2, 5))
    assert (0, 1) not in pats and (0, 2) in pats
    assert (0, 1) in list(Participation.min_separation(min_sep=1, max_participations=2)
                          .patterns(3))
    cyc = set(Participation.cyclic(min_sep=3, max_participations=2).patterns(7))
    assert (0, 3) in cyc and (0, 6) in cyc and (3, 6) in cyc and (0, 3, 6) not in cyc


@pytest.mark.parametrize("n", [7, 10, 12])
def test_exact_matches_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    for name, C in _nonneg_gram_matrices(n, rng).items():
        for part in _schemas(n):
            bf = brute_force_sensitivity(C, part)
            s = sensitivity(participation=part, rounds=n, C=C)
            assert s.value >= bf * (1 - 1e-12), (name, part)
            if s.exact:
                assert s.value == pytest.approx(bf, rel=1e-9), (name, part)
            provable = name in ("sqrt_toeplitz", "bisr") or (  # Toeplitz, monotone
                name == "banded" and part.min_sep >= 3)  # orthogonal columns
            if provable or part.kind == "single":
                assert s.exact, (name, part)


@pytest.mark.parametrize("n", [8, 11])
def test_negative_gram_is_an_upper_bound(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    found_negative = False
    for _ in range(3):
        C = np.tril(rng.standard_normal((n, n)))
        for part in _schemas(n):
            if part.kind == "single":
                continue
            s = sensitivity(participation=part, rounds=n, C=C)
            bf = brute_force_sensitivity(C, part)
            assert s.value >= bf * (1 - 1e-12)
            X = C.T @ C
            if X.min() < 0 and part.min_sep == 1:
                found_negative = True
                assert not s.exact
    assert found_negative


@pytest.mark.parametrize("n", [9, 12])
def test_toeplitz_and_band_inputs_agree_with_dense(n: int) -> None:
    rng = np.random.default_rng(7)
    coeffs = [binomial_series(-0.5, n), series_inverse(binomial_series(0.5, 4), n),
              binomial_series(-0.5, 3), rng.random(n), rng.standard_normal(n) + 2 * np.eye(1, n)[0]]
    for c in coeffs:
        C = toeplitz_dense(c, n)
        for part in _schemas(n):
            dense = sensitivity(participation=part, rounds=n, C=C)
            toe = sensitivity(participation=part, rounds=n, toeplitz=c)
            band = sensitivity(participation=part, rounds=n, band=dense_to_band(C, n))
            bf = brute_force_sensitivity(C, part)
            for s in (dense, toe, band):
                assert s.value >= bf * (1 - 1e-12)
                if s.exact:
                    assert s.value == pytest.approx(bf, rel=1e-9)
            if dense.exact:
                assert toe.value == pytest.approx(dense.value, rel=1e-9)


def test_banded_orthogonal_columns_and_identity() -> None:
    n = 12
    part = Participation.min_separation(min_sep=3, max_participations=4)
    assert sensitivity(participation=part, rounds=n, toeplitz=[1.0]).value == pytest.approx(2.0)
    c = binomial_series(-0.5, 3)  # bandwidth 3 <= b
    s = sensitivity(participation=part, rounds=n, toeplitz=c)
    col2 = [float(np.sum(c[: min(3, n - i)] ** 2)) for i in (0, 3, 6, 9)]
    assert s.exact and s.value == pytest.approx(math.sqrt(sum(col2)))


def test_reference_bisr_cyclic() -> None:
    """Prefix sum n = 512, k = 4 cyclic epochs, b = 128: BISR p = 8 (NOTES.md: 9.7303 MeanSE)."""
    n = 512
    c = series_inverse(binomial_series(0.5, 8), n)
    cyc = sensitivity(participation=Participation.cyclic(min_sep=128, max_participations=4),
                      rounds=n, toeplitz=c)
    ms = sensitivity(participation=Participation.min_separation(min_sep=128,
                                                                max_participations=4),
                     rounds=n, toeplitz=c)
    assert cyc.exact and ms.exact and cyc.value == pytest.approx(ms.value, rel=1e-12)


def test_validation() -> None:
    C = np.eye(4)
    with pytest.raises(ValueError, match=r"^max_participations"):
        sensitivity(participation=Participation.cyclic(min_sep=2, max_participations=3),
                    rounds=4, C=C)
    with pytest.raises(ValueError, match=r"^C, toeplitz or band"):
        sensitivity(participation=None, rounds=4, C=C, toeplitz=[1.0])
    with pytest.raises(ValueError, match=r"^C must"):
        sensitivity(participation=None, rounds=5, C=C)
    with pytest.raises(ValueError, match=r"^min_sep"):
        Participation.min_separation(min_sep=0, max_participations=2)
    with pytest.raises(ValueError, match=r"^max_participations"):
        Participation.cyclic(min_sep=2, max_participations=0)
    with pytest.raises(ValueError, match=r"^kind"):
        Participation("poisson")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=4, max_value=9),
    b=st.integers(min_value=1, max_value=4),
    k=st.integers(min_value=1, max_value=4),
    cyclic=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_property_bound_and_exactness(n: int, b: int, k: int, cyclic: bool, seed: int) -> None:
    if (k - 1) * b >= n:
        return
    rng = np.random.default_rng(seed)
    C = np.tril(rng.standard_normal((n, n)) + 0.5)
    part = (Participation.cyclic(min_sep=b, max_participations=k) if cyclic
            else Participation.min_separation(min_sep=b, max_participations=k))
    s = sensitivity(participation=part, rounds=n, C=C)
    bf = brute_force_sensitivity(C, part)
    assert s.value >= bf * (1 - 1e-12)
    if s.exact:
        assert s.value == pytest.approx(bf, rel=1e-9)
