"""The Flower server: FedAvg over every client for ``num-rounds`` rounds, starting from the
model truscl's owner starts from (zeros), evaluating each round's global model on the demo's
held-out test set (``test.npz`` in the run's ``data-dir``).

When the rounds are done it writes ``result.json`` into ``data-dir``: the final accuracy, the
seconds of each round (from one global model to the next, training and aggregation), and the
size of each client's reply as Flower serialises it (every object of the message, as pushed to
the SuperLink) and of its parameters alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
)

from truscl.learning import LogisticModel

app = ServerApp()


def serialized_bytes(obj: InflatableObject) -> int:
    """Bytes of ``obj`` and every object under it, as Flower serialises them."""
    return sum(len(part.deflate()) for part in get_all_nested_objects(obj).values())


class MeasuredFedAvg(FedAvg):
    """FedAvg, noting the serialised size of every reply it aggregates."""

    def __init__(self, clients: int) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        self.update_bytes: list[int] = []
        self.parameter_bytes: list[int] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_content():
                self.update_bytes.append(serialized_bytes(reply))
                self.parameter_bytes.append(serialized_bytes(reply.content.array_records["arrays"]))
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    folder = Path(str(config["data-dir"]))
    with np.load(folder / "test.npz") as test:
        X_test, y_test = test["X"], test["y"]
    model = LogisticModel(X_test.shape[1])
    marks: list[float] = []
    accuracies: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        marks.append(time.monotonic())  # round 0 is the start, before the first round
        accuracies.append(model.accuracy(arrays.to_numpy_ndarrays()[0], X_test, y_test))
        return MetricRecord({"accuracy": accuracies[-1]})

    strategy = MeasuredFedAvg(int(config["num-clients"]))
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([model.init_params()]),
        num_rounds=int(config["num-rounds"]),
        evaluate_fn=evaluate,
    )
    result = {
        "accuracy": accuracies[-1],
        "round_s": [later - earlier for earlier, later in pairwise(marks)],
        "update_bytes": strategy.update_bytes,
        "parameter_bytes": strategy.parameter_bytes,
    }
    (folder / "result.json").write_text(json.dumps(result))
