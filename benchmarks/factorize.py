"""Benchmark the factorizations: seconds, sensitivity, MaxSE, MeanSE.

For every rounds ``n``, workload (``prefix``: A_1; ``cosine``: A_1 diag(eta) with a cosine
schedule lr=1 -> 0), participation ``k`` (1: single; k > 1: ``k`` cyclic epochs of
``b = n // k`` rounds, or ``b``-min-separation with ``--participation min_sep``) and method,
time ``factorize(...)`` plus both errors (single core recommended: ``OMP_NUM_THREADS=1``).
``state/param`` is the noise memory in floats per model parameter (``bands - 1`` for the banded
methods, ``buffers`` for ``blt``): compare methods at equal memory.

Methods whose error needs ``O(n^2)`` work (``sqrt`` / ``lr-sqrt`` / ``bsr`` with a
non-constant rate: their ``C^{-1}`` is a full Toeplitz matrix) are skipped above
``--quadratic-max-n``; ``optimal`` above ``--optimal-max-n``; ``opt-bisr`` above
``--opt-max-n`` or when ``fedmf.optimize`` is missing.

Example::

    python benchmarks/factorize.py --n 512 2000 --methods bisr lr-bisr --k 1 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmf.factorizations import BANDED_METHODS, BUFFERED_METHODS, METHODS, factorize
from fedmf.participation import Participation
from fedmf.schedules import learning_rates
from fedmf.workloads import Workload, prefix_workload, sgd_workload

QUADRATIC = ("sqrt", "lr-sqrt", "bsr")


def _workload(name: str, n: int) -> Workload:
    if name == "prefix":
        return prefix_workload(n)
    return sgd_workload(rates=learning_rates(rounds=n, schedule="cosine", lr=1.0, final_lr=0.0))


def _participation(kind: str, k: int, n: int) -> Participation:
    if k == 1:
        return Participation.single()
    b = n // k
    if kind == "cyclic":
        return Participation.cyclic(max_participations=k, min_sep=b)
    return Participation.min_separation(min_sep=b, max_participations=k)


def _skip_reason(method: str, wl_name: str, n: int, args: argparse.Namespace) -> str | None:
    if method in ("opt-bisr", "optimal") and importlib.util.find_spec("fedmf.optimize") is None:
        return "fedmf.optimize missing"
    if method == "optimal" and n > args.optimal_max_n:
        return f"n > {args.optimal_max_n}"
    if method in ("opt-bisr", "bandmf", "blt") and n > args.opt_max_n:
        return f"n > {args.opt_max_n}"
    if method in QUADRATIC and wl_name != "prefix" and n > args.quadratic_max_n:
        return f"O(n^2) errors, n > {args.quadratic_max_n}"
    return None


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in args.n:
        for wl_name in args.workloads:
            wl = _workload(wl_name, n)
            for k in args.k:
                part = _participation(args.participation, k, n)
                for method in args.methods:
                    row: dict[str, Any] = {"n": n, "workload": wl_name, "k": k,
                                           "method": method}
                    bands = min(args.bands, n) if method in BANDED_METHODS else None
                    buffers = args.buffers if method in BUFFERED_METHODS else None
                    row["bands"] = bands if buffers is None else f"{buffers}b"
                    reason = _skip_reason(method, wl_name, n, args)
                    if method == "bandmf" and k > 1 and bands is not None and bands > n // k:
                        reason = f"bands > b = {n // k}"
                    if reason:
                        row["skipped"] = reason
                        rows.append(row)
                        continue
                    t0 = time.perf_counter()
                    f = factorize(method=method, workload=wl, participation=part, bands=bands,
                                  buffers=buffers)
                    mx, mean = f.max_error, f.mean_error
                    state = 0 if method == "identity" else f.noise_spec.state_floats
                    row.update(seconds=time.perf_counter() - t0, max_error=mx, mean_error=mean,
                               sensitivity=f.sensitivity.value, exact=f.sensitivity.exact,
                               state=state)
                    rows.append(row)
                    if args.verbose:
                        print(_format_row(row), file=sys.stderr, flush=True)
    return rows


def _format_row(r: dict[str, Any]) -> str:
    head = (f"| {r['n']:>6} | {r['workload']:<6} | {r['k']:>1} | {r['method']:<8} | "
            f"{'-' if r['bands'] is None else r['bands']:>5} |")
    if "skipped" in r:
        return head + f" skipped ({r['skipped']}) | | | | |"
    return head + (f" {r['state']:>5} | {r['seconds']:8.4f} | "
                   f"{r['sensitivity']:9.4f}{'' if r['exact'] else '*'} |"
                   f" {r['max_error']:10.4f} | {r['mean_error']:10.4f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[512, 2000, 10000, 100000])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--k", type=int, nargs="+", default=[1, 4])
    p.add_argument("--workloads", nargs="+", choices=("prefix", "cosine"),
                   default=["prefix", "cosine"])
    p.add_argument("--participation", choices=("cyclic", "min_sep"), default="cyclic")
    p.add_argument("--bands", type=int, default=64)
    p.add_argument("--buffers", type=int, default=3, help="buffers of blt")
    p.add_argument("--optimal-max-n", type=int, default=512)
    p.add_argument("--opt-max-n", type=int, default=2000)
    p.add_argument("--quadratic-max-n", type=int, default=10000)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--verbose", action="store_true", help="print rows as they finish")
    args = p.parse_args(argv)

    command = "python benchmarks/factorize.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rows = run(args)
    print(f"# {command}")
    print(f"# participation k > 1: {args.participation}, b = n // k; * = sensitivity is an "
          "upper bound (exact=False)")
    print("| n | workload | k | method | bands | state/param | seconds | sensitivity | MaxSE "
          "| MeanSE |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(_format_row(r))
    if args.json:
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in r.items()} for r in rows]
        args.json.write_text(json.dumps({"command": command, "rows": clean}, indent=1,
                                        default=lambda o: o.item() if isinstance(o, np.generic)
                                        else str(o)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
