"""fedmf: differentially private federated learning with correlated (matrix-factorization) noise.

The maths core is importable without torch or Flower; public names are resolved lazily
(PEP 562), so ``import fedmf`` stays cheap and never imports ``fedmf.noise`` (torch).
The sensitivity *function* lives in ``fedmf.sensitivity.sensitivity`` (the package attribute
``fedmf.sensitivity`` is the submodule).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "METHODS",
    "SCHEDULES",
    "Factorization",
    "NoiseSpec",
    "Participation",
    "Sensitivity",
    "Workload",
    "__version__",
    "brute_force_sensitivity",
    "decoder_row_norms",
    "factorize",
    "learning_rates",
    "prefix_workload",
    "sgd_workload",
]

try:  # the installed distribution's version (pyproject.toml is the one definition)
    from importlib.metadata import PackageNotFoundError as _NotFound
    from importlib.metadata import version as _version

    __version__: str = _version("fedmf")
except _NotFound:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "METHODS": "fedmf.factorizations",
    "Factorization": "fedmf.factorizations",
    "NoiseSpec": "fedmf.factorizations",
    "factorize": "fedmf.factorizations",
    "SCHEDULES": "fedmf.schedules",
    "learning_rates": "fedmf.schedules",
    "Workload": "fedmf.workloads",
    "prefix_workload": "fedmf.workloads",
    "sgd_workload": "fedmf.workloads",
    "Participation": "fedmf.participation",
    "Sensitivity": "fedmf.sensitivity",
    "brute_force_sensitivity": "fedmf.sensitivity",
    "decoder_row_norms": "fedmf.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from fedmf.errors import decoder_row_norms
    from fedmf.factorizations import METHODS, Factorization, NoiseSpec, factorize
    from fedmf.participation import Participation
    from fedmf.schedules import SCHEDULES, learning_rates
    from fedmf.sensitivity import Sensitivity, brute_force_sensitivity
    from fedmf.workloads import Workload, prefix_workload, sgd_workload


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
