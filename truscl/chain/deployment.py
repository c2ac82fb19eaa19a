"""A deployment of the ``Truscl`` contract: its record, and checks against the chain.

The record is what an operator keeps after ``truscl chain deploy`` and hands to the other
roles: where the contract is (address, chain id, the RPC URL used), who deployed it and in
which transaction, from which block its logs begin, and which code it runs.

``artifact_hash`` is keccak-256 of the *runtime* code (the artifact's ``deployedBytecode``),
not of the creation code or of the JSON artifact: the runtime code is what the chain keeps at
the address (``eth_getCode``; the EVM's own ``EXTCODEHASH``), so anyone can recompute it from
the address alone and compare it with a fresh build. The contract has no immutables, so that
code is the artifact's byte for byte, at every deployment.

The record is a convenience, never a source of trust: :meth:`Deployment.verify` re-reads the
chain and refuses a record that no longer describes it (a restarted dev node, another chain, a
record edited by hand).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eth_typing import ChecksumAddress
from eth_utils import is_address, to_checksum_address

from truscl.contracts import load_artifact
from truscl.errors import ChainError, ConfigError
from truscl.hashing import keccak

if TYPE_CHECKING:  # web3 only where a chain is reached: a device reads a record without it
    from eth_account.signers.local import LocalAccount
    from web3 import Web3

# Blocks per eth_getLogs request: public providers cap the range (often at a few thousand), a
# local node does not care.
LOG_BLOCK_SPAN = 2_000

_HASH_HEX = 66  # "0x" and 64 hex digits


def artifact_code_hash() -> str:
    """keccak-256 of the runtime code this truscl was built with, as 0x-hex."""
    code = load_artifact("Truscl")["deployedBytecode"]
    return _hex(keccak(bytes.fromhex(code.removeprefix("0x"))))


def code_hash(w3: Web3, address: str) -> str | None:
    """keccak-256 of the code at ``address``, or ``None`` when no contract lives there."""
    code = bytes(w3.eth.get_code(to_checksum_address(address)))
    return _hex(keccak(code)) if code else None


@dataclass(frozen=True)
class Deployment:
    """Where one ``Truscl`` contract lives and how it got there (saved as JSON)."""

    address: ChecksumAddress
    chain_id: int
    deployment_block: int
    artifact_hash: str  # keccak-256 of the runtime code, 0x-hex
    deployer: ChecksumAddress
    tx_hash: str
    rpc_url: str | None  # None when deployed on the in-process EVM

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the record to a new file; an existing record is never overwritten.

        Losing a record is losing track of a live contract, so a second deployment must be
        given another name.
        """
        target = Path(path)
        text = json.dumps(self.as_dict(), indent=2) + "\n"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("x", encoding="utf-8") as handle:
                handle.write(text)
        except FileExistsError:
            raise ConfigError(
                f"deployment record {target} already exists; choose another file"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot write deployment record {target}: {exc.strerror}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Deployment:
        """Read a record; ``ConfigError`` naming the file and the field that is wrong."""
        name = os.fspath(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"deployment record {name} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read deployment record {name}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deployment record {name} is not JSON: {exc}") from None
        return cls.from_dict(data, name)

    @classmethod
    def from_dict(cls, data: Any, name: str = "deployment record") -> Deployment:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected a JSON object")
        expected = {f for f in cls.__dataclass_fields__}
        missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or extra:
            raise ConfigError(f"{name}: missing keys {missing}, unexpected keys {extra}")
        rpc_url = data["rpc_url"]
        if rpc_url is not None and not isinstance(rpc_url, str):
            raise ConfigError(f"{name}: rpc_url must be a string or null")
        return cls(
            address=_address(data["address"], name, "address"),
            chain_id=_count(data["chain_id"], name, "chain_id", minimum=1),
            deployment_block=_count(data["deployment_block"], name, "deployment_block"),
            artifact_hash=_hash(data["artifact_hash"], name, "artifact_hash"),
            deployer=_address(data["deployer"], name, "deployer"),
            tx_hash=_hash(data["tx_hash"], name, "tx_hash"),
            rpc_url=rpc_url,
        )

    def problems(self, w3: Web3) -> list[str]:
        """What the chain at ``w3`` disagrees with in this record (empty: it all holds)."""
        chain_id = w3.eth.chain_id
        if chain_id != self.chain_id:
            return [f"the node is on chain {chain_id}, the record on chain {self.chain_id}"]
        found = code_hash(w3, self.address)
        if found is None:
            return [f"no contract at {self.address} on chain {chain_id}"]
        problems = []
        if found != self.artifact_hash:
            problems.append(f"the code at {self.address} is not the code the record names")
        if found != artifact_code_hash():
            problems.append(f"the code at {self.address} is not this truscl's Truscl contract")
            return problems  # its ABI may differ: do not call it
        from truscl.chain.client import ChainClient

        block = ChainClient.at(w3, self.address).deployment_block()
        if block != self.deployment_block:
            problems.append(
                f"the contract was deployed in block {block}, "
                f"the record says {self.deployment_block}"
            )
        return problems

    def verify(self, w3: Web3) -> None:
        """``ChainError`` unless the chain holds this contract as recorded.

        Checks the chain id, that the runtime code at the address is this truscl's artifact
        (and the record's ``artifact_hash``), and that the deployment block the contract itself
        reports equals the record's.
        """
        problems = self.problems(w3)
        if problems:
            raise ChainError("deployment record does not match the chain: " + "; ".join(problems))


def deploy(
    w3: Web3,
    account: LocalAccount,
    rpc_url: str | None = None,
    lock: AbstractContextManager[Any] | None = None,
) -> Deployment:
    """Deploy a fresh contract (``account`` becomes admin and first registrar); its record.

    ``rpc_url`` defaults to the provider's endpoint, ``None`` for the in-process EVM. The new
    contract is verified against its record before the record is returned.
    """
    if w3.eth.get_balance(account.address) == 0:
        raise ChainError(
            f"account {account.address} has no funds on chain {w3.eth.chain_id}; "
            "fund it to pay for the deployment"
        )
    from truscl.chain.client import contract_address, deploy_transaction

    receipt = deploy_transaction(w3, account, lock)
    if rpc_url is None:
        endpoint = getattr(w3.provider, "endpoint_uri", None)
        rpc_url = str(endpoint) if endpoint is not None else None
    record = Deployment(
        address=contract_address(receipt),
        chain_id=w3.eth.chain_id,
        deployment_block=receipt["blockNumber"],
        artifact_hash=artifact_code_hash(),
        deployer=account.address,
        tx_hash=_hex(receipt["transactionHash"]),
        rpc_url=rpc_url,
    )
    record.verify(w3)
    return record


@dataclass(frozen=True)
class TaskStatus:
    task: str  # 0x-hex task id
    owner: str
    aggregator: str
    rounds: int
    rounds_anchored: int


@dataclass(frozen=True)
class Status:
    """What the chain says about one contract, read with no key."""

    rpc_url: str | None
    chain_id: int
    contract: ChecksumAddress
    code_hash: str
    code_matches: bool  # the runtime code is this truscl's artifact
    deployment_block: int | None  # None when the code is not ours: its ABI is unknown
    latest_block: int
    devices: int
    tasks: list[TaskStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def status(
    w3: Web3, address: str, rpc_url: str | None = None, span: int = LOG_BLOCK_SPAN
) -> Status:
    """Registry and tasks of the contract at ``address``, counted from its own event logs.

    Logs are read from the deployment block the contract reports, in requests of at most
    ``span`` blocks. A contract whose code is not this truscl's is described (chain,
    code hash) but not read further: its events and getters may mean something else.
    """
    contract = to_checksum_address(address)
    chain_id = w3.eth.chain_id
    found = code_hash(w3, contract)
    if found is None:
        raise ChainError(f"no contract at {contract} on chain {chain_id}")
    latest = w3.eth.block_number
    if found != artifact_code_hash():
        return Status(rpc_url, chain_id, contract, found, False, None, latest, 0)
    from truscl.chain.client import ChainClient

    client = ChainClient.at(w3, contract)
    first = client.deployment_block()
    events = w3.eth.contract(address=contract, abi=load_artifact("Truscl")["abi"]).events
    devices = {log["args"]["device"] for log in _logs(events.DeviceRegistered, first, latest, span)}
    tasks = []
    for log in _logs(events.TaskCreated, first, latest, span):
        record = client.task(bytes(log["args"]["taskId"]))
        tasks.append(
            TaskStatus(
                task=_hex(record.task_id),
                owner=record.owner,
                aggregator=record.aggregator,
                rounds=record.rounds,
                rounds_anchored=record.rounds_anchored,
            )
        )
    return Status(rpc_url, chain_id, contract, found, True, first, latest, len(devices), tasks)


def _logs(event: Any, first: int, last: int, span: int) -> Iterator[Any]:
    for start in range(first, last + 1, span):
        end = min(start + span - 1, last)
        yield from event.get_logs(from_block=start, to_block=end)


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def _address(value: Any, name: str, key: str) -> ChecksumAddress:
    if not isinstance(value, str) or not is_address(value):
        raise ConfigError(f"{name}: {key} must be an address (0x and 40 hex digits)")
    return to_checksum_address(value)


def _count(value: Any, name: str, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: {key} must be an integer of at least {minimum}")
    return value


def _hash(value: Any, name: str, key: str) -> str:
    if not (isinstance(value, str) and len(value) == _HASH_HEX and value.startswith("0x")):
        raise ConfigError(f"{name}: {key} must be 0x and 64 hex digits")
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        raise ConfigError(f"{name}: {key} must be 0x and 64 hex digits") from None
    return value.lower()
