"""``python -m bench [--quick] [--json FILE] [--only NAME ...]``: every benchmark, one table.

Runs each module of :data:`bench.MODULES` that exists, one after the other (they measure time
and memory: running two at once would spoil both), prints one table with each figure beside its
target, and writes every figure to ``--json``. A module not in the tree, or one that fails, is
named in the table and in the JSON's ``not_run`` (the required keys it would have given in
``missing_keys``); the exit status is 1 if a module failed or one that ran left out a key the
issue requires. Targets are reported, not enforced: a missed target does not fail the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import MODULES, REQUIRED_KEYS, TARGETS, Target, as_rows

if TYPE_CHECKING:
    from truscl.progress import Progress


def run(names: tuple[str, ...], quick: bool) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Figures by module, and why each module that gave none did not run."""
    from truscl.progress import Progress  # rich: not on a device, where bench.device reports

    results: dict[str, dict[str, Any]] = {}
    not_run: dict[str, str] = {}
    with Progress("bench", len(names), plain=False) as progress:  # a bar on a terminal
        for name in names:
            _run_one(name, quick, results, not_run, progress)
            progress.advance(name)
    return results, not_run


def _run_one(
    name: str,
    quick: bool,
    results: dict[str, dict[str, Any]],
    not_run: dict[str, str],
    progress: Progress,
) -> None:
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise  # the module exists and lacks a dependency: that is a failure, not absence
        not_run[name] = "no such module in bench/"
        return
    started = time.perf_counter()
    progress.print(f"bench: running {name} ...", sys.stderr)
    try:
        results[name] = _entry(name, module)(quick)
    except Exception as exc:
        traceback.print_exc()
        not_run[name] = f"failed: {type(exc).__name__}: {exc}"
        return
    targets = getattr(module, "TARGETS", {})
    TARGETS.update({k: v for k, v in targets.items() if isinstance(v, Target)})
    progress.print(f"bench: {name} took {time.perf_counter() - started:.0f} s", sys.stderr)


def _entry(name: str, module: Any) -> Callable[[bool], dict[str, Any]]:
    """The function that gives a module's figures (see :mod:`bench`)."""
    if name == "learning":  # as its main() calls it
        return lambda quick: dict(
            module.run(devices=2, seeds=[1], quick=True)
            if quick
            else module.run(devices=5, seeds=[1, 2, 3], quick=False)
        )
    entry: Callable[[bool], dict[str, Any]] = getattr(module, "figures", None) or module.measure
    return entry


def table(results: dict[str, dict[str, Any]], not_run: dict[str, str]) -> str:
    """One row per figure that has a number: value, target and whether it is met."""
    rows = [("figure", "value", "target", "met")]
    for figures in results.values():
        for key, value in figures.items():
            target: Target | None = TARGETS.get(key)
            for label, number in as_rows(key, value):
                met = "-" if target is None else ("yes" if target.met(number) else "NO")
                rows.append((label, f"{number:.4g}", str(target) if target else "-", met))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"not run: {name} ({why})" for name, why in not_run.items()]
    for figures in results.values():  # parts of a module that did not run (a device count)
        for key, value in figures.items():
            if key.endswith("_not_run") and isinstance(value, dict):
                lines += [
                    f"not run: {key.removesuffix('_not_run')}[{sub}] ({why})"
                    for sub, why in value.items()
                ]
    return "\n".join(line.rstrip() for line in lines)


def report(
    results: dict[str, dict[str, Any]],
    json_file: Path | None,
    not_run: dict[str, str] | None = None,
) -> int:
    """Print the table, write the JSON; 1 if a key the issue requires is missing."""
    not_run = dict(not_run or {})
    merged: dict[str, Any] = {}
    for figures in results.values():
        merged.update(figures)
    print(table(results, not_run))
    missing = [
        key for key, module in REQUIRED_KEYS.items() if key not in merged and module in results
    ]
    absent = sorted(key for key, module in REQUIRED_KEYS.items() if module not in results)
    if json_file is not None:
        document = {
            **merged,
            "figure_targets": {key: str(target) for key, target in TARGETS.items()},
            "not_run": not_run,
            "missing_keys": sorted(missing + absent),
        }
        json_file.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    if missing:
        print(f"bench: modules that ran did not give {', '.join(missing)}", file=sys.stderr)
    failed = [name for name, why in not_run.items() if why.startswith("failed")]
    return 1 if missing or failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description="truscl's benchmarks, each figure beside its target"
    )
    parser.add_argument("--quick", action="store_true", help="small and fast (CI)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    parser.add_argument(
        "--only", nargs="+", choices=MODULES, metavar="NAME", help=f"of {', '.join(MODULES)}"
    )
    args = parser.parse_args()
    results, not_run = run(tuple(args.only or MODULES), args.quick)
    return report(results, args.json, not_run)


if __name__ == "__main__":
    sys.exit(main())
