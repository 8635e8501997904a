"""Plots and the report of a run or a grid (matplotlib, Agg backend, PNG files).

``make_report(DIR)`` reads only files (``*/summary.json``, ``*/rounds.jsonl``) and writes

* ``DIR/results.csv`` -- one row per finished run,
* ``DIR/plots/accuracy_vs_round.png`` -- test accuracy per round, one panel per
  (epsilon, schedule), one line per mechanism: mean over seeds with a +-1 std band,
* ``DIR/plots/final_accuracy_vs_epsilon.png`` -- final accuracy (mean +- std over seeds)
  against the target epsilon per mechanism (the non-private ``fedavg`` as a dashed line),
* ``DIR/plots/factorization_errors.png`` -- MaxSE and MeanSE bars per mechanism, computed
  with ``fedmf`` for each run's workload (server schedule, momentum) and participation
  (cyclic cohorts); ``dp-fedavg`` is the identity factorization (independent noise).
  Values are cached in ``DIR/plots/factorization_errors.json``,
* ``DIR/summary_table.csv`` -- final accuracy per (mechanism, schedule, epsilon): n, mean,
  std and the half-width of the 95% confidence interval of the mean (Student t),
* ``DIR/paired_differences.csv`` -- per (mechanism, schedule, epsilon) the difference in
  points to ``dp-fedavg`` of runs paired by seed (mean, std, 95% CI, wins),
* ``DIR/report.md`` -- the table mechanism x epsilon of final accuracy (mean +- 95% CI,
  n seeds), the paired differences and the errors.

``DIR`` may be a grid directory (cells in subdirectories) or a single run directory.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmf.mechanisms import MECHANISMS, arm_label

from . import results

__all__ = [
    "Report",
    "RunData",
    "accuracy_table",
    "ci95",
    "factorization_errors",
    "load_runs",
    "make_report",
    "paired_differences",
    "plot_accuracy_vs_round",
    "plot_factorization_errors",
    "plot_final_vs_epsilon",
]

PLOTS_DIR = "plots"
REPORT_MD = "report.md"
ERRORS_JSON = "factorization_errors.json"
SUMMARY_TABLE_CSV = "summary_table.csv"
PAIRED_CSV = "paired_differences.csv"
ORDER = tuple(MECHANISMS)


@dataclass
class RunData:
    """A finished run: its directory name, summary and rounds."""

    name: str
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """The run config stored in the summary."""
        return dict(self.summary.get("config") or {})

    @property
    def base_mechanism(self) -> str:
        """Mechanism name (without the sampling)."""
        return str(self.summary.get("mechanism") or self.config.get("mechanism"))

    @property
    def sampling(self) -> str:
        """Sampling mode (``cyclic`` for runs before sampling modes existed)."""
        return str(self.summary.get("sampling") or self.config.get("sampling") or "cyclic")

    @property
    def mechanism(self) -> str:
        """The arm: mechanism name, ``@sampling`` appended unless cyclic
        (:func:`fedmf.mechanisms.arm_label`)."""
        return arm_label(self.base_mechanism, self.sampling)

    @property
    def epsilon_target(self) -> float:
        """The configured epsilon (``inf`` for the non-private baseline)."""
        if self.base_mechanism == "fedavg":
            return math.inf
        if float(self.config.get("noise-multiplier", 0.0) or 0.0) > 0:
            eps = self.summary.get("epsilon")
            return float(eps) if eps is not None else math.inf
        return float(self.config.get("epsilon", math.nan))

    @property
    def schedule(self) -> str:
        """Server learning-rate schedule."""
        return str(self.summary.get("schedule") or self.config.get("schedule"))

    @property
    def final_accuracy(self) -> float | None:
        """Final test accuracy (``None`` when never evaluated)."""
        value = self.summary.get("final_accuracy")
        return None if value is None else float(value)


@dataclass
class Report:
    """What :func:`make_report` produced."""

    runs: list[RunData]
    table: list[dict[str, Any]]
    errors: dict[str, dict[str, float]]
    files: list[Path]
    paired: list[dict[str, Any]] = field(default_factory=list)


def _order(arm: str) -> tuple[int, str]:
    base = arm.partition("@")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), arm)


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def load_runs(directory: str | Path) -> list[RunData]:
    """Finished runs of a grid directory (cells in subdirectories) or a run directory."""
    root = Path(directory)
    own = results.read_summary(root)
    if own is not None:
        return [RunData(root.name, own, results.read_rounds(root))]
    runs = []
    if root.is_dir():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            summary = results.read_summary(sub)
            if summary is not None:
                runs.append(RunData(sub.name, summary, results.read_rounds(sub)))
    return runs


#: Run-config keys that may differ between the seeds of one table cell.
_PER_RUN_KEYS = ("seed", "output-dir", "checkpoint-dir", "min-clients",
                 "participation-timeout")


def check_poolable(runs: Sequence[RunData]) -> None:
    """Refuse to pool runs into one (arm, schedule, epsilon) cell unless they differ only in
    their seed: a ``ValueError`` names the runs and the keys (or the repeated seed)."""
    cells: dict[tuple[str, str, float], list[RunData]] = {}
    for run in runs:
        cells.setdefault((run.mechanism, run.schedule, run.epsilon_target), []).append(run)
    for (arm, sched, eps), group in cells.items():
        first = group[0]
        ref = {k: v for k, v in first.config.items() if k not in _PER_RUN_KEYS}
        seen: dict[int, str] = {}
        for run in group:
            seed = int(run.config.get("seed", 0))
            if seed in seen:
                raise ValueError(
                    f"directory: runs {seen[seed]!r} and {run.name!r} are both {arm} "
                    f"({sched}, epsilon {_eps_label(eps)}) with seed {seed}; a table cell pools "
                    "distinct seeds of one configuration: report them from separate folders")
            seen[seed] = run.name
            mine = {k: v for k, v in run.config.items() if k not in _PER_RUN_KEYS}
            diff = sorted(k for k in ref.keys() | mine.keys() if ref.get(k) != mine.get(k))
            if diff:
                shown = ", ".join(f"{k} ({ref.get(k)!r} vs {mine.get(k)!r})" for k in diff[:4])
                raise ValueError(
                    f"directory: runs {first.name!r} and {run.name!r} are both {arm} ({sched}, "
                    f"epsilon {_eps_label(eps)}) but differ in {shown}"
                    f"{' ...' if len(diff) > 4 else ''}; a table cell pools seeds of one "
                    "configuration: report them from separate folders")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t; ``nan`` for n < 2)."""
    if len(values) < 2:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values)
                 / math.sqrt(len(values)))


def _summary(values: Sequence[float]) -> dict[str, Any]:
    mean, std = _mean_std(values) if values else (math.nan, math.nan)
    return {"mean": mean, "std": std, "ci95": ci95(values), "n": len(values)}


def accuracy_table(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Rows ``mechanism, schedule, epsilon, mean, std, ci95, n`` (final accuracy over
    seeds; ``ci95`` the half-width of the 95% confidence interval of the mean)."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for run in runs:
        acc = run.final_accuracy
        key = (run.mechanism, run.schedule, run.epsilon_target)
        groups.setdefault(key, [])
        if acc is not None:
            groups[key].append(acc)
    rows = []
    for (mech, sched, eps), accs in sorted(
            groups.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1], kv[0][2])):
        rows.append({"mechanism": mech, "schedule": sched, "epsilon": eps, **_summary(accs)})
    return rows


def paired_differences(runs: Sequence[RunData], *, baseline: str = "dp-fedavg"
                       ) -> list[dict[str, Any]]:
    """Per (mechanism, schedule, epsilon): the final-accuracy differences to ``baseline`` of
    runs paired by seed (same data partition, cohorts and initial model), in points:
    ``mean, std, ci95, n, wins`` (seeds where the mechanism is ahead)."""
    by_key = {(r.mechanism, r.schedule, r.epsilon_target, int(r.config.get("seed", 0))):
              r.final_accuracy for r in runs if r.final_accuracy is not None}
    groups: dict[tuple[str, str, float], list[float]] = {}
    for (mech, sched, eps, seed), acc in by_key.items():
        # a non-private baseline (fedavg, epsilon inf) pairs with every epsilon: the cost of
        # privacy
        ref = by_key.get((baseline, sched, eps, seed), by_key.get((baseline, sched, math.inf,
                                                                   seed)))
        if mech == baseline or ref is None or math.isinf(eps):
            continue
        groups.setdefault((mech, sched, eps), []).append(100.0 * (acc - ref))
    return [{"mechanism": m, "baseline": baseline, "schedule": s, "epsilon": e,
             **_summary(d), "wins": sum(x > 0 for x in d)}
            for (m, s, e), d in sorted(groups.items(),
                                       key=lambda kv: (_order(kv[0][0]), kv[0][1], kv[0][2]))]


# ------------------------------------------------------------------------------ plotting
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")


def _colors(mechanisms: Sequence[str]) -> dict[str, Any]:
    """A colour per mechanism, stable across plots (registry order)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if len(set(mechanisms)) > 10 else "tab10")
    n = 20 if len(set(mechanisms)) > 10 else 10
    return {m: cmap(i % n) for i, m in enumerate(sorted(set(mechanisms), key=_order))}


def plot_accuracy_vs_round(runs: Sequence[RunData], path: str | Path) -> Path:
    """Accuracy vs round: a panel per (epsilon, schedule); mean over seeds +- std band.

    The non-private ``fedavg`` runs are drawn in every panel of their schedule.
    """
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    panels = sorted({(r.epsilon_target, r.schedule) for r in runs if r.mechanism != "fedavg"})
    if not panels:
        panels = sorted({(r.epsilon_target, r.schedule) for r in runs})
    colors = _colors([r.mechanism for r in runs])
    ncols = min(3, max(1, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (eps, sched) in zip(axes.flat, panels, strict=False):
        members = [r for r in runs if r.schedule == sched
                   and (r.epsilon_target == eps or r.mechanism == "fedavg")]
        for mech in sorted({r.mechanism for r in members}, key=_order):
            curves: dict[int, list[float]] = {}
            for run in (r for r in members if r.mechanism == mech):
                for rec in run.rounds:
                    if rec.get("accuracy") is not None:
                        curves.setdefault(int(rec["round"]), []).append(float(rec["accuracy"]))
            if not curves:
                continue
            xs = np.array(sorted(curves))
            mean = np.array([statistics.fmean(curves[x]) for x in xs])
            std = np.array([statistics.stdev(curves[x]) if len(curves[x]) > 1 else 0.0
                            for x in xs])
            style = "--" if mech == "fedavg" else "-"
            ax.plot(xs, mean, style, color=colors[mech], label=mech, lw=1.5)
            ax.fill_between(xs, mean - std, mean + std, color=colors[mech], alpha=0.2, lw=0)
        ax.set_title(f"epsilon={_eps_label(eps)}, schedule={sched}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(plt, fig, path)


def _epsilon_axis(ax: Any, epsilons: Sequence[float]) -> None:
    """Log x axis with a plain tick at every epsilon of the grid."""
    from matplotlib.ticker import NullFormatter

    finite = sorted({e for e in epsilons if math.isfinite(e) and e > 0})
    if finite and finite[-1] / finite[0] >= 4:
        ax.set_xscale("log")
        ax.set_xticks(finite)
        ax.set_xticklabels([f"{e:g}" for e in finite])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epsilon (target)")
    ax.grid(alpha=0.3)


def _jitter(i: int, count: int) -> float:
    """A multiplicative x offset that keeps overlapping error bars apart on a log axis."""
    return float(1.0 + 0.025 * (i - (count - 1) / 2))


def _legend(axes: Sequence[Any], **kwargs: Any) -> None:
    """One legend (on the last panel) with every panel's lines, once each."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    axes[-1].legend(list(seen.values()), list(seen), fontsize=7, ncol=2, **kwargs)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_ci_line(ax: Any, rows: Sequence[Mapping[str, Any]], *, index: int, count: int,
                  color: Any, label: str) -> None:
    """Mean ± 95% CI against epsilon (jittered by ``index`` of ``count`` so bars don't overlap)."""
    ax.errorbar([r["epsilon"] * _jitter(index, count) for r in rows], [r["mean"] for r in rows],
                yerr=[0.0 if math.isnan(r["ci95"]) else r["ci95"] for r in rows],
                marker=_MARKERS[index % len(_MARKERS)], ms=4, capsize=2, lw=1.2, color=color,
                label=label)


def _schedule_panels(plt: Any, schedules: Sequence[str]) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, len(schedules), figsize=(5.6 * len(schedules), 4.6),
                             sharey=True, squeeze=False)
    return fig, list(axes[0])


def plot_final_vs_epsilon(runs: Sequence[RunData], path: str | Path) -> Path:
    """Final accuracy (mean ± 95% CI over seeds) vs target epsilon: a panel per server
    schedule, a line per mechanism, non-private FedAvg dashed."""
    plt = _pyplot()
    path = Path(path)
    table = accuracy_table(runs)
    mechs = sorted({r["mechanism"] for r in table}, key=_order)
    colors = _colors(mechs)
    schedules = sorted({r["schedule"] for r in table})
    fig, axes = _schedule_panels(plt, schedules)
    for ax, sched in zip(axes, schedules, strict=True):
        for i, mech in enumerate(mechs):
            rows = [r for r in table if r["mechanism"] == mech and r["schedule"] == sched
                    and r["n"] > 0]
            if not rows:
                continue
            if mech == "fedavg" or all(math.isinf(r["epsilon"]) for r in rows):
                ax.axhline(rows[0]["mean"], ls="--", color=colors[mech], label=mech)
                continue
            rows = sorted((r for r in rows if math.isfinite(r["epsilon"])),
                          key=lambda r: r["epsilon"])
            _mean_ci_line(ax, rows, index=i, count=len(mechs), color=colors[mech], label=mech)
        _epsilon_axis(ax, [r["epsilon"] for r in table])
        ax.set_title(f"server schedule: {sched}", fontsize=10)
    axes[0].set_ylabel("final test accuracy (mean ± 95% CI)")
    _legend(axes, loc="lower right")
    return _save(plt, fig, path)


def plot_differences_vs_epsilon(paired: Sequence[Mapping[str, Any]], path: str | Path, *,
                                baseline: str = "dp-fedavg") -> Path:
    """Paired difference to ``baseline`` (points, mean ± 95% CI over seeds) vs epsilon: a
    panel per server schedule, a line per mechanism."""
    plt = _pyplot()
    path = Path(path)
    rows = [r for r in paired if r["baseline"] == baseline]
    mechs = sorted({r["mechanism"] for r in rows}, key=_order)
    colors = _colors(["fedavg", "dp-fedavg", *mechs])
    schedules = sorted({r["schedule"] for r in rows})
    fig, axes = _schedule_panels(plt, schedules)
    for ax, sched in zip(axes, schedules, strict=True):
        ax.axhline(0.0, color="black", lw=0.8)
        for i, mech in enumerate(mechs):
            pts = sorted((r for r in rows if r["mechanism"] == mech and r["schedule"] == sched),
                         key=lambda r: r["epsilon"])
            if not pts:
                continue
            _mean_ci_line(ax, pts, index=i, count=len(mechs), color=colors[mech], label=mech)
        _epsilon_axis(ax, [r["epsilon"] for r in rows])
        ax.set_title(f"server schedule: {sched}", fontsize=10)
    axes[0].set_ylabel(f"accuracy − {baseline}, same seed (points, ± 95% CI)")
    _legend(axes)
    return _save(plt, fig, path)


def _error_key(run: RunData) -> str | None:
    """Cache key of a run's factorization (mechanism + workload + participation); ``None``
    for mechanisms without one (fedavg, and flower-dp, whose noise is Flower's)."""
    if (run.sampling != "cyclic" or run.mechanism not in MECHANISMS
            or MECHANISMS[run.mechanism].method is None):
        return None  # errors do not depend on the sampling: one row per mechanism
    cfg = run.config
    keys = ("rounds", "num-clients", "clients-per-round", "min-sep", "bands", "buffers",
            "schedule",
            "server-lr", "final-server-lr", "server-gamma", "server-momentum",
            "server-weight-decay", "server-milestones", "warmup", "objective")
    return json.dumps([run.mechanism] + [cfg.get(k) for k in keys])


def factorization_errors(runs: Sequence[RunData], *, cache: str | Path | None = None
                         ) -> dict[str, dict[str, float]]:
    """MaxSE / MeanSE per ``mechanism`` (or ``mechanism (schedule)`` when several schedules)
    for the runs' workload and participation, computed with ``fedmf``.

    ``dp-fedavg`` uses the identity factorization (independent noise each round).
    """
    from strategies.config import DPConfig

    cached: dict[str, dict[str, float]] = {}
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None and cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cached = {}
    schedules = {r.schedule for r in runs if r.mechanism != "fedavg"}
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        key = _error_key(run)
        if key is None:
            continue
        label = run.mechanism if len(schedules) <= 1 else f"{run.mechanism} ({run.schedule})"
        if label in out:
            continue
        if key not in cached:
            fact = DPConfig.from_run_config(run.config).factorization()
            cached[key] = {"max_error": float(fact.max_error),
                           "mean_error": float(fact.mean_error),
                           "sensitivity": float(fact.sensitivity.value)}
        out[label] = cached[key]
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cached, indent=1), encoding="utf-8")
    return out


def plot_factorization_errors(errors: Mapping[str, Mapping[str, float]],
                              path: str | Path) -> Path:
    """Grouped bars of MaxSE and MeanSE per mechanism."""
    import numpy as np

    plt = _pyplot()
    path = Path(path)
    labels = sorted(errors, key=lambda s: (*_order(s.split(" ")[0]), s))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    x = np.arange(len(labels))
    width = 0.38
    ax.bar(x - width / 2, [errors[k]["max_error"] for k in labels], width, label="MaxSE")
    ax.bar(x + width / 2, [errors[k]["mean_error"] for k in labels], width, label="MeanSE")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("error (unit noise, unit clip, x sensitivity)")
    ax.set_title("factorization errors for the run's workload and participation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------ report
def _half(value: float, spec: str = ".4f") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def _markdown(runs: Sequence[RunData], table: Sequence[Mapping[str, Any]],
              errors: Mapping[str, Mapping[str, float]], plots: Sequence[Path],
              root: Path, paired: Sequence[Mapping[str, Any]] = ()) -> str:
    lines = ["# fedmf report", ""]
    if runs:
        cfg = runs[0].config
        lines += [f"dataset `{cfg.get('dataset')}`, model `{cfg.get('model')}`, "
                  f"rounds {cfg.get('rounds')}, clients {cfg.get('num-clients')} "
                  f"({cfg.get('clients-per-round')} per round), partitioner "
                  f"`{cfg.get('partitioner')}`, delta {cfg.get('delta')}; "
                  f"{len(runs)} finished run(s).", ""]
    epsilons = sorted({r["epsilon"] for r in table})
    schedules = sorted({r["schedule"] for r in table})
    lines += ["## Final test accuracy (mean ± 95% CI over seeds, n seeds)", ""]
    head = ["mechanism"] + ([] if len(schedules) == 1 else ["schedule"])
    head += [f"ε={_eps_label(e)}" for e in epsilons]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mech in sorted({r["mechanism"] for r in table}, key=_order):
        for sched in schedules:
            cells = {r["epsilon"]: r for r in table
                     if r["mechanism"] == mech and r["schedule"] == sched}
            if not cells:
                continue
            row = [mech] + ([] if len(schedules) == 1 else [sched])
            for e in epsilons:
                r = cells.get(e)
                row.append("" if r is None or r["n"] == 0 else
                           f"{r['mean']:.4f} ± {_half(r['ci95'])} (n={r['n']})")
            lines.append("| " + " | ".join(row) + " |")
    if paired:
        lines += ["", "## Paired differences (points, mean ± 95% CI over seeds; wins = seeds "
                  "ahead)", "", "| mechanism | − baseline | schedule | ε | difference | wins |",
                  "|---|---|---|---|---|---|"]
        for r in paired:
            lines.append(f"| {r['mechanism']} | {r['baseline']} | {r['schedule']} | "
                         f"{_eps_label(r['epsilon'])} | {r['mean']:+.2f} ± "
                         f"{_half(r['ci95'], '.2f')} | {r['wins']}/{r['n']} |")
    if errors:
        lines += ["", "## Factorization errors (fedmf; unit noise and clip)", "",
                  "| mechanism | MaxSE | MeanSE | sensitivity |", "|---|---|---|---|"]
        for label in sorted(errors, key=lambda s: (*_order(s.split(" ")[0]), s)):
            e = errors[label]
            lines.append(f"| {label} | {e['max_error']:.4f} | {e['mean_error']:.4f} | "
                         f"{e.get('sensitivity', math.nan):.4f} |")
    lines += ["", "## Runs", "", "| run | epsilon (accounted) | noise multiplier | "
              "final accuracy | best accuracy | failures | wall s |",
              "|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (_order(r.mechanism), r.name)):
        s = run.summary

        def fmt(v: Any, spec: str = ".4g") -> str:
            return "∞" if v is None else format(float(v), spec)

        lines.append(f"| {run.name} | {fmt(s.get('epsilon'))} | "
                     f"{fmt(s.get('noise_multiplier'))} | {fmt(s.get('final_accuracy'), '.4f')}"
                     f" | {fmt(s.get('best_accuracy'), '.4f')} | {s.get('failures')} | "
                     f"{fmt(s.get('wall_seconds'), '.1f')} |")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def make_report(directory: str | Path, *, errors: bool = True,
                pairs: Sequence[tuple[str, str]] = ()) -> Report:
    """Regenerate ``results.csv``, the plots and ``report.md`` of ``directory`` from its files.

    The paired differences are every mechanism's to ``dp-fedavg``, then ``mechanism -
    baseline`` for each ``(mechanism, baseline)`` of ``pairs``.
    Raises ``ValueError`` when ``directory`` holds no finished run.
    """
    root = Path(directory)
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"directory: no finished run (summary.json) under {str(root)!r}")
    check_poolable(runs)
    files: list[Path] = []
    if results.read_summary(root) is None:
        rows = [results.result_row(r.name, r.summary) for r in runs]
        files.append(results.write_results_csv(rows, root / results.RESULTS_CSV))
    plots_dir = root / PLOTS_DIR
    plots = [plot_accuracy_vs_round(runs, plots_dir / "accuracy_vs_round.png"),
             plot_final_vs_epsilon(runs, plots_dir / "final_accuracy_vs_epsilon.png")]
    errs: dict[str, dict[str, float]] = {}
    if errors:
        errs = factorization_errors(runs, cache=plots_dir / ERRORS_JSON)
        if errs:
            plots.append(plot_factorization_errors(errs, plots_dir / "factorization_errors.png"))
    table = accuracy_table(runs)
    paired = paired_differences(runs)
    for mechanism, baseline in pairs:
        rows = [r for r in paired_differences(runs, baseline=baseline)
                if r["mechanism"] == mechanism]
        if not rows:
            arms = sorted({r.mechanism for r in runs}, key=_order)
            raise ValueError(f"pairs: no run of {mechanism!r} pairs with one of {baseline!r} "
                             "(same schedule, epsilon and seed); arms here: "
                             f"{', '.join(arms)}")
        seen = {(r["mechanism"], r["baseline"], r["schedule"], r["epsilon"]) for r in paired}
        # a pair that is also a default pairing (X vs dp-fedavg) is listed once
        paired += [r for r in rows
                   if (r["mechanism"], r["baseline"], r["schedule"], r["epsilon"]) not in seen]
    if any(r["baseline"] == "dp-fedavg" for r in paired):
        plots.append(plot_differences_vs_epsilon(paired, plots_dir / "difference_vs_epsilon.png"))
    files.append(results.write_results_csv(
        table, root / SUMMARY_TABLE_CSV,
        fields=("mechanism", "schedule", "epsilon", "n", "mean", "std", "ci95")))
    if paired:
        files.append(results.write_results_csv(
            paired, root / PAIRED_CSV, fields=("mechanism", "baseline", "schedule", "epsilon",
                                               "n", "mean", "std", "ci95", "wins")))
    report = root / REPORT_MD
    report.write_text(_markdown(runs, table, errs, plots, root, paired), encoding="utf-8")
    files += [*plots, report]
    return Report(runs=runs, table=table, errors=errs, files=files, paired=paired)
