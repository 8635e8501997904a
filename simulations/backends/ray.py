"""Flower's simulation engine (Ray): every simulated client is a ClientApp call in a Ray actor.

The ServerApp runs in a thread of this process (so per-round callbacks work), the ClientApp in
Ray actors, one per ``num_cpus_per_client`` / ``num_gpus_per_client`` share.  A Ray instance
initialised by the caller is reused and kept (``compare`` runs many cells on one), otherwise one
is started for the run and shut down after it.  Flower gives the simulated nodes new random node
ids at every start; the strategies key everything durable on the partition id instead
(``strategies.participation``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import BackendOptions

__all__ = ["ray_init_args", "run"]


def ray_init_args(*, ray_address: str | None = None, num_cpus: int | None = None,
                  num_gpus: float | None = None, log_to_driver: bool = True
                  ) -> dict[str, Any]:
    """``ray.init`` keyword arguments for Flower's Ray backend (``backend_config["init_args"]``).

    With ``ray_address`` the driver attaches to that cluster (resources are the cluster's);
    otherwise a local Ray instance with ``num_cpus`` (default: all cores) and ``num_gpus``
    (default: Ray's detection) is started.  The dashboard is always off;
    ``log_to_driver=False`` hides the actors' output.
    """
    args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(log_to_driver)}
    if ray_address:
        args["address"] = ray_address
        return args
    args["num_cpus"] = int(num_cpus) if num_cpus else (os.cpu_count() or 1)
    if num_gpus is not None:
        args["num_gpus"] = num_gpus
    return args


def _keep_ray(*args: Any, **kwargs: Any) -> None:
    """Stand-in for ``ray.shutdown`` while a kept Ray instance runs a simulation."""


def run(*, server_app: Any, client_app: Any, num_supernodes: int,
        run_config: Mapping[str, Any], options: BackendOptions | None = None) -> None:
    """Run ``server_app`` against ``num_supernodes`` Ray-simulated clients of ``client_app``."""
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    opts = options or BackendOptions()
    owned = not ray.is_initialized()
    shutdown = owned if opts.shutdown_ray is None else opts.shutdown_ray
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": opts.num_cpus_per_client,
                             "num_gpus": opts.num_gpus_per_client},
        "init_args": ray_init_args(ray_address=opts.ray_address, num_cpus=opts.ray_num_cpus,
                                   num_gpus=opts.ray_num_gpus, log_to_driver=opts.verbose),
    }
    real_shutdown = ray.shutdown
    if not shutdown:
        # Flower's RayBackend.terminate() calls ray.shutdown() after every run; keep the
        # instance (and save its start-up) for the caller's next run.
        ray.shutdown = _keep_ray  # type: ignore[assignment]
    try:
        flwr_run_simulation(server_app=server_app, client_app=client_app,
                            num_supernodes=num_supernodes, backend_name="ray",
                            backend_config=backend_config,  # type: ignore[arg-type]
                            verbose_logging=opts.verbose)
    finally:
        ray.shutdown = real_shutdown  # type: ignore[assignment]
        if shutdown and ray.is_initialized():
            ray.shutdown()
