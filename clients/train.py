"""Local training, evaluation, update (delta) norms and client-side clipping."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import TensorData
from .models import model_logits

StateDict = dict[str, torch.Tensor]


@dataclass
class TrainStats:
    """Summary of one local training call."""

    loss: float          # mean loss over all steps
    steps: int
    examples: int        # training examples (the FedAvg weight)
    losses: list[float] = field(default_factory=list)  # per step


def clone_state(model: nn.Module) -> StateDict:
    """A detached CPU copy of ``model.state_dict()``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors (integer buffers such as counters are excluded)."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def delta_norm(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``new - old`` over the floating-point tensors (float64 accumulation)."""
    total = 0.0
    for k in float_keys(old):
        d = new[k].detach().to("cpu", torch.float64) - old[k].detach().to("cpu", torch.float64)
        total += float(torch.sum(d * d))
    return math.sqrt(total)


def clip_update(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor],
                clip_norm: float) -> tuple[StateDict, float, bool]:
    """Clip the delta: ``new' = old + (new - old) * min(1, C / ||new - old||)``.

    Returns (clipped state, pre-clip delta norm, whether clipping was applied). Non-float
    tensors are taken from ``new`` unchanged.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip-norm must be > 0, got {clip_norm}")
    norm = delta_norm(old, new)
    out: StateDict = {k: v.detach().clone() for k, v in new.items()}
    if norm <= clip_norm:
        return out, norm, False
    scale = clip_norm / norm
    for k in float_keys(old):
        o = old[k].detach().to(new[k].device, torch.float64)
        d = new[k].detach().to(torch.float64) - o
        out[k] = (o + d * scale).to(new[k].dtype)
    return out, norm, True


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``FloatingPointError`` naming the first non-finite float tensor."""
    for k in float_keys(state):
        if not bool(torch.isfinite(state[k]).all()):
            raise FloatingPointError(f"local training produced non-finite values in {k!r}")


def batches(n: int, batch_size: int, *, generator: torch.Generator | None = None,
            shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors of consecutive (shuffled) batches covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch-size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def client_seed(seed: int, partition_id: int, server_round: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout)."""
    return int(seed) * 100003 + int(partition_id) + int(server_round)


def train_local(model: nn.Module, data: TensorData, *, epochs: int = 1, batch_size: int = 32,
                lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 0.0,
                device: torch.device | str = "cpu",
                generator: torch.Generator | None = None, seed: int | None = None) -> TrainStats:
    """Local SGD (with momentum) for ``epochs`` passes over ``data``; model is updated in place.

    ``seed`` (see :func:`client_seed`) seeds torch and the batch order; ``generator`` gives the
    batch order directly.  ``data`` may live on the CPU; batches are moved to ``device`` one at
    a time unless the data already lives there.
    """
    if seed is not None:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
    if epochs < 0:
        raise ValueError(f"local-epochs must be >= 0, got {epochs}")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"client-momentum must be in [0, 1), got {momentum}")
    if len(data) == 0:
        raise ValueError("train data is empty (partition too small for val-fraction?)")
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    for _ in range(epochs):
        for idx in batches(len(data), batch_size, generator=generator):
            batch = data.select(idx).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model_logits(model, batch.inputs), batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training loss is not finite ({loss.item()})")
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainStats(loss=mean, steps=len(losses), examples=len(data), losses=losses)


@torch.no_grad()
def evaluate_model(model: nn.Module, data: TensorData, *, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data``; (nan, nan) if empty."""
    if len(data) == 0:
        return float("nan"), float("nan")
    model.to(device)
    model.eval()
    loss_sum, correct = 0.0, 0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for idx in batches(len(data), batch_size, shuffle=False):
        batch = data.select(idx).to(device)
        logits = model_logits(model, batch.inputs)
        loss_sum += float(loss_fn(logits.float(), batch.labels))
        correct += int((logits.argmax(-1) == batch.labels).sum())
    return loss_sum / len(data), correct / len(data)
