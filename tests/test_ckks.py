"""CKKS key roles, ciphertext validation, reproducible sums and key custody."""

import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
import zstandard
from eth_utils import keccak

from truscl.errors import ConfigError, HeError
from truscl.privacy import (
    DEFAULT_PROFILE,
    PROFILES,
    CkksProfile,
    OwnerKeys,
    ckks,
    context_hash,
    decrypt,
    encrypt,
    load_ciphertext,
    load_context,
    seal_layout,
    sum_ciphertexts,
)

SIZE = 100
# Measured: max error 7e-9 for the sum of five fresh encryptions of N(0, 1) values under
# ckks-4096-60-49; 1e-6 leaves two orders of magnitude of margin.
SUM_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def owner() -> OwnerKeys:
    return OwnerKeys.generate(DEFAULT_PROFILE)


@pytest.fixture(scope="module")
def device_context(owner: OwnerKeys) -> ts.Context:
    return load_context(owner.public_context_bytes())


@pytest.fixture(scope="module")
def aggregator_context(owner: OwnerKeys) -> ts.Context:
    return load_context(ckks.aggregator_context_bytes(owner.public_context_bytes()))


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.normal(size=SIZE) for _ in range(5)]


@pytest.fixture(scope="module")
def blobs(device_context: ts.Context, updates: list[np.ndarray]) -> list[bytes]:
    return [encrypt(device_context, update) for update in updates]


def test_sum_of_five_matches_plaintext_sum(
    owner: OwnerKeys, aggregator_context: ts.Context, updates: list[np.ndarray], blobs: list[bytes]
) -> None:
    # Execute
    total = sum_ciphertexts(aggregator_context, blobs, SIZE)

    # Assert
    decrypted = decrypt(owner, total, SIZE)
    np.testing.assert_allclose(decrypted, np.sum(updates, axis=0), rtol=0, atol=SUM_TOLERANCE)


def test_sum_bytes_do_not_depend_on_order_or_context(
    owner: OwnerKeys, aggregator_context: ts.Context, blobs: list[bytes]
) -> None:
    # Prepare: the aggregator's own context, and the public one as an auditor reloads it
    auditor_context = load_context(owner.public_context_bytes())
    orders = [(0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (2, 0, 4, 1, 3)]

    # Execute
    sums = {
        sum_ciphertexts(context, [blobs[i] for i in order], SIZE)
        for context in (aggregator_context, auditor_context)
        for order in orders
    }

    # Assert: one sum, SEAL-saved with zstd
    assert len(sums) == 1
    (total,) = sums
    (ciphertext,) = ckks.unpack_vector(total)[1]
    assert seal_layout.compression_mode(ciphertext) == seal_layout.COMPR_ZSTD


def test_aggregator_context_holds_no_key(
    aggregator_context: ts.Context, blobs: list[bytes]
) -> None:
    # Prepare
    vector = load_ciphertext(aggregator_context, blobs[0], SIZE)

    # Execute / Assert
    assert vector.size == SIZE
    assert not aggregator_context.is_private()
    assert not aggregator_context.has_public_key()
    with pytest.raises(ValueError, match="Secret key"):
        aggregator_context.secret_key()
    with pytest.raises(HeError, match="holds the secret key"):
        OwnerKeys(aggregator_context)
    with pytest.raises(HeError, match="no public key"):
        encrypt(aggregator_context, np.ones(3))


def test_public_context_cannot_decrypt(device_context: ts.Context) -> None:
    assert not device_context.is_private()
    with pytest.raises(ValueError, match="Secret key"):
        device_context.secret_key()
    with pytest.raises(HeError, match="holds the secret key"):
        OwnerKeys(device_context)


def test_devices_and_aggregators_refuse_a_secret_key(owner: OwnerKeys) -> None:
    # Prepare
    secret_bytes = owner.context.serialize(save_secret_key=True)

    # Execute / Assert
    with pytest.raises(HeError, match="holds a secret key"):
        load_context(secret_bytes)
    assert load_context(secret_bytes, expect_private=True).is_private()
    with pytest.raises(HeError, match="no secret key"):
        load_context(owner.public_context_bytes(), expect_private=True)
    with pytest.raises(HeError, match="not a TenSEAL context"):
        load_context(b"\x00" * 64)


def test_roles_get_no_optional_keys(owner: OwnerKeys) -> None:
    for context in (owner.context, load_context(owner.public_context_bytes())):
        assert not context.has_galois_keys()
        assert not context.has_relin_keys()


def test_ciphertext_from_another_profile_is_rejected(aggregator_context: ts.Context) -> None:
    # Prepare
    other_owner = OwnerKeys.generate(PROFILES["ckks-8192-60-49"])
    other = encrypt(load_context(other_owner.public_context_bytes()), np.ones(SIZE))

    # Execute / Assert
    with pytest.raises(HeError, match="SEAL refused"):
        load_ciphertext(aggregator_context, other, SIZE)


def test_ciphertext_under_another_key_of_the_same_profile_decrypts_to_noise(
    owner: OwnerKeys,
) -> None:
    # SEAL ciphertexts carry no key identifier: this is a documented limit, not a check.
    stranger = load_context(OwnerKeys.generate(DEFAULT_PROFILE).public_context_bytes())
    decrypted = decrypt(owner, encrypt(stranger, np.ones(SIZE)), SIZE)
    assert np.max(np.abs(decrypted - 1.0)) > 1.0


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"garbage",
        lambda b: b[: len(b) // 2],
        lambda b: b"",
        lambda b: b + b"\x00",
        lambda b: b[:15] + bytes(20) + b[35:],  # the SEAL header of the ciphertext zeroed
    ],
    ids=["garbage", "truncated", "empty", "trailing", "no-seal-header"],
)
def test_malformed_ciphertext_bytes_are_rejected(
    aggregator_context: ts.Context, blobs: list[bytes], mangle: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(HeError):
        load_ciphertext(aggregator_context, mangle(blobs[0]), SIZE)


def test_wrong_size_is_rejected(aggregator_context: ts.Context, blobs: list[bytes]) -> None:
    with pytest.raises(HeError, match="holds 100 values, expected 99"):
        load_ciphertext(aggregator_context, blobs[0], SIZE - 1)
    with pytest.raises(HeError, match="expected 99"):
        sum_ciphertexts(aggregator_context, blobs, SIZE - 1)


def test_wrong_scale_is_rejected_before_it_breaks_the_sum(
    device_context: ts.Context, aggregator_context: ts.Context
) -> None:
    # Prepare: a well-formed ciphertext at scale 2^30 instead of the profile's 2^40
    seal_context = device_context.seal_context().data
    plain, ciphertext = sealapi.Plaintext(), sealapi.Ciphertext()
    sealapi.CKKSEncoder(seal_context).encode([1.0] * SIZE, 2.0**30, plain)
    sealapi.Encryptor(seal_context, device_context.public_key().data).encrypt(plain, ciphertext)
    odd = ckks.pack_vector(SIZE, [seal_layout.save_ciphertext(ciphertext)])

    # Execute / Assert
    with pytest.raises(HeError, match="scale"):
        load_ciphertext(aggregator_context, odd, SIZE)


def test_nothing_to_sum_and_unencryptable_values_are_errors(
    aggregator_context: ts.Context, device_context: ts.Context
) -> None:
    with pytest.raises(HeError, match="no ciphertexts"):
        sum_ciphertexts(aggregator_context, [], SIZE)
    for bad in (np.array([]), np.array([1.0, np.nan]), np.ones((2, 2))):
        with pytest.raises(HeError):
            encrypt(device_context, bad)


def test_long_vectors_span_ciphertexts_and_keep_stdout_clean(
    owner: OwnerKeys, device_context: ts.Context, capfd: pytest.CaptureFixture[str]
) -> None:
    # Prepare: more values than one ciphertext's 4096 (two per complex slot)
    values = np.linspace(-1.0, 1.0, 9000)

    # Execute
    blob = encrypt(device_context, values)
    print("still printing")

    # Assert
    assert capfd.readouterr().out == "still printing\n"
    assert len(ckks.unpack_vector(blob)[1]) == 3
    np.testing.assert_allclose(decrypt(owner, blob, 9000), values, atol=SUM_TOLERANCE)


def test_context_hash_is_keccak_and_stable_across_reload(owner: OwnerKeys, tmp_path: Path) -> None:
    # Prepare
    owner.save(tmp_path / "owner.key")

    # Execute
    reloaded = OwnerKeys.load(tmp_path / "owner.key")

    # Assert: a restarted owner republishes the very context whose hash is on chain
    published = owner.public_context_bytes()
    assert context_hash(published) == keccak(published)
    assert len(context_hash(published)) == 32
    assert reloaded.public_context_bytes() == published
    assert context_hash(ckks.aggregator_context_bytes(published)) != context_hash(published)


def test_secret_key_file_is_0600_and_round_trips(
    owner: OwnerKeys, blobs: list[bytes], updates: list[np.ndarray], tmp_path: Path
) -> None:
    # Prepare
    path = tmp_path / "owner.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        # Execute
        owner.save(path)
    finally:
        os.umask(old_umask)
    loaded = OwnerKeys.load(path)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]
    np.testing.assert_allclose(decrypt(loaded, blobs[0], SIZE), updates[0], atol=SUM_TOLERANCE)


def test_existing_key_is_never_overwritten(owner: OwnerKeys, tmp_path: Path) -> None:
    path = tmp_path / "owner.key"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        owner.save(path)
    assert path.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [path]


def test_readable_key_file_is_refused(owner: OwnerKeys, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "owner.key"
    owner.save(path)
    path.chmod(0o644)

    # Execute / Assert
    with pytest.raises(ConfigError, match="0644"):
        OwnerKeys.load(path)


@pytest.mark.parametrize(
    ("degree", "bits", "scale_bits"),
    [
        (4096, (60, 60), 40),  # 120 bits > 109: below 128-bit security
        (8192, (60, 60, 60, 60), 40),  # 240 > 218
        (3000, (60, 49), 40),  # not a power of two SEAL supports
        (4096, (60,), 40),  # no special prime
        (4096, (61, 40), 40),  # prime above 60 bits
        (4096, (40, 49), 40),  # scale leaves no headroom in the data prime
    ],
)
def test_unsafe_profiles_are_refused(degree: int, bits: tuple[int, ...], scale_bits: int) -> None:
    with pytest.raises(HeError):
        CkksProfile("bad", degree, bits, scale_bits)


def test_profiles_are_named_by_their_parameters() -> None:
    assert DEFAULT_PROFILE is PROFILES["ckks-4096-60-49"]
    assert DEFAULT_PROFILE.poly_modulus_degree == 4096
    assert DEFAULT_PROFILE.coeff_mod_bit_sizes == (60, 49)
    assert DEFAULT_PROFILE.global_scale_bits == 40
    assert DEFAULT_PROFILE.values_per_ciphertext == 4096


@pytest.mark.parametrize(("name", "target"), [("ckks-4096-60-49", 16.1), ("ckks-4096-40-40", 12.1)])
def test_a_full_ciphertext_costs_at_most_the_target_bytes_per_value(
    name: str, target: float
) -> None:
    # Prepare: a vector filling exactly two ciphertexts, two values per complex slot
    owner = OwnerKeys.generate(PROFILES[name])
    context = load_context(owner.public_context_bytes())
    values = np.random.default_rng(5).normal(0.0, 0.1, 2 * PROFILES[name].values_per_ciphertext)

    # Execute
    blob = encrypt(context, values)

    # Assert
    assert len(blob) / values.size <= target
    assert len(ckks.unpack_vector(blob)[1]) == 2
    np.testing.assert_allclose(
        decrypt(owner, blob, values.size), values, atol=PROFILES[name].encryption_noise
    )


def test_the_compact_profile_sums_within_its_stated_error() -> None:
    # Prepare: ten updates at the default clip's magnitude (L2 norm 5 over 1,000 values)
    profile = PROFILES["ckks-4096-40-40"]
    owner = OwnerKeys.generate(profile)
    context = load_context(owner.public_context_bytes())
    aggregator = load_context(ckks.aggregator_context_bytes(owner.public_context_bytes()))
    rng = np.random.default_rng(9)
    updates = [rng.normal(0.0, 5.0 / np.sqrt(1000), 1000) for _ in range(10)]

    # Execute
    total = sum_ciphertexts(aggregator, [encrypt(context, u) for u in updates], 1000)

    # Assert
    error = np.max(np.abs(decrypt(owner, total, 1000) - np.sum(updates, axis=0)))
    assert 0 < error < profile.encryption_noise


def test_threads_load_and_save_without_crossing_and_leave_no_file(
    owner: OwnerKeys, device_context: ts.Context, aggregator_context: ts.Context
) -> None:
    """SEAL loads and saves only through paths: the aggregator's threads each get their own
    scratch file, in a private directory, deleted before the call returns."""
    rng = np.random.default_rng(5)
    blobs = [encrypt(device_context, rng.uniform(-1, 1, 5000)) for _ in range(4)]
    expected = [load_ciphertext(aggregator_context, b, 5000).serialize() for b in blobs]

    def round_trip(index: int) -> bytes:
        return load_ciphertext(aggregator_context, blobs[index % 4], 5000).serialize()

    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            assert list(pool.map(round_trip, range(16))) == expected * 4
    directory = Path(seal_layout._scratch_directory or "")
    assert directory.is_dir() and stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert list(directory.iterdir()) == []


# --- adding without SEAL: held to SEAL's own parse, checks and sums ---


def seal_sum(context: ts.Context, blobs: list[bytes], size: int) -> bytes:
    """The sum as SEAL makes it: each ciphertext loaded by SEAL, added by its evaluator."""
    vectors = [load_ciphertext(context, blob, size) for blob in blobs]
    evaluator = sealapi.Evaluator(context.seal_context().data)
    for vector in vectors[1:]:
        for mine, theirs in zip(vectors[0].ciphertexts, vector.ciphertexts, strict=True):
            evaluator.add_inplace(mine, theirs)
    return vectors[0].serialize()


@pytest.mark.parametrize("name", ["ckks-4096-60-49", "ckks-4096-40-40", "ckks-8192-60-49"])
def test_sums_and_residues_are_seals_own(name: str) -> None:
    # Prepare: vectors over several ciphertexts, one of them not full
    owner = OwnerKeys.generate(PROFILES[name])
    context = load_context(owner.public_context_bytes())
    aggregator = load_context(ckks.aggregator_context_bytes(owner.public_context_bytes()))
    size = PROFILES[name].values_per_ciphertext + 77
    rng = np.random.default_rng(3)
    blobs = [encrypt(context, rng.normal(0.0, 1.0, size)) for _ in range(6)]
    vectors = ckks.VectorFormat.of(aggregator, size)

    # Execute
    total = sum_ciphertexts(aggregator, blobs, size)
    residues = vectors.residues(blobs[0])

    # Assert: the bytes SEAL's evaluator sum saves, and SEAL's accessor's residues
    assert total == seal_sum(aggregator, blobs, size)
    seal_ciphertexts = load_ciphertext(aggregator, blobs[0], size).ciphertexts
    for mine, theirs in zip(residues, seal_ciphertexts, strict=True):
        np.testing.assert_array_equal(mine, seal_layout.ciphertext_polys(theirs))
        uncompressed = vectors.layout.saved(mine)
        assert seal_layout.compression_mode(uncompressed) == 0
        reloaded = seal_layout.load_seal_ciphertext(aggregator, uncompressed)
        np.testing.assert_array_equal(seal_layout.ciphertext_polys(reloaded), mine)


@pytest.fixture(scope="module")
def one_ciphertext(aggregator_context: ts.Context, blobs: list[bytes]) -> bytes:
    """A SEAL-saved (zstd) ciphertext of the task, as one travels inside a vector."""
    return ckks.unpack_vector(blobs[0])[1][0]


def _set_word(layout: seal_layout.CiphertextLayout, saved: bytes, index: int, word: int) -> bytes:
    residues = layout.residues(saved).copy()
    residues.reshape(-1)[index] = word
    return layout.saved(residues)  # written unchecked: the bytes a forger can send


def _field(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


HEADER = 16
# Offsets in an uncompressed ciphertext (Assumption 4): parms_id, then is_ntt_form, size, N...
NTT, SIZE_FIELD, DEGREE, SCALE = HEADER + 32, HEADER + 33, HEADER + 41, HEADER + 57
MANGLES: dict[str, Callable[[seal_layout.CiphertextLayout, bytes], bytes]] = {
    "truncated": lambda layout, raw: raw[:-8],
    "magic": lambda layout, raw: _field(raw, 0, b"\x00\x00"),
    "header-size": lambda layout, raw: _field(raw, 2, b"\x11"),
    "major-version": lambda layout, raw: _field(raw, 3, b"\x09"),
    "minor-version": lambda layout, raw: _field(raw, 4, b"\x09"),
    "compression-mode": lambda layout, raw: _field(raw, 5, b"\x07"),
    "zlib-claimed": lambda layout, raw: _field(raw, 5, b"\x01"),
    "parms-id": lambda layout, raw: _field(raw, HEADER, b"\x01\x02\x03\x04"),
    "three-polys": lambda layout, raw: _field(raw, SIZE_FIELD, b"\x03"),
    "degree": lambda layout, raw: _field(raw, DEGREE, (2048).to_bytes(8, "little")),
    "residue-equals-prime": lambda layout, raw: _set_word(layout, raw, 5, layout.level.moduli[0]),
    "residue-above-prime": lambda layout, raw: _set_word(layout, raw, 4100, 2**63 + 5),
}


@pytest.mark.parametrize("mangle", MANGLES.values(), ids=MANGLES.keys())
def test_what_seal_refuses_the_layout_refuses(
    aggregator_context: ts.Context, one_ciphertext: bytes, mangle: Callable[..., bytes]
) -> None:
    # Prepare: SEAL accepts the uncompressed original, as the layout does
    layout = seal_layout.CiphertextLayout.of(aggregator_context)
    raw = layout.saved(layout.residues(one_ciphertext))
    seal_layout.load_seal_ciphertext(aggregator_context, raw)
    mangled = mangle(layout, raw)

    # Execute / Assert
    with pytest.raises(HeError, match="SEAL refused"):
        seal_layout.load_seal_ciphertext(aggregator_context, mangled)
    with pytest.raises(HeError):
        layout.residues(mangled)


def test_the_layout_refuses_more_than_seal(
    aggregator_context: ts.Context, one_ciphertext: bytes
) -> None:
    """What SEAL loads but no honest device sends: a transparent ciphertext (it decrypts
    without the key), another scale, bytes after the object, coefficients not in NTT form;
    and a zstd frame claiming 16 MiB is refused before it is decompressed."""
    # Prepare
    layout = seal_layout.CiphertextLayout.of(aggregator_context)
    residues = layout.residues(one_ciphertext).copy()
    transparent = residues.copy()
    transparent[1] = 0
    raw = layout.saved(residues)
    seal_takes = {
        "transparent": layout.saved(transparent),
        "scale": _field(raw, SCALE, np.float64(2.0**30).tobytes()),
        "not as long as its header says": raw + bytes(8),
        "NTT form": _field(raw, NTT, b"\x00"),
    }
    body = zstandard.ZstdCompressor().compress(bytes(1 << 24))
    header = seal_layout._HEADER.pack(0xA15E, 16, *layout.version, 2, 0, 16 + len(body))

    # Execute / Assert
    for match, data in seal_takes.items():
        seal_layout.load_seal_ciphertext(aggregator_context, data)
        with pytest.raises(HeError, match=match):
            layout.residues(data)
    with pytest.raises(HeError, match="says it is 16777216 bytes"):
        layout.residues(header + body)
    frame = one_ciphertext[16:-10]  # SEAL's own zstd frame, cut short
    header = seal_layout._HEADER.pack(0xA15E, 16, *layout.version, 2, 0, 16 + len(frame))
    with pytest.raises(HeError, match="SEAL refused"):
        seal_layout.load_seal_ciphertext(aggregator_context, header + frame)
    with pytest.raises(HeError, match="not one zstd frame"):
        layout.residues(header + frame)
    np.testing.assert_array_equal(layout.residues(one_ciphertext), residues)  # still reads
