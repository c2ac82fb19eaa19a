"""CKKS profiles and key roles on TenSEAL 0.3.18: who may encrypt, add and decrypt.

Three roles hold three different contexts. In single-key mode the task owner holds the only
secret key (in threshold mode no context holds one: :mod:`truscl.privacy.threshold`); devices
get the public context (encrypt only); the aggregator gets a context with no key at all, which
is enough to add ciphertexts and nothing else. Every context a device or aggregator loads is
checked to hold no secret key, and every ciphertext is checked against the task's parameters
before it is added, so a malformed update fails loudly instead of poisoning the sum.

No Galois or relinearisation keys are ever kept: adding needs neither, and Galois keys alone
would cost 17-300 MB per context.

Contexts are TenSEAL's; ciphertexts are SEAL's own, through ``tenseal.sealapi``: devices encode
two values per complex slot with SEAL's ``CKKSEncoder`` and encrypt with the public key, the
aggregator adds their residues as SEAL's ``Evaluator`` would (:class:`VectorSum`, without
loading them into SEAL), and each ciphertext travels as SEAL saves it (zstd),
in the small container of :func:`pack_vector`. Half the bytes per value of ``ts.ckks_vector``,
which puts one real in each slot. SEAL's layouts stay in :mod:`truscl.privacy.seal_layout`.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from truscl.errors import HeError
from truscl.hashing import keccak
from truscl.keyfile import read_secret, write_secret
from truscl.privacy import seal_layout

# SEAL's CoeffModulus::MaxBitCount: the largest total modulus that keeps 128-bit security.
_MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# SEAL accepts primes of 2 to 60 bits.
_PRIME_BITS = range(2, 61)
# TenSEAL parse and parameter errors surface as any of these.
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError)


@dataclass(frozen=True)
class CkksProfile:
    """A named, checked CKKS parameter set; the task spec names one.

    The last prime of ``coeff_mod_bit_sizes`` is SEAL's special (key-switching) prime; the
    others are data primes. A ciphertext carries ``poly_modulus_degree`` values (two per
    complex slot) in two polynomials of 8 bytes per coefficient per data prime before SEAL's
    zstd: 16 bytes per value for one 60-bit prime, 12 for one 40-bit prime. A vector shorter
    than ``values_per_ciphertext`` still costs a whole ciphertext.

    ``smudging_bits``: each key holder's smudging noise at decryption is Gaussian with sigma
    ``2^smudging_bits`` per plaintext coefficient (see :mod:`truscl.privacy.threshold`).
    ``threshold``: whether the key may be shared among several holders (threshold decryption).
    ``encryption_noise``: a bound on the decryption error of an aggregate without smudging,
    from measurements (``bench/wire.py``); the release check adds it to its slack.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale_bits: int
    smudging_bits: int = 20
    threshold: bool = True
    encryption_noise: float = 1e-6

    def __post_init__(self) -> None:
        limit = _MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        if limit is None:
            raise HeError(
                f"{self.name}: unsupported poly_modulus_degree {self.poly_modulus_degree}"
            )
        if len(self.coeff_mod_bit_sizes) < 2:
            raise HeError(f"{self.name}: need a data prime and a special prime")
        if any(bits not in _PRIME_BITS for bits in self.coeff_mod_bit_sizes):
            raise HeError(f"{self.name}: every prime must have 2 to 60 bits")
        if sum(self.coeff_mod_bit_sizes) > limit:
            raise HeError(
                f"{self.name}: {sum(self.coeff_mod_bit_sizes)} modulus bits exceed the 128-bit "
                f"security limit of {limit} for degree {self.poly_modulus_degree}"
            )
        if not 0 < self.global_scale_bits < self.coeff_mod_bit_sizes[0]:
            raise HeError(f"{self.name}: the scale must leave headroom in the first data prime")

    @property
    def values_per_ciphertext(self) -> int:
        """Values per ciphertext; longer vectors are split over several ciphertexts."""
        return seal_layout.values_per_ciphertext(self.poly_modulus_degree)

    @property
    def smudging_sigma(self) -> float:
        return 2.0**self.smudging_bits

    def smudging_error(self, sigma: float) -> float:
        """Standard deviation, per decoded value, of one holder's smudging noise of ``sigma``
        per coefficient: the canonical embedding sums N coefficients times unit roots, and the
        real (or imaginary) part keeps half of the variance."""
        return sigma * math.sqrt(self.poly_modulus_degree / 2) / 2.0**self.global_scale_bits

    def new_context(self) -> ts.Context:
        """A fresh context with a new secret key (and, TenSEAL's choice, relin keys)."""
        try:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
            )
        except _TENSEAL_ERRORS as exc:
            raise HeError(f"{self.name}: SEAL refused the parameters: {exc}") from exc
        context.global_scale = 2.0**self.global_scale_bits
        return context


PROFILES: dict[str, CkksProfile] = {
    profile.name: profile
    for profile in (
        # One 60-bit data prime at scale 2^40: max error ~1.5e-8 for a sum of 10 fresh
        # encryptions, 16.03 B per value in full ciphertexts of 4096 values (65,659 bytes);
        # cannot multiply, so weights are applied before. The one threshold decryption uses.
        CkksProfile("ckks-4096-60-49", 4096, (60, 49), 40),
        # Same precision and bytes per value in full ciphertexts, but 8192 values each: a short
        # vector costs 128 KB instead of 64 KB.
        CkksProfile("ckks-8192-60-49", 8192, (60, 49), 40),
        # Compact: one 40-bit data prime at scale 2^26, 12.0 B per value in full ciphertexts;
        # max error ~2.5e-4 for a sum of 10 (bound 5e-3). Threshold smudging (sigma 2^20) would
        # cost ~0.7 per value per holder here: single-key only, its owner smudging with 2^12,
        # ~2^4.5 above the aggregate's own noise (max ~2^7.5 per coefficient); released error
        # up to ~1e-2 per value. Measured by bench/wire.py.
        CkksProfile(
            "ckks-4096-40-40",
            4096,
            (40, 40),
            26,
            smudging_bits=12,
            threshold=False,
            encryption_noise=5e-3,
        ),
    )
}
DEFAULT_PROFILE = PROFILES["ckks-4096-60-49"]


def _serialize_without_optional_keys(context: ts.Context, *, public: bool, secret: bool) -> bytes:
    return context.serialize(
        save_public_key=public,
        save_secret_key=secret,
        save_galois_keys=False,
        save_relin_keys=False,
    )


class OwnerKeys:
    """The task owner's secret-key context: the only thing in truscl that can decrypt.

    It also derives the two contexts the other roles receive, so neither can ever be produced
    with the secret key in it by mistake.
    """

    def __init__(self, context: ts.Context) -> None:
        if not context.is_private():
            raise HeError("owner keys need a context that holds the secret key")
        self._context = context

    @classmethod
    def generate(cls, profile: CkksProfile = DEFAULT_PROFILE) -> OwnerKeys:
        """New keys for one task.

        TenSEAL generates relinearisation keys with every context; a round trip through bytes
        without them drops them, so the owner's context is as small as the roles need.
        """
        fresh = profile.new_context()
        return cls(
            load_context(
                _serialize_without_optional_keys(fresh, public=True, secret=True),
                expect_private=True,
            )
        )

    @property
    def context(self) -> ts.Context:
        return self._context

    def public_context_bytes(self) -> bytes:
        """Parameters and public key: what devices get, and whose hash goes on chain."""
        return _serialize_without_optional_keys(self._context, public=True, secret=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the secret context to a new 0600 file (see :mod:`truscl.keyfile`)."""
        write_secret(
            path, _serialize_without_optional_keys(self._context, public=True, secret=True)
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OwnerKeys:
        """Read keys written by :meth:`save`, refusing a file others can read or write."""
        return cls(load_context(read_secret(path), expect_private=True))


def aggregator_context_bytes(public_context: bytes) -> bytes:
    """Parameters only (~100 bytes), from the published context: enough to load and add
    ciphertexts, not to encrypt, let alone decrypt. The aggregator holds nothing more.

    Such a context must be serialised with every key flag off: TenSEAL 0.3.18's default
    ``serialize()`` crashes the process (SIGSEGV) on a context without a public key.
    """
    public = load_context(public_context)
    return _serialize_without_optional_keys(public, public=False, secret=False)


def context_hash(context_bytes: bytes) -> bytes:
    """Keccak-256 of a serialised context, as anchored on chain and checked by devices."""
    return bytes(keccak(context_bytes))


def load_context(data: bytes, *, expect_private: bool = False) -> ts.Context:
    """Parse a serialised CKKS context, refusing a secret key where none belongs.

    A device or aggregator that accepted a context with the secret key could decrypt individual
    updates, which is exactly what the role split forbids; so holding one is an error unless the
    caller is the owner and says so.
    """
    try:
        context = ts.context_from(bytes(data))
        scheme = context.seal_context().data.first_context_data().parms().scheme()
    except _TENSEAL_ERRORS as exc:
        raise HeError(f"not a TenSEAL context: {exc}") from exc
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise HeError(f"expected a CKKS context, got {scheme}")
    if context.is_private() != expect_private:
        raise HeError(
            "context holds a secret key" if context.is_private() else "context has no secret key"
        )
    return context


def _values_per_ciphertext(context: ts.Context) -> int:
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    return seal_layout.values_per_ciphertext(int(degree))


_VECTOR_MAGIC = b"TRCV1"
_VECTOR_HEADER = struct.Struct("<IH")  # values, ciphertexts
_LENGTH = struct.Struct("<I")


def pack_vector(size: int, ciphertexts: Sequence[bytes]) -> bytes:
    """truscl's encrypted vector: magic ``TRCV1``, u32 value count, u16 ciphertext count, then
    each SEAL-saved ciphertext prefixed by its u32 length (all little-endian)."""
    body = b"".join(_LENGTH.pack(len(blob)) + blob for blob in ciphertexts)
    return _VECTOR_MAGIC + _VECTOR_HEADER.pack(size, len(ciphertexts)) + body


def unpack_vector(data: bytes) -> tuple[int, list[bytes]]:
    """The value count and the SEAL-saved ciphertexts of :func:`pack_vector`'s bytes."""
    data = bytes(data)
    start = len(_VECTOR_MAGIC) + _VECTOR_HEADER.size
    if not data.startswith(_VECTOR_MAGIC) or len(data) < start:
        raise HeError("not a truscl encrypted vector")
    size, count = _VECTOR_HEADER.unpack_from(data, len(_VECTOR_MAGIC))
    blobs, pos = [], start
    for _ in range(count):
        if pos + _LENGTH.size > len(data):
            raise HeError("truncated encrypted vector")
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if pos + length > len(data):
            raise HeError("truncated encrypted vector")
        blobs.append(data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise HeError("trailing bytes after the encrypted vector")
    return size, blobs


class EncryptedVector:
    """A vector of reals as SEAL ciphertexts, two values per complex slot."""

    def __init__(self, context: ts.Context, ciphertexts: list[sealapi.Ciphertext], size: int):
        self._context = context
        self.ciphertexts = ciphertexts
        self.size = size

    def serialize(self) -> bytes:
        return pack_vector(self.size, [seal_layout.save_ciphertext(c) for c in self.ciphertexts])


def encrypt(public_context: ts.Context, values: np.ndarray) -> bytes:
    """Encrypt a flat vector of finite floats under the task's public key, two values per
    complex slot, with SEAL's encoder and public-key encryptor (no secret key is involved)."""
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
        raise HeError(f"need a non-empty 1-D vector of finite values, got shape {vector.shape}")
    if not public_context.has_public_key():
        raise HeError("this context has no public key and cannot encrypt")
    width = _values_per_ciphertext(public_context)
    seal_context = public_context.seal_context().data
    try:
        encoder = sealapi.CKKSEncoder(seal_context)
        encryptor = sealapi.Encryptor(seal_context, public_context.public_key().data)
        blobs = []
        for start in range(0, vector.size, width):
            plain, ciphertext = sealapi.Plaintext(), sealapi.Ciphertext()
            encoder.encode(
                seal_layout.to_slots(vector[start : start + width]),
                public_context.global_scale,
                plain,
            )
            encryptor.encrypt(plain, ciphertext)
            blobs.append(seal_layout.save_ciphertext(ciphertext))
    except _TENSEAL_ERRORS as exc:
        raise HeError(f"encryption failed: {exc}") from exc
    return pack_vector(vector.size, blobs)


def load_ciphertext(context: ts.Context, data: bytes, expected_size: int) -> EncryptedVector:
    """Parse an encrypted vector and check it can be added to others of the same task.

    SEAL rejects ciphertexts whose parameters differ from the context's. On top of that the
    vector must have ``expected_size`` values, exactly the ciphertexts that size needs, each
    fresh (two polynomials, top level, NTT form) at the context's scale. A ciphertext made
    under another key with the same parameters cannot be told apart: it decrypts to noise.
    """
    size, blobs = unpack_vector(data)
    if size != expected_size:
        raise HeError(f"ciphertext holds {size} values, expected {expected_size}")
    if len(blobs) != math.ceil(expected_size / _values_per_ciphertext(context)):
        raise HeError(f"{len(blobs)} ciphertexts cannot hold {expected_size} values")
    top_level = context.seal_context().data.first_parms_id()
    ciphertexts = []
    for blob in blobs:
        ciphertext = seal_layout.load_seal_ciphertext(context, blob)
        if ciphertext.parms_id() != top_level or ciphertext.size() != 2:
            raise HeError("ciphertext is not a fresh encryption at the context's level")
        if not ciphertext.is_ntt_form() or ciphertext.is_transparent():
            raise HeError("ciphertext is not in NTT form, or is transparent")
        if ciphertext.scale != context.global_scale:
            raise HeError(f"ciphertext scale {ciphertext.scale} != {context.global_scale}")
        ciphertexts.append(ciphertext)
    return EncryptedVector(context, ciphertexts, size)


@dataclass(frozen=True)
class VectorFormat:
    """What every encrypted vector of a task is: ``size`` values in the ciphertexts of
    ``layout``. It parses and checks a vector without SEAL (thread-safe: nothing changes)."""

    context: ts.Context
    size: int
    layout: seal_layout.CiphertextLayout
    ciphertexts: int  # how many hold ``size`` values

    @classmethod
    def of(cls, context: ts.Context, size: int) -> VectorFormat:
        count = math.ceil(size / _values_per_ciphertext(context))
        return cls(context, size, seal_layout.CiphertextLayout.of(context), count)

    @property
    def max_bytes(self) -> int:
        """The most a vector of this task takes in :func:`pack_vector`'s bytes."""
        header = len(_VECTOR_MAGIC) + _VECTOR_HEADER.size
        return header + self.ciphertexts * (_LENGTH.size + self.layout.max_saved_bytes)

    def residues(self, data: bytes) -> np.ndarray:
        """The ``(ciphertexts, 2, L, N)`` residues of a vector of this task, after the checks
        of :func:`load_ciphertext` (``HeError`` saying which failed)."""
        size, blobs = unpack_vector(data)
        if size != self.size:
            raise HeError(f"ciphertext holds {size} values, expected {self.size}")
        if len(blobs) != self.ciphertexts:
            raise HeError(f"{len(blobs)} ciphertexts cannot hold {self.size} values")
        return np.stack([self.layout.residues(blob) for blob in blobs])


class VectorSum:
    """A running sum of one task's encrypted vectors, in place: memory stays that of one.

    Added as numpy residues (the same modular addition SEAL's evaluator makes, about ten times
    cheaper than loading each ciphertext into SEAL); serialised by SEAL itself, zstd, so the
    bytes are those SEAL's own sum would save. CKKS addition is exact and the serialisation
    deterministic: the bytes (and hash) do not depend on the order of the updates, so an
    auditor can re-sum the archive and compare hashes.
    """

    def __init__(self, vectors: VectorFormat) -> None:
        self.vectors = vectors
        self._total: np.ndarray | None = None

    def add(self, residues: np.ndarray) -> None:
        """Add a vector's residues from :meth:`VectorFormat.residues`."""
        if self._total is None:
            self._total = np.array(residues)  # its own, writable copy
        else:
            self.vectors.layout.add(self._total, residues)

    def serialize(self) -> bytes:
        if self._total is None:
            raise HeError("no ciphertexts to sum")
        layout = self.vectors.layout
        saved = [
            seal_layout.save_ciphertext(
                seal_layout.load_seal_ciphertext(self.vectors.context, layout.saved(residues))
            )
            for residues in self._total
        ]
        return pack_vector(self.vectors.size, saved)


def sum_ciphertexts(context: ts.Context, blobs: Iterable[bytes], expected_size: int) -> bytes:
    """Serialised sum of encrypted vectors, each validated before it is added (see
    :class:`VectorSum`)."""
    total = VectorSum(VectorFormat.of(context, expected_size))
    for blob in blobs:
        total.add(total.vectors.residues(blob))
    return total.serialize()


def decrypt(owner_keys: OwnerKeys, data: bytes, expected_size: int) -> np.ndarray:
    """Exact decryption of an aggregate, for the owner only, with SEAL's decryptor and encoder.

    Never publish this result as is: a ciphertext with its exact decryption lets an attacker
    recover the secret key (Li-Micciancio). Round or add noise before anything leaves the owner.
    """
    context = owner_keys.context
    vector = load_ciphertext(context, data, expected_size)
    decryptor = sealapi.Decryptor(context.seal_context().data, context.secret_key().data)
    values = []
    for ciphertext in vector.ciphertexts:
        plain = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plain)
        values.append(seal_layout.decode(context, plain))
    return np.concatenate(values)[:expected_size]
