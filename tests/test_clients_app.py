"""The real ``clients.client_app.app`` train/evaluate handlers and the server-side glue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from clients_fixtures import cifar_config, client_cfg, imdb_config
from flower_helpers import make_context, make_message
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from clients import task
from clients.client_app import app
from clients.train import delta_norm, evaluate_model


def _train_msg(arrays: ArrayRecord, **config: Any) -> Any:
    conf = {"server-round": 1, **config}
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(conf)})
    return make_message(content, MessageType.TRAIN)


def _run(cfg: dict, msg: Any, pid: int = 0) -> Any:
    return app(msg, make_context(cfg, partition_id=pid, num_partitions=cfg["num-clients"]))


def test_train_round_decreases_loss(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = cifar_config(tiny_data_dir, **{"local-epochs": 4, "client-momentum": 0.5})
    init = task.get_initial_arrays(client_cfg(cfg))
    reply = _run(cfg, _train_msg(init))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "train-loss", "delta-norm", "clipped"}
    data = task.client_data(client_cfg(cfg), 0)
    assert metrics["num-examples"] == len(data.train) == 16
    assert metrics["clipped"] == 0
    new = reply.content["arrays"].to_torch_state_dict()
    old = init.to_torch_state_dict()
    assert metrics["delta-norm"] == pytest.approx(delta_norm(old, new), rel=1e-6)
    model = task.get_model(client_cfg(cfg))
    model.load_state_dict(old)
    before, _ = evaluate_model(model, data.train)
    model.load_state_dict(new)
    after, _ = evaluate_model(model, data.train)
    assert after < before
    # deterministic: same request, same reply
    again = _run(cfg, _train_msg(init))
    new2 = again.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(new[k], new2[k]) for k in new)


def test_client_side_clipping(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = cifar_config(tiny_data_dir, **{"client-lr": 0.1})
    init = task.get_initial_arrays(client_cfg(cfg))
    reply = _run(cfg, _train_msg(init, **{"clip-norm": 0.05}), pid=1)
    m = reply.content["metrics"]
    assert m["clipped"] == 1 and m["delta-norm"] > 0.05
    new = reply.content["arrays"].to_torch_state_dict()
    assert delta_norm(init.to_torch_state_dict(), new) == pytest.approx(0.05, rel=1e-4)


def test_evaluate_handler(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = cifar_config(tiny_data_dir)
    msg = make_message(RecordDict({"arrays": task.get_initial_arrays(client_cfg(cfg)),
                                   "config": ConfigRecord({"server-round": 1})}),
                       MessageType.EVALUATE)
    reply = _run(cfg, msg, pid=2)
    m = reply.content["metrics"]
    assert set(m) == {"num-examples", "eval-loss", "eval-acc"}
    assert m["num-examples"] == 4 and m["eval-loss"] > 0
    model = task.get_model(client_cfg(cfg))
    loss, acc = evaluate_model(model, task.client_data(client_cfg(cfg), 2).val)
    assert (m["eval-acc"], m["eval-loss"]) == pytest.approx((acc, loss))


@pytest.mark.parametrize(
    ("case", "match"),
    [("shape", "size mismatch"), ("pid", "partition-id must be in"),
     ("no-arrays", "arrays"), ("nan", "not finite")],
)
def test_failure_is_an_error_reply(tiny_data_dir: Path, fedmf_cache: Path, case: str,
                                   match: str) -> None:
    cfg = cifar_config(tiny_data_dir)
    arrays = task.get_initial_arrays(client_cfg(cfg))
    pid = 0
    if case == "shape":
        state = arrays.to_torch_state_dict()
        key = next(iter(state))
        state[key] = torch.zeros(1)
        arrays = ArrayRecord(state)
    elif case == "pid":
        pid = 7
    elif case == "nan":
        cfg = cifar_config(tiny_data_dir, **{"client-lr": 1e30, "local-epochs": 3})
    if case == "no-arrays":
        msg = make_message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                           MessageType.TRAIN)
    else:
        msg = _train_msg(arrays)
    reply = _run(cfg, msg, pid=pid)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert match in reply.error.reason
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


def test_head_model_round(tiny_data_dir: Path, tiny_bert: Path, fedmf_cache: Path) -> None:
    cfg = imdb_config(tiny_data_dir, tiny_bert, **{"local-epochs": 5, "client-lr": 0.5})
    init = task.get_initial_arrays(client_cfg(cfg))
    assert set(init) == {"linear.weight", "linear.bias"}  # the head only is exchanged
    reply = _run(cfg, _train_msg(init))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content["arrays"]) == {"linear.weight", "linear.bias"}
    assert reply.content["metrics"]["delta-norm"] > 0


def test_transformer_model_round(tiny_data_dir: Path, tiny_bert: Path,
                                 fedmf_cache: Path) -> None:
    cfg = imdb_config(tiny_data_dir, tiny_bert, model="transformer")
    init = task.get_initial_arrays(client_cfg(cfg))
    reply = _run(cfg, _train_msg(init))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    new = reply.content["arrays"].to_torch_state_dict()
    assert set(new) == set(init)
    assert reply.content["metrics"]["delta-norm"] > 0


def test_central_evaluate_fn(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = client_cfg(cifar_config(tiny_data_dir))
    fn = task.central_evaluate_fn(cfg, rounds=5, eval_every=2)
    arrays = task.get_initial_arrays(cfg)
    res = fn(0, arrays)
    assert isinstance(res, MetricRecord) and set(res) == {"accuracy", "loss"}
    # the untrained model on the 20 test images: accuracy is a count over 20
    assert (res["accuracy"] * 20) == pytest.approx(round(res["accuracy"] * 20))
    model = task.get_model(cfg)
    _, direct = evaluate_model(model, task.test_data(cfg), batch_size=256)
    assert res["accuracy"] == direct
    assert fn(1, arrays) is None and fn(3, arrays) is None
    assert fn(2, arrays) is not None and fn(4, arrays) is not None and fn(5, arrays) is not None
