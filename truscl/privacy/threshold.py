"""Threshold CKKS on TenSEAL: k key holders share the secret key; all k are needed to decrypt.

Why: with a single task owner holding the CKKS secret key, whoever holds it (or steals it) can
decrypt every device's individual update. Here the secret key is ``s = s_1 + ... + s_k``, one
additive share per key holder (the owner and its key guardians), and no share ever leaves its
holder. What leaves is:

* at key generation, ``b_i = -a * s_i + e_i`` over a common random ``a``; the collective public
  key is ``(sum b_i, a)``, placed in an ordinary TenSEAL public context, so devices and the
  aggregator are unchanged (they encrypt and add with SEAL as in single-key mode);
* at decryption, ``d_i = c1 * s_i + E_i`` for the aggregate ciphertext ``(c0, c1)`` with
  Gaussian *smudging* noise ``E_i``; anyone holding all ``d_i`` computes ``c0 + sum d_i``,
  which is the plaintext plus small noise, and decodes it with SEAL's own encoder.

Security model: semi-honest holders with commitments. The common polynomial ``a`` comes from a
seed fixed by commit-then-reveal, and every ``b_i`` is committed before any is revealed, so no
holder can bias ``a`` or choose its ``b_i`` to cancel the others' (a rogue-key attack that
would hand it the whole key). Nothing proves a ``b_i`` or ``d_i`` is well-formed: a malicious
holder can make decryption fail (or shift the result), which the protocol detects only by its
effects. The smudging level (sigma = 2^20 at scale 2^40, OpenFHE's default) is a heuristic,
not a proof: see :data:`SMUDGING_SIGMA`. Only profiles marked ``threshold`` may be shared.

Byte layouts of SEAL and TenSEAL objects are confined to :mod:`truscl.privacy.seal_layout`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts

from truscl.errors import HeError
from truscl.privacy import seal_layout
from truscl.privacy.ckks import (
    DEFAULT_PROFILE,
    PROFILES,
    CkksProfile,
    context_hash,
    load_ciphertext,
    load_context,
)
from truscl.privacy.dp import secure_generator

# Smudging noise per holder, in units of the plaintext's integer coefficients. At scale 2^40
# each holder adds about sigma * sqrt(N / 2) / 2^40 ~ 6e-5 (N = 4096) of error per slot. It
# exists to hide the aggregate's own noise (measured: at most ~2^8 per coefficient for a sum of
# five fresh encryptions under a 2- to 5-holder key), which would otherwise leak the key shares
# to whoever sees the partials and the result (Li-Micciancio). It exceeds that noise only by
# ~2^12: a heuristic level, OpenFHE's default "noise flooding". A statistical-distance proof
# (distance N * B / sigma <= 2^-40) needs sigma ~2^60, hence a scale near 2^80: two 60-bit
# data primes, so N = 8192 and twice the bytes per value. Without any smudging, the plaintext
# still stays secret from k - 1 holders (that rests on RLWE alone); the shares would not.
# Profiles whose scale is too small for this sigma (ckks-4096-40-40, scale 2^26: ~0.7 of error
# per value per holder) are single-key only, with their own sigma (CkksProfile.smudging_bits).
SMUDGING_SIGMA = DEFAULT_PROFILE.smudging_sigma
# SEAL's error distribution: centred binomial with 21 + 21 coins, standard deviation ~3.24.
_CBD_COINS = 21
_SEED_BYTES = 32
_DOMAIN = b"truscl/threshold-ckks/v1"
_SHARE_MAGIC = b"TRSH1"
_CONTRIBUTION_MAGIC = b"TRCB1"
_PARTIAL_MAGIC = b"TRPD1"


def _hash(*parts: bytes) -> bytes:
    """SHA3-256 over length-prefixed parts, so no two part lists hash alike."""
    digest = hashlib.sha3_256(_DOMAIN)
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    return digest.digest()


# ---------------------------------------------------------------- NTT (SEAL's, in numpy) ---


def _bit_reverse(count: int) -> np.ndarray:
    bits = count.bit_length() - 1
    return np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(count)])


def minimal_primitive_root(order: int, modulus: int) -> int:
    """The smallest primitive ``order``-th root of unity mod a prime, as SEAL chooses it.

    SEAL's NTT tables use the minimal primitive 2N-th root, so the NTT here only matches SEAL's
    (and so reads SEAL's keys and ciphertexts correctly) if it picks the same one.
    """
    if (modulus - 1) % order:
        raise HeError(f"{modulus} has no {order}-th roots of unity")
    for candidate in range(2, modulus):
        root = pow(candidate, (modulus - 1) // order, modulus)
        if pow(root, order // 2, modulus) == modulus - 1:
            break
    else:  # pragma: no cover - a prime = 1 mod order always has one
        raise HeError(f"no primitive root mod {modulus}")
    square, best, current = root * root % modulus, root, root
    for _ in range(order // 2 - 1):
        current = current * square % modulus
        best = min(best, current)
    return best


class Ntt:
    """SEAL's negacyclic NTT mod one prime: ``out[j] = a(psi^(2 * bitrev(j) + 1))``.

    Exact arithmetic on Python integers in numpy object arrays (60-bit products overflow
    uint64); about 10 ms per transform at N = 4096, fast enough for one transform per share,
    error and chunk. Cooley-Tukey forward, Gentleman-Sande inverse, as in SEAL.
    """

    def __init__(self, degree: int, modulus: int) -> None:
        if degree < 2 or degree & (degree - 1):
            raise HeError(f"degree {degree} is not a power of two")
        self.degree, self.modulus = degree, modulus
        self.root = minimal_primitive_root(2 * degree, modulus)
        order = _bit_reverse(degree)
        powers = [1] * degree
        inverse_powers = [1] * degree
        root_inverse = pow(self.root, -1, modulus)
        for i in range(1, degree):
            powers[i] = powers[i - 1] * self.root % modulus
            inverse_powers[i] = inverse_powers[i - 1] * root_inverse % modulus
        self._forward = np.array([powers[j] for j in order], dtype=object)
        self._inverse = np.array([inverse_powers[j] for j in order], dtype=object)
        self._degree_inverse = pow(degree, -1, modulus)

    def forward(self, coefficients: np.ndarray) -> np.ndarray:
        """Coefficients (any integers) to SEAL's NTT form, as uint64 residues."""
        q = self.modulus
        values = np.asarray(coefficients)
        if values.shape != (self.degree,):
            raise HeError(f"expected {self.degree} coefficients, got shape {values.shape}")
        a = np.array([int(x) % q for x in values.tolist()], dtype=object)
        half, blocks = self.degree, 1
        while blocks < self.degree:
            half //= 2
            pairs = a.reshape(blocks, 2, half)
            twiddle = self._forward[blocks : 2 * blocks].reshape(blocks, 1)
            upper, lower = pairs[:, 0, :], pairs[:, 1, :] * twiddle % q
            a = np.stack(((upper + lower) % q, (upper - lower) % q), axis=1)
            blocks *= 2
        return a.reshape(self.degree).astype(np.uint64)

    def inverse(self, residues: np.ndarray) -> np.ndarray:
        """SEAL's NTT form back to coefficients in ``[0, q)``, as uint64."""
        q = self.modulus
        a = np.asarray(residues, dtype=np.uint64).astype(object)
        half, blocks = 1, self.degree
        while blocks > 1:
            blocks //= 2
            pairs = a.reshape(blocks, 2, half)
            twiddle = self._inverse[blocks : 2 * blocks].reshape(blocks, 1)
            upper, lower = pairs[:, 0, :], pairs[:, 1, :]
            a = np.stack(((upper + lower) % q, (upper - lower) * twiddle % q), axis=1)
            half *= 2
        return (a.reshape(self.degree) * self._degree_inverse % q).astype(np.uint64)


_NTT_CACHE: dict[tuple[int, int], Ntt] = {}


def ntt_for(degree: int, modulus: int) -> Ntt:
    """Tables are deterministic per (degree, prime); build each once per process."""
    key = (degree, modulus)
    if key not in _NTT_CACHE:
        _NTT_CACHE[key] = Ntt(degree, modulus)
    return _NTT_CACHE[key]


def centered(residues: np.ndarray, modulus: int) -> np.ndarray:
    """Residues in ``[0, q)`` as signed integers in ``(-q/2, q/2]`` (int64, q < 2^62)."""
    values = residues.astype(np.int64)
    return np.where(values > modulus // 2, values - modulus, values)


def _to_rns(coefficients: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """A small-integer polynomial in NTT form under each prime: ``(len(moduli), N)``."""
    return np.stack([ntt_for(coefficients.size, q).forward(coefficients) for q in moduli])


def _mul(a: np.ndarray, b: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """Pointwise product of NTT-form RNS polynomials (i.e. ring multiplication)."""
    rows = [
        (x.astype(object) * y.astype(object) % q).astype(np.uint64)
        for x, y, q in zip(a, b, moduli, strict=True)
    ]
    return np.stack(rows)


def _add(a: np.ndarray, b: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    column = np.array(moduli, dtype=np.uint64).reshape(-1, 1)
    return (a + b) % column  # residues < 2^61, so the sum cannot wrap


def _neg(a: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    column = np.array(moduli, dtype=np.uint64).reshape(-1, 1)
    return (column - a) % column


# ------------------------------------------------------------------------ sampling -------


def _ternary(degree: int) -> np.ndarray:
    """Uniform coefficients in {-1, 0, 1}, as SEAL samples secret keys, straight from the OS.

    Bytes below 255 are uniform mod 3 (255 = 3 * 85); the rare 255 is redrawn.
    """
    out = np.empty(0, dtype=np.int8)
    while out.size < degree:
        raw = np.frombuffer(secrets.token_bytes(degree + 64), dtype=np.uint8)
        out = np.concatenate([out, (raw[raw < 255] % 3).astype(np.int8) - 1])
    return out[:degree]


def _cbd_error(degree: int) -> np.ndarray:
    """SEAL's key-generation error: centred binomial (21 + 21 coins, sigma ~3.24), OS bits."""
    per = (2 * _CBD_COINS + 7) // 8
    raw = np.frombuffer(secrets.token_bytes(degree * per), dtype=np.uint8).reshape(degree, per)
    bits = np.unpackbits(raw, axis=1)[:, : 2 * _CBD_COINS].astype(np.int64)
    return bits[:, :_CBD_COINS].sum(axis=1) - bits[:, _CBD_COINS:].sum(axis=1)


def _smudging(degree: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rounded Gaussian noise; ``rng`` is OS-seeded unless a test passes its own."""
    return np.rint(rng.normal(0.0, sigma, size=degree)).astype(np.int64)


def uniform_polynomial(seed: bytes, moduli: Sequence[int], degree: int) -> np.ndarray:
    """The common polynomial ``a``, expanded from the agreed seed with SHAKE-256.

    Uniform residues are uniform in NTT form too, so ``a`` is sampled directly there (as
    SEAL does for its own public keys); every holder and verifier derives the same ``a``.
    Rejection sampling on masked 64-bit words keeps each residue exactly uniform.
    """
    rows = []
    for index, q in enumerate(moduli):
        mask = np.uint64((1 << q.bit_length()) - 1)
        stream = hashlib.shake_256(_DOMAIN + b"/a" + seed + struct.pack("<QQ", index, q))
        words = np.frombuffer(stream.digest(8 * 4 * degree), dtype="<u8") & mask
        accepted = words[words < np.uint64(q)]
        if accepted.size < degree:  # pragma: no cover - probability below 2^-1000
            raise HeError("seed expansion ran short")
        rows.append(accepted[:degree].astype(np.uint64))
    return np.stack(rows)


# --------------------------------------------------------------- seed commit-reveal ------


@dataclass(frozen=True)
class SeedShare:
    """One holder's contribution to the seed of ``a``: committed first, revealed later.

    Committing before anyone reveals stops the last holder from choosing its share after
    seeing the others', which would let it steer ``a``.
    """

    holder_id: str
    value: bytes = field(repr=False)

    @classmethod
    def generate(cls, holder_id: str) -> SeedShare:
        return cls(holder_id, secrets.token_bytes(_SEED_BYTES))

    @property
    def commitment(self) -> bytes:
        return seed_commitment(self.holder_id, self.value)


def seed_commitment(holder_id: str, value: bytes) -> bytes:
    """What a holder publishes in round 1; binds its seed share to its identity."""
    return _hash(b"seed", holder_id.encode(), value)


def common_seed(commitments: Mapping[str, bytes], reveals: Mapping[str, bytes]) -> bytes:
    """The seed of ``a``: the hash of every reveal in holder order, once all commitments open."""
    if set(commitments) != set(reveals) or len(commitments) < 2:
        raise HeError("need commitments and reveals from the same two or more holders")
    for holder in sorted(commitments):
        value = reveals[holder]
        if len(value) != _SEED_BYTES or not hmac.compare_digest(
            seed_commitment(holder, value), commitments[holder]
        ):
            raise HeError(f"{holder}'s seed reveal does not open its commitment")
    return _hash(b"common-seed", *(h.encode() + reveals[h] for h in sorted(commitments)))


# ---------------------------------------------------------------------- parameters -------


@dataclass(frozen=True)
class _Parameters:
    """What the protocol needs from a profile, read from SEAL rather than recomputed."""

    profile: CkksProfile
    template_bytes: bytes  # a public context of the profile (its throwaway key is replaced)
    key: seal_layout.RnsLevel
    data: seal_layout.RnsLevel
    version: tuple[int, int]


_PARAMETERS: dict[str, _Parameters] = {}


def _parameters(profile: CkksProfile) -> _Parameters:
    """Parameters per profile, from a throwaway context whose keys are dropped at once."""
    if profile.name not in _PARAMETERS:
        fresh = profile.new_context()
        template = fresh.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        public = load_context(template)
        _PARAMETERS[profile.name] = _Parameters(
            profile=profile,
            template_bytes=template,
            key=seal_layout.key_level(public),
            data=seal_layout.first_level(public),
            version=seal_layout.seal_version(template),
        )
    return _PARAMETERS[profile.name]


def require_threshold(profile: CkksProfile) -> None:
    """Refuse to share the key of a profile whose precision cannot carry k holders' smudging."""
    if not profile.threshold:
        raise HeError(
            f"{profile.name} is single-key only: at its scale 2^{profile.global_scale_bits}, "
            f"threshold smudging (sigma {SMUDGING_SIGMA:.0f} per holder) would leave about "
            f"{profile.smudging_error(SMUDGING_SIGMA):.2g} of error per value; "
            f"use {DEFAULT_PROFILE.name} for threshold decryption"
        )


def _profile(name: str) -> CkksProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise HeError(f"unknown CKKS profile {name!r}") from None


# ------------------------------------------------------------------------ key share ------


class KeyShare:
    """One holder's additive share ``s_i`` of the secret key: ternary, as SEAL's own keys.

    The sum of k ternary shares has coefficients in [-k, k]: a wider secret than SEAL's,
    which does not weaken RLWE, and adds only ~sqrt(k) to the encryption noise.
    Serialised as 2 bits per coefficient (1 KB at N = 4096); treat the bytes as a secret key.
    """

    def __init__(self, holder_id: str, profile: CkksProfile, coefficients: np.ndarray) -> None:
        values = np.asarray(coefficients, dtype=np.int8)
        if values.shape != (profile.poly_modulus_degree,) or np.any(np.abs(values) > 1):
            raise HeError("a key share is one ternary coefficient per degree")
        if not holder_id or len(holder_id.encode()) > 255:
            raise HeError("holder id must be 1 to 255 bytes")
        self.holder_id = holder_id
        self.profile = profile
        self._coefficients = values
        self._ntt: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"KeyShare({self.holder_id!r}, {self.profile.name})"

    @classmethod
    def generate(cls, holder_id: str, profile: CkksProfile = DEFAULT_PROFILE) -> KeyShare:
        require_threshold(profile)
        return cls(holder_id, profile, _ternary(profile.poly_modulus_degree))

    @classmethod
    def from_context(cls, holder_id: str, context: ts.Context) -> KeyShare:
        """A single-key context's whole secret key as a one-holder share.

        Single-key mode decrypts through the same partial-decrypt-and-combine path as
        threshold mode, so it reads every slot (not only the vector's values) and its release
        is bounds-checked the same way.
        """
        profile = profile_of(context)
        level = seal_layout.key_level(context)
        row = seal_layout.secret_key_ntt(context)[0]
        values = centered(ntt_for(level.degree, level.moduli[0]).inverse(row), level.moduli[0])
        return cls(holder_id, profile, values)

    @property
    def coefficients(self) -> np.ndarray:
        return self._coefficients.copy()

    def ntt(self, moduli: Sequence[int]) -> np.ndarray:
        """The share in NTT form under ``moduli``, each prime transformed once."""
        for q in moduli:
            if q not in self._ntt:
                self._ntt[q] = ntt_for(self._coefficients.size, q).forward(self._coefficients)
        return np.stack([self._ntt[q] for q in moduli])

    def to_bytes(self) -> bytes:
        digits = (self._coefficients + 1).astype(np.uint8)  # 0, 1, 2
        packed = digits[0::4] | digits[1::4] << 2 | digits[2::4] << 4 | digits[3::4] << 6
        header = _SHARE_MAGIC + _short(self.holder_id) + _short(self.profile.name)
        return header + packed.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyShare:
        reader = _Reader(data, _SHARE_MAGIC)
        holder_id, profile = reader.short(), _profile(reader.short())
        packed = np.frombuffer(reader.rest(profile.poly_modulus_degree // 4), dtype=np.uint8)
        digits = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1).reshape(-1)
        if np.any(digits == 3):
            raise HeError("key share holds an invalid coefficient")
        return cls(holder_id, profile, digits.astype(np.int8) - 1)

    # -- key generation

    def public_contribution(self, seed: bytes) -> bytes:
        """``b_i = -a * s_i + e_i`` at key level (all primes), serialised for publication."""
        params = _parameters(self.profile)
        moduli = params.key.moduli
        a = uniform_polynomial(seed, moduli, params.key.degree)
        error = _to_rns(_cbd_error(params.key.degree), moduli)
        b = _add(_neg(_mul(a, self.ntt(moduli), moduli), moduli), error, moduli)
        return _encode_polys(_CONTRIBUTION_MAGIC, self.holder_id, b)

    # -- decryption

    def partial_decrypt(
        self,
        context: ts.Context,
        aggregate: bytes,
        expected_size: int,
        *,
        sigma: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> PartialDecryption:
        """``d_i = c1 * s_i + E_i`` for every ciphertext of the aggregate vector.

        Fresh smudging noise per call: a holder must answer each aggregate once, because
        averaging many answers for the same ciphertext would strip the smudging. Only ever
        decrypt the aggregate the task anchored, never a single device's update. ``sigma``
        defaults to the profile's smudging level.
        """
        sigma = self.profile.smudging_sigma if sigma is None else sigma
        if not sigma > 0:
            raise HeError("smudging sigma must be positive")
        chunks = _aggregate_chunks(context, aggregate, expected_size, self.profile)
        generator = rng if rng is not None else secure_generator()
        rows = []
        for chunk in chunks:
            moduli = _chunk_moduli(context, chunk)
            c1 = chunk.polys[1]
            noise = _to_rns(_smudging(c1.shape[1], sigma, generator), moduli)
            rows.append(_add(_mul(c1, self.ntt(moduli), moduli), noise, moduli))
        return PartialDecryption(self.holder_id, context_hash(aggregate), np.stack(rows))


def _short(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise HeError("identifier longer than 255 bytes")
    return bytes([len(raw)]) + raw


class _Reader:
    def __init__(self, data: bytes, magic: bytes) -> None:
        if not data.startswith(magic):
            raise HeError(f"not a {magic.decode()} object")
        self._data, self._pos = bytes(data), len(magic)

    def take(self, count: int) -> bytes:
        if self._pos + count > len(self._data):
            raise HeError("truncated object")
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def short(self) -> str:
        return self.take(self.take(1)[0]).decode()

    def rest(self, count: int) -> bytes:
        chunk = self.take(count)
        if self._pos != len(self._data):
            raise HeError("trailing bytes after object")
        return chunk


def _encode_polys(magic: bytes, holder_id: str, polys: np.ndarray, extra: bytes = b"") -> bytes:
    shape = struct.pack("<B", polys.ndim) + struct.pack(f"<{polys.ndim}I", *polys.shape)
    body = np.ascontiguousarray(polys, dtype="<u8").tobytes()
    return magic + _short(holder_id) + extra + shape + body


def _decode_polys(reader: _Reader) -> np.ndarray:
    ndim = reader.take(1)[0]
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim))
    count = math.prod(shape)
    return np.frombuffer(reader.rest(8 * count), dtype="<u8").astype(np.uint64).reshape(shape)


def decode_contribution(data: bytes) -> tuple[str, np.ndarray]:
    """A published ``b_i``: its holder and its ``(L + 1, N)`` residues."""
    reader = _Reader(data, _CONTRIBUTION_MAGIC)
    holder = reader.short()
    return holder, _decode_polys(reader)


def contribution_commitment(holder_id: str, contribution: bytes) -> bytes:
    """Round 3: each holder commits to its ``b_i`` before any is revealed (no rogue keys)."""
    return _hash(b"contribution", holder_id.encode(), contribution)


# ------------------------------------------------------------- collective public key -----


def collective_public_context(
    profile: CkksProfile, seed: bytes, contributions: Mapping[str, bytes]
) -> bytes:
    """A TenSEAL public context (no secret key) whose public key is ``(sum b_i, a)``.

    Built by replacing the public key of a throwaway public context of the same profile, then
    loaded and re-serialised by TenSEAL itself, so the bytes are exactly what TenSEAL would
    produce for such a key (and their hash is reproducible for the chain).
    """
    require_threshold(profile)
    params = _parameters(profile)
    moduli = params.key.moduli
    if len(contributions) < 2:
        raise HeError("a threshold key needs two or more holders")
    p0 = np.zeros((len(moduli), params.key.degree), dtype=np.uint64)
    for holder, blob in sorted(contributions.items()):
        named, b = decode_contribution(blob)
        if (
            named != holder
            or b.shape != p0.shape
            or np.any(b >= np.array(moduli, dtype=np.uint64)[:, None])
        ):
            raise HeError(f"{holder}'s contribution does not fit the {profile.name} key level")
        p0 = _add(p0, b, moduli)
    a = uniform_polynomial(seed, moduli, params.key.degree)
    public_key = seal_layout.public_key_bytes(params.key, np.stack([p0, a]), params.version)
    crafted = seal_layout.with_public_key(params.template_bytes, public_key)
    try:
        context = load_context(crafted)
        data = context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HeError(f"TenSEAL refused the collective public key: {exc}") from exc
    return data


@dataclass(frozen=True)
class KeygenTranscript:
    """Everything published during key generation, in holder order; sign ``to_bytes()``.

    Anyone can :meth:`verify` it: the commitments open, the seed and ``a`` follow, the public
    key is the sum of the revealed contributions, and the context hashes to ``context_hash``.
    """

    profile: str
    holders: tuple[str, ...]
    seed_commitments: tuple[bytes, ...]
    seed_reveals: tuple[bytes, ...]
    contribution_commitments: tuple[bytes, ...]
    contributions: tuple[bytes, ...]
    context_hash: bytes

    def to_bytes(self) -> bytes:
        """Canonical encoding: every field length-prefixed, lists in holder order."""
        parts = [self.profile.encode(), struct.pack("<I", len(self.holders))]
        for i, holder in enumerate(self.holders):
            parts += [
                holder.encode(),
                self.seed_commitments[i],
                self.seed_reveals[i],
                self.contribution_commitments[i],
                self.contributions[i],
            ]
        parts.append(self.context_hash)
        return b"".join(struct.pack("<Q", len(p)) + p for p in parts)

    def digest(self) -> bytes:
        return _hash(b"transcript", self.to_bytes())

    def verify(self, public_context: bytes | None = None) -> bytes:
        """Recompute the public context from the transcript; return it if all checks pass."""
        count = len(self.holders)
        if list(self.holders) != sorted(set(self.holders)) or not all(
            len(x) == count
            for x in (
                self.seed_commitments,
                self.seed_reveals,
                self.contribution_commitments,
                self.contributions,
            )
        ):
            raise HeError("transcript fields do not line up with its sorted, distinct holders")
        seed = common_seed(
            dict(zip(self.holders, self.seed_commitments, strict=True)),
            dict(zip(self.holders, self.seed_reveals, strict=True)),
        )
        for holder, commitment, blob in zip(
            self.holders, self.contribution_commitments, self.contributions, strict=True
        ):
            if not hmac.compare_digest(contribution_commitment(holder, blob), commitment):
                raise HeError(f"{holder}'s contribution does not open its commitment")
        rebuilt = collective_public_context(
            _profile(self.profile), seed, dict(zip(self.holders, self.contributions, strict=True))
        )
        if context_hash(rebuilt) != self.context_hash:
            raise HeError("the transcript's contributions do not give its context hash")
        if public_context is not None and context_hash(public_context) != self.context_hash:
            raise HeError("the public context is not the one the transcript produced")
        return rebuilt


def run_keygen(
    shares: Sequence[KeyShare], seed_shares: Sequence[SeedShare] | None = None
) -> tuple[bytes, KeygenTranscript]:
    """All four rounds in one process (tests, demos, a single-machine owner with guardians).

    In deployment each round is a message exchange: (1) publish ``SeedShare.commitment``;
    (2) after all commitments, publish ``SeedShare.value``; everyone computes
    :func:`common_seed`; (3) publish :func:`contribution_commitment` of
    ``KeyShare.public_contribution(seed)``; (4) after all those, publish the contribution.
    Then any party runs :func:`collective_public_context`.
    """
    by_holder = {share.holder_id: share for share in shares}
    if len(by_holder) != len(shares) or len(shares) < 2:
        raise HeError("need two or more shares with distinct holder ids")
    profiles = {share.profile for share in shares}
    if len(profiles) != 1:
        raise HeError("all shares must use the same profile")
    profile = profiles.pop()
    seeds = {s.holder_id: s for s in (seed_shares or [SeedShare.generate(h) for h in by_holder])}
    if set(seeds) != set(by_holder):
        raise HeError("need one seed share per holder")
    holders = tuple(sorted(by_holder))
    seed_commitments = {h: seeds[h].commitment for h in holders}
    seed = common_seed(seed_commitments, {h: seeds[h].value for h in holders})
    contributions = {h: by_holder[h].public_contribution(seed) for h in holders}
    contribution_commitments = {h: contribution_commitment(h, contributions[h]) for h in holders}
    context = collective_public_context(profile, seed, contributions)
    transcript = KeygenTranscript(
        profile=profile.name,
        holders=holders,
        seed_commitments=tuple(seed_commitments[h] for h in holders),
        seed_reveals=tuple(seeds[h].value for h in holders),
        contribution_commitments=tuple(contribution_commitments[h] for h in holders),
        contributions=tuple(contributions[h] for h in holders),
        context_hash=context_hash(context),
    )
    return context, transcript


# ------------------------------------------------------------------------ decryption ------


@dataclass(frozen=True)
class PartialDecryption:
    """One holder's ``d_i`` for each ciphertext of one aggregate, bound to that aggregate."""

    holder_id: str
    ciphertext_hash: bytes
    polys: np.ndarray  # (chunks, L, N) uint64, NTT form

    def to_bytes(self) -> bytes:
        return _encode_polys(_PARTIAL_MAGIC, self.holder_id, self.polys, self.ciphertext_hash)

    @classmethod
    def from_bytes(cls, data: bytes) -> PartialDecryption:
        reader = _Reader(data, _PARTIAL_MAGIC)
        holder = reader.short()
        digest = reader.take(32)
        return cls(holder, digest, _decode_polys(reader))


def _aggregate_chunks(
    context: ts.Context, aggregate: bytes, expected_size: int, profile: CkksProfile
) -> list[seal_layout.VectorChunk]:
    params = _parameters(profile)
    if seal_layout.first_level(context) != params.data:
        raise HeError(f"the context is not a {profile.name} context")
    vector = load_ciphertext(context, aggregate, expected_size)
    return seal_layout.vector_chunks(vector.ciphertexts, expected_size)


def profile_of(context: ts.Context) -> CkksProfile:
    """The truscl profile whose parameters (degree and primes) a context uses."""
    level = seal_layout.first_level(context)
    for profile in PROFILES.values():
        if profile.poly_modulus_degree == level.degree and _parameters(profile).data == level:
            return profile
    raise HeError("the context matches no truscl CKKS profile")


def _chunk_moduli(context: ts.Context, chunk: seal_layout.VectorChunk) -> tuple[int, ...]:
    level = seal_layout.first_level(context)
    if chunk.parms_id != level.parms_id:
        raise HeError("ciphertext is not at the context's first level")
    return level.moduli


def combine(
    context: ts.Context,
    aggregate: bytes,
    expected_size: int,
    partials: Collection[PartialDecryption],
    holders: Collection[str],
) -> np.ndarray:
    """The plaintext vector: ``c0 + sum d_i`` per ciphertext, decoded by SEAL's CKKSEncoder.

    Needs exactly one partial from each of ``holders`` (the transcript's), each made for this
    aggregate. Like :func:`truscl.privacy.ckks.decrypt`, the result is the exact decryption
    plus noise, and that noise includes every holder's smudging, which (heuristically, see
    :data:`SMUDGING_SIGMA`) keeps the result from revealing the key shares.
    """
    slots = combine_slots(context, aggregate, expected_size, partials, holders)
    chunks = _aggregate_chunks(context, aggregate, expected_size, profile_of(context))
    return np.concatenate([row[: chunk.values] for row, chunk in zip(slots, chunks, strict=True)])


def combine_slots(
    context: ts.Context,
    aggregate: bytes,
    expected_size: int,
    partials: Collection[PartialDecryption],
    holders: Collection[str],
) -> np.ndarray:
    """Every slot of every ciphertext as two reals, ``(chunks, values_per_ciphertext)``: the
    vector's values first, then the slots no value was encrypted in, which an honest sum leaves
    at noise level around zero. A release check needs them all: a crafted ciphertext shows up
    there as much as in the values.
    """
    if sorted(p.holder_id for p in partials) != sorted(set(holders)):
        raise HeError("need exactly one partial decryption from each key holder")
    digest = context_hash(aggregate)
    if any(not hmac.compare_digest(p.ciphertext_hash, digest) for p in partials):
        raise HeError("a partial decryption was made for another ciphertext")
    profile = profile_of(context)
    chunks = _aggregate_chunks(context, aggregate, expected_size, profile)
    version = _parameters(profile).version
    values = []
    for index, chunk in enumerate(chunks):
        moduli = _chunk_moduli(context, chunk)
        total = chunk.polys[0]
        for partial in partials:
            if partial.polys.shape != (len(chunks), *total.shape):
                raise HeError(f"{partial.holder_id}'s partial decryption has the wrong shape")
            share = partial.polys[index]
            if np.any(share >= np.array(moduli, dtype=np.uint64)[:, None]):
                raise HeError(f"{partial.holder_id}'s partial decryption is not reduced")
            total = _add(total, share, moduli)
        plain = seal_layout.load_plaintext(
            context, seal_layout.plaintext_bytes(chunk.parms_id, chunk.scale, total, version)
        )
        values.append(seal_layout.decode(context, plain))
    return np.stack(values)
