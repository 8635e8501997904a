"""Server-side overhead of ``aggregate_train``: DP-MF strategy vs Flower's DP wrapper.

For models of ``d`` float32 parameters (split into 4 tensors) and ``R`` replies, times one
``aggregate_train`` call per round (median over ``--repeats`` rounds after one warm-up round;
``configure_train`` and reply construction are not timed) for

* ``dp-fedavg`` -- DPMatrixFactorizationFedAvg, independent noise (identity factorization)
* ``bisr-16``   -- DPMatrixFactorizationFedAvg, BISR with 16 bands
* ``bisr-64``   -- DPMatrixFactorizationFedAvg, BISR with 64 bands
* ``flower-dp`` -- Flower's ``DifferentialPrivacyServerSideFixedClipping(FedAvg())``

and reports the noise-state memory predicted by ``CorrelatedNoise.memory_bytes(d)`` next to the
state actually held (ring buffer + coefficient table) plus the per-round output vector.

Usage::

    .venv/bin/python benchmarks/strategy_overhead.py                      # 1e5,1e6,1e7 x 10,100
    .venv/bin/python benchmarks/strategy_overhead.py --sizes 1e6 --replies 10 --repeats 5

Combinations whose replies would exceed ``--max-gib`` of memory are skipped (Flower's wrapper
holds ~3 copies of every reply).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from simulations.backends import task_identity
from simulations.backends.inprocess import LocalGrid
from strategies import DPConfig, DPMatrixFactorizationFedAvg
from strategies.participation import CLIENT_ID_KEY

MECHANISMS = ("dp-fedavg", "bisr-16", "bisr-64", "flower-dp")
ROUNDS = 128


class _NodesGrid(LocalGrid):
    """A fixed set of nodes that only answer the identity query (client id = node id)."""

    def _answer(self, msg: Message) -> Message:
        cid = str(msg.metadata.dst_node_id)
        return Message(RecordDict({"identity": ConfigRecord({CLIENT_ID_KEY: cid})}),
                       reply_to=msg)


def _model(d: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sizes = [d // 2, d // 4, d // 8, d - d // 2 - d // 4 - d // 8]
    return {f"layer{i}": rng.normal(0, 0.1, size=s).astype(np.float32)
            for i, s in enumerate(sizes)}


def _reply_arrays(model: dict[str, np.ndarray], replies: int,
                  rng: np.random.Generator) -> list[dict[str, Array]]:
    out = []
    for _ in range(replies):
        scale = float(rng.uniform(0.2, 3.0)) / np.sqrt(sum(v.size for v in model.values()))
        out.append({k: Array(v + rng.normal(0, scale, v.shape).astype(np.float32))
                    for k, v in model.items()})
    return out


def _replies(messages: list[Message], arrays: list[dict[str, Array]]) -> list[Message]:
    out = []
    for msg, arrs in zip(messages, arrays, strict=False):
        content = RecordDict({"arrays": ArrayRecord(dict(arrs)),
                              "metrics": MetricRecord({"num-examples": 10})})
        out.append(Message(content, reply_to=msg))
    return out


def _strategy(mechanism: str, replies: int) -> Any:
    if mechanism == "flower-dp":
        inner = FedAvg(fraction_train=1.0, min_train_nodes=replies, min_available_nodes=replies,
                       fraction_evaluate=0.0)
        return DifferentialPrivacyServerSideFixedClipping(inner, 1.0, 1.0, replies)
    method, _, bands = mechanism.rpartition("-") if mechanism[-1].isdigit() else (
        mechanism, "", "")
    cfg = DPConfig(mechanism=method, bands=int(bands) if bands else 16, rounds=ROUNDS,
                   clients_per_round=replies, num_clients=replies, min_sep=1,
                   noise_multiplier=1.0, noise_seed=0, insecure_reproducible=True,
                   schedule="constant",
                   participation_timeout=0.0)
    return DPMatrixFactorizationFedAvg(config=cfg, fraction_evaluate=0.0)


def _noise_memory(strategy: Any, d: int) -> tuple[int | None, int | None]:
    noise = getattr(strategy, "_noise", None)
    if noise is None:
        return None, None
    held = sum(int(t.numel() * t.element_size())
               for t in (getattr(noise, "_buffer", None), getattr(noise, "_coef", None))
               if t is not None)
    held += d * 4  # the per-round output vector w_t
    return int(noise.memory_bytes(d)), held


def bench(d: int, replies: int, mechanism: str, repeats: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    model = _model(d, rng)
    reply_arrays = _reply_arrays(model, replies, rng)
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    strategy = _strategy(mechanism, replies)
    grid = _NodesGrid(node_ids=range(1, replies + 1))
    times = []
    for t in range(1, repeats + 2):
        messages = list(strategy.configure_train(t, arrays, ConfigRecord(), grid))
        reps = _replies(messages, reply_arrays)
        start = time.perf_counter()
        out, _ = strategy.aggregate_train(t, reps)
        elapsed = time.perf_counter() - start
        if t > 1:  # first round: warm-up (allocations, coefficient tables)
            times.append(elapsed)
        if mechanism != "flower-dp":
            arrays = out  # keep the global model moving like in a run
    predicted, held = _noise_memory(strategy, d)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "predicted": predicted, "held": held}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--replies", default="10,100")
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with task_identity(run_id=1):  # messages are built outside a Flower run
        sizes = [int(float(s)) for s in args.sizes.split(",")]
        reply_counts = [int(r) for r in args.replies.split(",")]
        mechanisms = [m for m in args.mechanisms.split(",") if m]
        cmd = " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)
        print(f"# {cmd}")
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads); aggregate_train "
              f"median of {args.repeats} rounds after 1 warm-up")
        print(f"{'params':>9} {'replies':>7} {'mechanism':>10} {'median ms':>10} {'min ms':>9} "
              f"{'vs flower':>9} {'noise MiB pred':>14} {'noise MiB held':>14}")
        for d in sizes:
            for r in reply_counts:
                need = 3 * r * d * 4 / 2**30
                if need > args.max_gib:
                    print(f"{d:>9.0e} {r:>7} (skipped: needs ~{need:.1f} GiB > --max-gib)")
                    continue
                rows = {m: bench(d, r, m, args.repeats, args.seed) for m in mechanisms}
                ref = rows.get("flower-dp", {}).get("median_s")
                for m, row in rows.items():
                    ratio = f"{row['median_s'] / ref:.2f}x" if ref else "-"
                    pred = "-" if row["predicted"] is None else f"{row['predicted'] / 2**20:.1f}"
                    held = "-" if row["held"] is None else f"{row['held'] / 2**20:.1f}"
                    print(f"{d:>9.0e} {r:>7} {m:>10} {row['median_s'] * 1e3:>10.1f} "
                          f"{row['min_s'] * 1e3:>9.1f} {ratio:>9} {pred:>14} {held:>14}",
                          flush=True)


if __name__ == "__main__":
    main()
