"""Run a real mosquitto broker as a child process, for the demo, the tests and a provisioned
deployment's configuration run in the foreground."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from truscl.errors import ConfigError, TrusclError
from truscl.mqtt import BrokerSettings
from truscl.processes import stop_process

# Addresses a listener binds to that are not themselves reachable: reach them through loopback.
ANY_ADDRESS = ("", "0.0.0.0", "::")


class BrokerFailed(TrusclError, RuntimeError):
    """mosquitto did not start or stopped unexpectedly."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now, and never one this process was given
    before: a service started from an earlier answer may not have bound it yet."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def listener_of(config: Path) -> tuple[str, int]:
    """The (host to reach, port) of the first ``listener`` line of a mosquitto configuration,
    so that a provisioned file is the one place its port is written."""
    try:
        lines = Path(config).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{config}: cannot read: {exc.strerror}") from None
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words and words[0] == "listener":
            if len(words) < 2 or not words[1].isdigit():
                raise ConfigError(f"{config}: malformed listener line {line.strip()!r}")
            bind = words[2] if len(words) > 2 else ""
            return ("127.0.0.1" if bind in ANY_ADDRESS else bind), int(words[1])
    raise ConfigError(f"{config}: no listener line")


class Mosquitto:
    """``mosquitto -c FILE`` in the foreground, stopped on ``stop()``.

    By default it writes its own FILE for an anonymous, plain-TCP broker on 127.0.0.1 (the demo
    and most tests); :meth:`provisioned` runs a file ``truscl broker provision`` wrote instead.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        config: Path | None = None,
        persistent: bool = False,
    ) -> None:
        """``persistent``: the anonymous broker keeps retained messages and sessions in
        ``workdir`` across its restarts, as a deployed one does (a provisioned configuration
        always does)."""
        self.workdir = Path(workdir)
        self.persistent = persistent
        self.config = None if config is None else Path(config).resolve()
        if self.config is None:
            self.host = "127.0.0.1"
            self.port = port or free_port()
        else:
            if port is not None:
                raise ConfigError("a provisioned broker's port is the one its configuration names")
            self.host, self.port = listener_of(self.config)
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def provisioned(cls, config: Path) -> Mosquitto:
        """The broker a provisioned ``mosquitto.conf`` describes (TLS, logins, ACL)."""
        return cls(Path(config).resolve().parent, config=config)

    @property
    def settings(self) -> BrokerSettings:
        """How a client reaches this (anonymous, plain TCP) broker."""
        if self.config is not None:
            raise ConfigError(
                "a provisioned broker has one login per identity: use Provisioned.settings(name)"
            )
        return BrokerSettings(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise ConfigError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        config = self.config or self._write_anonymous_config()
        self._process = subprocess.Popen(
            [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise BrokerFailed(f"mosquitto exited with {self._process.returncode}: {err}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerFailed(f"mosquitto did not listen on {self.port} within {timeout}s")

    def _write_anonymous_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            # As root, mosquitto would drop to the `mosquitto` user, which cannot write its
            # persistence file or log in a folder this process made: it stays who started it.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {self.workdir}/\n"
                if self.persistent
                else "persistence false\n"
            )
            + "max_queued_messages 10000\n"
            "log_type error\nlog_type warning\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
        )
        return config

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, 5)
        self._process = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
