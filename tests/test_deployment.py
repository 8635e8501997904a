"""A real Flower deployment on loopback: ``flower-superlink`` and two ``flower-supernode``
processes (insecure, local ports) started by the test, the fedmf app submitted with
``flwr run`` against that federation, and everything torn down by process ids
(``deployment_helpers``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients_fixtures import write_tiny_cifar
from deployment_helpers import BIN, REPO_ROOT, Loopback

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[dict[str, object]]:
    with Loopback(tmp_path) as fed:
        fed.start_superlink()
        for i in range(2):
            fed.start_supernode(f"supernode{i}", f"partition-id={i} num-partitions=2")
        yield {"env": fed.env, "tmp": tmp_path}


def test_flwr_run_against_loopback_deployment(federation: dict[str, object]) -> None:
    tmp = federation["tmp"]
    assert isinstance(tmp, Path)
    data = tmp / "data"
    write_tiny_cifar(data)
    out = tmp / "out"
    run_config = (f"data-dir='{data}' output-dir='{out}' rounds=2 num-clients=2 "
                  "clients-per-round=1 mechanism='bisr' bands=1 batch-size=8 epsilon=8.0 "
                  "max-test-examples=20")
    res = subprocess.run([str(BIN / "flwr"), "run", str(REPO_ROOT), "loopback",
                          "--run-config", run_config, "--stream"],
                         env=federation["env"], capture_output=True, text=True, timeout=400,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    deadline = time.monotonic() + 120  # --stream returns when the run's logs end
    while not (out / "summary.json").exists():
        assert time.monotonic() < deadline, res.stdout[-3000:]
        time.sleep(0.5)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["mechanism"] == "bisr"
    assert summary["rounds_completed"] == 2
    assert summary["epsilon"] == pytest.approx(8.0, rel=1e-3)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["epsilon_spent"] is not None for r in rounds)
