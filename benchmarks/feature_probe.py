"""How the ``scatter-linear`` features were chosen: a central (non-private) linear probe on
CIFAR-10 ScatterNet features for each pooling and normalisation.

The scattering transform (J = 2, L = 8: 243 channels on an 8 x 8 grid) runs once per image;
every variant then pools to ``g x g`` (g = 1, 2, 4, 8), optionally group-normalises the 243
channels per example (27 groups, no learned parameters, as ``clients.features``) and scales by
``1 / sqrt(dim)``.  A linear softmax model is trained on each with the same minibatch SGD
(momentum 0.9, cosine learning rate), its learning rate picked from ``--lrs`` on a validation
tenth of the training images, and evaluated on held-out test images.  It is a measurement of
the features, not a private result.

Example (about 15 minutes on a 2-core CPU)::

    python benchmarks/feature_probe.py --data-dir ../shared/data --train 20000 --test 5000
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

_GROUPS = 27


def load_images(path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of a CIFAR-10 parquet file (hub schema), in [0, 1]."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path, columns=["img", "label"]).slice(0, count)
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
                     for cell in table.column("img").to_pylist()])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().float() / 255.0
    return x, torch.tensor(table.column("label").to_pylist(), dtype=torch.long)


@torch.no_grad()
def scatter(x: torch.Tensor, *, batch: int = 256) -> torch.Tensor:
    """(N, 243, 8, 8) scattering coefficients (J = 2, L = 8)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    op = ScatteringTorch2D(J=2, shape=(32, 32), L=8)
    return torch.cat([op(x[i : i + batch]).reshape(-1, 243, 8, 8)
                      for i in range(0, len(x), batch)])


def variant(s: torch.Tensor, *, pool: int, norm: bool) -> torch.Tensor:
    """Pooled (and group-normalised) features, scaled to norm about 1."""
    f = torch.nn.functional.adaptive_avg_pool2d(s, pool)
    if norm:
        f = torch.nn.functional.group_norm(f, _GROUPS)
    f = f.reshape(len(f), -1)
    return f / math.sqrt(f.shape[1])


def probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, *,
          epochs: int, lr: float, batch: int, seed: int) -> float:
    """Test accuracy of a linear softmax model trained by minibatch SGD."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((model(xte).argmax(-1) == yte).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("FEDMF_DATA_DIR", "../shared/data")))
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--pools", default="1,2,4,8")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lrs", default="0.25,1,4,16,64", help="learning rates tried (validation)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = args.data_dir / "cifar10"
    if not (root / "train.parquet").is_file():
        sys.exit(f"data-dir: no cifar10/train.parquet under {str(args.data_dir)!r}")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    xtr, ytr = load_images(root / "train.parquet", args.train)
    xte, yte = load_images(root / "test.parquet", args.test)
    s_tr, s_te = scatter(xtr), scatter(xte)
    seconds = time.perf_counter() - start
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# python benchmarks/feature_probe.py {shown}")
    print(f"# {args.train} train / {args.test} test images; scattering {seconds:.0f} s "
          f"({(args.train + args.test) / seconds:.0f} images/s incl. decoding)")
    print("| pooling | group norm | features | lr (validation) | test accuracy |")
    print("|---|---|---:|---:|---:|")
    n_val = max(1, len(ytr) // 10)
    for pool in (int(g) for g in args.pools.split(",")):
        for norm in (False, True):
            ftr, fte = variant(s_tr, pool=pool, norm=norm), variant(s_te, pool=pool, norm=norm)
            fit, val = (ftr[n_val:], ytr[n_val:]), (ftr[:n_val], ytr[:n_val])
            best = max((probe(*fit, *val, epochs=args.epochs, lr=float(lr), batch=args.batch,
                              seed=args.seed), float(lr)) for lr in args.lrs.split(","))
            acc = probe(*fit, fte, yte, epochs=args.epochs, lr=best[1], batch=args.batch,
                        seed=args.seed)
            print(f"| {pool} x {pool} | {'yes' if norm else 'no'} | {243 * pool * pool:,} | "
                  f"{best[1]:g} | {acc:.3f} |", flush=True)

if __name__ == "__main__":
    main()
