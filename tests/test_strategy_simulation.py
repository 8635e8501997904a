"""End-to-end: a real Flower simulation (Ray backend) with a tiny linear-regression model.

One ``run_simulation`` call (Ray starts once) whose ServerApp runs the strategies for
identity / bisr / lr-bisr / dp-fedavg one after another on the same Grid, 3 rounds each
(~30 s on a 2-core box, so not marked slow).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from strategies.participation import IDENTITY_ACTION, identity_reply

D_IN = 5
NUM_NODES = 6
MECHANISMS = ("dp-fedavg", "bisr", "lr-bisr", "flower-dp")
RESULTS: dict[str, Any] = {}

RUN_CONFIG = {
    "num-clients": NUM_NODES, "clients-per-round": 2, "rounds": 3, "bands": 2,
    "schedule": "cosine", "server-lr": 1.0, "final-server-lr": 0.1, "clip-norm": 1.0,
    "clipping": "server", "epsilon": 20.0, "delta": 1e-5, "noise-multiplier": 0.0,
    "seed": 0, "insecure-reproducible": True, "participation-timeout": 30.0,
}


def _data(partition: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + partition)
    x = rng.normal(size=(32, D_IN)).astype(np.float32)
    y = x @ np.arange(1, D_IN + 1, dtype=np.float32) + 0.5
    return x, y


def _client_app() -> Any:
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        w, b = arrays["w"].numpy().astype(np.float64), arrays["b"].numpy().astype(np.float64)
        w0, b0 = w.copy(), b.copy()
        x, y = _data(int(context.node_config["partition-id"]))
        for _ in range(5):
            err = x @ w + b - y
            w -= 0.05 * x.T @ err / len(y)
            b -= 0.05 * err.mean(keepdims=True)
        norm = float(np.sqrt(np.sum((w - w0) ** 2) + np.sum((b - b0) ** 2)))
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(w.astype(np.float32)),
                                   "b": Array(b.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": float(np.mean(err**2)),
                                     "delta-norm": norm, "clipped": 0}),
        })
        return Message(content=content, reply_to=msg)

    # tell the server which client (partition) this node is
    app.query(IDENTITY_ACTION)(identity_reply)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        x, y = _data(int(context.node_config["partition-id"]))
        pred = x @ arrays["w"].numpy() + arrays["b"].numpy()
        content = RecordDict({"metrics": MetricRecord({
            "num-examples": len(y), "eval-loss": float(np.mean((pred - y) ** 2))})})
        return Message(content=content, reply_to=msg)

    return app


def _server_app() -> Any:
    from flwr.serverapp import Grid, ServerApp

    from strategies import build_strategy

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for mechanism in MECHANISMS:
            strategy = build_strategy({**RUN_CONFIG, "mechanism": mechanism},
                                      fraction_evaluate=0.5, poll_interval=0.2)
            init = ArrayRecord({"w": Array(np.zeros(D_IN, np.float32)),
                                "b": Array(np.zeros(1, np.float32))})
            result = strategy.start(grid=grid, initial_arrays=init, num_rounds=3)
            RESULTS[mechanism] = {
                "w": result.arrays["w"].numpy(),
                "train": {k: dict(v) for k, v in result.train_metrics_clientapp.items()},
                "evaluate": {k: dict(v) for k, v in result.evaluate_metrics_clientapp.items()},
                "privacy": dict(strategy.privacy),
                "last": dict(strategy.last_train_metrics),
            }

    return app


@pytest.mark.ray
def test_run_simulation_end_to_end() -> None:
    import cloudpickle
    from flwr.simulation import run_simulation

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    RESULTS.clear()
    run_simulation(server_app=_server_app(), client_app=_client_app(),
                   num_supernodes=NUM_NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert set(RESULTS) == set(MECHANISMS)
    for mechanism, res in RESULTS.items():
        assert np.all(np.isfinite(res["w"])), mechanism
        assert not np.allclose(res["w"], 0.0), mechanism
        assert sorted(res["train"]) == [1, 2, 3], mechanism
        eps = res["train"][3]["epsilon_spent"]
        assert 0 < eps <= 20.0 + 1e-6, (mechanism, eps)
        assert res["privacy"]["epsilon"] == pytest.approx(eps)
        assert res["last"]["num_accepted"] == 2, mechanism
        assert res["train"][1]["epsilon_spent"] <= res["train"][3]["epsilon_spent"]
        assert sorted(res["evaluate"]) == [1, 2, 3], mechanism
