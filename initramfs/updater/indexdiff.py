"""A block index as a diff against another: what a worker fetches when it holds the old one.

A one-package upgrade moves most of an ext4 image by whole blocks (notes/delta.md), so the
new index is long runs of the old one's entries at other offsets, zero runs, and a few
thousand new entries: tens of KiB as a diff against the ~0.5 MiB whole. publish writes one
per earlier version (``<index>.from-<sha256 of the old index's body>``, static files any
HTTP server serves); the worker asks for the one that names the index its card holds, and
takes the whole index on a 404. A diff carries no signature: the index it rebuilds must
hash to the signed manifest's ``plain_sha256``, so a wrong diff costs a fetch, never a
wrong block.

The bytes (one gzip member; notes/formats.md): magic, the base's body sha256, the new
index's header fields, then ops until the end, each a varint ``n << 2 | op``:
ZERO n zero blocks; COPY n entries of the base from a start given as a signed varint
relative to where the last COPY ended; NEW n entries given here (u16 length >= 1, hash).
"""

from __future__ import annotations

import gzip
import struct
from array import array

from .delta import MAX_INDEX, WINDOW, BlockIndex, inflate, with_zero_hashes
from .errors import UpdaterError

MAGIC = b"RBIDXDF1"
HEADER = struct.Struct("<8s32sIIQQI")  # magic, base body sha256, block size, hash length, size, blocks, window
ZERO, COPY, NEW = 0, 1, 2
CANDIDATES = 4  # base positions tried for a run's start: the longest match wins


def diff_name(index: str, base_plain_sha256: str) -> str:
    """The file beside a version's index holding it as a diff against the index whose body hashes so."""
    return f"{index}.from-{base_plain_sha256}"


def diff(base: BlockIndex, new: BlockIndex) -> bytes:
    """``new`` as ops against ``base`` (same block size and hash length), gzipped."""
    if (base.block_size, base.hash_len) != (new.block_size, new.hash_len):
        raise ValueError("an index diffs only against one of the same block size and hash length")
    where: dict[tuple[int, bytes], list[int]] = {}
    for j, (n, h) in enumerate(zip(base.lengths, base.hashes, strict=True)):
        if n:
            positions = where.setdefault((n, h), [])
            if len(positions) < CANDIDATES:
                positions.append(j)
    out = bytearray(
        HEADER.pack(
            MAGIC,
            bytes.fromhex(base.plain_sha256),
            new.block_size,
            new.hash_len,
            new.size,
            new.blocks,
            new.window,
        )
    )
    literal: list[int] = []
    copied_to = 0  # where the last COPY ended in the base

    def flush_literal() -> None:
        if literal:
            out.extend(_varint(len(literal) << 2 | NEW))
            for k in literal:
                out.extend(struct.pack("<H", new.lengths[k]) + new.hashes[k])
            literal.clear()

    i = 0
    while i < new.blocks:
        start, length = _longest(base, new, i, [copied_to, *where.get((new.lengths[i], new.hashes[i]), ())])
        if length and (new.lengths[i] or start == copied_to):
            flush_literal()
            out.extend(_varint(length << 2 | COPY) + _varint(_zigzag(start - copied_to)))
            copied_to = start + length
            i += length
        elif new.lengths[i] == 0:
            flush_literal()
            n = 1
            while i + n < new.blocks and new.lengths[i + n] == 0:
                n += 1
            out.extend(_varint(n << 2 | ZERO))
            i += n
        else:
            literal.append(i)
            i += 1
    flush_literal()
    return gzip.compress(bytes(out), compresslevel=9, mtime=0)


def _longest(base: BlockIndex, new: BlockIndex, i: int, starts: list[int]) -> tuple[int, int]:
    """Of the base positions ``starts``, the one whose entries match ``new``'s from i the
    longest: (start, length), length 0 when none matches."""
    best = (0, 0)
    for j in starts:
        n = 0
        while (
            j + n < base.blocks
            and i + n < new.blocks
            and base.lengths[j + n] == new.lengths[i + n]
            and base.hashes[j + n] == new.hashes[i + n]
        ):
            n += 1
        if n > best[1]:
            best = (j, n)
    return best


def apply(base: BlockIndex, data: bytes, *, expected: int | None = None, where: str = "block index diff") -> BlockIndex:
    """Untrusted diff bytes + the index the card holds -> the new index (which the caller
    checks against the signed manifest); only UpdaterError escapes. ``expected``: the image size
    the signed manifest gives, checked before anything is built (a few bytes of diff must not
    make the worker build tables for an image of a hundred GiB)."""
    raw = inflate(data, MAX_INDEX, where=where)
    if len(raw) < HEADER.size:
        raise UpdaterError(f"{where}: {len(raw)} bytes is shorter than its header")
    magic, base_sha, block_size, hash_len, size, blocks, window = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise UpdaterError(f"{where}: magic {magic!r} is not {MAGIC!r}")
    if base_sha.hex() != base.plain_sha256:
        raise UpdaterError(f"{where}: made against another index than the card's")
    if (block_size, hash_len) != (base.block_size, base.hash_len):
        raise UpdaterError(f"{where}: block size {block_size} or hash length {hash_len} is not the base's")
    if expected is not None and size != expected:
        raise UpdaterError(f"{where}: describes an image of {size} bytes, the manifest's has {expected}")
    if size < 1 or blocks != -(-size // block_size) or blocks > MAX_INDEX // 2:
        raise UpdaterError(f"{where}: {blocks} blocks of {block_size} cannot hold {size} bytes")
    if window > WINDOW:  # 0: a rev1 index; what parse_body takes, so the index rebuilt is one it would
        raise UpdaterError(f"{where}: window {window} is not in 0..{WINDOW}")
    lengths, stored = array("H"), []
    at, copied_to = HEADER.size, 0  # where the last COPY ended in the base
    while at < len(raw):
        value, at = _read_varint(raw, at, where)
        n, op = value >> 2, value & 3
        if n < 1 or len(lengths) + n > blocks:
            raise UpdaterError(f"{where}: an op of {n} blocks at byte {at} does not fit {blocks} blocks")
        if op == ZERO:
            lengths.extend([0] * n)
        elif op == COPY:
            offset, at = _read_varint(raw, at, where)
            start = copied_to + _unzigzag(offset)
            if start < 0 or start + n > base.blocks:
                raise UpdaterError(f"{where}: copies base blocks {start}..{start + n - 1} of {base.blocks}")
            for j in range(start, start + n):
                lengths.append(base.lengths[j])
                if base.lengths[j]:
                    stored.append(base.hashes[j])
            copied_to = start + n
        elif op == NEW:
            end = at + n * (2 + hash_len)
            if end > len(raw):
                raise UpdaterError(f"{where}: ends inside {n} new entries")
            for k in range(at, end, 2 + hash_len):
                (length,) = struct.unpack_from("<H", raw, k)
                if not 1 <= length <= block_size:
                    raise UpdaterError(f"{where}: a new entry's length {length} is not in 1..{block_size}")
                lengths.append(length)
                stored.append(raw[k + 2 : k + 2 + hash_len])
            at = end
        else:
            raise UpdaterError(f"{where}: unknown op {op} at byte {at}")
    if len(lengths) != blocks:
        raise UpdaterError(f"{where}: ops give {len(lengths)} blocks, the header says {blocks}")
    hashes = with_zero_hashes(size, block_size, hash_len, lengths, stored)
    return BlockIndex(size, lengths, hashes, block_size, hash_len, window)


def _zigzag(n: int) -> int:
    return n << 1 if n >= 0 else (-n << 1) - 1


def _unzigzag(n: int) -> int:
    return n >> 1 if not n & 1 else -((n + 1) >> 1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(raw: bytes, at: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while at < len(raw) and shift <= 63:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    raise UpdaterError(f"{where}: a number runs past byte {at}")
