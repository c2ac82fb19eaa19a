"""The device agent's memory with LiteRT loaded and a model running, against numpy alone.

Each backend runs in a fresh Python process that imports what ``truscl agent run`` imports,
then does a device's model work through :class:`truscl.agent.litert.ModelRuntime`: DP-SGD
rounds on a full window (the task's defaults: 864 readings, 20 steps) and a prediction after
each. The process then reports its resident set now (VmRSS) and at its peak (VmHWM), and the
seconds a round's training took. The numpy process is the baseline measured in the same run;
the difference is what LiteRT costs.

    .venv/bin/python bench/litert.py [--rounds 5] [--hidden 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np

BACKENDS = ("numpy", "litert")


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def agent_process(backend: str, rounds: int, hidden: tuple[int, ...]) -> dict[str, object]:
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
        model="mlp" if hidden else "logistic",
        hidden=hidden,
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
    params = spec.make_model().init_params()
    started = time.perf_counter()
    for _ in range(rounds):
        params = train(params, X, y, config, rng)
        predict(params, X[-1:])
    seconds = (time.perf_counter() - started) / rounds
    used = "litert" if runtime.litert(spec) is not None else "numpy"
    return {
        "backend": used,
        "rss_kib": status_kib("VmRSS"),
        "peak_kib": status_kib("VmHWM"),
        "round_s": seconds,
    }


def measure(backend: str, rounds: int, hidden: tuple[int, ...]) -> tuple[int, int, float]:
    """RSS and peak RSS (KiB) of a fresh agent process that ran ``backend``, and the seconds
    of one round's training and prediction."""
    sizes = [str(n) for n in hidden]
    out = subprocess.run(
        [sys.executable, __file__, "--child", backend, "--rounds", str(rounds), "--hidden", *sizes],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["backend"] != backend:
        raise SystemExit(f"asked for {backend} but {result['backend']} ran: is LiteRT installed?")
    return int(result["rss_kib"]), int(result["peak_kib"]), float(result["round_s"])


def figures(quick: bool) -> dict[str, Any]:
    """For ``python -m bench``: the agent's RSS with each backend (logistic model), in MB."""
    rounds = 2 if quick else 5
    results = {backend: measure(backend, rounds, ()) for backend in BACKENDS}
    return {
        "device_rss_with_litert_mb": results["litert"][0] / 1024,
        "device_rss_with_numpy_mb": results["numpy"][0] / 1024,
        "litert_adds_mb": (results["litert"][0] - results["numpy"][0]) / 1024,
        "round_s_by_backend": {backend: r[2] for backend, r in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="*", default=[], help="an mlp's layers")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hidden = tuple(args.hidden)
    if args.child:
        print(json.dumps(agent_process(args.child, args.rounds, hidden)))
        return
    results = {backend: measure(backend, args.rounds, hidden) for backend in BACKENDS}
    model = f"mlp {list(hidden)}" if hidden else "logistic"
    print(f"agent process after {args.rounds} rounds of DP-SGD and prediction, {model} model:")
    print(f"{'backend':<8} {'RSS MiB':>8} {'peak MiB':>9} {'s/round':>8}")
    for backend, (rss, peak, seconds) in results.items():
        print(f"{backend:<8} {rss / 1024:8.1f} {peak / 1024:9.1f} {seconds:8.4f}")
    added = results["litert"][0] - results["numpy"][0]
    print(f"LiteRT adds {added / 1024:.1f} MiB of RSS to the agent process")


if __name__ == "__main__":
    main()
