"""Child processes the demo and the tests start (mosquitto, anvil, truscl services)."""

from __future__ import annotations

import subprocess


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
