"""The ``fedmf`` CLI: JSON contract, reference values, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.cli import main

REQUIRED_KEYS = {"method", "rounds", "bands", "min_sep", "max_participations", "sensitivity",
                 "sensitivity_exact", "max_error", "mean_error", "seconds"}


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_factorize_json_reference_values(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["factorize", "--rounds", "512", "--method", "bisr", "--bands", "8",
                         "--json"])
    assert out.keys() >= REQUIRED_KEYS
    assert out["mean_error"] == pytest.approx(4.8651, abs=5e-5)
    out = _json(capsys, ["factorize", "--rounds", "512", "--method", "sqrt", "--json"])
    assert out["mean_error"] == pytest.approx(2.8892, abs=5e-5)
    assert out["sensitivity_exact"] is True


def test_factorize_cyclic_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["factorize", "--rounds", "512", "--method", "bisr", "--bands", "8",
                         "--min-sep", "128", "--max-participations", "4",
                         "--participation", "cyclic", "--json"])
    assert out["mean_error"] == pytest.approx(9.7303, abs=5e-4)
    assert out["max_participations"] == 4 and out["min_sep"] == 128


def test_factorize_scheduled_workload_errors_are_on_full_workload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["factorize", "--workload", "sgd", "--schedule", "cosine", "--rounds", "64", "--json"]
    blind = _json(capsys, [*args, "--method", "sqrt"])
    aware = _json(capsys, [*args, "--method", "lr-sqrt"])
    # lr-aware lowers MaxSE on a decaying schedule (arXiv 2511.17994).
    assert aware["max_error"] < blind["max_error"]


def test_factorize_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.npz"
    assert main(["factorize", "--rounds", "32", "--method", "bisr", "--bands", "4",
                 "--save", str(path)]) == 0
    capsys.readouterr()
    data = np.load(path)
    assert data["noise_band"].shape == (32, 4)
    assert json.loads(str(data["report"]))["method"] == "bisr"


def test_calibrate_achieves_target(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmf.accounting import epsilon

    out = _json(capsys, ["calibrate", "--rounds", "64", "--method", "bisr", "--bands", "4",
                         "--min-sep", "16", "--epsilon", "2", "--delta", "1e-5", "--json"])
    eps = epsilon(noise_multiplier=out["noise_multiplier"], sensitivity=out["sensitivity"],
                  delta=1e-5)
    assert eps == pytest.approx(2.0, rel=1e-3)


def test_plan_names_best(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["plan", "--rounds", "64", "--bands", "4", "--epsilon", "8", "--json",
                         "--methods", "identity,sqrt,bisr,bsr"])
    by = {r["method"]: r for r in out["methods"]}
    assert out["best"] == min(by, key=lambda m: by[m]["mean_error"])
    assert by["identity"]["noise_floats_per_param"] == 0
    assert by["bisr"]["noise_floats_per_param"] == 3
    # Equal privacy: the multiplier scales with the sensitivity.
    ratio = by["sqrt"]["noise_multiplier"] / by["identity"]["noise_multiplier"]
    assert ratio == pytest.approx(by["sqrt"]["sensitivity"] / by["identity"]["sensitivity"])
    # One round's noise: identity's is the multiplier itself; sqrt's is larger by
    # rms_t ||(C^{-1})_t|| > 1 (what correlation costs per round).
    assert by["identity"]["round_noise"] == pytest.approx(by["identity"]["noise_multiplier"])
    assert by["sqrt"]["round_noise"] > 1.01 * by["sqrt"]["noise_multiplier"]


def test_plan_assumes_simulates_participation(capsys: pytest.CaptureFixture[str]) -> None:
    """With simulate's --clients/--clients-per-round and no --min-sep, plan analyses
    simulate's cohorts (b = clients // clients-per-round, k = rounds / b), as --min-sep 0
    does, and the table's title says so; without them it says one participation."""
    common = ["plan", "--workload", "sgd", "--momentum", "0.9", "--rounds", "16", "--bands",
              "4", "--epsilon", "8", "--methods", "identity,bsr"]
    implied = _json(capsys, [*common, "--clients", "40", "--clients-per-round", "10", "--json"])
    explicit = _json(capsys, [*common, "--clients", "40", "--clients-per-round", "10",
                              "--min-sep", "0", "--json"])
    single = _json(capsys, [*common, "--json"])
    for a, b in zip(implied["methods"], explicit["methods"], strict=True):
        assert (a["min_sep"], a["max_participations"]) == (4, 4)
        assert a["noise_multiplier"] == pytest.approx(b["noise_multiplier"])
    bsr = {r["method"]: r for r in single["methods"]}["bsr"]
    assert bsr["noise_multiplier"] < implied["methods"][1]["noise_multiplier"]
    assert main([*common, "--clients", "40", "--clients-per-round", "10"]) == 0
    text = capsys.readouterr().out
    assert "participation cyclic b=4, k=4" in text and "noise/round: std of one round" in text
    assert "lowest noise/round: identity" in text
    assert main(common) == 0
    assert "one participation per client" in capsys.readouterr().out


def test_plan_skips_a_method_that_cannot_serve_the_setting(
        capsys: pytest.CaptureFixture[str]) -> None:
    """bandmf with more bands than the separation b is refused by factorize, skipped by plan."""
    argv = ["plan", "--rounds", "32", "--min-sep", "4", "--bands", "8", "--epsilon", "8",
            "--methods", "identity,bandmf"]
    assert main(["factorize", *argv[1:7], "--method", "bandmf"]) == 2
    capsys.readouterr()
    out = _json(capsys, [*argv, "--json"])
    assert [r["method"] for r in out["methods"]] == ["identity"]
    assert "bands" in out["skipped"]["bandmf"]
    assert main([*argv[:-1], "bandmf"]) == 2  # nothing left to compare: an error
    assert "no method serves" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "param"),
    [
        (["factorize", "--rounds", "16", "--method", "bisr", "--bands", "0"], "bands"),
        (["factorize", "--workload", "sgd", "--rounds", "16", "--lr", "-1"], "lr"),
        (["factorize", "--rounds", "16", "--min-sep", "8", "--max-participations", "3"],
         "max-participations"),
        (["factorize", "--rounds", "16", "--min-sep", "0"], "min-sep"),
        (["calibrate", "--rounds", "16", "--epsilon", "0"], "epsilon"),
        (["calibrate", "--rounds", "16", "--epsilon", "1", "--delta", "1.5"], "delta"),
        (["plan", "--rounds", "16", "--methods", "bogus"], "methods"),
    ],
)
def test_bad_arguments_exit_nonzero_naming_parameter(
    argv: list[str], param: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert param in err


def test_unknown_method_rejected_by_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["factorize", "--method", "nope"])
    assert exc.value.code != 0
    assert "--method" in capsys.readouterr().err


def test_console_script_installed() -> None:
    exe = shutil.which("fedmf", path=str(Path(sys.executable).parent))
    assert exe is not None, "the fedmf console script is not installed in this environment"
    res = subprocess.run([exe, "factorize", "--rounds", "64", "--method", "bisr", "--bands",
                          "4", "--json"], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(res.stdout)["method"] == "bisr"


# ---------------------------------------------------------------------------- --sampling
AMPLIFIED_KEYS = {"noise_multiplier_unamplified", "noise_multiplier_amplified", "epsilon_bound",
                  "sampling", "accountant", "epsilon_amplified", "epsilon_unamplified"}


def test_calibrate_poisson_shows_both_multipliers(capsys: pytest.CaptureFixture[str]) -> None:
    """NOTES: n = 80, q = 250 / 1000, eps 2: z = 4.64 with amplification."""
    out = _json(capsys, ["calibrate", "--rounds", "80", "--method", "identity", "--epsilon", "2",
                         "--sampling", "poisson", "--clients", "1000", "--clients-per-round",
                         "250", "--json"])
    assert out.keys() >= AMPLIFIED_KEYS
    assert out["noise_multiplier_amplified"] == pytest.approx(4.64, rel=0.01)
    assert out["noise_multiplier"] == out["noise_multiplier_amplified"]
    assert out["noise_multiplier_unamplified"] > 3 * out["noise_multiplier_amplified"]
    assert out["epsilon_bound"] == "amplified" and out["accountant"] == "pld-poisson"
    assert out["epsilon"] <= 2.0


def test_plan_balls_in_bins_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["plan", "--rounds", "16", "--min-sep", "4", "--bands", "4",
                         "--epsilon", "1", "--delta", "1e-3", "--sampling", "balls-in-bins",
                         "--mc-samples", "100000", "--methods", "identity,bsr,optimal",
                         "--json"])
    by = {r["method"]: r for r in out["methods"]}
    assert set(by) == {"identity", "bsr"} and out["sampling"] == "balls-in-bins"
    assert "Toeplitz" in out["skipped"]["optimal"]
    for row in by.values():
        assert row.keys() >= AMPLIFIED_KEYS
        assert row["accountant"] == "monte-carlo" and row["mc_samples"] == 100_000
        assert row["noise_multiplier"] == min(row["noise_multiplier_amplified"],
                                              row["noise_multiplier_unamplified"])
    # identity: 4 secret bins amplify a lot
    assert by["identity"]["epsilon_bound"] == "amplified"
    assert by["identity"]["noise_multiplier"] < 0.8 * by["identity"]["noise_multiplier_unamplified"]


def test_plan_cyclic_poisson_skips_and_compares_groupings(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["plan", "--rounds", "16", "--min-sep", "2", "--bands", "2",
                         "--epsilon", "2", "--sampling", "cyclic-poisson", "--clients", "40",
                         "--clients-per-round", "10", "--methods", "bsr,bisr", "--json"])
    assert [r["method"] for r in out["methods"]] == ["bsr"]
    why = out["skipped"]["bisr"]
    assert why.startswith("sampling") and "cyclic-poisson" in why and "bisr" in why
    choices = out["cyclic_poisson_choices"]
    assert [c["min_sep"] for c in choices] == [1, 2, 4]  # q = 10 b / 40 <= 1
    assert all(c["bands"] == c["min_sep"] for c in choices)


@pytest.mark.parametrize(("argv", "words"), [
    (["calibrate", "--rounds", "16", "--method", "bisr", "--bands", "2", "--min-sep", "2",
      "--epsilon", "2", "--sampling", "cyclic-poisson", "--clients", "40",
      "--clients-per-round", "10"], ["sampling", "cyclic-poisson", "bisr"]),
    (["calibrate", "--rounds", "16", "--method", "bsr", "--bands", "2", "--epsilon", "2",
      "--sampling", "poisson", "--clients", "40", "--clients-per-round", "10"],
     ["sampling", "poisson", "bsr"]),
    (["calibrate", "--rounds", "16", "--method", "bsr", "--bands", "2", "--epsilon", "2",
      "--sampling", "balls-in-bins"], ["min-sep", "balls-in-bins"]),
    (["calibrate", "--rounds", "16", "--method", "identity", "--epsilon", "2",
      "--sampling", "poisson"], ["clients", "poisson"]),
])
def test_sampling_refusals_name_sampling_and_method(
        argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for word in words:
        assert word in err


def test_simulate_flags_are_generated_from_the_configuration() -> None:
    """Every run-config key is a flag of simulate and audit (compare: all but its grid
    axes), with its field's default and docstring text in --help; nothing is kept by hand."""
    import argparse

    from simulations.cli import build_parser, config_flags
    from simulations.config import RunConfig, known_keys

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    defaults = RunConfig().to_run_config()
    flags = {key: (default, text) for _, key, _, default, text in config_flags()}
    assert set(flags) == set(known_keys())
    for command, missing in (("simulate", {"output-dir"}), ("audit", {"output-dir"}),
                             ("compare", {"output-dir", "mechanism", "epsilon", "schedule",
                                          "seed", "checkpoint-dir"})):
        dests = {a.dest[3:] for a in sub.choices[command]._actions if a.dest.startswith("rc:")}
        assert dests == set(known_keys()) - missing, command
    for key, (default, text) in flags.items():
        assert default == defaults[key] or (isinstance(default, tuple)
                                            and list(default) == list(defaults[key])), key
        assert len(text) > 8, f"{key}: no help text in its dataclass docstring"
    helptext = sub.choices["simulate"].format_help()
    assert "scatter-linear (cifar10)" in helptext and "(default: 16, capped at" in helptext
    assert "--num-clients INT, --clients INT" in helptext


def test_one_vocabulary_across_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """The maths commands take simulate's spellings: --mechanism dp-fedavg, --server-lr,
    --server-momentum, --num-clients; the results equal their own spellings'."""
    own = _json(capsys, ["calibrate", "--method", "identity", "--workload", "sgd",
                         "--momentum", "0.9", "--lr", "0.5", "--rounds", "16", "--clients",
                         "40", "--clients-per-round", "10", "--min-sep", "0", "--epsilon",
                         "8", "--json"])
    sim = _json(capsys, ["calibrate", "--mechanism", "dp-fedavg", "--workload", "sgd",
                         "--server-momentum", "0.9", "--server-lr", "0.5", "--rounds", "16",
                         "--num-clients", "40", "--clients-per-round", "10", "--epsilon",
                         "8", "--json"])
    assert sim["noise_multiplier"] == pytest.approx(own["noise_multiplier"])
    plan = _json(capsys, ["plan", "--rounds", "16", "--mechanisms", "dp-fedavg,bsr",
                          "--bands", "4", "--epsilon", "8", "--json"])
    assert [r["method"] for r in plan["methods"]] == ["identity", "bsr"]
    assert main(["plan", "--rounds", "16", "--methods", "fedavg", "--epsilon", "8"]) == 2
    assert "dp-fedavg = identity" in capsys.readouterr().err


def test_factorize_clamps_bands_above_rounds(capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="fedmf"):
        out = _json(capsys, ["factorize", "--rounds", "16", "--method", "bisr", "--bands", "17",
                             "--json"])
    assert out["bands"] == 16 and "clamped to bands=16" in caplog.text


def test_calibrate_uses_the_server_optimizer_simulate_runs(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --workload, calibrate and plan see the schedule and momentum given (as simulate
    does): bsr's z with momentum 0.9 is plan's, and differs from the prefix sum's; asking for
    the prefix workload together with momentum is an error naming both, not a silent drop."""
    flags = ["--rounds", "16", "--clients", "40", "--clients-per-round", "10", "--bands", "2",
             "--epsilon", "8", "--json"]
    cal = _json(capsys, ["calibrate", "--mechanism", "bsr", "--server-momentum", "0.9", *flags])
    plan = _json(capsys, ["plan", "--mechanisms", "bsr", "--server-momentum", "0.9", *flags])
    assert cal["noise_multiplier"] == pytest.approx(plan["methods"][0]["noise_multiplier"])
    flat = _json(capsys, ["calibrate", "--mechanism", "bsr", *flags])
    prefix = _json(capsys, ["calibrate", "--mechanism", "bsr", "--workload", "prefix", *flags])
    assert flat["noise_multiplier"] == pytest.approx(prefix["noise_multiplier"])
    assert cal["sensitivity"] != pytest.approx(flat["sensitivity"], rel=1e-3)
    assert main(["calibrate", "--mechanism", "bsr", "--workload", "prefix",
                 "--server-momentum", "0.9", *flags]) == 2
    err = capsys.readouterr().err
    assert "--workload prefix ignores --server-momentum" in err and "--workload sgd" in err
