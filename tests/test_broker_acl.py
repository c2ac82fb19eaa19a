"""A real mosquitto run from a provisioned configuration enforces who may say and read what.

A denied publish at QoS 1 may still be acknowledged, so each denial is asserted by its
non-delivery to a subscriber that could have read it, made deterministic with a sentinel: the
same publisher sends the forbidden message and then an allowed one, and messages of one client
at QoS 1 arrive in order, so once the sentinel is in, the forbidden one would have been too.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from truscl.broker import Mosquitto, free_port
from truscl.broker.provision import Provisioned, provision_broker
from truscl.config import TomlReader
from truscl.keyfile import read_secret
from truscl.mqtt import BrokerSettings, MqttLink
from truscl.wire.topics import TaskTopics

pytestmark = pytest.mark.slow

WAIT = 20.0  # generous: every wait ends on an event, this only bounds a broken run
A = "0x" + "aa" * 20
B = "0x" + "bb" * 20
TASK = TaskTopics("0x" + "7a" * 32)


class Peer:
    """A paho MQTT 5 client whose every broker answer is recorded, to be waited on."""

    def __init__(
        self,
        port: int,
        *,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        client_id: str = "",
    ) -> None:
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if ca is not None:
            self.client.tls_set(
                ca_certs=str(ca),
                certfile=None if cert is None else str(cert),
                keyfile=None if key is None else str(key),
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.outcomes: queue.Queue[str] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnects: list[str] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._subacked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    @classmethod
    def of(cls, settings: BrokerSettings, client_id: str = "") -> Peer:
        assert settings.password_file is not None
        return cls(
            settings.port,
            ca=settings.ca,
            cert=settings.cert,
            key=settings.key,
            username=settings.username,
            password=read_secret(settings.password_file).decode(),
            client_id=client_id or (settings.username or ""),
        )

    def connect(self) -> str:
        """The broker's first answer: "connected", "refused: why", or how the link failed."""
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        try:
            outcome = self.outcomes.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError("the broker gave no answer at all") from None
        if outcome != "connected":
            self.close()
        return outcome

    def subscribe(self, *topics: str) -> list[bool]:
        """Subscribe and wait for the SUBACK; whether each topic was granted."""
        result, mid = self.client.subscribe([(t, 1) for t in topics])
        assert result == paho.MQTT_ERR_SUCCESS
        with self._subacked:
            assert self._subacked.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            return [not code.is_failure for code in self._subacks[mid]]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK (granted or not)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def until(self, sentinel: bytes) -> list[tuple[str, bytes]]:
        """Every message that came before ``sentinel`` (which must come)."""
        before = []
        while True:
            try:
                topic, payload = self.messages.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"{sentinel!r} never arrived; before it: {before}") from None
            if payload == sentinel:
                return before
            before.append((topic, payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.outcomes.put(f"refused: {reason}" if reason.is_failure else "connected")

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        self.outcomes.put("connection failed")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.disconnects.append(str(reason))
        self.outcomes.put(f"disconnected: {reason}")

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._subacked:
            self._subacks[mid] = reasons
            self._subacked.notify_all()


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[Provisioned]:
    """A broker provisioned for devices A and B and two key guardians, run from its own
    mosquitto.conf."""
    provisioned = provision_broker(
        tmp_path / "broker", [A, B], port=free_port(), bind="127.0.0.1", guardians=2
    )
    with Mosquitto.provisioned(provisioned.conf):
        yield provisioned


@pytest.fixture()
def peers(fleet: Provisioned) -> Iterator[dict[str, Peer]]:
    """One connected client per identity, logged in with its own certificate and password."""
    connected: dict[str, Peer] = {}
    try:
        for name in fleet.identities:
            peer = Peer.of(fleet.settings(name))
            assert peer.connect() == "connected", name
            connected[name] = peer
        yield connected
    finally:
        for peer in connected.values():
            peer.close()


def test_each_identity_connects_from_its_broker_toml_and_the_allowed_flows_arrive(
    fleet: Provisioned,
) -> None:
    settings = {
        name: TomlReader.load(fleet.client_dir(name) / "broker.toml").broker()
        for name in fleet.identities
    }
    peers = {name: Peer.of(s) for name, s in settings.items()}
    try:
        for name, peer in peers.items():
            assert peer.connect() == "connected", name
        owner, aggregator, a = peers["owner"], peers["aggregator"], peers[A]
        assert a.subscribe(TASK.spec, f"{TASK.context}/+", TASK.round, TASK.model,
                           TASK.receipts(A)) == [True] * 5  # fmt: skip
        assert aggregator.subscribe(TASK.all_updates, TASK.spec, f"{TASK.context}/+",
                                    TASK.model) == [True] * 4  # fmt: skip
        assert owner.subscribe(TASK.aggregate, TASK.round) == [True, True]

        owner.publish(TASK.spec, b"spec", retain=True)
        owner.publish(f"{TASK.context}/0", b"context", retain=True)
        owner.publish(TASK.model, b"model 0", retain=True)
        for peer in (a, aggregator):
            assert peer.until(b"model 0") == [
                (TASK.spec, b"spec"), (f"{TASK.context}/0", b"context"),
            ]  # fmt: skip
        aggregator.publish(TASK.round, b"round 1", retain=True)
        assert a.until(b"round 1") == [] and owner.until(b"round 1") == []
        a.publish(TASK.updates(A), b"update of A")
        assert aggregator.until(b"update of A") == []
        aggregator.publish(TASK.receipts(A), b"receipt of A")
        assert a.until(b"receipt of A") == []
        aggregator.publish(TASK.aggregate, b"aggregate 1")
        assert owner.until(b"aggregate 1") == []
    finally:
        for peer in peers.values():
            peer.close()

    # The project's own link, as a device's agent opens it, gets the retained task.
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    with MqttLink("ignored", settings[B], lambda t, p: got.put((t, p)), [TASK.spec]):
        assert got.get(timeout=WAIT) == (TASK.spec, b"spec")


def test_a_device_cannot_publish_as_another(peers: dict[str, Peer]) -> None:
    aggregator = peers["aggregator"]
    assert aggregator.subscribe(TASK.all_updates) == [True]

    peers[A].publish(TASK.updates(B), b"forged by A")
    peers[A].publish(TASK.updates(A), b"sentinel of A")
    peers[B].publish(TASK.updates(B), b"own of B")  # the topic does reach the aggregator

    assert aggregator.until(b"sentinel of A") == []
    assert aggregator.until(b"own of B") == []


def test_a_device_cannot_read_another_devices_receipts(peers: dict[str, Peer]) -> None:
    a, b = peers[A], peers[B]
    a.subscribe(f"{TASK.base}/receipts/+", TASK.receipts(B))  # granted or not: nothing arrives
    assert b.subscribe(TASK.receipts(B)) == [True]

    peers["aggregator"].publish(TASK.receipts(B), b"receipt of B")
    peers["aggregator"].publish(TASK.receipts(A), b"receipt of A")

    assert a.until(b"receipt of A") == []
    assert b.until(b"receipt of B") == []  # it was delivered to the one allowed to read it


def test_the_owner_reads_no_update_and_writes_no_receipt(peers: dict[str, Peer]) -> None:
    owner, aggregator, a = peers["owner"], peers["aggregator"], peers[A]
    owner.subscribe(TASK.all_updates)
    assert owner.subscribe(TASK.aggregate) == [True]
    assert aggregator.subscribe(TASK.all_updates) == [True]
    assert a.subscribe(TASK.receipts(A), TASK.model) == [True, True]

    a.publish(TASK.updates(A), b"update of A")
    assert aggregator.until(b"update of A") == []  # the broker has fanned it out by now
    aggregator.publish(TASK.aggregate, b"aggregate")
    assert owner.until(b"aggregate") == []

    owner.publish(TASK.receipts(A), b"receipt forged by the owner")
    owner.publish(TASK.model, b"model from the owner")
    assert a.until(b"model from the owner") == []


def test_a_guardian_reads_the_aggregate_but_no_update_and_writes_only_its_own_topics(
    peers: dict[str, Peer],
) -> None:
    owner, guardian, other, a = peers["owner"], peers["guardian-1"], peers["guardian-2"], peers[A]
    guardian.subscribe(TASK.all_updates)  # granted or not: no update may arrive
    assert guardian.subscribe(TASK.aggregate, TASK.spec, TASK.all_keygen) == [True] * 3
    assert owner.subscribe(TASK.all_partials, TASK.all_keygen) == [True, True]
    assert peers["aggregator"].subscribe(TASK.all_updates) == [True]

    a.publish(TASK.updates(A), b"update of A")
    assert peers["aggregator"].until(b"update of A") == []
    peers["aggregator"].publish(TASK.aggregate, b"aggregate 1")
    assert guardian.until(b"aggregate 1") == []  # and the update of A never reached it

    other.publish(f"{TASK.partial('guardian-1')}/0", b"partial forged by guardian-2")
    other.publish(f"{TASK.keygen('owner', 'session')}/0", b"session forged by guardian-2")
    other.publish(TASK.model, b"model forged by guardian-2")
    other.publish(f"{TASK.partial('guardian-2')}/0", b"partial of guardian-2")
    assert owner.until(b"partial of guardian-2") == []
    guardian.publish(f"{TASK.keygen('guardian-1', 'seed-commitment')}/0", b"commitment")
    assert owner.until(b"commitment") == []
    owner.publish(f"{TASK.keygen('owner', 'session')}/0", b"session")
    assert guardian.until(b"session") == [
        (f"{TASK.keygen('guardian-1', 'seed-commitment')}/0", b"commitment")
    ]  # its own, then the owner's: guardian-2's forgery never got through


def login(fleet: Provisioned, name: str) -> dict[str, Path]:
    folder = fleet.client_dir(name)
    return {"ca": folder / "ca.crt", "cert": folder / "client.crt", "key": folder / "client.key"}


def test_a_client_without_a_login_is_refused(fleet: Provisioned) -> None:
    anonymous = Peer(fleet.port, **login(fleet, A), client_id=A)
    assert anonymous.connect().startswith("refused: ")


def test_a_wrong_password_is_refused(fleet: Provisioned) -> None:
    other = read_secret(fleet.client_dir(B) / "password").decode()
    wrong = Peer(fleet.port, **login(fleet, A), username=A, password=other)
    assert wrong.connect().startswith("refused: ")


def test_the_password_alone_without_a_client_certificate_is_refused(fleet: Provisioned) -> None:
    settings = fleet.settings(A)
    assert settings.password_file is not None and settings.ca is not None
    password = read_secret(settings.password_file).decode()
    bare = Peer(fleet.port, ca=settings.ca, username=A, password=password)
    assert bare.connect() != "connected"


def test_a_certificate_from_another_ca_fails_the_tls_handshake(
    fleet: Provisioned, tmp_path: Path
) -> None:
    stranger = provision_broker(tmp_path / "stranger", [A], port=free_port())
    foreign = login(stranger, A)
    context = ssl.create_default_context(cafile=str(fleet.ca))
    context.load_cert_chain(str(foreign["cert"]), str(foreign["key"]))

    with socket.create_connection(("127.0.0.1", fleet.port), timeout=WAIT) as raw:
        with pytest.raises(ssl.SSLError, match=r"UNKNOWN_CA|unknown ca|CERTIFICATE"):
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(1)  # TLS 1.3: the server's verdict on the client comes after the hello

    password = read_secret(fleet.client_dir(A) / "password").decode()
    peer = Peer(fleet.port, ca=fleet.ca, cert=foreign["cert"], key=foreign["key"],
                username=A, password=password)  # fmt: skip
    assert peer.connect() != "connected"


def test_plain_tcp_is_refused(fleet: Provisioned) -> None:
    password = read_secret(fleet.client_dir(A) / "password").decode()
    plain = Peer(fleet.port, username=A, password=password)
    assert plain.connect() != "connected"


def test_another_identitys_client_id_does_not_take_over_its_session(
    peers: dict[str, Peer], fleet: Provisioned
) -> None:
    aggregator = peers["aggregator"]
    assert aggregator.subscribe(TASK.all_updates) == [True]
    peers[A].close()  # A's own session is the impostor's now: no tug of war between the two

    impostor = Peer.of(fleet.settings(A), client_id="aggregator")
    try:
        assert impostor.connect() == "connected"  # as itself: the broker takes A's username
        impostor.subscribe(TASK.all_updates, TASK.receipts(A))
        peers[B].publish(TASK.updates(B), b"after the impostor")
        assert aggregator.until(b"after the impostor") == []
        assert aggregator.disconnects == []  # not kicked (and back) by a same-id login
        aggregator.publish(TASK.receipts(A), b"receipt of A")
        assert impostor.until(b"receipt of A") == []  # it is A: no update of B reached it
    finally:
        impostor.close()
