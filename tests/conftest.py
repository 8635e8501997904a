"""Session-wide test settings: never touch the network, keep caches in tmp."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Set before any test module imports datasets / transformers / flwr.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Private checkpoints (simulations.results.default_checkpoint_dir) never land in ~/.local;
# the folder made here is removed when the session ends.
_STATE_DIR: str | None = None
if "FEDMF_STATE_DIR" not in os.environ:
    _STATE_DIR = os.environ["FEDMF_STATE_DIR"] = tempfile.mkdtemp(prefix="fedmf-state-")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# On a 2-core box, torch's intra-op threads fight with Ray workers and parallel processes
# (small elementwise ops become 50-500x slower); tests use one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

# The tiny-data fixtures, for every test module (imported after the environment above).
from clients_fixtures import (  # noqa: E402, F401
    fedmf_cache_fixture,
    tiny_bert_fixture,
    tiny_data_dir_fixture,
)


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    if _STATE_DIR is not None:
        shutil.rmtree(_STATE_DIR, ignore_errors=True)
