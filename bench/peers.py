"""truscl's demo beside Flower's deployment engine on the same task, on this machine, in one run.

The peer is Flower (``flwr``, the ``bench`` extra) as it is deployed: one SuperLink and one
SuperNode per client, each its own process on 127.0.0.1 (``--insecure``, free ports, state in
memory, no runtime dependency installation), running the app in ``bench/flower_app`` by
``flwr run``: FedAvg over every client from the zero model, each client one simulated room of
truscl's demo (the same rooms, seeds and window schedule as the demo's devices, read through
truscl.sim), training truscl's logistic model with the devices' sampled gradient steps (20
local steps, the same learning rate and expected batch) but without privacy: no clipping, no
noise, no encryption, no signatures, no chain. The global model of each round is scored on the
demo's held-out test set, so the accuracies compare.

truscl is ``truscl demo`` (fleet mode: every role its own process, DP-SGD, threshold CKKS,
signed updates anchored on anvil) with the same devices and rounds. The two alternate, Flower
first, ``REPEATS`` times each, so that both see the same machine:

- ``seconds``: Flower from ``flwr run`` to the run's end (its processes started and their
  SuperNodes registered before; that start-up is ``startup_s``); truscl the whole demo, its
  start-up (keys, broker, chain, contract, processes, test set, baseline) included;
- ``round_s``: each round, from one global model to the next (Flower: the ServerApp's own
  clock around its rounds; truscl: the demo's released models); ``flower_round_s`` and
  ``truscl_demo_round_s`` are the medians over every round of every repetition;
- ``update_bytes``: one client's update as it travels (Flower: the reply message with every
  object under it, as Flower serialises them, and its parameters alone in ``parameter_bytes``;
  truscl: the signed, encrypted update as archived);
- ``accuracy``: the final global model on the test set (the last repetition's).

    .venv/bin/python -m bench.peers [--quick] [--clients N] [--rounds R] [--repeats K]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

CLIENTS, ROUNDS, REPEATS = 5, 10, 2
QUICK_CLIENTS, QUICK_ROUNDS, QUICK_REPEATS = 2, 2, 1
APP = Path(__file__).resolve().parent / "flower_app"
SEED = 7  # the demo's
STARTUP_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 60.0  # per round, on top of a minute
STOP_TIMEOUT_S = 20.0


class FlowerFailed(RuntimeError):
    """Flower's deployment did not start or its run did not finish."""


def figures(
    quick: bool, clients: int | None = None, rounds: int | None = None, repeats: int | None = None
) -> dict[str, Any]:
    clients = clients or (QUICK_CLIENTS if quick else CLIENTS)
    rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    repeats = repeats or (QUICK_REPEATS if quick else REPEATS)
    from truscl.task import DpTerms

    flower: list[dict[str, Any]] = []
    truscl: list[dict[str, Any]] = []
    not_run: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="truscl-peers-") as folder:
        data = Path(folder) / "data"
        _write_task(data, clients, rounds)
        for _ in range(repeats):
            if "flower" not in not_run:
                try:
                    flower.append(_flower(data, Path(folder), clients, rounds))
                except FlowerFailed as exc:  # reported, never replaced by a figure
                    not_run["flower"] = str(exc)[:1500]
            truscl.append(_truscl(clients, rounds))
    result: dict[str, Any] = {
        "peers": {
            "flower": (
                _summary(flower, "flwr " + _flower_version())
                if flower
                else {"not_run": not_run["flower"]}
            ),
            "truscl": _summary(truscl, "truscl demo"),
            "clients": clients,
            "rounds": rounds,
            "how": (
                f"interleaved in one run, Flower first, {repeats} each; Flower's deployment "
                f"engine (SuperLink + {clients} SuperNodes on 127.0.0.1, --insecure, FedAvg, "
                "no privacy) and truscl demo (fleet: DP-SGD, threshold CKKS, signed updates, "
                f"anvil) on the demo's rooms, window and test set, {DpTerms().local_steps} local "
                "steps each round"
            ),
        },
        "truscl_demo_round_s": _median_round(truscl),
        "truscl_demo_s": statistics.median(run["seconds"] for run in truscl),
        "truscl_update_bytes": truscl[-1]["update_bytes"],
    }
    if flower:
        result |= {
            "flower_round_s": _median_round(flower),
            "flower_run_s": statistics.median(run["seconds"] for run in flower),
            "flower_update_bytes": flower[-1]["update_bytes"],
        }
    if not_run:
        result["peers_not_run"] = not_run
    return result


def _summary(runs: list[dict[str, Any]], what: str) -> dict[str, Any]:
    keys = ("update_bytes", "parameter_bytes", "accuracy")
    return {
        "what": what,
        "seconds": [run["seconds"] for run in runs],
        "round_s": [run["round_s"] for run in runs],
        **({"startup_s": [run["startup_s"] for run in runs]} if "startup_s" in runs[0] else {}),
        **{key: runs[-1][key] for key in keys if key in runs[-1]},
    }


def _median_round(runs: list[dict[str, Any]]) -> float:
    return round(statistics.median(s for run in runs for s in run["round_s"]), 3)


def _flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _write_task(folder: Path, clients: int, rounds: int) -> None:
    """Each client's readings (one room of the demo, on the devices' schedule) and the demo's
    test set, scaled as the task spec scales them, for the Flower app to load."""
    import numpy as np

    from truscl.demo.common import READINGS_PER_ROUND, WINDOW, occupancy_spec, sensed_readings
    from truscl.demo.common import test_set as held_out
    from truscl.sim.rooms import make_rooms

    folder.mkdir(parents=True)
    spec = occupancy_spec("0x" + "00" * 32)  # the demo's task: its features, scaling and label
    profiles = make_rooms(clients, SEED)
    count = WINDOW + rounds * READINGS_PER_ROUND
    for index, profile in enumerate(profiles):
        readings = sensed_readings(profile, index, SEED, count)
        np.savez(folder / f"client-{index}.npz", X=spec.inputs(readings), y=spec.targets(readings))
    test = held_out(profiles, SEED)
    np.savez(folder / "test.npz", X=spec.inputs(test), y=spec.targets(test))


def _flower(data: Path, folder: Path, clients: int, rounds: int) -> dict[str, Any]:
    """One Flower run on fresh processes: its figures, or ``FlowerFailed`` and why."""
    from truscl.broker import free_port
    from truscl.demo.common import READINGS_PER_ROUND, WINDOW
    from truscl.task import DpTerms

    if shutil.which("flower-superlink", path=_bin()) is None:
        raise FlowerFailed("flwr is not installed (pip install -e '.[bench]')")
    home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=folder))
    logs = home / "logs"
    logs.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{_bin()}:{os.environ['PATH']}"}
    (data / "result.json").unlink(missing_ok=True)
    with ExitStack() as stack:
        started = time.monotonic()
        superlink = [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        stack.enter_context(_Process(superlink, env, logs / "superlink.log"))
        for index in range(clients):
            node = [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", f"partition-id={index}",
            ]  # fmt: skip
            stack.enter_context(_Process(node, env, logs / f"supernode-{index}.log"))
        _wait_for_nodes(env, clients, started + STARTUP_TIMEOUT_S, logs)
        startup = time.monotonic() - started
        dp = DpTerms()  # the demo's training terms, less its privacy
        config = (
            f'data-dir="{data}" num-rounds={rounds} num-clients={clients} '
            f"window={WINDOW} readings-per-round={READINGS_PER_ROUND} "
            f"local-steps={dp.local_steps} learning-rate={dp.learning_rate} "
            f"batch-size={dp.batch_size}"
        )
        run = ["flwr", "run", str(APP), "bench", "--stream", "--run-config", config]
        began = time.monotonic()
        with _Process(run, env, logs / "run.log") as flwr_run:
            try:
                flwr_run.process.wait(60.0 + RUN_TIMEOUT_S * rounds)
            except subprocess.TimeoutExpired:
                raise FlowerFailed(
                    f"{clients} clients: the run did not finish in "
                    f"{60.0 + RUN_TIMEOUT_S * rounds:.0f} s; {_tails(logs)}"
                ) from None
        seconds = time.monotonic() - began
        result_file = data / "result.json"
        if flwr_run.process.returncode != 0 or not result_file.exists():
            raise FlowerFailed(
                f"flwr run exited {flwr_run.process.returncode} without a result; {_tails(logs)}"
            )
    result: dict[str, Any] = json.loads(result_file.read_text())
    if len(result["round_s"]) != rounds:
        raise FlowerFailed(f"{len(result['round_s'])} of {rounds} rounds ran; {_tails(logs)}")
    return {
        "seconds": round(seconds, 2),
        "startup_s": round(startup, 2),
        "round_s": [round(s, 3) for s in result["round_s"]],
        "update_bytes": max(result["update_bytes"]),
        "parameter_bytes": max(result["parameter_bytes"]),
        "accuracy": round(result["accuracy"], 4),
    }


def _bin() -> str:
    """The folder of this interpreter's scripts (the venv's ``flwr`` and Flower's servers)."""
    return str(Path(sys.executable).parent)


class _Process:
    """A Flower process in its own process group, stopped with everything it started."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.command, self.env, self.log = command, env, log

    def __enter__(self) -> _Process:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        """SIGTERM to the group (the apps it spawned too), SIGKILL to whatever outlives it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()


def _wait_for_nodes(env: dict[str, str], clients: int, deadline: float, logs: Path) -> None:
    """Until the SuperLink lists ``clients`` SuperNodes online (``flwr supernode ls``)."""
    online = 0
    while time.monotonic() < deadline:
        listing = subprocess.run(
            ["flwr", "supernode", "ls", "bench", "--format", "json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if listing.returncode == 0:
            nodes = json.loads(listing.stdout).get("nodes", [])
            online = sum(1 for node in nodes if node.get("status") == "online")
            if online >= clients:
                return
        time.sleep(1.0)
    raise FlowerFailed(
        f"{online} of {clients} SuperNodes online after {STARTUP_TIMEOUT_S:.0f} s; {_tails(logs)}"
    )


def _tails(logs: Path) -> str:
    """The last lines of each Flower process's log: how far it got."""
    parts = []
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").strip().splitlines()[-3:]
        parts.append(f"{log.stem}: {' | '.join(lines)}")
    return "; ".join(parts)


def _truscl(devices: int, rounds: int) -> dict[str, Any]:
    from truscl.demo import DemoConfig, run_demo

    started = time.monotonic()
    summary = run_demo(DemoConfig(devices=devices, rounds=rounds), out=io.StringIO())
    seconds = time.monotonic() - started
    rows = summary["rounds"]
    if len(rows) != rounds:
        raise RuntimeError(f"truscl demo: {len(rows)} of {rounds} rounds closed")
    return {
        "seconds": round(seconds, 2),
        "round_s": [row["seconds"] for row in rows],
        "update_bytes": max(row["bytes"] // (row["participants"] + row["late"]) for row in rows),
        "accuracy": summary["final_accuracy"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 clients, 2 rounds, once (CI)")
    parser.add_argument("--clients", type=int, help=f"default {CLIENTS}")
    parser.add_argument("--rounds", type=int, help=f"default {ROUNDS}")
    parser.add_argument("--repeats", type=int, help=f"runs of each (default {REPEATS})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    args = parser.parse_args()
    from bench.__main__ import report

    figures_ = figures(args.quick, args.clients, args.rounds, args.repeats)
    return report({"peers": figures_}, args.json)


if __name__ == "__main__":
    sys.exit(main())
