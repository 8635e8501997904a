"""Tests for fedmf.noise.CorrelatedNoise."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedmf.noise import CorrelatedNoise


@dataclass(frozen=True)
class Spec:
    """Local stand-in for fedmf.factorizations.NoiseSpec (same fields)."""

    kind: str
    band: np.ndarray

    @property
    def bands(self) -> int:
        return int(self.band.shape[1])


def random_band(n: int, p: int, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    band = rng.normal(scale=0.4, size=(n, p))
    band[:, 0] = 1.0 + np.abs(band[:, 0])
    for j in range(p):
        band[:j, j] = 0.0
    return band


def dense_from_band(band: np.ndarray) -> np.ndarray:
    n, p = band.shape
    M = np.zeros((n, n))
    for t in range(n):
        for j in range(min(p, t + 1)):
            M[t, t - j] = band[t, j]
    return M


def noising_matrix(kind: str, band: np.ndarray) -> np.ndarray:
    """Dense C^{-1} realised by the spec."""
    M = dense_from_band(band)
    return M if kind == "cinv_band" else np.linalg.inv(M)


def stream(gen: CorrelatedNoise, like, rounds: int) -> list:
    return [gen.next(like) for _ in range(rounds)]


def unit_draws(n: int, d: int, *, seed: int, dtype=torch.float64) -> np.ndarray:
    """The i.i.d. draws z_0..z_{n-1}: an identity spec outputs them unchanged."""
    ident = Spec("cinv_band", np.ones((n, 1)))
    gen = CorrelatedNoise(spec=ident, std=1.0, seed=seed, dtype=dtype)
    return np.stack([gen.next(torch.zeros(d, dtype=dtype)).numpy() for _ in range(n)])


N, P = 6, 3


@pytest.mark.parametrize("kind", ["cinv_band", "c_band"])
def test_matches_dense_formula(kind: str) -> None:
    """w_t = sum_s (C^{-1})_{t,s} std z_s with the generator's own draws z_s."""
    band = random_band(N, P)
    d, std, seed = 257, 1.7, 123
    Z = unit_draws(N, d, seed=seed)
    expected = std * noising_matrix(kind, band) @ Z
    gen = CorrelatedNoise(spec=Spec(kind, band), std=std, seed=seed, dtype=torch.float64)
    W = np.stack([w.numpy() for w in stream(gen, torch.zeros(d, dtype=torch.float64), N)])
    np.testing.assert_allclose(W, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kind", "mode"), [("cinv_band", "buffer"), ("cinv_band", "seed"), ("c_band", "buffer")]
)
def test_empirical_covariance(kind: str, mode: str) -> None:
    """Sample covariance over parameters vs std^2 C^{-1} C^{-T}, 5-sigma tolerance."""
    band = random_band(N, P, seed=1)
    d, std = 20000, 0.8
    gen = CorrelatedNoise(spec=Spec(kind, band), std=std, seed=7, mode=mode, dtype=torch.float64)
    W = torch.stack(stream(gen, torch.zeros(d), N)).double().numpy()
    emp = W @ W.T / d
    Minv = noising_matrix(kind, band)
    sigma = std**2 * Minv @ Minv.T
    stderr = np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / d)
    assert np.all(np.abs(emp - sigma) <= 5 * stderr), np.max(np.abs(emp - sigma) / stderr)
    assert abs(W.mean()) < 5 * np.sqrt(np.diag(sigma).max() / (N * d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_modes_same_stream(dtype: torch.dtype) -> None:
    band = random_band(10, 4, seed=2)
    like = torch.zeros(1000)
    a = CorrelatedNoise(spec=Spec("cinv_band", band), std=2.0, seed=99, mode="buffer", dtype=dtype)
    b = CorrelatedNoise(spec=Spec("cinv_band", band), std=2.0, seed=99, mode="seed", dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for wa, wb in zip(stream(a, like, 10), stream(b, like, 10), strict=True):
        torch.testing.assert_close(wa, wb, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("kind", "mode"), [("cinv_band", "buffer"), ("cinv_band", "seed"), ("c_band", "buffer")]
)
@pytest.mark.parametrize("restore_at", [0, 2, 5])
def test_save_restore_bit_exact(kind: str, mode: str, restore_at: int) -> None:
    band = random_band(8, 4, seed=3)
    spec = Spec(kind, band)
    like = {"w": torch.zeros(5, 7), "b": torch.zeros(3)}
    ref = CorrelatedNoise(spec=spec, std=1.3, seed=2024, mode=mode)
    full = stream(ref, like, 8)

    gen = CorrelatedNoise(spec=spec, std=1.3, seed=2024, mode=mode)
    stream(gen, like, restore_at)
    blob = io.BytesIO()
    torch.save(gen.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    restored = CorrelatedNoise.from_state_dict(state, spec=spec)
    assert restored.round == restore_at
    for r in range(restore_at, 8):
        out = restored.next(like)
        for k in like:
            assert torch.equal(out[k], full[r][k])
    with pytest.raises(ValueError, match="round 8"):
        restored.next(like)


def test_restore_rejects_other_spec() -> None:
    spec = Spec("cinv_band", random_band(6, 3, seed=4))
    gen = CorrelatedNoise(spec=spec, std=1.0, seed=1)
    gen.next(torch.zeros(4))
    other = Spec("cinv_band", random_band(6, 3, seed=5))
    with pytest.raises(ValueError, match="spec"):
        CorrelatedNoise.from_state_dict(gen.state_dict(), spec=other)


def test_structures_round_trip() -> None:
    spec = Spec("cinv_band", random_band(4, 2))
    like_dict = {
        "conv": torch.zeros(2, 3, 3, 3),
        "half": torch.zeros(4, dtype=torch.float16),
        "bf": torch.zeros(2, 2, dtype=torch.bfloat16),
        "f64": torch.zeros(5, dtype=torch.float64),
        "scalar": torch.zeros(()),
    }
    d = sum(x.numel() for x in like_dict.values())
    flat = CorrelatedNoise(spec=spec, std=1.0, seed=5).next(torch.zeros(d))

    out = CorrelatedNoise(spec=spec, std=1.0, seed=5).next(like_dict)
    assert isinstance(out, dict)
    assert list(out) == list(like_dict)
    for k, x in like_dict.items():
        assert out[k].shape == x.shape and out[k].dtype == x.dtype and out[k].device == x.device
    # the noise of a structure is one vector split in structure order
    joined = torch.cat([out[k].float().reshape(-1) for k in like_dict])
    pieces = torch.split(flat, [x.numel() for x in like_dict.values()])
    expected = torch.cat(
        [q.to(x.dtype).float() for q, x in zip(pieces, like_dict.values(), strict=True)]
    )
    assert torch.equal(joined, expected)

    like_list = list(like_dict.values())
    out_list = CorrelatedNoise(spec=spec, std=1.0, seed=5).next(like_list)
    assert isinstance(out_list, list) and len(out_list) == len(like_list)
    out_tuple = CorrelatedNoise(spec=spec, std=1.0, seed=5).next(tuple(like_list))
    assert isinstance(out_tuple, tuple)
    for a, b, k in zip(out_list, out_tuple, like_dict, strict=True):
        assert a.shape == like_dict[k].shape and a.dtype == like_dict[k].dtype
        assert torch.equal(a, b)
        assert torch.equal(a, out[k])


def test_no_draw_reuse() -> None:
    Z = unit_draws(6, 5000, seed=11)
    for s in range(6):
        for r in range(s):
            assert abs(np.corrcoef(Z[s], Z[r])[0, 1]) < 0.06
    Z2 = unit_draws(6, 5000, seed=12)
    assert abs(np.corrcoef(Z.ravel(), Z2.ravel())[0, 1]) < 0.03
    assert np.all(np.abs(Z.std(axis=1) - 1) < 0.05)
    spec = Spec("cinv_band", random_band(4, 2))
    a = CorrelatedNoise(spec=spec, std=1.0).next(torch.zeros(100))
    b = CorrelatedNoise(spec=spec, std=1.0).next(torch.zeros(100))
    assert not torch.equal(a, b)  # fresh secret seeds


def test_repr_hides_seed() -> None:
    seed = 987654321987654321
    gen = CorrelatedNoise(spec=Spec("c_band", random_band(4, 2)), std=1.0, seed=seed)
    assert str(seed) not in repr(gen) and hex(seed) not in repr(gen)
    assert "seed" not in repr(gen)
    assert gen.state_dict()["seed"] == seed


def test_memory_bytes() -> None:
    band = random_band(8, 4)
    d = 1000
    buf = CorrelatedNoise(spec=Spec("cinv_band", band), std=1.0, seed=0)
    w = buf.next(torch.zeros(d))
    assert buf.memory_bytes(d) == 4 * (5 * d + 8 * 4)
    state = buf.state_dict()["buffer"]
    assert state.numel() * state.element_size() + w.numel() * 4 <= buf.memory_bytes(d)
    seed = CorrelatedNoise(
        spec=Spec("cinv_band", band), std=1.0, seed=0, mode="seed", dtype=torch.float64
    )
    assert seed.memory_bytes(d) == 8 * 2 * d
    assert seed.state_dict()["buffer"] is None


def test_zero_std_and_p1() -> None:
    spec = Spec("c_band", np.full((3, 1), 2.0))
    gen = CorrelatedNoise(spec=spec, std=0.0, seed=1)
    assert torch.equal(gen.next(torch.zeros(10)), torch.zeros(10))
    Z = unit_draws(3, 10, seed=1)
    gen = CorrelatedNoise(spec=spec, std=1.0, seed=1, dtype=torch.float64)
    np.testing.assert_allclose([gen.next(torch.zeros(10)).numpy() for _ in range(3)], Z / 2)


def test_bad_inputs() -> None:
    band = random_band(4, 2)
    ok = Spec("cinv_band", band)
    with pytest.raises(ValueError, match=r"^spec.kind"):
        CorrelatedNoise(spec=Spec("dense", band), std=1.0)
    with pytest.raises(ValueError, match=r"^spec.band"):
        CorrelatedNoise(spec=Spec("cinv_band", np.ones(4)), std=1.0)
    with pytest.raises(ValueError, match=r"^spec.band"):
        CorrelatedNoise(spec=Spec("c_band", np.zeros((4, 2))), std=1.0)
    with pytest.raises(ValueError, match=r"^mode"):
        CorrelatedNoise(spec=ok, std=1.0, mode="disk")
    with pytest.raises(ValueError, match=r"^mode"):
        CorrelatedNoise(spec=Spec("c_band", band), std=1.0, mode="seed")
    for std in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^std"):
            CorrelatedNoise(spec=ok, std=std)
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match=r"^seed"):
            CorrelatedNoise(spec=ok, std=1.0, seed=seed)
    with pytest.raises(ValueError, match=r"^dtype"):
        CorrelatedNoise(spec=ok, std=1.0, dtype=torch.float16)
    gen = CorrelatedNoise(spec=ok, std=1.0, seed=3)
    with pytest.raises(ValueError, match=r"^like"):
        gen.next(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^like"):
        gen.next([])
    with pytest.raises(ValueError, match=r"^like"):
        gen.next(np.zeros(3))
    assert gen.round == 0
    gen.next(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^like has 4"):
        gen.next(torch.zeros(4))
    for _ in range(3):
        gen.next(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^round 4"):
        gen.next(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^num_params"):
        gen.memory_bytes(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_modes_and_restore() -> None:
    band = random_band(8, 4, seed=6)
    like = {"a": torch.zeros(300, 7, device="cuda"), "b": torch.zeros(11, device="cuda")}
    a = CorrelatedNoise(spec=Spec("cinv_band", band), std=1.0, seed=5, mode="buffer")
    b = CorrelatedNoise(spec=Spec("cinv_band", band), std=1.0, seed=5, mode="seed")
    ra, rb = stream(a, like, 4), stream(b, like, 4)
    for x, y in zip(ra, rb, strict=True):
        assert x["a"].device.type == "cuda"
        torch.testing.assert_close(x["a"], y["a"], rtol=1e-5, atol=1e-5)
    restored = CorrelatedNoise.from_state_dict(a.state_dict(), spec=Spec("cinv_band", band))
    cont = CorrelatedNoise(spec=Spec("cinv_band", band), std=1.0, seed=5)
    stream(cont, like, 4)
    for _ in range(4):
        x, y = restored.next(like), cont.next(like)
        assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])
