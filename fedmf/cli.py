"""The ``fedmf`` command line: ``factorize``, ``plan``, ``calibrate`` (and, when the
``simulations`` package is installed, ``simulate``, ``compare``, ``report``).

This module imports no Flower code: the simulation subcommands are registered by
:mod:`simulations.cli`, which itself defers every heavy import to its handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmf.factorizations import METHODS, Factorization, factorize
from fedmf.participation import Participation
from fedmf.schedules import SCHEDULES, learning_rates
from fedmf.workloads import Workload, prefix_workload, sgd_workload

__all__ = ["build_parser", "main"]

_LOG = logging.getLogger(__name__)

# Methods whose noising matrix is dense: memory and time grow with n.
_DENSE = {"sqrt", "lr-sqrt", "optimal"}
# The dense optimum is a reference for small horizons only.
_OPTIMAL_MAX_ROUNDS = 1024


class CLIError(ValueError):
    """A bad command-line value; the message names the parameter."""


# --------------------------------------------------------------------------- parsing
def _int_list(text: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:  # pragma: no cover - argparse reports it
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from exc


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=("prefix", "sgd"), default="prefix",
                   help="prefix: A_1 (prefix sum); sgd: A_1·diag(eta)·M(beta) for the schedule")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant")
    g.add_argument("--lr", type=float, default=1.0, help="initial learning rate (eta_0)")
    g.add_argument("--final-lr", type=float, default=0.0, help="final rate (cosine, linear)")
    g.add_argument("--gamma", type=float, default=0.99, help="decay factor (exponential, step)")
    g.add_argument("--milestones", type=_int_list, default=[], help="step milestones T1,T2,...")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up rounds")
    g.add_argument("--momentum", type=float, default=0.0, help="server momentum beta in [0, 1)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="per-round model decay (theta <- (1-wd)·theta - eta·m)")
    g.add_argument("--rounds", type=int, default=512, help="number of rounds n")
    g = p.add_argument_group("participation")
    g.add_argument("--min-sep", type=int, default=None,
                   help="b: participations at least b rounds apart (b=1 allows consecutive rounds)")
    g.add_argument("--max-participations", type=int, default=None,
                   help="k: participations per client (default ceil(n/b) when --min-sep is set)")
    g.add_argument("--participation", choices=("min-sep", "cyclic"), default="min-sep",
                   help="min-sep: any b-separated pattern; cyclic: fixed cohorts {i, i+b, ...}")


def _add_method_args(p: argparse.ArgumentParser, *, single: bool) -> None:
    if single:
        p.add_argument("--method", choices=METHODS, default="bisr")
    p.add_argument("--bands", type=int, default=16, help="p, bands of the banded methods")
    p.add_argument("--objective", choices=("mean", "max"), default="mean",
                   help="error opt-bisr minimises")


def _add_privacy_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--epsilon", type=float, required=required, default=None if required else 8.0)
    p.add_argument("--delta", type=float, default=1e-5)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedmf`` command."""
    parser = argparse.ArgumentParser(
        prog="fedmf",
        description="Correlated-noise (matrix factorization) DP for federated learning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("factorize", help="factorize a workload and report its errors")
    _add_workload_args(p)
    _add_method_args(p, single=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", metavar="FILE.npz", help="save the noise band and the report")
    p.set_defaults(func=_cmd_factorize)

    p = sub.add_parser("plan", help="compare every method at a privacy target")
    _add_workload_args(p)
    _add_method_args(p, single=False)
    _add_privacy_args(p, required=False)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ",".join(METHODS))
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("calibrate", help="noise multiplier for a target (epsilon, delta)")
    _add_workload_args(p)
    _add_method_args(p, single=True)
    _add_privacy_args(p, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_calibrate)

    try:  # the simulation commands, when the Flower side is installed
        from simulations.cli import add_subcommands
    except ImportError:  # pragma: no cover - fedmf alone
        pass
    else:
        add_subcommands(sub)
    return parser


# --------------------------------------------------------------------------- builders
def _workload(args: argparse.Namespace) -> Workload:
    if args.rounds < 1:
        raise CLIError(f"--rounds must be >= 1, got {args.rounds}")
    if args.lr <= 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.final_lr < 0:
        raise CLIError(f"--final-lr must be >= 0, got {args.final_lr}")
    if args.workload == "prefix":
        return prefix_workload(args.rounds)
    rates = learning_rates(
        rounds=args.rounds, schedule=args.schedule, lr=args.lr, final_lr=args.final_lr,
        gamma=args.gamma, milestones=tuple(args.milestones), warmup=args.warmup,
    )
    return sgd_workload(rates=rates, momentum=args.momentum, weight_decay=args.weight_decay)


def _participation(args: argparse.Namespace) -> Participation:
    n, b, k = args.rounds, args.min_sep, args.max_participations
    if b is None and k is None:
        return Participation.single()
    if b is None:
        raise CLIError("--min-sep is required with --max-participations")
    if b < 1:
        raise CLIError(f"--min-sep must be >= 1, got {b}")
    if k is None:
        k = math.ceil(n / b)
    if k < 1:
        raise CLIError(f"--max-participations must be >= 1, got {k}")
    if (k - 1) * b >= n:
        raise CLIError(
            f"--max-participations k={k} with --min-sep b={b} does not fit in --rounds {n}: "
            f"need (k-1)·b < n, i.e. k <= {math.ceil(n / b)}"
        )
    if k == 1:
        return Participation.single()
    if args.participation == "cyclic":
        return Participation.cyclic(max_participations=k, min_sep=b)
    return Participation.min_separation(min_sep=b, max_participations=k)


def _check_bands(bands: int, rounds: int) -> None:
    if not 1 <= bands <= rounds:
        raise CLIError(f"--bands must be in [1, rounds={rounds}], got {bands}")


def _check_privacy(epsilon: float, delta: float) -> None:
    if not epsilon > 0:
        raise CLIError(f"--epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise CLIError(f"--delta must be in (0, 1), got {delta}")


def _noise_floats_per_param(fact: Factorization) -> int:
    """Floats of noise state per model parameter in buffer mode (past draws kept)."""
    if fact.method == "identity":
        return 0
    return max(fact.noise_spec.bands - 1, 0)


def _report(fact: Factorization, seconds: float) -> dict[str, Any]:
    part = fact.participation
    return {
        "method": fact.method,
        "rounds": fact.workload.n,
        "bands": fact.bands,
        "min_sep": part.min_sep if part.kind != "single" else None,
        "max_participations": part.max_participations,
        "participation": part.kind,
        "sensitivity": float(fact.sensitivity.value),
        "sensitivity_exact": bool(fact.sensitivity.exact),
        "max_error": float(fact.max_error),
        "mean_error": float(fact.mean_error),
        "noise_floats_per_param": _noise_floats_per_param(fact),
        "seconds": seconds,
    }


def _run_factorization(args: argparse.Namespace, method: str) -> tuple[Factorization, float]:
    workload = _workload(args)
    participation = _participation(args)
    bands = args.bands if method not in _DENSE | {"identity"} else None
    if bands is not None:
        _check_bands(bands, args.rounds)
    t0 = time.perf_counter()
    fact = factorize(method=method, workload=workload, participation=participation,
                     bands=bands, objective=args.objective)
    # Errors are lazily computed properties; time them as part of the method.
    _ = fact.max_error, fact.mean_error
    return fact, time.perf_counter() - t0


# --------------------------------------------------------------------------- commands
def _print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key)
            if isinstance(v, float):
                cells.append(f"{v:.4f}" if key != "seconds" else f"{v:.3f}")
            else:
                cells.append("-" if v is None else str(v))
        table.add_row(*cells)
    # Never squeeze numbers into ellipses when stdout is a pipe or a narrow terminal.
    console = Console()
    Console(width=max(console.width, 160) if not console.is_terminal else None).print(table)


def _cmd_factorize(args: argparse.Namespace) -> int:
    fact, seconds = _run_factorization(args, args.method)
    report = _report(fact, seconds)
    if args.save:
        spec = fact.noise_spec
        np.savez(args.save, noise_kind=spec.kind, noise_band=spec.band,
                 report=json.dumps(report), rates=fact.workload.rates)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(
            f"fedmf factorize — {args.workload} workload, n={args.rounds}",
            [report],
            [("method", "method"), ("bands", "p"), ("participation", "participation"),
             ("min_sep", "b"), ("max_participations", "k"), ("sensitivity", "sens"),
             ("sensitivity_exact", "exact"), ("max_error", "MaxSE"),
             ("mean_error", "MeanSE"), ("seconds", "seconds")],
        )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from fedmf.accounting import calibrate_noise_multiplier

    _check_privacy(args.epsilon, args.delta)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"--methods: unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    _check_bands(args.bands, args.rounds)
    _workload(args)
    _participation(args)
    # The multiplier for unit sensitivity; a mechanism needs z = z1 · sens.
    z1 = calibrate_noise_multiplier(epsilon=args.epsilon, delta=args.delta, sensitivity=1.0)
    rows: list[dict[str, Any]] = []
    for method in methods:
        if method == "optimal" and args.rounds > _OPTIMAL_MAX_ROUNDS:
            _LOG.info("skipping optimal: rounds > %d", _OPTIMAL_MAX_ROUNDS)
            continue
        fact, seconds = _run_factorization(args, method)
        row = _report(fact, seconds)
        row["noise_multiplier"] = z1 * row["sensitivity"]
        # RMS noise on the released models per unit clip (what training feels).
        row["rms_model_noise"] = z1 * row["mean_error"]
        rows.append(row)
    best = min(rows, key=lambda r: r["mean_error"])
    if args.json:
        print(json.dumps({"epsilon": args.epsilon, "delta": args.delta, "best": best["method"],
                          "methods": rows}))
        return 0
    _print_table(
        f"fedmf plan — {args.workload}/{args.schedule} n={args.rounds}, "
        f"eps={args.epsilon:g}, delta={args.delta:g}",
        rows,
        [("method", "method"), ("bands", "p"), ("sensitivity", "sens"),
         ("sensitivity_exact", "exact"), ("noise_multiplier", "noise mult."),
         ("max_error", "MaxSE"), ("mean_error", "MeanSE"), ("rms_model_noise", "RMS noise"),
         ("noise_floats_per_param", "floats/param"), ("seconds", "seconds")],
    )
    print(f"best (lowest MeanSE at equal privacy): {best['method']}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from fedmf.accounting import calibrate_noise_multiplier, epsilon, rho_zcdp

    _check_privacy(args.epsilon, args.delta)
    fact, _ = _run_factorization(args, args.method)
    sens = float(fact.sensitivity.value)
    z = calibrate_noise_multiplier(epsilon=args.epsilon, delta=args.delta, sensitivity=sens)
    out = {
        "method": args.method, "rounds": args.rounds, "sensitivity": sens,
        "sensitivity_exact": bool(fact.sensitivity.exact), "noise_multiplier": z,
        "epsilon": epsilon(noise_multiplier=z, sensitivity=sens, delta=args.delta),
        "delta": args.delta, "rho": rho_zcdp(noise_multiplier=z, sensitivity=sens),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"noise multiplier {z:.6g} (sensitivity {sens:.6g}, epsilon {out['epsilon']:.4g} "
              f"at delta {args.delta:g}, rho-zCDP {out['rho']:.4g})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedmf`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError) as exc:
        print(f"fedmf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
