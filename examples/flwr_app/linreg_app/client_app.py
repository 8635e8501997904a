"""The user's ClientApp. Two things make it work with fedmf's strategy:

* the train reply carries the *full* local model in ``arrays`` (the strategy computes and clips
  the delta itself) and ``num-examples`` in ``metrics``;
* the identity handler answers the server's query for a stable client id (node-config
  ``client-id``, else ``partition-id``): participation limits, cohorts and the privacy
  guarantee follow that id, never Flower's node id, which changes when a SuperNode restarts.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from strategies.participation import IDENTITY_ACTION, identity_reply

from .task import client_data, to_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Five steps of gradient descent from the server's model; reply with the full model."""
    arrays = msg.content["arrays"]
    w = arrays["w"].numpy().astype(np.float64)
    b = arrays["b"].numpy().astype(np.float64)
    x, y = client_data(int(context.node_config["partition-id"]))
    for _ in range(5):
        err = x @ w + b - y
        w -= 0.1 * x.T @ err / len(y)
        b -= 0.1 * err.mean(keepdims=True)
    metrics = MetricRecord({"num-examples": len(y), "train-loss": float(np.mean(err**2))})
    return Message(RecordDict({"arrays": to_record(w, b), "metrics": metrics}), reply_to=msg)


# without this handler the server never learns who a node is, and samples no one
app.query(IDENTITY_ACTION)(identity_reply)
