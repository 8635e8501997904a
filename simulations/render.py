"""What the ``fedmf`` simulation commands show on the terminal: the demo's table and verdicts,
the audit table, a run's one-line summary, report cells, the progress bar over rounds, and
the filter that keeps Flower's logs quiet.

Text is returned (or printed) exactly as the commands of :mod:`simulations.cli` show it;
nothing here reads or writes run folders.  ``rich`` is imported only when a bar is shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Progress", "audit_table", "demo_table", "fmt_cell", "print_summary",
           "quiet_flower", "verdict"]


def demo_table(table: Sequence[dict[str, Any]], *, epsilon: float) -> str:
    """The main job's table: final test accuracy, mean ± std over seeds."""
    lines = [f"{'mechanism':<18} {'epsilon':>8} {'final test accuracy':>26}"]
    for row in table:
        if row["epsilon"] not in (epsilon, math.inf):
            continue
        eps = "inf" if math.isinf(row["epsilon"]) else f"{row['epsilon']:g}"
        lines.append(f"{row['mechanism']:<18} {eps:>8} "
                     f"{row['mean']:>13.4f} ± {row['std']:.4f} (n={row['n']})")
    return "\n".join(lines)


def verdict(row: dict[str, Any] | None, *, mechanism: str, epsilon: float,
            baseline: str = "dp-fedavg") -> str:
    """One line the numbers support: the paired difference to ``baseline`` and whether its
    95% confidence interval excludes zero."""
    if row is None or row["n"] == 0:
        return f"verdict: no paired runs of {mechanism} and {baseline} at ε = {epsilon:g}"
    d, sd, ci, n = row["mean"], row["std"], row["ci95"], row["n"]
    if n < 2 or math.isnan(ci):
        return (f"verdict: {mechanism} vs {baseline} at ε = {epsilon:g}: {d:+.1f} points "
                f"({n} seed: no interval)")
    interval = f"95% CI [{d - ci:+.1f}, {d + ci:+.1f}]"
    if d - ci > 0:
        return (f"verdict: {mechanism} beats {baseline} by {d:.1f} ± {sd:.1f} points at "
                f"ε = {epsilon:g} (paired over {n} seeds, ahead in {row['wins']}; {interval})")
    if d + ci < 0:
        return (f"verdict: {baseline} beats {mechanism} by {-d:.1f} ± {sd:.1f} points at "
                f"ε = {epsilon:g} (paired over {n} seeds; {interval})")
    return (f"verdict: {mechanism} vs {baseline} at ε = {epsilon:g}: {d:+.1f} ± {sd:.1f} "
            f"points, not significant over {n} seeds ({interval} includes 0)")


def audit_table(report: dict[str, Any]) -> str:
    """The audit's result as a small text table (claimed epsilon beside both numbers)."""
    claimed = report.get("claimed_epsilon")
    can = report["canaries"]
    lines = [f"audit of {report.get('arm')}: {can['inserted']} canaries inserted, "
             f"{can['held_out']} held out, dimension {can['dimension']}, delta "
             f"{report['delta']:g}; claimed epsilon "
             f"{'inf' if claimed is None else format(claimed, '.4g')}",
             f"{'threat model':<14} {'one-shot estimate':>18} {'lower bound':>12} {'conf.':>6}"]
    for threat in ("final_model", "every_round"):
        est, lb = report[threat]["one_shot"], report[threat]["lower_bound"]
        e = est.get("epsilon")
        lines.append(f"{threat:<14} {'inf' if e is None else format(e, '.3g'):>18} "
                     f"{lb['epsilon']:>12.3g} {lb['confidence']:>6.2f}")
    lines.append("one-shot: Andrew et al.'s estimate (not a bound); lower bound: "
                 "Clopper-Pearson, a claim is refuted only if it lies above the claimed epsilon")
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """Print a finished run's one line: arm, final accuracy, epsilon (delta), failures (or
    'not released' where the per-round counts are private), wall time and folder."""
    eps = summary.get("epsilon")
    acc = summary.get("final_accuracy")
    arm = str(summary.get("mechanism"))
    if summary.get("sampling") not in (None, "cyclic"):
        arm += f"@{summary['sampling']}"
    failures = summary.get("failures")
    # under secret sampling the per-round counts are kept private (not released by default)
    shown = "not released" if failures is None else failures
    print(f"{arm}: final accuracy "
          f"{'-' if acc is None else format(acc, '.4f')}, epsilon "
          f"{'inf' if eps is None else format(eps, '.4g')} (delta {summary.get('delta')}), "
          f"failures {shown}, {summary.get('wall_seconds')} s -> {out}")


def fmt_cell(row: dict[str, Any] | None) -> str:
    """One cell of the report's accuracy table: ``mean ± ci95 (n=...)``, empty without runs."""
    if row is None or row["n"] == 0:
        return ""
    ci = "n/a" if math.isnan(row["ci95"]) else f"{row['ci95']:.4f}"
    return f"{row['mean']:.4f} ± {ci} (n={row['n']})"


class _DropNoise:
    """Logging filter dropping Flower's notices that do not concern fedmf users."""

    NOISE = ("DEPRECATED FEATURE: The `run_simulation`", "fraction_evaluate is set to 0.0")

    def filter(self, record: Any) -> bool:
        message = str(record.getMessage())
        return not any(n in message for n in self.NOISE)


def quiet_flower(verbose: bool) -> None:
    """Hide Flower's INFO logs (the progress bar shows the rounds) unless verbose."""
    import logging
    import warnings

    logger = logging.getLogger("flwr")
    logger.propagate = False  # Flower has its own console handler
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
    if not verbose:
        logger.setLevel(logging.WARNING)


class Progress:
    """A rich progress bar over rounds showing accuracy and epsilon spent (on stderr; a
    context manager; nothing is shown, and ``rich`` not imported, unless ``enabled``)."""

    def __init__(self, *, total: int, done: int, title: str, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("acc {task.fields[acc]}"), TextColumn("eps {task.fields[eps]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self._task = self._progress.add_task(title, total=total, completed=done,
                                             acc="-", eps="-")

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, record: dict[str, Any]) -> None:
        """Advance to ``record``'s round and show its accuracy and epsilon spent."""
        if self._progress is None:
            return
        acc = record.get("accuracy")
        eps = record.get("epsilon_spent")
        fields = {"completed": int(record["round"])}
        if acc is not None:
            fields["acc"] = f"{acc:.4f}"
        fields["eps"] = "inf" if eps is None else f"{eps:.3g}"
        self._progress.update(self._task, **fields)
