"""A tiny experiment grid: ``fedmf compare`` (2 mechanisms x 2 seeds), then ``fedmf report``.

``fedmf compare`` runs every cell of mechanisms x epsilons x schedules x seeds (resumable: a
finished cell is skipped), one run folder per cell, and ``fedmf report`` turns the folder into
``results.csv``, ``summary_table.csv`` (mean, std, 95% CI per mechanism and ε),
``paired_differences.csv`` (differences paired by seed) and ``report.md``.

The data are generated here: a CIFAR-10-schema parquet folder (``cifar10/{train,test}.parquet``,
the hub's schema) of 32x32 images whose classes differ by mean colour, so ``--data-dir`` works
offline and nothing is downloaded. The grid is tiny (8 clients, 4 per round, 3 rounds,
in-process backend), so the numbers mean nothing; the commands and files are those of a study
(the README's CIFAR-10 grid is the same two commands with the study's flags).

Run: ``python examples/compare_mechanisms.py [--output runs/example-grid]`` (about 20 s).
Running it again skips the finished cells. Deleting the output folder does not reset it: each
finished run leaves a ``finished.json`` under ``$FEDMF_STATE_DIR`` (default
``~/.local/state/fedmf``) so the same run is never trained twice; use another ``--output``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from simulations.cli import main as fedmf_main

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def write_tiny_cifar(root: Path, *, n_train: int = 80, n_test: int = 40, seed: int = 0) -> None:
    """CIFAR-10-schema parquet files (``img``: PNG 32x32 RGB, ``label``: ClassLabel)."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 225, size=(10, 3))  # one mean colour per class
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = [PILImage.fromarray(np.clip(centres[y] + rng.normal(0, 20, (32, 32, 3)), 0, 255)
                                     .astype(np.uint8), "RGB") for y in labels]
        features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
        Dataset.from_dict({"img": images, "label": labels.tolist()}, features=features) \
            .to_parquet(str(root / "cifar10" / f"{split}.parquet"))


def main(argv: list[str] | None = None) -> int:
    """Write the data, run the grid, report it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/example-grid", help="grid folder")
    p.add_argument("--data-dir", default="runs/example-data",
                   help="where the tiny data set is written (runs/ is git-ignored)")
    p.add_argument("--backend", default="inprocess", choices=("inprocess", "vectorized"))
    args = p.parse_args(argv)

    data = Path(args.data_dir)
    if not (data / "cifar10" / "test.parquet").exists():
        write_tiny_cifar(data)

    # the grid: dp-fedavg (independent noise) vs bsr (correlated noise), seeds 0 and 1
    rc = fedmf_main([
        "compare", "--mechanisms", "dp-fedavg,bsr", "--epsilons", "8", "--seeds", "0,1",
        "--schedules", "constant", "--dataset", "cifar10", "--model", "cnn",
        "--data-dir", str(data), "--clients", "8", "--clients-per-round", "4",
        "--rounds", "3", "--bands", "2", "--batch-size", "8", "--eval-every", "1",
        "--backend", args.backend, "--output", args.output, "--no-report", "--no-progress"])
    if rc != 0:
        return rc
    # the tables, plots and report.md; every mechanism is paired by seed with dp-fedavg
    # (add other pairs with --pairs A:B,C:D)
    rc = fedmf_main(["report", args.output])
    if rc == 0:
        print(f"wrote {args.output}/report.md, results.csv, summary_table.csv, "
              "paired_differences.csv")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
