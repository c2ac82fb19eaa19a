"""Threshold CKKS: the protocol, and tripwires that tie every layout assumption to TenSEAL.

The tripwires compare this code with the library's own results (SEAL's NTT, SEAL's secret key,
TenSEAL's decrypt, SEAL's serialisation), so a TenSEAL upgrade that changes a layout fails here
rather than silently decrypting to noise.
"""

import dataclasses
import itertools
import os
import struct

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
import tenseal.sealapi.util as sealutil
import zstandard

from truscl.errors import ConfigError, HeError
from truscl.privacy import (
    DEFAULT_PROFILE,
    PROFILES,
    KeygenTranscript,
    KeyShare,
    OwnerKeys,
    PartialDecryption,
    SeedShare,
    ckks,
    combine,
    common_seed,
    context_hash,
    contribution_commitment,
    encrypt,
    load_context,
    run_keygen,
    seal_layout,
    sum_ciphertexts,
    threshold,
)
from truscl.server.keygen import KeygenTerms

HOLDERS = ("guardian-a", "guardian-b", "owner")
SIZE = 100
LONG = 5000  # two ciphertexts of 4096 values (two per complex slot)
# Measured over 3 holders at sigma 2^20: max error ~3e-4 over 4096 values (std ~7.5e-5 per
# value, as sigma * sqrt(3 N / 2) / 2^40 predicts); 1e-3 is over 13 standard deviations.
THRESHOLD_TOLERANCE = 1e-3
# CKKS precision of an ordinary decryption of a sum of five (see test_ckks.py).
EXACT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def shares() -> list[KeyShare]:
    return [KeyShare.generate(holder) for holder in HOLDERS]


@pytest.fixture(scope="module")
def keygen(shares: list[KeyShare]) -> tuple[bytes, KeygenTranscript]:
    return run_keygen(shares)


@pytest.fixture(scope="module")
def public_bytes(keygen: tuple[bytes, KeygenTranscript]) -> bytes:
    return keygen[0]


@pytest.fixture(scope="module")
def device_context(public_bytes: bytes) -> ts.Context:
    return load_context(public_bytes)


@pytest.fixture(scope="module")
def owner() -> OwnerKeys:
    return OwnerKeys.generate(DEFAULT_PROFILE)


def _updates(count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=size) for _ in range(count)]


def _aggregate(public_bytes: bytes, updates: list[np.ndarray]) -> bytes:
    """Devices encrypt with SEAL; a key-less aggregator adds; bytes in and out."""
    device = load_context(public_bytes)
    aggregator = load_context(ckks.aggregator_context_bytes(public_bytes))
    blobs = [encrypt(device, update) for update in updates]
    return sum_ciphertexts(aggregator, blobs, updates[0].size)


def _decompressed_body(blob: bytes) -> bytes:
    """SEAL's body of a saved object, decompressed (TenSEAL saves with zstd)."""
    magic, header_size, _, _, mode, _, size = struct.unpack("<HBBBBHQ", blob[:16])
    assert (magic, header_size, size) == (0xA15E, 16, len(blob))
    body = blob[16:]
    return zstandard.ZstdDecompressor().decompressobj().decompress(body) if mode == 2 else body


def _saved(obj: object, tmp_path) -> bytes:
    path = tmp_path / "saved"
    obj.save(str(path))  # type: ignore[attr-defined]
    return path.read_bytes()


# --- tripwires: the NTT ---------------------------------------------------------------


@pytest.mark.parametrize("modulus", [1152921504606830593, 562949953216513])
def test_ntt_matches_seals_tables(modulus: int) -> None:
    # Prepare: SEAL's own tables for this prime, and a random polynomial
    degree = DEFAULT_PROFILE.poly_modulus_degree
    tables = sealutil.CreateNTTTables(degree.bit_length() - 1, [sealapi.Modulus(modulus)]).get()
    poly = np.random.default_rng(1).integers(0, modulus, size=degree, dtype=np.uint64)
    ours = threshold.ntt_for(degree, modulus)

    # Execute
    seal_forward = np.array(sealutil.ntt_negacyclic_harvey(poly.tolist(), tables), np.uint64)
    # SEAL's inverse binding is the lazy one: values in [0, 2q)
    seal_inverse = np.array(
        sealutil.inverse_ntt_negacyclic_harvey(seal_forward.tolist(), tables), np.uint64
    ) % np.uint64(modulus)

    # Assert
    assert ours.root == tables.get_root()
    np.testing.assert_array_equal(ours.forward(poly), seal_forward)
    np.testing.assert_array_equal(ours.inverse(seal_forward), seal_inverse)
    np.testing.assert_array_equal(seal_inverse, poly)


def test_seals_secret_key_is_ternary_in_our_inverse_ntt(owner: OwnerKeys) -> None:
    """Guards assumptions 1 and 2: the key's words are [prime][coeff], in SEAL's NTT form."""
    # Execute
    key = seal_layout.secret_key_ntt(owner.context)
    level = seal_layout.key_level(owner.context)
    rows = [
        threshold.centered(threshold.ntt_for(level.degree, q).inverse(row), q)
        for row, q in zip(key, level.moduli, strict=True)
    ]

    # Assert: one ternary polynomial, the same under every prime
    assert key.shape == (2, DEFAULT_PROFILE.poly_modulus_degree)
    assert set(np.unique(rows[0])) == {-1, 0, 1}
    np.testing.assert_array_equal(rows[0], rows[1])


# --- tripwires: SEAL and TenSEAL byte layouts ---------------------------------------------


def test_ciphertext_words_read_through_seal_match_its_serialisation(owner: OwnerKeys) -> None:
    """Guards assumptions 1, 3, 4 and 8 for reading: the accessor order is the saved order,
    and what travels is SEAL's zstd serialisation."""
    # Prepare
    blob = encrypt(owner.context, np.ones(SIZE))
    (saved,) = ckks.unpack_vector(blob)[1]
    ciphertext = ckks.load_ciphertext(owner.context, blob, SIZE).ciphertexts[0]

    # Execute
    polys = seal_layout.ciphertext_polys(ciphertext)
    body = _decompressed_body(saved)

    # Assert: parms_id, NTT flag, size, N, L, scale, correction factor, then the DynArray
    meta = struct.unpack_from("<4QBQQQdQ", body)
    assert list(meta[:4]) == ciphertext.parms_id()
    assert meta[4:] == (1, 2, 4096, 1, ciphertext.scale, 1)
    words = np.frombuffer(body[struct.calcsize("<4QBQQQdQ") + 16 + 8 :], dtype="<u8")
    np.testing.assert_array_equal(words, polys.reshape(-1))
    assert seal_layout.compression_mode(saved) == seal_layout.COMPR_ZSTD


def test_our_public_key_and_plaintext_bytes_are_seals(owner: OwnerKeys, tmp_path) -> None:
    """Guards assumptions 3-5 for writing: our serialisation equals SEAL's, decompressed."""
    # Prepare
    context = owner.context
    version = seal_layout.seal_version(owner.public_context_bytes())
    level = seal_layout.key_level(context)
    secret = seal_layout.secret_key_ntt(context)

    # Execute
    public_key = seal_layout.public_key_bytes(level, seal_layout.public_key_polys(context), version)
    plaintext = seal_layout.plaintext_bytes(level.parms_id, 1.0, secret, version)

    # Assert
    assert public_key[16:] == _decompressed_body(_saved(context.public_key().data, tmp_path))
    assert plaintext[16:] == _decompressed_body(_saved(context.secret_key().data, tmp_path))
    assert public_key[2:4] == _saved(context.public_key().data, tmp_path)[2:4]  # version


def test_context_protobuf_codec_is_the_identity_and_swaps_the_public_key(
    owner: OwnerKeys,
) -> None:
    """Guards assumption 6: a context built around another key encrypts to that key."""
    # Prepare: a second, unrelated owner whose public key we graft onto the first context
    other = OwnerKeys.generate(DEFAULT_PROFILE)
    template = owner.public_context_bytes()

    # Execute
    grafted = seal_layout.with_public_key(
        template, seal_layout.context_public_key_bytes(other.public_context_bytes())
    )
    blob = encrypt(load_context(grafted), np.arange(SIZE, dtype=float))

    # Assert
    assert seal_layout.reencode(template) == template
    assert seal_layout.reencode(grafted) == grafted
    np.testing.assert_allclose(
        ckks.decrypt(other, blob, SIZE), np.arange(SIZE), atol=EXACT_TOLERANCE
    )


@pytest.mark.parametrize("size", [SIZE, LONG])
def test_single_key_decryption_with_our_code_equals_seals(owner: OwnerKeys, size: int) -> None:
    """Guards assumptions 1, 2, 5 and 7 end to end: SEAL's own key, taken apart and used as a
    one-holder share (no smudging), decrypts an aggregate as SEAL's Decryptor and
    CKKSEncoder do (``ckks.decrypt``)."""
    # Prepare
    updates = _updates(5, size, seed=3)
    aggregate = _aggregate(owner.public_context_bytes(), updates)
    level = seal_layout.key_level(owner.context)
    q = level.moduli[0]
    coefficients = threshold.centered(
        threshold.ntt_for(level.degree, q).inverse(seal_layout.secret_key_ntt(owner.context)[0]), q
    )
    share = KeyShare("owner", DEFAULT_PROFILE, coefficients)
    public = load_context(owner.public_context_bytes())

    # Execute
    partial = share.partial_decrypt(public, aggregate, size, sigma=1e-9)
    ours = combine(public, aggregate, size, [partial], ["owner"])

    # Assert
    theirs = ckks.decrypt(owner, aggregate, size)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=EXACT_TOLERANCE)
    np.testing.assert_allclose(ours, np.sum(updates, axis=0), rtol=0, atol=EXACT_TOLERANCE)


# --- the collective public key --------------------------------------------------------


def test_collective_context_is_an_ordinary_public_context(
    public_bytes: bytes, device_context: ts.Context, keygen
) -> None:
    # Assert: no secret key, a public key, the profile's parameters, a stable hash
    assert not device_context.is_private()
    assert device_context.has_public_key()
    assert seal_layout.first_level(device_context).moduli == (1152921504606830593,)
    assert context_hash(public_bytes) == keygen[1].context_hash
    reloaded = load_context(public_bytes).serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    assert reloaded == public_bytes


@pytest.mark.parametrize("size", [SIZE, LONG])
def test_all_holders_decrypt_a_sum_of_five_through_tenseal(
    shares: list[KeyShare], public_bytes: bytes, size: int
) -> None:
    # Prepare: devices and aggregator use TenSEAL unchanged on the collective context
    updates = _updates(5, size, seed=size)
    aggregate = _aggregate(public_bytes, updates)
    holder_context = load_context(public_bytes)

    # Execute: partials travel as bytes
    wire = [share.partial_decrypt(holder_context, aggregate, size).to_bytes() for share in shares]
    partials = [PartialDecryption.from_bytes(blob) for blob in wire]
    result = combine(load_context(public_bytes), aggregate, size, partials, HOLDERS)

    # Assert
    np.testing.assert_allclose(result, np.sum(updates, axis=0), rtol=0, atol=THRESHOLD_TOLERANCE)


@pytest.mark.parametrize("missing", HOLDERS)
def test_any_k_minus_one_holders_learn_nothing_useful(
    shares: list[KeyShare], public_bytes: bytes, device_context: ts.Context, missing: str
) -> None:
    # Prepare
    updates = _updates(5, LONG, seed=7)
    aggregate = _aggregate(public_bytes, updates)
    present = [share for share in shares if share.holder_id != missing]

    # Execute: combine what k - 1 holders can produce (c0 plus their partials)
    partials = [share.partial_decrypt(device_context, aggregate, LONG) for share in present]
    garbage = combine(device_context, aggregate, LONG, partials, [s.holder_id for s in present])

    # Assert
    truth = np.sum(updates, axis=0)
    assert abs(np.corrcoef(garbage, truth)[0, 1]) < 0.1
    assert np.max(np.abs(garbage - truth)) > 1e3


def test_transcript_verifies_and_tampering_is_caught(keygen) -> None:
    public_bytes, transcript = keygen

    # Execute / Assert: the honest transcript rebuilds the very same context
    assert transcript.verify(public_bytes) == public_bytes
    assert transcript.digest() == dataclasses.replace(transcript).digest()

    bad_reveal = dataclasses.replace(
        transcript, seed_reveals=(os.urandom(32), *transcript.seed_reveals[1:])
    )
    other_holder = dataclasses.replace(
        transcript, contributions=(transcript.contributions[1], *transcript.contributions[1:])
    )
    wrong_hash = dataclasses.replace(transcript, context_hash=bytes(32))
    for tampered in (bad_reveal, other_holder, wrong_hash):
        with pytest.raises(HeError):
            tampered.verify()
        assert tampered.digest() != transcript.digest()
    with pytest.raises(HeError, match="not the one"):
        transcript.verify(ckks.aggregator_context_bytes(public_bytes))


def test_seed_reveals_must_open_their_commitments() -> None:
    # Prepare
    seeds = [SeedShare.generate(holder) for holder in HOLDERS]
    commitments = {s.holder_id: s.commitment for s in seeds}
    reveals = {s.holder_id: s.value for s in seeds}

    # Execute
    seed = common_seed(commitments, reveals)

    # Assert: deterministic, and a changed reveal or a missing holder is refused
    assert seed == common_seed(commitments, dict(reveals))
    with pytest.raises(HeError, match="does not open"):
        common_seed(commitments, {**reveals, "owner": os.urandom(32)})
    with pytest.raises(HeError):
        common_seed(commitments, {h: reveals[h] for h in HOLDERS[:2]})


def test_a_common_seed_gives_everyone_the_same_uniform_a() -> None:
    # Prepare
    moduli = (1152921504606830593, 562949953216513)

    # Execute
    a = threshold.uniform_polynomial(b"s" * 32, moduli, 4096)

    # Assert
    np.testing.assert_array_equal(a, threshold.uniform_polynomial(b"s" * 32, moduli, 4096))
    assert not np.array_equal(a, threshold.uniform_polynomial(b"t" * 32, moduli, 4096))
    for row, q in zip(a, moduli, strict=True):
        assert row.max() < q
        assert abs(float(row.astype(np.float64).mean()) / q - 0.5) < 0.02


# --- shares and partials --------------------------------------------------------------


def test_a_share_round_trips_and_is_fresh_and_ternary(shares: list[KeyShare]) -> None:
    # Execute
    blob = shares[0].to_bytes()
    back = KeyShare.from_bytes(blob)

    # Assert
    assert back.holder_id == shares[0].holder_id and back.profile == DEFAULT_PROFILE
    np.testing.assert_array_equal(back.coefficients, shares[0].coefficients)
    assert len(blob) < 1100
    assert not np.array_equal(shares[0].coefficients, shares[1].coefficients)
    counts = np.bincount(shares[0].coefficients + 1, minlength=3)
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.05)
    with pytest.raises(HeError):
        KeyShare.from_bytes(blob[:-1])
    with pytest.raises(HeError):
        KeyShare.from_bytes(blob[:-1] + b"\xff")


def test_combine_refuses_partials_that_do_not_fit(
    shares: list[KeyShare], public_bytes: bytes, device_context: ts.Context
) -> None:
    # Prepare
    first = _aggregate(public_bytes, _updates(2, SIZE, seed=1))
    second = _aggregate(public_bytes, _updates(2, SIZE, seed=2))
    partials = [s.partial_decrypt(device_context, first, SIZE) for s in shares]
    stale = shares[0].partial_decrypt(device_context, second, SIZE)

    # Execute / Assert
    with pytest.raises(HeError, match="each key holder"):
        combine(device_context, first, SIZE, partials[1:], HOLDERS)
    with pytest.raises(HeError, match="each key holder"):
        combine(device_context, first, SIZE, [*partials, partials[0]], HOLDERS)
    with pytest.raises(HeError, match="another ciphertext"):
        combine(device_context, first, SIZE, [stale, *partials[1:]], HOLDERS)
    with pytest.raises(HeError):
        shares[0].partial_decrypt(device_context, first, SIZE + 1)


def test_smudging_is_fresh_per_call_and_from_the_given_generator(
    shares: list[KeyShare], public_bytes: bytes, device_context: ts.Context
) -> None:
    # Prepare
    aggregate = _aggregate(public_bytes, _updates(2, SIZE, seed=4))
    share = shares[0]

    # Execute
    fresh = [share.partial_decrypt(device_context, aggregate, SIZE) for _ in range(2)]
    seeded = [
        share.partial_decrypt(device_context, aggregate, SIZE, rng=np.random.default_rng(5))
        for _ in range(2)
    ]

    # Assert
    assert not np.array_equal(fresh[0].polys, fresh[1].polys)
    np.testing.assert_array_equal(seeded[0].polys, seeded[1].polys)


def test_two_holders_an_owner_and_one_guardian(public_bytes: bytes) -> None:
    # Prepare: the smallest threshold key, an owner and one guardian
    pair = [KeyShare.generate("owner"), KeyShare.generate("guardian")]
    context_bytes, transcript = run_keygen(pair)
    updates = _updates(5, SIZE, seed=9)
    aggregate = _aggregate(context_bytes, updates)
    context = load_context(context_bytes)

    # Execute
    partials = [s.partial_decrypt(context, aggregate, SIZE) for s in pair]
    results = [
        combine(context, aggregate, SIZE, list(order), transcript.holders)
        for order in itertools.permutations(partials)
    ]

    # Assert: the order of partials does not matter; a new key set gives a new context
    for result in results:
        np.testing.assert_allclose(result, np.sum(updates, axis=0), atol=THRESHOLD_TOLERANCE)
    assert context_bytes != public_bytes


def test_a_contribution_that_does_not_fit_is_refused(shares: list[KeyShare]) -> None:
    # Prepare
    seed = b"s" * 32
    good = {s.holder_id: s.public_contribution(seed) for s in shares[:2]}
    _, polys = threshold.decode_contribution(good[HOLDERS[0]])
    swapped = {HOLDERS[0]: good[HOLDERS[1]], HOLDERS[1]: good[HOLDERS[0]]}

    # Execute / Assert: a contribution filed under another holder, or truncated
    with pytest.raises(HeError, match="does not fit"):
        threshold.collective_public_context(DEFAULT_PROFILE, seed, swapped)
    with pytest.raises(HeError):
        threshold.collective_public_context(
            DEFAULT_PROFILE, seed, {**good, HOLDERS[0]: good[HOLDERS[0]][:-8]}
        )
    assert polys.shape == (2, DEFAULT_PROFILE.poly_modulus_degree)


def test_the_larger_profile_works_end_to_end() -> None:
    # Prepare: two ciphertexts of 8192 values each
    profile = PROFILES["ckks-8192-60-49"]
    pair = [KeyShare.generate("owner", profile), KeyShare.generate("guardian", profile)]
    context_bytes, transcript = run_keygen(pair)
    updates = _updates(5, 10000, seed=8)
    aggregate = _aggregate(context_bytes, updates)
    context = load_context(context_bytes)

    # Execute
    partials = [s.partial_decrypt(context, aggregate, 10000) for s in pair]
    result = combine(context, aggregate, 10000, partials, transcript.holders)

    # Assert: twice the degree, sqrt(2) the smudging error per value
    assert len(ckks.unpack_vector(aggregate)[1]) == 2
    np.testing.assert_allclose(result, np.sum(updates, axis=0), atol=THRESHOLD_TOLERANCE)
    with pytest.raises(HeError, match="not a ckks-4096"):
        KeyShare.generate("x").partial_decrypt(context, aggregate, 10000)


def test_round_by_round_keygen_gives_a_key_for_the_sum_of_the_shares(
    shares: list[KeyShare],
) -> None:
    """The four message rounds as separate steps, as holders on separate machines run them."""
    # Round 1 and 2: commit to seed shares, then reveal them
    seeds = {s.holder_id: SeedShare.generate(s.holder_id) for s in shares}
    seed = common_seed(
        {h: s.commitment for h, s in seeds.items()}, {h: s.value for h, s in seeds.items()}
    )
    # Round 3 and 4: commit to b_i, then reveal it
    contributions = {s.holder_id: s.public_contribution(seed) for s in shares}
    commitments = {h: contribution_commitment(h, b) for h, b in contributions.items()}
    context_bytes = threshold.collective_public_context(DEFAULT_PROFILE, seed, contributions)
    holders = tuple(sorted(contributions))
    transcript = KeygenTranscript(
        profile=DEFAULT_PROFILE.name,
        holders=holders,
        seed_commitments=tuple(seeds[h].commitment for h in holders),
        seed_reveals=tuple(seeds[h].value for h in holders),
        contribution_commitments=tuple(commitments[h] for h in holders),
        contributions=tuple(contributions[h] for h in holders),
        context_hash=context_hash(context_bytes),
    )

    # Execute: p0 + p1 * (s_1 + ... + s_k) should be the small sum of the holders' errors
    context = load_context(context_bytes)
    level = seal_layout.key_level(context)
    p0, p1 = seal_layout.public_key_polys(context)
    secret = np.sum([s.coefficients.astype(np.int64) for s in shares], axis=0)
    errors = []
    for row0, row1, q in zip(p0, p1, level.moduli, strict=True):
        ntt = threshold.ntt_for(level.degree, q)
        value = (row0.astype(object) + row1.astype(object) * ntt.forward(secret).astype(object)) % q
        errors.append(threshold.centered(ntt.inverse(value.astype(np.uint64)), q))

    # Assert: the same small error under every prime (3 centred binomials: |e| < 64)
    assert transcript.verify(context_bytes) == context_bytes
    np.testing.assert_array_equal(errors[0], errors[1])
    assert 0 < np.abs(errors[0]).max() < 64
    assert 3 < errors[0].std() < 8


@pytest.mark.parametrize("size", [SIZE, LONG])
def test_threshold_decryption_agrees_with_seals_decryptor_under_the_summed_key(
    shares: list[KeyShare], public_bytes: bytes, size: int, tmp_path
) -> None:
    """The library's own result: SEAL's Decryptor and CKKSEncoder, given the whole secret key
    (the sum of the shares, loaded into a SEAL SecretKey), decode the same aggregate as the
    holders' partial decryptions do, within the smudging error."""
    # Prepare
    context = load_context(public_bytes)
    updates = _updates(5, size, seed=21)
    aggregate = _aggregate(public_bytes, updates)
    level = seal_layout.key_level(context)
    whole = np.sum([share.coefficients.astype(np.int64) for share in shares], axis=0)
    key_ntt = np.stack([threshold.ntt_for(level.degree, q).forward(whole) for q in level.moduli])
    version = seal_layout.seal_version(public_bytes)
    path = tmp_path / "secret-key"  # SEAL saves a secret key exactly as its plaintext
    path.write_bytes(seal_layout.plaintext_bytes(level.parms_id, 1.0, key_ntt, version))
    secret_key = sealapi.SecretKey()
    secret_key.load(context.seal_context().data, str(path))
    decryptor = sealapi.Decryptor(context.seal_context().data, secret_key)
    encoder = sealapi.CKKSEncoder(context.seal_context().data)

    # Execute
    seals = []
    for ciphertext in ckks.load_ciphertext(context, aggregate, size).ciphertexts:
        plain = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plain)
        z = np.asarray(encoder.decode_complex(plain))
        seals.append(np.stack([z.real, z.imag], axis=1).reshape(-1))
    theirs = np.concatenate(seals)[:size]
    partials = [share.partial_decrypt(context, aggregate, size) for share in shares]
    ours = combine(context, aggregate, size, partials, HOLDERS)

    # Assert
    np.testing.assert_allclose(theirs, np.sum(updates, axis=0), atol=EXACT_TOLERANCE)
    np.testing.assert_allclose(ours, theirs, atol=THRESHOLD_TOLERANCE)


def test_a_single_key_only_profile_cannot_be_shared() -> None:
    compact = PROFILES["ckks-4096-40-40"]
    with pytest.raises(HeError, match=r"single-key only.*ckks-4096-60-49"):
        KeyShare.generate("owner", compact)
    with pytest.raises(HeError, match="single-key only"):
        threshold.collective_public_context(compact, b"s" * 32, {})
    with pytest.raises(ConfigError, match="single-key only"):  # before any session is published
        KeygenTerms(compact.name, (("guardian", "0x" + "1" * 40), ("owner", "0x" + "2" * 40)))
