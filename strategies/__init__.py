"""Flower strategies for DP federated learning with correlated (matrix-factorization) noise."""

from .baselines import CohortFedAvg, FlowerDPFedAvg, dpfedavg_privacy
from .config import DP_MECHANISMS, MECHANISMS, DPConfig
from .dpmf import DPMatrixFactorizationFedAvg, privacy_summary
from .factory import build_strategy
from .participation import CohortSchedule

__all__ = [
    "DP_MECHANISMS",
    "MECHANISMS",
    "CohortFedAvg",
    "CohortSchedule",
    "DPConfig",
    "DPMatrixFactorizationFedAvg",
    "FlowerDPFedAvg",
    "build_strategy",
    "dpfedavg_privacy",
    "privacy_summary",
]
