"""The few chain reads a device makes, through the lightest client that does them.

A device checks what it is told against the contract: the task's terms and hashes, the model
hash the owner anchored, its update's inclusion in an anchored root, the aggregator's address,
whether it is registered. Each is one ``eth_call``: this module encodes it with eth-abi (which
eth-account already brings) from the committed ABI and posts it over ``http.client``, so the
device's process loads neither web3 (about a second) nor the in-process EVM. The server roles
and the in-process demo keep web3's :class:`~truscl.chain.client.ChainClient`, which offers the
same reads: both are a :class:`ChainReader`, and the composing code picks one.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_typing import ChecksumAddress
from eth_utils import to_checksum_address

from truscl.contracts import load_artifact
from truscl.errors import ChainError, ConfigError
from truscl.hashing import keccak
from truscl.wire.update import UPDATE_FIELDS, UpdateRecord

DEFAULT_TIMEOUT = 10.0  # seconds per request: a testnet provider answers well within it


@dataclass(frozen=True)
class TaskRecord:
    """A task's terms as the contract holds them."""

    task_id: bytes
    owner: ChecksumAddress
    aggregator: ChecksumAddress
    spec_hash: bytes
    context_hash: bytes
    rounds: int
    rounds_anchored: int
    epsilon_micros: int  # what all the task's rounds spend of a device's privacy (x 1e6)
    epsilon_budget_micros: int  # the per-device budget the spec names (x 1e6)


class ChainReader(Protocol):
    """What a device reads from the contract (``ChainClient`` and :class:`RpcReader` offer it)."""

    @property
    def chain_id(self) -> int: ...

    @property
    def address(self) -> ChecksumAddress: ...

    def task(self, task_id: bytes) -> TaskRecord: ...

    def model_hash(self, task_id: bytes, round: int) -> bytes | None: ...

    def verify_update(
        self, record: UpdateRecord, proof: Sequence[bytes], counted_in: int | None = None
    ) -> bool: ...

    def is_device(self, device: str) -> bool: ...


class RpcReader:
    """:class:`ChainReader` over JSON-RPC ``eth_call``: http.client and eth-abi, nothing else.

    One connection, kept open between calls and reopened when the node closed it; calls from
    several threads take turns. Every failure leaves as a one-line ``ChainError`` naming the
    URL, a revert with the contract's custom error decoded.
    """

    def __init__(self, url: str, contract: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"RPC URL {url!r} must start with http:// or https://")
        self.node = url
        self._parts = parts
        self._timeout = timeout
        self._address = to_checksum_address(contract)
        abi = load_artifact("Truscl")["abi"]
        self._functions = {item["name"]: item for item in abi if item["type"] == "function"}
        self._errors = custom_errors(abi)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None
        self._chain_id: int | None = None

    @property
    def address(self) -> ChecksumAddress:
        return self._address

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self._request("eth_chainId", []), 16)
        return self._chain_id

    def task(self, task_id: bytes) -> TaskRecord:
        """The task's terms; ``ChainError`` (UnknownTask) if it was never created."""
        owner, aggregator, spec_hash, context_hash, rounds, anchored, epsilon, budget = self._call(
            "getTask", b32(task_id)
        )
        return TaskRecord(
            task_id=task_id,
            owner=to_checksum_address(owner),
            aggregator=to_checksum_address(aggregator),
            spec_hash=spec_hash,
            context_hash=context_hash,
            rounds=rounds,
            rounds_anchored=anchored,
            epsilon_micros=epsilon,
            epsilon_budget_micros=budget,
        )

    def model_hash(self, task_id: bytes, round: int) -> bytes | None:
        """Hash of the model published after ``round`` (0 = initial), ``None`` if none yet."""
        (value,) = self._call("modelHash", b32(task_id), round)
        return None if value == bytes(32) else bytes(value)

    def verify_update(
        self, record: UpdateRecord, proof: Sequence[bytes], counted_in: int | None = None
    ) -> bool:
        """Whether the update was counted in round ``counted_in`` (default: its own round)."""
        round_no = record.round if counted_in is None else counted_in
        (counted,) = self._call(
            "verifyUpdate", update_tuple(record), round_no, [b32(p) for p in proof]
        )
        return bool(counted)

    def is_device(self, device: str) -> bool:
        (registered,) = self._call("isDevice", to_checksum_address(device))
        return bool(registered)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # --- plumbing ----------------------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> tuple[Any, ...]:
        function = self._functions[name]
        inputs = [abi_type(p) for p in function["inputs"]]
        selector = keccak(f"{name}({','.join(inputs)})".encode())[:4]
        data = "0x" + (selector + abi_encode(inputs, args)).hex()
        call = {"to": self._address, "data": data}
        result = self._request("eth_call", [call, "latest"])
        outputs = [abi_type(p) for p in function["outputs"]]
        try:
            return tuple(abi_decode(outputs, bytes.fromhex(result.removeprefix("0x"))))
        except (DecodingError, ValueError) as exc:
            raise ChainError(f"{name}: unexpected answer from {self.node}: {exc}") from None

    def _request(self, method: str, params: list[Any]) -> Any:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        ).encode()
        with self._lock:
            status, text = self._post(body)
        if status != 200:
            raise ChainError(f"the server at {self.node} answered HTTP {status}, not JSON-RPC")
        try:
            answer = json.loads(text)
        except ValueError:
            raise ChainError(f"{self.node} is not a JSON-RPC endpoint") from None
        if not isinstance(answer, dict):
            raise ChainError(f"unexpected answer from {self.node}: {one_line(str(answer))}")
        error = answer.get("error")
        if error is not None:
            raise ChainError(self._describe_error(method, error))
        if "result" not in answer:
            raise ChainError(f"unexpected answer from {self.node}: {one_line(str(answer))}")
        return answer["result"]

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """One POST on the kept connection; a connection the node closed is reopened once."""
        headers = {"Content-Type": "application/json"}
        for attempt in (1, 2):
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self._parts.path or "/", body, headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop(connection)
                if attempt == 2:
                    raise ChainError(f"the node at {self.node} closed the connection") from None
            except TimeoutError:
                self._drop(connection)
                raise ChainError(f"the node at {self.node} did not answer in time") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(connection)
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ChainError(f"cannot reach a JSON-RPC node at {self.node}: {reason}") from None
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            self._connection = http.client.HTTPSConnection(host, port, timeout=self._timeout)
        else:
            self._connection = http.client.HTTPConnection(host, port, timeout=self._timeout)
        return self._connection

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._connection = None

    def _describe_error(self, method: str, error: Any) -> str:
        if not isinstance(error, dict):
            return f"the node at {self.node} refused: {one_line(str(error))}"
        data = error.get("data")
        if isinstance(data, dict):  # some nodes nest it
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
            raw = bytes.fromhex(data[2:])
            if raw[:4] in self._errors:
                return f"call reverted: {self._errors[raw[:4]].describe(raw[4:])}"
        message = one_line(str(error.get("message", error)))
        if method == "eth_call" and "revert" in message:
            return f"call reverted: {message.removeprefix('execution reverted: ')}"
        return f"the node at {self.node} refused: {message}"


@dataclass(frozen=True)
class CustomError:
    """A custom error of the ABI, to render revert data as ``Name(arg=value, ...)``."""

    name: str
    arg_names: list[str]
    arg_types: list[str]

    def describe(self, payload: bytes) -> str:
        try:
            values = abi_decode(self.arg_types, payload)
        except DecodingError:
            return self.name
        args = ", ".join(f"{n}={_show(v)}" for n, v in zip(self.arg_names, values, strict=True))
        return f"{self.name}({args})"


def custom_errors(abi: Sequence[Mapping[str, Any]]) -> dict[bytes, CustomError]:
    """Custom errors by 4-byte selector."""
    errors: dict[bytes, CustomError] = {}
    for item in abi:
        if item["type"] == "error":
            types = [abi_type(arg) for arg in item["inputs"]]
            selector = keccak(f"{item['name']}({','.join(types)})".encode())[:4]
            errors[selector] = CustomError(
                item["name"], [arg["name"] for arg in item["inputs"]], types
            )
    return errors


def abi_type(param: Mapping[str, Any]) -> str:
    """The canonical type of an ABI parameter: a struct as ``(t1,t2,...)``, arrays kept."""
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(abi_type(c) for c in param["components"])
        return f"({inner}){kind.removeprefix('tuple')}"
    return kind


def update_tuple(record: UpdateRecord) -> tuple[object, ...]:
    """The contract's ``Update`` struct, in the order of ``UPDATE_FIELDS``."""
    return tuple(
        b32(cast(bytes, value)) if field.sol_type == "bytes32" else value
        for field, value in zip(UPDATE_FIELDS, record, strict=True)
    )


def b32(value: bytes) -> bytes:
    if len(value) != 32:
        raise ChainError(f"expected 32 bytes, got {len(value)}")
    return bytes(value)


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)
