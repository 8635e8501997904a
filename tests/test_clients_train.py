"""Models, local training, delta norms and client-side clipping (``clients.train``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clients.data import TensorData
from clients.models import SmallCNN, build_model, resnet18_gn
from clients.train import (
    check_finite,
    clip_update,
    clone_state,
    delta_norm,
    evaluate_model,
    train_local,
)


def _toy_data(n: int = 64, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 5
    return TensorData(x, y)


def test_models_have_no_batchnorm() -> None:
    for model in (SmallCNN(), resnet18_gn()):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_deterministic() -> None:
    a = build_model(dataset="cifar10", model="cnn", seed=3).state_dict()
    b = build_model(dataset="cifar10", model="cnn", seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_local_decreases_loss() -> None:
    torch.manual_seed(0)
    model, data = SmallCNN(), _toy_data()
    before, _ = evaluate_model(model, data)
    stats = train_local(model, data, epochs=3, batch_size=16, lr=0.05, momentum=0.9, seed=0)
    after, _ = evaluate_model(model, data)
    assert stats.steps == 12 and stats.examples == 64
    assert after < before
    assert sum(stats.losses[-4:]) < sum(stats.losses[:4])


def test_delta_norm_excludes_integer_buffers() -> None:
    old = {"w": torch.zeros(3), "n": torch.tensor(5, dtype=torch.long)}
    new = {"w": torch.tensor([3.0, 4.0, 0.0]), "n": torch.tensor(500, dtype=torch.long)}
    assert delta_norm(old, new) == pytest.approx(5.0)


@pytest.mark.parametrize("clip", [0.5, 2.0, 10.0])
def test_clip_update_bounds_norm(clip: float) -> None:
    torch.manual_seed(1)
    old = {"a": torch.randn(10), "b": torch.randn(2, 3), "steps": torch.tensor(1)}
    new = {"a": old["a"] + torch.randn(10), "b": old["b"] + torch.randn(2, 3),
           "steps": torch.tensor(2)}
    norm = delta_norm(old, new)
    out, pre, clipped = clip_update(old, new, clip)
    assert pre == pytest.approx(norm)
    assert clipped == (norm > clip)
    assert delta_norm(old, out) == pytest.approx(min(norm, clip), rel=1e-5)
    if clipped:  # direction preserved
        d_new = torch.cat([(new[k] - old[k]).flatten() for k in ("a", "b")])
        d_out = torch.cat([(out[k] - old[k]).flatten() for k in ("a", "b")])
        assert torch.allclose(d_out, d_new * (clip / norm), atol=1e-6)
    assert int(out["steps"]) == 2
    with pytest.raises(ValueError, match=r"^clip-norm"):
        clip_update(old, new, 0.0)


def test_clone_state_is_a_copy() -> None:
    m = nn.Linear(2, 2)
    s = clone_state(m)
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not torch.equal(s["weight"], m.weight)


def test_non_finite_detected() -> None:
    with pytest.raises(FloatingPointError, match="'w'"):
        check_finite({"w": torch.tensor([1.0, math.nan])})
    model, data = SmallCNN(), _toy_data(16)
    with pytest.raises(FloatingPointError):
        train_local(model, data, lr=1e30, epochs=3, batch_size=16)


def test_bad_training_args() -> None:
    with pytest.raises(ValueError, match=r"^client-momentum"):
        train_local(SmallCNN(), _toy_data(8), momentum=1.0)
    with pytest.raises(ValueError, match=r"^batch-size"):
        train_local(SmallCNN(), _toy_data(8), batch_size=0)
    with pytest.raises(ValueError, match="train data is empty"):
        train_local(SmallCNN(), TensorData(torch.zeros(0, 3, 32, 32),
                                           torch.zeros(0, dtype=torch.long)))
