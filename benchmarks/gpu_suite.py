r"""Every GPU measurement of fedmf in one command: one JSON per measurement, within a budget.

Measurements (each in its own subprocess, killed at its time cap; what did not fit is recorded
as skipped, and one that fails does not stop the others):

* ``throughput_cnn`` -- the CIFAR-10 CNN (synthetic tensors of CIFAR's shapes): vectorized
  backend examples/s at 40 clients per round against Flower's Ray engine at 40 (the ratio,
  target >= 30x), the vectorized backend at 1,000 clients per round (target >= 1e5 examples/s),
  and the sharded vectorized backend, 2 shards on one GPU (``num_gpus_per_shard=0.5``) against 1
  (Ray parts only where ``ray`` imports; 1,000 clients of 10 examples, read from parquet).
* ``pfl_benchmark`` -- the pfl-research CIFAR-10 setting (1,000 clients x 50 images, 50 per
  round, batch 10, client lr 0.1, one local epoch; dp-fedavg): seconds per round on the
  vectorized backend; a 100-round probe, then all 1,500 rounds if they fit in the cap, else the
  1,500-round time extrapolated from the probe (``"extrapolated": true``).
* ``study_slice`` -- the end-to-end CNN slice of the study: real CIFAR-10 from ``--data-dir``,
  1,000 clients x 50 images (fewer where the data holds fewer rows: recorded), 250 per round,
  epsilon 8, fedavg / dp-fedavg / bsr x 2 seeds through ``simulations.runner.run_simulation``
  on the vectorized backend, rounds cut (from 80) to what the cap allows, final accuracy per run.

``<out>/<name>.json`` holds the numbers, the device, the peak GPU memory of the measurement's
process (``torch.cuda.max_memory_allocated``; Ray actors not included; ``null`` on the CPU),
wall seconds, the settings, the parts that ran or were skipped (with the reason) and the
``extrapolated`` flag; it is rewritten after every part, so a killed measurement keeps what it
finished. ``<out>/summary.json`` lists every measurement with its status (ok / skipped /
failed); ``<out>/logs/`` the measurements' output. The CLI prints a short table at the end.

On the GPU machine (Python 3.12 with torch; Flower, Ray, datasets and dp-accounting come from the
bundle that ``../shared/tools/device-bundle --with-ray`` makes here in ``.devbundle``), from the
project root; the unpacking is part of the 8 minutes, hence ``--budget-s 450``::

    tar xJf .devbundle/site.txz -C /tmp && \
      { [ ! -f .devbundle/ray.txz ] || tar xJf .devbundle/ray.txz -C /tmp/site312; }
    export PYTHONPATH=$PWD:/tmp/site312 FEDMF_DATA_DIR=$PWD/.devbundle/data \
      HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    python3 benchmarks/gpu_suite.py --out "$OUT/gpu_suite" --budget-s 450

``--data-dir`` defaults to ``$FEDMF_DATA_DIR``, else ``../shared/data``; the bundle's CIFAR-10
subset (``--cifar-train``, default 6,000 rows) gives the study slice 6 images per client.
``--only throughput_cnn,pfl_benchmark`` runs a subset (the others are recorded as skipped).

On a CPU, tiny sizes (every path, synthetic data, no ``../shared``; under a minute or two)::

    python benchmarks/gpu_suite.py --out /tmp/gpu_suite --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: The measurements, in the order they run.
MEASUREMENTS = ("throughput_cnn", "pfl_benchmark", "study_slice")
#: Statuses of a measurement (and of a part).
STATUSES = ("ok", "skipped", "failed")
#: Keys of every measurement's JSON.
RECORD_KEYS = ("name", "status", "reason", "error", "device", "device_type",
               "peak_gpu_memory_bytes", "wall_s", "cap_s", "smoke", "settings", "parts",
               "skipped", "extrapolated", "results", "headline")

_ENV_DEFAULTS = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------- sizes and budget
@dataclass(frozen=True)
class Sizes:
    """Every size of the suite, and the time estimates its scheduling uses (seconds).

    ``need_*``: the least time worth starting a measurement (or part) with; ``cap_*``: the most
    a measurement may take.  The defaults are the real (GPU) run; :data:`SMOKE` the CPU smoke.
    """

    # throughput_cnn
    small_clients: int = 40
    large_clients: int = 1000
    examples: int = 50
    batch_size: int = 10
    client_lr: float = 0.1
    local_epochs: int = 1
    rounds_small: int = 6
    rounds_large: int = 5
    rounds_ray: int = 5
    shard_clients: int = 1000
    shard_examples: int = 10
    rounds_shards: int = 4
    num_gpus_per_client: float = 0.1
    num_gpus_per_shard: float = 0.5
    test_rows: int = 256
    # pfl_benchmark
    pfl_clients: int = 1000
    pfl_per_round: int = 50
    pfl_examples: int = 50
    pfl_rounds: int = 1500
    pfl_probe_rounds: int = 100
    # study_slice
    study_clients: int = 1000
    study_examples: int = 50
    study_per_round: int = 250
    study_rounds: int = 80
    study_min_rounds: int = 8
    study_calib_rounds: int = 3
    study_epsilon: float = 8.0
    study_mechanisms: tuple[str, ...] = ("fedavg", "dp-fedavg", "bsr")
    study_seeds: tuple[int, ...] = (0, 1)
    study_batch_size: int = 10
    study_client_lr: float = 0.1
    study_clip_norm: float = 1.0
    study_server_momentum: float = 0.9
    study_bands: int = 4
    # time: per measurement (need, cap) and per part (need)
    need_throughput: float = 45.0
    cap_throughput: float = 200.0
    need_pfl: float = 40.0
    cap_pfl: float = 110.0
    need_study: float = 60.0
    cap_study: float = 260.0
    need_small: float = 20.0
    need_large: float = 35.0
    need_ray: float = 90.0
    need_shards: float = 35.0
    need_pfl_probe: float = 30.0
    need_study_calib: float = 30.0
    run_overhead_s: float = 4.0

    def time_slots(self) -> dict[str, tuple[float, float]]:
        """``{measurement: (need_s, cap_s)}``."""
        return {"throughput_cnn": (self.need_throughput, self.cap_throughput),
                "pfl_benchmark": (self.need_pfl, self.cap_pfl),
                "study_slice": (self.need_study, self.cap_study)}

    def synthetic_rows(self, smoke: bool) -> int:
        """Training rows of the synthetic parquet (what Ray's actors and the shards read; the
        smoke's study slice reads it too)."""
        rows = max(self.small_clients * self.examples, self.shard_clients * self.shard_examples)
        if smoke:
            rows = max(rows, self.study_clients * self.study_examples)
        return rows


SMOKE = Sizes(
    small_clients=8, large_clients=16, examples=8, batch_size=4, rounds_small=3, rounds_large=3,
    rounds_ray=3, shard_clients=16, shard_examples=8, rounds_shards=3, test_rows=32,
    pfl_clients=16, pfl_per_round=4, pfl_examples=8, pfl_rounds=6, pfl_probe_rounds=3,
    study_clients=16, study_examples=8, study_per_round=4, study_rounds=4, study_min_rounds=2,
    study_calib_rounds=2, study_seeds=(0, 1), study_batch_size=4,
    need_throughput=15.0, cap_throughput=150.0, need_pfl=5.0, cap_pfl=60.0, need_study=10.0,
    cap_study=90.0, need_small=3.0, need_large=3.0, need_ray=10.0, need_shards=5.0,
    need_pfl_probe=3.0, need_study_calib=3.0, run_overhead_s=1.0)


@dataclass(frozen=True)
class Slot:
    """What :func:`schedule` grants: whether to run, for at most ``cap_s``, or why not."""

    run: bool
    cap_s: float = 0.0
    reason: str | None = None


def schedule(*, remaining_s: float, need_s: float, cap_s: float = math.inf,
             reserve_s: float = 0.0) -> Slot:
    """Grant a measurement (or part) up to ``cap_s`` of ``remaining_s`` less ``reserve_s`` (the
    needs of what comes after it); skip it where less than ``need_s`` is left."""
    available = remaining_s - max(0.0, reserve_s)
    if available < need_s:
        kept = f" after {reserve_s:.0f} s kept for later measurements" if reserve_s > 0 else ""
        return Slot(False, 0.0, f"budget: {max(available, 0.0):.0f} s left{kept}, "
                    f"needs {need_s:.0f} s")
    return Slot(True, min(cap_s, available))


def full_run_fits(*, probe_wall_s: float, probe_rounds: int, steady_round_s: float,
                  target_rounds: int, left_s: float, safety: float = 1.2) -> tuple[bool, float]:
    """``(fits, estimate_s)``: the estimated wall time of a ``target_rounds`` run (the probe's
    wall time plus ``steady_round_s`` for each further round) and whether ``safety`` times it
    fits in ``left_s``."""
    estimate = probe_wall_s + max(0, target_rounds - probe_rounds) * steady_round_s
    return estimate * safety <= left_s, estimate


def study_rounds(*, left_s: float, runs: int, overhead_s: float, round_s: float,
                 full_rounds: int, min_rounds: int, fixed_s: float = 0.0,
                 safety: float = 1.2) -> int:
    """Rounds per run so that ``fixed_s`` (one-time costs) and ``runs`` runs of ``overhead_s``
    plus ``round_s`` per round (times ``safety``) fit in ``left_s``: at most ``full_rounds``,
    at least ``min_rounds`` (the runs that then do not fit are skipped one by one)."""
    per_run = (left_s - fixed_s) / max(1, runs) - overhead_s
    fit = math.floor(per_run / max(round_s * safety, 1e-9)) if per_run > 0 else 0
    return max(min_rounds, min(full_rounds, fit))


# --------------------------------------------------------------------------- records
@dataclass
class Context:
    """One measurement's process: its sizes, device, folders and deadline."""

    name: str
    out: Path
    work: Path
    sizes: Sizes
    smoke: bool
    device: str
    deadline: float  # time.time() at which the measurement must be done
    data_dir: Path | None = None
    chunk_size: int = 512

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.time()

    @property
    def cuda(self) -> bool:
        """Whether this measurement runs on a CUDA device."""
        return self.device.startswith("cuda")


def _reset_peak(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def _release(cuda: bool) -> None:
    """Return a finished part's cached GPU memory (Ray actors share the device)."""
    if cuda:
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def _peak(cuda: bool) -> int | None:
    if not cuda:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when available, else the CPU; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """``torch.cuda.get_device_name`` of a CUDA ``device``, else ``"cpu"``."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", "utf-8")
    os.replace(tmp, path)


def empty_record(name: str, *, device: str, device_type: str, cap_s: float | None,
                 smoke: bool) -> dict[str, Any]:
    """A measurement's JSON before anything ran (every key of :data:`RECORD_KEYS`)."""
    return {"name": name, "status": "skipped", "reason": None, "error": None,
            "device": device, "device_type": device_type, "peak_gpu_memory_bytes": None,
            "wall_s": 0.0, "cap_s": cap_s, "smoke": smoke, "settings": {}, "parts": {},
            "skipped": [], "extrapolated": False, "results": {}, "headline": ""}


class Record:
    """A measurement's JSON, written after every part (``<out>/<name>.json``)."""

    def __init__(self, ctx: Context, *, cap_s: float | None = None) -> None:
        self.ctx = ctx
        self.path = ctx.out / f"{ctx.name}.json"
        self.started = time.time()
        self.data = empty_record(ctx.name, device=device_name(ctx.device),
                                 device_type="cuda" if ctx.cuda else "cpu", cap_s=cap_s,
                                 smoke=ctx.smoke)
        self.data["status"] = "running"
        self.peak: int | None = None  # the largest part peak so far (parts reset the counter)
        _reset_peak(ctx.cuda)

    @property
    def settings(self) -> dict[str, Any]:
        """The measurement's settings (recorded as given)."""
        return self.data["settings"]

    @property
    def results(self) -> dict[str, Any]:
        """The measurement's headline numbers."""
        return self.data["results"]

    def _note_peak(self) -> int | None:
        now = _peak(self.ctx.cuda)
        if now is not None:
            self.peak = max(now, self.peak or 0)
        return now

    def save(self) -> None:
        """Write the JSON now."""
        self._note_peak()
        self.data["wall_s"] = round(time.time() - self.started, 3)
        self.data["peak_gpu_memory_bytes"] = self.peak
        write_json(self.path, self.data)

    def skip(self, part: str, reason: str) -> None:
        """Record ``part`` as skipped for ``reason``."""
        self.data["parts"][part] = {"status": "skipped", "reason": reason}
        self.data["skipped"].append({"part": part, "reason": reason})
        self.save()

    def run_part(self, part: str, need_s: float, fn: Callable[[], dict[str, Any]], *,
                 skip_reason: str | None = None) -> dict[str, Any] | None:
        """Run ``fn`` as ``part`` where ``need_s`` is left before the deadline (else, or with a
        ``skip_reason``, record it as skipped); its result (``None`` unless it succeeded), wall
        seconds and peak GPU memory, or its traceback, go into the JSON."""
        if skip_reason is None:
            slot = schedule(remaining_s=self.ctx.left(), need_s=need_s)
            skip_reason = slot.reason
        if skip_reason is not None:
            self.skip(part, skip_reason)
            return None
        self._note_peak()
        self.data["parts"][part] = {"status": "running"}  # what a kill at the cap interrupted
        self.save()
        _reset_peak(self.ctx.cuda)
        t0 = time.time()
        try:
            out: dict[str, Any] = {"status": "ok", **fn()}
        except Exception:
            out = {"status": "failed", "error": traceback.format_exc()}
        out["wall_s"] = round(time.time() - t0, 3)
        out["peak_gpu_memory_bytes"] = self._note_peak()
        _release(self.ctx.cuda)
        self.data["parts"][part] = out
        self.save()
        return out if out["status"] == "ok" else None

    def finish(self, *, error: str | None = None) -> dict[str, Any]:
        """Set the status (failed: an error or a failed part; skipped: no part ran; else ok)
        and write the JSON."""
        parts = self.data["parts"].values()
        failed = [p for p in self.data["parts"] if self.data["parts"][p]["status"] == "failed"]
        if error is not None:
            self.data["status"], self.data["error"] = "failed", error
        elif failed:
            self.data["status"] = "failed"
            self.data["error"] = f"failed parts: {', '.join(failed)} (tracebacks in parts)"
        elif not any(p["status"] == "ok" for p in parts):
            self.data["status"] = "skipped"
            self.data["reason"] = self.data["reason"] or "; ".join(
                f"{s['part']}: {s['reason']}" for s in self.data["skipped"]) or "nothing ran"
        else:
            self.data["status"] = "ok"
        self.save()
        return self.data


# --------------------------------------------------------------------------- shared helpers
def bench_helpers() -> ModuleType:
    """``benchmarks/simulation_throughput.py`` (its synthetic-data writer and run config)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import simulation_throughput

    return simulation_throughput


def ray_unavailable() -> str | None:
    """Why Ray-based parts can not run here (``None``: ``ray`` and Flower's simulation import)."""
    try:
        import flwr.simulation  # noqa: F401
        import ray  # noqa: F401
    except Exception as err:
        return f"ray is not importable: {type(err).__name__}: {err}"
    return None


def synthetic_data(ctx: Context) -> Path:
    """The synthetic CIFAR-10-schema parquet of this suite (random images; written once per
    work folder by ``simulation_throughput.write_synthetic_cifar``)."""
    root = (ctx.work / "synthetic").resolve()
    bench_helpers().write_synthetic_cifar(root, n_train=ctx.sizes.synthetic_rows(ctx.smoke),
                                          n_test=ctx.sizes.test_rows)
    return root


def bench_config(ctx: Context, tag: str, *, clients: int, examples: int, rounds: int,
                 data_dir: Path, **changes: Any) -> Any:
    """The throughput benchmark's run config (``simulation_throughput.run_config``: dp-fedavg,
    epsilon 8, every client every round) with run-config ``changes``."""
    s = ctx.sizes
    out = ctx.work / "runs" / f"{tag}-{time.time_ns()}"
    cfg = bench_helpers().run_config(
        model="cnn", m=clients, examples=examples, rounds=rounds, data_dir=data_dir.resolve(),
        batch_size=s.batch_size, client_lr=s.client_lr, epochs=s.local_epochs, out=out)
    return cfg.replace(**changes) if changes else cfg


def install_synthetic_images(cfg: Any, *, examples: int, seed: int = 0) -> None:
    """Random CIFAR-shaped tensors (normalised images, 10 classes) served as every partition of
    ``cfg`` in this process (``clients.data.install_client_data``): the vectorized backend
    then trains on them without decoding any image.  Raises where the backend would not see
    them."""
    import torch

    from clients import data as D  # noqa: N812
    from clients.config import client_config
    from clients.task import client_data

    client = cfg.absolute().client
    data_cfg, rep = client.data_config(), client.representation()
    gen = torch.Generator().manual_seed(seed)
    first: torch.Tensor | None = None
    for pid in range(client.num_clients):
        x = torch.randn(examples, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (examples,), generator=gen)
        first = x if pid == 0 else first
        D.install_client_data(data_cfg, pid, rep,
                              D.ClientData(D.TensorData(x, y), D.TensorData(x[:0], y[:0])))
    seen = client_data(client_config(cfg.absolute().to_run_config()), 0).train
    if seen.inputs is not first:
        raise RuntimeError("the synthetic tensors are not what the backend's clients load "
                           "(DataConfig mismatch)")


def timed_run(cfg: Any, *, backend: str, options: Any, examples_per_round: int) -> dict[str, Any]:
    """Run ``cfg`` with ``simulations.runner.run_simulation``; seconds per round (median and
    mean of the rounds after the first, start-up, and before the last, evaluation, as
    ``simulation_throughput``), examples per second and the run's summary numbers.  Client
    failures or missing rounds raise (a throughput over fewer clients would be wrong)."""
    from simulations.runner import run_simulation

    seconds: list[float] = []
    t0 = time.perf_counter()
    summary = run_simulation(cfg, backend=backend, options=options,
                             on_round=lambda r: seconds.append(float(r["seconds"])))
    wall = time.perf_counter() - t0
    rounds = int(cfg.dp.rounds)
    if len(seconds) != rounds or summary.get("rounds_completed") != rounds:
        raise RuntimeError(f"{len(seconds)} of {rounds} rounds completed")
    if summary.get("failures"):
        raise RuntimeError(f"{summary['failures']} client failures")
    timed = seconds[1:-1] or seconds
    median = statistics.median(timed)
    return {"rounds": rounds, "rounds_timed": len(timed),
            "seconds_per_round": round(median, 5),
            "mean_seconds_per_round": round(statistics.fmean(timed), 5),
            "first_round_s": round(seconds[0], 4),
            "examples_per_round": examples_per_round,
            "examples_per_second": round(examples_per_round / median, 1),
            "run_wall_s": round(wall, 3), "setup_s": round(wall - sum(seconds), 3),
            "final_accuracy": summary.get("final_accuracy"),
            "epsilon": summary.get("epsilon"),
            "noise_multiplier": summary.get("noise_multiplier")}


@contextlib.contextmanager
def ray_session() -> Iterator[Callable[[], float]]:
    """A lazily started local Ray instance shared by the Ray parts (Flower's engine and the
    shards); the callable starts it where needed and returns the start's seconds."""
    started = False

    def ensure() -> float:
        nonlocal started
        import ray

        from simulations.backends.ray import ray_init_args

        if ray.is_initialized():
            return 0.0
        t0 = time.perf_counter()
        ray.init(**ray_init_args(log_to_driver=False))
        started = True
        return round(time.perf_counter() - t0, 3)

    try:
        yield ensure
    finally:
        if started:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or not b.get(key):
        return None
    return round(float(a[key]) / float(b[key]), 3)


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# --------------------------------------------------------------------------- measurements
def throughput_cnn(ctx: Context, rec: Record) -> None:
    """Vectorized vs Ray engine at the small cohort, the vectorized backend at the large one,
    and 2 shards vs 1 (see the module docstring)."""
    from simulations.backends import BackendOptions

    s = ctx.sizes
    data_dir = synthetic_data(ctx)
    per_client = s.examples * s.local_epochs
    no_ray = ray_unavailable()
    rec.settings.update({
        "model": "cnn", "data": "synthetic tensors (vectorized); random-image parquet (Ray "
        "engine, shards)", "examples_per_client": s.examples, "batch_size": s.batch_size,
        "client_lr": s.client_lr, "local_epochs": s.local_epochs, "mechanism": "dp-fedavg",
        "small_clients": s.small_clients, "large_clients": s.large_clients,
        "rounds_small": s.rounds_small, "rounds_large": s.rounds_large,
        "rounds_ray": s.rounds_ray, "shard_clients": s.shard_clients,
        "shard_examples_per_client": s.shard_examples, "rounds_shards": s.rounds_shards,
        "chunk_size": ctx.chunk_size,
        "num_cpus_per_client": 1.0,
        "num_gpus_per_client": s.num_gpus_per_client if ctx.cuda else 0.0,
        "num_gpus_per_shard": s.num_gpus_per_shard if ctx.cuda else 0.0,
        "timing": "median seconds of the rounds after the first and before the last"})
    vec = BackendOptions(device=ctx.device, chunk_size=ctx.chunk_size)

    def vectorized(clients: int, rounds: int) -> dict[str, Any]:
        cfg = bench_config(ctx, f"vectorized-{clients}", clients=clients, examples=s.examples,
                           rounds=rounds, data_dir=data_dir)
        install_synthetic_images(cfg, examples=s.examples)
        return {"backend": "vectorized", "clients_per_round": clients,
                **timed_run(cfg, backend="vectorized", options=vec,
                            examples_per_round=clients * per_client)}

    small = rec.run_part("vectorized_small", s.need_small,
                         lambda: vectorized(s.small_clients, s.rounds_small))
    large = rec.run_part("vectorized_large", s.need_large,
                         lambda: vectorized(s.large_clients, s.rounds_large))
    with ray_session() as start_ray:

        def ray_engine() -> dict[str, Any]:
            init_s = start_ray()
            cfg = bench_config(ctx, f"ray-{s.small_clients}", clients=s.small_clients,
                               examples=s.examples, rounds=s.rounds_ray, data_dir=data_dir)
            opts = BackendOptions(num_cpus_per_client=1.0,
                                  num_gpus_per_client=rec.settings["num_gpus_per_client"],
                                  shutdown_ray=False)
            return {"backend": "ray", "clients_per_round": s.small_clients, "ray_init_s": init_s,
                    **timed_run(cfg, backend="ray", options=opts,
                                examples_per_round=s.small_clients * per_client)}

        def sharded(shards: int) -> dict[str, Any]:
            init_s = start_ray() if shards > 1 else 0.0
            cfg = bench_config(ctx, f"shards{shards}", clients=s.shard_clients,
                               examples=s.shard_examples, rounds=s.rounds_shards,
                               data_dir=data_dir)
            opts = BackendOptions(device=ctx.device, chunk_size=ctx.chunk_size, shards=shards,
                                  num_gpus_per_shard=(rec.settings["num_gpus_per_shard"]
                                                      if shards > 1 else 0.0),
                                  shutdown_ray=False)
            return {"backend": "vectorized", "shards": shards, "ray_init_s": init_s,
                    "clients_per_round": s.shard_clients,
                    **timed_run(cfg, backend="vectorized", options=opts,
                                examples_per_round=s.shard_clients * s.shard_examples)}

        ray = rec.run_part("ray_small", s.need_ray, ray_engine, skip_reason=no_ray)
        one = rec.run_part("shards_1", s.need_shards, lambda: sharded(1), skip_reason=no_ray)
        two = rec.run_part("shards_2", s.need_shards, lambda: sharded(2),
                           skip_reason=no_ray or (None if one else "shards_1 did not run"))
    key = "examples_per_second"
    ratio = _ratio(small, ray, key)
    large_rate = large[key] if large else None
    shard_speedup = _ratio(two, one, key)
    rec.results.update({
        "vectorized_small_examples_per_second": small[key] if small else None,
        "ray_small_examples_per_second": ray[key] if ray else None,
        "ratio_vectorized_vs_ray": ratio, "target_ratio": 30.0,
        "ratio_meets_target": None if ratio is None else ratio >= 30.0,
        "vectorized_large_examples_per_second": large_rate, "target_large": 1e5,
        "large_meets_target": None if large_rate is None else large_rate >= 1e5,
        "shards_1_examples_per_second": one[key] if one else None,
        "shards_2_examples_per_second": two[key] if two else None,
        "shards_2_vs_1": shard_speedup})
    rec.data["headline"] = (
        f"vec@{s.small_clients} {_g(rec.results['vectorized_small_examples_per_second'])} ex/s, "
        f"ray@{s.small_clients} {_g(rec.results['ray_small_examples_per_second'])} ex/s, "
        f"ratio {_g(ratio)}x (>=30); vec@{s.large_clients} {_g(large_rate)} ex/s (>=1e5); "
        f"2 vs 1 shard {_g(shard_speedup)}x")


def pfl_benchmark(ctx: Context, rec: Record) -> None:
    """Seconds per round of the pfl-research CIFAR-10 setting: a probe, then the full run if it
    fits, else the full run's time extrapolated from the probe."""
    from simulations.backends import BackendOptions

    s = ctx.sizes
    data_dir = synthetic_data(ctx)
    rec.settings.update({
        "model": "cnn", "data": "synthetic tensors", "num_clients": s.pfl_clients,
        "clients_per_round": s.pfl_per_round, "examples_per_client": s.pfl_examples,
        "batch_size": s.batch_size, "client_lr": s.client_lr, "local_epochs": s.local_epochs,
        "server_lr": 1.0, "mechanism": "dp-fedavg", "epsilon": 8.0,
        "target_rounds": s.pfl_rounds, "probe_rounds": s.pfl_probe_rounds,
        "chunk_size": ctx.chunk_size, "backend": "vectorized"})
    opts = BackendOptions(device=ctx.device, chunk_size=ctx.chunk_size)
    per_round = s.pfl_per_round * s.pfl_examples * s.local_epochs

    def run(rounds: int) -> dict[str, Any]:
        cfg = bench_config(ctx, f"pfl-{rounds}", clients=s.pfl_clients, examples=s.pfl_examples,
                           rounds=rounds, data_dir=data_dir,
                           **{"clients-per-round": s.pfl_per_round, "min-sep": 0})
        install_synthetic_images(cfg, examples=s.pfl_examples)
        return timed_run(cfg, backend="vectorized", options=opts, examples_per_round=per_round)

    probe = rec.run_part("probe", s.need_pfl_probe, lambda: run(s.pfl_probe_rounds))
    if probe is None:
        return
    fits, estimate = full_run_fits(
        probe_wall_s=probe["run_wall_s"], probe_rounds=s.pfl_probe_rounds,
        steady_round_s=probe["mean_seconds_per_round"], target_rounds=s.pfl_rounds,
        left_s=ctx.left())
    full = None
    if fits:
        full = rec.run_part("full", estimate, lambda: run(s.pfl_rounds))
    else:
        rec.skip("full", f"budget: {s.pfl_rounds} rounds need about {estimate:.0f} s, "
                 f"{ctx.left():.0f} s left; extrapolated from the probe")
    used = full or probe
    total = full["run_wall_s"] if full else estimate
    rec.data["extrapolated"] = full is None
    rec.results.update({
        "seconds_per_round": used["seconds_per_round"],
        "mean_seconds_per_round": used["mean_seconds_per_round"],
        "examples_per_second": used["examples_per_second"],
        "rounds_run": used["rounds"], "target_rounds": s.pfl_rounds,
        "total_seconds_target_rounds": round(total, 2),
        "estimate_from_probe_s": round(estimate, 2), "extrapolated": full is None})
    how = f"extrapolated from {s.pfl_probe_rounds}" if full is None else "run"
    rec.data["headline"] = (f"{used['seconds_per_round']:.4g} s/round, "
                            f"{total:.0f} s for {s.pfl_rounds} rounds ({how})")


def study_data(ctx: Context) -> tuple[Path, int]:
    """The study slice's data root and its number of CIFAR-10 training rows (the smoke: the
    synthetic parquet)."""
    import pyarrow.parquet as pq

    root = synthetic_data(ctx) if ctx.smoke else ctx.data_dir
    if root is None or not (root / "cifar10" / "train.parquet").is_file():
        raise FileNotFoundError(f"no cifar10/train.parquet under {root}")
    return root.resolve(), int(pq.read_metadata(root / "cifar10" / "train.parquet").num_rows)


def study_slice(ctx: Context, rec: Record) -> None:
    """The CNN study slice: a short calibration run sizes the rounds, then every mechanism and
    seed runs while the cap allows."""
    from simulations.backends import BackendOptions
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    s = ctx.sizes
    data_dir, rows = study_data(ctx)
    per_client = min(s.study_examples, rows // s.study_clients)
    if per_client < 1:
        raise ValueError(f"{rows} training rows can not give {s.study_clients} clients an image")
    flat: dict[str, Any] = {
        "dataset": "cifar10", "model": "cnn", "data-dir": str(data_dir), "partitioner": "iid",
        "num-clients": s.study_clients, "clients-per-round": s.study_per_round, "min-sep": 0,
        "max-examples-per-client": s.study_examples, "val-fraction": 0.0,
        "local-epochs": 1, "batch-size": s.study_batch_size, "client-lr": s.study_client_lr,
        "epsilon": s.study_epsilon, "delta": 1e-5, "clip-norm": s.study_clip_norm,
        "server-momentum": s.study_server_momentum, "server-lr": 1.0, "schedule": "constant",
        "bands": s.study_bands, "max-test-examples": 0, "participation-timeout": 600.0}
    rec.settings.update({
        **flat, "data": "synthetic random images (smoke)" if ctx.smoke else "real CIFAR-10",
        "train_rows": rows, "examples_per_client": per_client,
        "data_subset": per_client < s.study_examples, "mechanisms": list(s.study_mechanisms),
        "seeds": list(s.study_seeds), "rounds_full": s.study_rounds, "backend": "vectorized"})
    opts = BackendOptions(device=ctx.device, chunk_size=ctx.chunk_size)

    def run(mechanism: str, seed: int, rounds: int, tag: str) -> dict[str, Any]:
        out = ctx.work / "runs" / f"study-{tag}-{time.time_ns()}"
        cfg = RunConfig.from_run_config({**flat, "mechanism": mechanism, "seed": seed,
                                         "rounds": rounds, "eval-every": rounds,
                                         "output-dir": str(out)})
        seconds: list[float] = []
        t0 = time.perf_counter()
        summary = run_simulation(cfg, backend="vectorized", options=opts,
                                 on_round=lambda r: seconds.append(float(r["seconds"])))
        wall = time.perf_counter() - t0
        later = seconds[1:] or seconds
        return {"mechanism": mechanism, "seed": seed, "rounds": rounds,
                "rounds_completed": summary.get("rounds_completed"),
                "final_accuracy": summary.get("final_accuracy"),
                "final_loss": summary.get("final_loss"), "epsilon": summary.get("epsilon"),
                "noise_multiplier": summary.get("noise_multiplier"),
                "failures": summary.get("failures"), "run_wall_s": round(wall, 3),
                "mean_round_s": round(statistics.fmean(later), 5),
                "overhead_s": round(max(0.0, wall - sum(later)), 3)}

    calib = rec.run_part("calibration", s.need_study_calib,
                         lambda: run("fedavg", s.study_seeds[0], s.study_calib_rounds, "calib"))
    if calib is None:
        return
    runs = [(m, seed) for seed in s.study_seeds for m in s.study_mechanisms]
    # one-time costs: the calibration's overhead (start-up, the first seed's data) bounds the
    # data loading of every further seed; then a run's own set-up and its rounds
    load_s = calib["overhead_s"]
    rounds = study_rounds(left_s=ctx.left(), runs=len(runs), overhead_s=s.run_overhead_s,
                          round_s=calib["mean_round_s"], full_rounds=s.study_rounds,
                          min_rounds=s.study_min_rounds,
                          fixed_s=(len(s.study_seeds) - 1) * load_s)
    rec.settings.update({"rounds_run": rounds, "rounds_subset": rounds < s.study_rounds})
    table: list[dict[str, Any]] = []
    loaded = {s.study_seeds[0]}
    for mechanism, seed in runs:
        need = (s.run_overhead_s + rounds * calib["mean_round_s"]) * 1.2
        need += 0.0 if seed in loaded else load_s
        loaded.add(seed)
        out = rec.run_part(f"{mechanism}-seed{seed}", need,
                           lambda m=mechanism, sd=seed: run(m, sd, rounds, f"{m}-{sd}"))
        table.append({"mechanism": mechanism, "seed": seed,
                      "status": rec.data["parts"][f"{mechanism}-seed{seed}"]["status"],
                      "final_accuracy": out["final_accuracy"] if out else None,
                      "epsilon": out["epsilon"] if out else None})
    means = {}
    for mechanism in s.study_mechanisms:
        accs = [r["final_accuracy"] for r in table
                if r["mechanism"] == mechanism and r["final_accuracy"] is not None]
        means[mechanism] = round(statistics.fmean(accs), 4) if accs else None
    rec.results.update({"rounds_run": rounds, "rounds_full": s.study_rounds,
                        "rounds_subset": rounds < s.study_rounds, "runs": table,
                        "mean_final_accuracy": means,
                        "runs_completed": sum(r["status"] == "ok" for r in table),
                        "runs_planned": len(runs)})
    accs = ", ".join(f"{m} {_g(a)}" for m, a in means.items())
    rec.data["headline"] = (f"{rounds}/{s.study_rounds} rounds, {per_client} img/client, "
                            f"{rec.results['runs_completed']}/{len(runs)} runs; acc {accs}")


MEASURE: dict[str, Callable[[Context, Record], None]] = {
    "throughput_cnn": throughput_cnn, "pfl_benchmark": pfl_benchmark,
    "study_slice": study_slice}


# --------------------------------------------------------------------------- processes
def child_main(args: argparse.Namespace) -> int:
    """Run one measurement in this process (``--child NAME``) and write its JSON."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    sizes = SMOKE if args.smoke else Sizes()
    cap = max(0.0, args.deadline - time.time())
    margin = min(30.0, max(3.0, 0.1 * cap))
    ctx = Context(name=args.child, out=Path(args.out), work=Path(args.work), sizes=sizes,
                  smoke=args.smoke, device=resolve_device(args.device),
                  deadline=args.deadline - margin,
                  data_dir=Path(args.data_dir) if args.data_dir else None,
                  chunk_size=args.chunk_size)
    if args.smoke:
        import torch

        torch.set_num_threads(1)
    rec = Record(ctx, cap_s=round(cap, 1))
    rec.save()
    try:
        MEASURE[args.child](ctx, rec)
    except Exception:
        rec.finish(error=traceback.format_exc())
    else:
        rec.finish()
    return 0


def launch(cmd: Sequence[str], *, timeout_s: float, log: Path,
           env: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` (its own process group, output to ``log``) for at most ``timeout_s``;
    ``(exit code or None when killed at the timeout, the log's tail)``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(list(cmd), stdout=sink, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _end_group(proc)
    tail = log.read_text("utf-8", errors="replace")[-4000:]
    return code, tail


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End ``proc``'s process group (what the measurement started: Ray's processes too)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM and not _group_alive(proc.pid):
                return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@dataclass
class SuiteState:
    """The parent's view of the suite (``summary.json``)."""

    budget_s: float
    smoke: bool
    device: str | None = None
    device_type: str | None = None
    started: float = field(default_factory=time.time)
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def remaining(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - (time.time() - self.started)

    def know_device(self, rec: Mapping[str, Any] | None = None) -> None:
        """Take the device from a measurement's JSON, else (none ran) ask torch here."""
        if self.device is not None:
            return
        if rec and rec.get("device") not in (None, "unknown") and rec.get("device_type"):
            self.device, self.device_type = str(rec["device"]), str(rec["device_type"])
            return
        self.device_type = "cpu" if self.smoke else resolve_device("auto")
        self.device = device_name(self.device_type)

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` object."""
        return {"budget_s": self.budget_s, "elapsed_s": round(time.time() - self.started, 2),
                "smoke": self.smoke, "device": self.device, "device_type": self.device_type,
                "python": sys.version.split()[0], "measurements": self.measurements}


def _error_line(error: str | None) -> str | None:
    """One line of an error: the suite's own first line, else a traceback's last."""
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return None
    own = lines[0].startswith(("killed at", "its process", "failed parts"))
    return lines[0] if own else lines[-1]


def _summary_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": rec["name"], "status": rec["status"], "wall_s": rec.get("wall_s"),
            "cap_s": rec.get("cap_s"), "reason": rec.get("reason"),
            "error": _error_line(rec.get("error")),
            "skipped_parts": rec.get("skipped", []),
            "extrapolated": bool(rec.get("extrapolated")),
            "headline": rec.get("headline", ""), "json": f"{rec['name']}.json"}


def precheck(name: str, args: argparse.Namespace) -> str | None:
    """Why ``name`` can not run at all here (``None``: it can); cheap, no imports."""
    if args.only and name not in args.only:
        return "not selected (--only)"
    if name == "study_slice" and not args.smoke:
        root = Path(args.data_dir) if args.data_dir else None
        if root is None or not (root / "cifar10" / "train.parquet").is_file() or not (
                root / "cifar10" / "test.parquet").is_file():
            return (f"no CIFAR-10 data: {root}/cifar10/{{train,test}}.parquet missing "
                    "(--data-dir or FEDMF_DATA_DIR)")
    return None


def run_suite(args: argparse.Namespace) -> SuiteState:
    """Run every measurement in its own process within ``args.budget_s``; write each JSON
    (also for the skipped and the killed ones) and ``summary.json`` after each."""
    state = SuiteState(budget_s=args.budget_s, smoke=args.smoke)
    device = "cpu" if args.smoke else "auto"  # each measurement's process resolves "auto"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else Sizes()
    slots = sizes.time_slots()
    blocked = {name: precheck(name, args) for name in MEASUREMENTS}
    work = Path(tempfile.mkdtemp(prefix="fedmf-gpu-suite-"))
    env = {**os.environ, **{k: v for k, v in _ENV_DEFAULTS.items() if k not in os.environ},
           "FEDMF_CACHE_DIR": str(work / "cache"), "FEDMF_STATE_DIR": str(work / "state"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    if args.smoke:
        env.update({"OMP_NUM_THREADS": "1", "FEDMF_DEVICE": "cpu"})
    try:
        for i, name in enumerate(MEASUREMENTS):
            need, cap = slots[name]
            later = sum(slots[n][0] for n in MEASUREMENTS[i + 1:] if blocked[n] is None)
            slot = schedule(remaining_s=state.remaining() - 3.0, need_s=need, cap_s=cap,
                            reserve_s=later)
            reason = blocked[name] or slot.reason
            t0 = time.time()
            if reason is not None:
                state.know_device()
                rec = empty_record(name, device=str(state.device),
                                   device_type=str(state.device_type), cap_s=None,
                                   smoke=args.smoke)
                rec["reason"] = reason
                write_json(out / f"{name}.json", rec)
            else:
                rec = _run_child(name, args, slot=slot, device=device, work=work, env=env)
                state.know_device(rec)
            state.measurements.append({**_summary_row(rec),
                                       "process_s": round(time.time() - t0, 2)})
            write_json(out / "summary.json", state.summary())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    state.know_device()
    write_json(out / "summary.json", state.summary())
    return state


def _run_child(name: str, args: argparse.Namespace, *, slot: Slot, device: str, work: Path,
               env: Mapping[str, str]) -> dict[str, Any]:
    """Run measurement ``name`` in a subprocess for at most ``slot.cap_s``; its JSON, marked
    failed (with the reason and the log's tail) where the process died or was killed."""
    out = Path(args.out)
    deadline = time.time() + slot.cap_s
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out),
           "--work", str(work), "--deadline", repr(deadline), "--device", device,
           "--chunk-size", str(args.chunk_size)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.time()
    code, tail = launch(cmd, timeout_s=slot.cap_s, log=out / "logs" / f"{name}.log", env=env)
    path = out / f"{name}.json"
    try:
        rec: dict[str, Any] = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        rec = empty_record(name, device="unknown",
                           device_type=device if device != "auto" else "unknown",
                           cap_s=round(slot.cap_s, 1), smoke=args.smoke)
    if code != 0 or rec.get("status") not in STATUSES:
        why = (f"killed at its time cap of {slot.cap_s:.0f} s" if code is None
               else f"its process exited with code {code}")
        rec.update({"status": "failed", "error": f"{why}\n--- log tail ---\n{tail}",
                    "wall_s": round(time.time() - t0, 3)})
        for part in rec.get("parts", {}).values():
            if part.get("status") == "running":
                part.update({"status": "failed", "error": why})
        write_json(path, rec)
    return rec


def print_table(state: SuiteState) -> None:
    """The CLI's final table: one line per measurement."""
    print(f"fedmf gpu suite on {state.device}: {state.summary()['elapsed_s']:.0f} s of "
          f"{state.budget_s:.0f} s")
    print(f"{'measurement':<15} {'status':<8} {'wall_s':>7}  result")
    for row in state.measurements:
        text = row["headline"] or row["reason"] or row["error"] or ""
        print(f"{row['name']:<15} {row['status']:<8} {float(row['wall_s'] or 0):>7.1f}  "
              f"{text}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--child`` and the options after it are internal)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="seconds for the whole suite, its start-up included")
    ap.add_argument("--data-dir", default=os.environ.get("FEDMF_DATA_DIR")
                    or str(REPO.parent / "shared" / "data"),
                    help="real CIFAR-10 for the study slice (default $FEDMF_DATA_DIR, "
                    "else ../shared/data)")
    ap.add_argument("--only", type=lambda v: [x for x in v.split(",") if x], default=None,
                    help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    ap.add_argument("--chunk-size", type=int, default=512,
                    help="clients per batched computation of the vectorized backend")
    ap.add_argument("--child", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only) - set(MEASUREMENTS))
        if unknown:
            ap.error(f"--only: unknown measurements {unknown}; choose from {list(MEASUREMENTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: the whole suite, or (internal) one measurement."""
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    state = run_suite(args)
    print_table(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
