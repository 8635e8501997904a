"""The run-folder policy of ``fedmf simulate``: what a ``--output`` folder that already holds a
run means.

This module owns the answer to "may this command write into this folder, and with which
configuration?":

* an empty or new folder starts a new run;
* a *finished* run (``summary.json``) is refused unless ``--resume`` (then ``simulate`` has
  nothing to do) or ``--overwrite``;
* an *interrupted* run (result files and at least one released round) is refused unless
  ``--resume`` (continue from its checkpoint with its saved ``run_config.json``; only the
  path-only keys of :data:`_MOVABLE_ON_RESUME` may change) or ``--overwrite`` (discard its
  results and its private checkpoint);
* a failed launch that released no round spent no privacy and is replaced silently.

It also writes ``run_config.json`` and ends the process on Ctrl-C (:func:`interrupted`).
Argument parsing stays in :mod:`simulations.cli`; nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RUN_CONFIG_JSON", "interrupted", "resolve_simulate_config", "write_run_config"]

#: The run's configuration, written into its output folder (read back by ``--resume``).
RUN_CONFIG_JSON = "run_config.json"

#: Run-config keys a ``--resume`` may change: paths, not what the run computes.
_MOVABLE_ON_RESUME = ("data-dir",)


def _run_files(out: Path) -> list[Path]:
    """The files fedmf writes into a run's output folder."""
    from . import results

    names = (results.ROUNDS_FILE, results.SUMMARY_JSON, results.SUMMARY_CSV,
             results.PARTICIPATION_FILE, RUN_CONFIG_JSON)
    return [out / name for name in names if (out / name).exists()]


def _saved_config(out: Path) -> dict[str, Any] | None:
    """The ``run_config.json`` saved in ``out`` (None if there is none)."""
    path = out / RUN_CONFIG_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _discard_run(out: Path) -> None:
    """``--overwrite``: delete a run's result files and its private checkpoint."""
    from strategies.checkpoint import FINISHED_NAME, checkpoint_path

    from . import results

    saved = _saved_config(out) or {}
    ckpt = str(saved.get("checkpoint-dir") or results.default_checkpoint_dir(out))
    checkpoint_path(ckpt).unlink(missing_ok=True)
    (Path(ckpt) / FINISHED_NAME).unlink(missing_ok=True)  # the user discards that run
    for path in [*_run_files(out), out / results.STATUS_FILE]:
        path.unlink(missing_ok=True)


def resolve_simulate_config(output: str | Path, *, resume: bool, overwrite: bool,
                            noise_seed: int | None, given: Callable[[], Mapping[str, Any]],
                            build: Callable[..., Any]) -> Any:
    """The :class:`~simulations.config.RunConfig` of ``simulate`` into ``output``, after
    applying the run-folder policy (raises ValueError naming the key).

    Args:
        output: the ``--output`` folder (``~`` expanded, made absolute).
        resume, overwrite: ``--resume`` and ``--overwrite`` (not both).
        noise_seed: ``--noise-seed`` (handed to the ServerApp only).
        given: returns the run-config keys the user set; called once the flags are known
            to be consistent.
        build: ``build(flat, noise_seed=...)``, the ``RunConfig`` of a flat run config as
            the CLI completes it (e.g. ``bands`` capped at ``rounds`` unless given).

    Returns:
        The absolute configuration, with ``output-dir`` set and ``checkpoint-dir``
        defaulting to :func:`simulations.results.default_checkpoint_dir`.  On ``--resume``
        it is the saved one (with the path-only keys the user gave); a given key that would
        change what the interrupted run computes is an error.
    """
    from . import results
    from .config import RunConfig

    out = Path(output).expanduser().resolve()
    if resume and overwrite:
        raise ValueError("overwrite: give either --resume or --overwrite, not both")
    given = dict(given())
    if overwrite:
        _discard_run(out)
    if results.read_summary(out) is not None and not resume:
        raise ValueError(f"output: {str(out)!r} already holds a finished run "
                         "(summary.json); choose another directory or pass --overwrite")
    if _run_files(out) and not results.read_rounds(out):
        _discard_run(out)  # an attempt that released no round spent nothing: start afresh
    if _run_files(out) and not resume:
        raise ValueError(f"output: {str(out)!r} holds an interrupted run; pass --resume to "
                         "continue it from its checkpoint, --overwrite to discard it, or "
                         "choose another directory")
    saved = _saved_config(out) if resume else None
    if saved is not None:
        config = RunConfig.from_run_config(saved, noise_seed=noise_seed)
        mine = build({**saved, **given}, noise_seed=noise_seed).absolute()
        moved = {k: given[k] for k in _MOVABLE_ON_RESUME if k in given}
        if moved:  # where the data lives may change; what it is may not
            config = config.replace(**moved)
        for key, value in mine.to_run_config().items():
            if key in given and value != config.to_run_config()[key]:
                raise ValueError(f"{key}: differs from the interrupted run in {str(out)!r} "
                                 f"(saved {saved.get(key)!r}, given {given[key]!r})")
    else:
        config = build(given, noise_seed=noise_seed)
    changes: dict[str, Any] = {"output-dir": str(out)}
    if not config.dp.checkpoint_dir:
        changes["checkpoint-dir"] = str(results.default_checkpoint_dir(out))
    return config.replace(**changes).absolute()


def write_run_config(config: Any) -> None:
    """Write ``config`` (a ``RunConfig``) as ``run_config.json`` into its output folder,
    creating the folder."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG_JSON).write_text(
        json.dumps(config.to_run_config(), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def interrupted(output: Path) -> None:
    """Ctrl-C: the checkpoint is consistent; end the process now (Flower's server thread and
    Ray workers would otherwise keep it alive)."""
    print(f"\ninterrupted; continue with --resume (output {output})", file=sys.stderr,
          flush=True)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    finally:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(130)
