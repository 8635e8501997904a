"""The in-process backend (no Ray): same ServerApp, ClientApp and messages, one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from clients_fixtures import write_tiny_cifar
from test_simulations_cli import _expected_privacy, flaky_app

from simulations import results


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inproc_data")
    write_tiny_cifar(root)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMF_DATA_DIR", raising=False)


def _config(data_dir: Path, out: Path, *, noise_seed: int | None = None, **extra: Any) -> Any:
    from simulations.config import RunConfig

    return RunConfig.from_run_config(
        {"data-dir": str(data_dir), "rounds": 3, "num-clients": 4, "clients-per-round": 2,
         "mechanism": "bisr", "bands": 2, "batch-size": 8, "output-dir": str(out),
         "insecure-reproducible": True, "checkpoint-dir": str(out / "ckpt"), **extra},
        noise_seed=noise_seed)


def test_inprocess_run_matches_accounting_and_counts_failures(data_dir: Path,
                                                              tmp_path: Path) -> None:
    from simulations.runner import run_simulation

    out = tmp_path / "run"
    seen: list[int] = []
    summary = run_simulation(_config(data_dir, out), backend="inprocess",
                             client_app=flaky_app, on_round=lambda r: seen.append(r["round"]))
    assert seen == [1, 2, 3]
    rows = results.read_rounds(out)
    assert [r["failures"] for r in rows] == [0, 2, 0]
    # accuracy is a count over the 20 test images; round 2 (all failed) kept the model, so
    # its accuracy can only differ from round 1 through the noise-only update
    assert all(r["accuracy"] * 20 == pytest.approx(round(r["accuracy"] * 20), abs=1e-9)
               for r in rows)
    assert [r["accepted"] for r in rows] == [2, 0, 2]
    expected = _expected_privacy(summary["config"])
    assert summary["epsilon"] == pytest.approx(expected["epsilon"])
    assert summary["noise_multiplier"] == pytest.approx(expected["noise_multiplier"])
    assert rows[-1]["epsilon_spent"] == pytest.approx(summary["epsilon"], rel=1e-6)


def test_inprocess_is_deterministic_with_fixed_seeds(data_dir: Path, tmp_path: Path) -> None:
    from simulations.runner import run_simulation

    a = run_simulation(_config(data_dir, tmp_path / "a", noise_seed=7), backend="inprocess")
    b = run_simulation(_config(data_dir, tmp_path / "b", noise_seed=7), backend="inprocess")
    assert a["final_accuracy"] == b["final_accuracy"]
    assert results.read_rounds(tmp_path / "a")[-1]["loss"] == pytest.approx(
        results.read_rounds(tmp_path / "b")[-1]["loss"])


def test_unknown_backend_rejected(data_dir: Path, tmp_path: Path) -> None:
    from simulations.runner import run_simulation

    with pytest.raises(ValueError, match="backend"):
        run_simulation(_config(data_dir, tmp_path / "x"), backend="threads")


def test_demo_runs_the_main_job_end_to_end(monkeypatch: pytest.MonkeyPatch, data_dir: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The main job's code path (compare, report, table, verdict) on a shrunken setting."""
    import simulations.cli as cli

    small = {**cli._DEMO, "clients": 6, "clients-per-round": 3, "rounds": 3,
             "max-examples-per-client": 10, "bands": 2, "eval-every": 1}
    monkeypatch.setattr(cli, "_DEMO", small)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out), "--data-dir", str(data_dir),
                     "--seeds", "0,1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mechanism" in printed and "± " in printed and "verdict: " in printed
    rows = results.read_results_csv(out / "results.csv")
    assert {"mechanism", "seed", "final_accuracy"} <= set(rows[0])
    assert sorted((r["mechanism"], r["seed"]) for r in rows) == [
        ("bsr", 0), ("bsr", 1), ("dp-fedavg", 0), ("dp-fedavg", 1), ("dp-fedavg@poisson", 0),
        ("dp-fedavg@poisson", 1), ("fedavg", 0), ("fedavg", 1)]
    # the verdict names both baselines: un-amplified and amplified DP-FedAvg
    assert "dp-fedavg@poisson" in printed and printed.count("verdict: ") == 2
    amplified = results.read_summary(out / "dp-fedavg@poisson_eps8_constant_seed0")
    assert amplified["sampling"] == "poisson" and amplified["participation_released"] is False
    assert amplified["epsilon"] <= 8.0 * (1 + 1e-3)
    # the baseline and the mechanism run the same server optimizer; only the noise differs
    assert {r["server_optimizer"] for r in rows} == {"sgd constant lr 1, momentum 0.9, wd 0"}
    summary = results.read_summary(out / "bsr_eps8_constant_seed0")
    assert summary["config"]["model"] == "scatter-linear"
    assert summary["epsilon"] == pytest.approx(8.0, rel=1e-3)


def test_verdict_says_only_what_the_numbers_support() -> None:
    from simulations.render import verdict

    row = {"mean": 3.0, "std": 1.0, "ci95": 2.48, "n": 3, "wins": 3}
    assert verdict(row, mechanism="bsr", epsilon=8.0).startswith(
        "verdict: bsr beats dp-fedavg by 3.0 ± 1.0 points at ε = 8")
    row = {"mean": 1.0, "std": 2.0, "ci95": 4.97, "n": 3, "wins": 2}
    assert "not significant over 3 seeds" in verdict(row, mechanism="bsr", epsilon=8.0)
    row = {"mean": -3.0, "std": 1.0, "ci95": 2.48, "n": 3, "wins": 0}
    assert verdict(row, mechanism="bsr", epsilon=2.0).startswith(
        "verdict: dp-fedavg beats bsr by 3.0")


def test_status_json_says_ok_or_failed(data_dir: Path, tmp_path: Path) -> None:
    """``flwr run`` exits 0 even when the ServerApp fails: ``status.json`` tells the two apart."""
    from simulations.runner import run_simulation

    out = tmp_path / "good"
    summary = run_simulation(_config(data_dir, out), backend="inprocess")
    status = results.read_status(out)
    assert status is not None and status["status"] == "ok" and status["error"] is None
    assert status["rounds_completed"] == summary["rounds_completed"] == 3
    from strategies.dpmf import DPMatrixFactorizationFedAvg

    def broken(self: Any, server_round: int, replies: Any) -> Any:
        raise RuntimeError("broken aggregation")

    bad = tmp_path / "bad"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DPMatrixFactorizationFedAvg, "aggregate_train", broken)
        with pytest.raises(RuntimeError):
            run_simulation(_config(data_dir, bad), backend="inprocess")
    status = results.read_status(bad)
    assert status is not None and status["status"] == "failed"
    assert "broken aggregation" in status["error"]
    assert results.read_summary(bad) is None


def test_unreadable_data_fails_before_any_file(data_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An existing but empty data folder: one line naming data-dir and the expected layout,
    no run folder; a stale attempt that released no round does not block the next launch,
    and --resume may point at moved data."""
    import argparse

    from simulations.cli import _simulate_config, main

    empty = tmp_path / "empty-data"
    empty.mkdir()
    out = tmp_path / "run"
    argv = ["simulate", "--data-dir", str(empty), "--output", str(out), "--rounds", "3",
            "--clients", "4", "--clients-per-round", "2", "--backend", "inprocess",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: data-dir: missing train split" in err
    assert "cifar10/{train,test}.parquet" in err and not out.exists()
    # a launch that failed before round 1 (files but no rounds) is replaced, not refused
    out.mkdir()
    (out / "run_config.json").write_text('{"rounds": 9}')
    results.write_status(out, "failed", error="FileNotFoundError: ...")
    args = argparse.Namespace(output=str(out), resume=False, overwrite=False, run_config=None,
                              noise_seed=None, **{"rc:data-dir": str(data_dir)})
    assert _simulate_config(args).client.data_dir == str(data_dir)
    assert not (out / "run_config.json").exists()
    # an interrupted run (a released round) resumes with its data moved elsewhere
    saved = _config(data_dir, out).replace(**{"checkpoint-dir": ""}).to_run_config()
    (out / "run_config.json").write_text(json.dumps(saved))
    results.append_round(out, results.round_record(server_round=1, eval_metrics=None,
                                                   train_metrics={}, seconds=0.1))
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    resume = argparse.Namespace(**{**vars(args), "resume": True, "rc:data-dir": str(moved)})
    assert _simulate_config(resume).client.data_dir == str(moved)
    with pytest.raises(ValueError, match="rounds: differs from the interrupted run"):
        _simulate_config(argparse.Namespace(**{**vars(resume), "rc:rounds": 5}))


def test_checkpoint_by_default_and_a_relaunch_resumes(data_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No checkpoint-dir given (as under ``flwr run``): the ServerApp checkpoints to the private
    state folder of its output-dir, and the same launch after a crash resumes from it."""
    from simulations.runner import run_simulation
    from strategies.dpmf import DPMatrixFactorizationFedAvg

    monkeypatch.setenv("FEDMF_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "run"
    config = _config(data_dir, out).replace(**{"checkpoint-dir": ""})
    original = DPMatrixFactorizationFedAvg.aggregate_train
    calls = {"n": 0}

    def crash_in_round_2(self: Any, server_round: int, replies: Any) -> Any:
        calls["n"] += 1
        if server_round == 2 and calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(self, server_round, replies)

    monkeypatch.setattr(DPMatrixFactorizationFedAvg, "aggregate_train", crash_in_round_2)
    with pytest.raises(RuntimeError):
        run_simulation(config, backend="inprocess")
    ckpt = results.default_checkpoint_dir(out)
    assert (tmp_path / "state") in ckpt.parents and any(ckpt.iterdir())
    assert [r["round"] for r in results.read_rounds(out)] == [1]
    summary = run_simulation(config, backend="inprocess")  # the same launch again
    assert [r["round"] for r in results.read_rounds(out)] == [1, 2, 3]
    assert summary["rounds_completed"] == 3 and calls["n"] == 4  # round 1 was not redone
    from strategies.checkpoint import checkpoint_path

    assert not checkpoint_path(ckpt).exists()  # a finished run keeps no secret state
