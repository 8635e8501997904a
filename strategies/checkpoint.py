"""Atomic, private persistence of the strategy's server state.

The state contains the secret noise seed, so the file is created with mode ``0600`` (never
world/group readable, independent of the umask) and replaced atomically: it is written to a
temporary file in the same directory, flushed and ``fsync``-ed, then ``os.replace``-d over the
old checkpoint, so a crash at any point leaves either the old or the new complete state.

Format: ``torch.save`` of a dict of plain python / numpy / torch objects, loaded with
``weights_only=False`` (the file is our own private server state; never load a checkpoint from
an untrusted source).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "checkpoint_path", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "strategy_state.pt"


def checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Path of the checkpoint file inside ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def save_checkpoint(state: dict[str, Any], checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically to ``checkpoint_dir`` with file mode 0600; return the path."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory)
    fd, tmp = tempfile.mkstemp(prefix=".strategy_state.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename durable.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def load_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved state, or ``None`` if there is no checkpoint in ``checkpoint_dir``."""
    path = checkpoint_path(checkpoint_dir)
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        return torch.load(fh, map_location="cpu", weights_only=False)
