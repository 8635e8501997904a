"""fedmf ``ServerApp`` (Flower 1.42 Message API).

The same app serves ``flwr run .`` (deployment or Flower's simulation runtime) and the
``fedmf simulate`` / ``fedmf compare`` commands (``simulations.runner``)::

    config = RunConfig.from_run_config(context.run_config)   # parsed and validated once
    strategy = strategies.build_strategy(config.dp)          # server-side evaluation only
    strategy.start(grid=grid, initial_arrays=get_initial_arrays(config.client),
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

from fedmf.mechanisms import arm_label

from . import results
from .config import RunConfig

__all__ = ["ENV_NOISE_SEED", "app", "build_summary", "check_restart", "make_server_app",
           "noise_seed_from_env", "run_server", "with_default_checkpoint"]

#: Environment variable holding a fixed noise seed for the ServerApp (``insecure-reproducible``
#: runs only); the seed is never part of the run config, which every ClientApp receives.
ENV_NOISE_SEED = "FEDMF_NOISE_SEED"

RoundCallback = Callable[[dict[str, Any]], None]
#: ``(server_round, model)`` of every released model (round 0: the initial one)
ModelCallback = Callable[[int, ArrayRecord], None]


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def build_summary(*, config: RunConfig, privacy: Mapping[str, Any],
                  rounds: list[dict[str, Any]], wall_seconds: float,
                  commit: str | None, server_optimizer: str) -> dict[str, Any]:
    """The ``summary.json`` object of a finished run (see ``simulations.results``).

    It never holds the noise seed: only whether the run was ``insecure_reproducible``.
    """
    accs = [r["accuracy"] for r in rounds if _finite(r.get("accuracy")) is not None]
    evaluated = [r for r in rounds if _finite(r.get("accuracy")) is not None]
    dp = config.dp
    return {
        "mechanism": dp.mechanism,
        "dataset": config.client.dataset,
        "rounds": dp.rounds,
        "rounds_completed": max((int(r["round"]) for r in rounds), default=0),
        "epsilon": _finite(privacy.get("epsilon")),
        "delta": _finite(privacy.get("delta", dp.delta)),
        "flower_epsilon": _finite(privacy.get("flower_epsilon")),
        "rho": _finite(privacy.get("rho")),
        "noise_multiplier": _finite(privacy.get("noise_multiplier")),
        "sensitivity": _finite(privacy.get("sensitivity")),
        "sensitivity_exact": bool(privacy.get("sensitivity_exact", True)),
        "max_participations": privacy.get("max_participations"),
        "min_sep": privacy.get("min_sep"),
        "schedule": dp.schedule,
        "server_optimizer": server_optimizer,
        "final_accuracy": _finite(evaluated[-1]["accuracy"]) if evaluated else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": _finite(evaluated[-1].get("loss")) if evaluated else None,
        "wall_seconds": round(float(wall_seconds), 3),
        "failures": (None if privacy.get("participation_released") is False else
                     int(sum(int(r.get("failures") or 0) for r in rounds))),
        "sampling": privacy.get("sampling", dp.sampling),
        "arm": arm_label(dp.mechanism, dp.sampling),
        "participation_released": privacy.get("participation_released", True),
        "epsilon_bound": privacy.get("epsilon_bound", "un-amplified"),
        "epsilon_amplified": _finite(privacy.get("epsilon_amplified")),
        "epsilon_unamplified": _finite(privacy.get("epsilon_unamplified",
                                                   privacy.get("epsilon"))),
        "accountant": privacy.get("accountant"),
        "config": config.to_run_config(),
        "git_commit": commit,
        "seeds": {"seed": dp.seed},
        "insecure_reproducible": dp.insecure_reproducible,
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


def check_restart(config: RunConfig) -> None:
    """Refuse to start over a partial run whose checkpoint is missing.

    Starting again at round 1 would draw fresh noise for rounds already released and spend
    the privacy budget twice.
    """
    out, checkpoint_dir = config.output_dir, config.dp.checkpoint_dir
    if out is None or not results.read_rounds(out):
        return
    from strategies.checkpoint import checkpoint_path

    if checkpoint_dir and checkpoint_path(checkpoint_dir).is_file():
        return
    where = (f"its checkpoint-dir {checkpoint_dir!r} holds no checkpoint" if checkpoint_dir
             else "no checkpoint-dir is set")
    raise ValueError(
        f"output-dir: {str(out)!r} holds rounds of an earlier run, but {where}; starting again "
        "at round 1 would draw new noise for released rounds and spend the privacy budget "
        "twice. Resume it by setting checkpoint-dir to the earlier run's checkpoint folder, or "
        "start a new run in another output-dir (with `fedmf simulate`: --resume, or --overwrite "
        "to discard the earlier run)"
    )


def with_default_checkpoint(config: RunConfig) -> RunConfig:
    """``config`` with ``checkpoint-dir`` defaulted to the private state folder of its
    ``output-dir`` (:func:`simulations.results.default_checkpoint_dir`), so a crashed
    ``flwr run`` resumes when launched again with the same output-dir and configuration."""
    if config.dp.checkpoint_dir or config.output_dir is None:
        return config
    path = results.default_checkpoint_dir(config.output_dir)
    log(INFO, "fedmf: checkpointing to %s (private; set checkpoint-dir to change)", path)
    return config.replace(**{"checkpoint-dir": str(path)})


def run_server(grid: Grid, config: RunConfig, *, on_round: RoundCallback | None = None,
               on_model: ModelCallback | None = None) -> dict[str, Any]:
    """Run one DP (or baseline) federated training on ``grid``; return the summary.

    Args:
        grid: Flower's grid (deployment or simulation).
        config: the run's configuration (its fixed noise seed, if any, reaches no client and
            no file but the private checkpoint).
        on_round: called with each ``rounds.jsonl`` record right after it is written
            (progress display of ``fedmf simulate`` in the same process).
        on_model: called with every released model (``simulations.audit``); unlike
            ``on_round`` its errors stop the run (an audit missing a round is wrong).
    """
    from clients.task import central_evaluate_fn, get_initial_arrays
    from strategies.checkpoint import checkpoint_path
    from strategies.factory import build_strategy

    config = with_default_checkpoint(config)
    out, checkpoint_dir, rounds = config.output_dir, config.dp.checkpoint_dir, config.dp.rounds
    check_restart(config)
    strategy = build_strategy(config.dp)
    central = central_evaluate_fn(config.client, rounds=rounds, eval_every=config.run.eval_every)
    commit = results.git_commit()
    prior = results.read_rounds(out) if out is not None else []
    prior_seconds = sum(float(r.get("seconds") or 0.0) for r in prior)
    last = {"t": time.monotonic()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if on_model is not None:
            on_model(server_round, arrays)
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
            withheld=bool(getattr(strategy, "participation_secret", False)),
        )
        last["t"] = now
        if out is not None:
            results.append_round(out, record)
        _write_participation(strategy, out, checkpoint_dir)
        log(INFO, "fedmf round %d: accuracy %s, epsilon spent %s%s", server_round,
            record["accuracy"], record["epsilon_spent"],
            "" if record["failures"] is None else f", failures {record['failures']}")
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

    started = time.monotonic()
    strategy.start(grid=grid, initial_arrays=get_initial_arrays(config.client),
                   num_rounds=rounds, evaluate_fn=evaluate)
    session = time.monotonic() - started
    done = results.read_rounds(out) if out is not None else []
    # wall time over all sessions of this run: earlier sessions' rounds + this session
    summary = build_summary(config=config, privacy=dict(strategy.privacy), rounds=done,
                            wall_seconds=prior_seconds + session, commit=commit,
                            server_optimizer=strategy.server_optimizer)
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


def _write_participation(strategy: Any, out: Path | None, checkpoint_dir: str) -> None:
    """``participation.json``: in the output folder when it is public (cyclic sampling, or
    released on request), else only beside the private checkpoint (never released)."""
    report = getattr(strategy, "participation_report", None)
    if report is None:
        return
    if getattr(strategy, "participation_secret", False):
        if checkpoint_dir:
            results.write_participation(checkpoint_dir, report(), private=True)
    elif out is not None:
        results.write_participation(out, report())


def _raw_output_dir(run_config: Mapping[str, Any]) -> Path | None:
    """``output-dir`` of a run config that may not parse (to report the failure there)."""
    value = run_config.get("output-dir")
    return Path(str(value)).expanduser() if isinstance(value, str) and value else None


def make_server_app(config: RunConfig | None = None, *,
                    on_round: RoundCallback | None = None,
                    sink: dict[str, Any] | None = None,
                    on_model: ModelCallback | None = None) -> ServerApp:
    """A ``ServerApp`` running :func:`run_server`.

    Args:
        config: when given, used instead of ``context.run_config`` (Flower's
            ``run_simulation`` Python API passes an empty run config); otherwise the run
            config is parsed once with the noise seed of :func:`noise_seed_from_env`.
        on_round: per-round callback (see :func:`run_server`).
        sink: if given, ``sink["summary"]`` receives the summary.
        on_model: observer of every released model (see :func:`run_server`).
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        out: Path | None = None
        try:
            out = _raw_output_dir(context.run_config) if config is None else config.output_dir
            cfg = config if config is not None else RunConfig.from_run_config(
                context.run_config, noise_seed=noise_seed_from_env())
            out = cfg.output_dir
            if out is not None:
                results.write_status(out, "running")
            summary = run_server(grid, cfg, on_round=on_round, on_model=on_model)
        except BaseException as err:
            # `flwr run` exits 0 whatever happens here: status.json is what a script can read
            if out is not None:
                with contextlib.suppress(OSError):
                    results.write_status(out, "failed", error=f"{type(err).__name__}: {err}")
            raise
        if out is not None:
            results.write_status(out, "ok", rounds_completed=summary.get("rounds_completed"),
                                 final_accuracy=summary.get("final_accuracy"),
                                 epsilon=summary.get("epsilon"))
        if sink is not None:
            sink["summary"] = summary

    return server_app


#: The app referenced by ``[tool.flwr.app.components] serverapp``.
app = make_server_app()
