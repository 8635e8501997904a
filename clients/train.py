"""Local training, evaluation, update (delta) norms and client-side clipping.

This module is the one definition of a client's local training: :func:`train_local` (one
client, the ClientApp) and :func:`train_cohort` (many clients at once, the vectorized backend)
share the batch order (:func:`batch_order` from :func:`client_seed`), the loss (mean
cross-entropy per batch), the optimizer (SGD with heavy-ball momentum) and the clipping
(:func:`clip_update`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


def delta_norms(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
                ) -> torch.Tensor:
    """L2 norms (float64 sums) of ``new[c] - old`` for the stacked clients ``c`` of ``new``
    (tensors ``(clients, *shape)``), over the floating-point tensors."""
    total: torch.Tensor | None = None
    for k in float_keys(old):
        d = (new[k].detach() - old[k].detach().to(new[k].device)).reshape(new[k].shape[0], -1)
        # float32 norms of 4096-element blocks, squared and summed in float64: accurate to
        # ~1e-7 relative (what clip verification at 1e-6 needs) at float32 speed
        for block in d.split(4096, dim=1):
            sq = torch.linalg.vector_norm(block, dim=1).to(torch.float64) ** 2
            total = sq if total is None else total + sq
    assert total is not None, "no floating-point tensors"
    return total.sqrt()


def clip_deltas(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor],
                clip_norm: float) -> tuple[StateDict, torch.Tensor, torch.Tensor]:
    """Client-side clipping of stacked clients: ``new' = old + (new - old) min(1, C/||.||)``
    (in float64).  Returns (clipped states, pre-clip norms, clipped mask); non-float tensors
    are taken from ``new``."""
    if not clip_norm > 0:
        raise ValueError(f"clip-norm must be > 0, got {clip_norm}")
    norms = delta_norms(old, new)
    clipped = norms > clip_norm
    out: StateDict = {k: v.detach().clone() for k, v in new.items()}
    if bool(clipped.any()):
        scale = torch.where(clipped, clip_norm / norms.clamp_min(1e-300),
                            torch.ones_like(norms))
        for k in float_keys(old):
            o = old[k].detach().to(new[k].device, torch.float64)
            d = new[k].detach().to(torch.float64) - o
            shape = (-1,) + (1,) * (d.dim() - 1)
            out[k] = (o + d * scale.view(shape)).to(new[k].dtype)
    return out, norms, clipped


def _stack(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().unsqueeze(0) for k, v in state.items()}


def delta_norm(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``new - old`` over the floating-point tensors (float64 accumulation)."""
    return float(delta_norms(old, _stack(new))[0])


def clip_update(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor],
                clip_norm: float) -> tuple[StateDict, float, bool]:
    """Clip one client's delta (:func:`clip_deltas` for a cohort of one).

    Returns (clipped state, pre-clip delta norm, whether clipping was applied).
    """
    out, norms, clipped = clip_deltas(old, _stack(new), clip_norm)
    return {k: v[0] for k, v in out.items()}, float(norms[0]), bool(clipped[0])


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``FloatingPointError`` naming the first non-finite float tensor."""
    for k in float_keys(state):
        if not bool(torch.isfinite(state[k]).all()):
            raise FloatingPointError(f"local training produced non-finite values in {k!r}")


def client_seed(seed: int, partition_id: int, server_round: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout)."""
    return int(seed) * 100003 + int(partition_id) + int(server_round)


def batch_order(n: int, *, epochs: int, batch_size: int, seed: int) -> torch.Tensor:
    """The local training order of one client, a function of its seed (:func:`client_seed`):
    ``epochs`` shuffled passes over ``n`` examples, as a ``(steps, batch_size)`` tensor of
    example indices, ``-1`` padding each pass's last, partial batch."""
    if batch_size < 1:
        raise ValueError(f"batch-size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(int(seed))
    per_epoch = -(-n // batch_size)
    rows = []
    for _ in range(epochs):
        padded = torch.full((per_epoch * batch_size,), -1, dtype=torch.long)
        padded[:n] = torch.randperm(n, generator=generator)
        rows.append(padded.view(per_epoch, batch_size))
    return torch.cat(rows) if rows else torch.empty((0, batch_size), dtype=torch.long)


def _check_training_args(*, epochs: int, lr: float, momentum: float) -> None:
    if epochs < 0:
        raise ValueError(f"local-epochs must be >= 0, got {epochs}")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"client-momentum must be in [0, 1), got {momentum}")


def train_local(model: nn.Module, data: TensorData, *, epochs: int = 1, batch_size: int = 32,
                lr: float = 0.05, momentum: float = 0.0, seed: int = 0,
                device: torch.device | str = "cpu") -> TrainStats:
    """Local SGD with heavy-ball momentum (``buf = m buf + g``, ``p -= lr buf``, as
    ``torch.optim.SGD``) on the mean cross-entropy of each batch of :func:`batch_order`;
    ``model`` is updated in place.  :func:`train_cohort` runs the same training for many
    clients at once.  ``data`` may live on the CPU; batches are moved to ``device``.
    """
    _check_training_args(epochs=epochs, lr=lr, momentum=momentum)
    if len(data) == 0:
        raise ValueError("train data is empty (partition too small for val-fraction?)")
    torch.manual_seed(seed)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bufs = [torch.zeros_like(p) for p in params]
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    for row in batch_order(len(data), epochs=epochs, batch_size=batch_size, seed=seed):
        batch = data.select(row[row >= 0]).to(device)
        loss = loss_fn(model_logits(model, batch.inputs), batch.labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"local training loss is not finite ({loss.item()})")
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, b in zip(params, grads, bufs, strict=True):
                b.mul_(momentum).add_(g)
                p.sub_(b, alpha=lr)
        losses.append(float(loss.detach()))
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainStats(loss=mean, steps=len(losses), examples=len(data), losses=losses)


def vectorizable(model: nn.Module) -> bool:
    """Whether :func:`train_cohort` supports ``model`` (fedmf's CNN and linear heads)."""
    from .models import LinearHead, SmallCNN

    return isinstance(model, SmallCNN | LinearHead)


@dataclass
class CohortOutput:
    """The outcome of :func:`train_cohort` for ``C`` clients.

    Attributes:
        state: the trained models, stacked: ``{key: (C, *shape)}`` on the training device.
        stats: per client (``None`` where training failed).
        errors: per client, why training failed (``None``: it did not).
    """

    state: StateDict
    stats: list[TrainStats | None]
    errors: list[str | None]


def stack_data(datas: list[TensorData], *, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, lengths)``: the clients' examples padded to the longest, for
    :func:`train_cohort` (``x``: ``(clients, longest, *shape)``)."""
    longest = max([1, *(len(d) for d in datas)])
    first = next((d for d in datas if len(d)), datas[0])
    x = torch.zeros((len(datas), longest, *first.inputs.shape[1:]), dtype=first.inputs.dtype,
                    device=device)
    y = torch.zeros((len(datas), longest), dtype=torch.long, device=device)
    for c, d in enumerate(datas):
        x[c, : len(d)] = d.inputs.to(device)
        y[c, : len(d)] = d.labels.to(device)
    return x, y, torch.tensor([len(d) for d in datas], dtype=torch.long)


def train_cohort(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor,
                 *, seeds: list[int], clients: torch.Tensor | None = None, epochs: int = 1,
                 batch_size: int = 32, lr: float = 0.05, momentum: float = 0.0,
                 chunk_size: int = 256) -> CohortOutput:
    """:func:`train_local` for every client of a cohort at once, from the same model.

    ``x``, ``y``, ``lengths``: the clients' examples padded to a common length
    (:func:`stack_data`), on the device to train on; ``clients`` selects the rows to train
    (default: all; examples are gathered per step, never copied whole).  The clients'
    parameters are stacked and
    one ``torch.func.vmap`` computes every client's gradient per step; the batch orders are
    each client's :func:`batch_order`, padded to the longest (padding does not count in a
    batch's mean, and a client without a batch in a step keeps its parameters and momentum),
    so unequal partitions and several epochs give exactly the per-client training, up to
    floating-point reassociation.  Clients run in chunks of ``chunk_size``.
    """
    from torch.func import functional_call, grad_and_value, vmap

    from .models import LinearHead

    _check_training_args(epochs=epochs, lr=lr, momentum=momentum)
    if not vectorizable(model):
        raise ValueError(f"model: {type(model).__name__} can not be vectorized (supported: the "
                         "cnn and linear heads); use the ray or inprocess backend")
    model = model.to(x.device).train()
    base = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def batch_loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (params, buffers), (xb,))
        ce = nn.functional.cross_entropy(logits, yb, reduction="none")
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    step = _linear_step if isinstance(model, LinearHead) else vmap(grad_and_value(batch_loss))
    parts: list[dict[str, torch.Tensor]] = []
    stats: list[TrainStats | None] = []
    errors: list[str | None] = []
    rows_all = torch.arange(len(lengths)) if clients is None else clients.cpu()
    for lo in range(0, len(rows_all), chunk_size):
        rows = rows_all[lo : lo + chunk_size]
        params, chunk_stats, chunk_errors = _train_chunk(
            x, y, rows, lengths[rows].tolist(), seeds[lo : lo + chunk_size], base=base,
            step=step, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum)
        parts.append(params)
        stats += chunk_stats
        errors += chunk_errors
    state = {k: torch.cat([p[k] for p in parts]) for k in base}
    for k, b in buffers.items():
        state[k] = b.unsqueeze(0).expand(len(rows_all), *b.shape)
    return CohortOutput({k: state[k] for k in model.state_dict()}, stats, errors)


def _linear_step(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                 mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The cohort step of a :class:`~clients.models.LinearHead` in closed form: the gradient
    of the masked mean cross-entropy is ``x^T (softmax - onehot) / count`` per client, as
    batched matmuls (what ``vmap(grad(...))`` computes, without the autograd overhead that
    dominates for a linear model on a CPU)."""
    W, b = params["linear.weight"], params["linear.bias"]  # (C, O, I), (C, O)
    logp = torch.baddbmm(b.unsqueeze(1), xb, W.transpose(1, 2)).log_softmax(-1)  # (C, B, O)
    target = yb.unsqueeze(-1)
    weight = mask / mask.sum(-1, keepdim=True).clamp_min(1.0)  # (C, B): 1/count or 0
    loss = -(logp.gather(-1, target).squeeze(-1) * weight).sum(-1)
    g = logp.exp().scatter_add_(-1, target, torch.full_like(logp[..., :1], -1.0))
    g.mul_(weight.unsqueeze(-1))
    return {"linear.weight": torch.bmm(g.transpose(1, 2), xb), "linear.bias": g.sum(1)}, loss


def _train_chunk(x: torch.Tensor, y: torch.Tensor, clients: torch.Tensor, lengths: list[int],
                 seeds: list[int], *, base: dict[str, torch.Tensor], step: Any, epochs: int,
                 batch_size: int, lr: float, momentum: float
                 ) -> tuple[dict[str, torch.Tensor], list[TrainStats | None], list[str | None]]:
    device, n_clients = x.device, len(lengths)
    orders = [batch_order(n, epochs=epochs, batch_size=batch_size, seed=s)
              for n, s in zip(lengths, seeds, strict=True)]
    steps = max((len(o) for o in orders), default=0)
    idx = torch.full((n_clients, steps, batch_size), -1, dtype=torch.long)
    for c, order in enumerate(orders):
        idx[c, : len(order)] = order
    mask = (idx >= 0).to(device=device, dtype=torch.float32)  # real examples
    idx = idx.clamp_min(0).to(device)
    active = mask.sum(-1) > 0  # (clients, steps): the client takes this step
    params = {k: v.unsqueeze(0).repeat(n_clients, *([1] * v.dim())) for k, v in base.items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()} if momentum else {}
    losses = torch.zeros((n_clients, steps), device=device)
    rows = clients.to(device).unsqueeze(1)
    for s in range(steps):
        grads, loss = step(params, x[rows, idx[:, s]], y[rows, idx[:, s]], mask[:, s])
        on = active[:, s].to(losses.dtype)
        with torch.no_grad():
            # A client without a batch in this step has zero gradient; it must also keep its
            # momentum (factor 1 instead of m) and take no step (rate 0 instead of lr).
            rate = (-lr * on)
            for k, p in params.items():
                shape = (-1,) + (1,) * (p.dim() - 1)
                if momentum:
                    buf = bufs[k]
                    buf.mul_((1.0 + (momentum - 1.0) * on).view(shape)).add_(grads[k])
                    p.addcmul_(rate.view(shape), buf)
                else:
                    p.addcmul_(rate.view(shape), grads[k])
            losses[:, s] = loss.detach() * on
    n_steps = active.sum(1).cpu().tolist()
    losses_cpu = losses.cpu()
    stats: list[TrainStats | None] = []
    errors: list[str | None] = []
    for c, n in enumerate(lengths):
        row = losses_cpu[c, : n_steps[c]]
        if n == 0:
            stats.append(None)
            errors.append("train data is empty (partition too small for val-fraction?)")
        elif not bool(torch.isfinite(row).all()):
            stats.append(None)
            errors.append(f"local training loss is not finite ({float(row[-1])})")
        else:
            stats.append(TrainStats(loss=float(row.mean()), steps=n_steps[c], examples=n,
                                    losses=row.tolist()))
            errors.append(None)
    return params, stats, errors


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
    for idx in torch.arange(len(data)).split(batch_size):
        batch = data.select(idx).to(device)
        logits = model_logits(model, batch.inputs)
        loss_sum += float(loss_fn(logits.float(), batch.labels))
        correct += int((logits.argmax(-1) == batch.labels).sum())
    return loss_sum / len(data), correct / len(data)
