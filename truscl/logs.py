"""How the services log: text for a terminal, or one JSON object per line for a collector.

``--log-format json`` gives each record as ``{"time", "level", "logger", "message"}`` plus
whatever the record carries in ``extra=`` and, on a failure, the traceback as ``exception``.
The message is formatted before it is written, so ``%`` arguments never leave unformatted.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has: anything else on a record came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str = "text", stream: TextIO = sys.stderr) -> None:
    """Set the root logger up for a command: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def current() -> tuple[str, str]:
    """The level and format :func:`configure` set, for a child process to log alike."""
    root = logging.getLogger()
    json_out = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    return logging.getLevelName(root.level), "json" if json_out else "text"
