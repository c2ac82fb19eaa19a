"""A thin MQTT 5 link over paho-mqtt 2.x, shared by every role.

It subscribes in ``on_connect`` so subscriptions come back after a reconnect, keeps the MQTT
session across reconnects and restarts of the role (clean start off, a session expiry: QoS 1
messages queued at the broker are not lost while a role is away), chunks large blobs, and
hands each message to the role's callback from paho's network thread. Roles must return
quickly from that callback: they queue work for their own thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from truscl.errors import ConfigError, TrusclError
from truscl.keyfile import read_secret
from truscl.wire import chunking

log = logging.getLogger(__name__)

QOS = 1
SESSION_EXPIRY_S = 3600


class BrokerUnavailable(TrusclError, ConnectionError):
    """The broker did not accept a connection in time."""


MessageHandler = Callable[[str, bytes], None]


KEEPALIVE_S = 30


@dataclass(frozen=True)
class BrokerSettings:
    """Where a role's broker is, and who the role is to it.

    With ``ca`` set the link speaks TLS and checks the broker's certificate against that CA
    (and its host name); ``cert`` and ``key`` are this client's own certificate for mutual TLS;
    ``username`` and ``password_file`` (mode 0600, read at connect) log in. A deployment's broker
    (``truscl broker provision``) asks for all of them; a development broker for none.
    """

    host: str
    port: int
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    # Seconds between keepalives; the broker drops a client silent for 1.5 times this. A
    # process hosting many devices may be too busy at a round's close to answer within 45 s.
    keepalive: int = KEEPALIVE_S

    def __post_init__(self) -> None:
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"keepalive must be 5 to 65535 seconds, not {self.keepalive}")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its key, and a key its certificate")
        if self.cert is not None and self.ca is None:
            raise ConfigError("a client certificate needs the broker's CA (TLS)")
        if (self.username is None) != (self.password_file is None):
            raise ConfigError("a broker username needs its password file, and the other way")

    def worker(self, index: int) -> BrokerSettings:
        """How worker process ``index`` (1, 2, ...) of the aggregator logs in: as
        ``<username>-<index>`` with the password file ``<password_file>-<index>``, the logins
        ``truscl broker provision --aggregator-workers`` makes; without a login, as this."""
        if self.username is None or self.password_file is None:
            return self
        password = self.password_file.with_name(f"{self.password_file.name}-{index}")
        return replace(self, username=f"{self.username}-{index}", password_file=password)

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.ca else 'mqtt'}://{self.host}:{self.port}"


class MqttLink:
    """One role's connection to the broker."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerSettings,
        on_message: MessageHandler,
        subscriptions: Iterable[str],
        max_message: int = chunking.DEFAULT_MAX_MESSAGE,
        on_connected: Callable[[], None] | None = None,
        unsubscriptions: Iterable[str] = (),
    ) -> None:
        """``unsubscriptions``: topics the session may hold from an earlier run (it outlives a
        restart) that this one must not receive, dropped on every connection."""
        self.client_id = client_id
        self.broker = broker
        self.max_message = max_message
        self._subscriptions = list(subscriptions)
        self._unsubscriptions = list(unsubscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self._connected = threading.Event()
        self._unacknowledged: deque[paho.MQTTMessageInfo] = deque()
        self._swept = 64  # pending publishes after the last sweep (see publish), at least 64
        self._unacknowledged_lock = threading.Lock()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        # Backoff between reconnection attempts, doubling from 1 s to at most 30 s.
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)  # 0 = unbounded: nothing is dropped locally
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        if broker.ca is not None:
            self._client.tls_set(
                ca_certs=str(broker.ca),
                certfile=str(broker.cert) if broker.cert else None,
                keyfile=str(broker.key) if broker.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if broker.username is not None and broker.password_file is not None:
            password = read_secret(broker.password_file).decode().strip()
            self._client.username_pw_set(broker.username, password)

    def start(self, timeout: float | None = 10.0) -> MqttLink:
        """Connect; wait up to ``timeout`` s for the broker, or not at all with ``None``
        (paho keeps retrying in the background, as a service at boot wants)."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=self.broker.keepalive,
            clean_start=False,  # the session (subscriptions, queued QoS 1) outlives a restart
            properties=properties,
        )
        self._client.loop_start()
        if timeout is not None and not self._connected.wait(timeout):
            self.close()
            raise BrokerUnavailable(f"no broker at {self.broker.address} after {timeout}s")
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> paho.MQTTMessageInfo:
        if len(payload) > self.max_message:
            raise ValueError(f"{len(payload)} bytes exceed the {self.max_message}-byte limit")
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("%s: publish to %s failed: %s", self.client_id, topic, info.rc)
        with self._unacknowledged_lock:
            # The broker acknowledges mostly in order: drop the settled ones at the front on
            # every publish, and sweep the whole list only when it has doubled since the last
            # sweep (a sweep per publish made a burst of n receipts cost n^2).
            pending = self._unacknowledged
            while pending and _settled(pending[0]):
                pending.popleft()
            if len(pending) > 2 * self._swept:
                self._unacknowledged = pending = deque(i for i in pending if not _settled(i))
                self._swept = max(64, len(pending))
            pending.append(info)
        return info

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the broker has acknowledged every publish so far;
        False if some are still in flight (a role that stops must not drop its last words)."""
        deadline = time.monotonic() + timeout
        with self._unacknowledged_lock:
            waiting, self._unacknowledged = self._unacknowledged, deque()
        for info in waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._connected.is_set():
                break
            try:
                info.wait_for_publish(remaining)
            except (RuntimeError, ValueError):  # paho: made while disconnected, or dropped
                return False
        return all(_acknowledged(i) for i in waiting)

    def publish_blob(self, topic: str, blob: bytes, ident: bytes | None = None) -> int:
        """Publish ``blob`` as chunks on one topic (``ident``: its id when it is not its
        keccak, see :func:`truscl.wire.chunking.split`); returns the bytes put on the wire."""
        chunks = chunking.split(blob, self.max_message, ident)
        for chunk in chunks:
            self.publish(topic, chunk)
        return sum(len(c) for c in chunks)

    def publish_retained_blob(self, topic: str, blob: bytes) -> int:
        """Publish ``blob`` retained, one sub-topic per chunk so every chunk stays retained."""
        chunks = chunking.split(blob, self.max_message)
        for index, chunk in enumerate(chunks):
            self.publish(f"{topic}/{index}", chunk, retain=True)
        return sum(len(c) for c in chunks)

    def close(self, flush_timeout: float = 5.0) -> None:
        if self._connected.is_set():
            self.flush(flush_timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: object,
        properties: Properties | None,
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("%s: broker refused the connection: %s", self.client_id, reason_code)
            return
        if self._unsubscriptions:
            client.unsubscribe(self._unsubscriptions)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=QOS)
        log.debug("%s: connected to %s", self.client_id, self.broker.address)
        self._connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: object,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        log.debug("%s: disconnected (%s)", self.client_id, reason_code)

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            self._on_message(msg.topic, bytes(msg.payload))
        except Exception:  # a bad message must never kill the network thread
            log.exception("%s: handler failed on a message from %s", self.client_id, msg.topic)


def delivery(info: paho.MQTTMessageInfo) -> str:
    """``done`` (the broker acknowledged it), ``pending`` (it may still) or ``failed``.

    paho raises, rather than answer, for a message published while disconnected or dropped
    from a full queue: it may still go out after a reconnect, but it is not known to have, so
    a caller that must know republishes it.
    """
    try:
        return "done" if info.is_published() else "pending"
    except (RuntimeError, ValueError):
        return "failed"


def _acknowledged(info: paho.MQTTMessageInfo) -> bool:
    return delivery(info) == "done"


def _settled(info: paho.MQTTMessageInfo) -> bool:
    """Acknowledged, or never to be acknowledged as far as paho can tell: nothing to wait for."""
    return delivery(info) != "pending"
