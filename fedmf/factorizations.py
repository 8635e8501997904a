"""Matrix factorizations ``A = B · C`` of a (scheduled) SGD workload.

The release is ``A G + B Z`` (``Z`` i.i.d. Gaussian); the noise added in round ``t`` is
``(C^{-1} Z)_t`` and the privacy cost is governed by ``sens(C)``
(:mod:`fedmf.sensitivity`); errors in :mod:`fedmf.errors`.  Methods (:data:`METHODS`),
with ``T = E(alpha) M(beta)`` the schedule-blind Toeplitz part of the workload
(:mod:`fedmf.workloads`) and ``p = bands``:

* ``identity``  ``C = I`` (DP-SGD / DP-FedAvg with independent noise).
* ``sqrt``      ``C = T^{1/2}`` (Toeplitz; for ``A_1`` the coefficients ``binom(2k, k) / 4^k``
  of ``(1 - x)^{-1/2}``, Fichtenberger et al. 2023; Henzinger et al. 2023).  Closed form
  ``T^{1/2} = T((1 - alpha x)^{-1/2} (1 - beta x)^{-1/2})``, ``O(n log n)``.
* ``bsr``       ``C = band_p(T^{1/2})`` (Kalinin & Lampert 2024, arXiv:2405.13763, BSR).
* ``bisr``      ``C^{-1} = band_p(T^{-1/2})`` (banded inverse square root; only the first ``p``
  power-series coefficients, ``O(p)``), ``C`` its inverse (IIR, ``O(n p)``).
* ``lr-sqrt``   ``C = T(chi)^{1/2}`` with ``chi_t = eta_t / eta_0`` (arXiv:2511.17994,
  learning-rate-aware factorization).  **Choice for momentum / weight decay:** the Toeplitz
  matrix is ``T_lr = T(chi) · A_1^{-1} · T`` (the schedule ratio replaces the prefix-sum factor
  of the schedule-blind part; generating function ``chi(x)(1 - x) / ((1 - alpha x)(1 - beta x))``),
  which is the paper's ``T(chi)`` for plain SGD and ``T`` (i.e. ``sqrt``) for a constant rate.
* ``lr-bisr``   ``C^{-1} = band_p(T_lr^{-1/2})``.
* ``opt-bisr``  ``C^{-1}`` banded Toeplitz with coefficients optimised for the actual workload
  and participation (:func:`fedmf.optimize.optimize_banded_inverse`).
* ``bandmf``    ``C`` banded Toeplitz with coefficients optimised for the actual workload and
  participation (:func:`fedmf.optimize_toeplitz.optimize_banded_toeplitz`; exact
  sensitivity under min-separation when ``bands <= b``).
* ``blt``       buffered linear Toeplitz ``C^{-1}`` (``buffers`` decaying exponentials),
  optimised likewise (:func:`fedmf.optimize_toeplitz.optimize_blt`); noise in
  ``O(buffers d)``.
* ``optimal``   dense optimum (:func:`fedmf.optimize.optimal_dense`; small ``n``).

Errors are always those of the FULL workload: ``B = A C^{-1}`` with the scheduled ``A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from scipy.linalg import solve_triangular

from . import errors as _errors
from .linalg import (
    binomial_series,
    dense_to_band,
    series_inverse,
    series_inverse_sqrt,
    series_mul,
    series_sqrt,
    toeplitz_band,
    toeplitz_dense,
)
from .participation import Participation
from .sensitivity import Sensitivity, sensitivity

if TYPE_CHECKING:  # pragma: no cover
    from .optimize_toeplitz import BLTParams
from .workloads import Workload

__all__ = [
    "BANDED_METHODS",
    "BUFFERED_METHODS",
    "DENSE_METHODS",
    "METHODS",
    "NOISE_KINDS",
    "Factorization",
    "NoiseSpec",
    "factorize",
    "inverse_sqrt_coeffs",
    "sqrt_coeffs",
]

METHODS = ("identity", "sqrt", "bsr", "bisr", "lr-sqrt", "lr-bisr", "opt-bisr", "bandmf", "blt",
           "optimal")
BANDED_METHODS = ("bsr", "bisr", "lr-bisr", "opt-bisr", "bandmf")
#: Methods with a number of buffers.
BUFFERED_METHODS = ("blt",)
DENSE_METHODS = ("sqrt", "lr-sqrt", "optimal")
NOISE_KINDS = ("cinv_band", "c_band", "cinv_blt")
OBJECTIVES = ("mean", "max")


# ----------------------------------------------------------------------- closed forms
def sqrt_coeffs(workload: Workload, length: int | None = None) -> np.ndarray:
    """First ``length`` coefficients of ``T^{1/2}``, ``T = E(alpha) M(beta)``:
    ``(1 - alpha x)^{-1/2} (1 - beta x)^{-1/2}``."""
    n = workload.n if length is None else int(length)
    out = binomial_series(-0.5, n, ratio=workload.alpha)
    if workload.beta:
        out = series_mul(out, binomial_series(-0.5, n, ratio=workload.beta), n)
    return out


def inverse_sqrt_coeffs(workload: Workload, length: int | None = None) -> np.ndarray:
    """First ``length`` coefficients of ``T^{-1/2}``: ``(1 - alpha x)^{1/2} (1 - beta x)^{1/2}``
    (``O(length)``; the ``p``-band of ``T^{-1/2}`` for BISR)."""
    n = workload.n if length is None else int(length)
    out = binomial_series(0.5, n, ratio=workload.alpha)
    if workload.beta:
        out = series_mul(out, binomial_series(0.5, n, ratio=workload.beta), n)
    return out


# ----------------------------------------------------------------------- noise spec
@dataclass(frozen=True)
class NoiseSpec:
    """How the streaming generator realises ``C^{-1} Z``.

    ``kind == "cinv_band"``: ``w_t = sum_j band[t, j] z_{t-j}`` (``band`` = band of ``C^{-1}``).
    ``kind == "c_band"``: ``w_t = (z_t - sum_{j>=1} band[t, j] w_{t-j}) / band[t, 0]``
    (``band`` = band of ``C``; forward substitution).
    ``band`` has shape ``(n, p)``, ``band[t, j] = M[t, t - j]`` (``0`` where ``t - j < 0``).
    ``kind == "cinv_blt"``: ``w_t = z_t + sum_i omega_i s_{i,t}``,
    ``s_{i,t+1} = theta_i s_{i,t} + z_t`` (``C^{-1}`` buffered linear Toeplitz); ``band`` is
    ``(n, 1)`` ones (the diagonal) and ``omega``, ``theta`` hold the ``buffers`` parameters.
    """

    kind: str
    band: np.ndarray
    omega: np.ndarray | None = None
    theta: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        band = np.asarray(self.band, dtype=np.float64)
        if band.ndim != 2 or min(band.shape) < 1:
            raise ValueError(f"band must have shape (n, p) with n, p >= 1, got {band.shape}")
        object.__setattr__(self, "band", band)
        if self.kind == "cinv_blt":
            omega = np.asarray(self.omega, dtype=np.float64).reshape(-1)
            theta = np.asarray(self.theta, dtype=np.float64).reshape(-1)
            if omega.size < 1 or omega.shape != theta.shape:
                raise ValueError("omega and theta must be non-empty and of equal length")
            if not (np.all(np.isfinite(omega)) and np.all((theta > 0) & (theta < 1))):
                raise ValueError("omega must be finite and theta in (0, 1)")
            object.__setattr__(self, "omega", omega)
            object.__setattr__(self, "theta", theta)

    @property
    def bands(self) -> int:
        """``p``: number of stored diagonals (band kinds)."""
        return int(self.band.shape[1])

    @property
    def rounds(self) -> int:
        """``n``."""
        return int(self.band.shape[0])

    @property
    def state_floats(self) -> int:
        """Noise state kept per model parameter between rounds (buffer mode)."""
        if self.kind == "cinv_blt":
            assert self.theta is not None
            return int(self.theta.size)
        return self.bands - 1


# ----------------------------------------------------------------------- factorization
class Factorization:
    """A factorization ``A = B C`` of ``workload`` (see the module docstring).

    Internally ``C`` is either lower-triangular Toeplitz (first columns ``c_coeffs`` of ``C``
    and ``cinv_coeffs`` of ``C^{-1}``; banded methods keep only the ``p`` non-zero band
    coefficients of the banded factor) or dense (``optimal``).  Dense accessors are for small
    ``n``; :meth:`row_norms`, :attr:`max_error`, :attr:`mean_error` use the structure.
    """

    def __init__(
        self,
        *,
        method: str,
        workload: Workload,
        participation: Participation,
        bands: int | None,
        c_coeffs: np.ndarray | None = None,
        cinv_coeffs: np.ndarray | None = None,
        C: np.ndarray | None = None,
        blt: BLTParams | None = None,
    ) -> None:
        if (c_coeffs is None or cinv_coeffs is None) and C is None:
            raise ValueError("c_coeffs and cinv_coeffs (Toeplitz) or C (dense) must be given")
        self.method = method
        self.workload = workload
        self.participation = participation
        self.bands = bands
        self._c = None if c_coeffs is None else np.asarray(c_coeffs, dtype=np.float64)
        self._cinv = None if cinv_coeffs is None else np.asarray(cinv_coeffs, dtype=np.float64)
        self._C = None if C is None else np.asarray(C, dtype=np.float64)
        self.blt = blt

    def __repr__(self) -> str:
        return (f"Factorization(method={self.method!r}, n={self.n}, bands={self.bands}, "
                f"participation={self.participation}, sensitivity={self.sensitivity})")

    @property
    def n(self) -> int:
        """Number of rounds."""
        return self.workload.n

    @property
    def is_toeplitz(self) -> bool:
        """Whether ``C`` is lower-triangular Toeplitz."""
        return self._C is None

    @property
    def c_coeffs(self) -> np.ndarray | None:
        """First column of ``C`` (Toeplitz; ``p`` entries for ``bsr``), else ``None``."""
        return self._c

    @property
    def cinv_coeffs(self) -> np.ndarray | None:
        """First column of ``C^{-1}`` (Toeplitz; ``p`` entries for the banded-inverse methods),
        else ``None``."""
        return self._cinv

    # -------------------------------------------------------------- dense accessors
    def strategy_matrix(self) -> np.ndarray:
        """``C`` (dense; small ``n`` only)."""
        if self._C is not None:
            return self._C.copy()
        return toeplitz_dense(self._c, self.n)

    def noising_matrix(self) -> np.ndarray:
        """``C^{-1}`` (dense; small ``n`` only)."""
        if self._C is not None:
            return solve_triangular(self._C, np.eye(self.n), lower=True)
        return toeplitz_dense(self._cinv, self.n)

    def decoder(self) -> np.ndarray:
        """``B = A C^{-1}`` (dense; small ``n`` only)."""
        A = self.workload.dense()
        if self._C is not None:
            return solve_triangular(self._C, A.T, trans="T", lower=True).T
        return A @ self.noising_matrix()

    # -------------------------------------------------------------- structured quantities
    @cached_property
    def sensitivity(self) -> Sensitivity:
        """Sensitivity of ``C`` under :attr:`participation` (:func:`fedmf.sensitivity`)."""
        if self._C is not None:
            return sensitivity(participation=self.participation, rounds=self.n, C=self._C)
        return sensitivity(participation=self.participation, rounds=self.n, toeplitz=self._c)

    def row_norms(self) -> np.ndarray:
        """``||B_i||_2`` without forming ``B`` when the structure allows
        (:func:`fedmf.errors.decoder_row_norms`)."""
        return self._row_norms.copy()

    @cached_property
    def _row_norms(self) -> np.ndarray:
        if self._C is not None:
            return _errors.decoder_row_norms(workload=self.workload, C=self._C)
        return _errors.decoder_row_norms(workload=self.workload, cinv=self._cinv)

    def noise_row_norms(self) -> np.ndarray:
        """``||(C^{-1})_t||_2``, ``t = 0..n-1``: the std of round ``t``'s noise per unit of
        ``Z``'s std, per coordinate.

        The price of correlation: the released sums see ``B Z`` (small), but each round's
        aggregate receives ``(C^{-1} Z)_t``, whose std is this times the noise std. Identity
        gives 1; ``sens · rms_t ||(C^{-1})_t||`` over identity's ``sqrt(k)`` is how much more
        noise one round sees than under independent noise at equal privacy.
        """
        return self._noise_row_norms.copy()

    @cached_property
    def _noise_row_norms(self) -> np.ndarray:
        n = self.n
        if self._C is not None:
            cinv = self.noising_matrix()
            return np.sqrt(np.einsum("ij,ij->i", cinv, cinv))
        assert self._cinv is not None
        g = np.zeros(n)  # banded-inverse methods keep only the band of C^{-1}: zeros beyond
        g[:min(n, self._cinv.size)] = self._cinv[:n]
        return np.sqrt(np.cumsum(g * g))

    @property
    def max_error(self) -> float:
        """``MaxSE = sens · max_i ||B_i||_2``."""
        return _errors.max_error(sensitivity=self.sensitivity.value, row_norms=self._row_norms)

    @property
    def mean_error(self) -> float:
        """``MeanSE = sens · ||B||_F / sqrt(n)``."""
        return _errors.mean_error(sensitivity=self.sensitivity.value, row_norms=self._row_norms)

    @cached_property
    def noise_spec(self) -> NoiseSpec:
        """Streaming representation of ``C^{-1}`` (:class:`NoiseSpec`)."""
        n = self.n
        if self.method in ("bsr", "bandmf"):  # banded C: forward substitution
            assert self._c is not None and self.bands is not None
            return NoiseSpec(kind="c_band", band=toeplitz_band(self._c, n, self.bands))
        if self.blt is not None:
            return NoiseSpec(kind="cinv_blt", band=np.ones((n, 1)), omega=self.blt.omega,
                             theta=self.blt.theta)
        if self._C is not None:
            return NoiseSpec(kind="cinv_band", band=dense_to_band(self.noising_matrix(), n))
        p = n if self.bands is None else self.bands
        if self.method == "identity":
            p = 1
        return NoiseSpec(kind="cinv_band", band=toeplitz_band(self._cinv, n, p))


# ----------------------------------------------------------------------- factory
def _check_buffers(method: str, buffers: int | None, n: int) -> int | None:
    if method not in BUFFERED_METHODS:
        return None
    if buffers is None:
        raise ValueError(f"buffers must be given for method {method!r} (an integer in "
                         f"[1, {max(n - 1, 1)}])")
    if isinstance(buffers, bool) or not isinstance(buffers, int | np.integer) or not (
            1 <= buffers <= max(n - 1, 1)):
        raise ValueError(f"buffers must be in [1, rounds - 1 = {max(n - 1, 1)}], got {buffers}")
    return int(buffers)


def _check_bands(method: str, bands: int | None, n: int) -> int | None:
    if method not in BANDED_METHODS:
        return None
    if bands is None:
        raise ValueError(f"bands must be given for method {method!r} (an integer in [1, {n}])")
    if isinstance(bands, bool) or not isinstance(bands, int | np.integer) or not 1 <= bands <= n:
        raise ValueError(f"bands must be in [1, rounds={n}], got {bands}")
    return int(bands)


def factorize(
    *,
    method: str,
    workload: Workload,
    participation: Participation | None = None,
    bands: int | None = None,
    objective: str = "mean",
    buffers: int | None = None,
) -> Factorization:
    """Factorize ``workload`` with ``method`` (one of :data:`METHODS`).

    Args:
        method: factorization (module docstring).
        workload: the workload ``A`` (:class:`fedmf.workloads.Workload`).
        participation: participation schema (``None``: single participation).
        bands: ``p`` for the banded methods ``bsr``, ``bisr``, ``lr-bisr``, ``opt-bisr``,
            ``bandmf`` (required, in ``[1, n]``); ignored by the others.
        objective: ``"mean"`` or ``"max"`` (only ``opt-bisr`` optimises it; ``bandmf`` and
            ``blt`` optimise MeanSE).
        buffers: number of buffers of ``blt`` (required, in ``[1, n - 1]``).

    Returns:
        A :class:`Factorization`; its sensitivity is computed eagerly, errors lazily.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(workload, Workload):
        raise ValueError(f"workload must be a fedmf.workloads.Workload, got {type(workload)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    part = participation if participation is not None else Participation.single()
    if not isinstance(part, Participation):
        raise ValueError(f"participation must be a Participation, got {type(part)}")
    n = workload.n
    part.validate(n)
    p = _check_bands(method, bands, n)
    nb = _check_buffers(method, buffers, n)
    kw = {"method": method, "workload": workload, "participation": part, "bands": p}

    if method == "identity":
        fact = Factorization(**kw, c_coeffs=np.ones(1), cinv_coeffs=np.ones(1))
    elif method == "sqrt":
        fact = Factorization(**kw, c_coeffs=sqrt_coeffs(workload),
                             cinv_coeffs=inverse_sqrt_coeffs(workload))
    elif method == "bsr":
        c = sqrt_coeffs(workload, p)
        fact = Factorization(**kw, c_coeffs=c, cinv_coeffs=series_inverse(c, n))
    elif method == "bisr":
        m = inverse_sqrt_coeffs(workload, p)
        fact = Factorization(**kw, c_coeffs=series_inverse(m, n), cinv_coeffs=m)
    elif method == "lr-sqrt":
        if workload.is_constant_rate:
            c, m = sqrt_coeffs(workload), inverse_sqrt_coeffs(workload)
        else:
            c = series_sqrt(workload.rate_toeplitz_coeffs(), n)
            m = series_inverse(c, n)
        fact = Factorization(**kw, c_coeffs=c, cinv_coeffs=m)
    elif method == "lr-bisr":
        m = series_inverse_sqrt(workload.rate_toeplitz_coeffs(p), p)
        fact = Factorization(**kw, c_coeffs=series_inverse(m, n), cinv_coeffs=m)
    elif method == "opt-bisr":
        from .optimize import optimize_banded_inverse

        m = np.asarray(optimize_banded_inverse(workload=workload, participation=part,
                                               bands=p, objective=objective), dtype=np.float64)
        if m.shape != (p,) or m[0] == 0 or not np.all(np.isfinite(m)):
            raise RuntimeError(f"optimize_banded_inverse returned invalid coefficients {m}")
        fact = Factorization(**kw, c_coeffs=series_inverse(m, n), cinv_coeffs=m)
    elif method == "bandmf":
        from .optimize_toeplitz import optimize_banded_toeplitz

        c = optimize_banded_toeplitz(workload=workload, participation=part, bands=p)
        fact = Factorization(**kw, c_coeffs=c, cinv_coeffs=series_inverse(c, n))
    elif method == "blt":
        from .optimize_toeplitz import blt_coeffs, blt_inverse_coeffs, optimize_blt

        assert nb is not None
        params = optimize_blt(workload=workload, participation=part, buffers=nb)
        fact = Factorization(**kw, c_coeffs=blt_coeffs(params, n),
                             cinv_coeffs=blt_inverse_coeffs(params, n), blt=params)
    else:  # optimal
        from .optimize import optimal_dense

        C = np.tril(np.asarray(optimal_dense(workload=workload, participation=part),
                               dtype=np.float64))
        if C.shape != (n, n) or not np.all(np.isfinite(C)) or np.any(np.diagonal(C) == 0):
            raise RuntimeError("optimal_dense returned an invalid strategy matrix")
        fact = Factorization(**kw, C=C)
    _ = fact.sensitivity  # eager: validates the participation against C
    if not math.isfinite(fact.sensitivity.value):
        raise RuntimeError(f"{method}: non-finite sensitivity")
    return fact
