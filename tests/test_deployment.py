"""A real Flower deployment on loopback: ``flower-superlink`` and two ``flower-supernode``
processes (insecure, local ports) started by the test, the fedmf app submitted with
``flwr run`` against that federation, and everything torn down by process ids.

Flower 1.42 serves each component's APIs over HTTP on one ``--host``/``--port``; ``flwr run``
finds the SuperLink through a named connection in ``$FLWR_HOME/config.toml``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients_fixtures import write_tiny_cifar

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process {proc.args[0]} exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} did not open within {timeout} s")


def _pids_mentioning(token: str) -> list[int]:
    """Processes whose command line contains ``token`` (Flower detaches its SuperExec and
    app processes into new sessions, so a process group kill does not reach them)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if token in cmd:
            out.append(int(entry.name))
    return out


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[dict[str, object]]:
    port = _free_port()
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr_home"),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FEDMF_CACHE_DIR=str(tmp_path / "cache"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FEDMF_DATA_DIR", None)
    home = Path(env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    tokens = [f"127.0.0.1:{port}"]

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        link = start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                   "--port", str(port), "--database", ":flwr-in-memory:",
                                   "--disable-runtime-dependency-installation"])
        _wait_for_port(port, link)
        for i in range(2):
            node_port = _free_port()
            tokens.append(f"127.0.0.1:{node_port}")
            start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink",
                                    f"127.0.0.1:{port}", "--host", "127.0.0.1",
                                    "--port", str(node_port), "--node-config",
                                    f"partition-id={i} num-partitions=2"])
        yield {"env": env, "tmp": tmp_path}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for token in tokens:  # detached SuperExec / ServerApp / ClientApp processes
            for pid in _pids_mentioning(token):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for log in logs:
            log.close()


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
