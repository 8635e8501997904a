"""Learning-rate schedules (fedmf.schedules)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmf.schedules import SCHEDULES, learning_rates


def test_constant_and_exponential() -> None:
    np.testing.assert_allclose(learning_rates(rounds=5, lr=0.3), np.full(5, 0.3))
    r = learning_rates(rounds=6, schedule="exponential", lr=2.0, gamma=0.9)
    np.testing.assert_allclose(r, 2.0 * 0.9 ** np.arange(6))


def test_cosine_and_linear_use_t_over_n() -> None:
    n, lr, fin = 8, 1.5, 0.1
    t = np.arange(n)
    np.testing.assert_allclose(
        learning_rates(rounds=n, schedule="cosine", lr=lr, final_lr=fin),
        fin + (lr - fin) * (1 + np.cos(np.pi * t / n)) / 2)
    np.testing.assert_allclose(
        learning_rates(rounds=n, schedule="linear", lr=lr, final_lr=fin),
        lr + (fin - lr) * t / n)
    # final 0 is fine: t / n < 1 keeps every rate positive
    for s in ("cosine", "linear"):
        r = learning_rates(rounds=100, schedule=s, lr=1.0, final_lr=0.0)
        assert r.min() > 0 and r[0] == 1.0


def test_step() -> None:
    r = learning_rates(rounds=10, schedule="step", lr=1.0, gamma=0.5, milestones=(3, 7))
    np.testing.assert_allclose(r, [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


def test_warmup_shifts_schedule() -> None:
    n, w = 10, 4
    r = learning_rates(rounds=n, schedule="cosine", lr=1.0, warmup=w)
    np.testing.assert_allclose(r[:w], np.arange(1, w + 1) / w)
    np.testing.assert_allclose(r[w:], learning_rates(rounds=n - w, schedule="cosine"))
    r = learning_rates(rounds=n, schedule="step", gamma=0.1, milestones=(2,), warmup=w)
    np.testing.assert_allclose(r[w:], [1, 1, 0.1, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_all_positive(schedule: str) -> None:
    r = learning_rates(rounds=50, schedule=schedule, lr=0.7, gamma=0.95, milestones=(10,),
                       warmup=5)
    assert r.shape == (50,) and np.all(r > 0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": 5, "lr": 0.0}, "lr"),
        ({"rounds": 5, "lr": -1.0}, "lr"),
        ({"rounds": 5, "lr": math.nan}, "lr"),
        ({"rounds": 5, "gamma": 0.0}, "gamma"),
        ({"rounds": 5, "gamma": 1.5}, "gamma"),
        ({"rounds": 5, "warmup": 5}, "warmup"),
        ({"rounds": 5, "warmup": -1}, "warmup"),
        ({"rounds": 5, "final_lr": -0.1}, "final_lr"),
        ({"rounds": 5, "schedule": "poly"}, "schedule"),
        ({"rounds": 5, "schedule": "step", "milestones": (-1,)}, "milestones"),
    ],
)
def test_validation_names_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}"):
        learning_rates(**kwargs)
