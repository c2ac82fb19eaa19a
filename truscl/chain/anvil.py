"""Run anvil (Foundry's development node, from the npm package ``@foundry-rs/anvil``) as a child
process on 127.0.0.1, for the demo and the tests.

``scripts/setup`` installs it into ``contracts/node_modules``; ``TRUSCL_ANVIL`` or ``anvil`` on
the PATH take precedence, so an installed truscl can use a Foundry installation.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from truscl.broker import free_port
from truscl.errors import ChainError, ConfigError
from truscl.processes import stop_process

_SOURCE_TREE = Path(__file__).resolve().parents[2] / "contracts" / "node_modules" / ".bin" / "anvil"


def find_anvil() -> Path:
    for candidate in (os.environ.get("TRUSCL_ANVIL"), shutil.which("anvil"), str(_SOURCE_TREE)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ConfigError(
        "anvil is not installed: run scripts/setup (it runs `npm ci` in contracts/), "
        "or set TRUSCL_ANVIL to an anvil binary"
    )


class Anvil:
    """``anvil`` on a free port of 127.0.0.1; its first account is unlocked and funded."""

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Anvil:
        out = self._log.open("ab") if self._log else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [str(find_anvil()), "--host", "127.0.0.1", "--port", str(self.port), "--silent"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise ChainError(f"anvil exited with {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ChainError(
                        f"anvil did not listen on {self.port} within {timeout}s"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, 10)
        self._process = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
