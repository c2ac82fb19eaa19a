"""``truscl demo``: the deployment a user runs, started on one machine.

By default every role is its own OS process with its own configuration, exactly as the
services are deployed (:mod:`truscl.demo.fleet`); ``--in-process`` runs them all as threads of
this process on the in-process EVM (:mod:`truscl.demo.inprocess`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TextIO

from truscl.demo.common import WINDOW, DemoConfig, DemoFailed, occupancy_spec

__all__ = ["WINDOW", "DemoConfig", "DemoFailed", "occupancy_spec", "run_demo"]


def run_demo(config: DemoConfig, out: TextIO) -> dict[str, Any]:
    if config.in_process:
        from truscl.demo.inprocess import run_in_process

        return run_in_process(config, out)
    from truscl.demo.data import demo_data
    from truscl.demo.fleet import run_fleet

    data = demo_data(config)  # a trace split by its device column sets the number of devices
    return run_fleet(replace(config, devices=data.devices), data, out)
