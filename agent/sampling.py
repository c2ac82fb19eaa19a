"""Read the sensors on a fixed cadence, on a thread of their own.

Readings wait in a bounded queue until the agent takes them at the start of a round; when the
agent falls behind, the oldest readings go first, since a device trains on its most recent
window anyway. A reading with a faulty sensor is accounted for in the sensors' health (logged
once per episode, written to the health file) and never queued, so the training window only
ever holds valid readings. Nothing a read raises stops the thread: sensing goes on.

A Pi's one device has a :class:`SensingThread` to itself. A process hosting many devices (the
demo's fleet puts 125 in each) shares one: a thread per device, each waking every 1.6 s, cost
such a process about 1 ms of CPU per reading in wake-ups and GIL hand-offs, against 0.15 ms for
the reading itself (per-thread CPU, measured at 1,000 devices).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from truscl.agent.health import HEALTH_FILE, HealthBook
from truscl.agent.sensors import Reading

log = logging.getLogger(__name__)


class SensingThread:
    """One thread that runs the reads of several samplers in turn, soonest due first, each
    ``interval`` seconds after its previous read ended (pacing only: the monotonic clock)."""

    def __init__(self, name: str = "sampler") -> None:
        self._due: list[tuple[float, int, Sampler]] = []  # a heap
        self._order = itertools.count()  # ties: first added first
        self._members: set[Sampler] = set()
        self._current: Sampler | None = None
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def add(self, sampler: Sampler) -> None:
        """Sample ``sampler`` from now on, first at once."""
        with self._changed:
            self._members.add(sampler)
            heapq.heappush(self._due, (time.monotonic(), next(self._order), sampler))
            if not self._thread.is_alive() and not self._stopped:
                self._thread.start()
            self._changed.notify_all()

    def remove(self, sampler: Sampler) -> None:
        """Sample ``sampler`` no more; returns once a read of it under way has ended."""
        with self._changed:
            self._members.discard(sampler)
            self._due = [entry for entry in self._due if entry[2] is not sampler]
            heapq.heapify(self._due)
            self._changed.wait_for(lambda: self._current is not sampler, timeout=10)

    def includes(self, sampler: Sampler) -> bool:
        with self._changed:
            return sampler in self._members

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        with self._changed:
            while not self._stopped:
                if not self._due:
                    self._changed.wait()
                    continue
                delay = self._due[0][0] - time.monotonic()
                if delay > 0:
                    self._changed.wait(delay)
                    continue
                sampler = self._current = heapq.heappop(self._due)[2]
                self._changed.release()
                try:
                    sampler.sample()
                finally:
                    self._changed.acquire()
                self._current = None
                if sampler in self._members:
                    due = time.monotonic() + sampler.interval
                    heapq.heappush(self._due, (due, next(self._order), sampler))
                self._changed.notify_all()


class Sampler:
    """``read`` every ``interval`` seconds; ``history`` (readings taken before) is judged and
    queued first. With a ``state_folder`` the sensors' health is kept in its ``sensors.json``.
    The reads run on ``thread`` when one is given (shared by the devices of a process), else
    on a thread of this sampler's own.
    """

    def __init__(
        self,
        read: Callable[[], Reading],
        interval: float,
        capacity: int,
        name: str = "sampler",
        history: list[Reading] | None = None,
        state_folder: Path | None = None,
        thread: SensingThread | None = None,
    ) -> None:
        if interval <= 0 or capacity < 1:
            raise ValueError("the interval must be positive and the capacity at least 1")
        self.interval = interval
        self.failures = 0
        self.health = HealthBook(None if state_folder is None else Path(state_folder) / HEALTH_FILE)
        self._read = read
        self._queue: deque[Reading] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._own_thread = thread is None
        self._thread = SensingThread(name) if thread is None else thread
        for reading in history or ():
            self._take(reading)

    def start(self) -> Sampler:
        self._thread.add(self)
        return self

    def stop(self) -> None:
        """No read starts after this returns, and none is under way."""
        self._thread.remove(self)
        if self._own_thread:
            self._thread.stop()

    @property
    def running(self) -> bool:
        return self._thread.running and self._thread.includes(self)

    def drain(self) -> list[Reading]:
        """The valid readings taken since the last call, oldest first."""
        with self._lock:
            readings = list(self._queue)
            self._queue.clear()
        return readings

    def sample(self) -> Reading | None:
        """Read once and account for it: what the thread does every interval, callable by a
        test or a benchmark that drives time itself. None when the read itself failed."""
        try:
            reading = self._read()
        except Exception:  # a bug in one read must not end sensing for good
            self.failures += 1
            log.exception("sensor read failed (%d so far)", self.failures)
            return None
        self._take(reading)
        return reading

    def _take(self, reading: Reading) -> None:
        self.health.record(reading.timestamp, reading.faults)
        if reading.valid:
            with self._lock:
                self._queue.append(reading)
