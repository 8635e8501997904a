"""Benchmark of amplification-by-sampling accounting (fedmf.amplification).

Part 1 (default): Monte Carlo calibration of balls-in-bins sampling on the workload of
``fedmf plan --workload sgd --schedule constant --momentum 0.9`` (delta 1e-5): ``n = 80``,
``b = 4`` (target under 60 s per calibration) and ``n = 1000``, ``b = 10`` (target under
10 min), for ``dp-fedavg`` (identity) and ``bsr`` with ``bands = b``.  Prints the sample count,
the formal delta (``delta_upper``: KL upper confidence bound + beta) and the plain estimate at the
certified epsilon, the amplified ``z`` against the un-amplified one, the ``z`` at which the plain
estimate on the pilot samples meets delta (what an estimate without a formal guarantee would
give; the formal ``z`` is above it) and the seconds.

Part 2 (``--table``): the ``z`` table at ``n = 80``, ``b = 4``: cyclic (un-amplified) against
balls-in-bins for identity and bsr, Poisson (``q = 250 / 1000``) for identity and cyclic Poisson
(``q = 125 * 4 / 1000``) for bsr, at eps 1, 2, 4, 8.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/amplification.py
    OMP_NUM_THREADS=1 python benchmarks/amplification.py --table --skip-mc
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmf import amplification as amp
from fedmf.accounting import calibrate_noise_multiplier
from fedmf.factorizations import Factorization
from fedmf.mechanisms import MechanismSpec, cohort_participation
from fedmf.participation import Participation

DELTA = 1e-5


def _fact(method: str, n: int, b: int, *, poisson: bool = False) -> Factorization:
    part = (Participation.min_separation(min_sep=1, max_participations=n) if poisson
            else cohort_participation(rounds=n, min_sep=b))
    return MechanismSpec(method=method, rounds=n, schedule="constant", momentum=0.9,
                         participation=part,
                         bands=b if method == "bsr" else None).factorization()


def _plain_z(gram, eps: float, samples: int, seed: int, start: float) -> float:
    """``z`` where the plain estimate on the pilot samples equals delta (no guarantee)."""
    G = amp._gram(gram)
    F = amp._factor(G)

    def log_est(x: float):
        mom = amp._moments(G, F, math.exp(x), eps, samples=samples, seed=seed, stream=0)
        return math.log(max(float(mom[:, 0].max()), 1e-300)), mom

    return math.exp(amp._pilot_root(log_est, math.log(DELTA), math.log(start), 0.05, 1e-3)[2])


def monte_carlo(samples: int, seed: int, settings: list[tuple[int, int]]) -> None:
    print(f"balls-in-bins Monte Carlo calibration, delta={DELTA:g}, samples={samples:,} per "
          f"pass, seed={seed}")
    print(f"{'n':>5} {'b':>3} {'method':>8} {'eps':>4} {'z cyclic':>9} {'z ampl.':>9} "
          f"{'z plain':>9} {'formal/plain':>12} {'eps cert.':>9} {'delta_upper':>11} "
          f"{'estimate':>9} {'dir':>6} {'checks':>6} {'seconds':>8}")
    for n, b in settings:
        for method in ("identity", "bsr"):
            fact = _fact(method, n, b)
            acc = amp.amplified_accountant(sampling="balls-in-bins", factorization=fact,
                                           samples=samples, seed=seed)
            sens = float(fact.sensitivity.value)
            for eps in (1.0, 8.0):
                z_un = calibrate_noise_multiplier(epsilon=eps, delta=DELTA, sensitivity=sens)
                t0 = time.perf_counter()
                res = acc.calibrate(epsilon=eps, delta=DELTA).monte_carlo
                seconds = time.perf_counter() - t0
                assert res is not None
                z_plain = _plain_z(acc.gram(), eps, res.samples, seed, res.noise_multiplier)
                print(f"{n:>5} {b:>3} {method:>8} {eps:>4g} {z_un:>9.4f} "
                      f"{res.noise_multiplier:>9.4f} {z_plain:>9.4f} "
                      f"{res.noise_multiplier / z_plain:>12.4f} {res.epsilon:>9.4f} "
                      f"{res.delta_upper:>11.3e} {res.delta_estimate:>9.2e} "
                      f"{res.direction:>6} {res.checks:>6} {seconds:>8.1f}", flush=True)


def table(samples: int, seed: int) -> None:
    n, b = 80, 4
    print(f"\nz table, n={n}, b={b}, sgd constant momentum 0.9, delta={DELTA:g} "
          "(ledger: min of amplified and un-amplified)")
    print(f"{'eps':>4} {'id cyclic':>10} {'id b-i-b':>9} {'id poisson':>10} "
          f"{'bsr cyclic':>10} {'bsr b-i-b':>9} {'bsr cyc-P':>9}")
    fid, fbsr = _fact("identity", n, b), _fact("bsr", n, b)
    fpoi = _fact("identity", n, b, poisson=True)
    a_id = amp.amplified_accountant(sampling="balls-in-bins", factorization=fid,
                                    samples=samples, seed=seed)
    a_bsr = amp.amplified_accountant(sampling="balls-in-bins", factorization=fbsr,
                                     samples=samples, seed=seed)
    a_poi = amp.amplified_accountant(sampling="poisson", factorization=fpoi,
                                     clients_per_round=250, num_clients=1000)
    a_cp = amp.amplified_accountant(sampling="cyclic-poisson", factorization=fbsr,
                                    clients_per_round=125, num_clients=1000)
    for eps in (1.0, 2.0, 4.0, 8.0):
        t0 = time.perf_counter()
        cells = [
            calibrate_noise_multiplier(epsilon=eps, delta=DELTA,
                                       sensitivity=float(fid.sensitivity.value)),
            a_id.calibrate(epsilon=eps, delta=DELTA).noise_multiplier,
            a_poi.calibrate(epsilon=eps, delta=DELTA).noise_multiplier,
            calibrate_noise_multiplier(epsilon=eps, delta=DELTA,
                                       sensitivity=float(fbsr.sensitivity.value)),
            a_bsr.calibrate(epsilon=eps, delta=DELTA).noise_multiplier,
            a_cp.calibrate(epsilon=eps, delta=DELTA).noise_multiplier,
        ]
        print(f"{eps:>4g} " + " ".join(f"{c:>9.4f} " for c in cells)
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=amp.DEFAULT_SAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="also the z table (part 2)")
    parser.add_argument("--skip-mc", action="store_true", help="skip part 1")
    parser.add_argument("--no-large", action="store_true", help="skip n = 1000")
    args = parser.parse_args()
    if not args.skip_mc:
        settings = [(80, 4)] + ([] if args.no_large else [(1000, 10)])
        monte_carlo(args.samples, args.seed, settings)
    if args.table:
        table(args.samples, args.seed)


if __name__ == "__main__":
    main()
