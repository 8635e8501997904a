"""The maths commands of ``fedmf``: ``factorize``, ``plan``, ``calibrate``.

The ``fedmf`` console script (``simulations.cli:main``) mounts them next to ``simulate``,
``compare``, ``demo`` and ``report``; this module imports no Flower, Ray or torch code, and
neither does ``import fedmf``.  ``python -m fedmf.cli`` runs the whole command line when the
simulation packages are installed (the maths commands alone otherwise).

Participation options mean what they mean for ``fedmf simulate``: ``--min-sep b`` is the number
of cohorts (0 -> ``--clients // --clients-per-round``), a client takes part in at most
``k = ceil(rounds / b)`` rounds of its cohort ``{i, i+b, ...}`` (``--participation cyclic``,
what the strategies enforce); ``--participation min-sep`` analyses every pattern with
participations ``>= b`` apart instead, and ``--max-participations`` lowers ``k``.  Without
``--min-sep`` a client takes part once.

``--sampling`` (``plan``, ``calibrate``) names who takes part in a round: ``cyclic`` (public
cohorts, no amplification, the default) or a secret, amplified mode of
:mod:`fedmf.amplification`: ``balls-in-bins`` (``b = --min-sep`` bins, Monte Carlo),
``poisson`` (``q = --clients-per-round / --clients``, independent noise only) or
``cyclic-poisson`` (``b`` groups, ``q = --clients-per-round * b / --clients``, banded ``C`` with
``bands <= b``).  The amplified ``z`` is shown beside the un-amplified one; methods the sampling
cannot account are skipped and named.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmf.factorizations import BANDED_METHODS, METHODS, Factorization
from fedmf.mechanisms import (
    MAX_OPTIMAL_ROUNDS,
    MECHANISMS,
    PARTICIPATION_KINDS,
    SAMPLINGS,
    MechanismSpec,
    clamp_bands,
    cohort_participation,
)
from fedmf.participation import Participation
from fedmf.schedules import SCHEDULES

__all__ = ["add_subcommands", "build_parser", "main", "run_command"]

_LOG = logging.getLogger(__name__)
#: ``factorize --save`` stores the dense ``C`` (and ``A``) up to this horizon.
_SAVE_DENSE_MAX_ROUNDS = 2000


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
    g.add_argument("--workload", choices=("prefix", "sgd"), default="sgd",
                   help="sgd: A_1·diag(eta)·M(beta), the server optimizer simulate runs (the "
                        "schedule, momentum and weight decay below); prefix: A_1 alone (the "
                        "prefix sum of DP-FTRL, no schedule or momentum)")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant")
    g.add_argument("--lr", "--server-lr", type=float, default=1.0,
                   help="initial learning rate (eta_0)")
    g.add_argument("--final-lr", "--final-server-lr", type=float, default=0.0,
                   help="final rate (cosine, linear)")
    g.add_argument("--gamma", "--server-gamma", type=float, default=0.99,
                   help="decay factor (exponential, step)")
    g.add_argument("--milestones", "--server-milestones", type=_int_list, default=[],
                   help="step milestones T1,T2,...")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up rounds")
    g.add_argument("--momentum", "--server-momentum", type=float, default=0.0,
                   help="server momentum beta in [0, 1)")
    g.add_argument("--weight-decay", "--server-weight-decay", type=float, default=0.0,
                   help="per-round model decay (theta <- (1-wd)·theta - eta·m)")
    g.add_argument("--rounds", type=int, default=512, help="number of rounds n")
    g = p.add_argument_group("participation (as in fedmf simulate)")
    g.add_argument("--min-sep", type=int, default=None,
                   help="b: number of cohorts, participations >= b rounds apart "
                        "(0: --clients // --clients-per-round, the default when both are "
                        "given, as in simulate; else unset: one participation per client)")
    g.add_argument("--clients", "--num-clients", type=int, default=None,
                   help="number of clients (min-sep 0)")
    g.add_argument("--clients-per-round", type=int, default=None,
                   help="clients per round (min-sep 0)")
    g.add_argument("--max-participations", type=int, default=None,
                   help="k: participations per client (default ceil(rounds / b))")
    g.add_argument("--participation", choices=PARTICIPATION_KINDS, default="cyclic",
                   help="cyclic: fixed cohorts {i, i+b, ...} (what the strategies enforce); "
                        "min-sep: every pattern with participations >= b apart")


def method_name(name: str) -> str:
    """A factorization method, also spelled as ``fedmf simulate``'s mechanism (``dp-fedavg``
    is ``identity``); ``ValueError`` naming both vocabularies otherwise."""
    name = name.strip()
    if name in METHODS:
        return name
    spec = MECHANISMS.get(name)
    if spec is not None and spec.method is not None:
        return str(spec.method)
    known = sorted({*METHODS, *(m for m, s in MECHANISMS.items() if s.method is not None)})
    raise ValueError(f"method: unknown method or mechanism {name!r}; one of: "
                     f"{', '.join(known)}")


def _method_arg(text: str) -> str:
    try:
        return method_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_method_args(p: argparse.ArgumentParser, *, single: bool) -> None:
    if single:
        p.add_argument("--method", "--mechanism", type=_method_arg, default="bisr",
                       metavar="METHOD",
                       help=f"{', '.join(METHODS)}; or a mechanism name of simulate "
                            "(dp-fedavg = identity)")
    p.add_argument("--bands", type=int, default=16,
                   help="p, bands of the banded methods (bsr, bisr, lr-bisr, opt-bisr, bandmf)")
    p.add_argument("--buffers", type=int, default=3, help="buffers of blt")
    p.add_argument("--objective", choices=("mean", "max"), default="mean",
                   help="error opt-bisr minimises")


def _add_privacy_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--epsilon", type=float, required=required, default=None if required else 8.0,
                   help="target epsilon of the whole run")
    p.add_argument("--delta", type=float, default=1e-5, help="target delta")
    p.add_argument("--sampling", choices=SAMPLINGS, default="cyclic",
                   help="who takes part: cyclic (public cohorts, no amplification) | "
                        "balls-in-bins (b = --min-sep secret bins; Monte Carlo) | poisson "
                        "(q = --clients-per-round / --clients; identity only) | cyclic-poisson "
                        "(b groups, q = --clients-per-round * b / --clients; bands <= b)")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="Monte Carlo samples per pass (balls-in-bins; default "
                        "fedmf.amplification.DEFAULT_SAMPLES = 10^7)")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register ``factorize``, ``plan`` and ``calibrate`` (each with ``func=handler``)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("factorize", help="factorize a workload and report its errors",
                       formatter_class=fmt)
    _add_workload_args(p)
    _add_method_args(p, single=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", metavar="FILE.npz", help="save the noise band and the report")
    p.set_defaults(func=_cmd_factorize)

    p = sub.add_parser("plan", help="compare every method at a privacy target",
                       formatter_class=fmt)
    _add_workload_args(p)
    _add_method_args(p, single=False)
    _add_privacy_args(p, required=False)
    p.add_argument("--methods", "--mechanisms",
                   default=",".join(m for m in METHODS if m != "optimal"),
                   help="comma-separated subset of: " + ",".join(METHODS) + " (optimal, the "
                        "dense optimum, takes minutes at a few hundred rounds: name it to "
                        "include it)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("calibrate", help="noise multiplier for a target (epsilon, delta)",
                       formatter_class=fmt)
    _add_workload_args(p)
    _add_method_args(p, single=True)
    _add_privacy_args(p, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_calibrate)


def build_parser(prog: str = "fedmf") -> argparse.ArgumentParser:
    """A parser with the maths commands (``simulations.cli`` adds the simulation ones)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Correlated-noise (matrix factorization) DP for federated learning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    from fedmf import __version__

    parser.add_argument("--version", action="version", version=f"fedmf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return parser


# --------------------------------------------------------------------------- builders
def _participation(args: argparse.Namespace) -> Participation:
    """The participation of ``args``, with the meaning ``fedmf simulate`` gives it (for
    ``--sampling poisson``: any round, ``b = 1``, ``k = rounds``)."""
    sampling = getattr(args, "sampling", "cyclic")
    if sampling == "poisson":
        return Participation.min_separation(min_sep=1, max_participations=args.rounds)
    if args.min_sep is None and args.clients is not None and args.clients_per_round is not None:
        args.min_sep = 0  # simulate's default: b = clients // clients-per-round cohorts
    if sampling != "cyclic" and args.min_sep is None:
        raise CLIError(f"min-sep: sampling {sampling!r} needs --min-sep (the number of bins / "
                       "groups b; 0: --clients // --clients-per-round)")
    if args.min_sep is None:
        if args.max_participations is not None:
            raise CLIError("max-participations needs --min-sep")
        return Participation.single()
    return cohort_participation(rounds=args.rounds, min_sep=args.min_sep,
                                num_clients=args.clients,
                                clients_per_round=args.clients_per_round,
                                kind=args.participation,
                                max_participations=args.max_participations)


def _spec(args: argparse.Namespace, method: str) -> MechanismSpec:
    if args.rounds < 1:
        raise CLIError(f"rounds must be >= 1, got {args.rounds}")
    if args.lr <= 0:
        raise CLIError(f"lr must be > 0, got {args.lr}")
    if args.final_lr < 0:
        raise CLIError(f"final-lr must be >= 0, got {args.final_lr}")
    participation = _participation(args)
    bands, warning = clamp_bands(bands=args.bands, rounds=args.rounds)
    if warning is not None and method in BANDED_METHODS:
        logging.getLogger("fedmf").warning("%s", warning)
        args.bands = bands
    if args.workload == "prefix":
        ignored = [flag for flag, value, default in (
            ("--schedule", args.schedule, "constant"), ("--server-lr", args.lr, 1.0),
            ("--server-momentum", args.momentum, 0.0),
            ("--server-weight-decay", args.weight_decay, 0.0), ("--warmup", args.warmup, 0))
            if value != default]
        if ignored:
            raise CLIError(f"workload: --workload prefix ignores {', '.join(ignored)}; use "
                           "--workload sgd (the default) for the server optimizer simulate runs")
        return MechanismSpec(method=method, rounds=args.rounds, participation=participation,
                             bands=args.bands, objective=args.objective,
                             buffers=args.buffers)
    return MechanismSpec(method=method, rounds=args.rounds, schedule=args.schedule, lr=args.lr,
                         final_lr=args.final_lr, gamma=args.gamma,
                         milestones=tuple(args.milestones), warmup=args.warmup,
                         momentum=args.momentum, weight_decay=args.weight_decay,
                         participation=participation, bands=args.bands,
                         objective=args.objective, buffers=args.buffers)


def _check_privacy(epsilon: float, delta: float) -> None:
    if not epsilon > 0:
        raise CLIError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise CLIError(f"delta must be in (0, 1), got {delta}")


def _noise_floats_per_param(fact: Factorization) -> int:
    """Floats of noise state per model parameter in buffer mode (past draws kept)."""
    if fact.method == "identity":
        return 0
    return max(fact.noise_spec.state_floats, 0)


def _report(fact: Factorization, seconds: float) -> dict[str, Any]:
    part = fact.participation
    return {
        "method": fact.method,
        "rounds": fact.workload.n,
        "bands": fact.bands,
        "buffers": None if fact.blt is None else fact.blt.buffers,
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
    spec = _spec(args, method)
    t0 = time.perf_counter()
    fact = spec.factorization()
    # Errors are lazily computed properties; time them as part of the method.
    _ = fact.max_error, fact.mean_error
    return fact, time.perf_counter() - t0


def _ledger(fact: Factorization, epsilon: float, delta: float,
            args: argparse.Namespace | None = None) -> Any:
    from fedmf.ledger import privacy_ledger

    sampling = "cyclic" if args is None else args.sampling
    if sampling == "cyclic":
        return privacy_ledger(factorization=fact, epsilon=epsilon, delta=delta)
    assert args is not None
    if sampling in ("poisson", "cyclic-poisson") and not (args.clients and
                                                         args.clients_per_round):
        raise CLIError(f"clients: sampling {sampling!r} needs --clients and "
                       "--clients-per-round (the sampling rate)")
    samples = _mc_samples(args)
    return privacy_ledger(factorization=fact, epsilon=epsilon, delta=delta, sampling=sampling,
                          clients_per_round=args.clients_per_round, num_clients=args.clients,
                          mc_samples=samples)


def _mc_samples(args: argparse.Namespace) -> int:
    from fedmf.amplification import DEFAULT_SAMPLES  # (imports dp_accounting: only when used)

    if args.mc_samples is None:
        return DEFAULT_SAMPLES
    if args.mc_samples < 1:
        raise CLIError(f"mc-samples must be >= 1, got {args.mc_samples}")
    return int(args.mc_samples)


def _privacy_row(ledger: Any) -> dict[str, Any]:
    """The privacy columns of ``plan`` / ``calibrate``: both bounds side by side."""
    amplified = ledger.sampling != "cyclic"
    row = {
        "sampling": ledger.sampling,
        "accountant": ledger.accountant,
        "noise_multiplier": ledger.noise_multiplier,
        "noise_multiplier_unamplified": (ledger.noise_multiplier_unamplified if amplified
                                         else ledger.noise_multiplier),
        "noise_multiplier_amplified": ledger.noise_multiplier_amplified,
        "epsilon": ledger.epsilon,
        "epsilon_unamplified": ledger.epsilon_unamplified,
        "epsilon_amplified": ledger.epsilon_amplified,
        "epsilon_bound": ledger.epsilon_bound,
    }
    mc = ledger.monte_carlo
    if mc is not None:
        row.update(mc_samples=mc.samples, mc_delta_estimate=mc.delta_estimate,
                   mc_delta_upper=mc.delta_upper, mc_beta=mc.beta, mc_direction=mc.direction,
                   mc_seconds=mc.seconds)
    return row


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
        extra: dict[str, Any] = {}
        if fact.n <= _SAVE_DENSE_MAX_ROUNDS:  # so any factorization can be checked alone
            extra["strategy_matrix"] = fact.strategy_matrix()
        if fact.blt is not None:
            extra.update(blt_omega=fact.blt.omega, blt_theta=fact.blt.theta)
        np.savez(args.save, noise_kind=spec.kind, noise_band=spec.band,
                 report=json.dumps(report), rates=fact.workload.rates,
                 workload=fact.workload.dense() if fact.n <= _SAVE_DENSE_MAX_ROUNDS
                 else np.zeros(0), **extra)
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
    _check_privacy(args.epsilon, args.delta)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS and (
        m not in MECHANISMS or MECHANISMS[m].method is None)]
    if unknown:
        raise CLIError(f"methods: unknown method(s) {unknown}; allowed: {', '.join(METHODS)} "
                       "(or simulate's mechanism names, dp-fedavg = identity)")
    methods = list(dict.fromkeys(method_name(m) for m in names))
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for method in methods:
        if method == "optimal" and args.rounds > MAX_OPTIMAL_ROUNDS:
            skipped[method] = f"rounds > {MAX_OPTIMAL_ROUNDS}"
            continue
        if args.sampling == "poisson" and method != "identity":  # (before optimizing it)
            skipped[method] = (f"sampling: 'poisson' with method {method!r} cannot be "
                               "accounted: poisson sampling is accounted only for independent "
                               "noise (identity / dp-fedavg)")
            continue
        if not args.json:
            print(f"factorizing {method} ...", file=sys.stderr, flush=True)
        try:
            fact, seconds = _run_factorization(args, method)
            if args.sampling != "cyclic":  # an unaccountable pair is skipped, like the above
                from fedmf.amplification import amplified_accountant

                amplified_accountant(sampling=args.sampling, factorization=fact,
                                     clients_per_round=args.clients_per_round,
                                     num_clients=args.clients, samples=_mc_samples(args))
        except (ValueError, CLIError) as err:  # one method that cannot serve this setting
            skipped[method] = str(err)
            continue
        row = _report(fact, seconds)
        ledger = _ledger(fact, args.epsilon, args.delta, args)
        row.update(_privacy_row(ledger))
        # RMS noise on the released models per unit clip (what training feels).
        row["rms_model_noise"] = ledger.noise_multiplier / ledger.sensitivity * row["mean_error"]
        # std of one round's noise per coordinate, in units of clip/m (identity: z): the
        # sizing number z·clip·sqrt(d)/m of a round's noise, for this mechanism.
        row["round_noise"] = ledger.noise_multiplier * float(
            np.sqrt(np.mean(fact.noise_row_norms() ** 2)))
        rows.append(row)
    if not rows:
        raise CLIError("methods: no method serves this setting: " + "; ".join(
            f"{m}: {why}" for m, why in skipped.items()))
    amplified = args.sampling != "cyclic"
    # Under amplification z differs per method beyond sens: rank by the RMS model noise.
    best = min(rows, key=lambda r: r["rms_model_noise" if amplified else "mean_error"])
    choices = _cyclic_poisson_choices(args, methods) if args.sampling == "cyclic-poisson" else []
    if args.json:
        out = {"epsilon": args.epsilon, "delta": args.delta, "sampling": args.sampling,
               "best": best["method"], "methods": rows, "skipped": skipped}
        if args.sampling == "cyclic-poisson":
            out["cyclic_poisson_choices"] = choices
        print(json.dumps(out))
        return 0
    columns = [("method", "method"), ("bands", "p"), ("sensitivity", "sens"),
               ("sensitivity_exact", "exact"), ("noise_multiplier", "noise mult.")]
    if amplified:
        columns += [("noise_multiplier_unamplified", "z un-ampl."),
                    ("noise_multiplier_amplified", "z ampl."), ("epsilon", "epsilon"),
                    ("epsilon_bound", "bound")]
    columns += [("max_error", "MaxSE"), ("mean_error", "MeanSE"),
                ("rms_model_noise", "RMS noise"), ("round_noise", "noise/round"),
                ("noise_floats_per_param", "floats/param"), ("seconds", "seconds")]
    title = (f"fedmf plan — {args.workload}/{args.schedule} n={args.rounds}, "
             f"eps={args.epsilon:g}, delta={args.delta:g}, {_participation_label(rows[0])}")
    _print_table(title + (f", sampling {args.sampling}" if amplified else ""), rows, columns)
    print(_PLAN_LEGEND)
    for method, why in skipped.items():
        print(f"skipped {method}: {why}")
    if choices:
        _print_table(
            "cyclic-poisson: groups b and bands p = b (noise memory p - 1 floats/param)",
            choices,
            [("min_sep", "b"), ("bands", "p"), ("method", "method"),
             ("sampling_rate", "q"), ("noise_multiplier", "z"),
             ("noise_multiplier_unamplified", "z un-ampl."), ("epsilon_bound", "bound"),
             ("rms_model_noise", "RMS noise"), ("round_noise", "noise/round")])
    label = "RMS model noise" if amplified else "MeanSE"
    calm = min(rows, key=lambda r: r["round_noise"])
    print(f"lowest {label} at equal privacy: {best['method']}; lowest noise/round: "
          f"{calm['method']} (weigh both: a large noise/round can stall training even when "
          "the error of the whole run is small)")
    return 0


#: Column legend of ``fedmf plan``'s table.
_PLAN_LEGEND = (
    "p: bands; sens: sensitivity of C for the participation (exact or an upper bound); "
    "noise mult.: z calibrated to (eps, delta); MaxSE / MeanSE: max / mean squared error of B "
    "per unit noise; RMS noise: z/sens * MeanSE, the model noise of the whole run per unit "
    "clip; noise/round: std of one round's noise in units of clip/m (dp-fedavg: z); "
    "floats/param: noise state the server keeps")


def _participation_label(row: dict[str, Any]) -> str:
    """The participation of a plan row, as the title states it (b and k)."""
    if row.get("participation") == "single" or row.get("min_sep") is None:
        return ("one participation per client (give --clients and --clients-per-round, or "
                "--min-sep, for simulate's cohorts)")
    return (f"participation {row.get('participation')} b={row.get('min_sep')}, "
            f"k={row.get('max_participations')}")


def _cyclic_poisson_choices(args: argparse.Namespace,
                            methods: list[str]) -> list[dict[str, Any]]:
    """``bsr`` / ``bandmf`` with ``bands = b`` for ``b`` in 1, 2, 4, ... (``q <= 1``, ``b <=
    rounds``, at most 6 values): which grouping to pick under cyclic Poisson sampling."""
    banded = [m for m in ("bsr", "bandmf") if m in methods] or ["bsr"]
    cap = args.clients // args.clients_per_round if args.clients and args.clients_per_round \
        else 1
    rows: list[dict[str, Any]] = []
    b = 1
    while b <= min(cap, args.rounds) and len(rows) < 6 * len(banded):
        for method in banded:
            sub = argparse.Namespace(**{**vars(args), "min_sep": b, "bands": b,
                                        "max_participations": None})
            try:
                fact, _ = _run_factorization(sub, method)
                ledger = _ledger(fact, args.epsilon, args.delta, sub)
            except (ValueError, CLIError) as err:
                _LOG.info("cyclic-poisson choice b=%d %s skipped: %s", b, method, err)
                continue
            rows.append({
                "min_sep": b, "bands": b, "method": method,
                "sampling_rate": args.clients_per_round * b / args.clients,
                "noise_multiplier": ledger.noise_multiplier,
                "noise_multiplier_unamplified": ledger.noise_multiplier_unamplified,
                "epsilon_bound": ledger.epsilon_bound,
                "mean_error": float(fact.mean_error),
                "rms_model_noise": ledger.noise_multiplier / ledger.sensitivity
                * float(fact.mean_error),
                "round_noise": ledger.noise_multiplier * float(
                    np.sqrt(np.mean(fact.noise_row_norms() ** 2))),
            })
        b *= 2
    return rows


def _cmd_calibrate(args: argparse.Namespace) -> int:
    _check_privacy(args.epsilon, args.delta)
    fact, _ = _run_factorization(args, args.method)
    ledger = _ledger(fact, args.epsilon, args.delta, args)
    out = {
        "method": args.method, "rounds": args.rounds, "sensitivity": ledger.sensitivity,
        "sensitivity_exact": ledger.sensitivity_exact,
        "noise_multiplier": ledger.noise_multiplier, "epsilon": ledger.epsilon,
        "delta": args.delta, "rho": ledger.rho, **_privacy_row(ledger),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"noise multiplier {ledger.noise_multiplier:.6g} (sensitivity "
              f"{ledger.sensitivity:.6g}, epsilon {ledger.epsilon:.4g} at delta "
              f"{args.delta:g}, rho-zCDP {ledger.rho:.4g})")
        if ledger.sampling != "cyclic":
            amp_z = ledger.noise_multiplier_amplified
            print(f"sampling {ledger.sampling}: z amplified {amp_z:.6g} ({ledger.accountant}), "
                  f"un-amplified {ledger.noise_multiplier_unamplified:.6g}; epsilon bound "
                  f"{ledger.epsilon_bound} (amplified {ledger.epsilon_amplified:.4g}, "
                  f"un-amplified {ledger.epsilon_unamplified:.4g}); rho is un-amplified")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: its exit code, with a one-line error (2) for bad input."""
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else
                        logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:  # a light install running a simulation command
        print(f"fedmf {args.command}: error: {exc.name} is not installed; the simulation "
              "commands need the extras: pip install 'fedmf[sim]' (IMDB also 'fedmf[text]')",
              file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedmf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """The maths commands alone (``fedmf`` itself is ``simulations.cli:main``)."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    try:  # the whole command line when the simulation packages are installed
        from simulations.cli import main as full_main
    except ImportError:
        full_main = main
    sys.exit(full_main())
