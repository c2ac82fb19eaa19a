"""CBOR envelope: every message is a map with a version, a type and typed fields.

Decoding is the first thing that touches bytes from the network, so it checks the size before
parsing and every field's type after, and raises :class:`ProtocolError` with a reason the
receiver can log. Nothing downstream sees an unchecked message.
"""

from __future__ import annotations

from typing import Any

import cbor2

from truscl.errors import ProtocolError

VERSION = 2  # 2: a signed update travels and is archived under its own id, not its keccak
# The widest integer a field may hold (a uint64, like the contract's widest). CBOR carries larger
# integers as bignums (tags 2 and 3) and cbor2 turns them into Python ints silently: without
# this bound a bignum would travel on until some later cast failed far from the network edge.
MAX_INT = 2**64 - 1

# field name -> Python type; bool is checked before int because bool is an int subclass.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "chunk": {"blob": bytes, "index": int, "count": int, "data": bytes},
    "update": {
        "task": bytes,
        "round": int,
        "device": bytes,
        "ciphertext": bytes,
        "context": bytes,
        "samples": int,
        "epsilon_micros": int,
        "data_root": bytes,
        "signature": bytes,
    },
    "receipt": {
        "task": bytes,
        "round": int,
        "device": bytes,
        "update": bytes,
        "accepted": bool,
        "reason": str,
        "counted_in": int,
        "signature": bytes,
    },
    "inclusion": {
        "round": int,
        "leaf": bytes,
        "proof": list,
        "root": bytes,
        "anchor_tx": str,
    },
    "round": {"round": int, "model_hash": bytes, "deadline": float},
    "model": {"round": int, "params": bytes, "model_hash": bytes},
    "aggregate": {
        "round": int,
        "ciphertext": bytes,
        "updates": int,
        "samples": int,
        "root": bytes,
        "anchor_tx": str,
    },
    "spec": {"spec": dict},
    # The key holders' messages (truscl.wire.keyholders), in threshold mode only.
    "keygen": {"task": bytes, "holder": str, "step": str, "data": bytes, "signature": bytes},
    "partial": {
        "task": bytes,
        "round": int,
        "holder": str,
        "aggregate": bytes,
        "partial": bytes,
        "signature": bytes,
    },
}


def encode(kind: str, **fields: Any) -> bytes:
    _check(kind, fields)
    return cbor2.dumps({"v": VERSION, "type": kind, **fields}, canonical=True)


def decode(payload: bytes, kind: str, max_bytes: int) -> dict[str, Any]:
    """Parse ``payload`` as a message of type ``kind`` no larger than ``max_bytes``."""
    return decode_any(payload, (kind,), max_bytes)[1]


def decode_any(
    payload: bytes, kinds: tuple[str, ...], max_bytes: int
) -> tuple[str, dict[str, Any]]:
    """Parse a message that may be of any of ``kinds``; returns its type and fields."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        message = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for garbage
        raise ProtocolError(f"undecodable CBOR: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a CBOR map")
    if message.get("v") != VERSION:
        raise ProtocolError(f"unsupported envelope version {message.get('v')!r}")
    kind = message.get("type")
    if kind not in kinds:
        raise ProtocolError(f"expected a {' or '.join(kinds)} message, got {kind!r}")
    fields = {k: v for k, v in message.items() if k not in ("v", "type")}
    _check(kind, fields)
    return kind, fields


def _check(kind: str, fields: dict[str, Any]) -> None:
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    if set(fields) != set(schema):
        missing = sorted(set(schema) - set(fields))
        extra = sorted(set(fields) - set(schema))
        raise ProtocolError(f"{kind} fields wrong: missing {missing}, unexpected {extra}")
    for name, expected in schema.items():
        value = fields[name]
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            if not (expected is float and isinstance(value, int) and not isinstance(value, bool)):
                raise ProtocolError(f"{kind}.{name} must be {_name(expected)}")
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ProtocolError(f"{kind}.{name} must not be negative")
            if value > MAX_INT:
                raise ProtocolError(f"{kind}.{name} out of range: a bignum (2^64 or more)")


def _name(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return expected.__name__
