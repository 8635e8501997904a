"""Benchmark of the streaming correlated-noise generator (fedmf.noise.CorrelatedNoise).

Times one noise round and measures peak memory for ``d`` parameters and ``p`` bands in both
memory modes, starting from the steady state (round ``p``, all ``p`` terms active).

Memory: on CUDA the increase of ``torch.cuda.max_memory_allocated`` over the baseline (the
``like`` tensor excluded); on CPU each configuration runs in a fresh subprocess and reports the
increase of the peak resident set size (``VmHWM``) over its value just before the generator was
created.  "predicted" is ``CorrelatedNoise.memory_bytes(d)`` (state + scratch + output).

Usage::

    python benchmarks/noise.py                       # d in {1e6, 1e7}, p in {8, 32, 64}
    python benchmarks/noise.py --sizes 1e6 --bands 8 --device cpu --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmf.noise import CorrelatedNoise

MIB = 1024.0**2


@dataclass(frozen=True)
class BenchSpec:
    """Stand-in for fedmf.factorizations.NoiseSpec: Toeplitz prefix-sum BISR / BSR bands."""

    kind: str
    band: np.ndarray


def make_spec(kind: str, *, rounds: int, bands: int) -> BenchSpec:
    """``cinv_band``: coefficients of (1-x)^{1/2} (BISR); ``c_band``: of (1-x)^{-1/2} (BSR)."""
    coef = np.ones(bands)
    for k in range(1, bands):
        coef[k] = coef[k - 1] * ((k - 1.5) / k if kind == "cinv_band" else (k - 0.5) / k)
    band = np.tile(coef, (rounds, 1))
    for j in range(bands):
        band[:j, j] = 0.0
    return BenchSpec(kind, band)


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(
    *,
    kind: str,
    mode: str,
    d: int,
    p: int,
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    warmup: int,
) -> dict:
    """Time ``rounds`` rounds after ``warmup`` rounds, from steady state; returns a result row."""
    spec = make_spec(kind, rounds=p + warmup + rounds, bands=p)
    like = torch.zeros(d, dtype=dtype, device=device)
    gen0 = CorrelatedNoise(spec=spec, std=1.0, seed=12345, mode=mode, device=device, dtype=dtype)
    state = gen0.state_dict()
    state["round"], state["num_params"] = p, d  # jump to the steady state (benchmark only)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _vm_hwm_bytes()
    gen = CorrelatedNoise.from_state_dict(state, spec=spec, device=device)
    times = []
    out = None
    for i in range(warmup + rounds):
        _sync(device)
        t0 = time.perf_counter()
        out = None
        out = gen.next(like)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del out
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device) - base
    else:
        hwm = _vm_hwm_bytes()
        measured = None if hwm is None or base is None else hwm - base
    return {
        "kind": kind,
        "mode": mode,
        "d": d,
        "p": p,
        "ms_median": 1e3 * statistics.median(times),
        "ms_min": 1e3 * min(times),
        "predicted_mib": gen.memory_bytes(d) / MIB,
        "measured_mib": None if measured is None else measured / MIB,
    }


def kernel_compare(*, d: int, p: int, device: torch.device, dtype: torch.dtype, reps: int) -> dict:
    """Combination step only: one ``torch.mv`` on the (p, d) buffer vs. a loop of axpys."""
    buf = torch.randn(p, d, dtype=dtype, device=device)
    coef = torch.randn(p, dtype=dtype, device=device)
    coef_host = coef.tolist()

    def gemv() -> torch.Tensor:
        return torch.mv(buf.t(), coef)

    def axpy() -> torch.Tensor:
        w = buf[0] * coef_host[0]
        for j in range(1, p):
            w.add_(buf[j], alpha=coef_host[j])
        return w

    res = {}
    for name, fn in (("mv", gemv), ("axpy-loop", axpy)):
        fn()
        _sync(device)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        res[name] = 1e3 * statistics.median(ts)
    gen = torch.Generator(device=device)
    z = torch.empty(d, dtype=dtype, device=device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gen.manual_seed(1)
        z.normal_(generator=gen)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    res["one draw"] = 1e3 * statistics.median(ts)
    return {"d": d, "p": p, **res}


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def _parse_ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="comma list of d (default 1e6,1e7)")
    parser.add_argument("--bands", default="8,32,64", help="comma list of p (default 8,32,64)")
    parser.add_argument("--modes", default="buffer,seed", help="comma list of memory modes")
    parser.add_argument(
        "--kinds",
        default="cinv_band,c_band",
        help="comma list of spec kinds (c_band runs in buffer mode only)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch default)"
    )
    parser.add_argument("--no-kernels", action="store_true", help="skip the mv vs axpy table")
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="CPU: run configurations in-process (no peak-RSS measurement)",
    )
    parser.add_argument("--_single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args._single is not None:  # child process: one configuration, JSON on stdout
        cfg = json.loads(args._single)
        row = run_config(device=device, dtype=dtype, rounds=args.rounds, warmup=args.warmup, **cfg)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0

    configs = [
        {"kind": kind, "mode": mode, "d": d, "p": p}
        for d in _parse_sizes(args.sizes)
        for p in _parse_ints(args.bands)
        for kind in args.kinds.split(",")
        for mode in args.modes.split(",")
        if not (kind == "c_band" and mode == "seed")
    ]
    command = "python benchmarks/noise.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# command: {command.strip()}")
    print(
        f"# torch {torch.__version__}, device {device} ({dev_name or 'cpu'}), "
        f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, dtype {args.dtype}, "
        f"median of {args.rounds} rounds after {args.warmup} warm-up, steady state (round p)"
    )
    mem_note = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS increase"
    print(f"# measured memory: {mem_note}; predicted: memory_bytes(d) (state + scratch + output)")
    print()
    print(
        "| kind | mode | d | p | ms/round (median) | ms/round (min) | predicted MiB | "
        "measured MiB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cfg in configs:
        if device.type == "cpu" and not args.no_isolate:
            cmd = [
                sys.executable,
                __file__,
                "--device",
                "cpu",
                "--dtype",
                args.dtype,
                "--rounds",
                str(args.rounds),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--_single",
                json.dumps(cfg),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = run_config(
                device=device, dtype=dtype, rounds=args.rounds, warmup=args.warmup, **cfg
            )
        measured = "n/a" if row["measured_mib"] is None else f"{row['measured_mib']:.1f}"
        print(
            f"| {row['kind']} | {row['mode']} | {row['d']:.0e} | {row['p']} | "
            f"{row['ms_median']:.2f} | {row['ms_min']:.2f} | {row['predicted_mib']:.1f} | "
            f"{measured} |",
            flush=True,
        )

    if not args.no_kernels:
        print()
        print("# combination step alone (buffer mode), and one N(0,1) draw of d values")
        print("| d | p | torch.mv ms | axpy loop ms | one draw ms |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for d in _parse_sizes(args.sizes):
            for p in _parse_ints(args.bands):
                r = kernel_compare(d=d, p=p, device=device, dtype=dtype, reps=max(3, args.rounds))
                print(
                    f"| {d:.0e} | {p} | {r['mv']:.2f} | {r['axpy-loop']:.2f} | "
                    f"{r['one draw']:.2f} |",
                    flush=True,
                )
                del r
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
