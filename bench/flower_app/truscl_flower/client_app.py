"""A Flower client: one simulated room of truscl's demo, trained as a truscl device trains,
without its privacy.

Each round the client trains on the window a device of the demo trains on in that round (the
last ``window`` readings, ``readings-per-round`` more each round) with the devices' sampled
gradient steps: each step keeps every reading with probability ``batch-size / window`` and
divides the summed gradient by the expected batch; no per-example clipping, no noise, no
encryption, no signature. The readings are the room's own (``client-<partition-id>.npz`` in the
run's ``data-dir``, written by bench/peers.py from truscl.sim), already scaled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from truscl.learning import LogisticModel

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = context.run_config
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    with np.load(Path(str(config["data-dir"])) / f"client-{partition}.npz") as data:
        readings, labels = data["X"], data["y"]
    window = int(config["window"])
    start = (server_round - 1) * int(config["readings-per-round"])
    X, y = readings[start : start + window], labels[start : start + window]

    params = msg.content.array_records["arrays"].to_numpy_ndarrays()[0]
    model = LogisticModel(X.shape[1])
    rate = int(config["batch-size"]) / len(X)
    step = float(config["learning-rate"]) / (rate * len(X))
    rng = np.random.default_rng((partition, server_round))  # sampling only: no privacy here
    for _ in range(int(config["local-steps"])):
        sampled = rng.random(len(X)) < rate
        params = params - step * model.per_example_grads(params, X[sampled], y[sampled]).sum(0)

    content = RecordDict(
        {
            "arrays": ArrayRecord([params]),
            "metrics": MetricRecord({"num-examples": len(X)}),
        }
    )
    return Message(content=content, reply_to=msg)
