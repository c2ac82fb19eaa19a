"""How long ``truscl demo`` takes, against the 3-minute target and a compute floor.

The floor is measured in the same run: the same devices doing the same local work (DP-SGD on
their window, encryption, signing) serially in one thread, with no broker, chain, aggregation
or owner. The ratio shows what the distributed protocol costs on top of the unavoidable work.

    .venv/bin/python bench/demo_time.py [--devices 5] [--rounds 10]

Exit status 1 if the demo misses the target.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import time

import numpy as np
from eth_account import Account

from truscl.demo import WINDOW, DemoConfig, run_demo
from truscl.learning import LogisticModel
from truscl.privacy.ckks import OwnerKeys, encrypt, load_context
from truscl.privacy.dp import DpSgdConfig, clip_by_l2, dp_sgd, secure_generator
from truscl.task import DpTerms
from truscl.wire import Domain, Update

TARGET_S = 180.0


def compute_floor(devices: int, rounds: int, dp: DpTerms) -> float:
    """Seconds for every device's local work of every round, done serially."""
    rng = secure_generator()
    model = LogisticModel(4)
    context = load_context(OwnerKeys.generate().public_context_bytes())
    X = rng.normal(size=(WINDOW, 4))
    y = (rng.random(WINDOW) < 0.3).astype(np.float64)
    config = DpSgdConfig(
        dp.clip_norm, dp.noise_multiplier, dp.batch_size / WINDOW, dp.local_steps, dp.learning_rate
    )
    accounts = [Account.create() for _ in range(devices)]
    domain = Domain(31337, "0x" + "11" * 20)
    started = time.perf_counter()
    params = model.init_params()
    for round_no in range(1, rounds + 1):
        for account in accounts:
            delta = clip_by_l2(dp_sgd(model, params, X, y, config, rng) - params, dp.update_clip)
            Update(
                task=b"\x01" * 32,
                round=round_no,
                device=bytes.fromhex(account.address[2:]),
                ciphertext=encrypt(context, delta),
                context=b"\x02" * 32,
                samples=WINDOW,
                epsilon_micros=0,
                data_root=os.urandom(32),
            ).signed(account, domain).encode()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    floor = compute_floor(args.devices, args.rounds, DpTerms())
    started = time.perf_counter()
    summary = run_demo(DemoConfig(devices=args.devices, rounds=args.rounds), out=io.StringIO())
    total = time.perf_counter() - started
    per_round = [r["seconds"] for r in summary["rounds"]]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"demo ({args.devices} devices, {args.rounds} rounds): {total:.1f} s in all")
    print(f"  set-up, test set and baseline: {total - sum(per_round):.1f} s")
    print(f"  per round: median {statistics.median(per_round):.2f} s, max {max(per_round):.2f} s")
    print(f"  peak RSS of the whole process: {rss_mb:.0f} MB")
    print(f"compute floor (same local work, serial, no protocol): {floor:.2f} s")
    print(f"protocol overhead per round: {(sum(per_round) - floor) / args.rounds:.2f} s")
    print(f"target: {TARGET_S:.0f} s -> {'met' if total <= TARGET_S else 'MISSED'}")
    return 0 if total <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
