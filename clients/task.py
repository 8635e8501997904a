"""Glue between the clients' configuration (:class:`clients.config.ClientConfig`) and the
client/server code: models, data, devices and the server's centralized evaluation function for
``strategy.start(evaluate_fn=...)``.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from torch import nn

from .config import ClientConfig
from .data import ClientData, TensorData, load_client_data, load_test_data
from .models import build_model
from .train import evaluate_model

ENV_THREADS = "FEDMF_CLIENT_THREADS"
ENV_DEVICE = "FEDMF_DEVICE"


def get_model(cfg: ClientConfig) -> nn.Module:
    """A freshly initialised model for the run (deterministic given ``seed``).

    For ``model="head"`` this is only the linear head: the frozen encoder never leaves the
    client, so the server aggregates (and noises) the head alone.
    """
    return build_model(dataset=cfg.dataset, model=cfg.model, model_path=cfg.model_path,
                       seed=cfg.seed)


def get_initial_arrays(cfg: ClientConfig) -> ArrayRecord:
    """``ArrayRecord`` of :func:`get_model`'s state dict (the server's initial model)."""
    return ArrayRecord(get_model(cfg).state_dict())


@functools.lru_cache(maxsize=2)
def _model_template(dataset: str, model: str, model_path: str) -> nn.Module:
    return build_model(dataset=dataset, model=model, model_path=model_path)


def cached_model(cfg: ClientConfig) -> nn.Module:
    """A process-cached model instance of the right architecture (weights arbitrary).

    Callers overwrite every tensor with ``load_state_dict(strict=True)``; this avoids
    re-reading pretrained checkpoints on every client call.
    """
    return _model_template(cfg.dataset, cfg.model, cfg.model_path)


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


def client_data(cfg: ClientConfig, partition_id: int) -> ClientData:
    """Train/validation tensors of one client (process-cached)."""
    return load_client_data(cfg.data_config(), int(partition_id), cfg.representation())


def test_data(cfg: ClientConfig) -> TensorData:
    """The central test split as tensors (process-cached)."""
    return load_test_data(cfg.data_config(), cfg.representation(),
                          max_examples=cfg.max_test_examples)


def central_evaluate_fn(
    cfg: ClientConfig, *, rounds: int, eval_every: int = 1, device: torch.device | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Centralized evaluation for ``strategy.start(evaluate_fn=...)``.

    The returned function evaluates the global model on the test split when
    ``server_round % eval_every == 0`` or ``server_round == rounds`` and returns
    ``MetricRecord({"accuracy", "loss"})``; otherwise ``None``. Test data and the model are
    built lazily on the first evaluated round and reused.
    """
    every = max(1, int(eval_every))
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
                                   batch_size=max(256, cfg.batch_size))
        return MetricRecord({"accuracy": float(acc), "loss": float(loss)})

    return evaluate
