"""Run one fedmf simulation: a :class:`~simulations.config.RunConfig` on a backend.

::

    from simulations.config import RunConfig
    from simulations.runner import run_simulation
    config = RunConfig.from_run_config({"rounds": 3, "num-clients": 4, "clients-per-round": 2,
                                        "output-dir": "out"})
    summary = run_simulation(config, backend="inprocess")

Flower's Python entry point ``flwr.simulation.run_simulation`` gives both apps an *empty* run
config, so the runner builds the ServerApp with the configuration bound
(``server_app.make_server_app``) and wraps the ClientApp so that every node context carries the
flat run config (:func:`make_client_app`).  The backends (``simulations.backends``) only move
messages.  This module imports Flower, torch and Ray only inside functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import results
from .backends import Backend, BackendOptions, load_backend
from .config import RunConfig

if TYPE_CHECKING:
    from .server_app import ModelCallback

__all__ = ["make_client_app", "preflight", "run_simulation"]


def make_client_app(run_config: Mapping[str, Any], inner: Any = None) -> Any:
    """A ``ClientApp`` that puts ``run_config`` into each node's context and delegates to
    ``inner`` (default ``clients.client_app.app``); it answers the identity query itself
    (simulated nodes are identified by their partition id)."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from strategies.participation import IDENTITY_ACTION, identity_reply

    if inner is None:
        from clients.client_app import app as inner
    cfg = dict(run_config)
    wrapper = ClientApp()

    def _call(msg: Any, context: Any) -> Any:
        # Flower forbids changing a node context's run_config: hand the inner app a view
        # with the run config that shares the node's state.
        view = Context(run_id=context.run_id, node_id=context.node_id,
                       node_config=context.node_config, state=context.state,
                       run_config={**context.run_config, **cfg})
        return inner(msg, view)

    wrapper.train()(_call)
    wrapper.evaluate()(_call)
    wrapper.query(IDENTITY_ACTION)(identity_reply)
    return wrapper


def preflight(config: RunConfig) -> None:
    """Checks that need no engine, run before any file is written: the simulation extras are
    installed (``ModuleNotFoundError`` naming the module) and the data can be read."""
    import importlib.util

    for module in ("flwr_datasets", "datasets"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
    from clients.data import check_data_source

    check_data_source(dataset=config.client.dataset, data_dir=config.client.data_dir)


def run_simulation(
    config: RunConfig,
    *,
    backend: str | Backend = "ray",
    options: BackendOptions | None = None,
    num_supernodes: int | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    client_app: Any = None,
    on_model: ModelCallback | None = None,
) -> dict[str, Any]:
    """Run the fedmf ServerApp and ClientApp of ``config`` on ``backend``; return the summary.

    Args:
        config: the run (paths are made absolute here).
        backend: a name of :data:`simulations.backends.BACKENDS`, or a backend function
            (``simulations.backends.vectorized.run_on``).
        options: engine settings (Ray resources, cluster address, ...).
        num_supernodes: simulated clients (default ``num-clients``).
        on_round: called in the server thread with each ``rounds.jsonl`` record.
        client_app: the ``ClientApp`` to wrap (default ``clients.client_app.app``).
        on_model: called in the server thread with ``(round, ArrayRecord)`` of every
            released model, round 0 the initial one (the audit's observer).

    Returns:
        The run's summary (``summary.json``'s content).
    """
    from .server_app import check_restart, make_server_app, with_default_checkpoint

    run = load_backend(backend) if isinstance(backend, str) else backend
    if backend == "vectorized" and client_app is not None:
        raise ValueError("client_app: the vectorized backend runs fedmf's own local training "
                         "(clients.train); a custom ClientApp needs the ray or inprocess backend")
    cfg = with_default_checkpoint(config.absolute())
    n_nodes = int(num_supernodes or cfg.dp.num_clients)
    if n_nodes < cfg.dp.clients_per_round:
        raise ValueError(f"num-supernodes must be >= clients-per-round="
                         f"{cfg.dp.clients_per_round}, got {n_nodes}")
    check_restart(cfg)  # before any engine starts: a lost checkpoint is never restarted
    preflight(cfg)
    out = cfg.output_dir
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sink: dict[str, Any] = {}
    flat = cfg.to_run_config()
    run(server_app=make_server_app(cfg, on_round=on_round, sink=sink, on_model=on_model),
        client_app=make_client_app(flat, client_app), num_supernodes=n_nodes,
        run_config=flat, options=options or BackendOptions())
    if "summary" in sink:
        return sink["summary"]
    summary = results.read_summary(out) if out is not None else None
    if summary is None:
        raise RuntimeError("the simulation ended without a summary (see the log above)")
    return summary
