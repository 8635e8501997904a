"""Every script in ``examples/`` runs as a user would run it (a subprocess, a fresh working
directory, offline, caches and private state in tmp) and prints what its header promises."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deployment_helpers import free_port, pids_mentioning

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, tmp_path: Path, *args: str, timeout: float = 300) -> str:
    """Run ``examples/<script>`` with cwd in tmp; fail with its output unless it exits 0."""
    env = {**os.environ, "FEDMF_CACHE_DIR": str(tmp_path / "cache"),
           "FEDMF_STATE_DIR": str(tmp_path / "state"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    env.pop("FEDMF_DATA_DIR", None)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_example_is_tested() -> None:
    tested = {"own_server_app.py", "plan_and_calibrate.py", "compare_mechanisms.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
    app = EXAMPLES / "flwr_app"
    assert {p.name for p in app.iterdir() if p.is_file()} == {
        "pyproject.toml", "README.md", "loopback.sh"}


def _check_summary(summary: dict[str, object], *, mechanism: str, rounds: int) -> None:
    assert summary["mechanism"] == mechanism
    assert summary["rounds"] == rounds
    assert summary["epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert summary["delta"] == 1e-5


def test_own_server_app(tmp_path: Path) -> None:
    """The user's own apps, in process: ε as targeted, and the model learned despite the
    noise (bsr at ε = 8 with 10 clients per round: error ~0.3 against 1.48 at the start)."""
    out = _run("own_server_app.py", tmp_path, "--mechanism", "bsr", "--rounds", "8")
    lines = out.splitlines()
    assert lines[-2] == "mechanism=bsr rounds=8 epsilon=8.000 delta=1e-05", out
    error = float(lines[-1].split("|w - w_true| = ")[1].split()[0])
    initial = float(lines[-1].split("initial model: ")[1].rstrip(")"))
    assert error < 0.5 * initial, lines[-1]


def _flwr_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "flwr_home").mkdir(exist_ok=True)
    return env


@pytest.mark.slow
@pytest.mark.ray
def test_flwr_app_on_a_local_simulation(tmp_path: Path) -> None:
    """``flwr run examples/flwr_app --stream`` as the example's README says."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 39093)) == 0:
            pytest.skip("a local Flower SuperLink already listens on 39093; flwr run would use it")
    result = tmp_path / "result.json"
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", str(EXAMPLES / "flwr_app"),
             "--stream", "--federation-config", "num-supernodes=20",
             "--run-config", f"rounds=4 result-file='{result}'"],
            cwd=tmp_path, env=_flwr_env(tmp_path), capture_output=True, text=True, timeout=400,
            check=False)
    finally:  # flwr run leaves its local SuperLink running: stop the one this test started
        for pid in pids_mentioning(str(tmp_path / "flwr_home")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deadline = time.monotonic() + 60  # --stream returns when the run's logs end
    while not result.exists():
        assert time.monotonic() < deadline, proc.stdout[-3000:]
        time.sleep(0.5)
    _check_summary(json.loads(result.read_text("utf-8")), mechanism="bsr", rounds=4)


@pytest.mark.slow
def test_flwr_app_against_a_loopback_superlink(tmp_path: Path) -> None:
    """``bash examples/flwr_app/loopback.sh``: SuperLink, two SuperNodes, ``flwr run``; the
    script prints the ServerApp's summary and leaves no Flower process behind."""
    port = free_port()
    env = {**_flwr_env(tmp_path), "PORT": str(port)}
    proc = subprocess.run(["bash", str(EXAMPLES / "flwr_app" / "loopback.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    _check_summary(summary, mechanism="bsr", rounds=4)
    assert pids_mentioning(f"127.0.0.1:{port}") == []


@pytest.mark.slow
def test_plan_and_calibrate_reproduces_the_readme_sizing(tmp_path: Path) -> None:
    out = _run("plan_and_calibrate.py", tmp_path)
    # the README's sizing: dp-fedavg z = 16.68 / 2.684 at eps 1 / 8, noise norm 39.5 / 6.35
    assert "eps=1: z = 16.68, z·√d/m = 13.2, noise norm = 39.5" in out
    assert "eps=8: z = 2.684, z·√d/m = 2.12, noise norm = 6.35" in out
    bsr = next(line for line in out.splitlines() if line.strip().startswith("bsr:"))
    assert "z =   4.993" in bsr and "26.8" in bsr and "73.6" in bsr, bsr
    assert "fedmf simulate --dataset cifar10" in out


@pytest.mark.slow
def test_compare_mechanisms_writes_a_report(tmp_path: Path) -> None:
    out = _run("compare_mechanisms.py", tmp_path)
    assert "4 finished cell(s)" in out, out
    grid = tmp_path / "work" / "runs" / "example-grid"
    for name in ("report.md", "results.csv", "summary_table.csv", "paired_differences.csv"):
        assert (grid / name).is_file(), name
    assert "bsr" in (grid / "paired_differences.csv").read_text()
    # a second run skips the finished cells instead of training (and spending) them again
    again = _run("compare_mechanisms.py", tmp_path)
    assert again.count("finished, skipped") == 4, again
