"""Run one fedmf simulation on Flower's simulation engine (Ray backend).

::

    from simulations.runner import fuse_run_config, validate_run_config, run_simulation
    cfg = validate_run_config(fuse_run_config({"rounds": 3, "num-clients": 4,
                                               "clients-per-round": 2, "output-dir": "out"}))
    summary = run_simulation(cfg, num_cpus_per_client=1, num_gpus_per_client=0.0)

The run config is the app's ``[tool.flwr.app.config]`` (:data:`DEFAULT_RUN_CONFIG`, kept in
sync with ``pyproject.toml`` by a test) updated with overrides.  Flower's Python entry point
``flwr.simulation.run_simulation`` gives both apps an *empty* run config, so the runner
builds the server app with the config bound (``server_app.make_server_app``) and wraps the
``ClientApp`` so that every node context carries it (:func:`make_client_app`); the
``ServerApp`` runs in a thread of this process (hence per-round callbacks work) and the
``ClientApp`` in Ray actors, one per ``num_cpus_per_client``/``num_gpus_per_client`` share.

This module imports Flower, torch and Ray only inside functions.
"""

from __future__ import annotations

import math
import os
import shlex
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import results

__all__ = [
    "DATASETS",
    "DEFAULT_RUN_CONFIG",
    "MAX_OPTIMAL_ROUNDS",
    "MODELS_FOR_DATASET",
    "PARTITIONERS",
    "coerce_run_config",
    "fuse_run_config",
    "make_client_app",
    "parse_run_config",
    "ray_init_args",
    "run_simulation",
    "validate_run_config",
]

#: ``[tool.flwr.app.config]`` of ``pyproject.toml`` (the Flower app's run config).
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "dataset": "cifar10",
    "data-dir": "",
    "partitioner": "iid",
    "alpha": 0.5,
    "classes-per-client": 2,
    "num-clients": 10,
    "clients-per-round": 5,
    "max-examples-per-client": 0,
    "val-fraction": 0.1,
    "max-length": 256,
    "max-test-examples": 0,
    "rounds": 20,
    "local-epochs": 1,
    "batch-size": 32,
    "client-lr": 0.05,
    "client-momentum": 0.0,
    "model": "cnn",
    "model-path": "",
    "mechanism": "lr-bisr",
    "bands": 16,
    "min-sep": 0,
    "objective": "mean",
    "schedule": "cosine",
    "server-lr": 1.0,
    "final-server-lr": 0.0,
    "server-gamma": 0.99,
    "server-momentum": 0.0,
    "server-weight-decay": 0.0,
    "server-milestones": "",
    "warmup": 0,
    "clip-norm": 1.0,
    "clipping": "server",
    "clip-quantile": 0.5,
    "clip-lr": 0.2,
    "clip-count-stddev": 0.0,
    "epsilon": 8.0,
    "delta": 1e-5,
    "noise-multiplier": 0.0,
    "seed": 0,
    "insecure-reproducible": False,
    "noise-mode": "buffer",
    "participation-timeout": 60.0,
    "checkpoint-dir": "",
    "output-dir": "",
    "eval-every": 1,
}

DATASETS = ("cifar10", "imdb")
MODELS_FOR_DATASET = {"cifar10": ("cnn", "resnet18"), "imdb": ("head", "transformer")}
PARTITIONERS = ("iid", "dirichlet", "pathological")
#: ``optimal`` (dense optimisation) is offered only up to this horizon.
MAX_OPTIMAL_ROUNDS = 1024
#: Run-config keys that name paths (made absolute by the CLI: Ray workers and Flower's
#: subprocesses do not share the caller's working directory).
PATH_KEYS = ("data-dir", "model-path", "checkpoint-dir", "output-dir")


# ------------------------------------------------------------------------------ config
def parse_run_config(text: str | None) -> dict[str, Any]:
    """Parse ``"k1=v1 k2=v2"`` (``flwr run --run-config`` syntax: values are TOML, bare
    words are strings) into a dict."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for token in shlex.split(text):
        if "=" not in token:
            raise ValueError(f"run-config: expected key=value, got {token!r}")
        key, raw = token.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"run-config: empty key in {token!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return out


def coerce_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Unknown keys rejected; values converted to the type of their default."""
    out: dict[str, Any] = {}
    for key, value in run_config.items():
        if key not in DEFAULT_RUN_CONFIG:
            raise ValueError(
                f"{key}: unknown run-config key (known: {', '.join(sorted(DEFAULT_RUN_CONFIG))})"
            )
        default = DEFAULT_RUN_CONFIG[key]
        try:
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in (
                    "1", "true", "yes")
            elif isinstance(default, int):
                if isinstance(value, bool) or (isinstance(value, float)
                                               and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{key} must be of type {type(default).__name__}, got {value!r}"
            ) from None
        out[key] = value
    return out


def fuse_run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_RUN_CONFIG` updated with ``overrides`` (coerced, unknown keys rejected)."""
    cfg = dict(DEFAULT_RUN_CONFIG)
    cfg.update(coerce_run_config(overrides or {}))
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a fused run config; return it (coerced).

    Raises ``ValueError`` whose message starts with the offending key -- before any Ray or
    Flower machinery starts.  Checks the data/model/client keys here and the DP keys with
    ``strategies.config.DPConfig.from_run_config`` (mechanism, rounds, cohorts, bands,
    schedule, clipping, privacy target, ...).
    """
    cfg = fuse_run_config(run_config)
    _check(cfg["dataset"] in DATASETS,
           f"dataset must be one of {list(DATASETS)}, got {cfg['dataset']!r}")
    models = MODELS_FOR_DATASET[cfg["dataset"]]
    _check(cfg["model"] in models,
           f"model must be one of {list(models)} for dataset {cfg['dataset']!r}, "
           f"got {cfg['model']!r}")
    _check(cfg["partitioner"] in PARTITIONERS,
           f"partitioner must be one of {list(PARTITIONERS)}, got {cfg['partitioner']!r}")
    _check(cfg["num-clients"] >= 1, f"num-clients must be >= 1, got {cfg['num-clients']}")
    _check(1 <= cfg["clients-per-round"] <= cfg["num-clients"],
           f"clients-per-round must be in [1, num-clients={cfg['num-clients']}], "
           f"got {cfg['clients-per-round']}")
    _check(cfg["rounds"] >= 1, f"rounds must be >= 1, got {cfg['rounds']}")
    _check(cfg["local-epochs"] >= 1, f"local-epochs must be >= 1, got {cfg['local-epochs']}")
    _check(cfg["batch-size"] >= 1, f"batch-size must be >= 1, got {cfg['batch-size']}")
    _check(math.isfinite(cfg["client-lr"]) and cfg["client-lr"] > 0,
           f"client-lr must be > 0, got {cfg['client-lr']}")
    _check(0.0 <= cfg["client-momentum"] < 1.0,
           f"client-momentum must be in [0, 1), got {cfg['client-momentum']}")
    _check(cfg["max-examples-per-client"] >= 0,
           f"max-examples-per-client must be >= 0, got {cfg['max-examples-per-client']}")
    _check(cfg["max-test-examples"] >= 0,
           f"max-test-examples must be >= 0, got {cfg['max-test-examples']}")
    _check(0.0 <= cfg["val-fraction"] < 1.0,
           f"val-fraction must be in [0, 1), got {cfg['val-fraction']}")
    _check(cfg["eval-every"] >= 1, f"eval-every must be >= 1, got {cfg['eval-every']}")
    _check(cfg["max-length"] >= 1, f"max-length must be >= 1, got {cfg['max-length']}")
    if cfg["partitioner"] == "dirichlet":
        _check(math.isfinite(cfg["alpha"]) and cfg["alpha"] > 0,
               f"alpha must be > 0 for the dirichlet partitioner, got {cfg['alpha']}")
    if cfg["partitioner"] == "pathological":
        k = 10 if cfg["dataset"] == "cifar10" else 2
        _check(1 <= cfg["classes-per-client"] <= k,
               f"classes-per-client must be in [1, {k}] for {cfg['dataset']}, "
               f"got {cfg['classes-per-client']}")
    if cfg["mechanism"] == "optimal":
        _check(cfg["rounds"] <= MAX_OPTIMAL_ROUNDS,
               f"rounds must be <= {MAX_OPTIMAL_ROUNDS} for mechanism 'optimal', "
               f"got {cfg['rounds']}")
    if cfg["data-dir"]:
        path = Path(cfg["data-dir"]).expanduser()
        _check(path.is_dir(), f"data-dir: directory {str(path)!r} does not exist")
    if cfg["model-path"]:
        path = Path(cfg["model-path"]).expanduser()
        _check(path.exists(), f"model-path: {str(path)!r} does not exist")

    from strategies.config import DPConfig

    DPConfig.from_run_config(cfg)  # raises ValueError naming the key
    return cfg


def absolutize_paths(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` with its non-empty path keys (:data:`PATH_KEYS`) made absolute."""
    cfg = dict(run_config)
    for key in PATH_KEYS:
        value = str(cfg.get(key, "") or "")
        if value:
            cfg[key] = str(Path(value).expanduser().resolve())
    return cfg


# ------------------------------------------------------------------------------ apps
def _run_inprocess(cfg: dict[str, Any], *, n_nodes: int,
                   on_round: Callable[[dict[str, Any]], None] | None,
                   client_app: Any, noise_seed: int | None) -> dict[str, Any]:
    from .inprocess import run_inprocess
    from .server_app import make_server_app

    sink: dict[str, Any] = {}
    run_inprocess(server_app=make_server_app(cfg, on_round=on_round, sink=sink,
                                             noise_seed=noise_seed),
                  client_app=make_client_app(cfg, client_app), num_supernodes=n_nodes,
                  run_config=cfg)
    if "summary" in sink:
        return sink["summary"]
    summary = results.read_summary(cfg["output-dir"]) if cfg["output-dir"] else None
    if summary is None:
        raise RuntimeError("the simulation ended without a summary (see the log above)")
    return summary


def make_client_app(run_config: Mapping[str, Any], inner: Any = None) -> Any:
    """A ``ClientApp`` that puts ``run_config`` into each node's context and delegates to
    ``inner`` (default ``clients.client_app.app``)."""
    from flwr.clientapp import ClientApp

    from strategies.participation import IDENTITY_ACTION, identity_reply

    if inner is None:
        from clients.client_app import app as inner
    cfg = dict(run_config)
    wrapper = ClientApp()

    def _call(msg: Any, context: Any) -> Any:
        # Flower forbids changing a node context's run_config: hand the inner app a view
        # with the fused config that shares the node's state.
        from flwr.app import Context

        view = Context(run_id=context.run_id, node_id=context.node_id,
                       node_config=context.node_config, state=context.state,
                       run_config={**context.run_config, **cfg})
        return inner(msg, view)

    wrapper.train()(_call)
    wrapper.evaluate()(_call)
    # Simulated nodes are identified by their partition id, whatever the inner app registers.
    wrapper.query(IDENTITY_ACTION)(identity_reply)
    return wrapper


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


def run_simulation(
    run_config: Mapping[str, Any],
    *,
    num_supernodes: int | None = None,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    ray_num_gpus: float | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    client_app: Any = None,
    shutdown_ray: bool | None = None,
    verbose: bool = False,
    backend: str = "ray",
    noise_seed: int | None = None,
) -> dict[str, Any]:
    """Run the fedmf ``ServerApp``/``ClientApp`` on Flower's Ray simulation engine.

    Args:
        run_config: the run config (validated again here; paths made absolute).
        num_supernodes: virtual clients (default ``num-clients``).
        num_cpus_per_client, num_gpus_per_client: Ray resources of one ClientApp actor
            (fractional GPUs share a device).
        ray_address: attach to an existing Ray cluster instead of starting one.
        ray_num_cpus, ray_num_gpus: resources of a locally started Ray instance.
        on_round: called in the server thread with each ``rounds.jsonl`` record.
        client_app: the ``ClientApp`` to wrap (default ``clients.client_app.app``).
        shutdown_ray: shut Ray down afterwards; ``None`` (default): only if this call
            started it (a Ray instance initialised by the caller is reused and kept).
        verbose: Flower's DEBUG logging.
        backend: ``"ray"`` (Flower's simulation engine) or ``"inprocess"`` (the same apps
            and messages answered sequentially in this process; see
            :mod:`simulations.inprocess`). Ray arguments are ignored in process.
        noise_seed: a fixed noise seed (needs ``insecure-reproducible``), handed to the
            ServerApp only: never part of the run config that clients receive.

    Returns:
        The run's summary (``summary.json``'s content).
    """
    cfg = absolutize_paths(validate_run_config(run_config))
    if noise_seed is not None:
        from strategies.config import DPConfig

        DPConfig.from_run_config(cfg, noise_seed=noise_seed)  # names noise-seed if refused
    _check(num_cpus_per_client > 0,
           f"num-cpus-per-client must be > 0, got {num_cpus_per_client}")
    _check(num_gpus_per_client >= 0,
           f"num-gpus-per-client must be >= 0, got {num_gpus_per_client}")
    n_nodes = int(num_supernodes or cfg["num-clients"])
    _check(n_nodes >= cfg["clients-per-round"],
           f"num-supernodes must be >= clients-per-round={cfg['clients-per-round']}, "
           f"got {n_nodes}")
    _check(backend in ("ray", "inprocess"),
           f"backend must be 'ray' or 'inprocess', got {backend!r}")
    from .server_app import check_restart

    check_restart(cfg)  # before any engine starts: a lost checkpoint is never restarted
    if cfg["output-dir"]:
        Path(cfg["output-dir"]).mkdir(parents=True, exist_ok=True)
    if backend == "inprocess":
        return _run_inprocess(cfg, n_nodes=n_nodes, on_round=on_round, client_app=client_app,
                              noise_seed=noise_seed)

    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    from .server_app import make_server_app

    owned = not ray.is_initialized()
    if shutdown_ray is None:
        shutdown_ray = owned
    sink: dict[str, Any] = {}
    server_app = make_server_app(cfg, on_round=on_round, sink=sink, noise_seed=noise_seed)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": num_cpus_per_client,
                             "num_gpus": num_gpus_per_client},
        "init_args": ray_init_args(ray_address=ray_address, num_cpus=ray_num_cpus,
                                   num_gpus=ray_num_gpus, log_to_driver=verbose),
    }
    real_shutdown = ray.shutdown
    if not shutdown_ray:
        # Flower's RayBackend.terminate() calls ray.shutdown() after every run; keep the
        # instance (and save its start-up) for the caller's next run.
        ray.shutdown = _keep_ray  # type: ignore[assignment]
    try:
        flwr_run_simulation(
            server_app=server_app,
            client_app=make_client_app(cfg, client_app),
            num_supernodes=n_nodes,
            backend_name="ray",
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        ray.shutdown = real_shutdown  # type: ignore[assignment]
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()
    if "summary" in sink:
        return sink["summary"]
    if cfg["output-dir"]:
        summary = results.read_summary(cfg["output-dir"])
        if summary is not None:
            return summary
    raise RuntimeError("the simulation ended without a summary (see the log above)")
