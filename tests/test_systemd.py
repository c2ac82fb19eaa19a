"""sd_notify and the heartbeat watchdog, against a real datagram socket standing in for systemd.

Ages come from an injected clock the tests move by hand, so whether a loop counts as hung never
depends on how fast this machine is; waits are on received datagrams and on events, bounded.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from truscl.errors import ConfigError, TrusclError
from truscl.systemd import (
    Heartbeat,
    Notifier,
    Watchdog,
    supervise,
    watchdog_interval,
    worker_items,
)

WAIT = 10.0  # bound on every wait for something another thread does


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = WAIT) -> str:
        self.socket.settimeout(timeout)
        return self.socket.recv(4096).decode()

    def wait_for(self, line: str) -> list[str]:
        """Messages up to and including the first holding ``line``."""
        seen = []
        while True:
            message = self.receive()
            seen.append(message)
            if line in message.split("\n"):
                return seen

    def drain(self) -> list[str]:
        """Everything already queued (a datagram sent is queued by the time sendto returns)."""
        self.socket.setblocking(False)
        seen = []
        try:
            while True:
                seen.append(self.socket.recv(4096).decode())
        except BlockingIOError:
            return seen


@pytest.fixture()
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.socket.close()


@pytest.fixture()
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"@truscl-test-{os.getpid()}-{threading.get_ident()}")
    yield fake
    fake.socket.close()


class Clock:
    """A monotonic clock the test moves; counts the reads made by the watchdog's thread, so a
    test can tell when the watchdog has looked at the time after a move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.watchdog_reads = 0
        self._changed = threading.Condition()

    def __call__(self) -> float:
        with self._changed:
            if threading.current_thread().name == "watchdog":
                self.watchdog_reads += 1
                self._changed.notify_all()
            return self.now

    def advance(self, seconds: float) -> int:
        """Move on; the number of watchdog reads so far (all made before the move)."""
        with self._changed:
            self.now += seconds
            return self.watchdog_reads

    def wait_reads(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.watchdog_reads >= count, WAIT)


def test_ready_status_and_stopping_arrive(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.address})

    notifier.ready("connected to\nbroker.lan")
    notifier.status("round 3")
    notifier.stopping()

    assert systemd.receive() == "READY=1\nSTATUS=connected to broker.lan"
    assert systemd.receive() == "STATUS=round 3"
    assert systemd.receive() == "STOPPING=1"


def test_the_abstract_namespace_is_reached_through_a_leading_at(
    abstract_systemd: FakeSystemd,
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": abstract_systemd.address})

    notifier.ready()
    notifier.watchdog()

    assert abstract_systemd.receive() == "READY=1"
    assert abstract_systemd.receive() == "WATCHDOG=1"


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    notifier = Notifier.from_environ({})
    stop = threading.Event()
    stop.set()

    notifier.ready("up")
    notifier.watchdog()
    assert not notifier.enabled and notifier.send("READY=1") is False
    supervise(stop, Heartbeat("loop"), environ={})  # returns at once, no error


def test_a_send_failure_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))

    with caplog.at_level(logging.WARNING, logger="truscl.systemd"):
        notifier.ready()
        notifier.watchdog()
        assert notifier.send("WATCHDOG=1") is False

    failures = [r for r in caplog.records if r.message.startswith("cannot notify systemd")]
    assert len(failures) == 1 and "nobody-listens" in failures[0].message


def test_the_interval_comes_from_watchdog_usec_for_the_named_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=43) is None
    assert watchdog_interval({}) is None
    for bad in ({"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "0"}):
        with pytest.raises(ConfigError) as raised:
            watchdog_interval(bad)
        assert isinstance(raised.value, TrusclError)


def test_a_loop_is_stale_once_its_beat_is_an_interval_old(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    sampler, rounds = Heartbeat("sampler", clock), Heartbeat("rounds", clock)
    notifier = Notifier(systemd.address)
    watchdog = Watchdog(notifier, [sampler, rounds], interval=30.0)
    assert watchdog.period == 15.0

    assert watchdog.tick() is True
    clock.advance(29.9)
    assert watchdog.tick() is True  # both just under the limit
    rounds.beat()
    clock.advance(0.1)
    with caplog.at_level(logging.WARNING, logger="truscl.systemd"):
        assert watchdog.tick() is False  # the sampler is exactly 30 s old
    assert [h.name for h, _ in watchdog.stale()] == ["sampler"]
    assert "'sampler' 30.0 s" in caplog.text and "'rounds'" not in caplog.text
    sampler.beat()
    assert watchdog.tick() is True

    assert systemd.drain() == ["WATCHDOG=1"] * 3


def _beat_in_another_process(cell: ctypes.c_double, now: float) -> None:
    Heartbeat("shard-1", clock=lambda: now, cell=cell).beat()


def test_a_loop_in_another_process_beats_a_shared_heartbeat(systemd: FakeSystemd) -> None:
    # Prepare: a heartbeat in shared memory, made here at 0 s, watched with a 30 s interval
    clock = Clock()
    shared = Heartbeat.shared("shard-1", clock)
    watchdog = Watchdog(Notifier(systemd.address), shared, interval=30.0)
    clock.advance(100.0)
    assert watchdog.tick() is False  # nothing has beaten it for 100 s

    # Execute: a process of its own beats it at 99 s on the clock (one clock for every process)
    worker = multiprocessing.get_context("spawn").Process(
        target=_beat_in_another_process, args=(shared.cell, 99.0)
    )
    worker.start()
    worker.join(60)

    # Assert: this process sees that beat; 30 s later, the heartbeat is stale again
    assert worker.exitcode == 0
    assert shared.age() == 1.0 and watchdog.tick() is True
    clock.advance(29.0)
    assert watchdog.tick() is False
    assert systemd.drain() == ["WATCHDOG=1"]


def test_watchdog_pid_of_another_process_means_no_pings(systemd: FakeSystemd) -> None:
    environ = {
        "NOTIFY_SOCKET": systemd.address,
        "WATCHDOG_USEC": "1000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    watchdog = Watchdog(Notifier.from_environ(environ), Heartbeat("loop"), environ=environ)
    stop = threading.Event()
    stop.set()

    assert watchdog.enabled is False and watchdog.tick() is False
    supervise(stop, Heartbeat("loop"), environ=environ)

    assert systemd.drain() == ["READY=1", "STOPPING=1"]


def test_a_heartbeat_needs_watching() -> None:
    with pytest.raises(ConfigError):
        Watchdog(Notifier(None), [], interval=1.0)
    with pytest.raises(ConfigError):
        Watchdog(Notifier(None), Heartbeat("loop"), interval=0.0)


def test_pings_stop_while_a_real_loop_hangs_and_resume_when_it_is_released(
    systemd: FakeSystemd,
) -> None:
    clock = Clock()
    heartbeat = Heartbeat("worker", clock)
    stop, hang, hanging, release = (threading.Event() for _ in range(4))

    def worker() -> None:
        while not stop.is_set():
            heartbeat.beat()
            if hang.is_set():
                hang.clear()
                hanging.set()
                release.wait()  # the hang: no beat until the test lets go
            stop.wait(0.001)

    environ = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "10000000"}  # 10 s of clock
    watchdog = Watchdog(Notifier.from_environ(environ), heartbeat, period=0.005, environ=environ)
    threads = [
        threading.Thread(target=worker, name="worker"),
        threading.Thread(target=watchdog.run, args=(stop,), name="watchdog"),
    ]
    for thread in threads:
        thread.start()
    try:
        assert systemd.wait_for("WATCHDOG=1")  # alive: pings arrive

        hang.set()
        assert hanging.wait(WAIT)
        seen = clock.advance(10.0)  # the worker's last beat is now 10 s old
        # Pings the watchdog decided on before it saw the new time may still be queued: once it
        # has read the clock after the move, drain them; from then on none may arrive.
        clock.wait_reads(seen + 1)
        systemd.drain()
        clock.wait_reads(clock.watchdog_reads + 20)  # twenty more checks, all while hung
        assert "WATCHDOG=1" not in "\n".join(systemd.drain())

        release.set()
        assert systemd.wait_for("WATCHDOG=1")  # it beats again: pings resume
    finally:
        stop.set()
        release.set()
        for thread in threads:
            thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)


def test_supervise_says_ready_pings_and_says_stopping(systemd: FakeSystemd) -> None:
    heartbeat = Heartbeat("loop")
    stop = threading.Event()
    environ = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "60000000"}
    supervisor = threading.Thread(
        target=supervise, args=(stop, heartbeat), kwargs={"environ": environ, "status": "up"}
    )
    supervisor.start()
    try:
        assert systemd.receive() == "READY=1\nSTATUS=up"
        assert systemd.receive() == "WATCHDOG=1"  # the first check is immediate
    finally:
        stop.set()
        supervisor.join(WAIT)
    assert not supervisor.is_alive()
    assert systemd.drain() == ["STOPPING=1"]


SERVICE = """
import signal, sys, threading
from truscl.systemd import Heartbeat, supervise

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
heartbeat = Heartbeat("loop")

def loop():
    while not stop.wait(0.01):
        heartbeat.beat()

threading.Thread(target=loop, daemon=True).start()
supervise(stop, heartbeat, status="serving")
sys.exit(0)
"""


@pytest.mark.parametrize("watchdog_usec", ["60000000", None])
def test_a_service_supervised_from_its_main_thread_stops_on_sigterm(
    systemd: FakeSystemd, watchdog_usec: str | None
) -> None:
    environ = {**os.environ, "NOTIFY_SOCKET": systemd.address}
    environ.pop("WATCHDOG_USEC", None)
    environ.pop("WATCHDOG_PID", None)
    if watchdog_usec is not None:
        environ["WATCHDOG_USEC"] = watchdog_usec
    service = subprocess.Popen([sys.executable, "-c", SERVICE], env=environ)
    try:
        assert systemd.receive(timeout=60) == "READY=1\nSTATUS=serving"
        if watchdog_usec is not None:
            assert systemd.receive() == "WATCHDOG=1"
        service.send_signal(signal.SIGTERM)
        assert systemd.receive() == "STOPPING=1"
        assert service.wait(WAIT) == 0
    finally:
        service.kill()
        service.wait()
    assert systemd.drain() == []


def test_a_notification_socket_nobody_reads_never_blocks_the_service(tmp_path: Path) -> None:
    # Prepare: a socket that is never read, so its queue fills up (Linux queues about 10)
    path = tmp_path / "unread.sock"
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unread.bind(str(path))
    notifier = Notifier(str(path))

    sent: list[bool] = []
    pinger = threading.Thread(
        target=lambda: sent.extend(notifier.send("WATCHDOG=1") for _ in range(200)), daemon=True
    )

    # Execute: far more pings than the queue holds
    pinger.start()
    pinger.join(30)

    # Assert: nothing blocked; the first pings went through, the overflow was dropped
    assert not pinger.is_alive()
    assert sent[0] is True and sent.count(False) > 0
    unread.close()


def test_a_worker_loop_ticks_when_idle_beats_on_every_turn_and_stops_on_none() -> None:
    # Prepare: a loop on an inbox with one message, its heartbeat on a clock of our own
    now = [0.0]
    heartbeat = Heartbeat("worker", clock=lambda: now[0])
    inbox: queue.Queue[str | None] = queue.Queue()
    inbox.put("message")
    items = worker_items(inbox.get, heartbeat, 0.0, "tick")
    # Execute / Assert: the message, then a tick for the empty inbox, each turn a beat
    now[0] = 5.0
    assert next(items) == "message" and heartbeat.age() == 0.0
    now[0] = 9.0
    assert next(items) == "tick" and heartbeat.age() == 0.0
    inbox.put(None)
    assert list(items) == []  # None stops the loop
