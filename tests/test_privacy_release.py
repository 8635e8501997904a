"""What a run releases: the flower-dp cross-check's sensitivity, the secret noise seed, the
private checkpoint, and restarts that would spend the budget twice."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clients_fixtures import write_tiny_cifar
from flower_helpers import InProcessGrid, as_array_record, make_train_reply, task_identity
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmf.noise import CorrelatedNoise
from simulations import results
from simulations.cli import main
from strategies import DPConfig, DPMatrixFactorizationFedAvg, FlowerDPFedAvg, build_strategy
from strategies.arrays import array_to_numpy

SEED = 8675309123  # a distinctive number to look for in every file


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release_data")
    write_tiny_cifar(root)
    return root


# ------------------------------------------------------------------ flower-dp sensitivity
def _flower_round(sampling: str = "cohort", **kw: Any) -> tuple[FlowerDPFedAvg, list[int],
                                                                np.ndarray]:
    cfg = DPConfig(mechanism="flower-dp", rounds=4, clients_per_round=3, num_clients=6,
                   min_sep=2, clip_norm=1.0, noise_multiplier=0.3, participation_timeout=0.0,
                   **kw)
    s = FlowerDPFedAvg(config=cfg, sampling=sampling, poll_interval=0.01)
    theta = np.full(4, 0.5, np.float32)
    init = as_array_record({"w": theta, "steps": np.array(7, np.int64)})
    msgs = list(s.configure_train(1, init, ConfigRecord(), InProcessGrid(lambda n, m: None,
                                                                         list(range(1, 7)))))
    return s, [int(m.metadata.dst_node_id) for m in msgs], theta


SMALL = np.array([0.3, 0.4, 0.0, 0.0], np.float32)  # norm 0.5 < clip
BIG = np.array([0.0, 0.0, 3.0, 4.0], np.float32)    # norm 5 -> clipped to 1


@pytest.mark.parametrize("sampling", ["cohort", "uniform"])
def test_flower_dp_divides_by_m_with_uniform_weights(sampling: str) -> None:
    """num-examples must not weigh at all: Flower's noise std z*clip/m assumes every weight is
    exactly 1/m.  Flower's accountant composes the released round."""
    s, nodes, theta = _flower_round(sampling)
    assert len(nodes) == 3
    counts = [1, 1000, 7]  # skewed example counts
    deltas = [SMALL, BIG, -SMALL]
    replies = [make_train_reply(n, {"w": theta + d, "steps": np.array(99, np.int64)},
                                {"num-examples": c})
               for n, d, c in zip(nodes, deltas, counts, strict=True)]
    np.random.seed(123)  # Flower's wrapper draws from the global np.random
    out, metrics = s.aggregate_train(1, replies)
    np.random.seed(123)
    noise = np.random.normal(0.0, 0.3 * 1.0 / 3, 4)  # std z * clip / m
    expected = theta + (BIG / 5.0) / 3.0 + noise
    np.testing.assert_allclose(array_to_numpy(out["w"]), expected, atol=1e-6)
    assert int(array_to_numpy(out["steps"])) == 7  # the server's integer buffers
    assert metrics["num_accepted"] == 3 and metrics["num_clipped"] == 1
    assert metrics["noise_std"] == pytest.approx(0.3 / 3)
    k = 4 if sampling == "uniform" else 2
    assert s.privacy["max_participations"] == k
    assert s.privacy["sensitivity"] == pytest.approx(np.sqrt(k))
    # Flower's accountant: one Gaussian with multiplier z, no amplification (dp_accounting)
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ref = RdpAccountant().compose(dp_accounting.GaussianDpEvent(0.3)).get_epsilon(1e-5)
    assert s.accountant.num_releases == 1
    assert metrics["flower_epsilon"] == pytest.approx(ref, rel=1e-9)
    assert s.privacy["flower_epsilon"] == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("failure", ["lost", "error", "zero-update"])
def test_flower_dp_strict_mode_releases_nothing_without_m_replies(failure: str) -> None:
    """Dividing by fewer than m would raise the sensitivity: Flower's accounted mode releases
    no model and composes no event."""
    from flwr.app import Error

    s, nodes, theta = _flower_round()
    replies = [make_train_reply(n, {"w": theta + SMALL, "steps": np.array(1, np.int64)})
               for n in nodes]
    if failure == "lost":
        replies = replies[:2]
    elif failure == "zero-update":  # Flower's clipping would divide by its zero norm
        replies[2] = make_train_reply(nodes[2], {"w": theta, "steps": np.array(1, np.int64)})
    else:
        replies[2] = Message(Error(code=0, reason="boom"), reply_to=replies[2])
    out, metrics = s.aggregate_train(1, replies)
    assert out is None
    assert s.accountant.num_releases == 0 and metrics["flower_epsilon"] == 0.0
    assert metrics["num_accepted"] == 0 and metrics["noise_std"] == 0.0
    assert metrics["num_failures"] == (0 if failure == "lost" else 1)


def test_flower_dp_epsilons_bracket_each_other() -> None:
    """With uniform sampling (every client may join every round) the ledger's exact Gaussian
    epsilon and Flower's RDP epsilon account for the same release: RDP is looser, not by
    much.  With cohorts (k < rounds) Flower's accountant, which knows no participation
    limits, reports more."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    from strategies.baselines import flower_accountant

    for sampling, ratio in (("uniform", 1.25), ("cohort", None)):
        cfg = DPConfig(mechanism="flower-dp", rounds=40, clients_per_round=5, num_clients=20,
                       min_sep=4, epsilon=4.0, clipping="server")
        s = FlowerDPFedAvg(config=cfg, sampling=sampling)
        acc = flower_accountant(cfg)
        acc.compose(GaussianPrivacyEvent(noise_multiplier=s.noise_multiplier, sample_size=5,
                                         population_size=20), count=40)
        ours = s.ledger.epsilon_spent(40)
        assert ours == pytest.approx(4.0, rel=1e-4)
        if ratio is not None:
            assert ours < acc.get_epsilon(1e-5) < ratio * ours
        else:
            assert acc.get_epsilon(1e-5) > 2 * ours  # k = 10 of 40 rounds


def test_strategies_release_no_client_evaluation_by_default() -> None:
    for mechanism in ("lr-bisr", "dp-fedavg", "fedavg", "flower-dp"):
        s = build_strategy(DPConfig(mechanism=mechanism, rounds=4, bands=2, noise_multiplier=1.0))
        inner = s.inner if isinstance(s, FlowerDPFedAvg) else s
        assert inner.fraction_evaluate == 0.0, mechanism


# ------------------------------------------------------------------ the noise seed
def test_fixed_noise_seed_needs_insecure_reproducible() -> None:
    with pytest.raises(ValueError, match=r"^noise-seed") as err:
        DPConfig(mechanism="bisr", rounds=4, bands=2, noise_seed=SEED)
    assert str(SEED) not in str(err.value)
    assert DPConfig(mechanism="bisr", rounds=4, bands=2, noise_seed=SEED,
                    insecure_reproducible=True).noise_seed == SEED
    with pytest.raises(ValueError, match=r"^noise-seed must never be a run-config key"):
        DPConfig.from_run_config({"mechanism": "bisr", "noise-seed": SEED,
                                  "insecure-reproducible": True})


def test_cli_refuses_a_noise_seed_without_the_flag(data_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--output", str(tmp_path / "o"), "--data-dir", str(data_dir),
            "--rounds", "2", "--clients", "4", "--clients-per-round", "2", "--bands", "1",
            "--backend", "inprocess", "--no-progress", "--noise-seed", "5"]
    assert main(argv) == 2
    assert "error: noise-seed" in capsys.readouterr().err


seen_run_configs: list[dict[str, Any]] = []
recording_app = ClientApp()


@recording_app.train()
def _recording_train(msg: Message, context: Context) -> Message:
    seen_run_configs.append(dict(context.run_config))
    from clients.client_app import app as real_app

    return real_app(msg, context)


def test_seed_reaches_no_client_and_no_results_file(data_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    monkeypatch.setenv("FEDMF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = RunConfig.from_run_config(
        {"data-dir": str(data_dir), "rounds": 2, "num-clients": 4, "clients-per-round": 2,
         "mechanism": "bisr", "bands": 1, "batch-size": 8, "output-dir": str(out),
         "checkpoint-dir": str(tmp_path / "ckpt"), "insecure-reproducible": True},
        noise_seed=SEED)
    assert str(SEED) not in repr(cfg) and "noise-seed" not in cfg.to_run_config()
    seen_run_configs.clear()
    caplog.set_level(logging.DEBUG)
    run_simulation(cfg, backend="inprocess", client_app=recording_app)
    assert len(seen_run_configs) == 4
    for rc in seen_run_configs:
        assert not any("seed" in k and k != "seed" for k in rc), rc
        assert str(SEED) not in json.dumps(rc)
    for path in out.iterdir():
        assert str(SEED) not in path.read_text(), path.name
    assert str(SEED) not in caplog.text
    summary = results.read_summary(out)
    assert summary["insecure_reproducible"] is True and summary["seeds"] == {"seed": 0}
    # the finished run's checkpoint (the only file that held the seed) is gone
    assert not (tmp_path / "ckpt" / "strategy_state.pt").exists()
    # the same seed reproduces the same noise: identical final models
    out2 = tmp_path / "run2"
    run_simulation(cfg.replace(**{"output-dir": str(out2),
                                  "checkpoint-dir": str(tmp_path / "c2")}), backend="inprocess")
    run_simulation(cfg.replace(**{"output-dir": str(tmp_path / "run3"),
                                  "checkpoint-dir": str(tmp_path / "c3")}), backend="inprocess")
    assert results.read_rounds(out2)[-1]["loss"] == results.read_rounds(tmp_path / "run3")[
        -1]["loss"]


def test_seed_mode_noise_refuses_another_device() -> None:
    cfg = DPConfig(mechanism="bisr", bands=3, rounds=6, noise_multiplier=1.0)
    spec = cfg.factorization().noise_spec
    for mode in ("seed", "buffer"):
        noise = CorrelatedNoise(spec=spec, std=1.0, seed=3, mode=mode, device="cpu")
        noise.next(torch.zeros(5))
        state = noise.state_dict()
        state["device"] = "cuda:0"  # as if the stream had been produced on a GPU
        if mode == "seed":
            with pytest.raises(ValueError, match=r"^device: .*seed"):
                CorrelatedNoise.from_state_dict(state, spec=spec, device="cpu")
        else:  # the buffer holds the past draws: continuing elsewhere is safe
            resumed = CorrelatedNoise.from_state_dict(state, spec=spec, device="cpu")
            assert resumed.next(torch.zeros(5)).shape == (5,)


# ------------------------------------------------------------------ restarts
def test_partial_run_without_checkpoint_is_refused(data_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    monkeypatch.setenv("FEDMF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    results.append_round(out, {"round": 1, "accuracy": 0.1})  # a run whose checkpoint is lost
    cfg = RunConfig.from_run_config(
        {"data-dir": str(data_dir), "rounds": 2, "num-clients": 4, "clients-per-round": 2,
         "mechanism": "bisr", "bands": 1, "batch-size": 8, "output-dir": str(out),
         "checkpoint-dir": str(tmp_path / "ckpt")})
    with pytest.raises(ValueError, match=r"^output-dir: .*spend the privacy budget twice"):
        run_simulation(cfg, backend="inprocess")
    from simulations.server_app import check_restart

    with pytest.raises(ValueError, match="but no checkpoint-dir is set") as err:
        check_restart(cfg.replace(**{"checkpoint-dir": ""}))
    # the advice covers flwr run (run-config keys) and fedmf simulate (flags)
    assert "setting checkpoint-dir" in str(err.value) and "--resume" in str(err.value)
    argv = ["simulate", "--output", str(out), "--data-dir", str(data_dir), "--rounds", "2",
            "--clients", "4", "--clients-per-round", "2", "--bands", "1", "--batch-size", "8",
            "--backend", "inprocess", "--no-progress"]
    (out / "run_config.json").write_text(json.dumps(cfg.to_run_config()))
    assert main(argv) == 2  # an interrupted run: --resume or --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2  # its checkpoint is gone: refused, not restarted
    assert "spend the privacy budget twice" in capsys.readouterr().err
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert main([*argv, "--overwrite"]) == 0
    assert [r["round"] for r in results.read_rounds(out)] == [1, 2]
    assert results.read_summary(out)["rounds_completed"] == 2


def test_dpmf_reply_from_unsampled_node_is_rejected() -> None:
    cfg = DPConfig(mechanism="dp-fedavg", rounds=2, clients_per_round=2, num_clients=4,
                   min_sep=2, noise_multiplier=1.0, participation_timeout=0.0)
    s = DPMatrixFactorizationFedAvg(config=cfg)
    init = as_array_record({"w": np.zeros(3, np.float32)})
    msgs = list(s.configure_train(1, init, ConfigRecord(), InProcessGrid(lambda n, m: None,
                                                                         [1, 2, 3, 4])))
    sampled = {int(m.metadata.dst_node_id) for m in msgs}
    other = next(n for n in (1, 2, 3, 4) if n not in sampled)
    _, metrics = s.aggregate_train(1, [make_train_reply(other, {"w": np.ones(3, np.float32)})])
    assert metrics["num_rejected"] == 1 and metrics["num_accepted"] == 0
