"""The privacy audit (``fedmf.audit``, ``simulations.audit``, ``fedmf audit``): statistics
against closed forms and brute force, canary replies and scores against direct computation,
and end-to-end runs whose claim holds -- and one whose noise is cut to a tenth, which the
lower bound must catch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clients_fixtures import cifar_config, write_tiny_cifar
from flower_helpers import task_identity
from scipy import stats

from fedmf import audit

# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("mu", [0.3, 1.0, 3.0])
def test_gaussian_epsilon_matches_dp_accounting(mu: float) -> None:
    """The closed form of the Gaussian mechanism against dp_accounting's PLD accountant
    (noise multiplier 1/mu for sensitivity 1)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(1.0 / mu))
    assert audit.gaussian_epsilon(mu=mu, delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5),
                                                                      rel=2e-3)
    # and delta(eps) against direct numerical integration of (p - e^eps q)_+
    x = np.linspace(-40, 40, 400_001)
    eps = 1.0
    integrand = np.maximum(stats.norm.pdf(x, mu) - math.exp(eps) * stats.norm.pdf(x), 0.0)
    assert audit.gaussian_delta(eps, mu=mu) == pytest.approx(np.trapezoid(integrand, x),
                                                             rel=1e-6, abs=1e-12)


def test_clopper_pearson_is_the_exact_binomial_bound() -> None:
    """At the bounds the binomial tail probabilities equal alpha."""
    for k, n in ((0, 20), (3, 20), (20, 20), (57, 300)):
        lo, hi = audit.clopper_pearson(k, n, alpha=0.01)
        if k > 0:
            assert stats.binom.sf(k - 1, n, lo) == pytest.approx(0.01, rel=1e-6)
        else:
            assert lo == 0.0
        if k < n:
            assert stats.binom.cdf(k, n, hi) == pytest.approx(0.01, rel=1e-6)
        else:
            assert hi == 1.0
    with pytest.raises(ValueError, match="successes"):
        audit.clopper_pearson(5, 3, alpha=0.05)


def _brute_lower_bound(ins: np.ndarray, out: np.ndarray, *, delta: float,
                       confidence: float) -> float:
    cands = np.unique(np.concatenate([ins, out]))
    alpha = (1 - confidence) / (4 * len(cands))
    best = 0.0
    for a, b in ((ins, out), (-ins, -out)):
        for tau in (cands if a is ins else -cands):
            tp, fp = int((a >= tau).sum()), int((b >= tau).sum())
            if tp == 0:
                continue
            lo, _ = audit.clopper_pearson(tp, len(a), alpha=alpha)
            _, hi = audit.clopper_pearson(fp, len(b), alpha=alpha)
            if lo > delta:
                best = max(best, math.log((lo - delta) / hi))
    return best


def test_lower_bound_equals_brute_force_over_thresholds() -> None:
    rng = np.random.default_rng(3)
    for mu in (0.0, 1.5, 6.0):
        ins, out = rng.normal(mu, 1, 60), rng.normal(0, 1, 50)
        got = audit.epsilon_lower_bound(inserted=ins, held_out=out, delta=1e-5)
        assert got["epsilon"] == pytest.approx(
            _brute_lower_bound(ins, out, delta=1e-5, confidence=0.95), abs=1e-9)
    # perfectly separated in the "low" direction: TP = 60/60, FP = 0/50 at the best
    # threshold, whose exact intervals are alpha^(1/60) and 1 - alpha^(1/50)
    ins = rng.normal(-9, 1, 60)
    low = audit.epsilon_lower_bound(inserted=ins, held_out=out, delta=1e-5)
    alpha = 0.05 / (4 * 110)
    assert low["direction"] == "low" and (low["true_positives"], low["false_positives"]) == (
        60, 0)
    assert low["epsilon"] == pytest.approx(
        math.log((alpha ** (1 / 60) - 1e-5) / (1 - alpha ** (1 / 50))), rel=1e-9)


def test_lower_bound_holds_for_a_gaussian_mechanism() -> None:
    """Scores drawn from the Gaussian mechanism with mu = 2 (epsilon 8.3 at 1e-5): over 40
    fixed seeds the 95 % lower bound is never above the truth, and it is informative."""
    truth = audit.gaussian_epsilon(mu=2.0, delta=1e-5)
    bounds = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        res = audit.epsilon_lower_bound(inserted=rng.normal(2, 1, 500),
                                        held_out=rng.normal(0, 1, 500), delta=1e-5)
        bounds.append(res["epsilon"])
    assert max(bounds) <= truth
    assert np.mean(bounds) > 0.5


def test_one_shot_estimate_recovers_the_gaussian_mechanism() -> None:
    rng = np.random.default_rng(0)
    for mu in (0.5, 1.0, 2.0):
        est = audit.one_shot_epsilon(inserted=rng.normal(mu, 0.1, 20_000) * 1.0,
                                     held_out=rng.normal(0, 0.1, 20_000), delta=1e-5)
        # scores in units of 0.1: mu/0.1 standard deviations apart
        assert est["mu"] == pytest.approx(mu / 0.1, rel=0.03)
    est = audit.one_shot_epsilon(inserted=rng.normal(1, 1, 20_000),
                                 held_out=rng.normal(0, 1, 20_000), delta=1e-5)
    assert est["epsilon"] == pytest.approx(audit.gaussian_epsilon(mu=1.0, delta=1e-5), rel=0.04)
    same = audit.one_shot_epsilon(inserted=rng.normal(0, 1, 5000),
                                  held_out=rng.normal(0, 1, 5000), delta=1e-5)
    assert same["epsilon"] < 0.5
    with pytest.raises(ValueError, match="held_out: need at least 2"):
        audit.one_shot_epsilon(inserted=[0.1, 0.2], held_out=[0.1], delta=1e-5)


def test_directions_and_cosines() -> None:
    d = audit.unit_directions(count=7, dim=1000, seed=[1, 2])
    assert d.shape == (7, 1000) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    assert np.array_equal(d, audit.unit_directions(count=7, dim=1000, seed=[1, 2]))
    v = 3.0 * d[2] + 0.0
    assert audit.cosine_scores(d, v)[2] == pytest.approx(1.0, abs=1e-5)
    assert np.all(audit.cosine_scores(d, np.zeros(1000)) == 0)


# --------------------------------------------------------------------------- scores, replies
def test_scorer_scores_final_model_and_every_round_by_brute_force() -> None:
    import torch

    from simulations.audit import CanaryScorer, audit_layout

    rng = np.random.default_rng(0)
    states = [{"w": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32),
               "steps": torch.tensor(t), "b": torch.tensor(rng.normal(size=4),
                                                           dtype=torch.float32)}
              for t in range(4)]
    layout = audit_layout(states[0])
    assert [k for k, _ in layout] == ["w", "b"]  # integer buffers are not coordinates
    dirs = audit.unit_directions(count=5, dim=16, seed=0)
    scorer = CanaryScorer(directions=dirs, inserted=2, layout=layout)
    for t, st in enumerate(states):
        scorer.observe(t, st)
    flat = [np.concatenate([s["w"].numpy().ravel(), s["b"].numpy().ravel()]) for s in states]

    def cos(v: np.ndarray) -> np.ndarray:
        return dirs @ v / np.linalg.norm(v)

    got = scorer.scores()
    assert np.allclose(got["final_model"], cos(flat[3] - flat[0]), atol=1e-5)
    steps = np.stack([cos(flat[t] - flat[t - 1]) for t in (1, 2, 3)])
    assert np.allclose(got["every_round"], steps.max(axis=0), atol=1e-5)


@pytest.fixture(scope="module", name="audit_data")
def audit_data_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """800 tiny CIFAR images: 2 per client for 400 clients."""
    root = tmp_path_factory.mktemp("audit_data")
    write_tiny_cifar(root, n_train=800, n_test=20)
    return root


def _flat(data: Path, **overrides: Any) -> dict[str, Any]:
    return {**cifar_config(data, **{"num-clients": 400, "batch-size": 2, "val-fraction": 0.0}),
            "rounds": 4, "clients-per-round": 100, "eval-every": 4, "epsilon": 2.0,
            "bands": 2, **overrides}


def test_canary_reply_is_the_model_plus_clip_times_direction(audit_data: Path,
                                                             fedmf_cache: Path) -> None:
    import torch
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from clients import task
    from clients.config import client_config
    from simulations.audit import audit_layout
    from simulations.backends.vectorized import VectorizedGrid

    cfg = client_config(_flat(audit_data, **{"num-clients": 4}))
    grid = VectorizedGrid(config=cfg, num_nodes=4, device="cpu")
    layout = audit_layout(grid.template_state())
    dim = sum(math.prod(s) for _, s in layout)
    direction = audit.unit_directions(count=1, dim=dim, seed=9)[0]
    grid.set_canaries({2: direction}, layout=layout, norm=1.5)
    arrays = task.get_initial_arrays(cfg)
    with task_identity():
        msgs = [Message(RecordDict({"arrays": arrays,
                                    "config": ConfigRecord({"server-round": 1})}),
                        node, MessageType.TRAIN) for node in (1, 3)]  # node 3 = partition 2
        replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(msgs)}
    old = arrays.to_torch_state_dict()
    new = replies[3].content["arrays"].to_torch_state_dict()
    delta = torch.cat([(new[k] - old[k]).double().ravel() for k, _ in layout]).numpy()
    assert np.linalg.norm(delta) == pytest.approx(1.5, rel=1e-5)
    assert np.allclose(delta / 1.5, direction, atol=1e-5)
    assert replies[3].content["metrics"]["delta-norm"] == pytest.approx(1.5)
    assert not replies[1].has_error()  # the real client still trains
    assert replies[1].content["metrics"]["train-loss"] > 0


# --------------------------------------------------------------------------- end to end
def _audit(data: Path, tmp_path: Path, *, name: str, noise_scale: float = 1.0,
           monkeypatch: pytest.MonkeyPatch | None = None, **overrides: Any) -> dict[str, Any]:
    from simulations.audit import run_audit
    from simulations.config import RunConfig

    if noise_scale != 1.0:
        assert monkeypatch is not None
        from fedmf.noise import CorrelatedNoise

        draw = CorrelatedNoise.next

        # test-only hook: every noise draw scaled (the ledger still claims the full noise)
        def scaled(self: Any, like: Any) -> Any:
            return draw(self, like) * noise_scale

        monkeypatch.setattr(CorrelatedNoise, "next", scaled)
    flat = {**_flat(data, **overrides), "output-dir": str(tmp_path / name),
            "insecure-reproducible": True}
    cfg = RunConfig.from_run_config(flat, noise_seed=11)
    return run_audit(cfg, canaries=300, held_out=300, audit_seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["dp-fedavg", "bsr"])
def test_audit_stays_below_the_claim(mechanism: str, audit_data: Path, fedmf_cache: Path,
                                     tmp_path: Path) -> None:
    """b = 4 cohorts of 100 out of 400 clients, 4 rounds, epsilon 2: the estimate and the
    lower bound are below the claim under both threat models."""
    rep = _audit(audit_data, tmp_path, name=mechanism, mechanism=mechanism)
    assert rep["claimed_epsilon"] == pytest.approx(2.0, rel=1e-6)
    for threat in ("final_model", "every_round"):
        assert rep[threat]["one_shot"]["epsilon"] < 2.0
        assert rep[threat]["lower_bound"]["epsilon"] < 2.0
    saved = json.loads((tmp_path / mechanism / "audit.json").read_text())
    assert saved["canaries"]["inserted"] == 300 and saved["canaries"]["rounds"] == 4
    assert saved["final_model"]["lower_bound"]["confidence"] == 0.95


@pytest.mark.slow
def test_audit_catches_noise_cut_to_a_tenth(audit_data: Path, fedmf_cache: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """Every client in every round (b = 1), the noise scaled by 0.1 behind the ledger's
    back: the lower bound exceeds the claimed epsilon (the claim is refuted)."""
    rep = _audit(audit_data, tmp_path, name="cut", noise_scale=0.1, monkeypatch=monkeypatch,
                 mechanism="dp-fedavg", **{"clients-per-round": 400})
    assert rep["claimed_epsilon"] == pytest.approx(2.0, rel=1e-6)
    assert rep["final_model"]["lower_bound"]["epsilon"] > 2.0
    assert rep["final_model"]["one_shot"]["epsilon"] > 10.0


@pytest.mark.slow
def test_audit_cli_under_poisson_sampling(audit_data: Path, fedmf_cache: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """``fedmf audit`` end to end, amplified dp-fedavg: the report names the sampling and the
    amplified claim, and no participant list reaches the output folder."""
    from simulations.cli import main

    out = tmp_path / "cli"
    code = main(["audit", "--dataset", "cifar10", "--data-dir", str(audit_data), "--model",
                 "cnn", "--clients", "400", "--clients-per-round", "100", "--rounds", "3",
                 "--mechanism", "dp-fedavg", "--sampling", "poisson", "--epsilon", "2",
                 "--batch-size", "2", "--val-fraction", "0", "--eval-every", "3",
                 "--canaries", "100", "--output", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "audit of dp-fedavg@poisson" in text and "final_model" in text
    rep = json.loads((out / "audit.json").read_text())
    assert rep["sampling"] == "poisson" and rep["epsilon_bound"] == "amplified"
    assert rep["final_model"]["lower_bound"]["epsilon"] < 2.0
    assert not (out / "participation.json").exists()
    assert main(["audit", "--clients", "10", "--canaries", "10", "--output",
                 str(tmp_path / "bad")]) == 2
    assert "canaries must be in [2, num-clients=10)" in capsys.readouterr().err


def test_audit_refuses_bad_input(tmp_path: Path) -> None:
    from simulations.audit import run_audit
    from simulations.config import RunConfig

    cfg = RunConfig.from_run_config({"num-clients": 10, "clients-per-round": 5, "rounds": 2,
                                     "bands": 2,
                                     "output-dir": str(tmp_path / "a")})
    with pytest.raises(ValueError, match=r"^canaries must be in \[2, num-clients=10\)"):
        run_audit(cfg, canaries=10)
    with pytest.raises(ValueError, match=r"^backend: the audit runs on the vectorized"):
        run_audit(cfg, canaries=3, backend="ray")
    with pytest.raises(ValueError, match=r"^held-out must be >= 2"):
        run_audit(cfg, canaries=3, held_out=1)
