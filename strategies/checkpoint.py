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

__all__ = [
    "CHECKPOINT_NAME",
    "FINISHED_NAME",
    "checkpoint_path",
    "fingerprint_digest",
    "finish_checkpoint",
    "load_checkpoint",
    "read_finished",
    "save_checkpoint",
]

CHECKPOINT_NAME = "strategy_state.pt"
#: What a finished run leaves in its checkpoint folder: no secret, only which run finished.
FINISHED_NAME = "finished.json"


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


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A stable hash of a strategy's configuration fingerprint (no secret in it)."""
    import hashlib
    import json

    text = json.dumps(fingerprint, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def finish_checkpoint(checkpoint_dir: str | os.PathLike[str], *, fingerprint: dict[str, Any],
                      rounds: int) -> Path:
    """A run finished: delete its secret state (whoever reads the noise seed or buffers can
    remove the noise from the released models) and leave :data:`FINISHED_NAME`, which makes a
    relaunch of the same configuration an error instead of a second spend of the budget."""
    import json

    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / FINISHED_NAME
    tmp = marker.with_name(f".{FINISHED_NAME}.tmp")
    tmp.write_text(json.dumps({"rounds": int(rounds),
                               "fingerprint": fingerprint_digest(fingerprint)}) + "\n",
                   encoding="utf-8")
    os.replace(tmp, marker)
    checkpoint_path(directory).unlink(missing_ok=True)
    return marker


def read_finished(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The :data:`FINISHED_NAME` record of ``checkpoint_dir``, or ``None``."""
    import json

    path = Path(checkpoint_dir) / FINISHED_NAME
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
