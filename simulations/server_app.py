"""fedmf ``ServerApp`` (Flower 1.41 Message API).

The same app serves ``flwr run .`` (deployment or Flower's simulation runtime) and the
``fedmf simulate`` / ``fedmf compare`` commands (``simulations.runner``)::

    strategy = strategies.build_strategy(run_config)   # server-side evaluation only
    strategy.start(grid=grid, initial_arrays=get_initial_arrays(run_config),
                   num_rounds=rounds, evaluate_fn=<central evaluation + result writer>)

After every round the central evaluation (``clients.task.central_evaluate_fn``) runs and one
line is appended to ``<output-dir>/rounds.jsonl``; at the end ``summary.json`` and
``summary.csv`` are written (``simulations.results``).  With ``output-dir = ""`` nothing is
written (results are only logged); ``participation.json`` is rewritten every round.  The
strategy checkpoints its state to ``checkpoint-dir`` after every round and resumes from it when
a checkpoint exists, so an interrupted run continues where it stopped; a partial run whose
checkpoint is missing is refused (it would spend the privacy budget twice), and a finished run's
checkpoint (which holds the secret noise state) is deleted.  A fixed noise seed
(``insecure-reproducible`` runs) reaches the ServerApp from ``FEDMF_NOISE_SEED``, never from
the run config.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from . import results

__all__ = ["ENV_NOISE_SEED", "app", "build_summary", "check_restart", "make_server_app",
           "noise_seed_from_env", "run_server"]

#: Environment variable holding a fixed noise seed for the ServerApp (``insecure-reproducible``
#: runs only); the seed is never part of the run config, which every ClientApp receives.
ENV_NOISE_SEED = "FEDMF_NOISE_SEED"

RoundCallback = Callable[[dict[str, Any]], None]


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def build_summary(*, run_config: Mapping[str, Any], privacy: Mapping[str, Any],
                  rounds: list[dict[str, Any]], wall_seconds: float,
                  commit: str | None, server_optimizer: str) -> dict[str, Any]:
    """The ``summary.json`` object of a finished run (see ``simulations.results``).

    It never holds the noise seed: only whether the run was ``insecure_reproducible``.
    """
    accs = [r["accuracy"] for r in rounds if _finite(r.get("accuracy")) is not None]
    evaluated = [r for r in rounds if _finite(r.get("accuracy")) is not None]
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
        "server_optimizer": server_optimizer,
        "final_accuracy": _finite(evaluated[-1]["accuracy"]) if evaluated else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": _finite(evaluated[-1].get("loss")) if evaluated else None,
        "wall_seconds": round(float(wall_seconds), 3),
        "failures": int(sum(int(r.get("failures") or 0) for r in rounds)),
        "config": dict(run_config),
        "git_commit": commit,
        "seeds": {"seed": int(run_config.get("seed", 0))},
        "insecure_reproducible": bool(run_config.get("insecure-reproducible", False)),
        "non_private_fields": list(results.NON_PRIVATE_FIELDS),
    }


def noise_seed_from_env() -> int | None:
    """The fixed noise seed of :data:`ENV_NOISE_SEED` for the ServerApp (``None``: unset).

    The seed never travels in the run config (every ClientApp receives it); a deployment
    that needs reproducible noise sets it in the ServerApp's environment only.
    """
    raw = os.environ.get(ENV_NOISE_SEED, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{ENV_NOISE_SEED} must be an integer") from None  # never echo it


def check_restart(run_config: Mapping[str, Any]) -> None:
    """Refuse to start over a partial run whose checkpoint is missing.

    Starting again at round 1 would draw fresh noise for rounds already released and spend
    the privacy budget twice.
    """
    out_dir = str(run_config.get("output-dir", "") or "")
    checkpoint_dir = str(run_config.get("checkpoint-dir", "") or "")
    out = Path(out_dir) if out_dir else None
    if out is None or not results.read_rounds(out):
        return
    from strategies.checkpoint import checkpoint_path

    if checkpoint_dir and checkpoint_path(checkpoint_dir).is_file():
        return
    where = f"checkpoint-dir {checkpoint_dir!r}" if checkpoint_dir else "no checkpoint-dir"
    raise ValueError(
        f"output-dir: {str(out)!r} holds rounds of an earlier run but {where} has no "
        "checkpoint; starting again at round 1 would draw new noise for released rounds and "
        "spend the privacy budget twice. Restore the checkpoint, or discard the earlier run "
        "(`fedmf simulate --overwrite`)"
    )


def run_server(grid: Grid, run_config: Mapping[str, Any], *,
               on_round: RoundCallback | None = None,
               noise_seed: int | None = None) -> dict[str, Any]:
    """Run one DP (or baseline) federated training on ``grid``; return the summary.

    Args:
        grid: Flower's grid (deployment or simulation).
        run_config: the fused run config (``[tool.flwr.app.config]`` keys).
        on_round: called with each ``rounds.jsonl`` record right after it is written
            (progress display of ``fedmf simulate`` in the same process).
        noise_seed: a fixed noise seed (only with ``insecure-reproducible``); default
            :func:`noise_seed_from_env`, else a secret one.  It reaches no client and no file
            but the private checkpoint.
    """
    from clients.task import central_evaluate_fn, get_initial_arrays
    from strategies.checkpoint import checkpoint_path
    from strategies.config import DPConfig
    from strategies.factory import build_strategy

    cfg = dict(run_config)
    out_dir = str(cfg.get("output-dir", "") or "")
    out = Path(out_dir) if out_dir else None
    checkpoint_dir = str(cfg.get("checkpoint-dir", "") or "")
    seed = noise_seed if noise_seed is not None else noise_seed_from_env()
    dp_config = DPConfig.from_run_config(cfg, **({} if seed is None else {"noise_seed": seed}))
    check_restart(cfg)
    strategy = build_strategy(dp_config)
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
            results.write_participation(out, strategy.participation_report())
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
                            commit=commit, server_optimizer=strategy.server_optimizer)
    if out is not None:
        path = results.write_summary(out, summary)
        log(INFO, "fedmf: wrote %s (final accuracy %s, epsilon %s)", path,
            summary["final_accuracy"], summary["epsilon"])
    else:
        log(INFO, "fedmf: finished (final accuracy %s, epsilon %s); output-dir not set, "
            "no files written", summary["final_accuracy"], summary["epsilon"])
    if checkpoint_dir and strategy.rounds_completed >= rounds:
        # A finished run needs no state, and its secrets (noise seed and buffers) are best
        # not kept at rest: whoever reads them can remove the noise from the released models.
        checkpoint_path(checkpoint_dir).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(checkpoint_dir).rmdir()
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None, *,
                    on_round: RoundCallback | None = None,
                    sink: dict[str, Any] | None = None,
                    noise_seed: int | None = None) -> ServerApp:
    """A ``ServerApp`` running :func:`run_server`.

    Args:
        run_config: when given, used instead of ``context.run_config`` (Flower's
            ``run_simulation`` Python API passes an empty run config).
        on_round: per-round callback (see :func:`run_server`).
        sink: if given, ``sink["summary"]`` receives the summary.
        noise_seed: a fixed noise seed handed to :func:`run_server` (never to clients).
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = dict(run_config) if run_config is not None else dict(context.run_config)
        summary = run_server(grid, cfg, on_round=on_round, noise_seed=noise_seed)
        if sink is not None:
            sink["summary"] = summary

    return server_app


#: The app referenced by ``[tool.flwr.app.components] serverapp``.
app = make_server_app()
