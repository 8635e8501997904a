"""End-to-end tests of ``fedmf simulate | compare | report`` on Flower's Ray simulation
engine with tiny generated CIFAR-10-schema data (a few dozen rows, 4 clients, 2-8 rounds).

One Ray instance (2 CPUs) is started for the module and reused by every in-process run;
the interruption test runs the CLI in a subprocess with its own Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from clients_fixtures import write_tiny_cifar
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from simulations import results
from simulations.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--rounds", "3", "--clients", "4", "--clients-per-round", "2", "--batch-size", "8",
         "--ray-num-cpus", "2", "--no-progress"]

# A ClientApp whose every client fails in round 2 (the simulation must carry on).
flaky_app = ClientApp()


@flaky_app.train()
def _flaky_train(msg: Message, context: Context) -> Message:
    if int(msg.content["config"]["server-round"]) == 2:
        raise RuntimeError("injected client failure")
    from clients.client_app import app as real_app

    return real_app(msg, context)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny CIFAR-10-schema parquet files (60 train / 20 test rows)."""
    root = tmp_path_factory.mktemp("sim_data")
    write_tiny_cifar(root)
    return root


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One local Ray instance for the module (the runner reuses an initialised Ray);
    yields its address for ``--ray-address``."""
    import ray

    cache = tmp_path_factory.mktemp("fedmf_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMF_CACHE_DIR", str(cache))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("FEDMF_DATA_DIR", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def _expected_privacy(cfg: dict[str, Any]) -> dict[str, float]:
    """Sensitivity, noise multiplier and epsilon of ``cfg`` computed with fedmf directly."""
    from fedmf import accounting
    from fedmf.factorizations import factorize
    from fedmf.participation import Participation
    from fedmf.schedules import learning_rates
    from fedmf.workloads import sgd_workload

    n = int(cfg["rounds"])
    b = int(cfg["min-sep"]) or int(cfg["num-clients"]) // int(cfg["clients-per-round"])
    rates = learning_rates(rounds=n, schedule=cfg["schedule"], lr=cfg["server-lr"],
                           final_lr=cfg["final-server-lr"], gamma=cfg["server-gamma"],
                           warmup=cfg["warmup"])
    fact = factorize(method=cfg["mechanism"],
                     workload=sgd_workload(rates=rates, momentum=cfg["server-momentum"]),
                     participation=Participation.cyclic(max_participations=math.ceil(n / b),
                                                        min_sep=b),
                     bands=int(cfg["bands"]))
    sens = float(fact.sensitivity.value)
    z = accounting.calibrate_noise_multiplier(epsilon=cfg["epsilon"], delta=cfg["delta"],
                                              sensitivity=sens)
    eps = accounting.epsilon(noise_multiplier=z, sensitivity=sens, delta=cfg["delta"])
    return {"sensitivity": sens, "noise_multiplier": z, "epsilon": eps}


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop_tree(proc: subprocess.Popen[Any]) -> None:
    """Terminate ``proc`` and the processes it started (by their ids), bounded waits."""
    pids = _descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ fast
def test_invalid_configs_rejected_before_ray(data_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import flwr.simulation

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the simulation engine must not start for an invalid config")

    monkeypatch.setattr(flwr.simulation, "run_simulation", forbidden)
    base = ["simulate", "--data-dir", str(data_dir), "--output", str(tmp_path / "o"), *SMALL]
    cases = [
        (["--clients-per-round", "9"], "clients-per-round"),
        (["--dataset", "mnist"], "dataset"),
        (["--model", "resnet50"], "model"),
        (["--partitioner", "zipf"], "partitioner"),
        (["--mechanism", "magic"], "mechanism"),
        (["--mechanism", "bisr", "--bands", "0"], "bands"),
        (["--epsilon", "-1"], "epsilon"),
        (["--mechanism", "optimal", "--rounds", "2000"], "rounds"),
        (["--run-config", "no-such-knob=1"], "no-such-knob"),
        (["--run-config", "local-epochs=1.5"], "local-epochs"),
        (["--num-gpus-per-client", "-0.5"], "num-gpus-per-client"),
        (["--data-dir", str(tmp_path / "missing")], "data-dir"),
    ]
    for extra, key in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert f"error: {key}" in err, (extra, err)
    assert main(["compare", "--mechanisms", "bisr,warp", "--epsilons", "8",
                 "--output", str(tmp_path / "g"), "--data-dir", str(data_dir)]) == 2
    assert "error: mechanisms" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # the lead's console script routes to the same handlers
    from simulations.cli import main as fedmf_main

    assert fedmf_main([*base, "--dataset", "mnist"]) == 2
    assert "error: dataset" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Ray
@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_simulate_writes_results_and_accounts_epsilon(data_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    out = tmp_path / "run"
    rc = main(["simulate", "--dataset", "cifar10", "--mechanism", "lr-bisr", "--epsilon", "8",
               "--model", "cnn", "--partitioner", "dirichlet", "--alpha", "0.5",
               "--schedule", "cosine", "--server-lr", "1.0", "--local-epochs", "1",
               "--bands", "2", "--min-sep", "0", "--seed", "0",
               "--max-examples-per-client", "12", "--data-dir", str(data_dir),
               "--output", str(out), "--num-cpus-per-client", "1",
               "--num-gpus-per-client", "0", "--run-config", "client-lr=0.05 eval-every=1",
               *SMALL])
    assert rc == 0
    assert "lr-bisr: final accuracy" in capsys.readouterr().out
    rows = results.read_rounds(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(results.ROUND_FIELDS) <= set(row)
        # accuracy is a count over the 20 test images; every round trained and took time
        assert row["accuracy"] * 20 == pytest.approx(round(row["accuracy"] * 20), abs=1e-9)
        assert row["failures"] == 0 and row["accepted"] == 2 and row["seconds"] > 0
        assert row["noise_std"] > 0 and row["clip_norm"] == 1.0
        assert row["epsilon_spent"] <= 8.0 + 1e-6
    summary = results.read_summary(out)
    assert summary is not None
    assert set(results.SUMMARY_FIELDS) <= set(summary)
    cfg = summary["config"]
    assert cfg["rounds"] == 3 and cfg["num-clients"] == 4 and cfg["alpha"] == 0.5
    assert cfg["max-examples-per-client"] == 12 and cfg["partitioner"] == "dirichlet"
    # the private checkpoint lives outside the results folder and is gone once finished
    ckpt = Path(cfg["checkpoint-dir"])
    assert ckpt == results.default_checkpoint_dir(out) and out not in ckpt.parents
    assert not (ckpt / "strategy_state.pt").exists()
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rows)
    assert summary["seeds"] == {"seed": 0} and summary["insecure_reproducible"] is False
    assert summary["server_optimizer"] == "sgd cosine lr 1->0, momentum 0, wd 0"
    assert {"clipped", "train_loss", "norm_mean"} <= set(summary["non_private_fields"])
    expected = _expected_privacy(cfg)
    assert summary["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-9)
    assert summary["epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert summary["noise_multiplier"] == pytest.approx(expected["noise_multiplier"], rel=1e-9)
    assert summary["sensitivity"] == pytest.approx(expected["sensitivity"], rel=1e-12)
    assert rows[-1]["epsilon_spent"] == pytest.approx(summary["epsilon"], rel=1e-9)
    with (out / results.SUMMARY_CSV).open() as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 2 and lines[0].startswith("mechanism,dataset,rounds")
    assert (out / "run_config.json").is_file()
    part = results.read_participation(out)
    assert part["rounds"] == 3 and part["min_sep"] == 2 and part["max_participations"] == 2
    assert sum(len(r) for r in part["clients"].values()) == 3 * 2
    assert set(part["clients"]) <= {"0", "1", "2", "3"}
    # a finished run is neither overwritten nor re-run
    assert main(["simulate", "--output", str(out), "--data-dir", str(data_dir), *SMALL]) == 2
    assert "error: output" in capsys.readouterr().err
    assert main(["simulate", "--output", str(out), "--resume", "--no-progress"]) == 0


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_client_failures_are_counted_not_fatal(data_dir: Path, tmp_path: Path) -> None:
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    out = tmp_path / "flaky"
    cfg = RunConfig.from_run_config({"data-dir": str(data_dir), "rounds": 3, "num-clients": 4,
                                     "clients-per-round": 2, "mechanism": "bsr", "bands": 2,
                                     "batch-size": 8, "output-dir": str(out),
                                     "checkpoint-dir": str(out / "ckpt")})
    seen: list[int] = []
    summary = run_simulation(cfg, client_app=flaky_app, on_round=lambda r: seen.append(
        r["round"]))
    assert seen == [1, 2, 3]
    rows = results.read_rounds(out)
    assert [r["failures"] for r in rows] == [0, 2, 0]
    assert rows[1]["accepted"] == 0 and rows[2]["accepted"] == 2
    assert summary["failures"] == 2 and summary["rounds_completed"] == 3
    assert results.read_summary(out)["failures"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_run_resumes(data_dir: Path, tmp_path: Path, ray_session: str) -> None:
    out = tmp_path / "interrupted"
    rounds = 8
    # a separate CLI process attached to the module's Ray cluster (--ray-address), Ctrl-C-ed
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--mechanism", "bisr",
           "--bands", "2", "--data-dir", str(data_dir), "--output", str(out),
           "--rounds", str(rounds), "--clients", "4", "--clients-per-round", "2",
           "--batch-size", "8", "--ray-address", ray_session, "--no-progress"]
    log = (tmp_path / "sim.log").open("w")
    # SIG_DFL before exec: a job started in the background has SIGINT ignored, and a Python
    # started with SIGINT ignored never raises KeyboardInterrupt (a terminal's Ctrl-C would).
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not results.read_rounds(out):
            assert proc.poll() is None, (tmp_path / "sim.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 130
    finally:
        _stop_tree(proc)
        log.close()
    assert results.read_summary(out) is None
    before = results.read_rounds(out)
    assert 1 <= len(before) < rounds
    # without --resume the interrupted directory is protected
    assert main(["simulate", "--output", str(out), "--data-dir", str(data_dir), *SMALL]) == 2
    assert main(["simulate", "--output", str(out), "--resume", "--no-progress"]) == 0
    after = results.read_rounds(out)
    assert [r["round"] for r in after] == list(range(1, rounds + 1))
    # The resumed simulation drew new node ids, yet every client (partition) kept its cohort
    # and history: no round was skipped, and the limits b = 2, k = 4 hold for every client.
    assert all(r["accepted"] == 2 for r in after), after
    part = results.read_participation(out)
    assert (part["min_sep"], part["max_participations"], part["rounds"]) == (2, 4, rounds)
    assert set(part["clients"]) == {"0", "1", "2", "3"}
    assert sum(len(r) for r in part["clients"].values()) == 2 * rounds
    for client, taken in part["clients"].items():
        assert len(taken) <= 4 and all(j - i >= 2 for i, j in pairwise(taken)), client
    for old in before[:-1]:  # earlier rounds are kept, not re-run
        assert after[old["round"] - 1] == old
    summary = results.read_summary(out)
    assert summary is not None and summary["rounds_completed"] == rounds
    assert summary["epsilon"] == pytest.approx(_expected_privacy(summary["config"])["epsilon"])


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_compare_skips_finished_cells_and_report(data_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid"
    argv = ["compare", "--mechanisms", "fedavg,bisr", "--epsilons", "8", "--schedules",
            "cosine", "--seeds", "0", "--output", str(grid), "--data-dir", str(data_dir),
            "--rounds", "2", "--clients", "4", "--clients-per-round", "2", "--bands", "1",
            "--batch-size", "8", "--ray-num-cpus", "2", "--no-progress"]
    assert main(argv) == 0
    cells = sorted(p.name for p in grid.iterdir() if p.is_dir() and p.name != "plots")
    assert cells == ["bisr_eps8_cosine_seed0", "fedavg_epsinf_cosine_seed0"]
    for cell in cells:
        assert results.is_finished(grid / cell)
        assert len(results.read_rounds(grid / cell)) == 2
    rows = results.read_results_csv(grid / "results.csv")
    assert sorted(r["mechanism"] for r in rows) == ["bisr", "fedavg"]
    bisr = next(r for r in rows if r["mechanism"] == "bisr")
    assert bisr["epsilon"] == pytest.approx(8.0, rel=1e-3) and bisr["epsilon_target"] == 8
    assert next(r for r in rows if r["mechanism"] == "fedavg")["epsilon"] is None
    capsys.readouterr()

    # re-running the same grid skips every finished cell (no simulation at all)
    import simulations.runner

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished cell was re-run")

    monkeypatch.setattr(simulations.runner, "run_simulation", forbidden)
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2

    for png in (grid / "plots").glob("*.png"):
        png.unlink()
    (grid / "report.md").unlink()
    assert main(["report", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "bisr" in printed and "fedavg" in printed and "n=1" in printed
    for name in ("accuracy_vs_round.png", "final_accuracy_vs_epsilon.png",
                 "factorization_errors.png"):
        assert (grid / "plots" / name).stat().st_size > 1000
    md = (grid / "report.md").read_text()
    assert "bisr" in md and "MaxSE" in md
    assert json.loads((grid / "plots" / "factorization_errors.json").read_text())
    # a single run directory can be reported too
    assert main(["report", str(grid / "bisr_eps8_cosine_seed0"), "--no-errors"]) == 0
    assert (grid / "bisr_eps8_cosine_seed0" / "report.md").is_file()
