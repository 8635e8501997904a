"""The user's model and data: every client holds a few noisy samples of one linear function."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

D_IN = 5
#: the function every client samples
TRUE_W = np.arange(1, D_IN + 1, dtype=np.float64) / D_IN


def client_data(partition: int, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The tiny data set of client ``partition`` (seeded, generated, never written to disk)."""
    rng = np.random.default_rng(1000 + partition)
    x = rng.normal(size=(n, D_IN))
    return x, x @ TRUE_W + 0.5 + 0.1 * rng.normal(size=n)


def to_record(w: np.ndarray, b: np.ndarray) -> ArrayRecord:
    """The model as a Flower ``ArrayRecord`` (float32, as a torch ``state_dict`` would be)."""
    return ArrayRecord({"w": Array(w.astype(np.float32)), "b": Array(b.astype(np.float32))})


def initial_model() -> ArrayRecord:
    return to_record(np.zeros(D_IN), np.zeros(1))
