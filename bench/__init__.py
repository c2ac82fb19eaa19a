"""truscl's benchmarks (issue 9): each module measures its figures against a baseline measured in
the same run, and ``python -m bench`` runs them all and sets each figure beside its target.

A benchmark module is one of :data:`MODULES`; it offers

- ``figures(quick: bool) -> dict[str, Any]`` (``measure`` in bench/wire.py; bench/learning.py's
  ``run`` is called as its ``main`` does): its figures, JSON-ready, under the issue's keys (a
  number, or a mapping such as ``{"10": ..., "100": ...}`` per device count or profile), plus
  whatever context a reader needs (baselines, parts, how the run was made);
- optionally ``TARGETS`` with :class:`Target` values for its keys, merged into :data:`TARGETS`.

The import of a module and its ``figures`` stay cheap to start: heavy imports go inside the
function, so that one benchmark's imports never weigh on another's figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Every benchmark the issue names, in the order the table shows them. A module not (yet) in the
# tree is reported as not run, by name, never skipped in silence.
MODULES = ("device", "aggregator", "wire", "round_latency", "learning", "litert", "peers")


@dataclass(frozen=True)
class Target:
    """A figure's target: at most (or at least) ``limit`` ``unit``."""

    limit: float
    unit: str
    at_most: bool = True

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:g} {self.unit}".rstrip()


# The targets; modules may add their own (``TARGETS`` in the module).
TARGETS: dict[str, Target] = {
    "device_round_s": Target(0.100, "s"),
    "device_import_s": Target(2.0, "s"),
    "device_rss_mb": Target(100.0, "MB"),
    "device_rss_with_litert_mb": Target(100.0, "MB"),
    "aggregator_updates_per_s": Target(1000.0, "/s", at_most=False),
    "service_updates_per_s": Target(1000.0, "/s", at_most=False),
    "rss_spread": Target(0.10, ""),  # aggregator RSS, 10 to 1,000 devices: within +-10 %
    "hard_task_best_ratio": Target(0.95, "", at_most=False),
    "epsilon_max": Target(8.0, ""),
}

# The keys the issue requires in the JSON, with the module expected to give each.
REQUIRED_KEYS = {
    "device_round_s": "device",
    "device_import_s": "device",
    "device_rss_mb": "device",
    "aggregator_updates_per_s": "aggregator",
    "aggregator_rss_mb": "aggregator",
    "bytes_per_param": "wire",
    "round_latency_s": "round_latency",
    "gas_per_round": "round_latency",
}


def as_rows(key: str, value: Any, depth: int = 2) -> list[tuple[str, float]]:
    """The numbers a figure holds, one row each: ``key`` itself, or ``key[sub]`` per entry of
    a mapping (``key[sub][subsub]`` one level deeper, as bytes per parameter by profile and size).
    """
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(key, float(value))]
    if isinstance(value, dict) and depth > 0:  # deeper structures stay in the JSON alone
        return [row for sub, v in value.items() for row in as_rows(f"{key}[{sub}]", v, depth - 1)]
    return []
