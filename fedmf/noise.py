"""Streaming correlated Gaussian noise for matrix-factorization DP (DP-FTRL / DP-MF).

For a factorization ``A = B C`` the mechanism adds, in round ``t``, the noise

    w_t = sum_s (C^{-1})_{t,s} z_s,        z_s ~ N(0, std^2 I_d) i.i.d.,

to the clipped, summed model update. :class:`CorrelatedNoise` produces ``w_t`` one round at a
time for model-shaped tensors, from a *noise spec* (``fedmf.factorizations.NoiseSpec``) that
describes ``C^{-1}`` by its lower band: ``spec.band[t, j] = M[t, t-j]`` (zero where ``t-j < 0``),
with ``spec.kind``

* ``"cinv_band"`` -- ``M = C^{-1}`` is banded (BISR, banded-inverse):
  ``w_t = sum_{j<p} band[t, j] z_{t-j}``;
* ``"c_band"`` -- ``M = C`` is banded (BSR): forward substitution
  ``w_t = (z_t - sum_{j>=1} band[t, j] w_{t-j}) / band[t, 0]``.

The spec is duck-typed (only ``spec.kind`` and ``spec.band`` are read), so this module does not
import :mod:`fedmf.factorizations`.

Randomness.  The unit draw ``z_s`` of round ``s`` is produced by a fresh ``torch.Generator`` on the
computing device seeded with a keyed BLAKE2b hash of ``(seed, s)`` (a counter-based construction):
every round has its own generator seed, so a draw is never reused across rounds, a restored
generator continues exactly where it stopped, and the ``"seed"`` memory mode can regenerate old
draws instead of storing them.  The stream depends on the device type (CPU Mersenne Twister vs.
CUDA Philox), not on the number of threads.  The secret seed defaults to
``secrets.randbits(63)``; it is part of :meth:`CorrelatedNoise.state_dict` (keep checkpoints
private) but never appears in ``repr`` or in log messages.

Memory modes.

* ``"buffer"`` keeps a ``(p, d)`` ring buffer on the device -- the last ``p`` unit draws for
  ``cinv_band`` (the current one included), the last ``p - 1`` outputs plus the current draw for
  ``c_band`` -- and forms ``w_t`` with one matrix-vector product (``torch.mv``) of the buffer with
  ``p`` coefficients (the noise std folded in).  Memory ``O(p d)``, time one pass over the buffer.
* ``"seed"`` (``cinv_band`` only) keeps no draws: it regenerates ``z_{t-j}`` for ``j < p`` every
  round.  Memory ``O(d)``, time ``O(p d)`` dominated by the random-number generator.  ``c_band``
  needs all past outputs (``C^{-1}`` is dense), so ``mode="seed"`` with ``kind="c_band"`` raises
  ``ValueError`` instead of replaying the whole history.

Both modes give the same stream for the same seed (the same draws ``z_s``), equal up to the
floating-point rounding of the order in which the ``p`` terms are summed.

All parameters of a structure are flattened into one vector (concatenated in structure order), so
the noise is i.i.d. across all parameters; the maths is done in ``dtype`` (float32 by default,
float64 for tests) with float64 coefficients cast to it, and the result is split back into the
shapes, dtypes and devices of the ``like`` argument.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["KINDS", "MODES", "CorrelatedNoise"]

logger = logging.getLogger(__name__)

KINDS = ("cinv_band", "c_band", "cinv_blt")
MODES = ("buffer", "seed")
_STATE_VERSION = 1
_SEED_BOUND = 1 << 63
_HASH_KEY = b"fedmf.noise.v1"

TensorLike = (
    torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
)


def _round_seed(seed: int, s: int) -> int:
    """Generator seed of round ``s``: keyed BLAKE2b of ``(seed, s)``, 63 bits."""
    h = hashlib.blake2b(
        seed.to_bytes(8, "little") + s.to_bytes(8, "little"), digest_size=8, key=_HASH_KEY
    )
    return int.from_bytes(h.digest(), "little") & (_SEED_BOUND - 1)


def _band_digest(band: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(band, dtype=np.float64).tobytes()).hexdigest()


def _flatten(like: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """Tensors of ``like`` in order and a function rebuilding the structure from new tensors."""
    if isinstance(like, torch.Tensor):
        return [like], lambda ts: ts[0]
    if isinstance(like, Mapping):
        keys = list(like.keys())
        tensors = [like[k] for k in keys]
        return tensors, lambda ts: dict(zip(keys, ts, strict=True))
    if isinstance(like, list | tuple):
        is_tuple = isinstance(like, tuple)
        tensors = list(like)
        return tensors, (lambda ts: tuple(ts)) if is_tuple else (lambda ts: list(ts))
    raise ValueError(
        f"like must be a Tensor, a list/tuple of Tensors or a dict of Tensors, got {type(like)}"
    )


class CorrelatedNoise:
    """Round-by-round generator of ``w_t = (C^{-1} Z)_t`` for model-shaped tensors.

    Args:
        spec: noise spec with ``kind`` in :data:`KINDS` and ``band`` of shape ``(n, p)``
            (float64), ``band[t, j] = M[t, t-j]``; see the module docstring.
        std: standard deviation of the i.i.d. draws ``z_s`` (``noise_multiplier * clip``);
            ``0`` gives zero noise.
        seed: secret seed in ``[0, 2**63)``; ``None`` draws one with ``secrets.randbits(63)``.
        mode: ``"buffer"`` (``O(p d)`` memory) or ``"seed"`` (``O(d)`` memory, ``cinv_band``
            only).
        device: device of the computation and of the buffers; ``None`` uses the device of the
            first tensor passed to :meth:`next`.
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
    """

    def __init__(
        self,
        *,
        spec: Any,
        std: float,
        seed: int | None = None,
        mode: str = "buffer",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        kind = getattr(spec, "kind", None)
        if kind not in KINDS:
            raise ValueError(f"spec.kind must be one of {KINDS}, got {kind!r}")
        band = np.array(getattr(spec, "band", None), dtype=np.float64)
        if band.ndim != 2 or band.shape[0] < 1 or band.shape[1] < 1:
            raise ValueError(f"spec.band must have shape (n, p) with n, p >= 1, got {band.shape}")
        if not np.all(np.isfinite(band)):
            raise ValueError("spec.band must be finite")
        if kind == "c_band" and np.any(band[:, 0] == 0.0):
            raise ValueError("spec.band[:, 0] (diagonal of C) must be nonzero for kind 'c_band'")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "seed" and kind in ("c_band", "cinv_blt"):
            raise ValueError(
                f"mode='seed' is not supported for kind={kind!r} (C^{{-1}} is dense, so every "
                "round would replay the whole history); use mode='buffer'"
            )
        omega = theta = None
        if kind == "cinv_blt":
            omega = np.asarray(getattr(spec, "omega", None), dtype=np.float64).reshape(-1)
            theta = np.asarray(getattr(spec, "theta", None), dtype=np.float64).reshape(-1)
            if omega.size < 1 or omega.shape != theta.shape or not np.all(np.isfinite(omega)) \
                    or not np.all((theta > 0) & (theta < 1)):
                raise ValueError("spec.omega / spec.theta must be equal-length, finite, with "
                                 "theta in (0, 1), for kind 'cinv_blt'")
        if isinstance(std, bool) or not (
            isinstance(std, numbers.Real) and math.isfinite(std) and std >= 0
        ):
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an int in [0, 2**63), got {type(seed).__name__}")
        seed = int(seed)
        if not 0 <= seed < _SEED_BOUND:
            raise ValueError("seed must be an int in [0, 2**63)")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

        n, p = band.shape
        # Zero any coefficient that refers to a round before 0 (band[t, j] with j > t).
        band = band * (np.arange(p)[None, :] <= np.arange(n)[:, None])
        self._kind: str = kind
        self._band: np.ndarray = band
        self._omega, self._theta = omega, theta
        if theta is not None:
            p = theta.size  # the buffers s_i
        self._n: int = int(n)
        self._p: int = int(p)
        self._std: float = float(std)
        self._seed: int = seed
        self._mode: str = mode
        self._dtype: torch.dtype = dtype
        self._device: torch.device | None = None if device is None else torch.device(device)
        self._round: int = 0
        self._num_params: int | None = None
        self._buffer: torch.Tensor | None = None  # (p, d) ring buffer, buffer mode
        self._coef: torch.Tensor | None = None  # (n, p) ring-ordered coefficients on device
        self._saved_device_type: str | None = None  # device type of a restored state
        logger.debug("created %r", self)

    # ------------------------------------------------------------------ properties
    @property
    def round(self) -> int:
        """Index of the next round to be generated (0-based)."""
        return self._round

    @property
    def rounds(self) -> int:
        """Number of rounds ``n`` of the spec."""
        return self._n

    @property
    def bands(self) -> int:
        """Number of bands ``p`` of the spec."""
        return self._p

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def std(self) -> float:
        return self._std

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def num_params(self) -> int | None:
        """Total number of parameters ``d``, fixed by the first call to :meth:`next`."""
        return self._num_params

    def __repr__(self) -> str:  # never shows the seed
        return (
            f"CorrelatedNoise(kind={self._kind!r}, rounds={self._n}, bands={self._p}, "
            f"mode={self._mode!r}, std={self._std:g}, round={self._round}, "
            f"num_params={self._num_params}, device={self._device}, dtype={self._dtype})"
        )

    # ------------------------------------------------------------------ internals
    def _ring_coefficients(self) -> np.ndarray:
        """``R[t, slot]``: weight of ring-buffer row ``slot`` in round ``t`` (std folded in)."""
        n, p, band = self._n, self._p, self._band
        R = np.zeros((n, p), dtype=np.float64)
        t = np.arange(n)
        for j in range(p):
            rows = t[t >= j]
            slots = (rows - j) % p
            if self._kind == "cinv_band":
                R[rows, slots] = self._std * band[rows, j]
            elif j == 0:
                R[rows, slots] = self._std / band[rows, 0]
            else:
                R[rows, slots] = -band[rows, j] / band[rows, 0]
        return R

    def _digest(self) -> str:
        """Hash of the noising matrix (checkpoints must match the spec)."""
        parts = [self._band.ravel()]
        if self._theta is not None:
            parts += [self._omega, self._theta]
        return _band_digest(np.concatenate(parts))

    def _ensure_device(self, device: torch.device) -> torch.device:
        if self._device is None:
            self._device = device
        if self._saved_device_type not in (None, self._device.type):
            if self._mode == "seed":
                # seed mode regenerates past draws: on another generator they would differ from
                # the draws already added, and the released noise would no longer be C^{-1} Z
                raise ValueError(
                    f"device: the noise state was produced on {self._saved_device_type} in "
                    f"noise-mode 'seed', which regenerates past draws with that device's "
                    f"generator; resume on {self._saved_device_type} (this run is on "
                    f"{self._device.type}) or use noise-mode 'buffer'"
                )
            logger.warning(
                "restored noise state was produced on %s but continues on %s: future draws "
                "follow that device's generator (still fresh, but not the saved stream)",
                self._saved_device_type,
                self._device.type,
            )
        self._saved_device_type = None
        if self._mode == "buffer":
            if self._coef is None or self._coef.device != self._device:
                coef = (np.stack([self._omega, self._theta]) if self._theta is not None
                        else self._ring_coefficients())
                self._coef = torch.as_tensor(coef, dtype=self._dtype, device=self._device)
            if self._buffer is not None and self._buffer.device != self._device:
                self._buffer = self._buffer.to(self._device)
        return self._device

    def _draw(self, s: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` with the unit draw ``z_s`` (a function of ``(seed, s)`` and device only)."""
        gen = torch.Generator(device=out.device)
        gen.manual_seed(_round_seed(self._seed, s))
        return out.normal_(0.0, 1.0, generator=gen)

    def _step_blt(self, t: int, d: int, device: torch.device) -> torch.Tensor:
        """``w_t = std (z_t + sum_i omega_i s_i)``, then ``s_i <- theta_i s_i + z_t``."""
        if self._buffer is None:
            self._buffer = torch.zeros((self._p, d), dtype=self._dtype, device=device)
        assert self._coef is not None
        omega, theta = self._coef[0], self._coef[1]
        z = self._draw(t, torch.empty(d, dtype=self._dtype, device=device))
        w = torch.addmv(z, self._buffer.t(), omega)
        self._buffer.mul_(theta[:, None]).add_(z)
        return w.mul_(self._std)

    def _step_buffer(self, t: int, d: int, device: torch.device) -> torch.Tensor:
        if self._theta is not None:
            return self._step_blt(t, d, device)
        if self._buffer is None:
            self._buffer = torch.zeros((self._p, d), dtype=self._dtype, device=device)
        buf = self._buffer
        slot = t % self._p
        self._draw(t, buf[slot])
        assert self._coef is not None
        w = torch.mv(buf.t(), self._coef[t])
        if self._kind == "c_band":
            buf[slot].copy_(w)
        return w

    def _step_seed(self, t: int, d: int, device: torch.device) -> torch.Tensor:
        w = torch.empty(d, dtype=self._dtype, device=device)
        self._draw(t, w)
        w.mul_(self._std * float(self._band[t, 0]))
        scratch: torch.Tensor | None = None
        for j in range(1, min(t, self._p - 1) + 1):
            c = float(self._band[t, j])
            if c == 0.0:
                continue
            if scratch is None:
                scratch = torch.empty(d, dtype=self._dtype, device=device)
            w.add_(self._draw(t - j, scratch), alpha=self._std * c)
        return w

    # ------------------------------------------------------------------ public API
    def next(self, like: TensorLike) -> TensorLike:
        """Noise ``w_t`` of the next round ``t``, shaped like ``like``.

        Args:
            like: a floating-point Tensor, a list/tuple of them or a dict name -> Tensor; only
                shapes, dtypes and devices are used.  The total size ``d`` must be the same in
                every round.

        Returns:
            The same structure with new tensors of the same shapes, dtypes and devices.

        Raises:
            ValueError: past the last round ``n - 1``, on a size change, or on non-float tensors.
        """
        tensors, rebuild = _flatten(like)
        if not tensors:
            raise ValueError("like must contain at least one tensor")
        for i, x in enumerate(tensors):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"like[{i}] must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise ValueError(f"like[{i}] must be a floating-point tensor, got {x.dtype}")
        sizes = [x.numel() for x in tensors]
        d = int(sum(sizes))
        if d == 0:
            raise ValueError("like must have at least one element")
        if self._num_params is not None and d != self._num_params:
            raise ValueError(
                f"like has {d} parameters but this generator was started with {self._num_params}"
            )
        t = self._round
        if t >= self._n:
            raise ValueError(
                f"round {t} is past the last round {self._n - 1} of the factorization "
                f"(n={self._n}); refusing to generate more noise"
            )
        device = self._ensure_device(tensors[0].device)
        if self._mode == "buffer":
            w = self._step_buffer(t, d, device)
        else:
            w = self._step_seed(t, d, device)
        self._num_params = d
        self._round = t + 1

        out: list[torch.Tensor] = []
        offset = 0
        for x, size in zip(tensors, sizes, strict=True):
            piece = w[offset : offset + size].view(x.shape)
            offset += size
            out.append(piece.to(device=x.device, dtype=x.dtype))
        return rebuild(out)

    def memory_bytes(self, num_params: int) -> int:
        """Predicted peak device memory of one round for ``num_params`` parameters.

        Counts the persistent state, the per-round scratch and the flat output vector (the
        caller receives views into it when its dtype/device match): ``buffer`` mode
        ``(p + 1) d`` elements plus the ``n x p`` coefficient table; ``seed`` mode ``2 d``
        elements (``d`` if ``p == 1``).  Conversions to other dtypes/devices are not counted.
        """
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        item = torch.empty((), dtype=self._dtype).element_size()
        if self._theta is not None:  # buffers, the draw and the output
            return item * ((self._p + 2) * num_params + 2 * self._p)
        if self._mode == "buffer":
            return item * ((self._p + 1) * num_params + self._n * self._p)
        return item * (2 if self._p > 1 else 1) * num_params

    def state_dict(self) -> dict[str, Any]:
        """Complete generator state (``torch.save``-able; contains the secret seed)."""
        return {
            "version": _STATE_VERSION,
            "kind": self._kind,
            "rounds": self._n,
            "bands": self._p,
            "band_sha256": self._digest(),
            "mode": self._mode,
            "std": self._std,
            "seed": self._seed,
            "round": self._round,
            "num_params": self._num_params,
            "dtype": str(self._dtype).removeprefix("torch."),
            "device": None if self._device is None else str(self._device),
            "buffer": None if self._buffer is None else self._buffer.detach().to("cpu").clone(),
        }

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        spec: Any,
        device: torch.device | str | None = None,
    ) -> CorrelatedNoise:
        """Rebuild a generator from :meth:`state_dict`; it continues the same stream exactly.

        Args:
            state: output of :meth:`state_dict` (possibly after ``torch.save``/``torch.load``).
            spec: the same noise spec as the saved generator (checked by a hash of the band).
            device: computing device; ``None`` uses the device of the next ``like``.  The
                stream of future draws depends on the device type: in ``"buffer"`` mode a
                warning is logged when it differs from the saved one (past draws are in the
                buffer); in ``"seed"`` mode, which regenerates past draws, a different device
                type raises ``ValueError``.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version must be {_STATE_VERSION}, got {state.get('version')}")
        dtype = getattr(torch, str(state["dtype"]))
        obj = cls(
            spec=spec,
            std=state["std"],
            seed=state["seed"],
            mode=state["mode"],
            device=device,
            dtype=dtype,
        )
        if obj._kind != state["kind"] or (obj._n, obj._p) != (state["rounds"], state["bands"]):
            raise ValueError(
                f"spec does not match the saved state: kind/shape {obj._kind}/{(obj._n, obj._p)} "
                f"vs {state['kind']}/{(state['rounds'], state['bands'])}"
            )
        if obj._digest() != state["band_sha256"]:
            raise ValueError("spec does not match the saved state: band coefficients differ")
        saved = state.get("device")
        obj._saved_device_type = None if saved is None else torch.device(saved).type
        if obj._device is not None:
            obj._ensure_device(obj._device)  # refuse a seed-mode device change right away
        obj._round = int(state["round"])
        obj._num_params = None if state["num_params"] is None else int(state["num_params"])
        buffer = state.get("buffer")
        if buffer is not None:
            buffer = torch.as_tensor(buffer).to(dtype=dtype).clone()
            if obj._num_params is None or tuple(buffer.shape) != (obj._p, obj._num_params):
                raise ValueError(f"state buffer has shape {tuple(buffer.shape)}, inconsistent")
            if obj._device is not None:
                buffer = buffer.to(obj._device)
            obj._buffer = buffer
        return obj
