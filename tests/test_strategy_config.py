"""DPConfig parsing/validation and the factory."""

from __future__ import annotations

import numpy as np
import pytest

from fedmf.workloads import sgd_workload
from strategies import DPConfig, DPMatrixFactorizationFedAvg, FlowerDPFedAvg, build_strategy

RUN_CONFIG = {
    "dataset": "cifar10", "num-clients": 10, "clients-per-round": 5, "rounds": 20,
    "mechanism": "lr-bisr", "bands": 4, "min-sep": 0, "schedule": "cosine", "server-lr": 1.0,
    "final-server-lr": 0.0, "server-gamma": 0.99, "server-momentum": 0.5, "warmup": 2,
    "clip-norm": 1.0, "clipping": "server", "epsilon": 8.0, "delta": 1e-5,
    "noise-multiplier": 0.0, "seed": 0, "noise-mode": "buffer",
    "checkpoint-dir": "", "output-dir": "", "eval-every": 1,
}


def test_from_run_config_and_derived_objects() -> None:
    cfg = DPConfig.from_run_config(RUN_CONFIG)
    assert cfg.mechanism == "lr-bisr" and cfg.num_cohorts == 2 and cfg.max_participations == 10
    assert cfg.participation().min_sep == 2 and cfg.participation().max_participations == 10
    rates = cfg.schedule_rates()
    assert rates.shape == (20,) and np.all(rates > 0)
    assert cfg.workload() == sgd_workload(rates=rates, momentum=0.5)
    assert cfg.factorization() is cfg.factorization()  # cached
    assert cfg.factorization().workload == cfg.workload()
    assert "noise_seed" not in repr(cfg)
    cfg2 = DPConfig.from_run_config({**RUN_CONFIG, "min-sep": 4, "clients-per-round": 2})
    assert cfg2.num_cohorts == 4 and cfg2.max_participations == 5


@pytest.mark.parametrize(("change", "name"), [
    ({"bands": 0}, "bands"),
    ({"min-sep": -1}, "min-sep"),
    ({"clients-per-round": 11}, "clients-per-round"),  # > num-clients
    ({"min-sep": 3, "clients-per-round": 4}, "clients-per-round"),
    ({"clip-norm": 0.0}, "clip-norm"),
    ({"clip-norm": -1.0}, "clip-norm"),
    ({"mechanism": "dp-sgd"}, "mechanism"),
    ({"clipping": "both"}, "clipping"),
    ({"schedule": "cyclic"}, "schedule"),
    ({"delta": 0.0}, "delta"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"server-momentum": 1.0}, "server-momentum"),
    ({"noise-mode": "ring"}, "noise-mode"),
    ({"rounds": 0}, "rounds"),
])
def test_nonsense_fails_at_construction_naming_the_parameter(change: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}"):
        build_strategy({**RUN_CONFIG, **change})


def test_dpmf_kwargs_override_and_reject_flower_dp() -> None:
    s = DPMatrixFactorizationFedAvg(config=DPConfig(rounds=4, noise_multiplier=1.0,
                                                    mechanism="dp-fedavg"), bands=2)
    assert s.config.bands == 2
    with pytest.raises(ValueError, match="mechanism"):
        DPMatrixFactorizationFedAvg(config=DPConfig(mechanism="flower-dp", rounds=4))
    with pytest.raises(ValueError, match="bands"):
        DPMatrixFactorizationFedAvg(mechanism="bisr", rounds=4, bands=0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"^mechanism .*'identity' is now 'dp-fedavg'"):
        DPConfig(mechanism="identity")


@pytest.mark.parametrize("mechanism", ["fedavg", "dp-fedavg", "flower-dp", "bisr", "lr-bisr"])
def test_factory_returns_strategies_with_privacy(mechanism: str) -> None:
    s = build_strategy({**RUN_CONFIG, "mechanism": mechanism, "noise-multiplier": 2.0},
                       fraction_evaluate=0.5)
    assert isinstance(s, FlowerDPFedAvg if mechanism == "flower-dp" else
                      DPMatrixFactorizationFedAvg)
    keys = {"mechanism", "rounds", "min_sep", "max_participations", "sensitivity",
            "sensitivity_exact", "noise_multiplier", "epsilon", "delta", "rho"}
    assert keys <= set(s.privacy)
    assert s.last_train_metrics == {}
    if mechanism == "fedavg":
        assert s.privacy["epsilon"] == float("inf")
    else:
        assert 0 < s.privacy["epsilon"] < float("inf")
        assert s.privacy["noise_multiplier"] == 2.0


def test_dp_fedavg_is_the_identity_factorization_with_the_same_optimizer() -> None:
    """The fair baseline differs from the correlated mechanisms only in the noise: same server
    optimizer (schedule, momentum, warm-up), cohorts and accounting as Flower's wrapper."""
    dpf = build_strategy({**RUN_CONFIG, "mechanism": "dp-fedavg", "noise-multiplier": 3.0})
    lr = build_strategy({**RUN_CONFIG, "mechanism": "lr-bisr", "noise-multiplier": 3.0})
    flower = build_strategy({**RUN_CONFIG, "mechanism": "flower-dp", "noise-multiplier": 3.0})
    assert isinstance(dpf, DPMatrixFactorizationFedAvg)
    fact = dpf.config.factorization()
    assert fact.method == "identity"
    np.testing.assert_array_equal(fact.strategy_matrix(), np.eye(20))
    assert dpf.config.workload() == lr.config.workload()  # cosine, momentum 0.5, warm-up 2
    np.testing.assert_array_equal(dpf.rates, lr.rates)
    assert dpf.server_optimizer == lr.server_optimizer == (
        "sgd cosine lr 1->0, warmup 2, momentum 0.5, wd 0")
    assert flower.server_optimizer.startswith("flower: ")
    # k = 10 participations of independent noise: sensitivity sqrt(k), one Gaussian
    assert dpf.privacy["sensitivity"] == pytest.approx(np.sqrt(10))
    assert dpf.privacy["sensitivity"] == pytest.approx(flower.privacy["sensitivity"])
    assert dpf.privacy["epsilon"] == pytest.approx(flower.privacy["epsilon"], rel=1e-6)


def test_target_epsilon_calibration() -> None:
    s = build_strategy({**RUN_CONFIG, "mechanism": "bisr", "epsilon": 4.0})
    assert s.privacy["epsilon"] <= 4.0 + 1e-9
    assert s.privacy["epsilon"] == pytest.approx(4.0, rel=1e-3)


def test_bands_above_rounds_are_clamped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """One rule at every entry point: the run config of `flwr run` with the default bands=16
    and rounds=10 trains with 10 bands and says so (the README's example works as written)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="fedmf"):
        cfg = DPConfig.from_run_config({**RUN_CONFIG, "mechanism": "bisr", "rounds": 10,
                                        "bands": 16})
    assert cfg.bands == 10 and cfg.spec().bands == 10
    assert "bands=16 > rounds=10: clamped to bands=10" in caplog.text
    assert DPConfig.from_run_config({**RUN_CONFIG, "mechanism": "bisr", "rounds": 10,
                                     "bands": 16}).fingerprint() == cfg.fingerprint()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmf"):
        plain = DPConfig.from_run_config({**RUN_CONFIG, "mechanism": "dp-fedavg", "rounds": 10,
                                          "bands": 16})
    assert plain.bands == 16 and "clamped" not in caplog.text  # no bands to clamp
