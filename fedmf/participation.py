"""Participation schemas: which sets of rounds one user (one unit of privacy) may touch.

* ``single``: one round.
* ``min_sep`` (``b``-min-separation, at most ``k`` participations): any set of at most ``k``
  rounds ``i_1 < i_2 < ...`` with ``i_{j+1} - i_j >= b``.  ``b = 1`` allows consecutive rounds.
  (TF Privacy / jax_privacy count the rounds *between* participations, one less than ``b``.)
* ``cyclic`` (``k``, ``b``): fixed cohorts; a user participates in a SUBSET of
  ``{i, i + b, i + 2b, ...}`` (at most ``k`` rounds, all ``< n``) for one offset ``0 <= i < b``.
  With ``n <= k b`` (the strategies' ``k = ceil(n / b)``) that is any subset of the class.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["KINDS", "Participation"]

KINDS = ("single", "min_sep", "cyclic")


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    v = int(value)  # type: ignore[call-overload]
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


@dataclass(frozen=True)
class Participation:
    """A participation schema (see the module docstring).

    Attributes:
        kind: ``"single"``, ``"min_sep"`` or ``"cyclic"``.
        min_sep: ``b`` (separation / number of cohorts), ``>= 1``.
        max_participations: ``k >= 1``.
    """

    kind: str = "single"
    min_sep: int = 1
    max_participations: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "min_sep", _as_int("min_sep", self.min_sep))
        object.__setattr__(self, "max_participations",
                           _as_int("max_participations", self.max_participations))
        if self.kind == "single" and (self.min_sep, self.max_participations) != (1, 1):
            raise ValueError("kind 'single' needs min_sep=1 and max_participations=1")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def single(cls) -> Participation:
        """Every user participates in at most one round."""
        return cls("single", 1, 1)

    @classmethod
    def min_separation(cls, *, min_sep: int, max_participations: int) -> Participation:
        """``b``-min-separation with at most ``k`` participations."""
        return cls("min_sep", _as_int("min_sep", min_sep),
                   _as_int("max_participations", max_participations))

    @classmethod
    def cyclic(cls, *, max_participations: int, min_sep: int) -> Participation:
        """Fixed cohorts: subsets of ``{i, i + b, ...}`` with at most ``k`` rounds."""
        return cls("cyclic", _as_int("min_sep", min_sep),
                   _as_int("max_participations", max_participations))

    # ----------------------------------------------------------------- helpers
    @property
    def k(self) -> int:
        """``max_participations``."""
        return self.max_participations

    @property
    def b(self) -> int:
        """``min_sep``."""
        return self.min_sep

    def effective_k(self, rounds: int) -> int:
        """Largest number of participations realisable in ``rounds`` rounds."""
        if self.kind == "single":
            return 1
        return min(self.max_participations, (rounds - 1) // self.min_sep + 1)

    def validate(self, rounds: int) -> None:
        """Raise ``ValueError`` unless ``k`` participations fit: ``(k - 1) b < rounds``."""
        if isinstance(rounds, bool) or not hasattr(rounds, "__index__") or int(rounds) < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        n = int(rounds)
        if self.kind == "single":
            return
        k, b = self.max_participations, self.min_sep
        if (k - 1) * b >= n:
            raise ValueError(
                f"max_participations must satisfy (k-1)*b < rounds={n}, got k={k}, b={b}")

    def patterns(self, rounds: int) -> Iterator[tuple[int, ...]]:
        """All maximal-or-not allowed participation sets (non-empty), brute force (small n).

        ``single``: ``(i,)``; ``min_sep``: every ``b``-separated set of ``1..k`` rounds;
        ``cyclic``: every non-empty subset of at most ``k`` rounds of ``{i, i + b, ...}``.
        """
        n = int(rounds)
        if self.kind == "single":
            for i in range(n):
                yield (i,)
            return
        k, b = self.max_participations, self.min_sep
        if self.kind == "min_sep":

            def rec(start: int, left: int, prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
                for i in range(start, n):
                    pat = (*prefix, i)
                    yield pat
                    if left > 1:
                        yield from rec(i + b, left - 1, pat)

            yield from rec(0, k, ())
            return
        for offset in range(min(b, n)):
            full = list(range(offset, n, b))
            for size in range(1, min(k, len(full)) + 1):
                yield from itertools.combinations(full, size)
