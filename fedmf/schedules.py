"""Learning-rate schedules ``eta_0, ..., eta_{n-1}`` for the server (or centralised) optimizer.

Conventions (``docs/CONTRACT.md``; rounds ``t = 0..n-1``, horizon ``n``):

* ``constant``     ``eta_t = lr``
* ``exponential``  ``eta_t = lr * gamma^t``
* ``cosine``       ``eta_t = final + (lr - final) (1 + cos(pi t / n)) / 2``
* ``linear``       ``eta_t = lr + (final - lr) t / n``
* ``step``         ``eta_t = lr * gamma^{#{m in milestones : m <= t}}``
* warm-up ``w``    ``eta_t = lr (t + 1) / w`` for ``t < w``; afterwards the schedule above over the
  horizon ``n - w`` evaluated at ``t - w``.

The ``t / n`` convention (rather than the ``(k - 1) / (n - 1)`` of the authors' code for
arXiv:2511.17994) keeps every rate strictly positive for ``final_lr = 0``: ``t / n < 1``.
With it the reference values of ``shared/papers/NOTES.md`` (n = 256, cosine / linear /
exponential) are reproduced exactly (see ``tests/test_factorizations.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["SCHEDULES", "learning_rates"]

SCHEDULES = ("constant", "exponential", "cosine", "linear", "step")


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def learning_rates(
    *,
    rounds: int,
    schedule: str = "constant",
    lr: float = 1.0,
    final_lr: float = 0.0,
    gamma: float = 0.99,
    milestones: Sequence[int] = (),
    warmup: int = 0,
) -> np.ndarray:
    """Per-round learning rates, shape ``(rounds,)``, all strictly positive.

    Args:
        rounds: horizon ``n >= 1``.
        schedule: one of :data:`SCHEDULES`.
        lr: initial (peak) rate, ``> 0``.
        final_lr: end point of ``cosine`` / ``linear`` (reached at ``t = n``, never used), ``>= 0``.
        gamma: decay factor of ``exponential`` / ``step``, in ``(0, 1]``.
        milestones: rounds (after warm-up) at which ``step`` multiplies by ``gamma``.
        warmup: linear warm-up rounds ``w`` in ``[0, rounds)``.

    Raises:
        ValueError: message starting with the offending parameter's name.
    """
    n = _check_positive_int("rounds", rounds)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    final_lr = float(final_lr)
    if not math.isfinite(final_lr) or final_lr < 0:
        raise ValueError(f"final_lr must be a finite number >= 0, got {final_lr}")
    gamma = float(gamma)
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if isinstance(warmup, bool) or not isinstance(warmup, int | np.integer):
        raise ValueError(f"warmup must be an integer in [0, rounds={n}), got {warmup!r}")
    w = int(warmup)
    if not 0 <= w < n:
        raise ValueError(f"warmup must be in [0, rounds={n}), got {w}")
    ms = []
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 0:
            raise ValueError(f"milestones must be non-negative integers, got {list(milestones)}")
        ms.append(int(m))

    horizon = n - w
    t = np.arange(horizon, dtype=np.float64)
    if schedule == "constant":
        main = np.full(horizon, lr)
    elif schedule == "exponential":
        main = lr * gamma**t
    elif schedule == "cosine":
        main = final_lr + (lr - final_lr) * (1.0 + np.cos(np.pi * t / horizon)) / 2.0
    elif schedule == "linear":
        main = lr + (final_lr - lr) * t / horizon
    else:  # step
        counts = np.searchsorted(np.sort(np.asarray(ms, dtype=np.int64)), t, side="right")
        main = lr * gamma ** counts.astype(np.float64)
    if w:
        warm = lr * np.arange(1, w + 1, dtype=np.float64) / w
        main = np.concatenate([warm, main])
    if not np.all(np.isfinite(main)) or np.min(main) <= 0:
        # only reachable through underflow (e.g. gamma**t for huge t)
        raise ValueError(
            f"gamma={gamma} gives non-positive learning rates over rounds={n} (underflow)"
        )
    return main
