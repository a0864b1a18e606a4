"""Page delta codec: one PAGES payload per batch of dirty pages, and the epoch digest.

Why this shape (facts about the data and the tools):

- The dirty ring reports pages *written*, not pages *changed*. Most pages a
  checkpointed guest dirties in one epoch are pages it dirtied before: a
  counter, a stack, a list node, a few bytes out of 4096. XOR against the
  version the replica already holds leaves a page of zeros with a few bytes
  set, and zstd shrinks that about 300 times (KVM-NOTES: ~2.4 GB/s); plain zstd
  of a page of real data gains about 2x. Pages rewritten with identical content
  XOR to all zeros. Pages that are entirely zero (freed, cleared) cost one kind
  byte and no data at all.
- The primary cannot read the replica's memory, so it keeps a bounded cache of
  the last version it *sent* of each page (set-associative, LRU, indexed by a
  Fibonacci hash of the page key; preallocated and touched once at
  construction because first touch of fresh memory costs ~1.6 us a page, too
  much to pay inside a checkpoint). A miss costs only ratio: the page goes raw.
- zstd releases the GIL while it compresses, so batches compress in parallel in
  worker threads. Its compressor/decompressor objects are not thread-safe: one
  per thread. The cache lookup/update of a batch holds a lock; XOR and zstd run
  outside it, in two scratch buffers per thread reused from batch to batch
  (fresh 2 MiB buffers per batch doubled the encode time through page faults).
- Every step is a whole-batch numpy operation (zero detection, cache lookup,
  XOR, scatter); no Python loop runs per page. A small batch (up to
  `NATIVE_PAGES`, most epochs of a protected service) takes the same cache
  phase in one native call instead (checkpointer/native/codec.c, same rules):
  twenty numpy calls cost far more than a few pages of work, several times
  more on an agent's loop with cold caches.
- The zstd frame carries zstd's own content checksum (about 0.15 ms per 2 MiB):
  without it a corrupted frame can decompress cleanly into wrong pages.

The XOR-base rule. A page of kind XOR is `new ^ base`, where base is, on the
replica, its committed content of that page as of the end of the previous
epoch (its standby memory), and on the primary the cached last version sent.
The two are equal because every sent page reaches the replica and epochs are
applied in order. So:

- `decode_batch`'s `base(keys)` must return each page's content as of the end
  of the previous epoch: commit epoch N before decoding N+1 (or answer from
  epoch N's staging). Within an epoch a key occurs in one batch only.
- `PageEncoder.reset()` must be called whenever the replica's content may
  differ from what the cache believes: a new full sync, a new replica, an
  epoch encoded but not delivered and committed (aborted send, `encode_all`
  failure).

Payload layout of one batch (format version 1; all integers little-endian; the
wire module wraps this payload in its own frame with the checksum):

    offset          size      field
    0               4         magic b"CRPB"
    4               2   u16   format version (1)
    6               2   u16   flags, must be 0
    8               4   u32   count: pages in the batch (n)
    12              4   u32   compressed length (c): bytes of the zstd frame
    16              8   u64   data length (d): 4096 * number of non-ZERO pages
    24              8n  u64[] page keys (ring.pages: slot << 40 | offset, below 2**56), strictly increasing
    24+8n           n   u8[]  kinds: 0 ZERO, 1 RAW, 2 XOR
    24+8n+n         p         zero padding to a multiple of 8 (p = -n mod 8)
    24+8n+n+p       c         one zstd frame (content size d and a checksum
                              declared) of the non-ZERO pages in key order, each
                              4096 bytes, RAW as is, XOR as new ^ base;
                              absent (c = 0) when d = 0

Nothing follows the frame. A decoder rejects with `CodecError` anything else:
truncation, trailing bytes, unknown magic/version/flags, count above its limit,
unknown kinds, unsorted or duplicate keys, keys outside the guest's layout,
a data length that does not match the kinds, and any zstd failure or size
mismatch. It validates everything before it writes into `out` (staging), and it
never touches standby memory.

`EpochDigest` is an xxh3-128 digest of an epoch's content (page keys, decoded
page bytes, and vCPU/device state blobs) that both sides compute identically,
so the replica can verify an epoch before it commits it.
"""

from __future__ import annotations

import struct
import threading
import time
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import xxhash
import zstandard

from ring import pages as pagekeys
from ring.abi import PAGE_SIZE
from ring.memory import page_buffer

import checkpointer._codec as native_codec  # the cache phase of small batches (checkpointer/native/codec.c)

MAGIC = b"CRPB"
VERSION = 1
HEADER = struct.Struct("<4sHHIIQ")          # magic, version, flags, count, compressed len, data len
DEFAULT_MAX_PAGES = 4096
DEFAULT_BATCH_PAGES = 512
NATIVE_PAGES = 64                  # batches up to this size take the native cache phase (holding the GIL)

KIND_ZERO, KIND_RAW, KIND_XOR = 0, 1, 2
EMPTY_KEY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # cache sentinel; real keys stay below 2**56
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)    # Fibonacci hashing multiplier
_MAX_WINDOW = 1 << 25                          # zstd window a hostile frame may ask for

__all__ = [
    "CodecError", "EncodedBatch", "EpochDigest", "EpochStats", "PageEncoder", "decode_batch",
    "encode_all", "HEADER", "MAGIC", "VERSION", "KIND_ZERO", "KIND_RAW", "KIND_XOR",
]


class CodecError(ValueError):
    """A page batch cannot be encoded or decoded; the message names the problem."""


def _pad8(n: int) -> int:
    return -n % 8


@dataclass(frozen=True, eq=False)
class EncodedBatch:
    """One encoded batch. `payload` is a single bytes object, ready to be one frame's payload."""

    keys: np.ndarray           # uint64, the batch's page keys (a copy)
    kinds: np.ndarray          # uint8 per page: KIND_ZERO, KIND_RAW, KIND_XOR
    payload: bytes
    raw_bytes: int             # count * PAGE_SIZE
    encoded_bytes: int         # len(payload)
    encode_ns: int

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def zero_pages(self) -> int:
        return int(np.count_nonzero(self.kinds == KIND_ZERO))

    @property
    def raw_pages(self) -> int:
        return int(np.count_nonzero(self.kinds == KIND_RAW))

    @property
    def xor_pages(self) -> int:
        return int(np.count_nonzero(self.kinds == KIND_XOR))


@dataclass(frozen=True)
class EpochStats:
    """What one epoch's encoding cost and saved.

    The per-kind page counts are counted only when asked for: the primary encodes small
    epochs on its event loop, where three numpy reductions per batch are not free.
    """

    pages: int
    raw_bytes: int
    encoded_bytes: int
    encode_ns: int             # sum of the batches' encode times (each in its worker thread)
    wall_ns: int               # elapsed, start of the first batch to the end of the last
    batches: tuple[EncodedBatch, ...] = ()

    @property
    def zero_pages(self) -> int:
        return sum(b.zero_pages for b in self.batches)

    @property
    def raw_pages(self) -> int:
        return sum(b.raw_pages for b in self.batches)

    @property
    def xor_pages(self) -> int:
        return sum(b.xor_pages for b in self.batches)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.encoded_bytes if self.encoded_bytes else 0.0

    @classmethod
    def of(cls, batches: Sequence[EncodedBatch], wall_ns: int) -> "EpochStats":
        return cls(pages=sum(b.count for b in batches), raw_bytes=sum(b.raw_bytes for b in batches),
                   encoded_bytes=sum(b.encoded_bytes for b in batches),
                   encode_ns=sum(b.encode_ns for b in batches), wall_ns=wall_ns, batches=tuple(batches))


def _check_pages(keys, pages, what: str) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.dtype.kind not in "ui":
        raise CodecError(f"{what}: keys must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    if keys.dtype.kind == "i" and len(keys) and int(keys.min()) < 0:
        raise CodecError(f"{what}: negative page key {int(keys.min())}")
    keys = keys.astype(np.uint64, copy=False)
    pages = np.asarray(pages)
    if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
        raise CodecError(f"{what}: pages must be a (n, {PAGE_SIZE}) uint8 array, "
                         f"got {pages.dtype} {pages.shape}")
    if len(pages) != len(keys):
        raise CodecError(f"{what}: {len(keys)} keys for {len(pages)} pages")
    return keys, np.ascontiguousarray(pages)


class PageEncoder:
    """Primary side: encodes batches against a bounded cache of the last version sent of pages.

    The cache holds `cache_pages` pages in sets of `ways` lines (set-associative, least
    recently used line replaced); a key's set is a Fibonacci hash of it. Its arrays are
    allocated and touched once here and never grow.

    `encode` may run concurrently for different batches of the same epoch (a key is in
    one batch per epoch); batches of epoch N+1 must start after all of epoch N's finish.
    """

    def __init__(self, cache_pages: int = 65536, level: int = 1, ways: int = 4, native: bool = True) -> None:
        for name, value, low in (("cache_pages", cache_pages, 0), ("ways", ways, 1)):
            if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                    or value < low or value & (value - 1)):
                raise CodecError(f"{name} must be {'0 or ' if low == 0 else ''}a power of two, "
                                 f"got {value!r}")
        try:
            zstandard.ZstdCompressor(level=level)
        except (zstandard.ZstdError, ValueError, TypeError) as exc:
            raise CodecError(f"invalid zstd level {level!r}: {exc}") from None
        self.cache_pages = int(cache_pages)
        self.level = level
        self.ways = max(1, min(int(ways), self.cache_pages))
        self.sets = self.cache_pages // self.ways
        self._shift = np.uint64(64 - (self.sets.bit_length() - 1))
        self.cache_keys = np.empty((self.sets, self.ways), dtype=np.uint64)
        self.cache_stamp = np.zeros((self.sets, self.ways), dtype=np.uint64)   # 0: never used
        self.cache_data = page_buffer(self.cache_pages, touch=False)  # row: set*ways+way; page-aligned
        self.cache_keys.fill(EMPTY_KEY)
        self.cache_data.fill(0)                 # first touch now, not during a checkpoint
        self._clock = 0
        self._lock = threading.Lock()
        self.native = native             # small batches take the native cache phase (tests compare both)
        self._local = threading.local()

    def reset(self) -> None:
        """Forget every cached page: the next version of each page is sent RAW."""
        with self._lock:
            self.cache_keys.fill(EMPTY_KEY)
            self.cache_stamp.fill(0)

    def _sets_of(self, keys: np.ndarray) -> np.ndarray:
        if self.sets == 1:
            return np.zeros(len(keys), dtype=np.intp)
        hashed = np.multiply(keys, _GOLDEN, dtype=np.uint64)
        hashed >>= self._shift
        return hashed.astype(np.intp)

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True)
        return cctx

    def _victims(self, sets: np.ndarray) -> np.ndarray:
        """Lines for missing keys: the k-th miss of a set in this batch gets its k-th LRU line."""
        order = np.argsort(sets, kind="stable")
        ordered = sets[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        sizes = np.diff(np.append(starts, len(sets)))
        rank = np.empty(len(sets), dtype=np.intp)
        rank[order] = np.arange(len(sets)) - np.repeat(starts, sizes)
        lru = np.argsort(self.cache_stamp[sets], axis=1, kind="stable")
        return sets * self.ways + lru[np.arange(len(sets)), rank % self.ways]

    def _scratch(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's two reusable (rows, 4096) buffers, touched once when (re)allocated."""
        bufs = getattr(self._local, "scratch", None)
        if bufs is None or len(bufs[0]) < rows:
            bufs = (page_buffer(max(rows, 64)), page_buffer(max(rows, 64)))
            for buf in bufs:
                buf.fill(0)
            self._local.scratch = bufs
        return bufs

    def _lookup_and_store(self, keys, pages, nonzero, base_out, tmp) -> np.ndarray:
        """Under the lock: copy the hits' cached versions to `base_out`, then store the new ones.

        Returns the indices of the non-zero hits. Hits keep their line; non-zero misses take
        their set's least recently used lines; a zero page that hits invalidates its line
        (the replica's base becomes zeros: a stale cached version must never be a base
        again). When several keys of the batch claim one line, the line ends up naming one
        of them and only that one's data is stored: the others are simply not cached.
        """
        sets = self._sets_of(keys)
        ways = self.ways
        flat_keys = self.cache_keys.reshape(-1)
        flat_stamp = self.cache_stamp.reshape(-1)
        with self._lock:
            self._clock += 1
            now = np.uint64(self._clock)
            match = self.cache_keys[sets] == keys[:, None]            # (n, ways)
            hit = match.any(axis=1)
            lines = sets * ways + match.argmax(axis=1)                 # meaningful where hit
            hit_idx = np.flatnonzero(hit & nonzero)
            np.take(self.cache_data, lines[hit_idx], axis=0, out=base_out[:len(hit_idx)], mode="clip")
            if hit.all() and nonzero.all():                            # steady state: all hits
                flat_stamp[lines] = now
                self.cache_data[lines] = pages
                return hit_idx
            hits = np.flatnonzero(hit)
            flat_stamp[lines[hits]] = now             # so misses do not evict this batch's hits
            miss = np.flatnonzero(~hit & nonzero)
            if len(miss):
                lines[miss] = self._victims(sets[miss])
                flat_keys[lines[miss]] = keys[miss]
            flat_keys[lines[hits]] = keys[hits]       # after the misses: a hit keeps its line
            claimed = np.flatnonzero(hit | nonzero)
            won = np.zeros(len(keys), dtype=bool)
            won[claimed] = flat_keys[lines[claimed]] == keys[claimed]
            store = np.flatnonzero(won & nonzero)
            self.cache_data[lines[store]] = np.take(pages, store, axis=0, out=tmp[:len(store)],
                                                    mode="clip")
            flat_stamp[lines[store]] = now
            drop = lines[won & ~nonzero]
            flat_keys[drop] = EMPTY_KEY
            flat_stamp[drop] = 0
        return hit_idx

    def encode(self, keys: np.ndarray, pages: np.ndarray) -> EncodedBatch:
        """Encode one batch: keys sorted unique uint64, pages (n, 4096) uint8, in key order."""
        start = time.perf_counter_ns()
        keys, pages = _check_pages(keys, pages, "encode")
        n = len(keys)
        if n > 0xFFFF_FFFF:
            raise CodecError(f"encode: batch of {n} pages exceeds the format's u32 count")
        if self.native and self.cache_pages and n <= NATIVE_PAGES:
            return self._encode_native(keys, pages, start)      # (it checks the keys as below)
        if n > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise CodecError("encode: page keys must be sorted and unique")
        if n and keys[-1] == EMPTY_KEY:
            raise CodecError("encode: page key 0xffffffffffffffff is reserved")
        nonzero = pages.view(np.uint64).max(axis=1) != 0
        kinds = nonzero.astype(np.uint8)                    # KIND_RAW = 1, KIND_ZERO = 0
        nz_idx = np.flatnonzero(nonzero)
        nz = len(nz_idx)
        hit_idx = nz_idx[:0]
        if self.cache_pages or nz < n:
            base_buf, data_buf = self._scratch(n)
        if self.cache_pages:
            hit_idx = self._lookup_and_store(keys, pages, nonzero, base_buf, data_buf)
            kinds[hit_idx] = KIND_XOR
        m = len(hit_idx)
        # The frame's input, in key order: RAW pages as is, XOR pages as new ^ cached.
        if nz == 0:
            frame = b""
        else:
            if m == 0:
                data = pages if nz == n else np.take(pages, nz_idx, axis=0, out=data_buf[:nz],
                                                     mode="clip")
            elif m == n:
                data = np.bitwise_xor(pages, base_buf[:m], out=base_buf[:m])
            else:
                xored = base_buf[:m]
                np.bitwise_xor(np.take(pages, hit_idx, axis=0, out=data_buf[:m], mode="clip"),
                               xored, out=xored)
                data = np.take(pages, nz_idx, axis=0, out=data_buf[:nz], mode="clip")
                data[np.searchsorted(nz_idx, hit_idx)] = xored
            frame = self._compressor().compress(data)
        return self._batch(keys, kinds, nz, frame, start)

    def _batch(self, keys: np.ndarray, kinds: np.ndarray, nz: int, frame: bytes, start: int) -> EncodedBatch:
        n = len(keys)
        header = HEADER.pack(MAGIC, VERSION, 0, n, len(frame), nz * PAGE_SIZE)
        payload = b"".join((header, keys.astype("<u8", copy=False), kinds,
                            bytes(_pad8(n)), frame))
        return EncodedBatch(keys=keys.copy(), kinds=kinds, payload=payload, raw_bytes=n * PAGE_SIZE,
                            encoded_bytes=len(payload),
                            encode_ns=time.perf_counter_ns() - start)

    def _encode_native(self, keys: np.ndarray, pages: np.ndarray, start: int) -> EncodedBatch:
        """encode() of a small batch: the cache phase and the XOR in one native call (codec.c)."""
        n = len(keys)
        _, data = self._scratch(n)
        kinds = np.empty(n, dtype=np.uint8)
        keys = np.ascontiguousarray(keys)
        with self._lock:
            self._clock += 1
            try:
                nz = native_codec.encode_pages(keys, pages, self.cache_keys, self.cache_stamp, self.cache_data,
                                         self._clock, self.ways, self.sets, int(self._shift), data, kinds)
            except ValueError as exc:
                raise CodecError(str(exc)) from None
        frame = self._compressor().compress(data[:nz]) if nz else b""
        return self._batch(keys, kinds, nz, frame, start)


def encode_all(encoder: PageEncoder, keys: np.ndarray, pages: np.ndarray,
               executor: Executor | None = None,
               batch_pages: int = DEFAULT_BATCH_PAGES) -> tuple[list[EncodedBatch], EpochStats]:
    """Encode a whole epoch in batches of `batch_pages` (in `executor` if given), in order.

    If any batch fails, waits for the others, resets the encoder's cache (the epoch will
    not reach the replica, so the cache no longer matches it) and re-raises.
    """
    if batch_pages < 1:
        raise CodecError(f"batch_pages must be at least 1, got {batch_pages}")
    n = len(keys)
    if len(pages) != n:
        raise CodecError(f"encode: {n} keys for {len(pages)} pages")
    start = time.perf_counter_ns()
    spans = [(i, min(i + batch_pages, n)) for i in range(0, n, batch_pages)]
    try:
        if executor is None:
            batches = [encoder.encode(keys[a:b], pages[a:b]) for a, b in spans]
        else:
            futures = [executor.submit(encoder.encode, keys[a:b], pages[a:b]) for a, b in spans]
            wait(futures)
            batches = [f.result() for f in futures]
    except BaseException:
        encoder.reset()
        raise
    return batches, EpochStats.of(batches, time.perf_counter_ns() - start)


_dctx_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_dctx_local, "dctx", None)
    if dctx is None:
        dctx = _dctx_local.dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    return dctx


def decode_batch(payload, base: Callable[[np.ndarray], np.ndarray], out: np.ndarray | None = None,
                 *, max_pages: int = DEFAULT_MAX_PAGES,
                 valid_key: Callable[[np.ndarray], np.ndarray] | None = None,
                 slots: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one batch payload into (keys, pages); pages is `out[:n]` when `out` is given.

    `base(keys)` returns the (m, 4096) uint8 committed content of the XOR pages (see the
    XOR-base rule above); `valid_key(keys)` returns a bool mask of keys inside the guest's
    memory layout. Raises CodecError for any malformed payload, before writing anything.
    Exceptions raised by `base` or `valid_key` themselves propagate unchanged. With `slots`
    (the committed memory itself: (slot id, its (pages, 4096) array, its page count) each), a
    small batch into `out` reads its XOR bases from there and is assembled in one native call
    (checkpointer/native/codec.c) once every check has passed; `base` is then not called.
    """
    try:
        view = memoryview(payload).cast("B")
    except TypeError as exc:
        raise CodecError(f"page batch payload must be a contiguous bytes-like object: {exc}") from None
    total = len(view)
    if total < HEADER.size:
        raise CodecError(f"truncated page batch: {total} bytes, shorter than the "
                         f"{HEADER.size}-byte header")
    magic, version, flags, count, clen, dlen = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"not a page batch: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported page batch format version {version} (this codec reads {VERSION})")
    if flags:
        raise CodecError(f"unknown page batch flags {flags:#06x}")
    if count > max_pages:
        raise CodecError(f"page batch of {count} pages exceeds the limit of {max_pages}")
    kinds_at = HEADER.size + 8 * count
    frame_at = kinds_at + count + _pad8(count)
    expected = frame_at + clen
    if total < expected:
        raise CodecError(f"truncated page batch: {total} bytes, header declares {expected}")
    if total > expected:
        raise CodecError(f"page batch has {total - expected} trailing bytes after {expected}")
    keys = np.frombuffer(view, dtype="<u8", count=count, offset=HEADER.size).astype(np.uint64)
    kinds = np.frombuffer(view, dtype=np.uint8, count=count, offset=kinds_at)
    if any(view[kinds_at + count:frame_at]):
        raise CodecError("page batch kinds padding is not zero")
    if count:
        bad = np.flatnonzero(kinds > KIND_XOR)
        if len(bad):
            raise CodecError(f"page batch: unknown page kind {int(kinds[bad[0]])} at index {int(bad[0])}")
        try:
            pagekeys.check(keys, "page batch")      # sorted, unique, within the key bound
        except pagekeys.PageKeyError as exc:
            raise CodecError(str(exc)) from None
        if valid_key is not None:
            mask = np.asarray(valid_key(keys))
            if mask.shape != keys.shape:
                raise CodecError(f"valid_key returned shape {mask.shape} for {count} keys")
            bad = np.flatnonzero(~mask.astype(bool))
            if len(bad):
                raise CodecError(f"page batch: page key {int(keys[bad[0]]):#x} at index {int(bad[0])} "
                                 f"is outside the guest's memory layout")
    nonzero = kinds != KIND_ZERO
    nz = int(np.count_nonzero(nonzero))
    if dlen != nz * PAGE_SIZE:
        raise CodecError(f"page batch data length {dlen} does not match {nz} non-zero pages "
                         f"({nz * PAGE_SIZE} bytes)")
    if out is not None:
        if (not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 2
                or out.shape[1] != PAGE_SIZE or not out.flags.writeable):
            raise CodecError(f"out must be a writable (m, {PAGE_SIZE}) uint8 array")
        if len(out) < count:
            raise CodecError(f"page batch of {count} pages does not fit a staging area of {len(out)}")
    raw = b""
    if nz == 0:
        if clen:
            raise CodecError(f"page batch has a {clen}-byte zstd frame but no non-zero pages")
    else:
        frame = view[frame_at:expected]
        try:
            params = zstandard.get_frame_parameters(frame)
            if params.content_size != dlen:
                raise CodecError(f"zstd frame declares content size {params.content_size}, "
                                 f"the batch header {dlen}")
            if not params.has_checksum:
                raise CodecError("zstd frame carries no checksum")
            raw = _decompressor().decompress(frame, max_output_size=dlen, allow_extra_data=False)
        except (zstandard.ZstdError, ValueError, TypeError, MemoryError) as exc:
            if isinstance(exc, CodecError):
                raise
            raise CodecError(f"page batch zstd frame is corrupt: {exc}") from None
        if len(raw) != dlen:
            raise CodecError(f"zstd frame decompressed to {len(raw)} bytes, declared {dlen}")
    if slots is not None and out is not None and count <= NATIVE_PAGES:
        result = out[:count]
        try:
            native_codec.assemble_pages(keys, kinds, raw, result, slots, pagekeys.SLOT_SHIFT, pagekeys.OFFSET_MASK)
        except ValueError as exc:
            raise CodecError(f"page batch: {exc}") from None
        return keys, result
    xor_idx = np.flatnonzero(kinds == KIND_XOR)
    base_pages = None
    if len(xor_idx):
        base_pages = np.asarray(base(keys[xor_idx]))
        if base_pages.dtype != np.uint8 or base_pages.shape != (len(xor_idx), PAGE_SIZE):
            raise CodecError(f"base returned {base_pages.dtype} {base_pages.shape} for "
                             f"{len(xor_idx)} XOR pages")
    # Everything is validated: now write.
    result = out[:count] if out is not None else np.empty((count, PAGE_SIZE), dtype=np.uint8)
    data = np.frombuffer(raw, dtype=np.uint8).reshape(nz, PAGE_SIZE)
    if base_pages is not None and len(xor_idx) == count:      # all XOR: one pass
        np.bitwise_xor(data, base_pages, out=result)
        return keys, result
    if nz == count:
        result[...] = data
    else:
        result[nonzero] = data
        result[~nonzero] = 0
    if base_pages is not None:
        result[xor_idx] ^= base_pages
    return keys, result


_DIGEST_TAG = b"colo-ring epoch digest v1\0"


class EpochDigest:
    """xxh3-128 over an epoch's content, computed identically by primary and replica.

    Three streams, combined at `digest()`: page keys (u64 LE), page bytes (the raw or
    decoded content, never the encoded one), and state blobs (each u64 LE length then
    bytes). The page streams do not depend on how the pages are split into calls, only on
    their order; blobs are length-prefixed, so their boundaries count.
    """

    def __init__(self) -> None:
        self._keys = xxhash.xxh3_128()
        self._pages = xxhash.xxh3_128()
        self._blobs = xxhash.xxh3_128()
        self._page_count = 0
        self._blob_count = 0

    def update_pages(self, keys: np.ndarray, pages: np.ndarray) -> None:
        keys, pages = _check_pages(keys, pages, "digest")
        self._keys.update(keys.astype("<u8", copy=False))
        self._pages.update(pages)
        self._page_count += len(keys)

    def update_bytes(self, data) -> None:
        view = memoryview(data).cast("B")
        self._blobs.update(struct.pack("<Q", len(view)))
        self._blobs.update(view)
        self._blob_count += 1

    def digest(self) -> bytes:
        final = xxhash.xxh3_128(_DIGEST_TAG)
        final.update(struct.pack("<QQ", self._page_count, self._blob_count))
        final.update(self._keys.digest() + self._pages.digest() + self._blobs.digest())
        return final.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()
