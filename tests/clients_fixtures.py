"""Tiny generated data and models for the ``clients`` tests (hub schema, no downloads).

Fixtures are registered under short names (``tiny_data_dir``, ``tiny_bert``,
``fedmf_cache``) but defined as ``*_fixture`` functions (no name clash for ruff);
``conftest.py`` imports them, so every test module can take ``tiny_data_dir`` as an argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]
POS_WORDS = ["good", "great", "fine", "love", "best"]
NEG_WORDS = ["bad", "awful", "poor", "hate", "worst"]
NEUTRAL = ["the", "movie", "film", "was", "a", "plot", "actor", "scene", "it", "and"]
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def write_tiny_cifar(root: Path, *, n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """CIFAR-10-schema parquet files (img: Image PNG 32x32 RGB, label: ClassLabel) whose
    classes differ by mean colour, so a CNN learns them in a few steps."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 225, size=(10, 3))
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        imgs = []
        for y in labels:
            arr = centres[y] + rng.normal(0, 20, size=(32, 32, 3))
            imgs.append(PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
        ds = Dataset.from_dict({"img": imgs, "label": labels.tolist()},
                               features=Features({"img": Image(),
                                                  "label": ClassLabel(names=CIFAR_CLASSES)}))
        ds.to_parquet(str(root / "cifar10" / f"{split}.parquet"))


def write_tiny_imdb(root: Path, *, n_train: int = 48, n_test: int = 16, seed: int = 0) -> None:
    """IMDB-schema parquet files (text: string, label: ClassLabel(neg, pos))."""
    from datasets import ClassLabel, Dataset, Features, Value

    rng = np.random.default_rng(seed)
    (root / "imdb").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 2).tolist()
        texts = []
        for y in labels:
            sent = POS_WORDS if y == 1 else NEG_WORDS
            words = list(rng.choice(NEUTRAL, 6)) + list(rng.choice(sent, 3))
            rng.shuffle(words)
            texts.append(" ".join(words))
        ds = Dataset.from_dict({"text": texts, "label": labels},
                               features=Features({"text": Value("string"),
                                                  "label": ClassLabel(names=["neg", "pos"])}))
        ds.to_parquet(str(root / "imdb" / f"{split}.parquet"))


def write_tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 1-layer BERT (hidden 16) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *NEUTRAL, *POS_WORDS, *NEG_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session", name="tiny_data_dir")
def tiny_data_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with tiny ``cifar10/`` and ``imdb/`` parquet splits."""
    root = tmp_path_factory.mktemp("fedmf_data")
    write_tiny_cifar(root)
    write_tiny_imdb(root)
    return root


@pytest.fixture(scope="session", name="tiny_bert")
def tiny_bert_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random BERT encoder + tokenizer."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(name="fedmf_cache")
def fedmf_cache_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``FEDMF_CACHE_DIR`` for this test; in-memory caches cleared."""
    from clients.data import clear_caches

    monkeypatch.setenv("FEDMF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMF_DATA_DIR", raising=False)
    clear_caches()
    return tmp_path / "cache"


def cifar_config(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A CPU-fast CIFAR run config for the tiny data."""
    cfg: dict[str, Any] = {
        "dataset": "cifar10", "data-dir": str(data_dir), "partitioner": "iid",
        "alpha": 0.5, "classes-per-client": 2, "num-clients": 3, "local-epochs": 1,
        "batch-size": 8, "client-lr": 0.05, "client-momentum": 0.0,
        "max-examples-per-client": 0, "model": "cnn", "model-path": "", "val-fraction": 0.2,
        "seed": 0, "rounds": 4, "eval-every": 2,
    }
    cfg.update(overrides)
    return cfg


def client_cfg(run_config: dict[str, Any]) -> Any:
    """The clients' part of a run config (``clients.config.ClientConfig``)."""
    from clients.config import ClientConfig

    return ClientConfig.from_run_config(run_config)


def imdb_config(data_dir: Path, model_path: Path, **overrides: Any) -> dict[str, Any]:
    """A CPU-fast IMDB run config (tiny BERT encoder)."""
    cfg = cifar_config(data_dir, dataset="imdb", model="head", **{"max-length": 16})
    cfg["model-path"] = str(model_path)
    cfg.update(overrides)
    return cfg
