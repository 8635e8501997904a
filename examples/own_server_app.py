"""Bring your own Flower ServerApp and ClientApp, and let fedmf's strategy add the privacy.

The apps are those of ``examples/flwr_app/`` (a linear regression on generated data):

* the ServerApp (``linreg_app/server_app.py``) builds fedmf's strategy from a
  :class:`strategies.config.DPConfig` with :func:`strategies.factory.build_strategy` (the same
  call serves every mechanism name: ``"bsr"``, ``"dp-fedavg"``, ``"fedavg"``, ...) and starts
  it on the user's model;
* the ClientApp (``linreg_app/client_app.py``) replies with the *full* local model in
  ``arrays`` and ``num-examples`` in ``metrics``, and registers fedmf's identity handler, so
  participation limits follow a stable client id rather than Flower's node id.

This script runs both in this process with fedmf's in-process backend (real Flower ``Message``
objects through a ``Grid``, no Ray), so it finishes in seconds. The same apps run unchanged
under ``flwr run examples/flwr_app`` (a local simulation) and against a SuperLink with
SuperNodes (``bash examples/flwr_app/loopback.sh``); see ``examples/flwr_app/README.md``.

Run: ``python examples/own_server_app.py [--mechanism bsr] [--rounds 8] [--clients 20]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "flwr_app")]  # a source checkout, the user's app

from linreg_app.client_app import app as client_app  # noqa: E402
from linreg_app.server_app import app as server_app  # noqa: E402

from simulations.backends import load_backend  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the user's two apps in this process and print what the strategy released."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanism", default="bsr", help="any fedmf mechanism name")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        run = load_backend("inprocess")
        run(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
            run_config={"mechanism": args.mechanism, "rounds": args.rounds,
                        "num-clients": args.clients, "epsilon": args.epsilon,
                        "checkpoint-dir": "", "result-file": str(result)})
        summary = json.loads(result.read_text(encoding="utf-8"))
    print(f"mechanism={summary['mechanism']} rounds={summary['rounds']} "
          f"epsilon={summary['epsilon']:.3f} delta={summary['delta']:g}")
    print(f"|w - w_true| = {summary['error']:.3f} (initial model: "
          f"{summary['initial_error']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
