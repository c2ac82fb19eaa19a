"""Read the sensors on a fixed cadence, on a thread of its own.

Readings wait in a bounded queue until the agent takes them at the start of a round; when the
agent falls behind, the oldest readings go first, since a device trains on its most recent
window anyway. A reading with a faulty sensor is accounted for in the sensors' health (logged
once per episode, written to the health file) and never queued, so the training window only
ever holds valid readings. Nothing a read raises stops the thread: sensing goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from truscl.agent.health import HEALTH_FILE, HealthBook
from truscl.agent.sensors import Reading

log = logging.getLogger(__name__)


class Sampler:
    """``read`` every ``interval`` seconds; ``history`` (readings taken before) is judged and
    queued first. With a ``state_folder`` the sensors' health is kept in its ``sensors.json``.
    """

    def __init__(
        self,
        read: Callable[[], Reading],
        interval: float,
        capacity: int,
        name: str = "sampler",
        history: list[Reading] | None = None,
        state_folder: Path | None = None,
    ) -> None:
        if interval <= 0 or capacity < 1:
            raise ValueError("the interval must be positive and the capacity at least 1")
        self.interval = interval
        self.failures = 0
        self.health = HealthBook(None if state_folder is None else Path(state_folder) / HEALTH_FILE)
        self._read = read
        self._queue: deque[Reading] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        for reading in history or ():
            self._take(reading)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

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

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
