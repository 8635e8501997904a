"""fedmf ``ServerApp`` (Flower 1.41 Message API).

The same app serves ``flwr run .`` (deployment or Flower's simulation runtime) and the
``fedmf simulate`` / ``fedmf compare`` commands (``simulations.runner``)::

    strategy = strategies.build_strategy(run_config, fraction_evaluate=0.0)
    strategy.start(grid=grid, initial_arrays=get_initial_arrays(run_config),
                   num_rounds=rounds, evaluate_fn=<central evaluation + result writer>)

After every round the central evaluation (``clients.task.central_evaluate_fn``) runs and one
line is appended to ``<output-dir>/rounds.jsonl``; at the end ``summary.json`` and
``summary.csv`` are written (``simulations.results``).  With ``output-dir = ""`` nothing is
written (results are only logged).  The strategy checkpoints its state to ``checkpoint-dir``
after every round and resumes from it when a checkpoint exists, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from . import results

__all__ = ["app", "build_summary", "make_server_app", "run_server"]

RoundCallback = Callable[[dict[str, Any]], None]


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def build_summary(*, run_config: Mapping[str, Any], privacy: Mapping[str, Any],
                  rounds: list[dict[str, Any]], wall_seconds: float,
                  commit: str | None) -> dict[str, Any]:
    """The ``summary.json`` object of a finished run (see ``simulations.results``)."""
    accs = [r["accuracy"] for r in rounds if _finite(r.get("accuracy")) is not None]
    evaluated = [r for r in rounds if _finite(r.get("accuracy")) is not None]
    noise_seed = int(run_config.get("noise-seed", -1))
    return {
        "mechanism": str(run_config.get("mechanism")),
        "dataset": str(run_config.get("dataset")),
        "rounds": int(run_config.get("rounds", 0)),
        "rounds_completed": max((int(r["round"]) for r in rounds), default=0),
        "epsilon": _finite(privacy.get("epsilon")),
        "delta": _finite(privacy.get("delta", run_config.get("delta"))),
        "rho": _finite(privacy.get("rho")),
        "noise_multiplier": _finite(privacy.get("noise_multiplier")),
        "sensitivity": _finite(privacy.get("sensitivity")),
        "sensitivity_exact": bool(privacy.get("sensitivity_exact", True)),
        "max_participations": privacy.get("max_participations"),
        "min_sep": privacy.get("min_sep"),
        "schedule": str(run_config.get("schedule")),
        "final_accuracy": _finite(evaluated[-1]["accuracy"]) if evaluated else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": _finite(evaluated[-1].get("loss")) if evaluated else None,
        "wall_seconds": round(float(wall_seconds), 3),
        "failures": int(sum(int(r.get("failures") or 0) for r in rounds)),
        "config": dict(run_config),
        "git_commit": commit,
        "seeds": {"seed": int(run_config.get("seed", 0)),
                  "noise_seed": noise_seed if noise_seed >= 0 else None},
    }


def run_server(grid: Grid, run_config: Mapping[str, Any], *,
               on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run one DP (or baseline) federated training on ``grid``; return the summary.

    Args:
        grid: Flower's grid (deployment or simulation).
        run_config: the fused run config (``[tool.flwr.app.config]`` keys).
        on_round: called with each ``rounds.jsonl`` record right after it is written
            (progress display of ``fedmf simulate`` in the same process).
    """
    from clients.task import central_evaluate_fn, get_initial_arrays
    from strategies.factory import build_strategy

    cfg = dict(run_config)
    out_dir = str(cfg.get("output-dir", "") or "")
    out = Path(out_dir) if out_dir else None
    strategy = build_strategy(cfg, fraction_evaluate=0.0)
    central = central_evaluate_fn(cfg)
    commit = results.git_commit()
    prior = results.read_rounds(out) if out is not None else []
    prior_seconds = sum(float(r.get("seconds") or 0.0) for r in prior)
    last = {"t": time.monotonic()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        res = central(server_round, arrays)
        if server_round < 1:
            if res is not None:
                log(INFO, "fedmf: initial accuracy %.4f", float(res.get("accuracy", math.nan)))
            return res
        now = time.monotonic()
        record = results.round_record(
            server_round=server_round, eval_metrics=res,
            train_metrics=getattr(strategy, "last_train_metrics", {}),
            seconds=now - last["t"],
        )
        last["t"] = now
        if out is not None:
            results.append_round(out, record)
        log(INFO, "fedmf round %d: accuracy %s, epsilon spent %s, failures %d", server_round,
            record["accuracy"], record["epsilon_spent"], record["failures"])
        if record["failures"] or record["rejected"]:
            log(WARNING, "fedmf round %d: %d client(s) failed, %d repl(ies) rejected "
                "(counted in the results; see the server/client logs)", server_round,
                record["failures"], record["rejected"])
        if on_round is not None:
            try:
                on_round(record)
            except Exception as err:  # a progress display must never stop training
                log(WARNING, "fedmf: round callback failed: %s", err)
        return res

    rounds = int(cfg["rounds"])
    started = time.monotonic()
    strategy.start(grid=grid, initial_arrays=get_initial_arrays(cfg), num_rounds=rounds,
                   evaluate_fn=evaluate)
    session = time.monotonic() - started
    done = results.read_rounds(out) if out is not None else []
    privacy = dict(getattr(strategy, "privacy", {}))
    # wall time over all sessions of this run: earlier sessions' rounds + this session
    wall = prior_seconds + session
    summary = build_summary(run_config=cfg, privacy=privacy, rounds=done, wall_seconds=wall,
                            commit=commit)
    if out is not None:
        path = results.write_summary(out, summary)
        log(INFO, "fedmf: wrote %s (final accuracy %s, epsilon %s)", path,
            summary["final_accuracy"], summary["epsilon"])
    else:
        log(INFO, "fedmf: finished (final accuracy %s, epsilon %s); output-dir not set, "
            "no files written", summary["final_accuracy"], summary["epsilon"])
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None, *,
                    on_round: RoundCallback | None = None,
                    sink: dict[str, Any] | None = None) -> ServerApp:
    """A ``ServerApp`` running :func:`run_server`.

    Args:
        run_config: when given, used instead of ``context.run_config`` (Flower's
            ``run_simulation`` Python API passes an empty run config).
        on_round: per-round callback (see :func:`run_server`).
        sink: if given, ``sink["summary"]`` receives the summary.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = dict(run_config) if run_config is not None else dict(context.run_config)
        summary = run_server(grid, cfg, on_round=on_round)
        if sink is not None:
            sink["summary"] = summary

    return server_app


#: The app referenced by ``[tool.flwr.app.components] serverapp``.
app = make_server_app()
