"""One round's signed update, made from a window of readings: DP-SGD, clipping, encryption and
signing, with no transport, disk or clock.

Kept apart from the agent so that what a device releases can be tested (and reasoned about)
on its own: its only inputs are the model, the readings, the task's terms, the keys and the
generator the DP noise is drawn from, and the privacy ledger has already been charged for it
by the caller.

The data commitment (``data_root``) is also computed here, from the round's secret and the
window, so that its rule (docs/protocol.md, "The data commitment") has one implementation that
the device, the tests and the worked examples share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from truscl.agent.litert import Trainer, numpy_trainer
from truscl.agent.sensors import Reading
from truscl.hashing import keccak
from truscl.privacy.ckks import encrypt
from truscl.privacy.dp import DpSgdConfig, clip_by_l2, secure_generator
from truscl.task import TaskSpec
from truscl.wire import Domain, Update, merkle_root
from truscl.wire.signing import Signer


@dataclass(frozen=True)
class UpdateInputs:
    """Everything an update is made of besides the keys and the noise."""

    round: int
    params: np.ndarray  # model ``round - 1``, as checked against the chain
    window: list[Reading]  # the readings trained on: min_readings to window of them
    epsilon_spent: float  # the ledger's epsilon, this round's charge included
    data_root: bytes  # Merkle root of the salted readings (:func:`data_root`)


ROUND_SECRET_BYTES = 32


def data_salt(round_secret: bytes, index: int) -> bytes:
    """The salt of the ``index``-th reading of a window: ``keccak(round_secret ‖ uint256(index))``.

    One salt per leaf, not one per round: a data-contribution proof opens a leaf by revealing
    its salt and reading, and with a shared salt that would let anyone test guesses of every
    other reading of the window against its sibling leaves. keccak's preimage resistance keeps
    the round secret, hence every other salt, hidden behind an opened one. ``index`` is 32
    bytes big-endian, as ``abi.encodePacked(bytes32, uint256)``, so a contract can derive it.
    """
    if len(round_secret) != ROUND_SECRET_BYTES:
        raise ValueError(f"a round secret is {ROUND_SECRET_BYTES} bytes, not {len(round_secret)}")
    if not 0 <= index < 2**256:
        raise ValueError(f"reading index {index} is out of range")
    return keccak(round_secret + index.to_bytes(32, "big"))


def data_leaf(round_secret: bytes, index: int, reading: Reading) -> bytes:
    """``keccak(salt_index ‖ reading's canonical CBOR)``: the leaf of one trained-on reading."""
    return keccak(data_salt(round_secret, index) + reading.encode())


def data_root(round_secret: bytes, window: list[Reading]) -> bytes:
    """Merkle root (docs/protocol.md's rules) of the window's leaves, reading ``i`` salted with
    ``data_salt(round_secret, i)``; per-leaf salts also keep two equal readings apart."""
    return merkle_root([data_leaf(round_secret, i, r) for i, r in enumerate(window)])


def private_delta(
    spec: TaskSpec,
    params: np.ndarray,
    window: Sequence[Reading],
    rng: np.random.Generator,
    train: Trainer | None = None,
) -> np.ndarray:
    """The model delta a device releases: the task's model trained with DP-SGD on the window,
    at the sampling rate its size gives (the rate the ledger was charged at), then clipped to
    the task's update bound. ``train`` is the DP-SGD backend
    (:class:`truscl.agent.litert.ModelRuntime`'s); numpy's :func:`dp_sgd` by default."""
    dp = spec.dp
    config = DpSgdConfig(
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        sampling_rate=spec.sampling_rate_for(len(window)),
        steps=dp.local_steps,
        learning_rate=dp.learning_rate,
    )
    X, y = spec.inputs(window), spec.targets(window)
    if train is None:
        train = numpy_trainer(spec)
    trained = train(params, X, y, config, rng)
    return clip_by_l2(trained - params, dp.update_clip)


def make_update(
    spec: TaskSpec,
    inputs: UpdateInputs,
    *,
    context: ts.Context,
    account: Signer,
    domain: Domain,
    rng: np.random.Generator | None = None,
    train: Trainer | None = None,
) -> Update:
    """The window's :func:`private_delta`, encrypted under the task's public key and signed
    (EIP-712) with the device's key.

    The sampling and the noise come from ``rng``; by default a fresh OS-seeded generator for
    this update alone (:func:`secure_generator`), which is what a device uses: one per round,
    so no generator state outlives the round it protects. Tests pass a seeded one.
    """
    if rng is None:
        rng = secure_generator()
    delta = private_delta(spec, inputs.params, inputs.window, rng, train)
    return Update(
        task=spec.task_id,
        round=inputs.round,
        device=bytes.fromhex(account.address[2:]),
        ciphertext=encrypt(context, delta),
        context=bytes.fromhex(spec.context_hash[2:]),
        samples=len(inputs.window),
        epsilon_micros=round(inputs.epsilon_spent * 1e6),
        data_root=inputs.data_root,
    ).signed(account, domain)
