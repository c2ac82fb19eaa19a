"""Every assumption truscl makes about how TenSEAL 0.3.18 and SEAL 4.x lay out their objects.

Threshold decryption needs what TenSEAL does not offer: the raw RNS polynomials of ciphertexts
and keys, a public key that no single party generated, and a plaintext built from numbers.
Rather than scatter offsets and index formulas through the protocol code, they all live here,
each one named, and each is checked against the library by ``tests/test_threshold.py`` so that
an upgrade that moves a byte fails a test instead of decrypting to noise.

Reading goes through SEAL's own accessors (``Ciphertext[i]``, ``Plaintext[i]``), which need no
decompression; writing produces uncompressed SEAL serialisations (SEAL loads those as readily
as its zstd-compressed ones), so neither needs ``zstandard`` at run time. Ciphertexts on the
wire are saved and loaded by SEAL itself (:func:`save_ciphertext`, :func:`load_seal_ciphertext`),
zstd-compressed by SEAL.

The assumptions, in one place:

1. ``Ciphertext[i]`` / ``Plaintext[i]`` index the flat array ``data[poly][prime][coeff]``,
   i.e. ``i = (poly * L + prime) * N + coeff`` for ``L`` primes of degree ``N``.
2. CKKS secret keys, public keys, fresh ciphertexts and CKKS plaintexts are in NTT form, each
   prime's row being SEAL's negacyclic NTT (bit-reversed order, SEAL's minimal 2N-th root).
3. A SEAL serialisation is a 16-byte header ``<HBBBBHQ`` (magic 0xA15E, header size 16,
   version major, minor, compression mode, reserved, total size) followed by the body.
4. A ciphertext body (SEAL 4.x) is parms_id (4 x u64), is_ntt_form (u8), size, N, L (u64 each),
   scale (f64), correction_factor (u64), then its data as a serialised DynArray: a header,
   a u64 count, the u64 words. A public key is saved exactly as its ciphertext.
5. A plaintext body is parms_id, coeff_count (u64), scale (f64), then the DynArray.
6. A TenSEAL context is the protobuf ``TenSEALContextProto``: field 1 the SEAL encryption
   parameters, field 2 ``TenSEALPublicProto`` whose field 1 is the SEAL-saved public key.
7. Two reals per complex slot: SEAL's ``CKKSEncoder`` encodes complex slots (``N / 2`` of
   them); truscl puts value ``2 i`` of a chunk in slot ``i``'s real part and ``2 i + 1`` in its
   imaginary part, and ``decode_complex`` gives the slots back in the same order. A vector of
   ``n`` values is ``ceil(n / N)`` ciphertexts, chunk ``j`` holding values ``j * N`` onwards;
   the encoder fills the slots after the values with zeros.
8. TenSEAL 0.3.18's ``sealapi`` saves and loads SEAL objects only through file paths, and
   ``Ciphertext.save`` uses SEAL's default compression, zstd (header mode byte 2); ``load``
   runs SEAL's validity checks (parameters known to the context, residues reduced).
9. Compression covers the body only: a zstd-saved object is the header (its size field the
   saved length) and one zstd frame that decompresses to the uncompressed body of Assumption 4
   or 5, whose inner DynArray is itself an uncompressed SEAL object.

The aggregator adds ciphertexts without SEAL (:class:`CiphertextLayout`): SEAL's load through a
file costs about 90 us per ciphertext under the GIL, numpy's parse and check about 10 us.
``tests/test_ckks.py`` holds it to SEAL: the same residues as SEAL's accessor, the same sums as
SEAL's evaluator, and a refusal of every mangled ciphertext SEAL refuses.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

# Importing tenseal.sealapi registers SEAL's types; reading coefficient moduli fails without it.
import tenseal.sealapi as sealapi

from truscl.errors import HeError

SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")
_COMPR_NONE = 0
COMPR_ZSTD = 2
_CIPHERTEXT_META = struct.Struct("<4QBQQQdQ")
_PLAINTEXT_META = struct.Struct("<4QQd")
_COUNT = struct.Struct("<Q")

ParmsId = tuple[int, int, int, int]


@dataclass(frozen=True)
class RnsLevel:
    """One level of SEAL's modulus chain: its id (which SEAL checks on load) and its primes."""

    parms_id: ParmsId
    moduli: tuple[int, ...]
    degree: int


def _level(context_data: sealapi.SEALContext.ContextData) -> RnsLevel:
    parms = context_data.parms()
    return RnsLevel(
        parms_id=_parms_id(context_data.parms_id()),
        moduli=tuple(int(m.value()) for m in parms.coeff_modulus()),
        degree=int(parms.poly_modulus_degree()),
    )


def _parms_id(raw: list[int]) -> ParmsId:
    a, b, c, d = (int(x) for x in raw)
    return (a, b, c, d)


def key_level(context: ts.Context) -> RnsLevel:
    """The level keys live at: every data prime plus the special prime."""
    return _level(context.seal_context().data.key_context_data())


def first_level(context: ts.Context) -> RnsLevel:
    """The level fresh ciphertexts live at: the data primes only."""
    return _level(context.seal_context().data.first_context_data())


def _flat(obj: object, count: int) -> np.ndarray:
    # Assumption 1: SEAL's flat indexing, read one word at a time through its own accessor.
    return np.fromiter((obj[i] for i in range(count)), dtype=np.uint64, count=count)  # type: ignore[index]


def ciphertext_polys(ciphertext: object) -> np.ndarray:
    """A SEAL ciphertext's polynomials as a ``(size, L, N)`` array of residues."""
    size = int(ciphertext.size())  # type: ignore[attr-defined]
    primes = int(ciphertext.coeff_modulus_size())  # type: ignore[attr-defined]
    degree = int(ciphertext.poly_modulus_degree())  # type: ignore[attr-defined]
    return _flat(ciphertext, size * primes * degree).reshape(size, primes, degree)


def plaintext_residues(plain: sealapi.Plaintext, level: RnsLevel) -> np.ndarray:
    """An NTT-form CKKS plaintext at ``level`` as an ``(L, N)`` array of residues."""
    return _flat(plain, len(level.moduli) * level.degree).reshape(len(level.moduli), level.degree)


def secret_key_ntt(context: ts.Context) -> np.ndarray:
    """An ordinary (single-key) context's secret key, ``(L + 1, N)`` in NTT form at key level.

    It shows SEAL's own key in the representation the threshold code computes with: the
    tripwire tests compare the two, and single-key mode decrypts through the threshold path
    with the whole key as one share (``KeyShare.from_context``).
    """
    if not context.is_private():
        raise HeError("context has no secret key")
    return plaintext_residues(context.secret_key().data.data(), key_level(context))


def public_key_polys(context: ts.Context) -> np.ndarray:
    """A context's public key ``(p0, p1)`` as a ``(2, L + 1, N)`` array in NTT form."""
    return ciphertext_polys(context.public_key().data.data())


@dataclass(frozen=True)
class VectorChunk:
    """One ciphertext of an encrypted vector and how many values it carries."""

    parms_id: ParmsId
    scale: float
    polys: np.ndarray  # (2, L, N) uint64, NTT form
    values: int


def vector_chunks(ciphertexts: Sequence[sealapi.Ciphertext], total: int) -> list[VectorChunk]:
    """The ciphertexts of an encrypted vector of ``total`` values, each with its value count."""
    chunks = []
    for index, ciphertext in enumerate(ciphertexts):
        if not ciphertext.is_ntt_form() or ciphertext.size() != 2:
            raise HeError("expected a fresh two-polynomial ciphertext in NTT form")
        width = values_per_ciphertext(int(ciphertext.poly_modulus_degree()))
        chunks.append(
            VectorChunk(
                parms_id=_parms_id(ciphertext.parms_id()),
                scale=float(ciphertext.scale),
                polys=ciphertext_polys(ciphertext),
                values=min(width, total - index * width),  # Assumption 7
            )
        )
    return chunks


def seal_version(context_bytes: bytes) -> tuple[int, int]:
    """SEAL's (major, minor) version, read from the encryption parameters in a context."""
    params = _proto_field(_proto_fields(context_bytes), 1)
    magic, header_size, major, minor, *_ = _HEADER.unpack_from(params)
    if magic != SEAL_MAGIC or header_size != _HEADER.size:
        raise HeError("encryption parameters do not start with a SEAL header")
    return major, minor


def _seal_object(body: bytes, version: tuple[int, int]) -> bytes:
    # Assumption 3: header, then the body, uncompressed.
    return (
        _HEADER.pack(SEAL_MAGIC, _HEADER.size, *version, _COMPR_NONE, 0, _HEADER.size + len(body))
        + body
    )


def _dyn_array(words: np.ndarray, version: tuple[int, int]) -> bytes:
    flat = np.ascontiguousarray(words, dtype="<u8").reshape(-1)
    return _seal_object(_COUNT.pack(flat.size) + flat.tobytes(), version)


def public_key_bytes(level: RnsLevel, polys: np.ndarray, version: tuple[int, int]) -> bytes:
    """A SEAL-serialised public key ``(p0, p1)`` (Assumption 4), ready for a context."""
    return _ciphertext_bytes(level, polys, 1.0, version)


def _ciphertext_bytes(
    level: RnsLevel, polys: np.ndarray, scale: float, version: tuple[int, int]
) -> bytes:
    """An uncompressed SEAL ciphertext, two NTT-form polynomials at ``level`` (Assumption 4)."""
    size, primes, degree = polys.shape
    if (size, primes, degree) != (2, len(level.moduli), level.degree):
        raise HeError(f"polynomials of shape {polys.shape} do not fit the level")
    meta = _CIPHERTEXT_META.pack(*level.parms_id, 1, size, degree, primes, scale, 1)
    return _seal_object(meta + _dyn_array(polys, version), version)


@dataclass(frozen=True)
class CiphertextLayout:
    """What a fresh ciphertext of one context is, byte for byte: two polynomials at the top
    data ``level``, in NTT form, at ``scale``, saved by SEAL ``version``. It reads and checks
    such ciphertexts, and writes them, without SEAL (Assumptions 3, 4, 9)."""

    level: RnsLevel
    scale: float
    version: tuple[int, int]

    @classmethod
    def of(cls, context: ts.Context) -> CiphertextLayout:
        return cls(first_level(context), float(context.global_scale), library_version())

    @property
    def shape(self) -> tuple[int, int, int]:
        return (2, len(self.level.moduli), self.level.degree)

    @functools.cached_property
    def _moduli(self) -> np.ndarray:
        return np.array(self.level.moduli, dtype=np.uint64).reshape(1, -1, 1)

    @functools.cached_property
    def _body_size(self) -> int:
        words = 2 * len(self.level.moduli) * self.level.degree
        return _CIPHERTEXT_META.size + _HEADER.size + _COUNT.size + 8 * words

    @property
    def max_saved_bytes(self) -> int:
        """The most a ciphertext of this layout takes as SEAL saves it: its header, and its
        body after zstd, which may grow incompressible data by zstd's ``compressBound``
        (1/256th, and a frame's few bytes: 512 is room to spare)."""
        return _HEADER.size + self._body_size + self._body_size // 256 + 512

    def residues(self, data: bytes) -> np.ndarray:
        """A SEAL-saved ciphertext's ``(2, L, N)`` residues, after every check SEAL's load
        makes and more: the exact level, size, NTT form and scale, SEAL's own version, no
        compression but zstd, and a second polynomial that is not zero (a transparent
        ciphertext decrypts without the key). ``HeError`` saying what is wrong otherwise."""
        if len(data) < _HEADER.size:
            raise HeError("not a SEAL serialisation: shorter than its header")
        magic, header_size, major, minor, mode, _, size = _HEADER.unpack_from(data)
        if magic != SEAL_MAGIC or header_size != _HEADER.size or size != len(data):
            raise HeError("not a SEAL serialisation, or not as long as its header says")
        if (major, minor) != self.version:
            expected = ".".join(map(str, self.version))
            raise HeError(f"saved by SEAL {major}.{minor}, expected {expected}")
        body = memoryview(data)[_HEADER.size :]
        if mode == COMPR_ZSTD:
            body = memoryview(_unzstd(body, self._body_size))
        elif mode != _COMPR_NONE:
            raise HeError(f"compression mode {mode}: only SEAL's zstd or none is accepted")
        if len(body) != self._body_size:
            raise HeError(f"ciphertext body of {len(body)} bytes, expected {self._body_size}")
        *parms_id, ntt, polys, degree, primes, scale, correction = _CIPHERTEXT_META.unpack_from(
            body
        )
        if tuple(parms_id) != self.level.parms_id:
            raise HeError("ciphertext is not at the context's top level (parms_id)")
        if (polys, primes, degree) != self.shape or ntt != 1 or correction != 1:
            raise HeError("ciphertext is not a fresh two-polynomial encryption in NTT form")
        if scale != self.scale:
            raise HeError(f"ciphertext scale {scale} != {self.scale}")
        inner = _CIPHERTEXT_META.size
        magic, header_size, major, minor, mode, _, size = _HEADER.unpack_from(body, inner)
        count, words = _COUNT.unpack_from(body, inner + _HEADER.size)[0], self._body_size - inner
        if (magic, header_size, (major, minor), mode, size) != (
            SEAL_MAGIC,
            _HEADER.size,
            self.version,
            _COMPR_NONE,
            words,
        ) or count != 2 * primes * degree:
            raise HeError("ciphertext data is not one uncompressed array of its residues")
        residues = np.frombuffer(
            body, dtype="<u8", count=count, offset=inner + _HEADER.size + _COUNT.size
        ).reshape(self.shape)
        if not (residues < self._moduli).all():
            raise HeError("ciphertext residues are not reduced modulo their primes")
        if not residues[1].any():
            raise HeError("ciphertext is transparent (its second polynomial is zero)")
        return residues

    def add(self, total: np.ndarray, residues: np.ndarray) -> None:
        """``total += residues`` modulo each prime, in place: what SEAL's ``add_inplace`` does
        to two ciphertexts' data (both reduced, so the sum is below ``2 q < 2^62``)."""
        np.add(total, residues, out=total)
        np.minimum(total, total - self._moduli, out=total)  # a - q wraps above a when a < q

    def saved(self, residues: np.ndarray) -> bytes:
        """An uncompressed SEAL serialisation of a ciphertext of these residues."""
        return _ciphertext_bytes(self.level, residues, self.scale, self.version)


_decompressors = threading.local()  # a zstd context costs more to make than 64 KB to unpack


def _unzstd(frame: memoryview, size: int) -> bytes:
    import zstandard  # the aggregator's: a device never reads a ciphertext

    decompressor = getattr(_decompressors, "zstd", None)
    if decompressor is None:
        decompressor = _decompressors.zstd = zstandard.ZstdDecompressor()
    try:
        # A frame says how long it decompresses to, and zstandard trusts it over
        # max_output_size: a few bytes claiming gigabytes must be refused before.
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, size):
            raise HeError(f"ciphertext body says it is {declared} bytes, expected {size}")
        return decompressor.decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise HeError(f"ciphertext body is not one zstd frame of its size: {exc}") from exc


@functools.cache
def library_version() -> tuple[int, int]:
    """The (major, minor) SEAL writes in its headers (Assumption 3), from an object it saves."""
    magic, _, major, minor, *_ = _HEADER.unpack_from(_saved(sealapi.Plaintext().save))
    if magic != SEAL_MAGIC:
        raise HeError("SEAL saved an object without its header")
    return major, minor


def plaintext_bytes(
    parms_id: ParmsId, scale: float, residues: np.ndarray, version: tuple[int, int]
) -> bytes:
    """A SEAL-serialised CKKS plaintext in NTT form (Assumption 5)."""
    meta = _PLAINTEXT_META.pack(*parms_id, residues.size, scale)
    return _seal_object(meta + _dyn_array(residues, version), version)


# Memory-backed where there is one (Linux), so that no ciphertext or combined decryption touches
# a Raspberry Pi's SD card. One private (0700) directory per process, made at first use and
# removed at exit; each call has its own file in it (named by process and thread, so that the
# aggregator's threads and forked children never share one), deleted before the call returns.
# A directory per call cost the aggregator about 70 us of every update's 400 us load.
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
_scratch_directory: str | None = None
_scratch_lock = threading.Lock()


def _scratch_file() -> str:
    global _scratch_directory
    with _scratch_lock:
        if _scratch_directory is None or not os.path.isdir(_scratch_directory):
            _scratch_directory = tempfile.mkdtemp(prefix="truscl-seal-", dir=_SCRATCH)
            atexit.register(shutil.rmtree, _scratch_directory, True)
        return os.path.join(_scratch_directory, f"{os.getpid()}-{threading.get_ident()}")


def _saved(save: Callable[[str], None]) -> bytes:
    """Run SEAL's path-only ``save`` (Assumption 8) into a private scratch file."""
    path = _scratch_file()
    try:
        save(path)
        with open(path, "rb") as file:
            return file.read()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _load(load: Callable[[str], None], data: bytes) -> None:
    """Run SEAL's path-only ``load`` (Assumption 8) on ``data``, from a private scratch file;
    SEAL's own errors become ``HeError``."""
    path = _scratch_file()
    try:
        with open(path, "wb") as file:
            file.write(data)
        load(path)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HeError(f"SEAL refused the object: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def load_plaintext(context: ts.Context, data: bytes) -> sealapi.Plaintext:
    """Let SEAL parse and validate a plaintext."""
    plain = sealapi.Plaintext()
    _load(lambda path: plain.load(context.seal_context().data, path), data)
    return plain


def save_ciphertext(ciphertext: sealapi.Ciphertext) -> bytes:
    """SEAL's own serialisation of a ciphertext, zstd-compressed (Assumption 8)."""
    return _saved(ciphertext.save)


def load_seal_ciphertext(context: ts.Context, data: bytes) -> sealapi.Ciphertext:
    """A ciphertext SEAL parsed and checked against ``context``'s parameters."""
    ciphertext = sealapi.Ciphertext()
    _load(lambda path: ciphertext.load(context.seal_context().data, path), data)
    return ciphertext


def compression_mode(data: bytes) -> int:
    """The compression byte of a SEAL serialisation's header (Assumption 3)."""
    magic, header_size, _, _, mode, _, size = _HEADER.unpack_from(data)
    if magic != SEAL_MAGIC or header_size != _HEADER.size or size != len(data):
        raise HeError("not a SEAL serialisation")
    return int(mode)


def values_per_ciphertext(degree: int) -> int:
    """Reals one ciphertext carries: two per complex slot (Assumption 7)."""
    return degree


def to_slots(values: np.ndarray) -> list[complex]:
    """A chunk's reals as the complex slots SEAL's encoder takes (Assumption 7)."""
    flat = np.asarray(values, dtype=np.float64)
    if flat.size % 2:
        flat = np.append(flat, 0.0)
    return (flat[0::2] + 1j * flat[1::2]).tolist()


def from_slots(slots: Sequence[complex] | np.ndarray) -> np.ndarray:
    """Complex slots back to reals, two per slot, in value order (Assumption 7)."""
    z = np.asarray(slots, dtype=np.complex128)
    out = np.empty(2 * z.size, dtype=np.float64)
    out[0::2], out[1::2] = z.real, z.imag
    return out


def decode(context: ts.Context, plain: sealapi.Plaintext) -> np.ndarray:
    """SEAL's own CKKS decoding (inverse NTT, CRT, canonical embedding, slot order, scale),
    every slot as two reals."""
    encoder = sealapi.CKKSEncoder(context.seal_context().data)
    return from_slots(encoder.decode_complex(plain))


# --- the protobuf wire format, just enough for TenSEAL's context message (Assumption 6) ---

_Field = tuple[int, int, bytes | int]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise HeError("truncated or overlong protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _proto_fields(data: bytes) -> list[_Field]:
    fields: list[_Field] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise HeError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise HeError("truncated protobuf message")
        fields.append((number, wire, value))
    return fields


def _emit(fields: list[_Field]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        if wire == 0:
            assert isinstance(value, int)
            out += _varint(value)
        else:
            assert isinstance(value, bytes)
            out += (_varint(len(value)) if wire == 2 else b"") + value
    return bytes(out)


def _proto_field(fields: list[_Field], number: int) -> bytes:
    found = [value for n, wire, value in fields if n == number and wire == 2]
    if len(found) != 1 or not isinstance(found[0], bytes):
        raise HeError(f"expected one length-delimited protobuf field {number}")
    return found[0]


def _replace(fields: list[_Field], number: int, value: bytes) -> list[_Field]:
    _proto_field(fields, number)
    return [(n, w, value if n == number else v) for n, w, v in fields]


def context_public_key_bytes(context_bytes: bytes) -> bytes:
    """The SEAL-saved public key inside a serialised TenSEAL context."""
    return _proto_field(_proto_fields(_proto_field(_proto_fields(context_bytes), 2)), 1)


def with_public_key(context_bytes: bytes, public_key: bytes) -> bytes:
    """A serialised TenSEAL context identical to ``context_bytes`` but for its public key."""
    outer = _proto_fields(context_bytes)
    inner = _replace(_proto_fields(_proto_field(outer, 2)), 1, public_key)
    return _emit(_replace(outer, 2, _emit(inner)))


def reencode(data: bytes) -> bytes:
    """Parse and re-emit a protobuf message: the identity, if this codec reads TenSEAL right."""
    return _emit(_proto_fields(data))
