"""The device's figures: one round's work, the agent's import time, its memory after a round.

Every figure is measured in child processes pinned to one CPU (``os.sched_setaffinity``), so
that the "one x86 core" of the target holds whatever the machine's load, and each is set beside a
baseline measured in the same run, interleaved with it:

- ``device_round_s``: median over rounds of the work ``DeviceAgent._train`` does for the default
  task (``TaskSpec``'s defaults: the logistic model, a window of 864 readings): the privacy
  accountant (the budget check and the epsilon after the charge), the data commitment (salts and
  Merkle tree over the window), ``make_update`` (DP-SGD, clipping, CKKS encryption, EIP-712
  signature) and the update's encoding. Disk writes (state file, ledger) are left out. The
  parts are timed apart too (``device_round_parts_s``; ``dp_sgd`` is ``private_delta``, the
  DP-SGD run and the clipping), and the accountant's first call, which
  fills its cache, separately (``device_accountant_first_s``). Baseline: one CKKS encryption of
  the same vector, the floor no device round can go below.
- ``device_import_s``: median wall time of ``python -c "import truscl.agent.service"`` (every
  module ``truscl agent run`` loads) in a fresh interpreter; baselines ``python -c pass`` and
  ``import numpy, tenseal`` (the floor of a device that trains and encrypts).
- ``device_rss_mb``: resident memory of a process that imported the agent, loaded the task's
  public context and made one round's update; baseline: numpy and tenseal with the same context
  after one encryption (the floor for the same work).

    .venv/bin/python -m bench.device [--quick] [--json FILE] [--source DIR]

``--source DIR`` measures another checkout's tree (e.g. main's) with this environment, for a
before/after comparison (a tree with ``private_delta`` and ``TaskSpec.sampling_rate_for``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMPORT_AGENT = "import truscl.agent.service"
IMPORT_FLOOR = "import numpy, tenseal"


def figures(quick: bool, source: Path | None = None) -> dict[str, Any]:
    from truscl.privacy.ckks import OwnerKeys

    runs = 3 if quick else 9
    rounds = 5 if quick else 30
    cpu = max(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="truscl-bench-device-") as folder:
        context_file = Path(folder) / "public-context"
        context_file.write_bytes(OwnerKeys.generate().public_context_bytes())  # the owner's
        probe = _Probe(cpu, context_file, source)
        work = probe.json("round", str(rounds))
        rss = probe.json("rss")
        rss_floor = probe.json("rss-floor")
        agent_s, pass_s, floor_s = [], [], []
        for _ in range(runs):  # interleaved, so that a change of load hits all three alike
            agent_s.append(probe.wall(IMPORT_AGENT))
            pass_s.append(probe.wall("pass"))
            floor_s.append(probe.wall(IMPORT_FLOOR))
    return {
        "device_round_s": work["round_s"],
        "device_round_parts_s": work["parts_s"],
        "device_accountant_first_s": work["accountant_first_s"],
        "device_round_baseline_encrypt_s": work["parts_s"]["encrypt"],
        "device_import_s": statistics.median(agent_s),
        "device_import_baseline_s": {
            "python -c pass": statistics.median(pass_s),
            IMPORT_FLOOR: statistics.median(floor_s),
        },
        "device_rss_mb": rss["rss_mb"],
        "device_peak_rss_mb": rss["peak_mb"],
        "device_rss_baseline_mb": rss_floor["rss_mb"],
        "device_heavy_modules_loaded": rss["heavy_modules"],
        "device_method": (
            f"one CPU ({cpu}); round: median of {rounds} rounds of the default task's work; "
            f"import: median of {runs} fresh interpreters, interleaved with the baselines"
        ),
    }


class _Probe:
    """Child interpreters pinned to one CPU, reading ``source``'s tree if given."""

    def __init__(self, cpu: int, context_file: Path, source: Path | None) -> None:
        self.cpu = cpu
        self.context_file = context_file
        self.env = dict(os.environ)
        self.cwd = ROOT if source is None else source  # a child's sys.path starts with its cwd
        if source is not None:  # its truscl first, this bench package after it
            self.env["PYTHONPATH"] = os.pathsep.join((str(source), str(ROOT)))

    def _pin(self) -> None:
        os.sched_setaffinity(0, {self.cpu})

    def json(self, mode: str, *args: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "bench.device", "--probe", mode, *args]
        answer = subprocess.run(
            [*command, "--context", str(self.context_file)],
            capture_output=True, text=True, check=True, cwd=self.cwd, env=self.env,
            preexec_fn=self._pin, timeout=600,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
        return result

    def wall(self, code: str) -> float:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code], check=True, cwd=self.cwd, env=self.env,
            preexec_fn=self._pin, timeout=120,
        )  # fmt: skip
        return time.perf_counter() - started


# --- the probes, run in the pinned children ------------------------------------------------------

HEAVY = ("web3", "eth_tester", "eth", "dp_accounting", "scipy", "requests", "eth_account")


def _probe_round(context_file: Path, rounds: int) -> dict[str, Any]:
    import secrets

    import numpy as np

    from truscl.agent.contribution import UpdateInputs, data_root, make_update, private_delta
    from truscl.privacy.accounting import PrivacyLedger
    from truscl.privacy.ckks import encrypt, load_context
    from truscl.privacy.dp import secure_generator
    from truscl.wire import Domain

    spec, window = _default_task(context_file)
    context = load_context(context_file.read_bytes())
    account = _device_key(context_file.with_name("device.key"))
    domain = Domain(31337, "0x" + "11" * 20)
    dp, q = spec.dp, spec.sampling_rate_for(len(window))
    ledger = PrivacyLedger()
    params = np.zeros(spec.n_params)

    started = time.perf_counter()
    ledger.epsilon_if(q, dp.noise_multiplier, dp.local_steps, dp.delta)
    accountant_first = time.perf_counter() - started

    totals: list[float] = []
    parts: dict[str, list[float]] = {
        k: [] for k in ("accountant", "merkle", "make_update", "encode", "dp_sgd", "encrypt")
    }
    rng = secure_generator()
    for round_no in range(1, rounds + 1):
        t0 = time.perf_counter()
        ledger.epsilon_if(q, dp.noise_multiplier, dp.local_steps, dp.delta)
        ledger.record(q, dp.noise_multiplier, dp.local_steps)
        spent = ledger.epsilon(dp.delta)
        t1 = time.perf_counter()
        root = data_root(secrets.token_bytes(32), window)
        t2 = time.perf_counter()
        inputs = UpdateInputs(round_no, params, window, spent, root)
        update = make_update(spec, inputs, context=context, account=account, domain=domain)
        t3 = time.perf_counter()
        update.encode()
        t4 = time.perf_counter()
        totals.append(t4 - t0)
        for name, seconds in (
            ("accountant", t1 - t0), ("merkle", t2 - t1), ("make_update", t3 - t2),
            ("encode", t4 - t3),
        ):  # fmt: skip
            parts[name].append(seconds)
        # make_update's own parts, timed apart on the same inputs
        t5 = time.perf_counter()
        delta = private_delta(spec, params, window, rng)
        t6 = time.perf_counter()
        encrypt(context, delta)
        t7 = time.perf_counter()
        parts["dp_sgd"].append(t6 - t5)
        parts["encrypt"].append(t7 - t6)
    medians = {name: statistics.median(values) for name, values in parts.items()}
    medians["sign_and_rest"] = medians["make_update"] - medians["dp_sgd"] - medians["encrypt"]
    return {
        "round_s": statistics.median(totals),
        "parts_s": medians,
        "accountant_first_s": accountant_first,
    }


def _probe_rss(context_file: Path) -> dict[str, Any]:
    import secrets

    import numpy as np

    import truscl.agent.service  # noqa: F401 - every module the agent loads is the point
    from truscl.agent.contribution import UpdateInputs, data_root, make_update
    from truscl.privacy.accounting import PrivacyLedger
    from truscl.privacy.ckks import load_context
    from truscl.wire import Domain

    spec, window = _default_task(context_file)
    context = load_context(context_file.read_bytes())
    dp = spec.dp
    ledger = PrivacyLedger()
    ledger.record(spec.sampling_rate_for(len(window)), dp.noise_multiplier, dp.local_steps)
    inputs = UpdateInputs(
        1, np.zeros(spec.n_params), window, ledger.epsilon(dp.delta),
        data_root(secrets.token_bytes(32), window),
    )  # fmt: skip
    account = _device_key(context_file.with_name("device.key"))
    update = make_update(
        spec, inputs, context=context, account=account, domain=Domain(31337, "0x" + "11" * 20)
    )
    update.encode()
    heavy = sorted({m.partition(".")[0] for m in sys.modules} & set(HEAVY))
    return {**_memory(), "heavy_modules": heavy}


def _probe_rss_floor(context_file: Path) -> dict[str, Any]:
    import numpy as np
    import tenseal as ts

    context = ts.context_from(context_file.read_bytes())
    ts.ckks_vector(context, np.zeros(5).tolist()).serialize()
    return _memory()


def _device_key(path: Path) -> Any:
    """The device's key as the agent loads it; a ``--source`` tree from before the device's
    own signing key (main before issue 9) loads an eth-account ``LocalAccount``."""
    from truscl import keyfile

    load = getattr(keyfile, "load_or_create_signing_key", None) or keyfile.load_or_create_account
    return load(path)


def _memory() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024  # kB -> MB
    return {"rss_mb": fields["VmRSS"], "peak_mb": fields["VmHWM"]}


def _default_task(context_file: Path) -> tuple[Any, list[Any]]:
    """The default task (``TaskSpec``'s defaults) and a full window of plausible readings."""
    import numpy as np

    from truscl.agent.sensors import Reading
    from truscl.privacy.ckks import DEFAULT_PROFILE, context_hash
    from truscl.task import TaskSpec

    spec = TaskSpec(
        task="0x" + "aa" * 32,
        rounds=10,
        quorum=1,
        he_profile=DEFAULT_PROFILE.name,
        context_hash="0x" + context_hash(context_file.read_bytes()).hex(),
        feature_offsets=(20.0, 50.0, 500.0, 800.0),
        feature_scales=(10.0, 30.0, 500.0, 400.0),
    )
    rng = np.random.default_rng(7)
    window = [
        Reading(
            timestamp=1_700_000_000.0 + 300 * i,
            temperature_c=float(rng.normal(21, 2)),
            humidity_pct=float(rng.normal(45, 5)),
            pressure_hpa=1013.0,
            light_lux=float(rng.uniform(0, 800)),
            co2_ppm=float(rng.normal(700, 150)),
            motion=bool(rng.random() < 0.3),
        )
        for i in range(spec.window)
    ]
    return spec, window


def _probe(args: argparse.Namespace) -> int:
    context_file = Path(args.context)
    if args.probe == "round":
        result = _probe_round(context_file, int(args.rest[0]))
    elif args.probe == "rss":
        result = _probe_rss(context_file)
    else:
        result = _probe_rss_floor(context_file)
    print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (CI)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    parser.add_argument("--source", type=Path, help="measure this checkout's tree instead")
    parser.add_argument("--probe", choices=("round", "rss", "rss-floor"), help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return _probe(args)
    from bench.__main__ import report

    return report({"device": figures(args.quick, args.source)}, args.json)


if __name__ == "__main__":
    sys.exit(main())
