"""A real Flower deployment on loopback for the deployment tests: ``flower-superlink`` and
``flower-supernode`` processes (insecure, free local ports), ``flwr run`` against them, and
teardown by process id.

Flower 1.42 serves each component's APIs over HTTP on one ``--host``/``--port``; ``flwr run``
finds the SuperLink through a named connection (``loopback``) in ``$FLWR_HOME/config.toml``.
Flower detaches its SuperExec, ServerApp and ClientApp processes into sessions of their own, so
a process-group kill does not reach them: :meth:`Loopback.close` also kills every process whose
command line names one of this federation's addresses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

__all__ = ["BIN", "REPO_ROOT", "Loopback", "free_port", "pids_mentioning", "stage_app",
           "wait_for_port"]

#: What the fedmf app consists of (the FAB ``flwr run`` builds from the repository).
APP_FILES = ("pyproject.toml", "fedmf", "clients", "simulations", "strategies")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process {proc.args[0]} exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} did not open within {timeout} s")


def pids_mentioning(*tokens: str) -> list[int]:
    """Processes (other than this one) whose command line contains every one of ``tokens``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(token in cmd for token in tokens):
            out.append(int(entry.name))
    return out


def stage_app(dest: Path) -> Path:
    """A copy of the fedmf app (:data:`APP_FILES`) in ``dest`` for ``flwr run``: building the
    FAB walks every file under the app folder, the repository's virtual environment included,
    which costs ~10 s per launch on a busy 2-core CPU; the copy holds the same sources."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class Loopback:
    """One SuperLink address on loopback, its SuperNodes and the processes Flower spawns.

    Every process is started in a session of its own with output to ``<tmp>/<name>.log`` and
    killed by :meth:`close` (also on failure: use it as a context manager).
    """

    def __init__(self, tmp: Path, *, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, FLWR_HOME=str(tmp / "flwr_home"),
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        FEDMF_CACHE_DIR=str(tmp / "cache"),
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {}))
        self.env.pop("FEDMF_DATA_DIR", None)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "{self.address}"\ninsecure = true\n', encoding="utf-8")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.superlink: subprocess.Popen[bytes] | None = None
        self._tokens = [self.address]
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``BIN/args[0]`` with ``args[1:]``, appending its output to ``<name>.log``."""
        log = self.log(name).open("ab")
        self._logs.append(log)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> subprocess.Popen[bytes]:
        """A SuperLink with in-memory state on :attr:`port` (a restart forgets every node)."""
        self.superlink = self.start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, self.superlink)
        return self.superlink

    def start_supernode(self, name: str, node_config: str) -> subprocess.Popen[bytes]:
        """A SuperNode with ``--node-config node_config`` (TOML: strings in quotes)."""
        node_port = free_port()
        self._tokens.append(f"127.0.0.1:{node_port}")
        return self.start(name, ["flower-supernode", "--insecure", "--superlink", self.address,
                                 "--host", "127.0.0.1", "--port", str(node_port),
                                 "--node-config", node_config])

    def flwr_run(self, run_config: str, *, stream: bool, app: Path = REPO_ROOT,
                 log_name: str = "flwr_run") -> subprocess.Popen[bytes]:
        """``flwr run <app> loopback --run-config ...`` (``--stream``: it prints the
        ServerApp's log and returns when the run ends; otherwise it returns once submitted)."""
        return self.start(log_name, ["flwr", "run", str(app), "loopback", "--run-config",
                                     run_config, *(["--stream"] if stream else [])])

    def crash_server_side(self) -> list[int]:
        """SIGKILL this federation's ServerApp process(es), the SuperLink and the SuperLink's
        SuperExec, as a crash of the server machine would; the ServerApp pids killed."""
        serverapps = pids_mentioning("flwr-serverapp", self.address)
        for pid in serverapps:
            _kill(pid)
        if self.superlink is not None and self.superlink.poll() is None:
            os.killpg(self.superlink.pid, signal.SIGKILL)
            self.superlink.wait(timeout=15)
        for pid in pids_mentioning("flower-superexec", f"--runtime-api-address {self.address}"):
            _kill(pid)
        return serverapps

    def close(self) -> None:
        """Stop everything this federation started (SIGTERM, then SIGKILL), then every detached
        process naming one of its addresses."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for token in self._tokens:  # detached SuperExec / ServerApp / ClientApp processes
            for pid in pids_mentioning(token):
                _kill(pid)
        for log in self._logs:
            log.close()
