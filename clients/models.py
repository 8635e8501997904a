"""Models for fedmf clients: DP-friendly CIFAR-10 models (GroupNorm CNNs, never BatchNorm, and
``scatter-linear``, a linear head over frozen ScatterNet features) and IMDB text classifiers (a
trainable linear head over frozen sentence embeddings, or a transformer fine-tuned end to
end)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import MODELS, MODELS_FOR_DATASET


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels)`` groups (per-example, hence DP compatible)."""
    return nn.GroupNorm(min(32, channels), channels)


class SmallCNN(nn.Module):
    """Small CIFAR-10 CNN (about 0.19M parameters) with GroupNorm, suited to DP training."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, 3, 32, 32) images."""
        return self.classifier(self.features(x))


def resnet18_gn(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with every BatchNorm replaced by GroupNorm(min(32, c), c)."""
    from torchvision.models import resnet18

    return resnet18(num_classes=num_classes, norm_layer=group_norm)


class LinearHead(nn.Module):
    """Trainable linear classifier over frozen features (sentence embeddings, ScatterNet)."""

    def __init__(self, in_features: int, num_classes: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, in_features) embeddings."""
        return self.linear(x)


def load_transformer(model_path: str, num_labels: int = 2) -> nn.Module:
    """``AutoModelForSequenceClassification`` from ``model_path`` (local folder or hub id)."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels
        )
    except OSError as ex:
        raise FileNotFoundError(f"model-path: cannot load a transformer from "
                                f"{model_path!r} ({ex})") from ex


def build_model(*, dataset: str, model: str, model_path: str = "", seed: int = 0) -> nn.Module:
    """Build the model named ``model`` for ``dataset`` with a deterministic init.

    ``model_path`` is the encoder for ``head`` (default: the bundled all-MiniLM-L6-v2) and
    the pretrained checkpoint for ``transformer`` (same default).
    """
    from .data import DATASETS, default_encoder_path, encoder_dim

    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if model not in MODELS_FOR_DATASET[dataset]:
        raise ValueError(
            f"model {model!r} does not fit dataset {dataset!r}; "
            f"use one of {list(MODELS_FOR_DATASET[dataset])}"
        )
    num_classes = DATASETS[dataset].num_classes
    torch.manual_seed(seed)
    if model == "cnn":
        return SmallCNN(num_classes)
    if model == "scatter-linear":  # a linear head over frozen ScatterNet features
        from .features import SCATTER_DIM

        return LinearHead(SCATTER_DIM, num_classes)
    if model == "resnet18":
        return resnet18_gn(num_classes)
    path = model_path or default_encoder_path()
    if model == "head":
        try:
            dim = encoder_dim(path)
        except OSError as ex:
            raise FileNotFoundError(f"model-path: cannot read encoder config at "
                                    f"{path!r} ({ex})") from ex
        return LinearHead(dim, num_classes)
    return load_transformer(path, num_labels=num_classes)


def model_logits(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward pass returning logits for tensor inputs or Hugging Face keyword inputs."""
    out: Any = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
