"""The occupancy output: an LED or a relay that follows the global model's prediction.

The device predicts occupancy from its newest reading with the task's current global model
and drives one GPIO pin through gpiozero (``[output] pin``): on while the predicted probability
is at least the threshold. It does so whenever a newer model or a newer reading arrives, so the
pin always shows the newest model's view of the newest reading. The pin factory is the one the
sensors use, so a simulated device drives a mock pin the same way.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Self

import numpy as np
from gpiozero import DigitalOutputDevice
from gpiozero.pins import Factory

from truscl.agent.litert import ModelRuntime
from truscl.agent.sensors import Reading
from truscl.task import TaskSpec

log = logging.getLogger(__name__)


class OccupancyOutput:
    """A digital output on ``pin`` that is on while the model predicts occupancy."""

    def __init__(
        self,
        pin: int,
        pin_factory: Factory,
        runtime: ModelRuntime,
        *,
        threshold: float = 0.5,
        active_high: bool = True,
    ) -> None:
        self._device = DigitalOutputDevice(
            pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
        )
        self._runtime = runtime
        self._threshold = threshold
        self._shown: tuple[int, float] | None = None  # (model round, reading timestamp)
        self.probability: float | None = None

    @property
    def is_on(self) -> bool:
        return bool(self._device.value)

    def show(self, spec: TaskSpec, round_no: int, params: np.ndarray, reading: Reading) -> None:
        """Predict from ``reading`` with model ``round_no`` and set the pin; a model and reading
        already shown are not predicted again, and a reading with a missing value is skipped."""
        if self._shown == (round_no, reading.timestamp):
            return
        X = spec.inputs([reading])
        if not np.isfinite(X).all():
            return
        probability = float(self._runtime.predictor(spec)(params, X)[0])
        self._shown, self.probability = (round_no, reading.timestamp), probability
        on = probability >= self._threshold
        if on != self.is_on:
            log.info(
                "occupancy output %s (p=%.2f, model %d)",
                "on" if on else "off",
                probability,
                round_no,
            )
        self._device.value = on

    def close(self) -> None:
        self._device.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
