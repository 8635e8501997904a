"""``fedmf audit``: an empirical privacy estimate of a run, from canary clients.

Andrew et al., "One-shot empirical privacy estimation for federated learning" (ICLR 2024,
arXiv 2302.03098): ``canaries`` of the run's clients, drawn with the audit seed, are replaced by
*canary clients* whose update is a fixed random unit direction scaled to the clip norm (any
update within the clip norm is one a real client could send, so the run's (epsilon, delta)
claim covers them).  They take part exactly as the clients they replace would -- the same
cohorts, the same secret sampling -- so the run's configuration, participation pattern and
claimed epsilon are those of the run being audited.  As many *held-out* directions are drawn
and never inserted.

The released models are observed after every round (:func:`simulations.runner.run_simulation`'s
``on_model``) and each direction ``c`` is scored two ways (:mod:`fedmf.audit`):

* ``final_model``: ``cos(theta_n - theta_0, c)`` -- the threat model of a released model;
* ``every_round``: ``max_t cos(theta_t - theta_{t-1}, c)`` -- an observer of every round's
  model (Andrew et al. Sec. 5).

For each, the one-shot estimate and a Clopper-Pearson lower bound are reported beside the
claimed epsilon in ``<output-dir>/audit.json``.  The vectorized backend runs the real clients;
the canaries' replies cost nothing, so an audit costs about as much as the run itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmf import audit as stats

from . import results
from .config import RunConfig

__all__ = ["AUDIT_FILE", "CanaryScorer", "audit_layout", "run_audit"]

AUDIT_FILE = "audit.json"
_PICK_TAG = 0xA0D17  # stream tags: which clients become canaries; their directions
_DIRECTION_TAG = 0xD1EC7

Layout = list[tuple[str, tuple[int, ...]]]


def audit_layout(state: Mapping[str, Any]) -> Layout:
    """``(key, shape)`` of the floating-point tensors of a torch state dict, in its order:
    the coordinates a canary direction spans."""
    import torch

    return [(k, tuple(v.shape)) for k, v in state.items() if torch.is_floating_point(v)]


def _flatten(state: Mapping[str, Any], layout: Layout) -> np.ndarray:
    return np.concatenate([np.asarray(state[k].detach().cpu().numpy(), dtype=np.float64)
                           .ravel() for k, _ in layout])


@dataclass
class CanaryScorer:
    """Scores every canary direction against the models a run releases.

    ``directions`` rows ``[0, inserted)`` are the inserted canaries, the rest held out.
    Call :meth:`observe` with each round's model (round 0: the initial one).
    """

    directions: np.ndarray
    inserted: int
    layout: Layout
    _initial: np.ndarray | None = None
    _previous: np.ndarray | None = None
    _best_round: np.ndarray | None = None
    rounds_seen: int = 0

    def observe(self, server_round: int, state: Mapping[str, Any]) -> None:
        vec = _flatten(state, self.layout)
        if server_round < 1 or self._initial is None:
            self._initial = self._previous = vec
            return
        assert self._previous is not None
        step = stats.cosine_scores(self.directions, vec - self._previous)
        self._best_round = step if self._best_round is None else np.maximum(self._best_round,
                                                                            step)
        self._previous = vec
        self.rounds_seen += 1

    def scores(self) -> dict[str, np.ndarray]:
        """``final_model`` and ``every_round`` scores of all directions (inserted first)."""
        if self._initial is None or self._previous is None or self._best_round is None:
            raise RuntimeError("audit: no round was observed")
        return {"final_model": stats.cosine_scores(self.directions,
                                                   self._previous - self._initial),
                "every_round": self._best_round}


def _choose_canaries(*, num_clients: int, canaries: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, _PICK_TAG])
    return sorted(int(i) for i in rng.choice(num_clients, size=canaries, replace=False))


def _check(config: RunConfig, *, canaries: int, held_out: int, backend: str) -> None:
    n = config.dp.num_clients
    if backend != "vectorized":
        raise ValueError(f"backend: the audit runs on the vectorized backend (--backend "
                         f"vectorized), got {backend!r}")
    if not 2 <= canaries < n:
        raise ValueError(f"canaries must be in [2, num-clients={n}) (they replace clients of "
                         f"the run), got {canaries}")
    if held_out < 2:
        raise ValueError(f"held-out must be >= 2, got {held_out}")
    out = config.output_dir
    if out is None:
        raise ValueError("output-dir: the audit writes audit.json there; set it (--output)")
    if results.read_rounds(out) or (out / AUDIT_FILE).exists():
        raise ValueError(f"output-dir: {str(out)!r} holds an earlier run; an audit scores "
                         "every round of one session, so it cannot resume: choose a new "
                         "folder (--output)")


def run_audit(config: RunConfig, *, canaries: int, held_out: int | None = None,
              audit_seed: int = 0, confidence: float = 0.95, backend: str = "vectorized",
              options: Any = None,
              on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``config`` with ``canaries`` of its clients replaced by canary clients; score
    them and ``held_out`` (default ``canaries``) unused directions; write and return the
    report (``audit.json`` in ``output-dir``).

    Args:
        config: the run to audit (any mechanism and sampling mode).
        canaries: clients replaced by canaries (chosen with ``audit_seed``).
        held_out: directions drawn but never inserted.
        audit_seed: seed of the canary choice and directions (public: the auditor's).
        confidence: of the Clopper-Pearson lower bound.
        backend: must be ``vectorized``.
        options: :class:`simulations.backends.BackendOptions`.
        on_round: per-round callback (progress display).
    """
    from clients.config import client_config

    from .backends import BackendOptions
    from .backends import vectorized as vec
    from .runner import preflight, run_simulation
    from .server_app import with_default_checkpoint

    held = canaries if held_out is None else int(held_out)
    config = with_default_checkpoint(config.absolute())
    _check(config, canaries=int(canaries), held_out=held, backend=backend)
    preflight(config)
    opts = options or BackendOptions()
    dp = config.dp
    picked = _choose_canaries(num_clients=dp.num_clients, canaries=int(canaries),
                              seed=audit_seed)
    flat = config.to_run_config()
    grid = vec.VectorizedGrid(config=client_config(flat), num_nodes=dp.num_clients,
                              device=opts.device or vec.default_device(),
                              chunk_size=opts.chunk_size)
    layout = audit_layout(grid.template_state())
    dim = sum(math.prod(shape) for _, shape in layout)
    directions = stats.unit_directions(count=int(canaries) + held, dim=dim,
                                       seed=[audit_seed, _DIRECTION_TAG])
    grid.set_canaries({pid: directions[i] for i, pid in enumerate(picked)}, layout=layout,
                      norm=float(dp.clip_norm))
    scorer = CanaryScorer(directions=directions, inserted=int(canaries), layout=layout)

    def observe(server_round: int, arrays: Any) -> None:
        scorer.observe(server_round, arrays.to_torch_state_dict())

    summary = run_simulation(config, backend=vec.run_on(grid), options=opts,
                             on_round=on_round, on_model=observe)
    report = audit_report(scorer=scorer, summary=summary, confidence=confidence,
                          seed=audit_seed, norm=float(dp.clip_norm))
    results.write_json(config.output_dir / AUDIT_FILE, report)
    return report


def audit_report(*, scorer: CanaryScorer, summary: Mapping[str, Any], confidence: float,
                 seed: int, norm: float) -> dict[str, Any]:
    """The ``audit.json`` object: per threat model, the one-shot estimate and the lower
    bound, beside the run's claimed (epsilon, delta)."""
    delta = float(summary.get("delta") or 0.0) or 1e-5
    k = scorer.inserted
    out: dict[str, Any] = {
        "claimed_epsilon": summary.get("epsilon"),
        "delta": delta,
        "epsilon_bound": summary.get("epsilon_bound"),
        "arm": summary.get("arm"),
        "mechanism": summary.get("mechanism"),
        "sampling": summary.get("sampling"),
        "final_accuracy": summary.get("final_accuracy"),
        "canaries": {"inserted": k, "held_out": int(scorer.directions.shape[0]) - k,
                     "norm": norm, "audit_seed": seed, "dimension": int(
                         scorer.directions.shape[1]), "rounds": scorer.rounds_seen},
        "note": ("one_shot: Andrew et al.'s estimate (an estimate, not a bound); "
                 "lower_bound: Clopper-Pearson at the given confidence, Bonferroni over "
                 "thresholds, canary scores treated as independent; a lower bound below the "
                 "claim does not show the claim is tight"),
    }
    for threat, scores in scorer.scores().items():
        ins, held = scores[:k], scores[k:]
        out[threat] = {
            "one_shot": stats.one_shot_epsilon(inserted=ins, held_out=held, delta=delta),
            "lower_bound": stats.epsilon_lower_bound(inserted=ins, held_out=held,
                                                     delta=delta, confidence=confidence),
        }
    return results.jsonable(out)
