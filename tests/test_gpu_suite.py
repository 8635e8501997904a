"""``benchmarks/gpu_suite.py``: its budget logic, failure isolation, and the CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE_PATH = REPO / "benchmarks" / "gpu_suite.py"


def _load_suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


# --------------------------------------------------------------------------- scheduling
def test_schedule_skips_a_measurement_whose_need_exceeds_the_remaining_budget() -> None:
    slot = suite.schedule(remaining_s=20.0, need_s=30.0, cap_s=100.0)
    assert not slot.run and slot.cap_s == 0.0
    assert slot.reason.startswith("budget: 20 s left") and "needs 30 s" in slot.reason


def test_schedule_caps_and_keeps_the_later_measurements_needs() -> None:
    assert suite.schedule(remaining_s=300.0, need_s=30.0, cap_s=100.0,
                          reserve_s=100.0) == suite.Slot(True, 100.0)
    assert suite.schedule(remaining_s=150.0, need_s=30.0, cap_s=100.0,
                          reserve_s=100.0) == suite.Slot(True, 50.0)
    kept = suite.schedule(remaining_s=120.0, need_s=30.0, cap_s=100.0, reserve_s=100.0)
    assert not kept.run and "kept for later measurements" in kept.reason
    assert suite.schedule(remaining_s=5.0, need_s=1.0).cap_s == 5.0  # no cap: all that is left
    assert not suite.schedule(remaining_s=-3.0, need_s=0.5).run  # over budget already


def test_full_pfl_run_only_where_it_fits_else_extrapolated() -> None:
    fits, estimate = suite.full_run_fits(probe_wall_s=20.0, probe_rounds=100,
                                         steady_round_s=0.1, target_rounds=1500, left_s=200.0)
    assert estimate == pytest.approx(20.0 + 1400 * 0.1) and fits  # 160 * 1.2 <= 200
    fits, estimate = suite.full_run_fits(probe_wall_s=20.0, probe_rounds=100,
                                         steady_round_s=0.1, target_rounds=1500, left_s=150.0)
    assert not fits and estimate == pytest.approx(160.0)


@pytest.mark.parametrize("round_s", [0.5, 100.0])
def test_pfl_runs_the_full_length_or_flags_the_extrapolation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, round_s: float) -> None:
    """The probe decides: the full run where it fits in what is left, else the estimate."""
    calls: list[int] = []

    def fake_run(cfg: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(cfg)
        return {"rounds": cfg, "seconds_per_round": round_s, "mean_seconds_per_round": round_s,
                "examples_per_second": 32.0 / round_s, "run_wall_s": 2.0 + cfg * round_s}

    monkeypatch.setattr(suite, "synthetic_data", lambda ctx: tmp_path)
    monkeypatch.setattr(suite, "bench_config", lambda ctx, tag, *, rounds, **kw: rounds)
    monkeypatch.setattr(suite, "install_synthetic_images", lambda cfg, **kw: None)
    monkeypatch.setattr(suite, "timed_run", fake_run)
    ctx = _context(tmp_path)
    ctx.name = "pfl_benchmark"
    rec = suite.Record(ctx)
    suite.pfl_benchmark(ctx, rec)
    data = rec.finish()
    res, probe, full = data["results"], suite.SMOKE.pfl_probe_rounds, suite.SMOKE.pfl_rounds
    estimate = 2.0 + probe * round_s + (full - probe) * round_s
    assert res["estimate_from_probe_s"] == pytest.approx(estimate)
    if round_s < 1:
        assert calls == [probe, full] and data["status"] == "ok"
        assert not data["extrapolated"] and res["rounds_run"] == full
        assert res["total_seconds_target_rounds"] == pytest.approx(2.0 + full * round_s)
    else:
        assert calls == [probe] and data["status"] == "ok" and data["extrapolated"]
        assert res["extrapolated"] and res["rounds_run"] == probe
        assert res["total_seconds_target_rounds"] == pytest.approx(estimate)
        assert data["parts"]["full"]["status"] == "skipped"
        assert "extrapolated from the probe" in data["skipped"][0]["reason"]


def test_study_rounds_fit_the_cap_within_bounds() -> None:
    kw = {"runs": 6, "overhead_s": 4.0, "round_s": 0.5, "full_rounds": 80, "min_rounds": 8}
    assert suite.study_rounds(left_s=1e4, **kw) == 80  # everything fits: the full study
    # (240 / 6 - 4) / (0.5 * 1.2) = 60
    assert suite.study_rounds(left_s=240.0, **kw) == 60
    assert suite.study_rounds(left_s=240.0 + 30.0, fixed_s=30.0, **kw) == 60
    assert suite.study_rounds(left_s=10.0, **kw) == 8  # never below min_rounds


# --------------------------------------------------------------------------- failures
def _context(tmp_path: Path, deadline_s: float = 60.0) -> Any:
    return suite.Context(name="throughput_cnn", out=tmp_path, work=tmp_path / "work",
                         sizes=suite.SMOKE, smoke=True, device="cpu",
                         deadline=time.time() + deadline_s)


def test_a_failing_part_keeps_its_traceback_and_the_others_run(tmp_path: Path) -> None:
    rec = suite.Record(_context(tmp_path))

    def boom() -> dict[str, object]:
        raise ValueError("no GPU today")

    assert rec.run_part("a", 0.0, boom) is None
    assert rec.run_part("b", 0.0, lambda: {"examples_per_second": 5.0}) is not None
    assert rec.run_part("c", 1e9, lambda: {}) is None  # needs more than is left: skipped
    data = rec.finish()
    on_disk = json.loads((tmp_path / "throughput_cnn.json").read_text())
    assert on_disk == json.loads(json.dumps(data, default=str))
    assert set(suite.RECORD_KEYS) <= set(on_disk)
    assert on_disk["status"] == "failed" and "failed parts: a " in on_disk["error"]
    assert "ValueError: no GPU today" in on_disk["parts"]["a"]["error"]
    assert on_disk["parts"]["b"]["status"] == "ok"
    assert on_disk["parts"]["c"]["status"] == "skipped"
    assert [s["part"] for s in on_disk["skipped"]] == ["c"]
    assert on_disk["device"] == "cpu" and on_disk["peak_gpu_memory_bytes"] is None


def test_a_measurement_that_runs_nothing_is_skipped(tmp_path: Path) -> None:
    rec = suite.Record(_context(tmp_path, deadline_s=-1.0))
    rec.run_part("a", 1.0, lambda: {})
    data = rec.finish()
    assert data["status"] == "skipped" and data["reason"].startswith("a: budget")


def test_launch_kills_at_the_cap_and_reports_exit_codes(tmp_path: Path) -> None:
    t0 = time.time()
    code, _ = suite.launch([sys.executable, "-c", "import time; time.sleep(60)"],
                           timeout_s=1.0, log=tmp_path / "sleep.log")
    assert code is None and time.time() - t0 < 20
    code, tail = suite.launch([sys.executable, "-c", "print('bye'); raise SystemExit(3)"],
                              timeout_s=30.0, log=tmp_path / "exit.log")
    assert code == 3 and "bye" in tail


def test_a_killed_measurement_is_failed_and_keeps_what_it_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A measurement's process killed at its cap (or dying): its JSON so far, marked failed,
    the interrupted part named, the log's tail in the error."""
    rec = suite.Record(_context(tmp_path))
    rec.run_part("vectorized_small", 0.0, lambda: {"examples_per_second": 9.0})
    rec.data["parts"]["ray_small"] = {"status": "running"}
    rec.save()

    def killed(cmd: list[str], **kwargs: object) -> tuple[int | None, str]:
        assert "--child" in cmd and "--smoke" in cmd
        return None, "ray: waiting for resources"

    monkeypatch.setattr(suite, "launch", killed)
    args = suite.parse_args(["--out", str(tmp_path), "--smoke"])
    out = suite._run_child("throughput_cnn", args, slot=suite.Slot(True, 5.0), device="cpu",
                           work=tmp_path / "work", env={})
    on_disk = json.loads((tmp_path / "throughput_cnn.json").read_text())
    assert out["status"] == on_disk["status"] == "failed"
    assert on_disk["error"].startswith("killed at its time cap of 5 s")
    assert "ray: waiting for resources" in on_disk["error"]
    assert on_disk["parts"]["vectorized_small"]["status"] == "ok"
    assert on_disk["parts"]["ray_small"]["status"] == "failed"
    monkeypatch.setattr(suite, "launch", lambda cmd, **kw: (1, "Traceback: boom"))
    out = suite._run_child("pfl_benchmark", args, slot=suite.Slot(True, 5.0), device="cpu",
                           work=tmp_path / "work", env={})  # died before writing any JSON
    assert out["status"] == "failed" and "exited with code 1" in out["error"]
    assert set(suite.RECORD_KEYS) <= set(out)


def test_the_budget_skips_every_measurement_and_the_summary_lists_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert suite.main(["--out", str(tmp_path), "--smoke", "--budget-s", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [m["name"] for m in summary["measurements"]] == list(suite.MEASUREMENTS)
    for row in summary["measurements"]:
        assert row["status"] == "skipped" and row["reason"].startswith("budget:")
        rec = json.loads((tmp_path / row["json"]).read_text())
        assert set(suite.RECORD_KEYS) <= set(rec) and rec["status"] == "skipped"
    assert "skipped" in capsys.readouterr().out


def test_only_and_missing_data_are_recorded_as_skipped(tmp_path: Path) -> None:
    args = suite.parse_args(["--out", str(tmp_path), "--only", "pfl_benchmark",
                             "--data-dir", str(tmp_path / "none")])
    assert suite.precheck("throughput_cnn", args) == "not selected (--only)"
    assert suite.precheck("pfl_benchmark", args) is None
    args = suite.parse_args(["--out", str(tmp_path), "--data-dir", str(tmp_path / "none")])
    assert "no CIFAR-10 data" in suite.precheck("study_slice", args)
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", str(tmp_path), "--only", "nope"])


# --------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
def test_smoke_run_writes_every_measurement(tmp_path: Path) -> None:
    """``--smoke``: every measurement's path on the CPU, tiny sizes, synthetic data."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SUITE_PATH), "--out", str(out), "--smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in summary["measurements"]] == list(suite.MEASUREMENTS)
    assert summary["smoke"] is True and summary["device"] == "cpu"
    assert summary["elapsed_s"] < 180
    recs = {}
    for row in summary["measurements"]:
        assert row["status"] == "ok", row
        rec = recs[row["name"]] = json.loads((out / f"{row['name']}.json").read_text())
        assert set(suite.RECORD_KEYS) <= set(rec)
        assert rec["status"] == "ok" and rec["device"] == "cpu" and rec["smoke"] is True
        assert rec["peak_gpu_memory_bytes"] is None and rec["wall_s"] > 0 and rec["settings"]
        assert rec["headline"] and row["name"] in proc.stdout
    thr = recs["throughput_cnn"]
    parts = ("vectorized_small", "vectorized_large", "ray_small", "shards_1", "shards_2")
    for part in parts:  # every path ran, Ray's too (ray is installed here)
        assert thr["parts"][part]["status"] == "ok", thr["parts"][part]
        assert thr["parts"][part]["examples_per_second"] > 0
        assert thr["parts"][part]["seconds_per_round"] > 0
    res = thr["results"]
    assert res["ratio_vectorized_vs_ray"] > 0 and res["shards_2_vs_1"] > 0
    assert isinstance(res["ratio_meets_target"], bool) and res["target_ratio"] == 30.0
    assert thr["parts"]["shards_2"]["shards"] == 2
    pfl = recs["pfl_benchmark"]["results"]
    assert pfl["seconds_per_round"] > 0 and pfl["examples_per_second"] > 0
    assert pfl["target_rounds"] == suite.SMOKE.pfl_rounds
    assert pfl["extrapolated"] is False and pfl["rounds_run"] == suite.SMOKE.pfl_rounds
    assert math.isfinite(pfl["total_seconds_target_rounds"])
    study = recs["study_slice"]["results"]
    assert study["runs_completed"] == study["runs_planned"] == 6
    assert {r["mechanism"] for r in study["runs"]} == {"fedavg", "dp-fedavg", "bsr"}
    for run in study["runs"]:
        assert 0.0 <= run["final_accuracy"] <= 1.0
        assert (run["epsilon"] is None) == (run["mechanism"] == "fedavg")
    assert study["rounds_run"] >= suite.SMOKE.study_min_rounds
