"""Thin typed client for the ``Truscl`` contract.

Each role (owner, aggregator, registrar) holds its own key and signs its transactions locally, so
no node ever needs an unlocked account and the same code talks to the embedded EVM and to a real
node over JSON-RPC. Every call is made under a lock shared by all clients of one chain, because
eth-tester is not thread-safe and a local nonce must not be read twice before it is used. Every
failure, a revert or a node that cannot be reached, leaves as a ``ChainError`` naming the node:
a service tells "the chain said no" and "the chain is away, try later" from its own bugs.
"""

from __future__ import annotations

import ast
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError
from web3.types import FilterParams, LogReceipt, Nonce, TxParams, TxReceipt

from truscl.chain.reader import TaskRecord, b32, custom_errors, update_tuple
from truscl.chain.rpc import rpc_errors
from truscl.contracts import load_artifact
from truscl.errors import ChainError
from truscl.hashing import keccak
from truscl.wire.signing import checksum_address
from truscl.wire.update import UpdateRecord

try:
    from eth_tester.exceptions import TransactionFailed

    REVERTS: tuple[type[Exception], ...] = (TransactionFailed, ContractLogicError)
except ImportError:  # a device reaches a node and never installs the in-process EVM
    REVERTS = (ContractLogicError,)

_T = TypeVar("_T")

# Gas limits passed explicitly, so no transaction waits for an estimate (slow and flaky on
# eth-tester). About twice what each call was measured to use in the worst case, so a
# change to the contract that makes a call much dearer fails loudly in the tests.
GAS_LIMITS: Mapping[str, int] = {
    "deploy": 2_500_000,
    "registerDevice": 100_000,
    "createTask": 300_000,
    "anchorRound": 250_000,
    "publishModel": 120_000,
    "refuseRound": 120_000,
}

_REVERTED_PREFIX = "execution reverted: "
# Blocks per eth_getLogs request: public providers refuse wide ranges, and a narrow one keeps
# each answer small.
LOG_SPAN = 5_000
REGISTRAR_ROLE = keccak(b"REGISTRAR_ROLE")  # the contract's constant of the same name


@dataclass(frozen=True)
class RoundAnchor:
    """What the aggregator committed to when it closed a round."""

    updates_root: bytes
    aggregate_hash: bytes
    updates: int
    block_number: int


class ChainClient:
    """One role's view of a deployed ``Truscl`` contract.

    With ``account=None`` the client is read-only (the auditor's view): any transaction raises
    ``ChainError`` before touching the chain.
    """

    def __init__(
        self,
        w3: Web3,
        address: str,
        account: LocalAccount | None,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        artifact = load_artifact("Truscl")
        self._w3 = w3
        self._account = account
        self._lock: AbstractContextManager[Any] = lock if lock is not None else threading.RLock()
        self._contract: Contract = w3.eth.contract(
            address=Web3.to_checksum_address(address), abi=artifact["abi"]
        )
        self._errors = custom_errors(artifact["abi"])
        self._device_registered = HexStr(self._contract.events.DeviceRegistered.topic)
        self.node = node_name(w3)

    @classmethod
    def at(
        cls,
        w3: Web3,
        address: str,
        account: LocalAccount | None = None,
        lock: AbstractContextManager[Any] | None = None,
    ) -> ChainClient:
        """A client for a contract that is already deployed."""
        return cls(w3, address, account, lock)

    @classmethod
    def deploy(
        cls,
        w3: Web3,
        account: LocalAccount,
        lock: AbstractContextManager[Any] | None = None,
    ) -> ChainClient:
        """Deploy a fresh contract; ``account`` becomes its admin and first registrar."""
        client_lock: AbstractContextManager[Any] = lock if lock is not None else threading.RLock()
        receipt = deploy_transaction(w3, account, client_lock)
        return cls(w3, contract_address(receipt), account, client_lock)

    @property
    def account(self) -> LocalAccount | None:
        """The key this client signs with (None for a read-only client)."""
        return self._account

    @property
    def address(self) -> ChecksumAddress:
        return self._contract.address

    @property
    def chain_id(self) -> int:
        return self._read(lambda: self._w3.eth.chain_id)

    def deployment_block(self) -> int:
        """Block the contract was deployed in, read from the contract itself.

        An auditor needs only the address: event logs are searched from this block on, rather
        than from genesis or from a number someone wrote down.
        """
        return int(self._call(self._contract.functions.deploymentBlock()))

    # --- device registry ---------------------------------------------------------------------

    def register_device(self, device: str) -> str:
        return self._transact(
            "registerDevice", self._contract.functions.registerDevice(_addr(device))
        )

    def register_devices(self, devices: Sequence[str]) -> list[str | ChainError]:
        """Register many devices: each call simulated, then every transaction sent with
        consecutive nonces, then their receipts awaited, so that a fleet waits for a block or
        two on a public chain rather than one block per device. Per device, in order: its
        transaction hash, or the ``ChainError`` that kept it out (a revert, with the
        contract's reason, or a mined failure). A node that fails mid-way raises
        ``ChainError``; the devices sent before are registered all the same."""
        name = "registerDevice"
        account = self._signer(name)
        outcomes: list[ChainError | HexBytes] = []
        with self._lock, rpc_errors(self.node):
            fields = _tx_fields(self._w3, account, GAS_LIMITS[name])
            nonce = int(fields["nonce"])
            for device in devices:
                fn = self._contract.functions.registerDevice(_addr(device))
                try:
                    fn.call({"from": account.address})
                except REVERTS as exc:
                    outcomes.append(ChainError(f"{name} reverted: {self._reason(exc)}"))
                    continue
                tx = fn.build_transaction({**fields, "nonce": Nonce(nonce)})
                outcomes.append(_sign_and_send(self._w3, account, tx))
                nonce += 1
            results: list[str | ChainError] = []
            for outcome in outcomes:
                if isinstance(outcome, ChainError):
                    results.append(outcome)
                    continue
                mined = _receipt(self._w3, outcome, GAS_LIMITS[name], name)
                results.append(mined if isinstance(mined, ChainError) else _hex(outcome))
            return results

    def is_device(self, device: str) -> bool:
        return bool(self._call(self._contract.functions.isDevice(_addr(device))))

    def block_number(self) -> int:
        return int(self._read(lambda: self._w3.eth.block_number))

    def registered_devices(self, from_block: int, to_block: int) -> list[ChecksumAddress]:
        """Devices whose ``DeviceRegistered`` event lies in ``from_block..to_block``, in order.

        The contract never unregisters a device, so these events alone rebuild the registry:
        a cache of them answers "is this a device?" without a call per question. The device
        is the event's first indexed topic, read from the raw logs: web3's decoding of each
        event's ABI cost about 0.25 ms more a device (0.35 s for a first scan of 1,000
        devices against 0.1 s), on the path of the updates that wait for it.
        """
        devices: list[ChecksumAddress] = []
        for start in range(from_block, to_block + 1, LOG_SPAN):
            end = min(start + LOG_SPAN - 1, to_block)
            logs = self._read(functools.partial(self._registrations, start, end))
            devices.extend(
                cast(ChecksumAddress, checksum_address(bytes(log["topics"][1])[-20:]))
                for log in logs
            )
        return devices

    def _registrations(self, from_block: int, to_block: int) -> list[LogReceipt]:
        filter_params: FilterParams = {
            "address": self.address,
            "topics": [self._device_registered],
            "fromBlock": from_block,
            "toBlock": to_block,
        }
        return self._w3.eth.get_logs(filter_params)

    def is_registrar(self, account: str) -> bool:
        """Whether ``account`` may register devices: asked before sending, so a wrong key
        fails once with a clear reason rather than once per device."""
        fn = self._contract.functions.hasRole(REGISTRAR_ROLE, _addr(account))
        return bool(self._call(fn))

    # --- tasks -------------------------------------------------------------------------------

    def create_task(
        self,
        task_id: bytes,
        spec_hash: bytes,
        context_hash: bytes,
        aggregator: str,
        rounds: int,
        *,
        epsilon_micros: int,
        budget_micros: int,
        min_cohort: int,
    ) -> str:
        """Create a task; the contract refuses one whose rounds would spend more epsilon than
        its budget (``BudgetExceeded``) or whose minimum cohort is below 2."""
        fn = self._contract.functions.createTask(
            b32(task_id),
            b32(spec_hash),
            b32(context_hash),
            _addr(aggregator),
            rounds,
            epsilon_micros,
            budget_micros,
            min_cohort,
        )
        return self._transact("createTask", fn)

    def min_cohort(self, task_id: bytes) -> int:
        """The fewest accepted updates a round needs before any key holder decrypts it."""
        return int(self._call(self._contract.functions.minCohort(b32(task_id))))

    def task(self, task_id: bytes) -> TaskRecord:
        """The task's terms; ``ChainError`` (UnknownTask) if it was never created."""
        owner, aggregator, spec_hash, context_hash, rounds, anchored, epsilon, budget = self._call(
            self._contract.functions.getTask(b32(task_id))
        )
        return TaskRecord(
            task_id=task_id,
            owner=owner,
            aggregator=aggregator,
            spec_hash=bytes(spec_hash),
            context_hash=bytes(context_hash),
            rounds=rounds,
            rounds_anchored=anchored,
            epsilon_micros=epsilon,
            epsilon_budget_micros=budget,
        )

    # --- rounds ------------------------------------------------------------------------------

    def anchor_round(
        self,
        task_id: bytes,
        round: int,
        updates_root: bytes,
        aggregate_hash: bytes,
        updates: int,
    ) -> str:
        fn = self._contract.functions.anchorRound(
            b32(task_id), round, b32(updates_root), b32(aggregate_hash), updates
        )
        return self._transact("anchorRound", fn)

    def round_anchor(self, task_id: bytes, round: int) -> RoundAnchor | None:
        """The anchor of ``round``, or ``None`` while it is not anchored."""
        root, aggregate, updates, block = self._call(
            self._contract.functions.getRoundAnchor(b32(task_id), round)
        )
        if block == 0:
            return None
        return RoundAnchor(bytes(root), bytes(aggregate), updates, block)

    def anchor_tx(self, task_id: bytes, round: int) -> str | None:
        """Hash of the transaction that anchored ``round``, read from its ``RoundAnchored`` log.

        A device's receipt and the audit cite it; the contract does not store it, because an
        event log holds the same fact for a fraction of the gas.
        """
        event = self._contract.events.RoundAnchored
        logs = self._read(
            lambda: list(
                event.get_logs(
                    argument_filters={"taskId": b32(task_id), "round": round}, from_block=0
                )
            )
        )
        if not logs:
            return None
        return _hex(logs[0]["transactionHash"])

    def gas_used(self, tx: str) -> int:
        """Gas the mined transaction ``tx`` used (the report plots it per anchor)."""
        receipt = self._read(lambda: self._w3.eth.get_transaction_receipt(HexStr(tx)))
        return int(receipt["gasUsed"])

    def update_leaf(self, record: UpdateRecord) -> bytes:
        """The contract's Merkle leaf for an update (equal to ``record.leaf()``)."""
        return bytes(self._call(self._contract.functions.updateLeaf(update_tuple(record))))

    def verify_update(
        self, record: UpdateRecord, proof: Sequence[bytes], counted_in: int | None = None
    ) -> bool:
        """Whether the update was counted in round ``counted_in`` (default: its own round; the
        next one for a late update): false too if that round is not anchored."""
        fn = self._contract.functions.verifyUpdate(
            update_tuple(record),
            record.round if counted_in is None else counted_in,
            [b32(p) for p in proof],
        )
        return bool(self._call(fn))

    # --- global model ------------------------------------------------------------------------

    def publish_model(self, task_id: bytes, round: int, model_hash: bytes) -> str:
        fn = self._contract.functions.publishModel(b32(task_id), round, b32(model_hash))
        return self._transact("publishModel", fn)

    def refuse_round(self, task_id: bytes, round: int, reason: int) -> str:
        """Record on chain that no model derived from ``round``'s aggregate will be released."""
        fn = self._contract.functions.refuseRound(b32(task_id), round, reason)
        return self._transact("refuseRound", fn)

    def round_refusal(self, task_id: bytes, round: int) -> int:
        """The reason code ``round`` was refused with (0: not refused)."""
        return int(self._call(self._contract.functions.roundRefusal(b32(task_id), round)))

    def model_hash(self, task_id: bytes, round: int) -> bytes | None:
        """Hash of the model published after ``round`` (0 = initial), ``None`` if none yet."""
        value = bytes(self._call(self._contract.functions.modelHash(b32(task_id), round)))
        return None if value == bytes(32) else value

    # --- plumbing ----------------------------------------------------------------------------

    def _read(self, fetch: Callable[[], _T]) -> _T:
        with self._lock, rpc_errors(self.node):
            try:
                return fetch()
            except REVERTS as exc:
                raise ChainError(f"call reverted: {self._reason(exc)}") from exc

    def _call(self, fn: ContractFunction) -> Any:
        return self._read(fn.call)

    def _transact(self, name: str, fn: ContractFunction) -> str:
        """Sign locally, send, wait; ``ChainError`` with the contract's reason on a revert.

        The call is simulated first: a revert then costs no gas and its reason is readable on
        every backend, whereas a mined failed transaction only says ``status 0``.
        """
        account = self._signer(name)
        with self._lock, rpc_errors(self.node):
            try:
                fn.call({"from": account.address})
            except REVERTS as exc:
                raise ChainError(f"{name} reverted: {self._reason(exc)}") from exc
            tx = fn.build_transaction(_tx_fields(self._w3, account, GAS_LIMITS[name]))
            receipt = _send(self._w3, account, tx, name)
        return _hex(receipt["transactionHash"])

    def _signer(self, name: str) -> LocalAccount:
        if self._account is None:
            raise ChainError(f"{name}: this client is read-only (no account)")
        return self._account

    def _reason(self, exc: Exception) -> str:
        """The custom error's name and arguments when they can be decoded, else the message."""
        data = _revert_data(exc)
        if data is not None and data[:4] in self._errors:
            return self._errors[data[:4]].describe(data[4:])
        return str(exc).removeprefix(_REVERTED_PREFIX)


def deploy_transaction(
    w3: Web3, account: LocalAccount, lock: AbstractContextManager[Any] | None = None
) -> TxReceipt:
    """Send the artifact's creation code signed by ``account``; the mined receipt.

    The receipt is what a deployment record is made of (address, block, transaction hash);
    :meth:`ChainClient.deploy` keeps only the address.
    """
    artifact = load_artifact("Truscl")
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    with lock if lock is not None else threading.RLock(), rpc_errors(node_name(w3)):
        tx = factory.constructor().build_transaction(_tx_fields(w3, account, GAS_LIMITS["deploy"]))
        receipt = _send(w3, account, tx, "deploy")
    contract_address(receipt)
    return receipt


def contract_address(receipt: TxReceipt) -> ChecksumAddress:
    """The address a deployment receipt names (``ChainError`` if none: not a deployment)."""
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError("deploy: the receipt names no contract address")
    return Web3.to_checksum_address(address)


def node_name(w3: Web3) -> str:
    """How errors name the node: its URL, or the in-process EVM's name."""
    return str(getattr(w3.provider, "endpoint_uri", None) or "the in-process EVM")


def _tx_fields(w3: Web3, account: LocalAccount, gas: int) -> TxParams:
    return {
        "from": account.address,
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "gas": gas,
        "chainId": w3.eth.chain_id,
    }


def _send(w3: Web3, account: LocalAccount, tx: TxParams, name: str) -> TxReceipt:
    receipt = _receipt(w3, _sign_and_send(w3, account, tx), tx["gas"], name)
    if isinstance(receipt, ChainError):
        raise receipt
    return receipt


def _sign_and_send(w3: Web3, account: LocalAccount, tx: TxParams) -> HexBytes:
    # TxParams and eth-account's TransactionDictType describe the same dict, typed apart.
    signed = account.sign_transaction(cast(dict[str, Any], tx))
    return w3.eth.send_raw_transaction(signed.raw_transaction)


def _receipt(w3: Web3, tx_hash: HexBytes, gas: Any, name: str) -> TxReceipt | ChainError:
    """The mined transaction's receipt, or the ``ChainError`` of a mined failure."""
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    if receipt["status"] != 1:
        return ChainError(
            f"{name} transaction {_hex(tx_hash)} failed (gas used {receipt['gasUsed']} of {gas})"
        )
    return receipt


def _revert_data(exc: Exception) -> bytes | None:
    """Raw revert data: a node puts it in ``data``, eth-tester in the message as a bytes repr."""
    if isinstance(exc, ContractLogicError) and isinstance(exc.data, str):
        return Web3.to_bytes(hexstr=HexStr(exc.data))
    message = str(exc).removeprefix(_REVERTED_PREFIX)
    if message.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(message)
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def _addr(address: str) -> ChecksumAddress:
    return Web3.to_checksum_address(address)
