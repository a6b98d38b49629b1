"""Block-delta installs: build the new slot from what the card already holds, fetching the rest.

The master publishes, beside the stream, a block index (every 4 KiB block's stored length
and truncated sha256) and a pack (each non-zero block deflated on its own, in block order):
notes/formats.md has the bytes, notes/delta.md the measurements behind the choices. The
signed manifest pins the index's size and sha256; the index pins every block; the slot's
sha256 in the manifest pins the whole, and nothing is committed before the read-back
matches it. So a block from anywhere (the card, the master) is only a candidate until
its hash matches, and a wrong guess costs a fetch, never a bad slot.

For each block of the new image, in order of cost: a zero block is made here; a block the
target slot already holds at that offset is left alone (no write: card wear); a block found
by hash in the other slot, or elsewhere in the target slot before it is overwritten, is
copied; only the rest is fetched from the pack with Range requests, adjacent blocks merged.
Where the card's slots' hashes come from: the index of the version a slot holds, fetched
from the master when the slot state names a version whose signed manifest has one (a few
hundred KiB), else hashed here from the slot itself.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import UpdaterError

MAGIC = b"RBINDEX1"
HEADER = struct.Struct("<8sIIQQ")  # magic, block size, hash length, image size, blocks
BLOCK_SIZE = 4096  # the ext4 block: files start on it, so moved files still match
HASH_LEN = 8  # bytes of sha256 per block (notes/delta.md: the slot's sha256 is the real check)
MIN_BLOCK, MAX_BLOCK = 512, 32768  # stored lengths are u16
MIN_HASH, MAX_HASH = 8, 32
MAX_INDEX = 64 << 20  # an index this large (inflated) would describe a 256 GiB image at 4 KiB
MERGE_GAP = 16 << 10  # pack bytes between two wanted runs fetched anyway to save a request
MAX_RUN = 4 << 20  # pack bytes per request at most: the watchdog hears of progress between requests
MAX_FETCH_SHARE = 0.6  # more of the stream than this to fetch: the full stream is simpler
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

    def dump(self) -> bytes:
        """The index file: gzip (mtime 0) of header, lengths (u16 each), then the hashes of
        the non-zero blocks (zero blocks' hashes are known)."""
        body = bytearray(HEADER.pack(MAGIC, self.block_size, self.hash_len, self.size, self.blocks))
        lengths = array("H", self.lengths)
        if struct.pack("=H", 1) != struct.pack("<H", 1):
            lengths.byteswap()
        body += lengths.tobytes()
        for n, h in zip(self.lengths, self.hashes, strict=True):
            if n:
                body += h
        return gzip.compress(bytes(body), compresslevel=9, mtime=0)


def parse_index(data: bytes, *, where: str = "block index") -> BlockIndex:
    """Untrusted bytes -> BlockIndex; only UpdaterError escapes, naming what is wrong."""
    try:
        d = zlib.decompressobj(31)
        raw = d.decompress(data, MAX_INDEX + 1)
        if len(raw) > MAX_INDEX or not d.eof or d.unused_data:
            raise UpdaterError(f"{where}: not one gzip member of at most {MAX_INDEX} bytes")
    except zlib.error as e:
        raise UpdaterError(f"{where}: not valid gzip: {e}") from None
    if len(raw) < HEADER.size:
        raise UpdaterError(f"{where}: {len(raw)} bytes is shorter than its header")
    magic, block_size, hash_len, size, blocks = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise UpdaterError(f"{where}: magic {magic!r} is not {MAGIC!r}")
    if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise UpdaterError(f"{where}: block size {block_size} is not a power of two in {MIN_BLOCK}..{MAX_BLOCK}")
    if not MIN_HASH <= hash_len <= MAX_HASH:
        raise UpdaterError(f"{where}: hash length {hash_len} is not in {MIN_HASH}..{MAX_HASH}")
    if size < 1 or blocks != -(-size // block_size):
        raise UpdaterError(f"{where}: {blocks} blocks of {block_size} cannot hold {size} bytes")
    end = HEADER.size + 2 * blocks
    if len(raw) < end:
        raise UpdaterError(f"{where}: ends inside its block lengths")
    lengths = array("H")
    lengths.frombytes(raw[HEADER.size : end])
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        lengths.byteswap()
    if max(lengths, default=0) > block_size:
        raise UpdaterError(f"{where}: a block's stored length is larger than the block size {block_size}")
    stored = sum(1 for n in lengths if n)
    if len(raw) != end + stored * hash_len:
        raise UpdaterError(f"{where}: {len(raw) - end} bytes of hashes, expected {stored} x {hash_len}")
    hashes, at = [], end
    zero_hash = block_hash(bytes(block_size), hash_len)
    for i, n in enumerate(lengths):
        if n:
            hashes.append(raw[at : at + hash_len])
            at += hash_len
        elif i == blocks - 1 and size % block_size:
            hashes.append(block_hash(bytes(size % block_size), hash_len))
        else:
            hashes.append(zero_hash)
    return BlockIndex(size, lengths, hashes, block_size, hash_len)


def build_index(
    data: BinaryIO, size: int, pack: BinaryIO, *, block_size: int = BLOCK_SIZE, hash_len: int = HASH_LEN, level: int = 9
) -> BlockIndex:
    """Read ``size`` bytes of ``data``, write each non-zero block deflated (raw deflate, or
    as is when that is not shorter) to ``pack``; the index of it all."""
    lengths, hashes = array("H"), []
    done = 0
    while done < size:
        chunk = data.read(min(READ_CHUNK, size - done))
        if not chunk:
            raise UpdaterError(f"{getattr(data, 'name', 'input')} ended after {done} of {size} bytes")
        for at in range(0, len(chunk), block_size):
            block = chunk[at : at + block_size]
            hashes.append(block_hash(block, hash_len))
            if block.count(0) != len(block):
                c = zlib.compressobj(level, zlib.DEFLATED, -15)
                stored = c.compress(block) + c.flush()
                if len(stored) >= len(block):
                    stored = block
                pack.write(stored)
                lengths.append(len(stored))
            else:
                lengths.append(0)
        done += len(chunk)
    return BlockIndex(size, lengths, hashes, block_size, hash_len)


def unpack_block(index: BlockIndex, i: int, stored: bytes) -> bytes:
    """Block i's plain bytes from its stored form; UpdaterError unless they hash right."""
    want = index.block_len(i)
    if len(stored) == want:
        plain = stored  # deflate did not make it shorter: stored as is
    else:
        try:
            d = zlib.decompressobj(-15)
            plain = d.decompress(stored, want + 1)
        except zlib.error as e:
            raise UpdaterError(f"block {i}: not valid deflate data: {e}") from None
    if len(plain) != want or block_hash(plain, index.hash_len) != index.hashes[i]:
        raise UpdaterError(f"block {i}: its bytes do not match the index's hash")
    return plain


# --- the plan -----------------------------------------------------------------------------


ZERO, KEEP, OTHER, TARGET, FETCH = "zero", "keep", "other", "target", "fetch"


@dataclass(frozen=True)
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
    in_target = _all_positions(target) if target else {}
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


def _all_positions(hashes: list[bytes]) -> dict[bytes, list[int]]:
    where: dict[bytes, list[int]] = {}
    for j, h in enumerate(hashes):
        where.setdefault(h, []).append(j)
    return where


def _later(in_target: dict[bytes, list[int]], h: bytes, i: int) -> int:
    """A target block holding ``h`` that the build has not overwritten yet (it goes in
    order, so only blocks after i are still the old ones), or -1."""
    positions = in_target.get(h)
    if not positions:
        return -1
    k = bisect.bisect_right(positions, i)
    return positions[k] if k < len(positions) else -1


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

    @property
    def from_card(self) -> int:
        return self.kept + self.copied

    def summary(self) -> str:
        mib = 1 << 20
        return (
            f"{self.from_card / mib:.1f} MiB from the card ({self.kept / mib:.1f} MiB already in place), "
            f"{self.zero / mib:.1f} MiB zeros, {self.fetched / mib:.1f} MiB fetched as "
            f"{self.pack_bytes / mib:.2f} MiB in {self.requests} requests; {self.written / mib:.1f} MiB written"
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
    fetch: Callable[[int, int], bytes],
    *,
    progress: Callable[[], None] = lambda: None,
    sync: Callable[[], None] = lambda: None,
    gap: int = MERGE_GAP,
) -> Tally:
    """Carry out ``steps`` into ``target``: the card's blocks first (in order, so a target
    block is read before it is overwritten), then the fetched ones. ``fetch(start, end)``
    returns those pack bytes. A block read from the card that does not hash right is fetched
    instead; a fetched one that does not is an UpdaterError (the slot stays uncommitted)."""
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
    for run in merge_runs(new, to_fetch, gap):
        progress()
        pack = fetch(run.start, run.end)
        if len(pack) != run.end - run.start:
            raise UpdaterError(f"pack bytes {run.start}-{run.end - 1}: got {len(pack)} bytes")
        tally.requests += 1
        tally.pack_bytes += len(pack)
        for i in range(run.first, run.last + 1):
            lo, hi = new.offsets[i] - run.start, new.offsets[i + 1] - run.start
            if i not in wanted or hi == lo:
                continue
            plain = unpack_block(new, i, pack[lo:hi])
            target.write(i * bs, plain)
            tally.fetched += len(plain)
            tally.written += len(plain)
    sync()
    return tally


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
    new = fetch_index(u, path, manifest)
    pack_path = beside(path, spec.pack)
    if new.pack_size:
        try:
            # a master without Range support is found out before a byte of the slot is written
            u.master.get_range(pack_path, 0, 1, on_wait=u.wait_for_stream)
        except NoRange as e:
            raise Fallback(str(e)) from None
    table = _table(u)
    other = _slot_of(u, table, other_name)
    # the target as it was before this install marked it writing: empty, a version, or half-built
    target_hashes = _hashes(u, target, u.replaced, Slot(u.disk, offset, capacity), new)
    other_hashes = _hashes(u, other_name, u.state.slot(other_name), other, new) if other else None
    steps = plan(new, target_hashes, other_hashes)
    share = fetch_share(new, steps)
    if share > MAX_FETCH_SHARE * manifest.stream_size:
        raise Fallback(
            f"the card is too different: {share} bytes of blocks to fetch, the stream is {manifest.stream_size}"
        )
    u.log(f"delta: {sum(s.source == FETCH for s in steps)} of {new.blocks} blocks to fetch ({share} bytes)")

    def fetch(start: int, end: int) -> bytes:
        try:
            return u.master.get_range(pack_path, start, end, on_wait=u.wait_for_stream)
        except NoRange as e:  # it did answer the probe: a master that changes its mind fails the install
            raise UpdaterError(str(e)) from None

    def sync() -> None:
        import os

        try:
            os.fdatasync(u.disk.fd)
        except OSError as e:
            raise UpdaterError(f"disk {u.disk.path}: fdatasync: {e.strerror}") from None

    tally = build(new, steps, Slot(u.disk, offset, capacity), other, fetch, progress=u.watchdog.progress, sync=sync)
    u.card_bytes = tally.from_card
    u.delta_note = "delta: " + tally.summary()
    u.log(u.delta_note)
    return tally


def fetch_index(u, path: str, manifest) -> BlockIndex:
    """``manifest``'s block index from the master, checked against the manifest's size and
    sha256 and against the image it describes; UpdaterError otherwise."""
    from .formats import beside

    spec = manifest.delta
    where = f"block index of {manifest.image} v{manifest.version}"
    if spec.index_size > MAX_INDEX:
        raise UpdaterError(f"{where}: {spec.index_size} bytes is more than the {MAX_INDEX} allowed")
    body = b"".join(u.master.stream(beside(path, spec.index), spec.index_size, on_wait=u.wait_for_stream))
    digest = hashlib.sha256(body).hexdigest()
    if digest != spec.index_sha256:
        raise UpdaterError(f"{where}: sha256 is {digest}, the manifest says {spec.index_sha256}")
    index = parse_index(body, where=where)
    if (index.size, index.block_size, index.pack_size) != (manifest.size, spec.block_size, spec.pack_size):
        raise UpdaterError(
            f"{where}: describes {index.size} bytes in a {index.pack_size}-byte pack, not the manifest's"
        )
    return index


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


def _hashes(u, name: str, slot, where: Slot, new: BlockIndex) -> list[bytes] | None:
    """What slot ``name`` holds (its state ``slot``), block by block: the index of its version
    when the state names one the master still has (signed), else hashed here (an install that
    was cut, a version the master dropped); None for an empty slot, which is not read."""
    from .formats import BOOTABLE, manifest_path, parse_manifest

    if slot.state == "empty":
        return None
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
