"""Fast tests of the simulations package without Ray: run config, result files, grids,
plots/report on synthetic run directories, and the CLI's import hygiene."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from simulations import results
from simulations.backends.ray import ray_init_args
from simulations.compare import grid_cells
from simulations.config import RunConfig, known_keys, parse_run_config_text
from simulations.plots import accuracy_table, load_runs, make_report, paired_differences

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = (
    "dataset", "data-dir", "partitioner", "alpha", "classes-per-client", "num-clients",
    "clients-per-round", "rounds", "local-epochs", "batch-size", "client-lr", "client-momentum",
    "max-examples-per-client", "model", "model-path", "val-fraction", "mechanism", "bands",
    "min-sep", "schedule", "server-lr", "final-server-lr", "server-gamma", "server-momentum",
    "warmup", "clip-norm", "clipping", "epsilon", "delta", "noise-multiplier", "seed",
    "insecure-reproducible", "noise-mode", "checkpoint-dir", "output-dir", "eval-every",
)


# ------------------------------------------------------------------------------ config
def test_defaults_match_pyproject_and_contract() -> None:
    """The pyproject table is the defaults of the three configuration parts, nothing else."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as fh:
        app = tomllib.load(fh)["tool"]["flwr"]["app"]
    assert app["config"] == RunConfig().to_run_config()
    assert sorted(app["config"]) == known_keys()
    assert app["components"]["serverapp"] == "simulations.server_app:app"
    assert set(CONTRACT_KEYS) <= set(app["config"])
    assert RunConfig.from_run_config(app["config"]) == RunConfig()


def test_parse_run_config_uses_toml_values() -> None:
    cfg = parse_run_config_text('rounds=3 alpha=0.5 dataset="imdb" resume=true model=cnn '
                                "data-dir='/a b/c'")
    assert cfg == {"rounds": 3, "alpha": 0.5, "dataset": "imdb", "resume": True,
                   "model": "cnn", "data-dir": "/a b/c"}
    with pytest.raises(ValueError, match="run-config"):
        parse_run_config_text("rounds")


def test_run_config_parses_once_and_names_the_key() -> None:
    cfg = RunConfig.from_run_config({"alpha": 1, "rounds": "4", "bands": 2,
                                     "insecure-reproducible": "true", "num-clients": 12,
                                     "server-milestones": "2,3"})
    assert cfg.client.alpha == 1.0 and isinstance(cfg.client.alpha, float)
    assert cfg.dp.rounds == 4 and cfg.dp.insecure_reproducible is True
    assert cfg.dp.server_milestones == (2, 3)
    # shared keys reach both parts from one key
    assert cfg.client.num_clients == cfg.dp.num_clients == 12
    assert cfg.to_run_config()["server-milestones"] == "2,3"
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg  # round trip
    assert cfg.replace(seed=3).client.seed == cfg.replace(seed=3).dp.seed == 3
    with pytest.raises(ValueError, match=r"^rounds must be of type int"):
        RunConfig.from_run_config({"rounds": 2.5})
    with pytest.raises(ValueError, match=r"^no-such-key: unknown"):
        RunConfig.from_run_config({"no-such-key": 1})
    with pytest.raises(ValueError, match=r"^noise-seed: unknown run-config key \(the noise"):
        RunConfig.from_run_config({"noise-seed": 1})
    bad = [({"dataset": "mnist"}, "dataset"), ({"model": "head"}, "model"),
           ({"partitioner": "zipf"}, "partitioner"),
           ({"clients-per-round": 11}, "clients-per-round"),
           ({"mechanism": "optimal", "rounds": 2000}, "rounds"),
           ({"mechanism": "nope"}, "mechanism"),
           ({"mechanism": "bisr", "rounds": 4, "bands": 0}, "bands"),
           ({"epsilon": -1.0}, "epsilon"), ({"eval-every": 0}, "eval-every"),
           ({"data-dir": "/does/not/exist"}, "data-dir"),
           ({"local-epochs": 0}, "local-epochs"), ({"client-lr": 0.0}, "client-lr"),
           ({"schedule": "weird"}, "schedule")]
    for override, key in bad:
        with pytest.raises(ValueError, match=rf"^{key}"):
            RunConfig.from_run_config(override)
    assert RunConfig.from_run_config({}).dp.mechanism == "lr-bisr"


def test_ray_init_args() -> None:
    assert ray_init_args(ray_address="auto") == {"include_dashboard": False,
                                                 "log_to_driver": True, "address": "auto"}
    local = ray_init_args(num_cpus=2, num_gpus=0.0, log_to_driver=False)
    assert local["num_cpus"] == 2 and local["num_gpus"] == 0.0 and not local["log_to_driver"]


# ------------------------------------------------------------------------------ files
def test_rounds_jsonl_roundtrip_dedup_and_torn_line(tmp_path: Path) -> None:
    train = {"epsilon_spent": 1.5, "noise_std": 0.1, "num_clipped": 2, "num_failures": 1,
             "clip_norm": 1.0, "num_rejected": 0, "num_accepted": 3}
    for rnd, acc in ((1, 0.1), (2, 0.2), (2, 0.25)):  # round 2 repeated after a resume
        rec = results.round_record(server_round=rnd, eval_metrics={"accuracy": acc,
                                                                   "loss": 2.0},
                                   train_metrics=train, seconds=0.5)
        results.append_round(tmp_path, rec)
    with (tmp_path / results.ROUNDS_FILE).open("a") as fh:
        fh.write('{"round": 3, "accur')  # torn by a crash
    rows = results.read_rounds(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["accuracy"] == 0.25
    assert set(results.ROUND_FIELDS) <= set(rows[0])
    assert rows[0]["clipped"] == 2 and rows[0]["failures"] == 1
    # non-private: infinite epsilon is null in strict JSON
    rec = results.round_record(server_round=1, eval_metrics=None,
                               train_metrics={"epsilon_spent": math.inf}, seconds=1)
    assert rec["epsilon_spent"] is None and rec["accuracy"] is None


def test_summary_json_and_csv(tmp_path: Path) -> None:
    summary = {k: None for k in results.SUMMARY_FIELDS}
    summary.update(mechanism="bisr", epsilon=math.inf, rho=2.0, config={"rounds": 3},
                   seeds={"seed": 0, "noise_seed": None}, failures=1)
    results.write_summary(tmp_path, summary)
    text = (tmp_path / results.SUMMARY_JSON).read_text()
    assert "Infinity" not in text
    loaded = results.read_summary(tmp_path)
    assert loaded is not None and loaded["epsilon"] is None and loaded["config"] == {
        "rounds": 3}
    with (tmp_path / results.SUMMARY_CSV).open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and list(rows[0]) == list(results.SUMMARY_FIELDS)
    assert json.loads(rows[0]["config"]) == {"rounds": 3}
    assert results.is_finished(tmp_path) and not results.is_finished(tmp_path / "x")


def test_grid_cells_names_and_skips(tmp_path: Path) -> None:
    base = RunConfig.from_run_config({"rounds": 4, "num-clients": 4, "clients-per-round": 2,
                                      "bands": 2})
    cells, notes = grid_cells(base, mechanisms=["fedavg", "bisr", "optimal"],
                              epsilons=[2.0, 8.0], schedules=["cosine"], seeds=[0, 1],
                              output=tmp_path)
    names = [c.name for c in cells]
    assert "fedavg_epsinf_cosine_seed0" in names and "bisr_eps2_cosine_seed1" in names
    assert sum(n.startswith("fedavg") for n in names) == 2  # once per seed, not per epsilon
    assert len(names) == 2 + 4 + 4 and not notes
    cell = next(c for c in cells if c.name == "bisr_eps8_cosine_seed1")
    assert cell.config.dp.epsilon == 8.0 and cell.config.dp.seed == cell.config.client.seed == 1
    assert cell.config.run.output_dir == str(tmp_path / cell.name)
    # each cell's private checkpoint is outside the grid folder
    assert cell.config.dp.checkpoint_dir == str(
        results.default_checkpoint_dir(tmp_path / cell.name))
    assert tmp_path not in Path(cell.config.dp.checkpoint_dir).parents
    long = RunConfig.from_run_config({"rounds": 2000, "num-clients": 4,
                                      "clients-per-round": 2})
    cells, notes = grid_cells(long, mechanisms=["optimal", "sqrt"], epsilons=[8.0],
                              schedules=["cosine"], seeds=[0], output=tmp_path)
    assert [c.mechanism for c in cells] == ["sqrt"] and "optimal" in notes[0]
    with pytest.raises(ValueError, match=r"^mechanisms"):
        grid_cells(base, mechanisms=["bogus"], epsilons=[1.0], schedules=["cosine"],
                   seeds=[0], output=tmp_path)


def test_grid_cells_arms_name_their_sampling(tmp_path: Path) -> None:
    base = RunConfig.from_run_config({"rounds": 4, "num-clients": 8, "clients-per-round": 2,
                                      "bands": 2, "min-sep": 2})
    cells, _ = grid_cells(base, mechanisms=["dp-fedavg", "dp-fedavg@poisson",
                                            "bsr@balls-in-bins"],
                          epsilons=[8.0], schedules=["constant"], seeds=[0], output=tmp_path)
    by_name = {c.name: c for c in cells}
    assert set(by_name) == {"dp-fedavg_eps8_constant_seed0",
                            "dp-fedavg@poisson_eps8_constant_seed0",
                            "bsr@balls-in-bins_eps8_constant_seed0"}
    assert by_name["dp-fedavg_eps8_constant_seed0"].config.dp.sampling == "cyclic"
    poisson = by_name["dp-fedavg@poisson_eps8_constant_seed0"]
    assert poisson.config.dp.sampling == "poisson" and poisson.config.dp.mechanism == "dp-fedavg"
    assert poisson.mechanism == "dp-fedavg@poisson"
    for bad, why in (("bsr@poisson", "poisson"), ("bsr@lottery", "sampling"),
                     ("nope@poisson", "mechanism")):
        with pytest.raises(ValueError, match=why):
            grid_cells(base, mechanisms=[bad], epsilons=[8.0], schedules=["constant"],
                       seeds=[0], output=tmp_path)


def test_report_keeps_arms_apart_and_pairs_them(tmp_path: Path) -> None:
    for seed in (0, 1):
        _fake_run(tmp_path, f"dp-fedavg_eps8_cosine_seed{seed}", "dp-fedavg", 8.0, seed,
                  [0.1, 0.3])
        _fake_run(tmp_path, f"dp-fedavg@poisson_eps8_cosine_seed{seed}", "dp-fedavg", 8.0,
                  seed, [0.1, 0.5 + 0.1 * seed], sampling="poisson")
        _fake_run(tmp_path, f"bsr_eps8_cosine_seed{seed}", "bsr", 8.0, seed, [0.1, 0.4])
    runs = load_runs(tmp_path)
    assert {r.mechanism for r in runs} == {"dp-fedavg", "dp-fedavg@poisson", "bsr"}
    table = {r["mechanism"]: r for r in accuracy_table(runs)}
    assert table["dp-fedavg@poisson"]["mean"] == pytest.approx(0.55)
    assert table["dp-fedavg"]["mean"] == pytest.approx(0.3)
    amplified = {r["mechanism"]: r for r in paired_differences(runs,
                                                               baseline="dp-fedavg@poisson")}
    assert amplified["bsr"]["mean"] == pytest.approx(-15.0)
    from simulations.cli import main

    assert main(["report", str(tmp_path), "--no-errors", "--pairs",
                 "bsr:dp-fedavg@poisson"]) == 0
    rows = results.read_results_csv(tmp_path / "paired_differences.csv")
    assert ("bsr", "dp-fedavg@poisson") in {(r["mechanism"], r["baseline"]) for r in rows}
    # a requested pair that is also a default pairing (X vs dp-fedavg) is listed once
    assert main(["report", str(tmp_path), "--no-errors", "--pairs",
                 "bsr:dp-fedavg,bsr:dp-fedavg@poisson"]) == 0
    rows = results.read_results_csv(tmp_path / "paired_differences.csv")
    keys = [(r["mechanism"], r["baseline"], r["epsilon"]) for r in rows]
    assert len(keys) == len(set(keys)) and ("bsr", "dp-fedavg", keys[0][2]) in keys


def _fake_run(root: Path, name: str, mechanism: str, eps: float, seed: int,
              accs: list[float], sampling: str = "cyclic") -> None:
    cfg = RunConfig.from_run_config({"mechanism": mechanism, "epsilon": eps, "seed": seed,
                                     "rounds": len(accs), "num-clients": 4,
                                     "clients-per-round": 2, "bands": 2,
                                     "sampling": sampling}).to_run_config()
    d = root / name
    for i, acc in enumerate(accs, 1):
        results.append_round(d, results.round_record(
            server_round=i, eval_metrics={"accuracy": acc, "loss": 1.0},
            train_metrics={"epsilon_spent": eps}, seconds=0.1))
    results.write_summary(d, {"mechanism": mechanism, "dataset": "cifar10",
                              "rounds": len(accs), "epsilon": eps, "delta": 1e-5,
                              "schedule": "cosine", "final_accuracy": accs[-1],
                              "best_accuracy": max(accs), "failures": 0, "config": cfg,
                              "wall_seconds": 1.0, "sampling": sampling})


def test_report_on_synthetic_grid(tmp_path: Path) -> None:
    for seed, shift in ((0, 0.0), (1, 0.1)):
        _fake_run(tmp_path, f"bisr_eps8_cosine_seed{seed}", "bisr", 8.0, seed,
                  [0.1 + shift, 0.3 + shift, 0.5 + shift, 0.6 + shift])
        _fake_run(tmp_path, f"dp-fedavg_eps8_cosine_seed{seed}", "dp-fedavg", 8.0, seed,
                  [0.1, 0.2, 0.3 + shift, 0.4 + shift])
        _fake_run(tmp_path, f"fedavg_epsinf_cosine_seed{seed}", "fedavg", 8.0, seed,
                  [0.2, 0.4, 0.6, 0.8])
    (tmp_path / "unfinished").mkdir()
    runs = load_runs(tmp_path)
    assert len(runs) == 6
    table = {(r["mechanism"], r["epsilon"]): r for r in accuracy_table(runs)}
    assert table[("bisr", 8.0)]["n"] == 2
    assert table[("bisr", 8.0)]["mean"] == pytest.approx(0.65)
    assert table[("bisr", 8.0)]["std"] == pytest.approx(math.sqrt(0.005))
    assert math.isinf(next(e for (m, e) in table if m == "fedavg"))
    # 95% CI of the mean of two values: t(0.975, 1) = 12.7062 times std / sqrt(2)
    assert table[("bisr", 8.0)]["ci95"] == pytest.approx(12.7062 * math.sqrt(0.005) / math.sqrt(2),
                                                         rel=1e-4)
    paired = {r["mechanism"]: r for r in paired_differences(runs)}
    assert set(paired) == {"bisr"}  # fedavg has no epsilon to pair at; dp-fedavg is the base
    assert paired["bisr"]["mean"] == pytest.approx(20.0) and paired["bisr"]["wins"] == 2
    assert paired["bisr"]["std"] == pytest.approx(0.0, abs=1e-9)
    report = make_report(tmp_path)
    for name in ("accuracy_vs_round.png", "final_accuracy_vs_epsilon.png",
                 "difference_vs_epsilon.png", "factorization_errors.png"):
        png = tmp_path / "plots" / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert set(report.errors) == {"bisr", "dp-fedavg"}  # fedavg has no noise
    assert report.errors["bisr"]["mean_error"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "| bisr |" in md and "n=2" in md and "+20.00" in md
    summary = results.read_results_csv(tmp_path / "summary_table.csv")
    assert {r["mechanism"] for r in summary} == {"bisr", "dp-fedavg", "fedavg"}
    assert results.read_results_csv(tmp_path / "paired_differences.csv")[0]["wins"] == 2
    rows = results.read_results_csv(tmp_path / "results.csv")
    assert len(rows) == 6 and rows[0]["cell"]
    # extra pairs: dp-fedavg - bisr is the negative of bisr - dp-fedavg
    from simulations.cli import main

    assert main(["report", str(tmp_path), "--no-errors", "--pairs", "dp-fedavg:bisr"]) == 0
    rows = results.read_results_csv(tmp_path / "paired_differences.csv")
    assert [(r["mechanism"], r["baseline"], r["mean"]) for r in rows] == [
        ("bisr", "dp-fedavg", pytest.approx(20.0)), ("dp-fedavg", "bisr", pytest.approx(-20.0))]
    assert "| dp-fedavg | bisr | cosine | 8 | -20.00" in (tmp_path / "report.md").read_text()
    assert main(["report", str(tmp_path), "--pairs", "bisr-dp-fedavg"]) == 2


def test_cli_module_imports_nothing_heavy() -> None:
    code = ("import sys, simulations.cli, simulations.results, simulations.runner, "
            "simulations.compare, simulations.plots, simulations.config, fedmf, fedmf.cli\n"
            "heavy = [m for m in ('flwr', 'torch', 'ray', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_fedmf_maths_imports_no_other_package() -> None:
    code = ("import sys, fedmf, fedmf.cli, fedmf.mechanisms, fedmf.ledger, fedmf.runconfig\n"
            "bad = [m for m in ('flwr', 'torch', 'ray', 'simulations', 'strategies', 'clients')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_fedmf_cli_registers_subcommands() -> None:
    from simulations.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["plan", "--epsilon", "2"]).func.__module__ == "fedmf.cli"
    args = parser.parse_args(["report", "somewhere"])
    assert callable(args.func) and args.directory == "somewhere"
    args = parser.parse_args(["simulate", "--output", "o", "--num-gpus-per-client", "0.5"])
    assert args.num_gpus_per_client == 0.5


def test_report_refuses_to_pool_mismatched_runs_and_unpaired_pairs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two bsr runs that differ in rounds, or repeat a seed, are not one table cell; a pair
    that matches no runs is an error, not a silent no-op; a non-private baseline pairs with
    every epsilon (the cost of privacy)."""
    from simulations.cli import main

    ok = tmp_path / "ok"
    for seed in (0, 1):
        _fake_run(ok, f"bsr_eps8_cosine_seed{seed}", "bsr", 8.0, seed, [0.1, 0.4 + seed / 10])
        _fake_run(ok, f"fedavg_epsinf_cosine_seed{seed}", "fedavg", 8.0, seed, [0.2, 0.6])
    assert main(["report", str(ok), "--no-errors", "--pairs", "bsr:fedavg"]) == 0
    rows = results.read_results_csv(ok / "paired_differences.csv")
    assert [(r["mechanism"], r["baseline"], r["mean"]) for r in rows] == [
        ("bsr", "fedavg", pytest.approx(-15.0))]
    capsys.readouterr()
    assert main(["report", str(ok), "--no-errors", "--pairs", "bsr:dp-fedavg"]) == 2
    assert "pairs: no run of 'bsr' pairs with one of 'dp-fedavg'" in capsys.readouterr().err

    mixed = tmp_path / "mixed"
    _fake_run(mixed, "bsr_a", "bsr", 8.0, 0, [0.1, 0.4])
    _fake_run(mixed, "bsr_b", "bsr", 8.0, 1, [0.1, 0.2, 0.5])  # 3 rounds, not 2
    assert main(["report", str(mixed), "--no-errors"]) == 2
    err = capsys.readouterr().err
    assert "runs 'bsr_a' and 'bsr_b' are both bsr" in err and "rounds (2 vs 3)" in err
    twice = tmp_path / "twice"
    _fake_run(twice, "bsr_a", "bsr", 8.0, 0, [0.1, 0.4])
    _fake_run(twice, "bsr_b", "bsr", 8.0, 0, [0.1, 0.5])
    assert main(["report", str(twice), "--no-errors"]) == 2
    assert "with seed 0" in capsys.readouterr().err
