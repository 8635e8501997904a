"""Grids of simulations: ``fedmf compare`` (mechanisms x epsilons x schedules x seeds).

A mechanism may name its sampling, ``MECHANISM@SAMPLING`` (``dp-fedavg@poisson``,
``bsr@balls-in-bins``; plain ``bsr`` is ``cyclic``): such an *arm* is a row of its own in every
table, so amplified and un-amplified arms compare in one grid.

Every cell runs sequentially in ``DIR/<arm>_eps<e>_<schedule>_seed<s>/`` with its own
private checkpoint (outside ``DIR``: ``simulations.results.default_checkpoint_dir``); a cell
with a ``summary.json`` is finished and skipped, and an interrupted cell resumes from its
checkpoint, so re-running the same command continues a partly finished grid.  Every DP
mechanism is calibrated by the strategy to the same ``(epsilon, delta)`` under the same
participation pattern (cohorts ``min-sep`` and ``k = ceil(rounds / min-sep)``); the non-private
``fedavg`` baseline does not depend on epsilon and runs once per (schedule, seed) as
``fedavg_epsinf_<schedule>_seed<s>``.

After each cell ``DIR/results.csv`` is rewritten; at the end the report (plots, table,
``report.md``) is generated (:mod:`simulations.plots`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmf.mechanisms import MAX_OPTIMAL_ROUNDS, parse_arm
from fedmf.mechanisms import MECHANISMS as _REGISTRY

from . import results
from .config import RunConfig

__all__ = ["MECHANISMS", "Cell", "grid_cells", "run_grid"]

MECHANISMS = tuple(_REGISTRY)


@dataclass(frozen=True)
class Cell:
    """One grid cell: its directory name and complete configuration."""

    name: str
    mechanism: str
    epsilon: float
    schedule: str
    seed: int
    config: RunConfig


def grid_cells(base: RunConfig, *, mechanisms: Sequence[str], epsilons: Sequence[float],
               schedules: Sequence[str], seeds: Sequence[int], output: str | Path
               ) -> tuple[list[Cell], list[str]]:
    """The grid's cells (validated, in run order) and notes about skipped combinations.

    Raises ``ValueError`` naming the key for an invalid mechanism or configuration.
    """
    out = Path(output)
    for m in mechanisms:
        parse_arm(m)  # raises naming "mechanisms"
    for e in epsilons:
        if not (math.isfinite(e) and e > 0):
            raise ValueError(f"epsilons must be finite and > 0, got {e!r}")
    if not (mechanisms and epsilons and schedules and seeds):
        raise ValueError("mechanisms, epsilons, schedules and seeds must be non-empty")
    cells: list[Cell] = []
    notes: list[str] = []
    seen: set[str] = set()
    rounds = base.dp.rounds
    for arm, epsilon, schedule, seed in itertools.product(mechanisms, epsilons,
                                                          schedules, seeds):
        mechanism, sampling = parse_arm(arm)
        if mechanism == "optimal" and rounds > MAX_OPTIMAL_ROUNDS:
            note = (f"optimal skipped: rounds={rounds} > {MAX_OPTIMAL_ROUNDS} "
                    "(dense optimisation)")
            if note not in notes:
                notes.append(note)
            continue
        private = _REGISTRY[mechanism].private
        eps = float(epsilon) if private else math.inf
        name = (results.cell_name(mechanism=arm, epsilon=eps, schedule=schedule,
                                  seed=seed) if private
                else f"{arm}_epsinf_{schedule}_seed{int(seed)}")
        if name in seen:
            continue
        seen.add(name)
        changes: dict[str, Any] = {
            "mechanism": mechanism, "sampling": sampling, "schedule": schedule,
            "seed": int(seed),
            "output-dir": str(out / name),
            "checkpoint-dir": str(results.default_checkpoint_dir(out / name))}
        if private:
            changes["epsilon"] = eps
        cells.append(Cell(name, arm, eps, schedule, int(seed), base.replace(**changes)))
    return cells, notes


def run_grid(cells: Sequence[Cell], *, output: str | Path,
             run_cell: Callable[[Cell], dict[str, Any] | None],
             on_skip: Callable[[Cell, dict[str, Any]], None] | None = None,
             ) -> list[dict[str, Any]]:
    """Run the unfinished ``cells`` with ``run_cell`` in order (it returns ``None`` for a
    failed cell); rewrite ``results.csv`` after each; return the rows of all finished cells."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        summary = results.read_summary(out / cell.name)
        if summary is not None:
            if on_skip is not None:
                on_skip(cell, summary)
            continue
        run_cell(cell)
        results.write_results_csv(results.collect_results(out), out / results.RESULTS_CSV)
    rows = results.collect_results(out)
    results.write_results_csv(rows, out / results.RESULTS_CSV)
    return rows
