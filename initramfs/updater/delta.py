"""Block-delta installs: build the new slot from what the card already holds, fetching the rest.

The master publishes, beside the stream, a block index (every 4 KiB block's stored length
and truncated sha256) and a pack (each non-zero block deflated on its own, with the 32 KiB of
the image before it as the preset dictionary, in block order): notes/formats.md has the
bytes, notes/delta.md the measurements behind the choices. The
signed manifest pins the index's size and sha256; the index pins every block; the slot's
sha256 in the manifest pins the whole, and nothing is committed before the read-back
matches it. So a block from anywhere (the card, the master) is only a candidate until
its hash matches, and a wrong guess costs a fetch, never a bad slot.

For each block of the new image, in order of cost: a zero block is made here; a block the
target slot already holds at that offset is left alone (no write: card wear); a block found
by hash in the other slot, or elsewhere in the target slot before it is overwritten, is
copied; only the rest is fetched from the pack with Range requests, adjacent blocks merged.
Where the card's slots' hashes come from: the index the slot's install left behind it on
the card (slotindex.py); else the index of the version it holds, fetched from the master
when its signed manifest has one (a few hundred KiB); else hashed here from the slot itself.
The new version's index comes as a diff against the index of what the card holds when the
master has one (indexdiff.py: tens of KiB), else whole.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import BinaryIO

from .errors import UpdaterError

MAGIC = b"RBINDEX1"  # rev1: each block deflated alone
HEADER = struct.Struct("<8sIIQQ")  # magic, block size, hash length, image size, blocks
MAGIC2 = b"RBINDEX2"  # rev2: each block deflated with the bytes before it as the preset dictionary
HEADER2 = struct.Struct("<8sIIQQI")  # rev1's, then the dictionary's length (the window)
WINDOW = 32 << 10  # deflate's whole window: 12% fewer pack bytes than none (notes/delta.md)
BLOCK_SIZE = 4096  # the ext4 block: files start on it, so moved files still match
HASH_LEN = 8  # bytes of sha256 per block (notes/delta.md: the slot's sha256 is the real check)
MIN_BLOCK, MAX_BLOCK = 512, 32768  # stored lengths are u16
MIN_HASH, MAX_HASH = 8, 32
MAX_INDEX = 64 << 20  # an index this large (inflated) would describe a 256 GiB image at 4 KiB
MERGE_GAP = 16 << 10  # pack bytes between two wanted runs fetched anyway to save a request
MULTI_GAP = 256  # the same where many runs go in one multi-range request: about a part's own headers
MAX_RANGES = 128  # runs in one multi-range request (a Range header of a few KiB)
MAX_RUN = 4 << 20  # pack bytes per request at most: the watchdog hears of progress between requests
MAX_FETCH_SHARE = 0.6  # more of the stream than this to fetch: the full stream is simpler
PLAN_BYTES = 320  # memory per block to plan a delta: 260 measured at the peak (notes/delta.md), and a margin
MEMORY_SHARE = 0.5  # of the memory available: the initramfs and the kernel's buffers need the rest
READ_CHUNK = 1 << 20


def block_hash(data: bytes, hash_len: int = HASH_LEN) -> bytes:
    return hashlib.sha256(data).digest()[:hash_len]


# --- the index ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockIndex:
    """The blocks of one image: ``lengths[i]`` is block i's bytes in the pack (0: a zero
    block, not in the pack; ``block_size``: stored as is), ``hashes[i]`` its truncated sha256."""

    size: int
    lengths: array  # 'H'
    hashes: list[bytes]
    block_size: int = BLOCK_SIZE
    hash_len: int = HASH_LEN
    window: int = 0  # bytes of the image before a block that its deflate took as dictionary (rev2)
    offsets: array = field(init=False, repr=False, compare=False)  # 'Q': where block i starts in the pack

    def __post_init__(self) -> None:
        offsets, at = array("Q"), 0
        for n in self.lengths:
            offsets.append(at)
            at += n
        offsets.append(at)
        object.__setattr__(self, "offsets", offsets)

    @property
    def blocks(self) -> int:
        return len(self.lengths)

    @property
    def pack_size(self) -> int:
        return self.offsets[-1]

    def block_len(self, i: int) -> int:
        """Plain bytes of block i (the last one may be short)."""
        return min(self.block_size, self.size - i * self.block_size)

    def body(self) -> bytes:
        """The index's bytes before gzip: header, lengths (u16 each), then the hashes of the
        non-zero blocks (zero blocks' hashes are known). The same index, the same bytes: a
        manifest's ``plain_sha256`` is of these, however they reached the worker."""
        return self._body

    @cached_property
    def plain_sha256(self) -> str:
        """The sha256 of ``body()``: what names a diff's base and what a manifest's ``plain_sha256`` pins."""
        return hashlib.sha256(self._body).hexdigest()

    @cached_property
    def _body(self) -> bytes:
        """Made once (a Python loop per block): naming a diff, checking and keeping an index each need it."""
        if self.window:
            head = HEADER2.pack(MAGIC2, self.block_size, self.hash_len, self.size, self.blocks, self.window)
        else:
            head = HEADER.pack(MAGIC, self.block_size, self.hash_len, self.size, self.blocks)
        body = bytearray(head)
        lengths = array("H", self.lengths)
        if struct.pack("=H", 1) != struct.pack("<H", 1):
            lengths.byteswap()
        body += lengths.tobytes()
        for n, h in zip(self.lengths, self.hashes, strict=True):
            if n:
                body += h
        return bytes(body)

    def dump(self) -> bytes:
        """The index file: one gzip member (level 9, mtime 0) of ``body()``."""
        return gzip.compress(self.body(), compresslevel=9, mtime=0)


def parse_index(data: bytes, *, where: str = "block index") -> BlockIndex:
    """Untrusted bytes (the gzip file) -> BlockIndex; only UpdaterError escapes, naming what is wrong."""
    return parse_body(inflate(data, MAX_INDEX, where=where), where=where)


def inflate(data: bytes, most: int, *, where: str) -> bytes:
    """One whole gzip member of at most ``most`` bytes inflated, or UpdaterError."""
    try:
        d = zlib.decompressobj(31)
        raw = d.decompress(data, most + 1)
        if len(raw) > most or not d.eof or d.unused_data:
            raise UpdaterError(f"{where}: not one gzip member of at most {most} bytes")
    except zlib.error as e:
        raise UpdaterError(f"{where}: not valid gzip: {e}") from None
    return raw


def parse_body(raw: bytes, *, where: str = "block index") -> BlockIndex:
    """An index's inflated bytes -> BlockIndex (rev1 or rev2); UpdaterError otherwise."""
    if len(raw) < (HEADER2 if raw[:8] == MAGIC2 else HEADER).size:
        raise UpdaterError(f"{where}: {len(raw)} bytes is shorter than its header")
    window = 0
    if raw[:8] == MAGIC2:
        _, block_size, hash_len, size, blocks, window = HEADER2.unpack_from(raw)
        head = HEADER2.size
        if not 1 <= window <= WINDOW:
            raise UpdaterError(f"{where}: window {window} is not in 1..{WINDOW}")
    else:
        magic, block_size, hash_len, size, blocks = HEADER.unpack_from(raw)
        head = HEADER.size
        if magic != MAGIC:
            raise UpdaterError(f"{where}: magic {magic!r} is neither {MAGIC!r} nor {MAGIC2!r}")
    if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise UpdaterError(f"{where}: block size {block_size} is not a power of two in {MIN_BLOCK}..{MAX_BLOCK}")
    if not MIN_HASH <= hash_len <= MAX_HASH:
        raise UpdaterError(f"{where}: hash length {hash_len} is not in {MIN_HASH}..{MAX_HASH}")
    if size < 1 or blocks != -(-size // block_size):
        raise UpdaterError(f"{where}: {blocks} blocks of {block_size} cannot hold {size} bytes")
    end = head + 2 * blocks
    if len(raw) < end:
        raise UpdaterError(f"{where}: ends inside its block lengths")
    lengths = array("H")
    lengths.frombytes(raw[head:end])
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        lengths.byteswap()
    if max(lengths, default=0) > block_size:
        raise UpdaterError(f"{where}: a block's stored length is larger than the block size {block_size}")
    stored = sum(1 for n in lengths if n)
    if len(raw) != end + stored * hash_len:
        raise UpdaterError(f"{where}: {len(raw) - end} bytes of hashes, expected {stored} x {hash_len}")
    stored_hashes = [raw[at : at + hash_len] for at in range(end, len(raw), hash_len)]
    hashes = with_zero_hashes(size, block_size, hash_len, lengths, stored_hashes)
    return BlockIndex(size, lengths, hashes, block_size, hash_len, window)


def with_zero_hashes(size: int, block_size: int, hash_len: int, lengths: array, stored: list[bytes]) -> list[bytes]:
    """Every block's hash: ``stored`` gives the non-zero blocks' in order, a zero block's is
    that of its zero bytes (the last block's may be short)."""
    hashes, given = [], iter(stored)
    zero_hash = block_hash(bytes(block_size), hash_len)
    for i, n in enumerate(lengths):
        if n:
            hashes.append(next(given))
        elif i == len(lengths) - 1 and size % block_size:
            hashes.append(block_hash(bytes(size % block_size), hash_len))
        else:
            hashes.append(zero_hash)
    return hashes


def build_index(
    data: BinaryIO,
    size: int,
    pack: BinaryIO,
    *,
    block_size: int = BLOCK_SIZE,
    hash_len: int = HASH_LEN,
    window: int = WINDOW,
    level: int = 9,
    before: bytes = b"",
) -> BlockIndex:
    """Read ``size`` bytes of ``data``, write each non-zero block deflated (raw deflate with
    the ``window`` bytes of the image before it as preset dictionary, or as is when that is
    not shorter) to ``pack``; the index of it all. ``before``: the image's bytes before
    ``data``, when ``data`` is a piece of it (the master indexes pieces in parallel)."""
    lengths, hashes = array("H"), []
    done = 0
    before = before[-window:] if window else b""  # the image's last ``window`` bytes before this chunk
    while done < size:
        chunk = data.read(min(READ_CHUNK, size - done))
        if not chunk:
            raise UpdaterError(f"{getattr(data, 'name', 'input')} ended after {done} of {size} bytes")
        seen = before + chunk
        for at in range(0, len(chunk), block_size):
            block = chunk[at : at + block_size]
            hashes.append(block_hash(block, hash_len))
            if block.count(0) != len(block):
                end = len(before) + at
                stored = _deflate(block, seen[max(0, end - window) : end], level)
                pack.write(stored)
                lengths.append(len(stored))
            else:
                lengths.append(0)
        before = seen[-window:] if window else b""
        done += len(chunk)
    return BlockIndex(size, lengths, hashes, block_size, hash_len, window)


def _deflate(block: bytes, dictionary: bytes, level: int) -> bytes:
    if dictionary:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=dictionary)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
    stored = c.compress(block) + c.flush()
    return block if len(stored) >= len(block) else stored


def unpack_block(index: BlockIndex, i: int, stored: bytes, dictionary: bytes = b"") -> bytes:
    """Block i's plain bytes from its stored form (``dictionary``: the index's window of the
    image before it); UpdaterError unless they hash right."""
    want = index.block_len(i)
    if len(stored) == want:
        plain = stored  # deflate did not make it shorter: stored as is
    else:
        try:
            d = zlib.decompressobj(-15, zdict=dictionary) if dictionary else zlib.decompressobj(-15)
            plain = d.decompress(stored, want + 1)
        except zlib.error as e:
            raise UpdaterError(f"block {i}: not valid deflate data: {e}") from None
    if len(plain) != want or block_hash(plain, index.hash_len) != index.hashes[i]:
        raise UpdaterError(f"block {i}: its bytes do not match the index's hash")
    return plain


# --- the plan -----------------------------------------------------------------------------


ZERO, KEEP, OTHER, TARGET, FETCH = "zero", "keep", "other", "target", "fetch"


@dataclass(frozen=True, slots=True)  # one per block of the image: no __dict__ each
class Step:
    """Where block ``block`` of the new image comes from: ``source`` is one of ZERO, KEEP
    (the target holds it already), OTHER or TARGET (copied from block ``at`` of that slot),
    FETCH (from the pack)."""

    block: int
    source: str
    at: int = -1


def plan(new: BlockIndex, target: list[bytes] | None, other: list[bytes] | None) -> list[Step]:
    """One Step per block of ``new``. ``target`` and ``other`` are what the slots are thought
    to hold (hashes per block, same size and length), None when unknown. Pure: the build
    checks every block it reads before it writes it."""
    in_other = _first_positions(other) if other else {}
    in_target = _last_positions(target) if target else {}
    steps = []
    for i, h in enumerate(new.hashes):
        if target is not None and i < len(target) and target[i] == h:
            steps.append(Step(i, KEEP))
        elif new.lengths[i] == 0:
            steps.append(Step(i, ZERO))
        elif h in in_other:
            steps.append(Step(i, OTHER, in_other[h]))
        elif (j := _later(in_target, h, i)) >= 0:
            steps.append(Step(i, TARGET, j))
        else:
            steps.append(Step(i, FETCH))
    return steps


def _first_positions(hashes: list[bytes]) -> dict[bytes, int]:
    where: dict[bytes, int] = {}
    for j, h in enumerate(hashes):
        where.setdefault(h, j)
    return where


def _last_positions(hashes: list[bytes]) -> dict[bytes, int]:
    return {h: j for j, h in enumerate(hashes)}


def _later(in_target: dict[bytes, int], h: bytes, i: int) -> int:
    """A target block holding ``h`` that the build has not overwritten yet, or -1. The build
    goes in order, so only blocks after i are still the old ones: the last block holding
    ``h`` is one if any is."""
    j = in_target.get(h, -1)
    return j if j > i else -1


@dataclass(frozen=True)
class Run:
    """Blocks ``first``..``last`` (inclusive) of the new image, bytes ``start``..``end``
    (exclusive) of the pack: one Range request."""

    first: int
    last: int
    start: int
    end: int


def merge_runs(index: BlockIndex, blocks: Iterable[int], gap: int = MERGE_GAP, most: int = MAX_RUN) -> list[Run]:
    """The pack ranges that hold ``blocks`` (ascending), adjacent ones merged, and ones at
    most ``gap`` pack bytes apart merged too (fetching the gap costs less than a request),
    each at most ``most`` bytes (or one block)."""
    runs: list[Run] = []
    for i in blocks:
        start, end = index.offsets[i], index.offsets[i + 1]
        if start == end:
            continue  # a zero block has no bytes in the pack
        if runs and start - runs[-1].end <= gap and end - runs[-1].start <= most:
            runs[-1] = Run(runs[-1].first, i, runs[-1].start, end)
        else:
            runs.append(Run(i, i, start, end))
    return runs


# --- hashes of what a slot holds ------------------------------------------------------------


def hash_slot(
    read: Callable[[int, int], bytes], size: int, block_size: int, hash_len: int, progress: Callable[[], None]
) -> list[bytes]:
    """Truncated sha256 of each block of a slot's first ``size`` bytes, read here."""
    hashes = []
    for at in range(0, size, READ_CHUNK):
        chunk = read(at, min(READ_CHUNK, size - at))
        progress()
        hashes += [block_hash(chunk[k : k + block_size], hash_len) for k in range(0, len(chunk), block_size)]
    return hashes


# --- the build ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What a build did, in bytes of the new image (and of the pack fetched)."""

    zero: int = 0
    kept: int = 0  # already right in the target: not written
    copied: int = 0  # from the card (the other slot, or elsewhere in the target)
    fetched: int = 0  # plain bytes of blocks from the master
    pack_bytes: int = 0  # pack bytes fetched for them
    requests: int = 0
    written: int = 0

    def add(self, other: Tally) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def from_card(self) -> int:
        return self.kept + self.copied

    def summary(self) -> str:
        mib = 1 << 20
        return (
            f"{self.from_card / mib:.1f} MiB from the card ({self.kept / mib:.1f} MiB already in place), "
            f"{self.zero / mib:.1f} MiB zeros, {self.fetched / mib:.1f} MiB fetched as "
            f"{self.pack_bytes / mib:.2f} MiB in {self.requests} request{'s' if self.requests != 1 else ''}; "
            f"{self.written / mib:.1f} MiB written"
        )


class Slot:
    """A slot's bytes on the disk: block reads and writes at its offset."""

    def __init__(self, disk, offset: int, capacity: int):
        self.disk, self.offset, self.capacity = disk, offset, capacity

    def read(self, at: int, length: int) -> bytes:
        return self.disk.read(self.offset + at, length)

    def write(self, at: int, data: bytes) -> None:
        self.disk.write(self.offset + at, data)


def build(
    new: BlockIndex,
    steps: list[Step],
    target: Slot,
    other: Slot | None,
    fetch: Callable[[int, int], bytes] | None,
    *,
    progress: Callable[[], None] = lambda: None,
    sync: Callable[[], None] = lambda: None,
    gap: int | None = None,
    fetch_many: Callable[[list[tuple[int, int]]], list[bytes]] | None = None,
    take: Callable[[list[tuple[int, int]], Callable[[list[bytes]], None]], None] | None = None,
    many: bool | None = None,
) -> Tally:
    """Carry out ``steps`` into ``target``: the card's blocks first (in order, so a target
    block is read before it is overwritten), then the fetched ones. ``fetch(start, end)``
    returns those pack bytes; ``fetch_many(spans)``, when the master answers multi-range
    requests, each span's, in one request (runs are then merged only across tiny gaps).
    A block read from the card that does not hash right is fetched instead; a fetched one
    that does not is an UpdaterError (the slot stays uncommitted). ``take(spans, use)``, when
    given, fetches the spans (several at once with ``many``) and hands them to ``use``, which
    writes each block once its hash is right and raises at the first that is not: a ``take``
    over several sources then asks the next source for the spans (sources.py), and blocks
    written before stay right."""
    many = fetch_many is not None if many is None else many
    tally = Tally()
    bs = new.block_size
    to_fetch: list[int] = []
    zeros = bytes(bs)
    for n, step in enumerate(steps):
        if n % 256 == 0:
            progress()
        i, length = step.block, new.block_len(step.block)
        if step.source == FETCH:
            to_fetch.append(i)
            continue
        if step.source == KEEP:
            if block_hash(target.read(i * bs, length), new.hash_len) == new.hashes[i]:
                tally.kept += length
                continue
            if new.lengths[i] == 0:
                step = Step(i, ZERO)
            else:
                to_fetch.append(i)
                continue
        if step.source == ZERO:
            if target.read(i * bs, length) == zeros[:length]:  # a blank card's slot: no write
                tally.kept += length
                continue
            target.write(i * bs, zeros[:length])
            tally.zero += length
            tally.written += length
            continue
        source = other if step.source == OTHER else target
        data = source.read(step.at * bs, length) if source is not None else b""
        if block_hash(data, new.hash_len) != new.hashes[i]:
            to_fetch.append(i)  # the card changed since its hashes were taken: the master has it
            continue
        target.write(i * bs, data)
        tally.copied += length
        tally.written += length
    to_fetch.sort()
    wanted = set(to_fetch)
    window = _Window(new, target)
    runs = merge_runs(new, to_fetch, gap if gap is not None else MULTI_GAP if many else MERGE_GAP)

    def fetched(spans: list[tuple[int, int]], use: Callable[[list[bytes]], None]) -> None:
        assert fetch is not None, "build needs fetch or take"
        use(fetch_many(spans) if fetch_many else [fetch(*spans[0])])

    for batch in batches(runs) if many else [[run] for run in runs]:
        progress()

        def use(packs: list[bytes], batch: list[Run] = batch) -> None:
            part = Tally(requests=1)  # counted once its blocks are in: a failed source's try is not
            for run, pack in zip(batch, packs, strict=True):
                _unpack_run(new, run, pack, wanted, target, window, part)
            tally.add(part)

        (take or fetched)([(run.start, run.end) for run in batch], use)
    sync()
    return tally


def batches(runs: list[Run], most: int = MAX_RUN, ranges: int = MAX_RANGES) -> list[list[Run]]:
    """Consecutive runs grouped into requests of at most ``ranges`` runs and ``most`` pack bytes."""
    out: list[list[Run]] = []
    size = 0
    for run in runs:
        if out and len(out[-1]) < ranges and size + run.end - run.start <= most:
            out[-1].append(run)
            size += run.end - run.start
        else:
            out.append([run])
            size = run.end - run.start
    return out


def _unpack_run(
    new: BlockIndex, run: Run, pack: bytes, wanted: set[int], target: Slot, window: _Window, tally: Tally
) -> None:
    """Write the wanted blocks of one run's pack bytes into ``target``, each checked."""
    bs = new.block_size
    if len(pack) != run.end - run.start:
        raise UpdaterError(f"pack bytes {run.start}-{run.end - 1}: got {len(pack)} bytes")
    tally.pack_bytes += len(pack)
    for i in range(run.first, run.last + 1):
        lo, hi = new.offsets[i] - run.start, new.offsets[i + 1] - run.start
        if i not in wanted or hi == lo:
            continue
        plain = unpack_block(new, i, pack[lo:hi], window.before(i))
        target.write(i * bs, plain)
        window.wrote(i, plain)
        tally.fetched += len(plain)
        tally.written += len(plain)


class _Window:
    """The new image's ``window`` bytes before block i, for a fetched block's dictionary.
    Fetched blocks come in ascending order after every other block is in place, so all
    before i is final in the target: it is read from there, except while fetched blocks
    follow one another, when the last ones are still at hand."""

    def __init__(self, index: BlockIndex, target: Slot):
        self.index, self.target = index, target
        self.end, self.bytes = -1, b""  # self.bytes: the image's bytes up to block self.end's start

    def before(self, i: int) -> bytes:
        size = self.index.window
        if not size:
            return b""
        start = i * self.index.block_size
        if self.end != i:
            self.bytes = self.target.read(max(0, start - size), min(start, size))
        self.end = i
        return self.bytes

    def wrote(self, i: int, plain: bytes) -> None:
        if self.index.window and self.end == i:
            self.bytes = (self.bytes + plain)[-self.index.window :]
            self.end = i + 1


def fetch_share(new: BlockIndex, steps: list[Step]) -> int:
    """Pack bytes the plan expects to fetch (before any card block fails its check)."""
    return sum(new.offsets[s.block + 1] - new.offsets[s.block] for s in steps if s.source == FETCH)


# --- the updater's side: try a delta, or say why the full stream it is -------------------------


class Fallback(Exception):
    """The delta cannot be used (and nothing of the slot was written): the full stream it is."""


def install(u, path: str, target: str, offset: int, capacity: int, manifest) -> Tally | None:
    """Build slot ``target`` of the card from the card and the pack, if ``manifest`` has a block
    index; None (and a logged, reported reason) when the full stream must do it instead. A bad
    index or block is an UpdaterError: refused, like a bad stream. ``u`` is main's _Update."""
    try:
        return _install(u, path, target, offset, capacity, manifest)
    except Fallback as e:
        u.log(f"full stream: {e}")
        u.delta_note = f"full stream: {e}"
        return None


def _install(u, path: str, target: str, offset: int, capacity: int, manifest) -> Tally:
    from .fetch import NoRange
    from .formats import beside

    spec = manifest.delta
    if spec is None:
        raise Fallback("the manifest has no block index")
    other_name = next(name for name in ("a", "b") if name != target)
    if u.state.slot(other_name).state == "empty":
        raise Fallback(f"slot {other_name} holds no image to build from")
    need, available = -(-manifest.size // spec.block_size) * PLAN_BYTES, available_memory()
    if available is not None and need > MEMORY_SHARE * available:
        raise Fallback(f"planning would take ~{need >> 20} MiB of the {available >> 20} MiB of memory available")
    table = _table(u)
    here = Slot(u.disk, offset, capacity)
    other = _slot_of(u, table, other_name)
    # the indexes the slots' installs kept on the card: the target as it was before this
    # install marked it writing (empty, a version, or half-built)
    kept_other = _kept(u, other_name, u.state.slot(other_name), other) if other else None
    kept_target = _kept(u, target, u.replaced, here)
    new = u.new_index = new_index(u, path, manifest, [k for k in (kept_other, kept_target) if k])
    pack_path = beside(path, spec.pack)
    many = _ranges_answered(u, pack_path, new.pack_size)
    target_hashes = _hashes(u, target, u.replaced, here, new, kept_target)
    other_hashes = _hashes(u, other_name, u.state.slot(other_name), other, new, kept_other) if other else None
    steps = plan(new, target_hashes, other_hashes)
    share = fetch_share(new, steps)
    if share > MAX_FETCH_SHARE * manifest.stream_size:
        raise Fallback(
            f"the card is too different: {share} bytes of blocks to fetch, the stream is {manifest.stream_size}"
        )
    u.log(f"delta: {sum(s.source == FETCH for s in steps)} of {new.blocks} blocks to fetch ({share} bytes)")

    def take(spans: list[tuple[int, int]], use: Callable[[list[bytes]], None]) -> None:
        """The spans from one source, each block checked as it is written: a source whose
        block fails its hash is passed over, and the next asked for the spans."""

        def one(source) -> None:
            if many and len(spans) > 1:
                try:
                    packs = source.get_ranges(pack_path, spans, on_wait=u.wait_for_stream)
                except NoRange:  # this source answers one range at a time
                    packs = [source.get_range(pack_path, *span, on_wait=u.wait_for_stream) for span in spans]
            else:
                packs = [source.get_range(pack_path, *span, on_wait=u.wait_for_stream) for span in spans]
            use(packs)

        try:
            u.master.verified(f"GET {pack_path} from byte {spans[0][0]}", one)
        except NoRange as e:  # they did answer the probe: sources that change their minds fail the install
            raise UpdaterError(str(e)) from None

    tally = build(
        new,
        steps,
        here,
        other,
        None,
        progress=u.watchdog.progress,
        sync=u.disk.datasync,
        take=take,
        many=many,
    )
    u.card_bytes = tally.from_card
    u.delta_note = "delta: " + tally.summary()
    u.log(u.delta_note)
    return tally


def _ranges_answered(u, pack_path: str, pack_size: int) -> bool:
    """Probe the master before a byte of the slot is written: True when it answers a request
    for several ranges with them (fewer requests for scattered blocks), False when it answers
    one range at a time; Fallback when it answers no Range request at all."""
    from .fetch import NoRange

    if not pack_size:
        return False
    if pack_size >= 3:
        try:
            u.master.get_ranges(pack_path, [(0, 1), (2, 3)], on_wait=u.wait_for_stream)
            return True
        except NoRange as e:
            u.log(f"delta: {e}; one range per request")
    try:
        u.master.get_range(pack_path, 0, 1, on_wait=u.wait_for_stream)
    except NoRange as e:
        raise Fallback(str(e)) from None
    return False


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of memory the kernel says are available (MemAvailable), or None when it does not say."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def new_index(u, path: str, manifest, bases: list[BlockIndex]) -> BlockIndex:
    """``manifest``'s block index: rebuilt from a diff against one the card keeps when the
    master has that diff (tens of KiB), else the whole index. Either way it is checked
    against the signed manifest; a diff that is missing or does not add up is logged and
    the whole index fetched."""
    from . import indexdiff
    from .formats import beside

    spec = manifest.delta
    where = f"block index of {manifest.image} v{manifest.version}"
    for base in bases if spec.plain_sha256 else ():
        name = indexdiff.diff_name(spec.index, base.plain_sha256)

        def rebuilt(source, base: BlockIndex = base, name: str = name) -> tuple[BlockIndex, int]:
            body = source.get(beside(path, name))
            source.stream_bytes += len(body)  # index bytes are download bytes, like the stream's
            index = indexdiff.apply(base, body, expected=manifest.size, where=f"{where}: diff {name}")
            if index.plain_sha256 != spec.plain_sha256:
                raise UpdaterError(f"{where}: the index rebuilt from diff {name} is not the signed one")
            _check_fits(index, manifest, where)
            return index, len(body)

        try:
            index, size = u.master.verified(f"GET {beside(path, name)}", rebuilt)
            u.log(f"delta: {where} from a {size}-byte diff against the index slot's install kept")
            return index
        except UpdaterError as e:
            u.log(f"delta: {e}; fetching the whole index")
    return fetch_index(u, path, manifest)


def fetch_index(u, path: str, manifest) -> BlockIndex:
    """``manifest``'s block index from the master, checked against the manifest's size and
    sha256 and against the image it describes; UpdaterError otherwise."""
    from .formats import beside

    spec = manifest.delta
    where = f"block index of {manifest.image} v{manifest.version}"
    if spec.index_size > MAX_INDEX:
        raise UpdaterError(f"{where}: {spec.index_size} bytes is more than the {MAX_INDEX} allowed")

    def checked(source) -> BlockIndex:  # one source's index, whole; a wrong one: the next source's
        body = b"".join(source.stream(beside(path, spec.index), spec.index_size, on_wait=u.wait_for_stream))
        digest = hashlib.sha256(body).hexdigest()
        if digest != spec.index_sha256:
            raise UpdaterError(f"{where}: sha256 is {digest}, the manifest says {spec.index_sha256}")
        index = parse_index(body, where=where)
        _check_fits(index, manifest, where)
        return index

    return u.master.verified(f"GET {beside(path, spec.index)}", checked)


def _check_fits(index: BlockIndex, manifest, where: str) -> None:
    spec = manifest.delta
    if (index.size, index.block_size, index.pack_size, index.window) != (
        manifest.size,
        spec.block_size,
        spec.pack_size,
        spec.window,
    ):
        raise UpdaterError(
            f"{where}: describes {index.size} bytes in a {index.pack_size}-byte pack, not the manifest's"
        )


def keep_index(u, target: str, offset: int, capacity: int, path: str, manifest) -> None:
    """After a verified install into ``target``: keep the new version's index behind the image
    (slotindex.py), so the next delta needs neither the master's copy nor a read of the slot.
    The index a delta built from is at hand; after a full stream it is fetched (a few hundred
    KiB more). Never fails the install: without it, the next delta fetches or hashes."""
    from . import slotindex

    if manifest.delta is None:
        return
    u.log(f"slot {target}: keeping its block index on the card")
    try:
        index = u.new_index
        if index is None:
            index = fetch_index(u, path, manifest)
        why = slotindex.store(Slot(u.disk, offset, capacity), manifest.size, manifest.sha256, index, u.disk.datasync)
        u.log(f"slot {target}: its block index kept on the card" if why is None else f"slot {target}: {why}")
    except UpdaterError as e:
        u.log(f"slot {target}: block index not kept ({e})")


def _table(u):
    from . import layout

    table = layout.read_table(u.disk)
    if table is None:
        raise Fallback("the card has no partition table")
    return table


def _slot_of(u, table, name: str) -> Slot | None:
    from . import layout

    slot = u.state.slot(name)
    number = slot.partition or (u.plan.layout.number(name) if u.plan and u.plan.layout.get(name) else None)
    if number is None or table.entry(number) is None:
        return None
    return Slot(u.disk, *layout.partition_range(table, number))


def _kept(u, name: str, slot, where: Slot) -> BlockIndex | None:
    """The index slot ``name``'s install kept on the card, if it describes what the slot
    state says the slot holds; None (and why, in the log) otherwise."""
    from . import slotindex
    from .formats import BOOTABLE

    if slot.state not in (*BOOTABLE, "failed") or not slot.sha256:
        return None
    try:
        return slotindex.load(where, slot.sha256, where=f"slot {name}")
    except UpdaterError as e:
        u.log(f"delta: {e}")
        return None


def _hashes(u, name: str, slot, where: Slot, new: BlockIndex, kept: BlockIndex | None) -> list[bytes] | None:
    """What slot ``name`` holds (its state ``slot``), block by block: the index its install
    kept on the card; else the index of its version when the master still has it (signed);
    else hashed here (an install that was cut, a version the master dropped); None for an
    empty slot, which is not read."""
    from .formats import BOOTABLE, manifest_path, parse_manifest

    if slot.state == "empty":
        return None
    if kept is not None and (kept.block_size, kept.hash_len) == (new.block_size, new.hash_len):
        u.log(f"delta: slot {name} holds {slot.image} v{slot.version}: its index kept on the card")
        return kept.hashes
    if slot.state in (*BOOTABLE, "failed") and slot.image and slot.version:
        try:
            path = manifest_path(slot.image, slot.version)
            held = u.signed_doc(path, parse_manifest)
            if held.sha256 == slot.sha256 and held.delta and held.delta.block_size == new.block_size:
                index = fetch_index(u, path, held)
                if index.hash_len == new.hash_len:
                    u.log(f"delta: slot {name} holds {slot.image} v{slot.version}: its index from the master")
                    return index.hashes
        except UpdaterError as e:
            u.log(f"delta: no index for slot {name} from the master ({e}); hashing it here")
    size = min(where.capacity, new.size)
    u.log(f"delta: hashing slot {name} ({size} bytes)")
    return hash_slot(where.read, size, new.block_size, new.hash_len, u.watchdog.progress)
