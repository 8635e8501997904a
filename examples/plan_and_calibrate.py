"""Size an experiment before training: ``fedmf calibrate`` and ``fedmf plan`` from Python.

A round's mean of ``m`` clipped updates (norm <= clip) receives Gaussian noise of norm about
``z·clip·√d/m`` (``d`` parameters, ``z`` the noise multiplier for the target (ε, δ)). That
number, against the largest possible signal ``clip``, decides whether anything can be learned,
so pick ``d`` (the model) and ``m`` (clients per round) from it first. For a correlated
mechanism one round's noise is ``noise/round·clip·√d/m`` (``plan``'s column), and the error the
whole run feels is ``RMS noise`` (MeanSE·z/sens): weigh both.

The defaults are the README's CIFAR-10 study (ScatterNet features + linear head, d = 38,890;
1,000 clients, 250 per round in b = 4 cohorts, 80 rounds, server momentum 0.9, clip 3), so the
printed numbers reproduce its sizing table (z = 16.68 / 8.917 / 4.835 / 2.684 for dp-fedavg at
ε = 1 / 2 / 4 / 8). It uses the same flags as ``fedmf simulate`` (``--mechanism``,
``--server-momentum``, ``--clients``, ``--clients-per-round``) and ends with the ``fedmf
simulate`` command that would train ``--mechanism`` in that setting (printed, not run).

Run: ``python examples/plan_and_calibrate.py [--params 38890] [--clip 3] [--epsilon 8]``
(about 10 s; ``blt`` and ``opt-bisr`` take longer, add them with ``--methods``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from fedmf.cli import main as fedmf_main


def fedmf_json(argv: list[str]) -> Any:
    """Run ``fedmf <argv> --json`` in this process and parse what it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fedmf_main([*argv, "--json"])
    if rc != 0:
        raise SystemExit(f"fedmf {' '.join(argv)} failed with exit code {rc}")
    return json.loads(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    """Print the noise arithmetic for dp-fedavg at several ε, then compare mechanisms."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=38_890, help="d: trainable parameters")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--clients-per-round", type=int, default=250, help="m")
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--clip", type=float, default=3.0, help="clip norm")
    p.add_argument("--server-momentum", type=float, default=0.9)
    p.add_argument("--bands", type=int, default=4)
    p.add_argument("--epsilon", type=float, default=8.0, help="target of the comparison")
    p.add_argument("--epsilons", default="1,2,4,8", help="targets of the sizing table")
    p.add_argument("--methods", default="identity,bsr,bisr,bandmf")
    p.add_argument("--mechanism", default="bsr", help="the one to train in step 3")
    args = p.parse_args(argv)

    d, m, clip = args.params, args.clients_per_round, args.clip
    unit = clip * math.sqrt(d) / m  # the noise norm per unit noise multiplier
    setting = ["--workload", "sgd", "--schedule", "constant",
               "--server-momentum", str(args.server_momentum), "--rounds", str(args.rounds),
               "--clients", str(args.clients), "--clients-per-round", str(m)]

    # 1. calibrate: dp-fedavg's noise multiplier z at each target, and the noise it puts on
    #    one round's mean (cyclic cohorts b = clients // m, k = ceil(rounds / b) rounds each)
    print(f"model d = {d:,}, m = {m} clients per round, clip = {clip}: "
          f"clip·√d/m = {unit:.3g}")
    print("1. calibrate: dp-fedavg (independent noise), one round's noise norm z·clip·√d/m")
    for eps in (float(e) for e in args.epsilons.split(",")):
        cal = fedmf_json(["calibrate", *setting, "--mechanism", "dp-fedavg",
                          "--epsilon", str(eps)])
        z = cal["noise_multiplier"]
        print(f"   eps={eps:g}: z = {z:.4g}, z·√d/m = {z * math.sqrt(d) / m:.3g}, "
              f"noise norm = {z * unit:.3g} (signal <= clip = {clip:g})")

    # 2. plan: every method at the same (ε, δ); noise/round and RMS noise in clip·√d/m units
    plan = fedmf_json(["plan", *setting, "--bands", str(args.bands),
                       "--epsilon", str(args.epsilon), "--methods", args.methods])
    print(f"2. plan at eps={args.epsilon:g}: one round's noise norm (noise/round·clip·√d/m) "
          "and RMS = MeanSE·z/sens (the whole run's model noise, plan's column)")
    rows = plan["methods"] if isinstance(plan, dict) else plan
    for row in rows:
        print(f"   {row['method']:>9}: z = {row['noise_multiplier']:7.4g}, "
              f"one round's noise norm = {row['round_noise'] * unit:7.3g}, "
              f"RMS = {row['rms_model_noise']:7.3g}, "
              f"noise state = {row['noise_floats_per_param']} floats/param")
    print("   (rank by RMS only among methods with comparable noise/round: a large "
          "noise/round can stall training)")

    # 3. the run that trains it (not started here: it needs the data)
    print("3. train it:")
    print(f"   fedmf simulate --dataset cifar10 --model scatter-linear --mechanism "
          f"{args.mechanism} --epsilon {args.epsilon:g} --rounds {args.rounds} --clients "
          f"{args.clients} --clients-per-round {m} --clip-norm {clip:g} --server-momentum "
          f"{args.server_momentum:g} --bands {args.bands} --backend vectorized")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
