"""The sharded vectorized backend: partitions balanced over shards once, and a ShardedGrid's
replies equal a single-process VectorizedGrid's (local Ray, a loopback two-node cluster, a
whole run)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clients_fixtures import cifar_config, client_cfg, imdb_config
from deployment_helpers import free_port
from flower_helpers import task_identity
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from clients import task
from simulations.backends import BackendOptions, check_shards, load_backend
from simulations.backends.vectorized import VectorizedGrid

NODES = 7  # 60 tiny rows -> partitions of 8 or 9 examples: unequal sizes
RAY_BIN = Path(sys.executable).parent / "ray"


# ------------------------------------------------------------------ assign_shards (no Ray)
@pytest.mark.parametrize("shards", [1, 2, 3, 7, 12])
def test_assign_shards_is_balanced_complete_and_deterministic(shards: int) -> None:
    from simulations.backends.sharded import assign_shards

    rng = np.random.default_rng(shards)
    for trial in range(20):
        counts = rng.integers(0, 500 if trial % 2 else 20, size=int(rng.integers(1, 40)))
        counts = counts.tolist()
        got = assign_shards(counts, shards)
        assert len(got) == shards
        flat = sorted(pid for part in got for pid in part)
        assert flat == list(range(len(counts)))  # every partition exactly once
        assert all(part == sorted(part) for part in got)
        loads = [sum(counts[p] for p in part) for part in got]
        assert max(loads) - min(loads) <= max(counts)
        assert assign_shards(counts, shards) == got  # deterministic
    assert assign_shards([5, 1, 4, 3], 2) == [[0, 1], [2, 3]]  # 5+1 vs 4+3
    assert assign_shards([], 2) == [[], []]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_assign_shards_rejects_bad_shards(bad: Any) -> None:
    from simulations.backends.sharded import assign_shards

    with pytest.raises(ValueError, match=r"^shards must be an integer >= 1"):
        assign_shards([1, 2, 3], bad)
    with pytest.raises(ValueError, match=r"^example counts must be >= 0"):
        assign_shards([1, -2], 2)


def test_options_and_flags_name_the_setting(tmp_path: Path) -> None:
    from simulations.cli import _backend_options, build_parser

    with pytest.raises(ValueError, match=r"^shards must be an integer >= 1, got 0"):
        BackendOptions(shards=0)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^num-gpus-per-shard must be >= 0"):
            BackendOptions(num_gpus_per_shard=bad)
    check_shards(BackendOptions(shards=4), backend="vectorized")
    with pytest.raises(ValueError, match=r"^shards: --shards 2 needs --backend vectorized"):
        load_backend("inprocess")(server_app=None, client_app=None, num_supernodes=1,
                                  run_config={}, options=BackendOptions(shards=2))
    parser = build_parser()
    args = parser.parse_args(["simulate", "--output", "x", "--backend", "vectorized",
                              "--shards", "3", "--num-gpus-per-shard", "0.5",
                              "--ray-address", "auto"])
    opts = _backend_options(args)
    assert (opts.shards, opts.num_gpus_per_shard, opts.ray_address) == (3, 0.5, "auto")
    args = parser.parse_args(["simulate", "--output", "x", "--backend", "ray", "--shards", "2"])
    with pytest.raises(ValueError, match=r"^shards: --shards 2 needs --backend vectorized"):
        _backend_options(args)
    assert _backend_options(parser.parse_args(["simulate", "--output", "x"])).shards == 1
    from simulations.backends.sharded import ShardedGrid

    with pytest.raises(ValueError, match=r"^num-gpus-per-shard: --device cuda needs"):
        ShardedGrid(config=client_cfg(cifar_config(tmp_path)), num_nodes=3, shards=2,
                    device="cuda")


def test_one_shard_never_imports_ray(tiny_data_dir: Path, fedmf_cache: Path,
                                     tmp_path: Path) -> None:
    """``--shards 1`` is the single-process path: a fresh interpreter runs a vectorized
    run without importing Ray."""
    code = f"""
import sys
from simulations.config import RunConfig
from simulations.runner import run_simulation
from simulations.backends import BackendOptions
cfg = RunConfig.from_run_config({{**{cifar_config(tiny_data_dir, **{"num-clients": 3})!r},
    "rounds": 1, "clients-per-round": 2, "mechanism": "fedavg",
    "output-dir": {str(tmp_path / "out")!r}, "checkpoint-dir": {str(tmp_path / "ck")!r}}})
run_simulation(cfg, backend="vectorized", options=BackendOptions(shards=1, device="cpu"))
assert "ray" not in sys.modules, "ray was imported"
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]


# ------------------------------------------------------------------ helpers
def _train_messages(arrays: Any, conf: dict[str, Any], nodes: int) -> list[Message]:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(conf)})
    return [Message(content, node, MessageType.TRAIN) for node in range(1, nodes + 1)]


def _replies(grid: Any, arrays: Any, conf: dict[str, Any], nodes: int) -> dict[int, Message]:
    with task_identity():
        msgs = _train_messages(arrays, conf, nodes)
        return {int(r.metadata.src_node_id): r for r in grid.send_and_receive(msgs)}


def _reference(cfg: Any, arrays: Any, conf: dict[str, Any], nodes: int) -> dict[int, Message]:
    with task_identity():
        grid = VectorizedGrid(config=cfg, num_nodes=nodes, device="cpu", chunk_size=3)
    return _replies(grid, arrays, conf, nodes)


def _assert_same(got: dict[int, Message], ref: dict[int, Message], *,
                 nodes: list[int] | None = None) -> set[int]:
    """The replies of ``nodes`` (default: all of ``ref``) equal to 1e-5; the set of
    ``num-examples``."""
    sizes = set()
    for node in nodes or sorted(ref):
        a, b = ref[node], got[node]
        assert a.has_error() == b.has_error(), (node, a, b)
        if a.has_error():
            assert b.error.reason == a.error.reason
            continue
        ra, rb = a.content["arrays"], b.content["arrays"]
        assert list(ra) == list(rb)
        for key in ra:
            np.testing.assert_allclose(rb[key].numpy(), ra[key].numpy(), atol=1e-5, rtol=0)
        ma, mb = a.content["metrics"], b.content["metrics"]
        assert ma["num-examples"] == mb["num-examples"] and ma["clipped"] == mb["clipped"]
        assert mb["train-loss"] == pytest.approx(ma["train-loss"], abs=1e-5)
        assert mb["delta-norm"] == pytest.approx(ma["delta-norm"], abs=1e-5)
        sizes.add(ma["num-examples"])
    return sizes


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after_module() -> Iterator[None]:
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def local_ray() -> Iterator[None]:
    """A local Ray instance with 2 CPUs, kept for the module's Ray tests."""
    import ray

    if not ray.is_initialized():  # "local": never a cluster found in /tmp/ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


# ------------------------------------------------------------------ local Ray
@pytest.mark.ray
def test_cnn_sharded_replies_equal_single_process(local_ray: None, tiny_data_dir: Path,
                                                  fedmf_cache: Path) -> None:
    from simulations.backends.sharded import ShardedGrid

    run_config = cifar_config(tiny_data_dir, **{
        "num-clients": NODES, "local-epochs": 2, "batch-size": 4, "client-lr": 0.05,
        "client-momentum": 0.5, "val-fraction": 0.2})
    cfg = client_cfg(run_config)
    arrays = task.get_initial_arrays(cfg)
    conf = {"server-round": 3, "clip-norm": 0.05}
    nodes = NODES + 1  # the last node has no partition: an error reply on both
    ref = _reference(cfg, arrays, conf, nodes)
    with task_identity(), ShardedGrid(config=cfg, num_nodes=nodes, shards=2, device="cpu",
                                      chunk_size=3) as grid:
        assert len(grid.assignment) == 2 and all(grid.assignment)
        got = _replies(grid, arrays, conf, nodes)
    assert len(_assert_same(got, ref)) > 1  # the partitions really were unequal
    assert got[nodes].has_error() and "partition-id must be in" in got[nodes].error.reason


@pytest.mark.ray
def test_head_sharded_replies_equal_single_process(local_ray: None, tiny_data_dir: Path,
                                                   tiny_bert: Path, fedmf_cache: Path) -> None:
    from simulations.backends.sharded import ShardedGrid, train_example_counts

    run_config = imdb_config(tiny_data_dir, tiny_bert, **{
        "num-clients": NODES, "local-epochs": 3, "batch-size": 3, "client-lr": 0.5,
        "client-momentum": 0.9})
    cfg = client_cfg(run_config)
    arrays = task.get_initial_arrays(cfg)
    conf = {"server-round": 1}
    ref = _reference(cfg, arrays, conf, NODES)
    counts = train_example_counts(cfg)
    assert counts == [ref[n].content["metrics"]["num-examples"] for n in range(1, NODES + 1)]
    with task_identity(), ShardedGrid(config=cfg, num_nodes=NODES, shards=2, device="cpu",
                                      chunk_size=2) as grid:
        got = _replies(grid, arrays, conf, NODES)
    assert len(_assert_same(got, ref)) > 1


def _run_flat(data_dir: Path) -> dict[str, Any]:
    """A small non-private run (fedavg: no noise, nothing random but the seeds)."""
    return {**cifar_config(data_dir, **{"num-clients": 6, "batch-size": 4}),
            "rounds": 3, "clients-per-round": 4, "mechanism": "fedavg", "eval-every": 3}


def _final_model(tmp_path: Path, flat: dict[str, Any], *, name: str,
                 options: BackendOptions) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    models: dict[int, Any] = {}
    cfg = RunConfig.from_run_config({**flat, "output-dir": str(tmp_path / name),
                                     "checkpoint-dir": str(tmp_path / f"ck-{name}")})
    summary = run_simulation(cfg, backend="vectorized", options=options,
                             on_model=lambda r, arrays: models.__setitem__(r, arrays))
    last = models[max(models)]
    return summary, {k: v.numpy() for k, v in last.items()}


@pytest.mark.ray
def test_sharded_run_equals_single_process_run(local_ray: None, tiny_data_dir: Path,
                                               fedmf_cache: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole non-private run (fedavg: no noise) with 2 shards ends in the shards=1 model."""
    import ray

    from simulations.backends.sharded import ShardedGrid

    cohorts: list[int] = []
    train = ShardedGrid._train

    def spy(self: ShardedGrid, partitions: list[int], **kwargs: Any) -> Any:
        cohorts.append(len(partitions))
        return train(self, partitions, **kwargs)

    monkeypatch.setattr(ShardedGrid, "_train", spy)
    flat = _run_flat(tiny_data_dir)
    one, model_one = _final_model(tmp_path, flat, name="one",
                                  options=BackendOptions(device="cpu"))
    assert cohorts == []
    two, model_two = _final_model(tmp_path, flat, name="two",
                                  options=BackendOptions(device="cpu", shards=2))
    assert cohorts == [4, 4, 4]  # every round's cohort trained on the shards
    assert ray.is_initialized()  # the caller's Ray is kept
    assert one["rounds_completed"] == two["rounds_completed"] == 3
    assert one["failures"] == two["failures"]
    assert list(model_one) == list(model_two)
    for key, value in model_one.items():
        np.testing.assert_allclose(model_two[key], value, atol=1e-5, rtol=0)
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)


# ------------------------------------------------------------------ loopback cluster
def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} did not open within {timeout} s")


def _node_flags() -> list[str]:
    """One node on loopback with one CPU; the one port that is fixed by default (the
    dashboard agent's) made free, as two nodes share this host (the others Ray picks)."""
    return ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            "--disable-usage-stats", "--block", f"--dashboard-agent-listen-port={free_port()}"]


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


@contextlib.contextmanager
def _loopback_cluster(tmp: Path) -> Iterator[str]:
    """A head and a worker node (``ray start --block``, each in a process group of its own,
    killed by group id afterwards: never ``ray stop``, which would end every Ray here), and
    this process attached to them (``ray_init_args(ray_address=...)``).  The head's address
    file, which would make a later ``ray.init()`` attach to the dead cluster, is removed."""
    import ray

    from simulations.backends.ray import ray_init_args

    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp / "ray-head.log", tmp / "ray-worker.log"]
    try:
        for log, args in zip(logs, (["--head", f"--port={port}", "--include-dashboard=false",
                                     f"--ray-client-server-port={free_port()}"],
                                    [f"--address=127.0.0.1:{port}"]), strict=True):
            with log.open("wb") as out:
                procs.append(subprocess.Popen([str(RAY_BIN), "start", *args, *_node_flags()],
                                              env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            if len(procs) == 1:
                _wait_port(port, procs[0])
        address = f"127.0.0.1:{port}"
        ray.init(**ray_init_args(ray_address=address, log_to_driver=False))
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            for proc, log in zip(procs, logs, strict=True):
                assert proc.poll() is None, f"{log.name}: ray start exited\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no worker node\n{_tail(logs[1])}"
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()


@pytest.mark.slow
@pytest.mark.ray
def test_loopback_cluster_equal_replies_and_a_killed_shard(
        tiny_data_dir: Path, fedmf_cache: Path, tmp_path: Path) -> None:
    import ray

    run_config = cifar_config(tiny_data_dir, **{
        "num-clients": NODES, "local-epochs": 1, "batch-size": 4, "client-lr": 0.05,
        "val-fraction": 0.2})
    cfg = client_cfg(run_config)
    arrays = task.get_initial_arrays(cfg)
    refs = {r: _reference(cfg, arrays, {"server-round": r}, NODES) for r in (1, 2, 3)}
    flat = _run_flat(tiny_data_dir)
    _, model_one = _final_model(tmp_path, flat, name="one", options=BackendOptions(device="cpu"))
    if ray.is_initialized():  # the local instance of the tests above
        ray.shutdown()
    with _loopback_cluster(tmp_path) as address:
        _cluster_rounds(cfg, arrays, refs)
        # a whole run attaches by itself (--ray-address) and detaches afterwards
        ray.shutdown()
        _, model_two = _final_model(tmp_path, flat, name="two", options=BackendOptions(
            device="cpu", shards=2, ray_address=address))
        assert not ray.is_initialized()
    for key, value in model_one.items():
        np.testing.assert_allclose(model_two[key], value, atol=1e-5, rtol=0)


def _cluster_rounds(cfg: Any, arrays: Any, refs: dict[int, dict[int, Message]]) -> None:
    """Three rounds on a ShardedGrid of 2 shards; shard 0 is killed before round 2."""
    import ray

    from simulations.backends.sharded import ShardedGrid

    with task_identity(), ShardedGrid(config=cfg, num_nodes=NODES, shards=2,
                                      device="cpu") as grid:
        got = _replies(grid, arrays, {"server-round": 1}, NODES)
        _assert_same(got, refs[1])
        where = ray.get([a.__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id()) for a in grid.actors])
        assert len(set(where)) == 2  # one shard per node
        # a shard dies before round 2: its clients fail that round only
        ray.kill(grid.actors[0], no_restart=False)
        got = _replies(grid, arrays, {"server-round": 2}, NODES)
        dead = {pid + 1 for pid in grid.assignment[0]}
        for node in range(1, NODES + 1):
            assert got[node].has_error() == (node in dead), node
        assert all("shard 0 failed in round 2" in got[n].error.reason for n in dead)
        _assert_same(got, refs[2], nodes=sorted(set(range(1, NODES + 1)) - dead))
        got = _replies(grid, arrays, {"server-round": 3}, NODES)
        _assert_same(got, refs[3])
