"""Flower strategies for DP federated learning with correlated (matrix-factorization) noise.

Public names are resolved lazily (PEP 562), so ``strategies.config`` (plain Python) can be
imported without importing Flower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DP_MECHANISMS",
    "MECHANISMS",
    "CohortFedAvg",
    "CohortSchedule",
    "DPConfig",
    "DPMatrixFactorizationFedAvg",
    "FlowerDPFedAvg",
    "MatrixFactorizationAccountant",
    "build_strategy",
    "flower_dp_ledger",
    "privacy_summary",
]

_LAZY = {
    "DP_MECHANISMS": "strategies.config",
    "MECHANISMS": "strategies.config",
    "DPConfig": "strategies.config",
    "CohortFedAvg": "strategies.baselines",
    "FlowerDPFedAvg": "strategies.baselines",
    "flower_dp_ledger": "strategies.baselines",
    "DPMatrixFactorizationFedAvg": "strategies.dpmf",
    "MatrixFactorizationAccountant": "strategies.accountant",
    "privacy_summary": "strategies.dpmf",
    "build_strategy": "strategies.factory",
    "CohortSchedule": "strategies.participation",
}

if TYPE_CHECKING:  # pragma: no cover
    from .accountant import MatrixFactorizationAccountant
    from .baselines import CohortFedAvg, FlowerDPFedAvg, flower_dp_ledger
    from .config import DP_MECHANISMS, MECHANISMS, DPConfig
    from .dpmf import DPMatrixFactorizationFedAvg, privacy_summary
    from .factory import build_strategy
    from .participation import CohortSchedule


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
