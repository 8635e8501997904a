"""Frozen ScatterNet features for CIFAR-10 (the ``scatter-linear`` model).

Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better features (or much
more data)") reach about 67% at epsilon = 3 centrally with a linear model on ScatterNet
features: a fixed, data-independent feature map, so private training only has to learn a small
head.  Here, per image in [0, 1]:

1. the 2-D scattering transform with ``J = 2`` scales and ``L = 8`` angles (kymatio; 81
   coefficients per colour channel on an 8 x 8 grid: 243 x 8 x 8 = 15,552 values);
2. 2 x 2 average pooling to a 4 x 4 grid: 243 x 4 x 4 = 3,888 values;
3. per-example group normalisation of the 243 channels in 27 groups (no learned parameters,
   so no data statistics leak into the features);
4. scaling by ``1 / sqrt(3,888)``, so a feature vector has norm about 1 and client learning
   rates are O(1).

Chosen by measurement (``benchmarks/feature_probe.py``: a central, non-private linear probe on
20,000 training and 5,000 test images, SGD with the learning rate picked on a validation
tenth): without normalisation 25-32% test accuracy; with it, pooling to 1 x 1 / 2 x 2 / 4 x 4 /
none gives 39.4 / 51.3 / 61.6 / 63.5% (243 / 972 / 3,888 / 15,552 features).  4 x 4 keeps all
but 1.9 points of the unpooled accuracy with a 4x smaller head (38,890 instead of 155,530
parameters), which halves the DP noise on a round's mean, of norm ``z clip sqrt(d) / m``.

kymatio 0.3.0's package import breaks on scipy >= 1.17, but its 2-D torch frontend works; the
transform runs at about 375 images/s on this project's 2-core CPU and features are computed
once per image and cached on disk (``clients.data.cached_scatter_features``).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["SCATTER_DIM", "ScatterFeatures", "scatter_extractor"]

_J, _L, _POOL, _GROUPS = 2, 8, 4, 27
_CHANNELS = 3 * (1 + _J * _L + _L * _L * _J * (_J - 1) // 2)  # 3 x 81 = 243
#: Feature dimension of :class:`ScatterFeatures`.
SCATTER_DIM = _CHANNELS * _POOL * _POOL


class ScatterFeatures:
    """The frozen feature map (see the module docstring); ``encode`` maps (N, 3, 32, 32)
    images in [0, 1] to (N, :data:`SCATTER_DIM`) float32 features."""

    name = f"scatter-J{_J}-L{_L}-pool{_POOL}-gn{_GROUPS}-v1"
    dim = SCATTER_DIM

    def __init__(self, *, device: torch.device | str = "cpu") -> None:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.device = torch.device(device)
        self._scattering = ScatteringTorch2D(J=_J, shape=(32, 32), L=_L).to(self.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, batch: int = 256) -> torch.Tensor:
        """Features of ``images`` (computed in batches of ``batch``)."""
        out = []
        for lo in range(0, len(images), batch):
            x = images[lo : lo + batch].to(self.device, torch.float32)
            s = self._scattering(x).reshape(len(x), _CHANNELS, 8, 8)
            s = torch.nn.functional.adaptive_avg_pool2d(s, _POOL)
            s = torch.nn.functional.group_norm(s, _GROUPS)
            out.append((s.reshape(len(x), -1) / math.sqrt(SCATTER_DIM)).cpu())
        return torch.cat(out) if out else torch.zeros((0, SCATTER_DIM))


@functools.lru_cache(maxsize=1)
def scatter_extractor() -> ScatterFeatures:
    """The process-wide extractor (on CUDA when available)."""
    return ScatterFeatures(device="cuda" if torch.cuda.is_available() else "cpu")
