"""Atomic, private persistence of the strategy's server state.

The state contains the secret noise seed, so the file is created with mode ``0600`` (never
world/group readable, independent of the umask) and replaced atomically: it is written to a
temporary file in the same directory, flushed and ``fsync``-ed, then ``os.replace``-d over the
old checkpoint, so a crash at any point leaves either the old or the new complete state.

Format: ``torch.save`` of a dict of plain python / numpy / torch objects, loaded with
``weights_only=False`` (the file is our own private server state; never load a checkpoint from
an untrusted source).

Where a checkpoint goes when none is configured: under :func:`state_root`
(``$FEDMF_STATE_DIR``, default ``~/.local/state/fedmf``), never inside a results folder.  torch
is imported only to save or load, so light modules (``simulations.results``) share that root.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; elsewhere the default folder is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINT_NAME",
    "ENV_STATE_DIR",
    "FINISHED_NAME",
    "checkpoint_path",
    "config_checkpoint_dir",
    "fingerprint_digest",
    "finish_checkpoint",
    "load_checkpoint",
    "locked",
    "read_finished",
    "remove_checkpoint",
    "save_checkpoint",
    "state_root",
]

CHECKPOINT_NAME = "strategy_state.pt"
#: What a finished run leaves in its checkpoint folder: no secret, only which run finished.
FINISHED_NAME = "finished.json"
#: Root of fedmf's private server state (checkpoints); default ``~/.local/state/fedmf``.
ENV_STATE_DIR = "FEDMF_STATE_DIR"
_LOCK_NAME = ".lock"


def state_root() -> Path:
    """``$FEDMF_STATE_DIR`` (default ``~/.local/state/fedmf``), absolute."""
    root = os.environ.get(ENV_STATE_DIR) or Path.home() / ".local" / "state" / "fedmf"
    return Path(root).expanduser().resolve()


def config_checkpoint_dir(*, name: str, fingerprint: dict[str, Any]) -> Path:
    """``<state_root>/checkpoints/<name>-config-<hash>``: the default folder of a strategy
    whose configuration fingerprint is ``fingerprint`` (a relaunch with the same configuration
    finds it again; the hash holds no secret)."""
    return (state_root() / "checkpoints"
            / f"{name}-config-{fingerprint_digest(fingerprint)[:16]}")


def checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Path of the checkpoint file inside ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def save_checkpoint(state: dict[str, Any], checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically to ``checkpoint_dir`` with file mode 0600; return the path."""
    import torch

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
    import torch

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


def remove_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Delete the checkpoint and lock file of ``checkpoint_dir``, then the folder if that
    leaves it empty (a finished run's noise secrets are best not kept at rest)."""
    directory = Path(checkpoint_dir)
    checkpoint_path(directory).unlink(missing_ok=True)
    (directory / _LOCK_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


@contextlib.contextmanager
def locked(checkpoint_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``checkpoint_dir`` for the block.  The OS releases it when the
    process dies, so a crashed run never blocks its relaunch.

    Raises:
        ValueError: another live process holds it; two runs writing one checkpoint would each
            resume from the other's noise state.
    """
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield directory
        return
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"checkpoint_dir: another running process checkpoints a run with the same "
                f"configuration to {str(directory)!r}; give each concurrent run a "
                "checkpoint_dir of its own (checkpoint_dir='' for none)") from None
        yield directory
    finally:
        os.close(fd)  # releases the lock
