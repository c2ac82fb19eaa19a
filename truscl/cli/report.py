"""``truscl report``: a task's plots and summary, from the chain, the aggregator's journal and
archive and the owner's released models; needs no key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from truscl.cli.common import task_id
from truscl.errors import ConfigError

if TYPE_CHECKING:
    from truscl.task import TaskSpec


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser(
        "report",
        help="write a task's plots (PNG) and a Markdown summary: accuracy, epsilon per device, "
        "participants and rejections, bytes and gas per round",
    )
    report.add_argument("--task", required=True, type=task_id, help="0x-prefixed task id")
    report.add_argument("--out", required=True, type=Path, help="folder to write the report to")
    report.add_argument(
        "--aggregator", type=Path, required=True, metavar="TOML",
        help="the aggregator's TOML file: its archive, journal and chain",
    )  # fmt: skip
    report.add_argument(
        "--owner", type=Path, metavar="TOML",
        help="the owner's TOML file: its released models, for accuracy",
    )  # fmt: skip
    report.add_argument(
        "--test-set", type=Path, metavar="NPZ",
        help="evaluation set for accuracy: arrays X (raw features, in the task's order) and y",
    )  # fmt: skip
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from truscl.chain import ChainClient
    from truscl.chain.rpc import connect
    from truscl.report import write_report
    from truscl.server.archive import Archive
    from truscl.server.config import AggregatorConfig
    from truscl.server.figures import TaskFigureReader

    config = AggregatorConfig.load(args.aggregator)
    if config.task != args.task:
        raise ConfigError(f"{args.aggregator} serves task {config.task}, not {args.task}")
    if not (config.archive / "blobs").is_dir():
        raise ConfigError(f"{config.archive} is not an aggregator archive")
    chain = ChainClient.at(connect(config.chain.rpc), config.chain.contract)
    reader = TaskFigureReader(chain, Archive(config.archive), args.task)
    accuracy, note = _accuracy(args, reader.spec())
    summary = write_report(reader.read(accuracy, note), args.out)
    print(summary)
    return 0


def _accuracy(args: argparse.Namespace, spec: TaskSpec | None) -> tuple[dict[int, float], str]:
    """Accuracy by round, and where it comes from or why there is none."""
    import numpy as np

    from truscl.server.config import OwnerConfig
    from truscl.server.figures import NO_ACCURACY, model_accuracy
    from truscl.server.owner import ModelStore

    if args.test_set is None:
        return {}, NO_ACCURACY
    if args.owner is None:
        return {}, "not available: the owner's TOML file (--owner) was not given"
    if spec is None:
        return {}, "not available: the archive holds no task spec yet"
    owner = OwnerConfig.load(args.owner)
    try:
        with np.load(args.test_set) as data:
            X, y = data["X"], data["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{args.test_set}: not an evaluation set (X and y): {exc}") from None
    models = ModelStore(owner.state / "models").all(spec.n_params)
    note = f"of each released model on {len(y)} held-out samples ({args.test_set.name})"
    return model_accuracy(spec, models, X, y), note
