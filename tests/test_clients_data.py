"""Data loading, partitioning, caching and bad-input errors of ``clients.data``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clients_fixtures import SHARED_DATA, cifar_config, client_cfg, imdb_config

from clients import data as D  # noqa: N812
from clients import task


def _cfg(root: Path, **kw: object) -> D.DataConfig:
    return client_cfg(cifar_config(root, **kw)).data_config()


@pytest.mark.parametrize(
    ("partitioner", "n", "extra"),
    [("iid", 3, {}), ("dirichlet", 4, {"alpha": 0.3}),
     ("pathological", 10, {"classes-per-client": 2})],
)
def test_partitions_disjoint_and_cover(tiny_data_dir: Path, fedmf_cache: Path,
                                       partitioner: str, n: int, extra: dict) -> None:
    cfg = _cfg(tiny_data_dir, partitioner=partitioner, **{"num-clients": n}, **extra)
    rows = [D.partition_rows(cfg, pid) for pid in range(n)]
    allrows = np.concatenate(rows)
    assert len(allrows) == len(np.unique(allrows)), "partitions overlap"
    assert sorted(allrows.tolist()) == list(range(60)), "partitions do not cover the split"
    if partitioner == "pathological":
        fds = D.get_federated_dataset(cfg)
        for pid in range(n):
            assert len(set(fds.load_partition(pid, "train")["label"])) <= 2


def test_partitioning_is_deterministic(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = _cfg(tiny_data_dir, partitioner="dirichlet", **{"num-clients": 4})
    first = [D.partition_rows(cfg, p) for p in range(4)]
    assert all(len(rows) > 0 for rows in first)  # a real partition, not four empty ones
    assert sorted(np.concatenate(first).tolist()) == list(range(60))
    D.clear_caches()
    again = [D.partition_rows(cfg, p) for p in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = _cfg(tiny_data_dir, partitioner="dirichlet", seed=1, **{"num-clients": 4})
    assert not all(np.array_equal(a, D.partition_rows(other, p))
                   for p, a in enumerate(first))  # the seed matters


def test_train_val_split_and_cap(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = _cfg(tiny_data_dir, **{"val-fraction": 0.25})
    n = len(D.partition_rows(cfg, 1))
    tr, va = D.split_indices(cfg, 1, n)
    assert len(tr) + len(va) == n and len(va) == round(0.25 * n)
    assert not set(tr) & set(va)
    capped = _cfg(tiny_data_dir, **{"val-fraction": 0.25, "max-examples-per-client": 8})
    cd = D.load_client_data(capped, 1, D.Representation("image"))
    assert len(cd.train) + len(cd.val) == 8 and len(cd.val) == 2


def test_cifar_tensors_normalised_and_cached(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = client_cfg(cifar_config(tiny_data_dir))
    a = task.client_data(cfg, 0)
    assert a.train.inputs.shape[1:] == (3, 32, 32) and a.train.inputs.dtype == torch.float32
    assert abs(float(a.train.inputs.mean())) < 3.0
    assert a.train.labels.dtype == torch.int64
    # second call: same objects, no re-decode; FederatedDataset built once
    assert task.client_data(cfg, 0) is a
    assert D.get_federated_dataset(cfg.data_config()) is D.get_federated_dataset(
        _cfg(tiny_data_dir, **{"val-fraction": 0.5}))


def test_test_split_cap(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    full = task.test_data(client_cfg(cifar_config(tiny_data_dir)))
    capped = task.test_data(client_cfg(cifar_config(tiny_data_dir, **{"max-test-examples": 7})))
    assert len(full) == 20 and len(capped) == 7


def test_imdb_embeddings_cached_on_disk(tiny_data_dir: Path, tiny_bert: Path,
                                        fedmf_cache: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = client_cfg(imdb_config(tiny_data_dir, tiny_bert))
    first = task.client_data(cfg, 0)
    assert first.train.inputs.shape[1] == 16
    files = list(fedmf_cache.glob("embeddings/*/embeddings.npy"))
    assert len(files) == 1 and np.load(files[0]).dtype == np.float32
    stored = np.load(files[0])
    done = int((~np.isnan(stored).any(axis=1)).sum())
    assert done == len(first.train) + len(first.val) < len(stored)  # only used rows

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("encoder called although embeddings are cached")

    D.clear_caches()  # a new process: nothing in memory
    monkeypatch.setattr(D.SentenceEncoder, "encode", boom)
    second = task.client_data(cfg, 0)
    assert torch.equal(first.train.inputs, second.train.inputs)
    assert torch.equal(first.train.labels, second.train.labels)


def test_embeddings_follow_rows(tiny_data_dir: Path, tiny_bert: Path, fedmf_cache: Path) -> None:
    """The same original row gets the same embedding whatever the partitioning seed."""
    c0 = client_cfg(imdb_config(tiny_data_dir, tiny_bert)).data_config()
    e = D.cached_embeddings(c0, "train", np.array([5, 3]), model_path=str(tiny_bert),
                            max_length=16)
    enc = D.get_encoder(str(tiny_bert))
    raw = D.load_split(c0, "train")
    texts = {r: t for r, t in zip(raw["row"], raw["text"], strict=True)}
    direct = enc.encode([texts[5], texts[3]], max_length=16)
    np.testing.assert_allclose(e, direct, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"dataset": "mnist"}, "^dataset"), ({"partitioner": "zipf"}, "^partitioner"),
     ({"partitioner": "dirichlet", "alpha": 0.0}, "^alpha"),
     ({"partitioner": "dirichlet", "alpha": -1.0}, "^alpha"),
     ({"val-fraction": 1.0}, "^val-fraction"), ({"num-clients": 0}, "^num-clients"),
     ({"partitioner": "pathological", "classes-per-client": 11}, "^classes-per-client")],
)
def test_bad_config(tiny_data_dir: Path, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(tiny_data_dir, **overrides)


def test_bad_model_names(tiny_data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"^model must be one of \['cnn', 'resnet18', 'scat"):
        client_cfg(cifar_config(tiny_data_dir, model="vgg"))
    with pytest.raises(ValueError, match=r"^model .* for dataset 'cifar10', got 'head'"):
        client_cfg(cifar_config(tiny_data_dir, model="head"))
    with pytest.raises(ValueError, match=r"^model 'head' does not fit dataset 'cifar10'"):
        from clients.models import build_model

        build_model(dataset="cifar10", model="head")


def test_partition_id_out_of_range(tiny_data_dir: Path, fedmf_cache: Path) -> None:
    cfg = _cfg(tiny_data_dir)
    with pytest.raises(ValueError, match=r"^partition-id must be in \[0, num-clients=3\)"):
        D.load_raw_partition(cfg, 3)


def test_missing_and_corrupt_parquet(tmp_path: Path, tiny_data_dir: Path,
                                     fedmf_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"^data-dir: directory .* does not exist"):
        _cfg(tmp_path / "nowhere")
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(FileNotFoundError, match="data-dir: missing train split"):
        D.load_raw_partition(_cfg(tmp_path), 0)
    (tmp_path / "cifar10" / "train.parquet").write_bytes(b"not a parquet file at all")
    (tmp_path / "cifar10" / "test.parquet").write_bytes(
        (tiny_data_dir / "cifar10" / "test.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"data-dir: .* is not a readable parquet file"):
        D.load_raw_partition(_cfg(tmp_path), 0)
    # right file, wrong schema (IMDB files where CIFAR is expected)
    for split in ("train", "test"):
        (tmp_path / "cifar10" / f"{split}.parquet").write_bytes(
            (tiny_data_dir / "imdb" / f"{split}.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['img'\]"):
        D.load_raw_partition(_cfg(tmp_path), 0)


def test_offline_without_local_data(monkeypatch: pytest.MonkeyPatch, fedmf_cache: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("FEDMF_DATA_DIR", raising=False)
    cfg = client_cfg({"dataset": "cifar10", "data-dir": ""}).data_config()
    assert cfg.data_dir == ""
    with pytest.raises(FileNotFoundError, match="FEDMF_DATA_DIR"):
        D.load_raw_partition(cfg, 0)


def test_env_data_dir_fallback(tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                               fedmf_cache: Path) -> None:
    monkeypatch.setenv("FEDMF_DATA_DIR", str(tiny_data_dir))
    cfg = client_cfg({"dataset": "cifar10", "num-clients": 3}).data_config()
    assert cfg.data_dir == str(tiny_data_dir.resolve())
    assert len(D.partition_rows(cfg, 0)) == 20


# ---------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "train.parquet").is_file(),
                    reason=f"real data not found at {SHARED_DATA}")
def test_real_cifar_partition(fedmf_cache: Path) -> None:
    cfg = client_cfg({"dataset": "cifar10", "data-dir": str(SHARED_DATA),
                      "partitioner": "dirichlet", "alpha": 0.5, "num-clients": 100,
                      "val-fraction": 0.1, "seed": 0})
    t0 = time.perf_counter()
    cd = task.client_data(cfg, 7)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert task.client_data(cfg, 7) is cd
    assert time.perf_counter() - t0 < first
    n = len(cd.train) + len(cd.val)
    assert 10 <= n < 50_000 and cd.train.inputs.shape[1:] == (3, 32, 32)
    # the client's labels are those of its partition's original rows in the parquet file
    import pyarrow.parquet as pq

    rows = D.partition_rows(cfg.data_config(), 7)
    assert len(rows) == n
    labels = pq.read_table(SHARED_DATA / "cifar10" / "train.parquet",
                           columns=["label"]).column("label").to_numpy()
    got = torch.cat([cd.train.labels, cd.val.labels]).numpy()
    assert sorted(got.tolist()) == sorted(labels[rows].tolist())


# ---------------------------------------------------------------------------- ScatterNet


def test_scatter_features_are_cached_and_per_example(tiny_data_dir: Path, fedmf_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.features import SCATTER_DIM, ScatterFeatures, scatter_extractor

    cfg = client_cfg(cifar_config(tiny_data_dir, model="scatter-linear"))
    assert cfg.representation().kind == "scatter"
    D.prefetch_features(cfg.data_config(), cfg.representation(), [0, 1, 2])
    files = list(fedmf_cache.glob("features/*/features.npy"))
    assert len(files) == 1 and np.load(files[0]).dtype == np.float16
    stored = np.load(files[0])
    assert int((~np.isnan(stored).any(axis=1)).sum()) == 60  # every row of the 3 partitions
    first = task.client_data(cfg, 1)
    assert first.train.inputs.shape[1] == SCATTER_DIM and first.train.inputs.dtype == torch.float32
    # features of one image do not depend on the others in its batch (per-example norm)
    rows = D.partition_rows(cfg.data_config(), 1)
    raw = D.load_split(cfg.data_config(), "train")
    imgs = D.decode_images([raw[int(np.flatnonzero(np.asarray(raw["row"]) == r)[0])]["img"]
                            for r in rows[:3]], normalize=False)
    alone = torch.cat([scatter_extractor().encode(imgs[i : i + 1]) for i in range(3)])
    together = ScatterFeatures().encode(imgs)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)
    direct = D.cached_scatter_features(cfg.data_config(), "train", rows[:3],
                                       extractor=scatter_extractor())
    np.testing.assert_allclose(direct, together.numpy(), atol=2e-3)  # float16 storage

    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("features recomputed although cached")

    D.clear_caches()  # a new process: only the disk cache is left
    monkeypatch.setattr(ScatterFeatures, "encode", boom)
    again = task.client_data(cfg, 1)
    assert torch.equal(again.train.inputs, first.train.inputs)


@pytest.mark.parametrize(("partitioner", "extra"),
                         [("iid", {}), ("dirichlet", {"alpha": 0.3}),
                          ("pathological", {"classes-per-client": 2})])
def test_partition_index_equals_the_dataset_views(tiny_data_dir: Path, fedmf_cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  partitioner: str, extra: dict) -> None:
    """The on-disk index of every partition's rows and labels is what the HF partition views
    hold, in their order; a later process reads it from disk without any dataset view, and
    cached-feature clients built from it equal those built from the views."""
    cfg = client_cfg(cifar_config(tiny_data_dir, model="scatter-linear", partitioner=partitioner,
                                  **{"num-clients": 4, "max-examples-per-client": 9, **extra}))
    data = cfg.data_config()
    index = D.partition_index(data)
    first_train: dict[int, torch.Tensor] = {}
    for pid in range(4):
        part = D.load_raw_partition(data, pid)
        rows, labels = index.partition(pid)
        np.testing.assert_array_equal(rows, np.asarray(part["row"]))
        np.testing.assert_array_equal(labels, np.asarray(part["label"]))
        via_index = task.client_data(cfg, pid)
        tr, va = D.split_indices(data, pid, len(part))
        view = D._tensorize(data, part.select(np.concatenate([va, tr])), "train",
                            cfg.representation())
        assert torch.equal(torch.cat([via_index.val.inputs, via_index.train.inputs]),
                           view.inputs)
        assert torch.equal(torch.cat([via_index.val.labels, via_index.train.labels]),
                           view.labels)
        first_train[pid] = via_index.train.inputs
    assert len(list(fedmf_cache.glob("partitions/*.npz"))) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dataset view was built although the index is on disk")

    D.clear_caches()  # a new process: the index comes from disk, not from dataset views
    monkeypatch.setattr(D, "load_raw_partition", boom)
    again = D.partition_index(data)
    np.testing.assert_array_equal(again.rows, index.rows)
    np.testing.assert_array_equal(again.offsets, index.offsets)
    assert torch.equal(task.client_data(cfg, 2).train.inputs, first_train[2])
