"""Throughput of the simulation backends: seconds per round and examples per second.

For each backend of ``--backends``, model of ``--models`` and cohort size of
``--clients-per-round``, runs ``--rounds`` rounds of the real ServerApp/strategy (``dp-fedavg``:
clipping, noise and accounting included) with ``m`` clients of ``--examples-per-client``
examples each and one cohort (``min-sep 1``), and reports the median time of the rounds after
the first (start-up, compilation, data loading) and before the last (central evaluation).

Data are synthetic tensors of the datasets' shapes -- the benchmark measures the engine, not
the data: for ``cnn`` random 32x32 PNG images written once as CIFAR-10-schema parquet (so Ray's
actors read them through the normal data path), for the linear heads (``scatter-linear``: 3,888
ScatterNet features, ``head``: 384 MiniLM features) random features of the head's input size
served from the process's tensor cache (``clients.data.install_client_data``; in-process and
vectorized backends only, Ray actors do not share that cache).

    python benchmarks/simulation_throughput.py                          # all backends, cnn
    python benchmarks/simulation_throughput.py --backends inprocess,vectorized --models head \\
        --clients-per-round 200 --json
    python benchmarks/simulation_throughput.py --pfl --backends ray,vectorized   # pfl-research
    python benchmarks/simulation_throughput.py --backends vectorized --shards 1,2 \
        --clients-per-round 200,1000 --examples-per-client 5   # the sharded path's overhead

``--shards 1,2`` times the vectorized backend with each number of shards (``N > 1``: the cohort
on ``N`` Ray actors, :mod:`simulations.backends.sharded`; the cnn only, since synthetic
features live in this process).

``--pfl`` times the pfl-research CIFAR-10 benchmark's setting: 1,000 clients of 50 images,
50 per round, batch 10, one local epoch, client lr 0.1, server lr 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_synthetic_cifar(root: Path, *, n_train: int, n_test: int = 256) -> Path:
    """Random-image CIFAR-10-schema parquet under ``root/cifar10`` (written once)."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    done = root / "cifar10" / f".rows-{n_train}"
    if done.is_file():
        return root
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(10)]
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
                for _ in range(n)]
        ds = Dataset.from_dict({"img": imgs, "label": (np.arange(n) % 10).tolist()},
                               features=Features({"img": Image(),
                                                  "label": ClassLabel(names=names)}))
        ds.to_parquet(str(root / "cifar10" / f"{split}.parquet"))
    done.write_text("ok")
    return root


def install_synthetic_features(config: Any, *, examples: int) -> None:
    """Random features for every partition of ``config`` (a ``head`` model)."""
    from clients import data as D  # noqa: N812
    from clients.task import get_model

    dim = get_model(config).linear.in_features
    classes = get_model(config).linear.out_features
    data_cfg, rep = config.data_config(), config.representation()
    gen = torch.Generator().manual_seed(0)
    for pid in range(config.num_clients):
        x = torch.randn(examples, dim, generator=gen)
        y = torch.randint(0, classes, (examples,), generator=gen)
        empty = D.TensorData(x[:0], y[:0])
        D.install_client_data(data_cfg, pid, rep, D.ClientData(D.TensorData(x, y), empty))
    test = D.TensorData(torch.randn(256, dim, generator=gen),
                        torch.randint(0, classes, (256,), generator=gen))
    D.install_test_data(data_cfg, rep, test, max_examples=config.max_test_examples)


def run_config(*, model: str, m: int, examples: int, rounds: int, data_dir: Path,
               batch_size: int, client_lr: float, epochs: int, out: Path) -> Any:
    from simulations.config import RunConfig

    flat: dict[str, Any] = {
        "model": model, "num-clients": m, "clients-per-round": m, "min-sep": 1,
        "rounds": rounds, "mechanism": "dp-fedavg", "epsilon": 8.0, "schedule": "constant",
        "server-lr": 1.0, "local-epochs": epochs, "batch-size": batch_size,
        "client-lr": client_lr, "val-fraction": 0.0, "max-examples-per-client": examples,
        "eval-every": rounds + 1, "max-test-examples": 256, "participation-timeout": 600.0,
        "output-dir": str(out), "checkpoint-dir": "",
    }
    if model == "head":
        flat["dataset"] = "imdb"
    else:
        flat["data-dir"] = str(data_dir)  # (scatter-linear: features are installed)
    return RunConfig.from_run_config(flat)


def time_backend(*, backend: str, model: str, m: int, args: argparse.Namespace,
                 data_dir: Path, work: Path, shards: int = 1) -> dict[str, Any] | None:
    from simulations.backends import BackendOptions
    from simulations.runner import run_simulation

    if backend == "ray" and model != "cnn":
        print(f"# ray + {model} skipped: synthetic features live in this process only",
              file=sys.stderr)
        return None
    if shards > 1 and (backend != "vectorized" or model != "cnn"):
        print(f"# {backend} + {model} with {shards} shards skipped: shards are the vectorized "
              "backend's, and synthetic features live in this process only", file=sys.stderr)
        return None
    out = work / f"{backend}-{model}-{m}-{time.time_ns()}"
    cfg = run_config(model=model, m=m, examples=args.examples_per_client, rounds=args.rounds,
                     data_dir=data_dir, batch_size=args.batch_size, client_lr=args.client_lr,
                     epochs=args.local_epochs, out=out)
    if model != "cnn":
        install_synthetic_features(cfg.client, examples=args.examples_per_client)
    seconds: list[float] = []
    options = BackendOptions(device=args.device, num_cpus_per_client=args.num_cpus_per_client,
                             num_gpus_per_client=args.num_gpus_per_client,
                             chunk_size=args.chunk_size, shards=shards)
    run_simulation(cfg, backend=backend, options=options,
                   on_round=lambda r: seconds.append(float(r["seconds"])))
    timed = seconds[1:-1] or seconds  # not the first (start-up) nor the last (evaluation)
    per_round = statistics.median(timed)
    examples = m * args.examples_per_client * args.local_epochs
    device = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")
              if backend == "vectorized" else
              ("cuda" if args.num_gpus_per_client > 0 else "cpu"))
    return {"backend": backend, "shards": shards, "model": model, "device": device,
            "clients_per_round": m,
            "seconds_per_round": round(per_round, 4),
            "examples_per_second": round(examples / per_round, 1),
            "rounds_timed": len(timed)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="ray,inprocess,vectorized")
    parser.add_argument("--models", default="cnn", help="cnn,scatter-linear,head")
    parser.add_argument("--clients-per-round", default="40,200,1000")
    parser.add_argument("--examples-per-client", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5, help="timed: rounds 2..rounds-1")
    parser.add_argument("--device", default=None, help="vectorized backend device")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--shards", default="1",
                        help="comma-separated shard counts of the vectorized backend")
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0)
    parser.add_argument("--num-gpus-per-client", type=float, default=0.0)
    parser.add_argument("--pfl", action="store_true",
                        help="the pfl-research CIFAR-10 setting (50 clients/round, cnn)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.pfl:
        args.models, args.clients_per_round = "cnn", "50"
        args.examples_per_client, args.batch_size, args.client_lr = 50, 10, 0.1
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    backends = [b for b in args.backends.split(",") if b]
    models = [m for m in args.models.split(",") if m]
    cohorts = [int(c) for c in args.clients_per_round.split(",") if c]
    if not args.json:
        print(f"# {' '.join(['python', *sys.argv])}")
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, cuda {torch.cuda.is_available()}")
        print(f"{'backend':>13} {'model':>5} {'device':>6} {'clients':>7} {'s/round':>9} "
              f"{'examples/s':>11}")
    with tempfile.TemporaryDirectory(prefix="fedmf-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEDMF_CACHE_DIR", str(work / "cache"))
        data_dir = work / "data"
        if any(m != "head" for m in models):
            write_synthetic_cifar(data_dir, n_train=max(cohorts) * args.examples_per_client)
        for model in models:
            for m in cohorts:
                for backend, shards in [(b, n) for b in backends for n in
                                        ([int(x) for x in args.shards.split(",")]
                                         if b == "vectorized" else [1])]:
                    row = time_backend(backend=backend, model=model, m=m, args=args,
                                       data_dir=data_dir, work=work, shards=shards)
                    if row is None:
                        continue
                    name = backend if shards == 1 else f"{backend}x{shards}"
                    if args.json:
                        print(json.dumps(row), flush=True)
                    else:
                        print(f"{name:>13} {model:>5} {row['device']:>6} {m:>7} "
                              f"{row['seconds_per_round']:>9.3f} "
                              f"{row['examples_per_second']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
