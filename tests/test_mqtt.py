"""The MQTT link across a broker outage, on a real mosquitto."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from truscl.broker import Mosquitto
from truscl.mqtt import MqttLink

pytestmark = pytest.mark.slow


def test_publishing_while_the_broker_is_away_never_breaks_the_link(tmp_path: Path) -> None:
    # Prepare: a subscriber and a publisher on a persistent broker
    broker = Mosquitto(tmp_path / "broker", persistent=True).start()
    got: queue.Queue[bytes] = queue.Queue()
    reconnected = threading.Event()
    subscriber = MqttLink("sub", broker.settings, lambda t, p: got.put(p), ["t/#"]).start()
    publisher = MqttLink(
        "pub", broker.settings, lambda t, p: None, [], on_connected=reconnected.set
    ).start()
    try:
        reconnected.clear()
        broker.stop()
        # Execute: publishes while the broker is away, then after it is back
        publisher.publish("t/a", b"while away 1")
        publisher.publish("t/a", b"while away 2")
        broker.start()
        assert reconnected.wait(60), "the publisher did not reconnect"
        publisher.publish("t/a", b"after")
        delivered = publisher.flush(30)
        messages = set()
        while b"after" not in messages:
            messages.add(got.get(timeout=30))
    finally:
        publisher.close()
        subscriber.close()
        broker.stop()

    # Assert: no publish raised, and the link delivers again once the broker is back
    assert delivered
    assert b"after" in messages
