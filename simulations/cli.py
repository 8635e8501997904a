"""The ``fedmf`` command line: ``simulate | audit | compare | demo | report`` plus the maths
commands ``factorize | plan | calibrate`` of :mod:`fedmf.cli`.

``main`` is the ``fedmf`` console script (also ``python -m simulations.cli``).  Nothing heavy
(Flower, torch, Ray, matplotlib) is imported at module level: only inside the handlers.
This module owns the parsers and the ``cmd_*`` handlers; what an existing run folder means
for ``--resume`` / ``--overwrite`` is :mod:`simulations.runfolder`, and the tables, verdicts,
summaries and progress bar shown on the terminal are :mod:`simulations.render`.

Examples::

    fedmf simulate --dataset cifar10 --mechanism lr-bisr --epsilon 8 --rounds 200 \\
        --clients 500 --clients-per-round 50 --model cnn --partitioner dirichlet --alpha 0.5 \\
        --schedule cosine --server-lr 1.0 --local-epochs 1 --bands 16 --min-sep 0 --seed 0 \\
        --output runs/lr-bisr --data-dir ../shared/data --num-cpus-per-client 1 \\
        --num-gpus-per-client 0.5
    fedmf simulate --output runs/lr-bisr --resume          # continue an interrupted run
    fedmf compare --mechanisms fedavg,dp-fedavg,bisr,lr-bisr --epsilons 2,8 \\
        --schedules cosine --seeds 0,1,2 --rounds 50 --output runs/grid
    fedmf report runs/grid

Options of ``simulate`` map to run-config keys (``[tool.flwr.app.config]``); precedence:
defaults < ``--run-config "k=v ..."`` < explicit options, parsed once into a
:class:`~simulations.config.RunConfig`.  Unless given, ``bands`` (default 16) is capped at
``rounds``.  ``--output DIR`` receives
``rounds.jsonl``, ``participation.json``, ``summary.json``, ``summary.csv`` and
``run_config.json``; the private checkpoint (noise seed and buffers) goes *outside* it, to
``$FEDMF_STATE_DIR/checkpoints/`` (``simulations.results.default_checkpoint_dir``) unless
``--checkpoint-dir``, and is deleted when the run finishes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedmf.mechanisms import MECHANISMS

from .backends import BACKENDS
from .render import (
    Progress,
    audit_table,
    demo_table,
    fmt_cell,
    print_summary,
    quiet_flower,
    verdict,
)
from .runfolder import interrupted, resolve_simulate_config, write_run_config

__all__ = ["add_subcommands", "build_parser", "main"]

#: Older spellings of run-config flags, kept as aliases.
_ALIASES: dict[str, tuple[str, ...]] = {"num-clients": ("--clients",)}
#: Keys that are not flags of simulate / audit (``--output`` sets output-dir).
_NOT_FLAGS = frozenset({"output-dir"})
#: The grid axes of compare (``--mechanisms`` ...) and its per-cell paths.
_GRID_KEYS = frozenset({"mechanism", "epsilon", "schedule", "seed", "checkpoint-dir"})


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the ``Attributes:`` section of the docstring of ``cls`` or of
    the base class that declares it (the one description of each run-config key; ``a, b:
    text`` documents both)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # bases first: a subclass may redefine a text
        if klass is not object:
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of ``cls``'s own docstring (not an inherited one)."""
    import inspect
    import re

    doc = inspect.cleandoc(cls.__doc__ or "")
    body = doc.partition("Attributes:")[2]
    out: dict[str, str] = {}
    names: list[str] = []
    for line in body.splitlines():
        entry = re.match(r"^ {4}([a-z_][a-z0-9_, ]*):\s*(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",") if n.strip()]
            for name in names:
                out[name] = entry.group(2).strip()
        elif line.startswith("        ") and names:
            for name in names:
                out[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return {k: re.sub(r'``"?([^`"]*)"?``', r"'\1'", v).replace(":data:", "").replace(
        ":class:", "").replace(":mod:", "") for k, v in out.items()}


def _choices() -> dict[str, Sequence[str]]:
    """Allowed values of the keys that name something (listed in their help)."""
    from clients.config import MODELS_FOR_DATASET
    from fedmf.mechanisms import SAMPLINGS
    from fedmf.schedules import SCHEDULES

    return {"mechanism": list(MECHANISMS), "sampling": list(SAMPLINGS),
            "schedule": list(SCHEDULES), "dataset": list(MODELS_FOR_DATASET),
            "model": [f"{m} ({d})" for d, ms in MODELS_FOR_DATASET.items() for m in ms]}


def config_flags() -> list[tuple[str, str, str, Any, str]]:
    """``(group, key, type, default, help)`` of every run-config key, generated from the
    configuration dataclasses: their fields are the keys, their defaults the defaults and
    their docstrings the help (nothing here is kept by hand)."""
    from clients.config import ClientConfig
    from fedmf import runconfig
    from strategies.config import DPConfig

    from .config import RunOptions

    parts = (("clients: data, model, local training", ClientConfig),
             ("strategy: mechanism, privacy, cohorts, server", DPConfig),
             ("results", RunOptions))
    choices = _choices()
    seen: set[str] = set()
    out = []
    for group, cls in parts:
        docs = _field_docs(cls)
        for key, fld in runconfig.keys(cls).items():
            if key in seen:
                continue
            seen.add(key)
            typ = (fld.type if isinstance(fld.type, str) else fld.type.__name__).replace(
                " | None", "")
            text = docs.get(fld.name, "").rstrip(".")
            if key in choices:
                text += f"; one of: {', '.join(choices[key])}"
            default = "" if fld.default is None else fld.default  # None reads back as ""
            out.append((group, key, typ, default, text))
    return out


def _add_config_flags(p: argparse.ArgumentParser, *, exclude: frozenset[str] = frozenset()
                      ) -> None:
    """One ``--<key>`` per run-config key (values parsed once, by ``RunConfig``, so a bad
    value's error names the key), grouped by configuration part, defaults shown."""
    groups: dict[str, Any] = {}
    for group, key, typ, default, text in config_flags():
        if key in exclude or key in _NOT_FLAGS:
            continue
        g = groups.setdefault(group, p.add_argument_group(group))
        shown = ("empty" if default == "" else ",".join(map(str, default))
                 if isinstance(default, tuple) else default)
        if key == "bands":
            shown = f"{default}, capped at --rounds"
        kwargs: dict[str, Any] = {"dest": f"rc:{key}", "default": None,
                                  "metavar": "INTS" if typ.startswith("tuple") else typ.upper(),
                                  "help": f"{text} (default: {shown})"}
        if typ == "bool":  # a bare flag means true; an explicit value is parsed by RunConfig
            kwargs.update(nargs="?", const=True)
        g.add_argument(f"--{key}", *_ALIASES.get(key, ()), **kwargs)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list {text!r}") from None
    return parse


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("simulation engine")
    g.add_argument("--backend", choices=BACKENDS, default="ray",
                   help="ray: Flower's simulation engine, any ClientApp, clusters (default); "
                        "inprocess: the same ServerApp/ClientApp and messages in this process "
                        "(small models, sweeps); vectorized: a round's clients train as one "
                        "batched computation on --device (large cohorts; cnn and linear heads)")
    g.add_argument("--device", default=None,
                   help="vectorized backend: cuda, cuda:1, cpu (default: CUDA if available)")
    g.add_argument("--chunk-size", type=int, default=512,
                   help="vectorized backend: clients per batched computation (default 512)")
    g.add_argument("--shards", type=int, default=1, metavar="N",
                   help="vectorized backend only: N>1 runs the cohort on N Ray actors, one CPU "
                        "(and --num-gpus-per-shard GPUs) each, partitions balanced by "
                        "examples; --ray-address attaches to an existing cluster (default 1: "
                        "this process, no Ray)")
    g.add_argument("--num-gpus-per-shard", type=float, default=0.0, metavar="X",
                   help="vectorized backend only: Ray GPUs per shard actor, fractional "
                        "allowed (default 0)")
    g.add_argument("--run-config", default=None, metavar='"k=v ..."',
                   help="run-config overrides (flwr syntax, TOML values)")
    g.add_argument("--num-cpus-per-client", type=float, default=1.0,
                   help="Ray CPUs per ClientApp actor (default 1)")
    g.add_argument("--num-gpus-per-client", type=float, default=0.0,
                   help="Ray GPUs per ClientApp actor, fractional allowed (default 0)")
    g.add_argument("--ray-address", default=None,
                   help="attach to an existing Ray cluster (e.g. 'auto' or host:port)")
    g.add_argument("--ray-num-cpus", type=int, default=None,
                   help="CPUs of a locally started Ray (default: all cores)")
    g.add_argument("--noise-seed", type=int, default=None, metavar="N",
                   help="fixed noise seed, handed to the ServerApp only (never to clients or "
                        "results files); needs --insecure-reproducible")
    g.add_argument("--verbose", action="store_true",
                   help="show Flower's INFO logs and the clients' logs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``simulate``, ``audit``, ``compare``, ``demo`` and ``report`` (each with
    ``func=handler``)."""
    p = subparsers.add_parser(
        "simulate", help="run one DP federated training on Flower's simulation engine",
        description="Run the fedmf ServerApp/ClientApp on Flower's simulation engine (Ray).")
    _add_config_flags(p)
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the run in DIR (its results and checkpoint) and start anew")
    _add_runtime(p)
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser(
        "audit", help="empirical privacy of a run: canary clients, one-shot estimate and "
                      "a Clopper-Pearson lower bound beside the claimed epsilon",
        description="Run one simulation (vectorized backend) with --canaries of its clients "
                    "replaced by canary clients (a fixed random direction at the clip norm, "
                    "sampled like any client) and as many held-out directions; score them "
                    "against the final model and every round's model; write audit.json. "
                    "Andrew et al., ICLR 2024 (arXiv 2302.03098).")
    _add_config_flags(p)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory (new: an audit cannot resume)")
    g = p.add_argument_group("audit")
    g.add_argument("--canaries", type=int, default=None,
                   help="clients replaced by canaries (default: min(500, num-clients // 2))")
    g.add_argument("--held-out", type=int, default=None,
                   help="directions never inserted (default: as many as --canaries)")
    g.add_argument("--audit-seed", type=int, default=0,
                   help="seed of the canary choice and directions (default 0; public)")
    g.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the lower bound (default 0.95)")
    _add_runtime(p)
    p.set_defaults(func=cmd_audit, backend="vectorized")

    p = subparsers.add_parser(
        "compare", help="run a grid mechanisms x epsilons x schedules x seeds",
        description="Run a grid of simulations sequentially; finished cells are skipped.")
    p.add_argument("--mechanisms", type=_csv(str), required=True,
                   help="comma-separated, e.g. fedavg,dp-fedavg,bisr,lr-bisr")
    p.add_argument("--epsilons", type=_csv(float), required=True, help="e.g. 2,8")
    p.add_argument("--schedules", type=_csv(str), default=None, help="e.g. cosine,constant")
    p.add_argument("--seeds", type=_csv(int), default=None, help="e.g. 0,1,2")
    p.add_argument("--output", required=True, metavar="DIR", help="grid directory")
    _add_config_flags(p, exclude=_GRID_KEYS)
    _add_runtime(p)
    p.add_argument("--no-report", action="store_true", help="skip plots and report.md")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser(
        "demo", help="the main job: CIFAR-10 on frozen ScatterNet features, FedAvg vs "
                     f"dp-fedavg (public cohorts and Poisson-amplified) vs {_DEMO_BEST}, 3 seeds "
                     "(< 10 min on a 2-core CPU)",
        description="Run the embedded default experiment -- CIFAR-10 with a linear head over "
                    "frozen ScatterNet features, "
                    f"{_DEMO['clients']} clients of {_DEMO['max-examples-per-client']} images "
                    f"({_DEMO['clients-per-round']} per round, {_DEMO['rounds']} rounds, server "
                    f"momentum {_DEMO['server-momentum']}), on the vectorized backend: "
                    f"non-private FedAvg, dp-fedavg, dp-fedavg with Poisson sampling accounted "
                    f"with amplification ({_DEMO_AMPLIFIED}, as McMahan et al. 2018 publish it) "
                    f"and {_DEMO_BEST} at one epsilon over seeds 0, 1, 2 -- and print the table "
                    "and a verdict against each baseline. Data: --data-dir, else "
                    "$FEDMF_DATA_DIR, else the hub.")
    p.add_argument("--output", default="runs/demo", metavar="DIR",
                   help="grid directory (default runs/demo; finished cells are skipped)")
    p.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (default 8)")
    p.add_argument("--mechanism", default=_DEMO_BEST,
                   help=f"the correlated mechanism to compare (default {_DEMO_BEST})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    p.add_argument("--data-dir", default=None, metavar="DIR")
    p.add_argument("--backend", choices=BACKENDS, default="vectorized")
    p.add_argument("--device", default=None, help="vectorized backend device")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser(
        "report", help="tables, plots and report.md of a run or grid directory",
        description="Regenerate results.csv, plots/*.png and report.md from the files.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--no-errors", action="store_true",
                   help="skip the factorization-error plot (no fedmf computations)")
    p.add_argument("--pairs", default="", metavar="MECH:BASE,...",
                   help="paired differences to report besides every mechanism's to dp-fedavg, "
                        "e.g. lr-bisr:bisr,opt-bisr:lr-bisr")
    p.set_defaults(func=cmd_report)


#: The embedded default experiment of ``fedmf demo`` (the README's main job), one slice of the
#: README's CIFAR-10 study: sized so that the DP noise on a round's mean,
#: ``z clip sqrt(d) / m`` (d = 38,890, m = 250), stays about the size of the clipped signal at
#: epsilon = 8, and to finish in under 10 minutes on a 2-core CPU.
_DEMO: dict[str, Any] = {
    "dataset": "cifar10", "model": "scatter-linear", "partitioner": "iid", "clients": 1000,
    "clients-per-round": 250, "rounds": 80, "max-examples-per-client": 20, "val-fraction": 0.0,
    "local-epochs": 1, "batch-size": 10, "client-lr": 8.0, "clip-norm": 3.0,
    "server-momentum": 0.9, "server-lr": 1.0, "bands": 4, "eval-every": 10,
    "schedule": "constant",
}
#: The correlated mechanism of the demo: the lowest MeanSE for this workload and
#: participation (``fedmf plan``), and the best of the study.
_DEMO_BEST = "bsr"
#: DP-FedAvg as McMahan et al. (2018) publish it: Poisson sampling, amplified accounting.
_DEMO_AMPLIFIED = "dp-fedavg@poisson"


def cmd_demo(args: argparse.Namespace) -> int:
    """``fedmf demo``: ``fedmf compare`` on the embedded default, then the verdict."""
    from .plots import make_report, paired_differences

    argv = ["compare", "--mechanisms",
            f"fedavg,dp-fedavg,{_DEMO_AMPLIFIED},{args.mechanism}",
            "--epsilons", str(args.epsilon), "--schedules", _DEMO["schedule"],
            "--seeds", args.seeds, "--output", args.output, "--backend", args.backend,
            "--no-report"]
    for key, value in _DEMO.items():
        if key != "schedule":
            argv += [f"--{key}", str(value)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.device:
        argv += ["--device", args.device]
    if args.no_progress:
        argv.append("--no-progress")
    sub = build_parser().parse_args(argv)
    code = int(sub.func(sub) or 0)
    out = Path(args.output).expanduser().resolve()
    report = make_report(out, errors=False)
    print(demo_table(report.table, epsilon=args.epsilon))
    for baseline in ("dp-fedavg", _DEMO_AMPLIFIED):
        rows = [r for r in paired_differences(report.runs, baseline=baseline)
                if r["mechanism"] == args.mechanism and r["epsilon"] == args.epsilon]
        print(verdict(rows[0] if rows else None, mechanism=args.mechanism,
                      epsilon=args.epsilon, baseline=baseline))
    print(f"({args.mechanism} and dp-fedavg: public cohorts, no amplification claimed; "
          f"{_DEMO_AMPLIFIED}: DP-FedAvg as published, secret Poisson sampling accounted "
          "with amplification. Both are (ε, δ)-DP at the same ε; they assume different "
          "threat models: see the README's privacy section)")
    print(f"report: {out / 'report.md'}   plots: {out / 'plots'}")
    return code


def build_parser() -> argparse.ArgumentParser:
    """The ``fedmf`` parser: the maths commands of :mod:`fedmf.cli` and the simulation ones."""
    from fedmf import cli as maths

    parser = argparse.ArgumentParser(
        prog="fedmf", description="Correlated-noise (matrix factorization) DP for federated "
                                  "learning on Flower.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    from fedmf import __version__

    parser.add_argument("--version", action="version", version=f"fedmf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    maths.add_subcommands(sub)
    add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fedmf`` console script; returns the exit code (2 on invalid input)."""
    from fedmf.cli import run_command

    return run_command(build_parser().parse_args(argv))


# ------------------------------------------------------------------------------ helpers
def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys the user set: ``--run-config`` overridden by explicit options."""
    from .config import parse_run_config_text

    given = parse_run_config_text(getattr(args, "run_config", None))
    given.update({k[3:]: v for k, v in vars(args).items()
                  if k.startswith("rc:") and v is not None})
    return given


def _run_config(given: dict[str, Any], *, noise_seed: int | None) -> Any:
    """The :class:`RunConfig` of ``given`` (``bands`` capped at ``rounds`` unless given)."""
    from strategies.config import DPConfig

    from .config import RunConfig

    flat = dict(given)
    if "bands" not in flat:
        rounds = int(flat.get("rounds", DPConfig.rounds))
        flat["bands"] = min(DPConfig.bands, max(rounds, 1))
    return RunConfig.from_run_config(flat, noise_seed=noise_seed)


def _backend_options(args: argparse.Namespace) -> Any:
    from .backends import BackendOptions, check_shards

    if not math.isfinite(args.num_cpus_per_client):
        raise ValueError(f"num-cpus-per-client must be > 0, got {args.num_cpus_per_client}")
    options = BackendOptions(num_cpus_per_client=args.num_cpus_per_client,
                             num_gpus_per_client=args.num_gpus_per_client,
                             ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
                             verbose=args.verbose, device=args.device,
                             chunk_size=args.chunk_size, shards=args.shards,
                             num_gpus_per_shard=args.num_gpus_per_shard)
    check_shards(options, backend=args.backend)
    return options


def _simulate_config(args: argparse.Namespace) -> Any:
    """The :class:`RunConfig` of ``simulate`` under the run-folder policy of
    :func:`simulations.runfolder.resolve_simulate_config` (raises ValueError naming the key)."""
    return resolve_simulate_config(args.output, resume=args.resume, overwrite=args.overwrite,
                                   noise_seed=args.noise_seed, given=lambda: _given(args),
                                   build=_run_config)


# ------------------------------------------------------------------------------ handlers
def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedmf simulate``: one run; files in ``--output``."""
    from . import results
    from .runner import preflight, run_simulation

    options = _backend_options(args)
    config = _simulate_config(args)
    out = config.output_dir
    done = results.read_summary(out)
    if done is not None:  # --resume of a finished run: nothing to do
        print(f"{out}: finished already (final accuracy {done.get('final_accuracy')}, "
              f"epsilon {done.get('epsilon')})")
        return 0
    preflight(config)  # unreadable data: an error now, no half-made run folder
    write_run_config(config)
    quiet_flower(args.verbose)
    try:
        with Progress(total=config.dp.rounds, done=len(results.read_rounds(out)),
                      title=config.describe(), enabled=not args.no_progress) as bar:
            summary = run_simulation(config, backend=args.backend, options=options,
                                     on_round=bar.update)
    except KeyboardInterrupt:
        interrupted(out)
    print_summary(summary, out)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """``fedmf audit``: one run with canaries; ``audit.json`` in ``--output``."""
    from . import results
    from .audit import run_audit

    options = _backend_options(args)
    if options.shards > 1:
        raise ValueError("shards: fedmf audit trains its canary grid in one process; "
                         "--shards > 1 is not supported by audit")
    out = Path(args.output).expanduser().resolve()
    config = _run_config(_given(args), noise_seed=args.noise_seed).replace(
        **{"output-dir": str(out)})
    n = config.dp.num_clients
    canaries = args.canaries if args.canaries is not None else min(500, n // 2)
    quiet_flower(args.verbose)
    try:
        with Progress(total=config.dp.rounds, done=0, title=f"audit {config.describe()}",
                      enabled=not args.no_progress) as bar:
            report = run_audit(config, canaries=canaries, held_out=args.held_out,
                               audit_seed=args.audit_seed, confidence=args.confidence,
                               backend=args.backend, options=options, on_round=bar.update)
    except KeyboardInterrupt:
        interrupted(out)
    print(audit_table(report))
    print(f"-> {out / 'audit.json'}; rounds and summary beside it "
          f"({results.SUMMARY_JSON})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``fedmf compare``: the grid, sequentially, skipping finished cells."""
    import dataclasses

    from . import results
    from .compare import grid_cells, run_grid
    from .runner import preflight, run_simulation

    options = dataclasses.replace(_backend_options(args), shutdown_ray=False)
    out = Path(args.output).expanduser().resolve()
    base = _run_config(_given(args), noise_seed=args.noise_seed)
    preflight(base)  # unreadable data: one error now, not one per cell
    schedules = args.schedules or [base.dp.schedule]
    seeds = args.seeds if args.seeds is not None else [base.dp.seed]
    cells, notes = grid_cells(base, mechanisms=args.mechanisms, epsilons=args.epsilons,
                              schedules=schedules, seeds=seeds, output=out)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    quiet_flower(args.verbose)
    started_here = False
    if args.backend == "ray" or options.shards > 1:
        import ray

        started_here = not ray.is_initialized()  # then Ray is shut down after the grid
    total = len(cells)
    index = {c.name: i for i, c in enumerate(cells, 1)}

    failed: list[str] = []

    def run_cell(cell: Any) -> dict[str, Any] | None:
        config = cell.config.absolute()
        write_run_config(config)
        title = f"[{index[cell.name]}/{total}] {cell.name}"
        try:
            with Progress(total=config.dp.rounds,
                          done=len(results.read_rounds(config.output_dir)), title=title,
                          enabled=not args.no_progress) as bar:
                summary = run_simulation(config, backend=args.backend, options=options,
                                         on_round=bar.update)
        except (ValueError, RuntimeError) as err:  # one cell failing does not stop the grid
            (config.output_dir / "error.txt").write_text(f"{err}\n", encoding="utf-8")
            print(f"{title}: FAILED: {err}", file=sys.stderr)
            failed.append(cell.name)
            return None
        print_summary(summary, config.output_dir)
        return summary

    def on_skip(cell: Any, summary: dict[str, Any]) -> None:
        print(f"[{index[cell.name]}/{total}] {cell.name}: finished, skipped")

    try:
        rows = run_grid(cells, output=out, run_cell=run_cell, on_skip=on_skip)
    except KeyboardInterrupt:
        interrupted(out)
    finally:
        if started_here:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    print(f"{len(rows)} finished cell(s) -> {out / 'results.csv'}")
    if failed:
        print(f"{len(failed)} cell(s) failed (see their error.txt): {', '.join(failed)}",
              file=sys.stderr)
    if not args.no_report and rows:
        return _report(out, errors=True)
    return 0


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"a:b,c:d"`` -> ``[("a", "b"), ("c", "d")]`` (mechanism or ``MECHANISM@SAMPLING``
    arm names checked)."""
    from fedmf.mechanisms import parse_arm

    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        mech, sep, base = item.partition(":")
        if not sep or not mech or not base:
            raise ValueError(f"pairs: expected MECHANISM:BASELINE, got {item!r}")
        for name in (mech, base):
            try:
                parse_arm(name)
            except ValueError as err:
                raise ValueError(f"pairs: {str(err).partition(': ')[2]}") from None
        pairs.append((mech, base))
    return pairs


def _report(directory: Path, *, errors: bool, pairs: Sequence[tuple[str, str]] = ()) -> int:
    from rich.console import Console
    from rich.table import Table

    from .plots import make_report

    report = make_report(directory, errors=errors, pairs=pairs)
    epsilons = sorted({r["epsilon"] for r in report.table})
    schedules = sorted({r["schedule"] for r in report.table})
    table = Table(title=f"final test accuracy (mean ± 95% CI over seeds): {directory}")
    table.add_column("mechanism")
    if len(schedules) > 1:
        table.add_column("schedule")
    for eps in epsilons:
        table.add_column("ε=inf" if math.isinf(eps) else f"ε={eps:g}", justify="right")
    mechs: list[str] = []
    for r in report.table:
        if r["mechanism"] not in mechs:
            mechs.append(r["mechanism"])
    for mech in mechs:
        for sched in schedules:
            cells = {r["epsilon"]: r for r in report.table
                     if r["mechanism"] == mech and r["schedule"] == sched}
            if not cells:
                continue
            row = [mech] + ([sched] if len(schedules) > 1 else [])
            table.add_row(*row, *[fmt_cell(cells.get(e)) for e in epsilons])
    console = Console()
    console.print(table)
    if report.paired:
        pt = Table(title="paired by seed: mechanism − baseline (points, mean ± 95% CI)")
        for col in ("mechanism", "baseline", "schedule", "ε", "difference", "wins"):
            pt.add_column(col, justify="left" if col in ("mechanism", "baseline") else "right")
        for r in report.paired:
            ci = "n/a" if math.isnan(r["ci95"]) else f"{r['ci95']:.2f}"
            pt.add_row(r["mechanism"], r["baseline"], r["schedule"], f"{r['epsilon']:g}",
                       f"{r['mean']:+.2f} ± {ci}", f"{r['wins']}/{r['n']}")
        console.print(pt)
    if report.errors:
        et = Table(title="factorization errors (fedmf)")
        for col in ("mechanism", "MaxSE", "MeanSE"):
            et.add_column(col, justify="left" if col == "mechanism" else "right")
        for label, e in report.errors.items():
            et.add_row(label, f"{e['max_error']:.4f}", f"{e['mean_error']:.4f}")
        console.print(et)
    for path in report.files:
        console.print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``fedmf report DIR``: tables, plots and report.md from the files in DIR."""
    directory = Path(args.directory).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"directory: {str(directory)!r} does not exist")
    return _report(directory, errors=not args.no_errors, pairs=parse_pairs(args.pairs))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
