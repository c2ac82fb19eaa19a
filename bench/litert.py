"""The device agent's memory with LiteRT loaded and a model running, against numpy alone.

Each backend runs in a fresh Python process that imports what ``truscl agent run`` imports,
then does a device's model work through :class:`truscl.agent.litert.ModelRuntime`: DP-SGD
rounds on a full window (the task's defaults: 864 readings, 20 steps) and a prediction after
each. The process then reports its resident set now (VmRSS) and at its peak (VmHWM). The numpy
process is the baseline measured in the same run; the difference is what LiteRT costs.

    .venv/bin/python bench/litert.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

BACKENDS = ("numpy", "litert")


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def agent_process(backend: str, rounds: int) -> dict[str, object]:
    """A device's model work with ``backend``; its memory, and which backend really ran."""
    import truscl.agent.service  # noqa: F401 - everything the agent process loads
    from truscl.agent.litert import ModelRuntime
    from truscl.privacy.dp import DpSgdConfig, secure_generator
    from truscl.task import TaskSpec

    spec = TaskSpec(
        task="0x" + "00" * 32,
        rounds=rounds,
        quorum=1,
        he_profile="",
        context_hash="0x" + "00" * 32,
        feature_offsets=(20.0, 50.0, 500.0, 1000.0),
        feature_scales=(15.0, 50.0, 500.0, 1000.0),
    )
    dp = spec.dp
    config = DpSgdConfig(
        dp.clip_norm, dp.noise_multiplier, spec.sampling_rate, dp.local_steps, dp.learning_rate
    )
    rng = secure_generator()
    X = rng.uniform(-1, 1, (spec.window, len(spec.features)))
    y = (X @ np.array([0.5, 0.2, 1.0, 2.0]) > 0).astype(np.float64)
    runtime = ModelRuntime(backend)
    train, predict = runtime.trainer(spec), runtime.predictor(spec)
    params = np.zeros(spec.n_params)
    for _ in range(rounds):
        params = train(params, X, y, config, rng)
        predict(params, X[-1:])
    used = "litert" if runtime.litert(spec) is not None else "numpy"
    return {"backend": used, "rss_kib": status_kib("VmRSS"), "peak_kib": status_kib("VmHWM")}


def measure(backend: str, rounds: int) -> tuple[int, int]:
    """RSS and peak RSS (KiB) of a fresh agent process that ran ``backend``."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", backend, "--rounds", str(rounds)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["backend"] != backend:
        raise SystemExit(f"asked for {backend} but {result['backend']} ran: is LiteRT installed?")
    return int(result["rss_kib"]), int(result["peak_kib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(agent_process(args.child, args.rounds)))
        return
    results = {backend: measure(backend, args.rounds) for backend in BACKENDS}
    print(f"agent process after {args.rounds} rounds of DP-SGD and prediction (MiB):")
    print(f"{'backend':<8} {'RSS':>8} {'peak':>8}")
    for backend, (rss, peak) in results.items():
        print(f"{backend:<8} {rss / 1024:8.1f} {peak / 1024:8.1f}")
    added = results["litert"][0] - results["numpy"][0]
    print(f"LiteRT adds {added / 1024:.1f} MiB of RSS to the agent process")


if __name__ == "__main__":
    main()
