"""Backends that run the fedmf ServerApp against simulated clients, behind one signature::

    backend = load_backend("ray")           # or "inprocess"
    backend(server_app=..., client_app=..., num_supernodes=N, run_config=flat_config,
            options=BackendOptions(...))

* ``ray`` (:mod:`.ray`) -- Flower's simulation engine: every client is a ClientApp call in a Ray
  actor; arbitrary ClientApps, GPUs shared between actors, clusters (``ray_address``).
* ``inprocess`` (:mod:`.inprocess`) -- the same ServerApp, ClientApp and Flower messages, answered
  sequentially in this process: no actor overhead, for small models and sweeps.
* ``vectorized`` (:mod:`.vectorized`) -- the same ServerApp and messages; a round's clients train
  together as one batched computation on ``device`` (``torch.func.vmap`` for the CNN, batched
  matmuls for the linear heads): large cohorts on one GPU (or CPU), fedmf's own local training
  and models only.  With ``shards > 1`` (:mod:`.sharded`) the cohort is split over that many Ray
  actors (one device each, possibly on a cluster).

Every backend sees the ServerApp's strategy through a Flower ``Grid`` and real ``Message``
objects, so clipping, noise, accounting, cohorts and checkpoints are the same everywhere.
:func:`task_identity` is the one place that sets Flower's task identity outside its runtime.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "BackendOptions", "check_shards", "load_backend", "task_identity"]

#: Backend names (``--backend``).
BACKENDS = ("ray", "inprocess", "vectorized")

#: ``backend(*, server_app, client_app, num_supernodes, run_config, options) -> None``
Backend = Callable[..., None]


@dataclass(frozen=True)
class BackendOptions:
    """Engine settings (each backend reads what applies to it).

    Attributes:
        num_cpus_per_client, num_gpus_per_client: Ray resources of one ClientApp actor
            (fractional GPUs share a device).
        ray_address: attach to an existing Ray cluster instead of starting one.
        ray_num_cpus, ray_num_gpus: resources of a locally started Ray instance.
        shutdown_ray: shut Ray down afterwards; ``None``: only if the run started it.
        verbose: Flower's DEBUG logging and the actors' output.
        device: where the vectorized backend trains (``None``: CUDA if available, else CPU).
        chunk_size: clients per batched computation of the vectorized backend.
        shards: the vectorized backend's cohort runs on this many Ray actors (1: in this
            process, no Ray).
        num_gpus_per_shard: Ray GPUs of one shard actor (fractional allowed).
    """

    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    ray_num_gpus: float | None = None
    shutdown_ray: bool | None = None
    verbose: bool = False
    device: str | None = None
    chunk_size: int = 512
    shards: int = 1
    num_gpus_per_shard: float = 0.0

    def __post_init__(self) -> None:
        if not self.num_cpus_per_client > 0:
            raise ValueError(
                f"num-cpus-per-client must be > 0, got {self.num_cpus_per_client}")
        if not self.num_gpus_per_client >= 0:
            raise ValueError(
                f"num-gpus-per-client must be >= 0, got {self.num_gpus_per_client}")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:
            raise ValueError(f"ray-num-cpus must be >= 1, got {self.ray_num_cpus}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk-size must be >= 1, got {self.chunk_size}")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ValueError(f"shards must be an integer >= 1, got {self.shards!r}")
        if not (math.isfinite(self.num_gpus_per_shard) and self.num_gpus_per_shard >= 0):
            raise ValueError(
                f"num-gpus-per-shard must be >= 0, got {self.num_gpus_per_shard}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"device: {self.device!r} is not a torch device ({err})") from None


def load_backend(name: str) -> Backend:
    """The ``run`` function of backend ``name`` (imports Flower / Ray only now); the backends
    other than ``vectorized`` refuse ``options.shards > 1``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    run: Backend = importlib.import_module(f"{__name__}.{name}").run
    if name == "vectorized":
        return run

    @functools.wraps(run)
    def checked(*args: Any, options: BackendOptions | None = None, **kwargs: Any) -> None:
        if options is not None:
            check_shards(options, backend=name)
        run(*args, options=options, **kwargs)
    return checked


def check_shards(options: BackendOptions, *, backend: str) -> None:
    """Raise ``ValueError`` where ``options.shards > 1`` and ``backend`` is not vectorized."""
    if options.shards > 1 and backend != "vectorized":
        raise ValueError(f"shards: --shards {options.shards} needs --backend vectorized "
                         f"(got --backend {backend}); the {backend} backend does not shard")


@contextlib.contextmanager
def task_identity(*, run_id: int, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Set Flower's task identity for the block (Flower stamps instruction messages with it and
    only its runtime sets it; internal API ``flwr.supercore.task_identity``, checked against
    flwr 1.41 and 1.42)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


