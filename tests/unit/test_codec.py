"""Unit tests of the page delta codec (checkpointer/codec.py).

A primary memory and a replica standby memory are simulated as numpy arrays over a
universe of page keys in two slots; every decoded epoch is committed into the standby
and must equal the primary byte for byte.
"""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpointer.codec import (HEADER, KIND_RAW, KIND_XOR, KIND_ZERO, MAGIC, NATIVE_PAGES, VERSION, CodecError,
                                EncodedBatch, EpochDigest, PageEncoder, decode_batch, encode_all)
from ring.abi import PAGE_SIZE

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ("zero", "random", "sparse", "same", "text")


def universe(n: int) -> np.ndarray:
    """n page keys, (slot << 40) | offset, split over slots 0 and 2, sorted."""
    half = n // 2
    low = np.arange(half, dtype=np.uint64)
    high = (np.uint64(2) << np.uint64(40)) | (np.arange(n - half, dtype=np.uint64) + np.uint64(5000))
    return np.concatenate([low, high])


class Sim:
    """A primary's memory and a replica's standby over the same key universe."""

    def __init__(self, pages: int, seed: int) -> None:
        self.keys = universe(pages)
        self.rng = np.random.default_rng(seed)
        self.primary = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
        self.standby = self.primary.copy()            # in sync after a full copy of zero memory
        self.staging = np.empty((pages, PAGE_SIZE), dtype=np.uint8)

    def index(self, keys: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.keys, keys)
        assert np.array_equal(self.keys[idx], keys)
        return idx

    def base(self, keys: np.ndarray) -> np.ndarray:
        return self.standby[self.index(keys)]

    def valid_key(self, keys: np.ndarray) -> np.ndarray:
        return np.isin(keys, self.keys)

    def dirty(self, count: int, modes: tuple[str, ...] = MODES) -> np.ndarray:
        """Write `count` distinct random pages of the primary; returns their sorted indices."""
        idx = np.sort(self.rng.choice(len(self.keys), size=count, replace=False))
        chosen = self.rng.integers(0, len(modes), size=count)
        for m, mode in enumerate(modes):                  # one numpy write per mode
            rows = idx[chosen == m]
            if mode == "zero":
                self.primary[rows] = 0
            elif mode == "random":
                self.primary[rows] = self.rng.integers(0, 256, (len(rows), PAGE_SIZE), dtype=np.uint8)
            elif mode == "sparse":                        # one u64 written at a random place
                words = self.primary.view(np.uint64)
                words[rows, self.rng.integers(0, PAGE_SIZE // 8, len(rows))] = \
                    self.rng.integers(1, 2**63, len(rows), dtype=np.uint64)
            elif mode == "text":                          # compressible, fully rewritten
                self.primary[rows] = self.rng.integers(97, 101, (len(rows), PAGE_SIZE), dtype=np.uint8)
        return idx

    def epoch(self, encoder: PageEncoder, count: int, batch_pages: int, executor=None,
              modes: tuple[str, ...] = MODES):
        """Dirty, gather, encode, decode batch by batch into staging, commit; returns stats."""
        idx = self.dirty(count, modes)
        keys, pages = self.keys[idx], self.primary[idx]
        batches, stats = encode_all(encoder, keys, pages, executor, batch_pages=batch_pages)
        at = 0
        decoded_keys = []
        for batch in batches:
            got_keys, got = decode_batch(batch.payload, self.base, self.staging[at:],
                                         valid_key=self.valid_key)
            assert np.shares_memory(got, self.staging)
            decoded_keys.append(got_keys)
            at += len(got_keys)
        assert at == count
        got_keys = np.concatenate(decoded_keys) if decoded_keys else keys[:0]
        assert np.array_equal(got_keys, keys)
        assert np.array_equal(self.staging[:count], pages)
        self.standby[self.index(got_keys)] = self.staging[:count]     # atomic commit
        assert np.array_equal(self.standby, self.primary)
        return batches, stats


def roundtrip(encoder: PageEncoder, keys, pages, base) -> EncodedBatch:
    batch = encoder.encode(keys, pages)
    got_keys, got = decode_batch(batch.payload, base)
    assert np.array_equal(got_keys, keys)
    assert np.array_equal(got, pages)
    assert batch.encoded_bytes == len(batch.payload)
    assert batch.raw_bytes == len(keys) * PAGE_SIZE
    return batch


# ---- round trips -------------------------------------------------------------------------------

def test_zero_pages_are_elided():
    keys = universe(10)
    pages = np.zeros((10, PAGE_SIZE), dtype=np.uint8)
    batch = roundtrip(PageEncoder(cache_pages=16), keys, pages, base=None)
    assert np.all(batch.kinds == KIND_ZERO)
    assert batch.encoded_bytes == HEADER.size + 8 * 10 + 16            # no zstd frame at all
    assert HEADER.unpack_from(batch.payload)[4:] == (0, 0)


def test_empty_batch():
    keys = universe(0)
    pages = np.empty((0, PAGE_SIZE), dtype=np.uint8)
    batch = roundtrip(PageEncoder(cache_pages=16), keys, pages, base=None)
    assert batch.encoded_bytes == HEADER.size and batch.count == 0
    out = np.full((4, PAGE_SIZE), 7, dtype=np.uint8)
    got_keys, got = decode_batch(batch.payload, None, out)
    assert len(got_keys) == 0 and got.shape == (0, PAGE_SIZE) and np.all(out == 7)


def test_miss_is_raw_then_hit_is_xor():
    sim = Sim(8, seed=1)
    encoder = PageEncoder(cache_pages=64)
    sim.primary[:] = sim.rng.integers(0, 256, sim.primary.shape, dtype=np.uint8)
    first = roundtrip(encoder, sim.keys, sim.primary.copy(), sim.base)
    assert np.all(first.kinds == KIND_RAW)
    sim.standby[:] = sim.primary
    sim.primary[:, 100:108] ^= 0x5A                       # 8 changed bytes per page
    second = roundtrip(encoder, sim.keys, sim.primary.copy(), sim.base)
    assert np.all(second.kinds == KIND_XOR)
    assert second.encoded_bytes < first.encoded_bytes // 20


def test_zero_page_invalidates_then_raw_again():
    sim = Sim(4, seed=2)
    encoder = PageEncoder(cache_pages=64)
    sim.primary[:] = 9
    assert np.all(roundtrip(encoder, sim.keys, sim.primary.copy(), sim.base).kinds == KIND_RAW)
    sim.standby[:] = sim.primary
    sim.primary[1] = 0
    kinds = roundtrip(encoder, sim.keys, sim.primary.copy(), sim.base).kinds
    assert kinds.tolist() == [KIND_XOR, KIND_ZERO, KIND_XOR, KIND_XOR]
    sim.standby[:] = sim.primary
    sim.primary[:] = 3
    kinds = roundtrip(encoder, sim.keys, sim.primary.copy(), sim.base).kinds
    assert kinds.tolist() == [KIND_XOR, KIND_RAW, KIND_XOR, KIND_XOR]


def test_unchanged_rewrite_is_xor_of_zeros():
    sim = Sim(64, seed=3)
    encoder = PageEncoder(cache_pages=1024)
    sim.epoch(encoder, 64, 64, modes=("random",))
    batches, stats = sim.epoch(encoder, 64, 64, modes=("same",))
    assert stats.xor_pages == 64
    assert stats.encoded_bytes < 64 * 16 + 200


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pages=st.integers(1, 300), epochs=st.integers(1, 5),
       cache_pages=st.sampled_from([0, 1, 4, 64, 1024]), ways=st.sampled_from([1, 2, 4, 8]),
       batch_pages=st.integers(1, 80),
       modes=st.lists(st.sampled_from(MODES), min_size=1, max_size=5, unique=True),
       fraction=st.floats(0.01, 1.0), native=st.booleans())
def test_epochs_round_trip(seed, pages, epochs, cache_pages, ways, batch_pages, modes, fraction, native):
    """(With `native`, batches up to NATIVE_PAGES take the native cache phase, larger ones numpy's,
    over the same cache.)"""
    sim = Sim(pages, seed)
    encoder = PageEncoder(cache_pages=cache_pages, ways=ways, native=native)
    count = max(1, int(pages * fraction))
    for _ in range(epochs):
        batches, stats = sim.epoch(encoder, count, batch_pages, modes=tuple(modes))
        assert len(batches) == -(-count // batch_pages)
        assert stats.pages == count == stats.zero_pages + stats.raw_pages + stats.xor_pages
        assert stats.encoded_bytes == sum(len(b.payload) for b in batches)
        if cache_pages == 0:
            assert stats.xor_pages == 0


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), changes=st.integers(1, 40))
def test_sparse_modifications_round_trip(seed, changes):
    """Random bytes changed in random pages, against the previous version as base."""
    sim = Sim(32, seed)
    encoder = PageEncoder(cache_pages=32)
    sim.epoch(encoder, 32, 16, modes=("random", "text", "zero"))
    for _ in range(3):
        rows = sim.rng.integers(0, 32, changes)
        cols = sim.rng.integers(0, PAGE_SIZE, changes)
        sim.primary[rows, cols] = sim.rng.integers(0, 256, changes, dtype=np.uint8)
        idx = np.unique(rows)
        batches, _ = encode_all(encoder, sim.keys[idx], sim.primary[idx], batch_pages=7)
        for batch in batches:
            keys, got = decode_batch(batch.payload, sim.base, valid_key=sim.valid_key)
            assert np.array_equal(got, sim.primary[sim.index(keys)])
            sim.standby[sim.index(keys)] = got
        assert np.array_equal(sim.standby, sim.primary)


def test_colliding_keys_in_one_batch():
    """With one cache line every key collides; whichever wins, the replica stays equal."""
    sim = Sim(50, seed=4)
    encoder = PageEncoder(cache_pages=1)
    for _ in range(4):
        _, stats = sim.epoch(encoder, 50, 50, modes=("sparse", "zero"))
        assert stats.xor_pages <= 1


def test_reset_sends_everything_raw():
    sim = Sim(40, seed=5)
    encoder = PageEncoder(cache_pages=1024)
    sim.epoch(encoder, 40, 10, modes=("random",))
    _, stats = sim.epoch(encoder, 40, 10, modes=("sparse",))
    assert stats.xor_pages == 40
    encoder.reset()
    sim.standby[:] = sim.primary                          # a new full sync
    _, stats = sim.epoch(encoder, 40, 10, modes=("sparse",))
    assert stats.raw_pages == 40 and stats.xor_pages == 0


def test_stale_base_is_detected_by_digest():
    """Why reset() matters: a replica whose base differs decodes wrong pages; the digest sees it."""
    sim = Sim(4, seed=6)
    encoder = PageEncoder(cache_pages=8)
    sim.primary[:] = 1
    encoder.encode(sim.keys, sim.primary.copy())          # "sent", but the replica never got it
    sim.primary[:, 0] = 2
    batch = encoder.encode(sim.keys, sim.primary.copy())
    _, got = decode_batch(batch.payload, sim.base)        # standby is still all zeros
    assert not np.array_equal(got, sim.primary)
    sent, received = EpochDigest(), EpochDigest()
    sent.update_pages(sim.keys, sim.primary)
    received.update_pages(sim.keys, got)
    assert sent.digest() != received.digest()


# ---- cache bound -------------------------------------------------------------------------------

@pytest.mark.parametrize("ways", [1, 4, 8])
def test_more_pages_than_cache_lines_round_trip_with_bounded_cache(ways):
    sim = Sim(400, seed=7)
    encoder = PageEncoder(cache_pages=8, ways=ways)
    arrays = (encoder.cache_keys, encoder.cache_stamp, encoder.cache_data)
    for _ in range(5):
        _, stats = sim.epoch(encoder, 400, 64, modes=("sparse",))
        assert stats.xor_pages <= 8                       # at most one hit per line
        assert stats.raw_pages >= 392                     # the rest miss and go raw
    assert all(a is b for a, b in zip(arrays, (encoder.cache_keys, encoder.cache_stamp,
                                                encoder.cache_data)))
    assert sum(a.nbytes for a in arrays) == 8 * (8 + 8 + PAGE_SIZE)


@pytest.mark.parametrize("ways, least", [(1, 0.75), (4, 0.98)])
def test_hit_rate_at_quarter_load(ways, least):
    """A working set of a quarter of the cache: set-associativity keeps nearly every page."""
    sim = Sim(1024, seed=14)
    encoder = PageEncoder(cache_pages=4096, ways=ways)
    for _ in range(3):
        _, stats = sim.epoch(encoder, 1024, 256, modes=("sparse",))
    assert stats.xor_pages >= least * 1024


def test_set_victims_fill_a_cold_set():
    """Misses of one set in one batch take distinct lines, so a cold set fills at once."""
    sim = Sim(4, seed=15)
    encoder = PageEncoder(cache_pages=4, ways=4)      # one set of four lines
    sim.epoch(encoder, 4, 4, modes=("random",))
    assert sorted(encoder.cache_keys.reshape(-1).tolist()) == sim.keys.tolist()
    _, stats = sim.epoch(encoder, 4, 4, modes=("sparse",))
    assert stats.xor_pages == 4


def test_hits_keep_their_lines_when_misses_overflow_the_set():
    sim = Sim(7, seed=16)
    encoder = PageEncoder(cache_pages=4, ways=4)      # one set of four lines
    sim.primary[:] = sim.rng.integers(0, 256, sim.primary.shape, dtype=np.uint8)
    first = encoder.encode(sim.keys[:4], sim.primary[:4])
    second = encoder.encode(sim.keys[[0, 1, 4, 5, 6]], sim.primary[[0, 1, 4, 5, 6]])
    assert first.kinds.tolist() == [KIND_RAW] * 4
    assert second.kinds.tolist() == [KIND_XOR] * 2 + [KIND_RAW] * 3
    cached = set(encoder.cache_keys.reshape(-1).tolist())
    assert {int(sim.keys[0]), int(sim.keys[1])} <= cached        # the two hits stayed
    assert len(cached & set(sim.keys[4:].tolist())) == 2          # two of three misses got in


def test_encoder_rejects_bad_arguments():
    with pytest.raises(CodecError, match="power of two"):
        PageEncoder(cache_pages=3)
    with pytest.raises(CodecError, match="ways must be a power of two"):
        PageEncoder(cache_pages=8, ways=0)
    with pytest.raises(CodecError, match="level"):
        PageEncoder(cache_pages=2, level=100)
    encoder = PageEncoder(cache_pages=2)
    pages = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    with pytest.raises(CodecError, match="sorted and unique"):
        encoder.encode(np.array([5, 5], dtype=np.uint64), pages)
    with pytest.raises(CodecError, match="sorted and unique"):
        encoder.encode(np.array([6, 5], dtype=np.uint64), pages)
    with pytest.raises(CodecError, match="2 keys for 1 pages"):
        encoder.encode(np.array([1, 2], dtype=np.uint64), pages[:1])
    with pytest.raises(CodecError, match="uint8"):
        encoder.encode(np.array([1, 2], dtype=np.uint64), pages[:, :100])
    with pytest.raises(CodecError, match="batch_pages"):
        encode_all(encoder, universe(2), pages, batch_pages=0)


# ---- concurrency -------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_pages, ways", [(1, 1), (16, 1), (16, 4), (4096, 4)])
def test_concurrent_batches_across_epochs(cache_pages, ways):
    sim = Sim(600, seed=8)
    encoder = PageEncoder(cache_pages=cache_pages, ways=ways)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for epoch in range(8):
            batches, stats = sim.epoch(encoder, 300 + 30 * epoch, 8, executor=pool)
            assert [len(b.keys) for b in batches][:-1] == [8] * (len(batches) - 1)
    if cache_pages == 4096:
        assert stats.xor_pages > 0


class SpyLock:
    """A lock that counts how often it is taken and says whether it is held."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries = 0

    def __enter__(self):
        self.lock.acquire()
        self.entries += 1

    def __exit__(self, *exc) -> None:
        self.lock.release()


def test_cache_phase_holds_the_lock_and_zstd_runs_outside_it():
    sim = Sim(100, seed=17)
    encoder = PageEncoder(cache_pages=256)
    spy = encoder._lock = SpyLock()
    compressor = encoder._compressor
    held_during_compress = []

    class Watched:
        def compress(self, data):
            held_during_compress.append(spy.lock.locked())
            return compressor().compress(data)

    encoder._compressor = Watched
    for epoch in range(1, 3):
        batches, _ = sim.epoch(encoder, 100, 20, modes=("sparse", "random"))
        assert spy.entries == 5 * epoch                  # one cache phase per batch
    assert held_during_compress == [False] * 10


def test_failed_epoch_resets_cache():
    encoder = PageEncoder(cache_pages=16)
    keys = universe(8)
    pages = np.ones((8, PAGE_SIZE), dtype=np.uint8)
    encode_all(encoder, keys, pages, batch_pages=4)
    bad_keys = keys.copy()
    bad_keys[5], bad_keys[6] = bad_keys[6], bad_keys[5]   # second batch unsorted
    with ThreadPoolExecutor(max_workers=2) as pool:
        with pytest.raises(CodecError):
            encode_all(encoder, bad_keys, pages, pool, batch_pages=4)
    assert np.all(encoder.cache_keys == np.uint64(2**64 - 1))
    assert np.all(encoder.encode(keys, pages).kinds == KIND_RAW)


# ---- hostile payloads --------------------------------------------------------------------------

def build(keys, kinds, frame=b"", *, magic=MAGIC, version=VERSION, flags=0, count=None,
          clen=None, dlen=None, pad=None) -> bytes:
    """A payload assembled field by field, following the documented layout."""
    keys = np.asarray(keys, dtype="<u8")
    kinds = np.asarray(kinds, dtype=np.uint8)
    n = len(keys)
    nz = int(np.count_nonzero(kinds))
    header = HEADER.pack(magic, version, flags, n if count is None else count,
                         len(frame) if clen is None else clen,
                         nz * PAGE_SIZE if dlen is None else dlen)
    return header + keys.tobytes() + kinds.tobytes() + (bytes(-n % 8) if pad is None else pad) + frame


@pytest.fixture
def hostile():
    """A mixed batch (ZERO, RAW, XOR), the sim it belongs to, and a check that nothing changed."""
    sim = Sim(12, seed=9)
    encoder = PageEncoder(cache_pages=64)
    sim.primary[:6] = sim.rng.integers(97, 101, (6, PAGE_SIZE), dtype=np.uint8)
    batch = encoder.encode(sim.keys, sim.primary.copy())
    sim.standby[:] = sim.primary
    sim.primary[:3, :8] = 1                               # 0-2: XOR
    sim.primary[3:6] = 0                                  # 3-5: ZERO
    sim.primary[6:9] = sim.rng.integers(0, 256, (3, PAGE_SIZE), dtype=np.uint8)   # 6-8 RAW
    batch = encoder.encode(sim.keys, sim.primary.copy())
    assert batch.kinds.tolist() == [KIND_XOR] * 3 + [KIND_ZERO] * 3 + [KIND_RAW] * 3 + [KIND_ZERO] * 3
    out = np.full((16, PAGE_SIZE), 0xAB, dtype=np.uint8)
    standby = sim.standby.copy()

    def rejects(payload, match=None, **kwargs):
        with pytest.raises(CodecError, match=match):
            decode_batch(payload, sim.base, out, valid_key=sim.valid_key, **kwargs)
        assert np.all(out == 0xAB)
        assert np.array_equal(sim.standby, standby)

    return sim, batch, out, rejects


def test_hostile_fixture_decodes(hostile):
    sim, batch, out, _ = hostile
    keys, got = decode_batch(batch.payload, sim.base, out, valid_key=sim.valid_key)
    assert np.array_equal(got, sim.primary) and np.array_equal(out[:12], sim.primary)
    assert np.all(out[12:] == 0xAB)


def test_truncated_everywhere(hostile):
    _, batch, _, rejects = hostile
    payload = batch.payload
    for cut in list(range(0, len(payload), 3)) + [len(payload) - 1]:
        rejects(payload[:cut], match="truncated")
    rejects(payload + b"\0", match="trailing")


def test_bad_header_fields(hostile):
    _, batch, _, rejects = hostile
    p = batch.payload
    rejects(b"XXXX" + p[4:], match="magic")
    rejects(p[:4] + struct.pack("<H", VERSION + 1) + p[6:], match="version")
    rejects(p[:6] + struct.pack("<H", 1) + p[8:], match="flags")
    rejects(p[:8] + struct.pack("<I", 2**32 - 1) + p[12:], match="exceeds the limit")
    rejects(p, match="exceeds the limit", max_pages=11)
    rejects(p[:16] + struct.pack("<Q", 7 * PAGE_SIZE) + p[24:], match="data length")
    rejects(None, match="bytes-like")
    rejects("text", match="bytes-like")


def test_bad_kinds(hostile):
    _, batch, _, rejects = hostile
    p = bytearray(batch.payload)
    kinds_at = HEADER.size + 8 * 12
    for index, value, match in [(0, 3, "unknown page kind 3"), (11, 255, "unknown page kind 255"),
                                (3, KIND_RAW, "data length"), (6, KIND_ZERO, "data length")]:
        bad = bytearray(p)
        bad[kinds_at + index] = value
        rejects(bytes(bad), match=match)
    bad = bytearray(p)
    bad[kinds_at + 12] = 1
    rejects(bytes(bad), match="padding")


def test_bad_keys(hostile):
    sim, batch, out, rejects = hostile
    p = batch.payload
    keys = sim.keys.copy()
    for i, j, match in [(4, 5, "duplicate"), (10, 11, "duplicate"), (0, 11, "unsorted"),
                        (6, 7, "unsorted")]:
        bad = keys.copy()
        if match == "duplicate":
            bad[j] = bad[i]
        else:
            bad[i], bad[j] = bad[j], bad[i]
        payload = p[:HEADER.size] + bad.astype("<u8").tobytes() + p[HEADER.size + 8 * 12:]
        rejects(payload, match=match)
    last = f"{int(sim.keys[-1]):#x}"
    with pytest.raises(CodecError, match=f"{last} at index 11 is outside"):
        decode_batch(p, sim.base, out, valid_key=lambda k: k != k[-1])
    assert np.all(out == 0xAB)


def test_invalid_key_rejected_before_base_is_called(hostile):
    sim, batch, out, _ = hostile
    calls = []

    def base(keys):
        calls.append(keys)
        return sim.base(keys)

    with pytest.raises(CodecError, match="outside the guest"):
        decode_batch(batch.payload, base, out, valid_key=lambda k: k < k[-1])
    assert calls == [] and np.all(out == 0xAB)


def test_bad_zstd_frames(hostile):
    sim, batch, _, rejects = hostile
    keys, kinds = batch.keys, batch.kinds
    nz = int(np.count_nonzero(kinds))
    data = np.ascontiguousarray(sim.primary[kinds != KIND_ZERO])
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    rejects(build(keys, kinds, b"garbage!" * 8), match="zstd")
    rejects(build(keys, kinds, cctx.compress(data.tobytes() + b"x")), match="content size")
    rejects(build(keys, kinds, cctx.compress(data[:-1])), match="content size")
    no_size = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    rejects(build(keys, kinds, no_size.compress(data)), match="content size")
    no_sum = zstandard.ZstdCompressor(write_checksum=False)
    rejects(build(keys, kinds, no_sum.compress(data)), match="checksum")
    two = cctx.compress(data) + cctx.compress(b"x")
    rejects(build(keys, kinds, two), match="zstd")
    zero_kinds = np.zeros_like(kinds)
    rejects(build(keys, zero_kinds, cctx.compress(b"")), match="no non-zero pages")
    assert nz == 6


def test_corrupted_zstd_bytes_rejected_or_harmless(hostile):
    """Every single-byte corruption of the frame is rejected, or (an unused header bit) harmless."""
    sim, batch, _, _ = hostile
    p = batch.payload
    frame_at = HEADER.size + 8 * 12 + 16
    assert len(p) - frame_at == HEADER.unpack_from(p)[4]
    rejected = 0
    for at in range(frame_at, len(p)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(p)
            bad[at] ^= flip
            out = np.full((12, PAGE_SIZE), 0xAB, dtype=np.uint8)
            try:
                _, got = decode_batch(bytes(bad), sim.base, out, valid_key=sim.valid_key)
            except CodecError:
                assert np.all(out == 0xAB)
                rejected += 1
            else:
                assert np.array_equal(got, sim.primary)
    assert rejected >= 3 * (len(p) - frame_at) - 3


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes_only_raise_codec_error(data):
    out = np.full((4, PAGE_SIZE), 0xAB, dtype=np.uint8)
    for payload in (data, MAGIC + struct.pack("<H", VERSION) + data):
        try:
            decode_batch(payload, lambda k: np.zeros((len(k), PAGE_SIZE), np.uint8), out, max_pages=4)
        except CodecError:
            assert np.all(out == 0xAB)


@SETTINGS
@given(position=st.integers(0, 10**6), value=st.integers(0, 255), cut=st.integers(0, 10**6))
def test_mutated_payloads_only_raise_codec_error(position, value, cut):
    sim = Sim(12, seed=10)
    encoder = PageEncoder(cache_pages=64)
    sim.epoch(encoder, 12, 12)
    idx = sim.dirty(12)
    batch = encoder.encode(sim.keys[idx], sim.primary[idx])
    bad = bytearray(batch.payload)
    bad[position % len(bad)] = value
    bad = bytes(bad[: len(bad) - cut % 40])
    out = np.full((12, PAGE_SIZE), 0xAB, dtype=np.uint8)
    standby = sim.standby.copy()
    try:
        decode_batch(bad, sim.base, out, valid_key=sim.valid_key)
    except CodecError:
        assert np.all(out == 0xAB)
    assert np.array_equal(sim.standby, standby)


def test_out_too_small_is_rejected(hostile):
    sim, batch, _, _ = hostile
    small = np.full((11, PAGE_SIZE), 0xAB, dtype=np.uint8)
    with pytest.raises(CodecError, match="does not fit"):
        decode_batch(batch.payload, sim.base, small)
    assert np.all(small == 0xAB)


# ---- compression -------------------------------------------------------------------------------

def test_eight_changed_bytes_compress_far_below_raw():
    sim = Sim(1024, seed=11)
    encoder = PageEncoder(cache_pages=8192)
    sim.epoch(encoder, 1024, 512, modes=("random",))
    batches, stats = sim.epoch(encoder, 1024, 512, modes=("sparse",))
    assert stats.xor_pages == 1024
    assert stats.raw_bytes / stats.encoded_bytes > 50
    assert all(b.raw_bytes / b.encoded_bytes > 50 for b in batches)


def test_random_pages_do_not_expand_much():
    sim = Sim(256, seed=12)
    _, stats = sim.epoch(PageEncoder(cache_pages=512), 256, 128, modes=("random",))
    assert stats.raw_pages == 256
    assert stats.encoded_bytes < stats.raw_bytes * 1.01 + 1024


# ---- epoch digest ------------------------------------------------------------------------------

def digest_of(keys, pages, blobs=()) -> bytes:
    d = EpochDigest()
    d.update_pages(keys, pages)
    for blob in blobs:
        d.update_bytes(blob)
    return d.digest()


def test_digest_same_content_same_digest_and_split_invariant():
    rng = np.random.default_rng(13)
    keys = universe(20)
    pages = rng.integers(0, 256, (20, PAGE_SIZE), dtype=np.uint8)
    whole = digest_of(keys, pages, [b"vcpu0", b"dev"])
    assert len(whole) == 16
    assert whole == digest_of(keys.copy(), pages.copy(), [b"vcpu0", bytearray(b"dev")])
    split = EpochDigest()
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        split.update_pages(keys[a:b], pages[a:b])
    split.update_bytes(b"vcpu0")
    split.update_bytes(np.frombuffer(b"dev", dtype=np.uint8))
    assert split.digest() == whole


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), where=st.sampled_from(["page", "key", "blob", "split"]),
       position=st.integers(0, 10**9), bit=st.integers(0, 7))
def test_digest_any_change_changes_it(seed, where, position, bit):
    rng = np.random.default_rng(seed)
    keys = universe(6)
    pages = rng.integers(0, 256, (6, PAGE_SIZE), dtype=np.uint8)
    blobs = [rng.bytes(10), rng.bytes(3)]
    before = digest_of(keys, pages, blobs)
    keys2, pages2, blobs2 = keys.copy(), pages.copy(), list(blobs)
    if where == "page":
        pages2.reshape(-1)[position % pages2.size] ^= 1 << bit
    elif where == "key":
        keys2[position % 6] ^= np.uint64(1 << bit)
    elif where == "blob":
        blob = bytearray(blobs2[0])
        blob[position % len(blob)] ^= 1 << bit
        blobs2[0] = bytes(blob)
    else:                                                 # same bytes, other blob boundary
        joined = blobs[0] + blobs[1]
        cut = position % (len(joined) + 1)
        if cut == len(blobs[0]):
            cut = 0
        blobs2 = [joined[:cut], joined[cut:]]
    assert digest_of(keys2, pages2, blobs2) != before


def test_digest_detects_a_kind_flipped_from_xor_to_raw(hostile):
    """A flip the codec cannot see (XOR read as RAW) still fails the epoch digest."""
    sim, batch, _, _ = hostile
    bad = bytearray(batch.payload)
    bad[HEADER.size + 8 * 12] = KIND_RAW                  # page 0 was XOR
    keys, got = decode_batch(bytes(bad), sim.base)
    assert not np.array_equal(got, sim.primary)
    assert digest_of(keys, got) != digest_of(sim.keys, sim.primary)


# ---- the native cache phase of small batches ----------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), epochs=st.integers(1, 6), ways=st.sampled_from([1, 4]),
       modes=st.lists(st.sampled_from(MODES), min_size=1, max_size=5, unique=True))
def test_native_and_numpy_cache_phases_encode_the_same_bytes(seed, epochs, ways, modes):
    """While no set overflows (a working set well below the cache), both paths take the same
    lines and give the same payloads, epoch after epoch; the caches end equal."""
    native, reference = Sim(48, seed), Sim(48, seed)
    fast = PageEncoder(cache_pages=1024, ways=ways, native=True)
    slow = PageEncoder(cache_pages=1024, ways=ways, native=False)
    for _ in range(epochs):
        a, _ = native.epoch(fast, 40, NATIVE_PAGES, modes=tuple(modes))
        b, _ = reference.epoch(slow, 40, NATIVE_PAGES, modes=tuple(modes))
        assert [x.payload for x in a] == [y.payload for y in b]
        assert [x.kinds.tolist() for x in a] == [y.kinds.tolist() for y in b]
    lines = fast.cache_keys != np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    assert np.array_equal(fast.cache_keys, slow.cache_keys)
    assert np.array_equal(fast.cache_data.reshape(fast.sets, fast.ways, -1)[lines],
                          slow.cache_data.reshape(slow.sets, slow.ways, -1)[lines])


def test_native_cache_phase_checks_keys_before_changing_anything():
    encoder = PageEncoder(cache_pages=8)
    before = (encoder.cache_keys.copy(), encoder.cache_stamp.copy())
    pages = np.ones((2, PAGE_SIZE), dtype=np.uint8)
    with pytest.raises(CodecError, match="sorted and unique"):
        encoder.encode(np.array([5, 5], dtype=np.uint64), pages)
    with pytest.raises(CodecError, match="reserved"):
        encoder.encode(np.array([1, 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64), pages)
    assert np.array_equal(encoder.cache_keys, before[0]) and np.array_equal(encoder.cache_stamp, before[1])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), epochs=st.integers(2, 4),
       modes=st.lists(st.sampled_from(MODES), min_size=1, max_size=5, unique=True))
def test_native_assembly_from_the_slots_equals_the_base_callback(seed, epochs, modes):
    """decode_batch with `slots` (the replica's committed memory, read in C) gives exactly what it
    gives with `base`, for ZERO, RAW and XOR pages in two slots."""
    from ring import pages as pagekeys
    rng = np.random.default_rng(seed)
    memory = {0: np.zeros((64, PAGE_SIZE), np.uint8), 2: np.zeros((80, PAGE_SIZE), np.uint8)}
    primary = {slot: pages.copy() for slot, pages in memory.items()}
    slots = tuple((slot, pages, len(pages)) for slot, pages in memory.items())

    def base(keys):
        return np.stack([memory[int(k) >> 40][int(k) & ((1 << 40) - 1)] for k in keys])

    encoder = PageEncoder(cache_pages=256)
    for _ in range(epochs):
        offsets = {slot: np.unique(rng.integers(0, len(pages), 12)) for slot, pages in primary.items()}
        for slot, rows in offsets.items():
            for row in rows:
                mode = modes[int(rng.integers(len(modes)))]
                if mode == "zero":
                    primary[slot][row] = 0
                elif mode == "random":
                    primary[slot][row] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
                else:
                    primary[slot][row, rng.integers(0, PAGE_SIZE, 3)] ^= 0x5A
        keys = np.concatenate([pagekeys.of_slot(slot, rows.astype(np.uint64)) for slot, rows in offsets.items()])
        pages = np.concatenate([primary[slot][rows] for slot, rows in offsets.items()])
        batch = encoder.encode(keys, pages)
        out_native, out_python = np.empty_like(pages), np.empty_like(pages)
        got_keys, got = decode_batch(batch.payload, None, out_native, slots=slots)
        want_keys, want = decode_batch(batch.payload, base, out_python)
        assert np.array_equal(got_keys, want_keys) and np.array_equal(got, want) and np.array_equal(got, pages)
        for slot, rows in offsets.items():                  # commit
            memory[slot][rows] = primary[slot][rows]


def test_native_assembly_refuses_an_xor_key_outside_the_slots_before_writing():
    encoder = PageEncoder(cache_pages=16)
    keys = np.array([1, 2], dtype=np.uint64)
    pages = np.ones((2, PAGE_SIZE), dtype=np.uint8)
    encoder.encode(keys, pages)
    batch = encoder.encode(keys, pages * 2)                  # both XOR now
    out = np.full((2, PAGE_SIZE), 7, dtype=np.uint8)
    with pytest.raises(CodecError, match="outside the slots"):
        decode_batch(batch.payload, None, out, slots=((0, np.zeros((2, PAGE_SIZE), np.uint8), 2),))
    assert (out == 7).all()
    _, got = decode_batch(batch.payload, None, out, slots=((0, np.ones((3, PAGE_SIZE), np.uint8), 3),))
    assert (got == 2).all()
