"""A loopback deployment that crashes mid-run and is relaunched: it resumes from the default
checkpoint, keeps every client within its participation limits and reuses no noise draw.

One ``flower-superlink`` and three ``flower-supernode`` processes (each with its own
``client-id``) run the fedmf app (``bsr``, secret noise) through ``flwr run`` with no
``checkpoint-dir``, so the ServerApp checkpoints to its default folder under
``$FEDMF_STATE_DIR`` (keyed by the output folder).  Once round 2 is complete the ServerApp,
the SuperLink and the SuperLink's SuperExec are SIGKILLed.  The SuperLink restarts with empty
state on the same port; the SuperNodes, whose node ids it no longer knows, exit and are
restarted with the same ``client-id`` (so they get new node ids), like a supervisor would; and
the same ``flwr run`` is launched again.  Three clients in b = 2 cohorts, one per round, four
rounds: k = 2, and the cohort rounds 1 and 3 (2 and 4) straddle the crash.
"""

from __future__ import annotations

import json
import re
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from clients_fixtures import write_tiny_cifar
from deployment_helpers import Loopback, stage_app

from simulations import results
from simulations.config import parse_run_config_text
from strategies import DPConfig
from strategies.checkpoint import checkpoint_path, load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROUNDS, KILL_AFTER = 4, 2
CLIENTS, PER_ROUND, MIN_SEP = 3, 1, 2
#: Wall-clock limit of each phase; the whole test takes about 2 minutes on a busy 2-core CPU.
PHASE_SECONDS = 150.0


def _raw_rounds(out: Path) -> list[dict[str, Any]]:
    """Every line of ``rounds.jsonl`` (not deduplicated, unlike ``results.read_rounds``)."""
    path = out / results.ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.is_file() else ""


def _wait_for_round(fed: Loopback, out: Path, ckpt: Path, server_round: int) -> None:
    """Until round ``server_round`` is released, evaluated, written and checkpointed as
    complete (killing between the ``rounds.jsonl`` line and that checkpoint would make the
    relaunch evaluate the round again: a repeated line, by design of ``read_rounds``)."""
    deadline = time.monotonic() + PHASE_SECONDS
    while time.monotonic() < deadline:
        if len(_raw_rounds(out)) >= server_round:
            state = load_checkpoint(ckpt)
            if state is not None and state["round"] >= server_round and (
                    state["phase"] == "complete"):
                return
        time.sleep(0.2)
    raise AssertionError(f"round {server_round} was not completed within {PHASE_SECONDS} s; "
                         f"status {results.read_status(out)}; SuperLink log:\n"
                         f"{_tail(fed.log('superlink'))}")


def test_kill_superlink_and_serverapp_then_relaunch_resumes(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    state_dir = tmp_path / "state"
    # the ServerApp's default checkpoint folder, computed here the way it computes it there
    monkeypatch.setenv(results.ENV_STATE_DIR, str(state_dir))
    data, out = tmp_path / "data", tmp_path / "out"
    run_config = (f"data-dir='{data}' output-dir='{out}' rounds={ROUNDS} "
                  f"num-clients={CLIENTS} clients-per-round={PER_ROUND} min-sep={MIN_SEP} "
                  "mechanism='bsr' bands=2 batch-size=8 epsilon=8.0 max-test-examples=20")
    dp = DPConfig.from_run_config(parse_run_config_text(run_config))
    assert (dp.num_cohorts, dp.max_participations) == (MIN_SEP, 2)  # b and k bind
    ckpt = results.default_checkpoint_dir(out)

    with Loopback(tmp_path, env={results.ENV_STATE_DIR: str(state_dir)}) as fed:
        fed.start_superlink()
        node_config = {f"c{i}": f'client-id="c{i}" partition-id={i} num-partitions={CLIENTS}'
                       for i in range(CLIENTS)}
        nodes = {cid: fed.start_supernode(f"supernode-{cid}", cfg)
                 for cid, cfg in node_config.items()}
        write_tiny_cifar(data)
        app = stage_app(tmp_path / "app")
        submit = fed.flwr_run(run_config, stream=False, app=app, log_name="flwr_run_1")
        assert submit.wait(timeout=120) == 0, _tail(fed.log("flwr_run_1"))

        # ---- crash after round KILL_AFTER: ServerApp, SuperLink and its SuperExec, SIGKILL
        _wait_for_round(fed, out, ckpt, KILL_AFTER)
        killed = fed.crash_server_side()
        assert len(killed) == 1, f"expected one ServerApp process, killed {killed}"
        before = load_checkpoint(ckpt)
        assert before is not None
        done = int(before["round"])
        assert before["phase"] == "complete" and done >= KILL_AFTER
        assert done < ROUNDS, "the run finished before it could be killed"
        # the noise stream's index is the number of rounds released: draws 0..done-1 are spent
        assert before["noise"]["round"] == done
        lines_before = _raw_rounds(out)
        assert [r["round"] for r in lines_before] == list(range(1, done + 1))
        assert results.read_status(out)["status"] == "running"  # it died, it did not finish

        # ---- restart the SuperLink (empty state, same port) and relaunch the same run
        fed.start_superlink()
        relaunch = fed.flwr_run(run_config, stream=True, app=app, log_name="flwr_run_2")
        snapshots: list[tuple[int, str, int]] = []  # (round, phase, noise round) seen
        seen_mtime = checkpoint_path(ckpt).stat().st_mtime  # the crashed run's last state
        deadline = time.monotonic() + PHASE_SECONDS
        while relaunch.poll() is None:
            assert time.monotonic() < deadline, (
                f"relaunched run did not end within {PHASE_SECONDS} s:\n"
                f"{_tail(fed.log('flwr_run_2'))}")
            for cid, proc in nodes.items():
                # the new SuperLink refuses their old node ids (401) and they exit: a
                # supervisor starts them again, same client-id, new node id
                if proc.poll() is not None:
                    nodes[cid] = fed.start_supernode(f"supernode-{cid}", node_config[cid])
            path = checkpoint_path(ckpt)
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                mtime = seen_mtime
            if mtime != seen_mtime:
                seen_mtime = mtime
                state = load_checkpoint(ckpt)
                if state is not None:
                    snapshots.append((int(state["round"]), str(state["phase"]),
                                      int(state["noise"]["round"])))
            time.sleep(0.2)
        log2 = fed.log("flwr_run_2").read_text(encoding="utf-8", errors="replace")
        assert relaunch.returncode == 0, log2[-4000:]

    # ---- the run finished, in one piece
    status = results.read_status(out)
    assert status is not None and status["status"] == "ok", (status, log2[-4000:])
    summary = results.read_summary(out)
    assert summary is not None and summary["rounds_completed"] == ROUNDS
    lines = _raw_rounds(out)
    assert [r["round"] for r in lines] == list(range(1, ROUNDS + 1)), "a round repeated or lost"
    assert lines[:done] == lines_before  # the released rounds were not redone
    # every round trained its client: none was skipped into a noise-only update
    assert all(r["accepted"] == PER_ROUND and r["failures"] == 0 for r in lines), lines

    # ---- the relaunch resumed from the checkpoint and continued the noise stream at `done`
    assert re.search(rf"Resumed from {re.escape(str(ckpt))} after round {done} \(complete\)",
                     log2), log2[-4000:]
    redone = [int(r) for r in re.findall(r"\[ROUND (\d+)/", log2) if int(r) <= done]
    assert redone == [], f"rounds {redone} were trained again"
    assert snapshots, "no checkpoint of the relaunched run was seen"
    assert all(noise == rnd for rnd, _, noise in snapshots), snapshots  # index == rounds done
    assert min(rnd for rnd, _, _ in snapshots) == done + 1, snapshots  # next draw: `done`
    assert not checkpoint_path(ckpt).exists()  # finished: the secret state is gone
    # the budget spent is that of one uninterrupted run of ROUNDS rounds, round by round
    ledger = dp.ledger()
    assert summary["epsilon"] == pytest.approx(ledger.epsilon, rel=1e-9)
    for r in lines:
        assert r["epsilon_spent"] == pytest.approx(ledger.epsilon_spent(r["round"]), rel=1e-9)

    # ---- participation: the history survived the crash, and the limits held across it
    part = results.read_participation(out)
    assert part is not None
    assert (part["min_sep"], part["max_participations"]) == (MIN_SEP, 2)
    history = part["clients"]
    assert set(history) <= set(node_config)
    per_round = sorted(t for rounds in history.values() for t in rounds)
    assert per_round == [t for t in range(1, ROUNDS + 1) for _ in range(PER_ROUND)]
    for cid, rounds in history.items():
        assert len(rounds) <= part["max_participations"], (cid, rounds)
        assert all(b - a >= part["min_sep"] for a, b in pairwise(rounds)), (cid, rounds)
