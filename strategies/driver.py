"""Flower's ``Strategy.start`` loop, made resumable from a checkpoint.

Flower (1.41, 1.42) has no hook to resume a strategy: ``Strategy.start`` always runs rounds
``1..num_rounds`` from the initial arrays.  A DP run must continue after its last released
round instead -- restarting at round 1 would draw fresh noise for rounds already released and
spend the privacy budget twice -- so :class:`ResumableStart` keeps a copy of that loop, as small
as possible, with three additions: restore the checkpoint first, redo the evaluation of a round
that was aggregated but not yet evaluated, and checkpoint after every evaluation.

A strategy using it provides ``config.checkpoint_dir`` / ``config.rounds``, ``history``,
``_round_done``, ``_phase`` and the methods ``state_dict``, ``load_state_dict`` and
``global_arrays`` (the model after :meth:`ResumableStart.resume`).

Checkpoint by default.  With ``config.checkpoint_dir`` unset (``None``), ``start`` checkpoints
to ``$FEDMF_STATE_DIR/checkpoints/<mechanism>-config-<hash>``, keyed by the strategy and its
configuration fingerprint, so a user's own ServerApp that crashes resumes when it is launched
again with the same configuration.  That folder is locked while ``start`` runs (two live runs
of one configuration would overwrite each other's noise state) and deleted when the run
finishes: unlike an explicit ``checkpoint_dir`` it leaves no ``finished.json``, because the
same configuration is legitimately run again (other data, another model).  ``""`` turns
checkpointing off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from .checkpoint import (
    config_checkpoint_dir,
    fingerprint_digest,
    finish_checkpoint,
    load_checkpoint,
    locked,
    read_finished,
    remove_checkpoint,
    save_checkpoint,
)

__all__ = ["ResumableStart"]

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class ResumableStart:
    """Mixin: ``start`` with resume from ``config.checkpoint_dir`` (see the module docstring)."""

    config: Any
    history: dict[str, dict[int, dict[str, Any]]]
    _round_done: int
    _phase: str
    #: the default folder chosen by ``start`` when ``config.checkpoint_dir`` is unset
    _default_checkpoint_dir: str = ""

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - implemented by strategies
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def global_arrays(self) -> ArrayRecord | None:  # pragma: no cover
        raise NotImplementedError

    checkpoint_version: int = 1

    def fingerprint(self) -> dict[str, Any]:
        """What must not change across a checkpoint/resume (the configuration)."""
        return dict(self.config.fingerprint())

    def _state_header(self) -> dict[str, Any]:
        return {"version": self.checkpoint_version, "fingerprint": self.fingerprint(),
                "round": self._round_done, "phase": self._phase}

    def _restore_header(self, state: Mapping[str, Any]) -> None:
        """Check a checkpoint's version and configuration; restore the round and phase."""
        if state.get("version") != self.checkpoint_version:
            raise ValueError(f"checkpoint_dir holds a checkpoint of version "
                             f"{state.get('version')}, not {self.checkpoint_version} of "
                             f"{type(self).__name__}; use another checkpoint_dir")
        saved, current = state["fingerprint"], self.fingerprint()
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            raise ValueError(f"checkpoint_dir holds a run with a different configuration "
                             f"({diff}); use another checkpoint_dir")
        self._round_done = int(state["round"])
        self._phase = str(state["phase"])

    @property
    def rounds_completed(self) -> int:
        """Last server round whose aggregate was computed."""
        return self._round_done

    @property
    def checkpoint_dir(self) -> str:
        """Where the state is checkpointed: ``config.checkpoint_dir`` or, when that is unset,
        the default folder ``start`` chose (``""``: nowhere)."""
        configured = self.config.checkpoint_dir
        return self._default_checkpoint_dir if configured is None else configured

    def save(self) -> None:
        """Persist the state to :attr:`checkpoint_dir` (no-op when it is ``""``)."""
        if self.checkpoint_dir:
            save_checkpoint(self.state_dict(), self.checkpoint_dir)

    def _refuse_finished(self) -> None:
        """A run that finished is never started again: it would draw new noise for a horizon
        whose models were released, spending the privacy budget twice."""
        directory = self.checkpoint_dir
        done = read_finished(directory) if directory else None
        if done is None or done.get("fingerprint") != fingerprint_digest(self.fingerprint()):
            return
        raise ValueError(
            f"checkpoint_dir: {directory!r} belongs to a run with this configuration that "
            f"finished all {done.get('rounds')} rounds (its models were released, its secret "
            "state deleted); starting it again would spend the privacy budget twice. Give a "
            "new run another checkpoint_dir (or delete its finished.json if you know the "
            "earlier run's models were never released)")

    def resume(self) -> ArrayRecord | None:
        """Load the checkpoint of :attr:`checkpoint_dir`; the global model, or ``None``."""
        if not self.checkpoint_dir:
            return None
        state = load_checkpoint(self.checkpoint_dir)
        if state is None:
            return None
        self.load_state_dict(state)
        log(INFO, "Resumed from %s after round %d (%s)", self.checkpoint_dir,
            self._round_done, self._phase)
        return self.global_arrays()

    @contextlib.contextmanager
    def _default_checkpoint(self) -> Iterator[None]:
        """With ``config.checkpoint_dir`` unset: choose, log and lock the default folder for
        the block (see the module docstring)."""
        if self.config.checkpoint_dir is not None:
            yield
            return
        path = config_checkpoint_dir(name=self.config.mechanism, fingerprint={
            "strategy": type(self).__name__, "version": self.checkpoint_version,
            "fingerprint": self.fingerprint()})
        with locked(path):
            self._default_checkpoint_dir = str(path)
            log(INFO, "Checkpointing to %s (private: holds the noise state; keyed by the "
                "configuration, so a relaunch with the same configuration resumes; set "
                "checkpoint_dir to choose the folder, '' for none)", path)
            yield

    # ------------------------------------------------------------------ driver
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's ``Strategy.start`` plus resume from :attr:`checkpoint_dir`.

        Same signature and ``Result`` as Flower.  With a checkpoint the run continues after the
        last completed round (first redoing the evaluation of a round that was aggregated but
        not evaluated); the returned ``Result`` then holds the earlier rounds' metrics too.
        """
        if not isinstance(num_rounds, int) or not 1 <= num_rounds <= self.config.rounds:
            raise ValueError(
                f"num_rounds must be in [1, rounds={self.config.rounds}] (the horizon the "
                f"privacy accounting covers), got {num_rounds!r}"
            )
        with self._default_checkpoint():
            return self._start(grid, initial_arrays, num_rounds, timeout, train_config,
                               evaluate_config, evaluate_fn)

    def _start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float,
               train_config: ConfigRecord | None, evaluate_config: ConfigRecord | None,
               evaluate_fn: EvaluateFn | None) -> Result:
        strategy: Any = self
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log(INFO, "\t├── Number of rounds: %d", num_rounds)
        strategy.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        t_start = time.time()

        self._refuse_finished()
        resumed = self.resume()
        if resumed is not None:
            _check_same_model(resumed, initial_arrays, self.checkpoint_dir)
        arrays = resumed if resumed is not None else initial_arrays
        if resumed is None and evaluate_fn is not None:
            res = evaluate_fn(0, arrays)
            if res is not None:
                self.history["evaluate_serverapp"][0] = dict(res)
        if resumed is not None and self._phase == "trained" and self._round_done >= 1:
            self._evaluate_round(self._round_done, arrays, grid, timeout, evaluate_config,
                                 evaluate_fn)

        for current_round in range(self._round_done + 1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            messages = list(strategy.configure_train(current_round, arrays, train_config, grid))
            replies = (list(grid.send_and_receive(messages=messages, timeout=timeout))
                       if messages else [])
            agg_arrays, _ = strategy.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                arrays = agg_arrays
            self._evaluate_round(current_round, arrays, grid, timeout, evaluate_config,
                                 evaluate_fn)

        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        if self.config.checkpoint_dir and self._round_done >= self.config.rounds:
            finish_checkpoint(self.config.checkpoint_dir, fingerprint=self.fingerprint(),
                              rounds=self.config.rounds)
        elif self._default_checkpoint_dir and self._round_done >= self.config.rounds:
            remove_checkpoint(self._default_checkpoint_dir)  # no marker: see the module doc
        result = Result()
        result.arrays = arrays
        for key, target in (("train", result.train_metrics_clientapp),
                            ("evaluate_clientapp", result.evaluate_metrics_clientapp),
                            ("evaluate_serverapp", result.evaluate_metrics_serverapp)):
            for rnd, values in sorted(self.history[key].items()):
                target[int(rnd)] = MetricRecord(
                    {k: v for k, v in values.items() if isinstance(v, int | float | list)}
                )
        return result

    def _evaluate_round(self, current_round: int, arrays: ArrayRecord, grid: Grid,
                        timeout: float, evaluate_config: ConfigRecord,
                        evaluate_fn: EvaluateFn | None) -> None:
        strategy: Any = self
        messages = list(strategy.configure_evaluate(current_round, arrays,
                                                    ConfigRecord(dict(evaluate_config)), grid))
        replies = (list(grid.send_and_receive(messages=messages, timeout=timeout))
                   if messages else [])
        agg = strategy.aggregate_evaluate(current_round, replies)
        if agg is not None:
            self.history["evaluate_clientapp"][current_round] = dict(agg)
        if evaluate_fn is not None:
            res = evaluate_fn(current_round, arrays)
            if res is not None:
                self.history["evaluate_serverapp"][current_round] = dict(res)
        self._phase = "complete"
        self.save()


def _check_same_model(resumed: ArrayRecord, initial: ArrayRecord, where: str) -> None:
    """Refuse to resume a checkpoint whose model is not the one being trained (a default
    folder is keyed by the DP configuration only, which does not name the model)."""

    def shapes(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
        return {k: tuple(int(d) for d in v.shape) for k, v in record.items()}

    if shapes(resumed) != shapes(initial):
        raise ValueError(
            f"checkpoint_dir: {where!r} holds a run with another model "
            "(parameter names or shapes differ from initial_arrays); give this run another "
            "checkpoint_dir")
