"""Compiled contracts of truscl, shipped as package data so Python never needs Node.

The JSON artifacts under ``build/`` are written by ``build.mjs`` and committed; rebuild them with
``npm ci && npm run build`` in this folder after changing a ``.sol`` file.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_artifact(name: str = "Truscl") -> dict[str, Any]:
    """ABI, bytecode and compiler settings of contract ``name``."""
    text = resources.files(__name__).joinpath("build", f"{name}.json").read_text("utf-8")
    artifact: dict[str, Any] = json.loads(text)
    return artifact
