"""``ArrayRecord`` <-> one flat float vector (the layout the server's maths works on).

The DP strategies clip, average, noise and step one flat vector of a model's floating-point
tensors; integer tensors (e.g. ``num_batches_tracked``) stay out of the delta, the clip norm and
the noise, and the server keeps its own values (client values would leak data sizes).
:class:`Layout` records the keys, shapes and dtypes once and maps between the two forms;
:func:`array_to_numpy` / :func:`array_from_numpy` avoid the copies of ``Array.numpy()`` /
``Array(ndarray)``.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["Entry", "Layout", "array_from_numpy", "array_to_numpy", "sq_norm"]

_NUMPY_STYPE = "numpy.ndarray"


def array_to_numpy(arr: Array) -> np.ndarray:
    """Values of a Flower ``Array``; a read-only zero-copy view for NumPy-serialised arrays.

    ``Array.numpy()`` runs ``np.load`` (a copy); here the ``.npy`` header is parsed and the
    data is viewed in place (falls back to ``Array.numpy()`` for other formats).
    """
    if arr.stype == _NUMPY_STYPE:
        try:
            data = arr.data
            size_bytes = 2 if data[6:7] == b"\x01" else 4  # .npy format 1.0 / 2.0+
            length = int.from_bytes(data[8 : 8 + size_bytes], "little")
            shape, fortran, dtype, offset = _npy_header(bytes(data[: 8 + size_bytes + length]))
            if not dtype.hasobject:
                count = math.prod(shape)
                out = np.frombuffer(arr.data, dtype=dtype, count=count, offset=offset)
                return out.reshape(shape, order="F" if fortran else "C")
        except (ValueError, TypeError):
            pass
    return arr.numpy()


@functools.lru_cache(maxsize=4096)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of an ``.npy`` header (parsed once: every
    reply of a round carries the same headers, and numpy parses them with ``literal_eval``)."""
    bio = io.BytesIO(head)
    version = np.lib.format.read_magic(bio)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(bio)
    return tuple(shape), bool(fortran), dtype, bio.tell()


@functools.lru_cache(maxsize=4096)
def _npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` 1.0 header of a C-ordered array (made once per dtype and shape: a
    cohort's replies all carry the same ones)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": shape})
    return header.getvalue()


def array_from_numpy(ndarray: np.ndarray) -> Array:
    """``Array(ndarray)`` (same bytes as ``np.save``) with a single copy of the data."""
    x = np.asarray(ndarray, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    parts: list[Any] = [_npy_header_bytes(x.dtype, x.shape)]
    if x.size:
        parts.append(memoryview(x.reshape(-1)).cast("B"))
    return Array(dtype=str(x.dtype), shape=tuple(int(s) for s in x.shape), stype=_NUMPY_STYPE,
                 data=b"".join(parts))


def sq_norm(x: np.ndarray) -> float:
    """``||x||^2`` accumulated in float64 (exact to ~1e-15 relative, for clip verification at
    1e-6).  ``einsum`` runs single-threaded: a cohort's hundreds of replies are each far too
    small for BLAS threads, which on a busy 2-core machine cost milliseconds per call."""
    flat = x.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


@dataclass(frozen=True)
class Entry:
    """One tensor of the layout."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    is_float: bool
    offset: int  # into the flat float vector (-1 for non-float tensors)
    size: int


@dataclass(frozen=True)
class Layout:
    """Order, shapes and dtypes of a model's tensors; the float ones map to one flat vector."""

    entries: tuple[Entry, ...]
    num_params: int  # number of float parameters

    @classmethod
    def from_description(cls, description: Sequence[tuple[str, Any, Sequence[int], bool]]
                         ) -> Layout:
        """The layout of :meth:`describe`'s output (checkpoints)."""
        entries, offset = [], 0
        for key, dtype, shape, is_float in description:
            size = math.prod(shape)
            entries.append(Entry(str(key), np.dtype(dtype), tuple(int(s) for s in shape),
                                 bool(is_float), offset if is_float else -1, size))
            offset += size if is_float else 0
        if offset == 0:
            raise ValueError("initial_arrays must contain at least one floating-point tensor")
        return cls(tuple(entries), offset)

    @classmethod
    def from_record(cls, record: ArrayRecord) -> Layout:
        """Layout of ``record`` (float tensors concatenated in record order)."""
        return cls.from_description([
            (key, np.dtype(arr.dtype), tuple(arr.shape),
             bool(np.issubdtype(np.dtype(arr.dtype), np.floating)))
            for key, arr in record.items()])

    @property
    def float_entries(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.is_float)

    @property
    def work_dtype(self) -> np.dtype:
        """float64 if any float tensor is float64, else float32."""
        if any(e.dtype == np.float64 for e in self.float_entries):
            return np.dtype(np.float64)
        return np.dtype(np.float32)

    def describe(self) -> list[tuple[str, str, tuple[int, ...], bool]]:
        """Plain-python description (checkpoints, comparisons)."""
        return [(e.key, e.dtype.str, e.shape, e.is_float) for e in self.entries]

    def check(self, record: ArrayRecord) -> str | None:
        """Why ``record`` does not match this layout, or ``None``."""
        keys = {e.key for e in self.entries}
        if set(record.keys()) != keys:
            missing = sorted(keys - set(record.keys()))[:3]
            extra = sorted(set(record.keys()) - keys)[:3]
            return f"keys differ (missing {missing}, unexpected {extra})"
        for e in self.entries:
            arr = record[e.key]
            shape = tuple(int(s) for s in arr.shape)
            if shape != e.shape:
                return f"{e.key!r} has shape {shape}, expected {e.shape}"
            if e.is_float:
                try:
                    dtype = np.dtype(arr.dtype)
                except TypeError:
                    return f"{e.key!r} has unknown dtype {arr.dtype!r}"
                if not np.issubdtype(dtype, np.floating):
                    return f"{e.key!r} has dtype {dtype}, expected a float dtype"
        return None

    def vector(self, record: ArrayRecord) -> np.ndarray:
        """The flat float vector of ``record`` (in :attr:`work_dtype`)."""
        out = np.empty(self.num_params, dtype=self.work_dtype)
        for e in self.float_entries:
            out[e.offset : e.offset + e.size] = array_to_numpy(record[e.key]).reshape(-1)
        return out

    def delta(self, record: ArrayRecord, theta: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out = vector(record) - theta`` without a temporary copy of the record."""
        for e in self.float_entries:
            np.subtract(array_to_numpy(record[e.key]).reshape(-1),
                        theta[e.offset : e.offset + e.size],
                        out=out[e.offset : e.offset + e.size], casting="same_kind")
        return out

    def record(self, theta: np.ndarray, nonfloat: Mapping[str, Array]) -> ArrayRecord:
        """An ``ArrayRecord`` with the original keys, dtypes and shapes: float tensors from
        ``theta``, the others from ``nonfloat``."""
        out: dict[str, Array] = {}
        for e in self.entries:
            if e.is_float:
                piece = theta[e.offset : e.offset + e.size].reshape(e.shape)
                out[e.key] = array_from_numpy(piece.astype(e.dtype, copy=False))
            else:
                out[e.key] = nonfloat[e.key]
        return ArrayRecord(out)
