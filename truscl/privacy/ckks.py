"""CKKS profiles and key roles on TenSEAL 0.3.18: who may encrypt, add and decrypt.

Three roles hold three different contexts. In single-key mode the task owner holds the only
secret key (in threshold mode no context holds one: :mod:`truscl.privacy.threshold`); devices
get the public context (encrypt only); the aggregator gets a context with no key at all, which
is enough to add ciphertexts and nothing else. Every context a device or aggregator loads is
checked to hold no secret key, and every ciphertext is checked against the task's parameters
before it is added, so a malformed update fails loudly instead of poisoning the sum.

No Galois or relinearisation keys are ever kept: adding needs neither, and Galois keys alone
would cost 17-300 MB per context.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from eth_utils import keccak

from truscl.errors import HeError
from truscl.keyfile import read_secret, write_secret

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
    others are data primes. Ciphertexts cost about 32 bytes per slot per data prime, and a
    vector shorter than ``slot_count`` still costs a whole ciphertext.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale_bits: int

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
    def slot_count(self) -> int:
        """Values per ciphertext; longer vectors are split over several ciphertexts."""
        return self.poly_modulus_degree // 2

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
        # One 60-bit data prime at scale 2^40: max error 1.8e-8 for a sum of 10 fresh
        # encryptions, ~32 B per value; cannot multiply, so weights are applied before.
        CkksProfile("ckks-4096-60-49", 4096, (60, 49), 40),
        # Same precision and 32 B per value in full ciphertexts, but 4096 slots: a short
        # vector costs 128 KB instead of 64 KB. For models above 2048 parameters.
        CkksProfile("ckks-8192-60-49", 8192, (60, 49), 40),
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


def _slot_count(context: ts.Context) -> int:
    return context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _tenseal_warning_silenced() -> Iterator[None]:
    """Swallow the warning ``ts.ckks_vector`` prints for vectors longer than one ciphertext.

    It would corrupt any tool whose stdout is data. TenSEAL's C++ ``std::cout`` is routed by
    pybind11 to whatever ``sys.stdout`` is at call time, so swapping that object is enough
    (file descriptor 1 is never written). The lock keeps concurrent swaps from restoring each
    other's sink.
    """
    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
        yield


def encrypt(public_context: ts.Context, values: np.ndarray) -> bytes:
    """Encrypt a flat vector of finite floats under the task's public key."""
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
        raise HeError(f"need a non-empty 1-D vector of finite values, got shape {vector.shape}")
    if not public_context.has_public_key():
        raise HeError("this context has no public key and cannot encrypt")
    try:
        if vector.size > _slot_count(public_context):
            with _tenseal_warning_silenced():
                encrypted = ts.ckks_vector(public_context, vector.tolist())
        else:
            encrypted = ts.ckks_vector(public_context, vector.tolist())
        return encrypted.serialize()
    except _TENSEAL_ERRORS as exc:
        raise HeError(f"encryption failed: {exc}") from exc


def load_ciphertext(context: ts.Context, data: bytes, expected_size: int) -> ts.CKKSVector:
    """Parse an encrypted vector and check it can be added to others of the same task.

    SEAL rejects ciphertexts whose parameters differ from the context's. On top of that the
    vector must have ``expected_size`` values, exactly the ciphertexts that size needs, each
    fresh (two polynomials, top level) at the context's scale. A ciphertext made under another
    key with the same parameters cannot be told apart: it decrypts to noise.
    """
    try:
        vector = ts.ckks_vector_from(context, bytes(data))
        ciphertexts = vector.ciphertext()
        size = vector.size()
    except _TENSEAL_ERRORS as exc:
        raise HeError(f"not a ciphertext for this context: {exc}") from exc
    if size != expected_size:
        raise HeError(f"ciphertext holds {size} values, expected {expected_size}")
    if len(ciphertexts) != math.ceil(expected_size / _slot_count(context)):
        raise HeError(f"{len(ciphertexts)} ciphertexts cannot hold {expected_size} values")
    top_level = context.seal_context().data.first_parms_id()
    for ciphertext in ciphertexts:
        if ciphertext.parms_id() != top_level or ciphertext.size() != 2:
            raise HeError("ciphertext is not a fresh encryption at the context's level")
        if not ciphertext.is_ntt_form() or ciphertext.is_transparent():
            raise HeError("ciphertext is not in NTT form, or is transparent")
        if ciphertext.scale != context.global_scale:
            raise HeError(f"ciphertext scale {ciphertext.scale} != {context.global_scale}")
    return vector


def sum_ciphertexts(context: ts.Context, blobs: Iterable[bytes], expected_size: int) -> bytes:
    """Serialised sum of encrypted vectors, each validated before it is added.

    The sum is accumulated in place, so memory stays that of two ciphertexts however many
    arrive. CKKS addition is exact modular arithmetic: the result's bytes (and hash) do not
    depend on the order, so an auditor can re-sum the archive and compare hashes.
    """
    total: ts.CKKSVector | None = None
    for blob in blobs:
        vector = load_ciphertext(context, blob, expected_size)
        if total is None:
            total = vector
        else:
            total.add_(vector)
    if total is None:
        raise HeError("no ciphertexts to sum")
    return total.serialize()


def decrypt(owner_keys: OwnerKeys, data: bytes, expected_size: int) -> np.ndarray:
    """Exact decryption of an aggregate, for the owner only.

    Never publish this result as is: a ciphertext with its exact decryption lets an attacker
    recover the secret key (Li-Micciancio). Round or add noise before anything leaves the owner.
    """
    vector = load_ciphertext(owner_keys.context, data, expected_size)
    return np.asarray(vector.decrypt(), dtype=np.float64)
