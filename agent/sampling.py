"""Read the sensors on a fixed cadence, on a thread of its own.

Readings wait in a bounded queue until the agent takes them at the start of a round; when the
agent falls behind, the oldest readings go first, since a device trains on its most recent
window anyway. A sensor that fails is logged and skipped: one bad read must not stop sensing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from truscl.agent.sensors import Reading

log = logging.getLogger(__name__)


class Sampler:
    def __init__(
        self,
        read: Callable[[], Reading],
        interval: float,
        capacity: int,
        name: str = "sampler",
        history: list[Reading] | None = None,
    ) -> None:
        if interval <= 0 or capacity < 1:
            raise ValueError("the interval must be positive and the capacity at least 1")
        self.interval = interval
        self.failures = 0
        self._read = read
        self._queue: deque[Reading] = deque(history or (), maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def drain(self) -> list[Reading]:
        """The readings taken since the last call, oldest first."""
        with self._lock:
            readings = list(self._queue)
            self._queue.clear()
        return readings

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reading = self._read()
            except OSError as exc:  # SensorError is an OSError, and so are bus errors
                self.failures += 1
                log.warning("sensor read failed (%d so far): %s", self.failures, exc)
            else:
                with self._lock:
                    self._queue.append(reading)
            self._stop.wait(self.interval)
