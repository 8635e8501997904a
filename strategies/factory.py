"""``build_strategy(run_config)``: the strategy for the configured ``mechanism``.

The names and what they mean are the registry :data:`fedmf.mechanisms.MECHANISMS`:

* ``"fedavg"`` -- the non-private baseline: :class:`~strategies.dpmf.DPMatrixFactorizationFedAvg`
  with noise and clipping disabled but the *same* cohorts, uniform fixed-denominator average
  and server optimizer (schedule, momentum, weight decay) as the DP runs, so a comparison
  isolates the cost of privacy.  Textbook FedAvg is ``schedule="constant", server-lr=1``.
* ``"dp-fedavg"`` -- independent noise: the same strategy with the identity factorization, so
  it differs from the correlated mechanisms only in the noise.
* ``"flower-dp"`` -- Flower's own ``DifferentialPrivacyServerSideFixedClipping`` as a labelled
  cross-check (:class:`~strategies.baselines.FlowerDPFedAvg`; server learning rate 1).
* anything else -- :class:`~strategies.dpmf.DPMatrixFactorizationFedAvg` with
  ``fedmf.factorizations.factorize(method=mechanism, ...)``.

Every returned strategy has ``.privacy``, ``.last_train_metrics`` and
``.participation_report()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedmf.mechanisms import mechanism

from .baselines import FlowerDPFedAvg
from .config import DPConfig
from .dpmf import DPMatrixFactorizationFedAvg

__all__ = ["build_strategy"]

_DPMF_ONLY = ("device",)
_BASELINE_ONLY = ("sampling",)


def build_strategy(run_config: Mapping[str, Any] | DPConfig, **flower_kwargs: Any) -> Strategy:
    """Strategy for ``run_config["mechanism"]`` (see the module docstring).

    Args:
        run_config: a Flower run config (``context.run_config``) or a :class:`DPConfig`.
        **flower_kwargs: Flower ``FedAvg`` keyword arguments (``fraction_evaluate``,
            ``min_evaluate_nodes``, ``evaluate_metrics_aggr_fn``, ...), ``poll_interval``;
            ``device`` (DP-MF only) and ``sampling`` (``"cohort"``/``"uniform"``, flower-dp
            only).

    Raises:
        ValueError: on an invalid configuration (naming the parameter).
    """
    cfg = run_config if isinstance(run_config, DPConfig) else DPConfig.from_run_config(run_config)
    if mechanism(cfg.mechanism).runner == "flower":
        kwargs = {k: v for k, v in flower_kwargs.items() if k not in _DPMF_ONLY}
        return FlowerDPFedAvg(config=cfg, **kwargs)
    kwargs = {k: v for k, v in flower_kwargs.items() if k not in _BASELINE_ONLY}
    return DPMatrixFactorizationFedAvg(config=cfg, **kwargs)
