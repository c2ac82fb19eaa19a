"""systemd's service protocol: readiness, status and a watchdog that only pings for live loops.

The units in ``systemd/`` are ``Type=notify`` with ``WatchdogSec=``: systemd waits for
``READY=1`` before it counts a service as started (so ``After=`` ordering and ``systemctl
start`` mean "connected", not "forked"), and restarts it when ``WATCHDOG=1`` stops arriving.
A watchdog that pings from a timer thread of its own would prove only that the timer runs; here
every worker loop of a service owns a :class:`Heartbeat` and beats it on each iteration, and
:class:`Watchdog` pings only while every heartbeat is fresh, so a hung MQTT callback, a
deadlocked round or a stuck sensor read gets the service restarted.

Standard library only: every role imports this, the Raspberry Pi agent included, and the
protocol is one datagram per message (``sd_notify(3)``), so libsystemd is not needed.

A service's ``run`` command, on its main thread::

    stop = stop_on_signals()
    heartbeat = Heartbeat("rounds")
    service = start_service(config, heartbeat, stop)   # its loops call heartbeat.beat()
    supervise(stop, [heartbeat], status="connected to broker.lan")
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

from truscl.errors import ConfigError

__all__ = [
    "FROM_ENVIRONMENT",
    "Heartbeat",
    "Notifier",
    "Watchdog",
    "supervise",
    "watchdog_interval",
]

log = logging.getLogger(__name__)


class _Default(enum.Enum):
    FROM_ENVIRONMENT = enum.auto()


FROM_ENVIRONMENT = _Default.FROM_ENVIRONMENT
"""Watchdog's default interval: whatever systemd put in ``$WATCHDOG_USEC``."""


class Notifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET``; does nothing outside systemd.

    A failed send is logged once and otherwise ignored: a service that cannot reach systemd
    should keep serving (systemd will time out the start or the watchdog by itself), not crash
    on its status line.
    """

    def __init__(self, address: str | None) -> None:
        """``address``: the socket's path, ``@name`` for the abstract namespace, or None."""
        self._address: str | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through ``$NOTIFY_SOCKET`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to send to (False when not run by systemd)."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent (False if disabled)."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    # Never wait on the receiver: a full queue (a notification socket nobody
                    # reads) drops the message with EAGAIN instead of hanging the service.
                    self._socket.setblocking(False)
                self._socket.sendto(message, self._address)
            except OSError as error:
                if not self._failed:
                    self._failed = True
                    log.warning("cannot notify systemd at %r: %s", self._address, error)
                return False
        return True

    def ready(self, status: str = "") -> None:
        """The service is up (connected, subscribed): systemd's start job completes."""
        self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def stopping(self) -> None:
        """The service is shutting down on purpose: systemd will not call it a failure."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """Keep-alive: the service is healthy for another ``WatchdogSec``."""
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Free text shown by ``systemctl status`` (one line)."""
        self.send(f"STATUS={_one_line(text)}")

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.splitlines())


class Heartbeat:
    """When a worker loop last went round: it calls :meth:`beat` on every iteration.

    Idle iterations beat too (a loop waiting for MQTT messages or the next sample beats on each
    wake-up), so loops must wake at least every ``WatchdogSec / 2`` to stay fresh.

    A loop in another process (a worker the service started) beats a heartbeat made by
    :meth:`shared`, whose last beat lives in shared memory: the service's watchdog then sees a
    hung worker as it sees a hung thread. ``CLOCK_MONOTONIC`` is one clock for every process.
    """

    def __init__(
        self,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        cell: ctypes.c_double | None = None,
    ) -> None:
        """``clock``: seconds on a monotonic scale, injectable for tests. ``cell``: the shared
        double that holds the last beat (:attr:`cell` of a :meth:`shared` heartbeat, handed to
        the process whose loop beats it); a beat is one aligned 8-byte store, so it needs no
        lock."""
        self.name = name
        self._clock = clock
        self.cell = cell
        self._last = clock()
        if cell is not None:
            cell.value = self._last

    @classmethod
    def shared(cls, name: str, clock: Callable[[], float] = time.monotonic) -> Heartbeat:
        """A heartbeat another process can beat: hand it :attr:`cell` (to a ``spawn``
        ``Process`` as an argument) and build ``Heartbeat(name, cell=cell)`` there."""
        from multiprocessing import sharedctypes  # here: the device never needs it

        cell: ctypes.c_double = sharedctypes.RawValue(ctypes.c_double)
        return cls(name, clock, cell=cell)

    def beat(self) -> None:
        if self.cell is not None:
            self.cell.value = self._clock()
        else:
            self._last = self._clock()  # one attribute store: atomic under the GIL

    def age(self) -> float:
        """Seconds since the last beat (since creation before the first one)."""
        last = self.cell.value if self.cell is not None else self._last
        return max(0.0, self._clock() - last)

    def __repr__(self) -> str:
        return f"Heartbeat({self.name!r}, age={self.age():.1f})"


T = TypeVar("T")


def worker_items(
    get: Callable[..., T | None], heartbeat: Heartbeat | None, tick_s: float, tick: T
) -> Iterator[T]:
    """A service's worker loop over its inbox's ``get`` (``queue.Queue.get``'s, raising
    ``queue.Empty``): each item until ``None`` (stop), and ``tick`` when none came within
    ``tick_s`` (so that timers are looked at); the loop's heartbeat beats on every turn, idle
    ones included, as :class:`Heartbeat` asks."""
    while True:
        try:
            item = get(timeout=tick_s)
        except queue.Empty:
            item = tick
        if item is None:
            return
        if heartbeat is not None:
            heartbeat.beat()
        yield item


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """systemd's watchdog interval in seconds, or None when it asks for no watchdog.

    ``$WATCHDOG_USEC`` is set when the unit has ``WatchdogSec=``; ``$WATCHDOG_PID``, when set,
    names the one process that should ping (``sd_watchdog_enabled(3)``): any other process,
    such as a child that inherited the environment, must not.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    target = env.get("WATCHDOG_PID")
    if target:
        own = os.getpid() if pid is None else pid
        try:
            if int(target) != own:
                return None
        except ValueError:
            raise ConfigError(f"WATCHDOG_PID={target!r} is not a process id") from None
    try:
        micros = int(usec)
    except ValueError:
        raise ConfigError(f"WATCHDOG_USEC={usec!r} is not a number of microseconds") from None
    if micros <= 0:
        raise ConfigError(f"WATCHDOG_USEC={usec!r} must be positive")
    return micros / 1_000_000


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``period`` while every heartbeat is younger than ``interval``.

    Once any loop stops beating for ``interval`` seconds the pings stop, and systemd, seeing no
    ping for ``WatchdogSec``, kills the service and restarts it (``Restart=on-failure``). A
    loop that recovers before then makes the pings resume.
    """

    def __init__(
        self,
        notifier: Notifier,
        heartbeats: Heartbeat | Iterable[Heartbeat],
        interval: float | _Default | None = FROM_ENVIRONMENT,
        *,
        period: float | None = None,
        environ: Mapping[str, str] | None = None,
        pid: int | None = None,
    ) -> None:
        """``interval``: seconds, None for no watchdog, or read from ``environ`` (whose
        ``$WATCHDOG_PID`` is compared with ``pid``, default this process). ``period``: seconds
        between pings, default half the interval (systemd's own advice)."""
        self.notifier = notifier
        beats = [heartbeats] if isinstance(heartbeats, Heartbeat) else list(heartbeats)
        if not beats:
            raise ConfigError("a watchdog needs at least one heartbeat to watch")
        self.heartbeats: Sequence[Heartbeat] = tuple(beats)
        if interval is FROM_ENVIRONMENT:
            interval = watchdog_interval(environ, pid)
        if interval is not None and interval <= 0:
            raise ConfigError(f"watchdog interval must be > 0, not {interval}")
        self.interval: float | None = interval
        if period is not None and period <= 0:
            raise ConfigError(f"watchdog period must be > 0, not {period}")
        self.period: float | None = (
            None if interval is None else (period if period is not None else interval / 2)
        )
        self._stale: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def stale(self) -> list[tuple[Heartbeat, float]]:
        """The heartbeats (with their ages) that are as old as the interval or older."""
        if self.interval is None:
            return []
        ages = [(heartbeat, heartbeat.age()) for heartbeat in self.heartbeats]
        return [(heartbeat, age) for heartbeat, age in ages if age >= self.interval]

    def tick(self) -> bool:
        """One check: ping if every loop is fresh. True if it pinged."""
        if self.interval is None:
            return False
        stale = self.stale()
        names = tuple(heartbeat.name for heartbeat, _ in stale)
        if stale:
            if names != self._stale:
                ages = ", ".join(f"{heartbeat.name!r} {age:.1f} s" for heartbeat, age in stale)
                log.warning(
                    "withholding the watchdog ping: no beat for %s (limit %.1f s); "
                    "systemd restarts the service if it does not recover",
                    ages,
                    self.interval,
                )
            self._stale = names
            return False
        if self._stale:
            log.info("every loop beats again: watchdog pings resume")
            self._stale = ()
        self.notifier.watchdog()
        return True

    def run(self, stop: threading.Event) -> None:
        """Check and ping every period until ``stop`` is set (just wait if there is no
        watchdog)."""
        if self.period is None:
            stop.wait()
            return
        while not stop.is_set():
            self.tick()
            if stop.wait(self.period):
                break


def supervise(
    stop: threading.Event,
    heartbeats: Heartbeat | Iterable[Heartbeat],
    notifier: Notifier | None = None,
    *,
    status: str = "",
    environ: Mapping[str, str] | None = None,
) -> None:
    """Tell systemd the service is ready, run the watchdog until ``stop``, then say it stops.

    Call it from the main thread once the service is connected (its workers running and
    beating): READY=1 is what ``Type=notify`` waits for. It returns when ``stop`` is set (by
    ``SIGTERM``, say), having sent STOPPING=1 so that the shutdown that follows is not taken
    for a hang. ``notifier`` and ``environ`` default to what systemd put in the environment.
    """
    notifier = Notifier.from_environ(environ) if notifier is None else notifier
    watchdog = Watchdog(notifier, heartbeats, environ=environ)
    notifier.ready(status)
    try:
        watchdog.run(stop)
    finally:
        notifier.stopping()
