"""``build_strategy(run_config)``: the strategy for the configured ``mechanism``.

* ``"fedavg"`` -- the non-private baseline: :class:`~strategies.dpmf.DPMatrixFactorizationFedAvg`
  with noise and clipping disabled but the *same* cohorts (participation schedule), uniform
  fixed-denominator average and server optimizer (schedule, momentum, weight decay) as the DP
  runs, so a comparison isolates the cost of privacy.  Textbook FedAvg is
  ``schedule="constant", server-lr=1, server-momentum=0``.
* ``"dp-fedavg"`` -- Flower's own ``DifferentialPrivacyServerSideFixedClipping`` (independent
  noise from the unseeded global ``np.random``) around a cohort-sampling, uniformly averaging
  FedAvg (:class:`~strategies.baselines.FlowerDPFedAvg`); noise multiplier from
  ``fedmf.accounting.calibrate_dpfedavg(epsilon, delta, participations=k)``.  The same
  mechanism in our strategy (seeded, checkpointable, fixed denominator, server optimizer) is
  ``"identity"``.
* anything else -- :class:`~strategies.dpmf.DPMatrixFactorizationFedAvg` with
  ``fedmf.factorizations.factorize(method=mechanism, ...)``.

Every returned strategy has ``.privacy`` and ``.last_train_metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

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
            ``device`` (DP-MF only) and ``sampling`` (``"cohort"``/``"uniform"``, dp-fedavg
            only).

    Raises:
        ValueError: on an invalid configuration (naming the parameter).
    """
    cfg = run_config if isinstance(run_config, DPConfig) else DPConfig.from_run_config(run_config)
    if cfg.mechanism == "dp-fedavg":
        kwargs = {k: v for k, v in flower_kwargs.items() if k not in _DPMF_ONLY}
        return FlowerDPFedAvg(config=cfg, **kwargs)
    kwargs = {k: v for k, v in flower_kwargs.items() if k not in _BASELINE_ONLY}
    return DPMatrixFactorizationFedAvg(config=cfg, **kwargs)
