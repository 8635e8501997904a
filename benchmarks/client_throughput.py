"""Client-side throughput of fedmf on this machine.

Measures (1) local-training examples/second for the CIFAR-10 CNN, ResNet-18 (briefly) and
the IMDB linear head over cached MiniLM embeddings, and (2) the time to materialise 100 and
1000 client partitions (FederatedDataset + decode), first call vs. cached.

Data: ``FEDMF_DATA_DIR`` or ``../shared/data`` relative to the repository root.

    python benchmarks/client_throughput.py [--threads 1] [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clients import data as D  # noqa: E402, N812
from clients import task  # noqa: E402
from clients.train import train_local  # noqa: E402


def data_root() -> Path:
    """``FEDMF_DATA_DIR`` or ``<repo>/../shared/data``."""
    root = Path(os.environ.get("FEDMF_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (root / "cifar10" / "train.parquet").is_file():
        raise SystemExit(f"no data at {root}; set FEDMF_DATA_DIR")
    return root


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def train_rate(cfg: dict[str, Any], *, examples: int, epochs: int, device: torch.device,
               ) -> tuple[float, float, int]:
    """(examples/s of local training, seconds, examples) on partition 0 of ``cfg``."""
    cd = task.client_data(cfg, 0)
    data = cd.train.select(torch.arange(min(examples, len(cd.train))))
    if device.type != "cpu":
        data = data.to(device)
    model = task.get_model(cfg)
    # warm-up step (allocation, cudnn autotune)
    train_local(model, data.select(torch.arange(min(32, len(data)))), epochs=1,
                batch_size=int(cfg["batch-size"]), lr=0.01, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec, _ = timed(lambda: train_local(model, data, epochs=epochs,
                                       batch_size=int(cfg["batch-size"]), lr=0.01,
                                       momentum=0.9, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = len(data) * epochs
    return n / sec, sec, n


def materialise(cfg: dict[str, Any], n_clients: int) -> tuple[float, float]:
    """(first, cached) seconds to load the train tensors of every client."""
    D.clear_caches()

    def all_parts() -> int:
        return sum(len(task.client_data(cfg, p).train) for p in range(n_clients))

    first, _ = timed(all_parts)
    cached, _ = timed(all_parts)
    return first, cached


def main() -> None:
    """Run the benchmark and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = a "
                    "virtual client sharing the CPU)")
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = data_root()
    # a fresh embedding cache, so "first" really computes (unless FEDMF_CACHE_DIR is set)
    os.environ.setdefault("FEDMF_CACHE_DIR", tempfile.mkdtemp(prefix="fedmf-bench-"))
    scale = 1 if args.quick else 2
    rows: list[tuple[str, str, str]] = []

    cifar = {"dataset": "cifar10", "data-dir": str(root), "partitioner": "iid",
             "num-clients": 10, "val-fraction": 0.1, "seed": 0, "batch-size": 32,
             "model": "cnn"}
    rate, sec, n = train_rate(cifar, examples=1024 * scale, epochs=1, device=device)
    rows.append(("train cnn (CIFAR-10, bs 32, SGD+momentum)", f"{rate:,.0f} ex/s",
                 f"{n} ex in {sec:.2f} s"))
    rate, sec, n = train_rate({**cifar, "model": "resnet18"}, examples=128 * scale,
                              epochs=1, device=device)
    rows.append(("train resnet18-GN (CIFAR-10, bs 32)", f"{rate:,.0f} ex/s",
                 f"{n} ex in {sec:.2f} s"))

    imdb = {"dataset": "imdb", "data-dir": str(root), "partitioner": "iid",
            "num-clients": 100, "val-fraction": 0.1, "seed": 0, "batch-size": 32,
            "model": "head", "max-examples-per-client": 256}
    emb_first, _ = timed(lambda: task.client_data(imdb, 0))
    D.clear_caches()
    emb_disk, _ = timed(lambda: task.client_data(imdb, 0))
    rows.append(("IMDB embeddings, 256 reviews (MiniLM, first / from disk)",
                 f"{emb_first:.2f} s / {emb_disk:.3f} s",
                 f"{256 / emb_first:,.0f} reviews/s encode incl. model load"))
    rate, sec, n = train_rate(imdb, examples=256, epochs=20, device=device)
    rows.append(("train IMDB head (384->2, cached embeddings, bs 32)", f"{rate:,.0f} ex/s",
                 f"{n} ex in {sec:.3f} s"))

    for n_clients in (100, 1000):
        cfg = {**cifar, "num-clients": n_clients, "partitioner": "dirichlet", "alpha": 0.5}
        first, cached = materialise(cfg, n_clients)
        rows.append((f"materialise {n_clients} CIFAR-10 partitions (dirichlet 0.5)",
                     f"{first:.2f} s first / {cached * 1e3:.1f} ms cached",
                     f"{first / n_clients * 1e3:.1f} ms/client first; "
                     f"hits {D.cache_stats()['hits']}"))

    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"## fedmf client throughput — `{cmd}`")
    print(f"host: {platform.node()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | torch {torch.__version__} | threads {args.threads} | "
          f"device {device} | data {root}")
    print()
    print("| measurement | result | detail |")
    print("| --- | --- | --- |")
    for name, result, detail in rows:
        print(f"| {name} | {result} | {detail} |")


if __name__ == "__main__":
    main()
