"""Glue between the run config and the client/server code: models, data, devices and the
server's centralized evaluation function for ``strategy.start(evaluate_fn=...)``.

Run-config keys are those of ``docs/CONTRACT.md``. Optional extra keys (read with
defaults, not required in pyproject): ``max-length`` (tokens per IMDB text, 256) and
``max-test-examples`` (cap on the central test split, 0 = all).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from torch import nn

from .data import (
    ClientData,
    DataConfig,
    Representation,
    TensorData,
    default_encoder_path,
    load_client_data,
    load_test_data,
)
from .models import MODELS, build_model
from .train import evaluate_model

ENV_THREADS = "FEDMF_CLIENT_THREADS"
ENV_DEVICE = "FEDMF_DEVICE"


def representation(run_config: Mapping[str, Any]) -> Representation:
    """How the configured model consumes examples (image / embedding / tokens)."""
    model = str(run_config.get("model", "cnn"))
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    max_length = int(run_config.get("max-length", 256))
    path = str(run_config.get("model-path", "") or "")
    if model in ("cnn", "resnet18"):
        return Representation("image")
    return Representation("embedding" if model == "head" else "tokens",
                          path or default_encoder_path(), max_length)


def get_model(run_config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model for the run (deterministic given ``seed``).

    For ``model="head"`` this is only the linear head: the frozen encoder never leaves the
    client, so the server aggregates (and noises) the head alone.
    """
    return build_model(
        dataset=str(run_config.get("dataset", "cifar10")),
        model=str(run_config.get("model", "cnn")),
        model_path=str(run_config.get("model-path", "") or ""),
        seed=int(run_config.get("seed", 0)),
    )


def get_initial_arrays(run_config: Mapping[str, Any]) -> ArrayRecord:
    """``ArrayRecord`` of :func:`get_model`'s state dict (the server's initial model)."""
    return ArrayRecord(get_model(run_config).state_dict())


@functools.lru_cache(maxsize=2)
def _model_template(dataset: str, model: str, model_path: str) -> nn.Module:
    return build_model(dataset=dataset, model=model, model_path=model_path)


def cached_model(run_config: Mapping[str, Any]) -> nn.Module:
    """A process-cached model instance of the right architecture (weights arbitrary).

    Callers overwrite every tensor with ``load_state_dict(strict=True)``; this avoids
    re-reading pretrained checkpoints on every client call.
    """
    return _model_template(str(run_config.get("dataset", "cifar10")),
                           str(run_config.get("model", "cnn")),
                           str(run_config.get("model-path", "") or ""))


def load_state(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ``ArrayRecord`` into ``model`` (strict: every key must match)."""
    state = arrays.to_torch_state_dict()
    model.load_state_dict(state, strict=True)


def select_device() -> torch.device:
    """``FEDMF_DEVICE`` if set, else CUDA when visible (a Ray actor given a GPU), else CPU."""
    forced = os.environ.get(ENV_DEVICE)
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_THREADS_SET = False


def configure_threads(device: torch.device) -> None:
    """On CPU, use ``FEDMF_CLIENT_THREADS`` (default 1) torch threads, once per process."""
    global _THREADS_SET
    if _THREADS_SET or device.type != "cpu":
        return
    torch.set_num_threads(max(1, int(os.environ.get(ENV_THREADS, "1"))))
    _THREADS_SET = True


def client_data(run_config: Mapping[str, Any], partition_id: int) -> ClientData:
    """Train/validation tensors of one client (process-cached)."""
    return load_client_data(DataConfig.from_run_config(run_config), int(partition_id),
                            representation(run_config))


def test_data(run_config: Mapping[str, Any]) -> TensorData:
    """The central test split as tensors (process-cached)."""
    return load_test_data(DataConfig.from_run_config(run_config), representation(run_config),
                          max_examples=int(run_config.get("max-test-examples", 0)))


def central_evaluate_fn(
    run_config: Mapping[str, Any], *, device: torch.device | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Centralized evaluation for ``strategy.start(evaluate_fn=...)``.

    The returned function evaluates the global model on the test split when
    ``server_round % eval-every == 0`` or ``server_round == rounds`` and returns
    ``MetricRecord({"accuracy", "loss"})``; otherwise ``None``. Test data and the model are
    built lazily on the first evaluated round and reused.
    """
    cfg = dict(run_config)
    every = max(1, int(cfg.get("eval-every", 1)))
    rounds = int(cfg.get("rounds", 0))
    dev = device or select_device()
    holder: dict[str, Any] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % every != 0 and server_round != rounds:
            return None
        if "model" not in holder:
            holder["model"] = copy.deepcopy(cached_model(cfg))
            holder["data"] = test_data(cfg)
            log(INFO, "fedmf central eval: %d test examples on %s", len(holder["data"]), dev)
        model = holder["model"]
        load_state(model, arrays)
        loss, acc = evaluate_model(model, holder["data"], device=dev,
                                   batch_size=max(256, int(cfg.get("batch-size", 32))))
        return MetricRecord({"accuracy": float(acc), "loss": float(loss)})

    return evaluate
