"""The user's ServerApp: fedmf's strategy, built from a ``DPConfig``, on the user's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from strategies.config import DPConfig
from strategies.factory import build_strategy

from .task import TRUE_W, initial_model

app = ServerApp()


def dp_config(run_config: dict[str, Any]) -> DPConfig:
    """The strategy's configuration: 2 cohorts of half the clients (each client trains every
    second round, at most ``rounds / 2`` times), a constant server rate with momentum. Round 1
    waits until every client has registered (``min_clients``): cohorts are assigned once, from
    the clients known then."""
    clients = int(run_config["num-clients"])
    return DPConfig(
        mechanism=str(run_config["mechanism"]), rounds=int(run_config["rounds"]),
        num_clients=clients, clients_per_round=clients // 2, min_sep=2, bands=2,
        schedule="constant", server_lr=1.0, server_momentum=0.5, clip_norm=1.0,
        epsilon=float(run_config["epsilon"]), delta=1e-5,
        min_clients=clients, participation_timeout=60.0,
        checkpoint_dir=str(run_config["checkpoint-dir"]))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy; log and (optionally) write what it released."""
    config = dp_config(dict(context.run_config))
    strategy = build_strategy(config, poll_interval=0.05)
    result = strategy.start(grid=grid, initial_arrays=initial_model(),
                            num_rounds=config.rounds)
    w = result.arrays["w"].numpy()
    privacy = strategy.privacy  # the ledger's release (``strategy.accountant``: Flower's API)
    summary = {"mechanism": config.mechanism, "epsilon": privacy["epsilon"],
               "delta": privacy["delta"],
               "rounds": len(result.train_metrics_clientapp),
               "error": float(np.linalg.norm(w - TRUE_W)),
               "initial_error": float(np.linalg.norm(TRUE_W))}
    log(20, "linreg-app: %s", json.dumps(summary))
    if out := str(context.run_config.get("result-file", "")):
        Path(out).write_text(json.dumps(summary), encoding="utf-8")
