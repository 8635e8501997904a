"""The in-process backend (no Ray): same ServerApp, ClientApp and messages, one process."""

from __future__ import annotations

import argparse
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


def test_demo_runs_compare_on_the_embedded_default(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    import simulations.cli as cli

    captured: dict[str, argparse.Namespace] = {}

    def fake_compare(args: argparse.Namespace) -> int:
        captured["args"] = args
        return 0

    monkeypatch.setattr(cli, "cmd_compare", fake_compare)
    assert cli.main(["demo", "--output", str(tmp_path / "demo"), "--data-dir", "/data"]) == 0
    args = captured["args"]
    assert args.mechanisms == ["dp-fedavg", "lr-bisr"]
    assert args.epsilons == [8.0]
    assert args.backend == "ray"
    explicit = {k.split(":", 1)[1]: v for k, v in vars(args).items()
                if k.startswith("rc:") and v is not None}
    assert explicit["dataset"] == "cifar10" and explicit["model"] == "cnn"
    assert explicit["rounds"] == cli._DEMO["rounds"]
    assert explicit["data-dir"] == "/data"
