"""Child processes the demo and the tests start (mosquitto, anvil, truscl services)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM, as systemd stops a unit, then SIGKILL after ``timeout`` s; the exit code, or
    None when it had to be killed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None
    return process.returncode


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found
