"""The vectorized cohort backend: its replies are the ClientApp's, to 1e-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clients_fixtures import cifar_config, client_cfg, imdb_config
from flower_helpers import make_context, task_identity
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from clients import task
from clients.client_app import app
from clients.data import TensorData
from clients.models import LinearHead
from clients.train import batch_order, stack_data, train_cohort, train_local
from simulations.backends.vectorized import VectorizedGrid

NODES = 7  # 60 tiny rows -> partitions of 8 or 9 examples: unequal sizes


def _messages(grid: VectorizedGrid, arrays: Any, conf: dict[str, Any]) -> list[Message]:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(conf)})
    return [Message(content, node, MessageType.TRAIN) for node in range(1, NODES + 1)]


def _compare(run_config: dict[str, Any], conf: dict[str, Any]) -> list[Message]:
    cfg = client_cfg(run_config)
    arrays = task.get_initial_arrays(cfg)
    with task_identity():
        grid = VectorizedGrid(config=cfg, num_nodes=NODES, device="cpu", chunk_size=3)
        msgs = _messages(grid, arrays, conf)
        vec = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(msgs)}
    sizes = set()
    for msg in msgs:
        node = int(msg.metadata.dst_node_id)
        ref = app(msg, make_context(run_config, partition_id=node - 1, num_partitions=NODES,
                                    node_id=node))
        got = vec[node]
        assert not ref.has_error() and not got.has_error(), (ref, got)
        a, b = ref.content["arrays"], got.content["arrays"]
        assert list(a) == list(b)
        for key in a:
            np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), atol=1e-5, rtol=0)
        ma, mb = ref.content["metrics"], got.content["metrics"]
        assert ma["num-examples"] == mb["num-examples"] and ma["clipped"] == mb["clipped"]
        assert mb["train-loss"] == pytest.approx(ma["train-loss"], abs=1e-5)
        assert mb["delta-norm"] == pytest.approx(ma["delta-norm"], abs=1e-5)
        sizes.add(ma["num-examples"])
    assert len(sizes) > 1  # the partitions really were unequal
    return msgs


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_cnn_replies_equal_the_client_app(tiny_data_dir: Path, fedmf_cache: Path,
                                          clip: float) -> None:
    run_config = cifar_config(tiny_data_dir, **{
        "num-clients": NODES, "local-epochs": 2, "batch-size": 4, "client-lr": 0.05,
        "client-momentum": 0.5, "val-fraction": 0.2})
    conf = {"server-round": 3, **({"clip-norm": clip} if clip else {})}
    _compare(run_config, conf)


def test_head_replies_equal_the_client_app(tiny_data_dir: Path, tiny_bert: Path,
                                           fedmf_cache: Path) -> None:
    run_config = imdb_config(tiny_data_dir, tiny_bert, **{
        "num-clients": NODES, "local-epochs": 3, "batch-size": 3, "client-lr": 0.5,
        "client-momentum": 0.9})
    _compare(run_config, {"server-round": 1})


def test_linear_closed_form_step_equals_vmap_grad() -> None:
    """The linear heads' closed-form cohort step is autograd's gradient, masks included."""
    from torch.func import functional_call, grad_and_value, vmap

    from clients.train import _linear_step

    torch.manual_seed(1)
    model = LinearHead(6, 4)
    C, B = 3, 5
    params = {k: v.detach().unsqueeze(0).repeat(C, 1, *([1] * (v.dim() - 1))) + 0.1 * torch.randn(
        C, *v.shape) for k, v in model.named_parameters()}
    xb, yb = torch.randn(C, B, 6), torch.randint(0, 4, (C, B))
    mask = torch.ones(C, B)
    mask[1, 3:] = 0.0
    mask[2] = 0.0  # a client without a batch in this step

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             m: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y,
                                               reduction="none")
        return (ce * m).sum() / m.sum().clamp_min(1.0)

    want_g, want_l = vmap(grad_and_value(loss))(params, xb, yb, mask)
    got_g, got_l = _linear_step(params, xb, yb, mask)
    torch.testing.assert_close(got_l, want_l, atol=1e-6, rtol=1e-6)
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], atol=1e-6, rtol=1e-6)
    assert float(got_g["linear.weight"][2].abs().max()) == 0.0


def test_train_cohort_masks_steps_of_short_clients() -> None:
    """A client with fewer batches stops stepping (parameters and momentum frozen)."""
    torch.manual_seed(0)
    model = LinearHead(5, 3)
    datas = [TensorData(torch.randn(n, 5), torch.randint(0, 3, (n,))) for n in (2, 9, 5, 0)]
    seeds = [11, 12, 13, 14]
    out = train_cohort(model, *stack_data(datas), seeds=seeds, epochs=2, batch_size=4, lr=0.3,
                       momentum=0.9, chunk_size=2)
    assert out.errors[3] is not None and "empty" in out.errors[3] and out.stats[3] is None
    for c, (data, seed) in enumerate(zip(datas[:3], seeds[:3], strict=True)):
        ref = LinearHead(5, 3)
        ref.load_state_dict(model.state_dict())
        stats = train_local(ref, data, epochs=2, batch_size=4, lr=0.3, momentum=0.9, seed=seed)
        order = batch_order(len(data), epochs=2, batch_size=4, seed=seed)
        assert out.stats[c].steps == stats.steps == len(order) == 2 * -(-len(data) // 4)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(out.state[key][c], value, atol=1e-6, rtol=0)
        assert out.stats[c].losses == pytest.approx(stats.losses, abs=1e-6)


def test_errors_name_the_model_and_become_error_replies(tiny_data_dir: Path, tiny_bert: Path,
                                                        fedmf_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"^model: 'transformer' can not run on the vector"):
        VectorizedGrid(config=client_cfg(imdb_config(tiny_data_dir, tiny_bert,
                                                     model="transformer")),
                       num_nodes=2, device="cpu")
    cfg = client_cfg(cifar_config(tiny_data_dir))
    with task_identity():
        grid = VectorizedGrid(config=cfg, num_nodes=5, device="cpu")  # 3 partitions only
        msgs = [Message(RecordDict({"arrays": task.get_initial_arrays(cfg),
                                    "config": ConfigRecord({"server-round": 1})}), node,
                        MessageType.TRAIN) for node in (1, 5)]
        replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(msgs)}
    assert not replies[1].has_error()
    assert replies[5].has_error() and "partition-id must be in" in replies[5].error.reason


def test_vectorized_run_matches_inprocess(tiny_data_dir: Path, fedmf_cache: Path,
                                          tmp_path: Path) -> None:
    """The whole run (strategy, clipping, noise, accounting) on both backends."""
    from simulations.config import RunConfig
    from simulations.runner import run_simulation

    flat = {**cifar_config(tiny_data_dir, **{"num-clients": 6, "batch-size": 4}),
            "rounds": 3, "clients-per-round": 3, "mechanism": "bisr", "bands": 2,
            "epsilon": 50.0, "insecure-reproducible": True, "eval-every": 1}
    summaries = {}
    for backend in ("inprocess", "vectorized"):
        out = tmp_path / backend
        cfg = RunConfig.from_run_config({**flat, "output-dir": str(out),
                                         "checkpoint-dir": str(tmp_path / f"ck-{backend}")},
                                        noise_seed=5)
        summaries[backend] = run_simulation(cfg, backend=backend)
    a, b = summaries["inprocess"], summaries["vectorized"]
    assert a["epsilon"] == b["epsilon"] and a["rounds_completed"] == b["rounds_completed"] == 3
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)
    with pytest.raises(ValueError, match=r"^client_app: the vectorized backend"):
        run_simulation(cfg, backend="vectorized", client_app=app)
