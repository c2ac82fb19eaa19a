"""``truscl chain``: placeholder while the group is built."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """No commands yet."""
