"""The vectorized backend over several devices: a round's cohort split over Ray actors.

One device bounds the vectorized backend twice: every partition's training tensors must fit in
its memory, and one device trains the whole cohort.  :class:`ShardedGrid` keeps the grid --
clipping, checks and the reply messages, hence everything the strategy and the privacy
accounting see -- in this process, and moves only the local training
(:class:`~simulations.backends.vectorized.CohortTrainer`) into ``shards`` Ray actors, one CPU
(and ``num_gpus_per_shard`` GPUs) each, on this machine or a cluster (``ray_address``).
Partitions are assigned to shards once, balanced by training examples (:func:`assign_shards`),
and each actor loads only its own; a round's model goes into Ray's object store once and every
actor trains its clients with the ClientApp's seeds, so the replies equal the single-process
ones up to floating-point reassociation.  A shard actor that dies costs its clients of that
round (error replies, like failed ClientApps) and is replaced for the next round.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import ray
import torch
from flwr.common.logger import log
from ray.exceptions import RayActorError

from clients.config import ClientConfig, client_config
from clients.data import partition_index, split_indices
from clients.train import CohortOutput, TrainStats

from . import BackendOptions
from .ray import ray_init_args
from .vectorized import CohortTrainer, VectorizedGrid, default_device, serve

__all__ = ["ShardedGrid", "assign_shards", "run", "train_example_counts"]

#: Environment variables a shard actor inherits from this process (data and cache locations,
#: offline switches), also on a cluster that was started elsewhere.
_FORWARDED_ENV = ("FEDMF_", "HF_")


def assign_shards(example_counts: Sequence[int], shards: int) -> list[list[int]]:
    """Partitions (indices of ``example_counts``) per shard, balanced by example count.

    Greedy, largest first (ties: the lower partition id), each into the currently lightest
    shard (ties: the lower shard index): deterministic, every partition exactly once, and the
    heaviest shard exceeds the lightest by at most the largest single count.  Each shard's
    partitions are sorted; a shard may be empty when ``shards`` exceeds the partitions.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    counts = [int(c) for c in example_counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"example counts must be >= 0, got {min(counts)}")
    loads = [(0, k) for k in range(shards)]  # a heap of (load, shard)
    out: list[list[int]] = [[] for _ in range(shards)]
    for pid in sorted(range(len(counts)), key=lambda p: (-counts[p], p)):
        load, k = heapq.heappop(loads)
        out[k].append(pid)
        heapq.heappush(loads, (load + counts[pid], k))
    return [sorted(part) for part in out]


def train_example_counts(config: ClientConfig) -> list[int]:
    """Every partition's number of training examples, from the partition index (no tensors
    are loaded)."""
    data = config.data_config()
    index = partition_index(data)
    return [len(split_indices(data, pid, len(index.partition(pid)[0]))[0])
            for pid in range(config.num_clients)]


class ShardedGrid(VectorizedGrid):
    """A :class:`VectorizedGrid` whose cohorts train on ``shards`` Ray actors.

    Needs an initialised Ray (:func:`run` starts one).  ``device``: where the actors train
    (default: each actor's :func:`~simulations.backends.vectorized.default_device`, so CUDA
    where ``num_gpus_per_shard > 0``); evaluate messages are answered in this process.
    ``example_counts``: the partitions' training examples (default:
    :func:`train_example_counts`).  Call :meth:`close` (or use it as a context manager) to
    end the actors.
    """

    def __init__(self, *, config: ClientConfig, num_nodes: int, shards: int,
                 device: str | torch.device | None = None, chunk_size: int = 512,
                 num_gpus_per_shard: float = 0.0, run_id: int = 1,
                 example_counts: Sequence[int] | None = None) -> None:
        if (device is not None and torch.device(device).type == "cuda"
                and not num_gpus_per_shard > 0):
            raise ValueError("num-gpus-per-shard: --device cuda needs --num-gpus-per-shard > 0 "
                             "(Ray hides the GPUs from actors without one)")
        if not ray.is_initialized():
            raise RuntimeError("ShardedGrid needs an initialised Ray (ray.init(...)); "
                               "simulations.backends.sharded.run starts one")
        super().__init__(config=config, num_nodes=num_nodes,
                         device=device or default_device(), chunk_size=chunk_size,
                         run_id=run_id)
        counts = (train_example_counts(config) if example_counts is None
                  else [int(c) for c in example_counts])
        if len(counts) != config.num_clients:
            raise ValueError(f"example_counts: {len(counts)} counts for num-clients="
                             f"{config.num_clients} partitions")
        #: each shard's partitions (shards without a partition are left out)
        self.assignment = [part for part in assign_shards(counts, shards) if part]
        if len(self.assignment) < shards:
            log(WARNING, "shards: %d requested, %d used (one partition at least each)",
                shards, len(self.assignment))
        self.shard_of = {pid: k for k, part in enumerate(self.assignment) for pid in part}
        self.num_gpus_per_shard = float(num_gpus_per_shard)
        self._shard_device = None if device is None else str(device)
        self._actor_class = ray.remote(CohortTrainer)
        self._loads: dict[int, Any] = {}
        #: the shard actors (index ``k`` trains ``assignment[k]``)
        self.actors: list[Any] = [self._spawn(k) for k in range(len(self.assignment))]
        log(INFO, "vectorized backend: %d shards, training examples per shard %s",
            len(self.assignment), [sum(counts[p] for p in part) for part in self.assignment])

    def __enter__(self) -> ShardedGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the shard actors (idempotent)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        self._loads.clear()

    def _spawn(self, k: int) -> Any:
        """A new actor for shard ``k``; it starts loading its partitions' tensors at once."""
        env = {key: value for key, value in os.environ.items()
               if key.startswith(_FORWARDED_ENV)}
        actor = self._actor_class.options(
            num_cpus=1, num_gpus=self.num_gpus_per_shard, max_restarts=1, max_task_retries=0,
            runtime_env={"env_vars": env} if env else None,
        ).remote(config=self.config, device=self._shard_device, chunk_size=self.chunk_size,
                 partitions=self.assignment[k])
        self._loads[k] = actor.load.remote()
        return actor

    def _replace(self, k: int) -> None:
        """Replace shard ``k``'s actor (dead, or restarted by Ray) with a new one."""
        with contextlib.suppress(Exception):
            ray.kill(self.actors[k], no_restart=True)
        self.actors[k] = self._spawn(k)

    def _train(self, partitions: list[int], *, state: dict[str, torch.Tensor],
               server_round: int) -> CohortOutput:
        """The cohort's local training on the shards: ``state`` is put into the object store
        once; each shard trains its clients; the outputs are stacked in cohort order.  The
        clients of a shard whose actor died get an error and an unchanged model."""
        if not self.actors:
            raise RuntimeError("the ShardedGrid is closed")
        positions: dict[int, list[int]] = {}
        for c, pid in enumerate(partitions):
            positions.setdefault(self.shard_of[pid], []).append(c)
        ref = ray.put(state)
        futures = {k: self.actors[k].train.remote(ref, [partitions[c] for c in pos],
                                                  server_round=server_round, to_cpu=True)
                   for k, pos in positions.items()}
        n = len(partitions)
        stacked = {key: torch.empty((n, *v.shape), dtype=v.dtype) for key, v in state.items()}
        stats: list[TrainStats | None] = [None] * n
        errors: list[str | None] = [None] * n
        for k, future in futures.items():
            pos = positions[k]
            rows = torch.tensor(pos, dtype=torch.long)
            loading = self._loads.pop(k, None)
            if loading is not None:  # its errors are the train task's too
                with contextlib.suppress(Exception):
                    ray.get(loading)
            try:
                out: CohortOutput = ray.get(future)
            except RayActorError as err:
                first = (str(err).strip().splitlines() or [""])[0]
                reason = f"{type(err).__name__}: shard {k} failed in round {server_round}: {first}"
                log(WARNING, "%s; its %d clients get error replies, the shard is restarted",
                    reason, len(pos))
                self._replace(k)
                for key, v in state.items():
                    stacked[key][rows] = v
                for c in pos:
                    errors[c] = reason
                continue
            for key in stacked:
                stacked[key][rows] = out.state[key]
            for i, c in enumerate(pos):
                stats[c], errors[c] = out.stats[i], out.errors[i]
        return CohortOutput(stacked, stats, errors)


def run(*, server_app: Any, num_supernodes: int, run_config: Mapping[str, Any],
        options: BackendOptions, run_id: int = 1) -> None:
    """Run ``server_app`` against a :class:`ShardedGrid` of ``options.shards`` actors.

    A Ray instance initialised by the caller is used (and kept); otherwise one is started with
    :func:`~simulations.backends.ray.ray_init_args` (``ray_address``: attach to a cluster) and
    shut down afterwards (``options.shutdown_ray`` overrides both).
    """
    owned = not ray.is_initialized()
    shutdown = owned if options.shutdown_ray is None else options.shutdown_ray
    if owned:
        ray.init(**ray_init_args(ray_address=options.ray_address, num_cpus=options.ray_num_cpus,
                                 num_gpus=options.ray_num_gpus, log_to_driver=options.verbose))
    grid: ShardedGrid | None = None
    try:
        _warn_resources(shards=options.shards, num_gpus_per_shard=options.num_gpus_per_shard)
        grid = ShardedGrid(config=client_config(run_config), num_nodes=num_supernodes,
                           shards=options.shards, device=options.device,
                           chunk_size=options.chunk_size,
                           num_gpus_per_shard=options.num_gpus_per_shard, run_id=run_id)
        serve(grid, server_app=server_app, run_config=run_config, run_id=run_id)
    finally:
        if grid is not None:
            grid.close()
        if shutdown and ray.is_initialized():
            ray.shutdown()


def _warn_resources(*, shards: int, num_gpus_per_shard: float) -> None:
    """Warn where the cluster can not hold every shard at once (they would wait)."""
    total = ray.cluster_resources()
    if total.get("CPU", 0.0) < shards:
        log(WARNING, "shards: %d shards need %d CPUs, the Ray cluster has %g; the rounds "
            "wait until every shard actor is placed", shards, shards, total.get("CPU", 0.0))
    if num_gpus_per_shard > 0 and total.get("GPU", 0.0) < shards * num_gpus_per_shard:
        log(WARNING, "num-gpus-per-shard: %d shards need %g GPUs, the Ray cluster has %g; the "
            "rounds wait until every shard actor is placed", shards, shards * num_gpus_per_shard,
            total.get("GPU", 0.0))
