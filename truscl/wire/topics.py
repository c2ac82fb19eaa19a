"""MQTT topic names, all under one versioned prefix.

Every topic a task uses is derived here, so ACLs (device may publish only under its own
``updates/<address>``) and subscriptions cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "truscl/v1"


@dataclass(frozen=True)
class TaskTopics:
    task_hex: str  # 0x-prefixed bytes32 task id

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.task_hex}"

    @property
    def spec(self) -> str:
        """Retained task spec (its hash is on chain)."""
        return f"{self.base}/spec"

    @property
    def context(self) -> str:
        """Retained public HE context, one retained sub-topic per chunk."""
        return f"{self.base}/context"

    @property
    def round(self) -> str:
        """Retained announcement of the open round."""
        return f"{self.base}/round"

    @property
    def model(self) -> str:
        """Retained global model released by the owner."""
        return f"{self.base}/model"

    @property
    def aggregate(self) -> str:
        """The closed round's encrypted sum, aggregator to owner."""
        return f"{self.base}/aggregate"

    def updates(self, device: str) -> str:
        return f"{self.base}/updates/{device.lower()}"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/updates/+"

    @property
    def shared_updates(self) -> str:
        """Every device's updates as an MQTT 5 shared subscription of the task's aggregator
        processes: the broker hands each message to one of them (the ACL is the topic's)."""
        return f"$share/truscl-aggregator-{self.task_hex.removeprefix('0x')[:8]}/{self.all_updates}"

    def receipts(self, device: str) -> str:
        return f"{self.base}/receipts/{device.lower()}"

    @staticmethod
    def last_segment(topic: str) -> str:
        return topic.rsplit("/", 1)[-1]

    def keygen(self, holder: str, step: str) -> str:
        """Retained: one holder's message for one key-generation step (chunked sub-topics)."""
        return f"{self.base}/keygen/{holder}/{step}"

    @property
    def all_keygen(self) -> str:
        return f"{self.base}/keygen/+/+/+"

    def partial(self, holder: str) -> str:
        """Retained: a key holder's latest partial decryption (chunked sub-topics)."""
        return f"{self.base}/partials/{holder}"

    @property
    def all_partials(self) -> str:
        return f"{self.base}/partials/+/+"
