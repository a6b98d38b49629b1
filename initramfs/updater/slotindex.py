"""The block index of what a slot holds, kept on the card behind the image in that slot.

A delta install needs the hashes of what the card holds. Fetching the installed version's
index costs ~0.5 MiB per update (0.7% of the stream in notes/delta.md) and hashing the slot
costs a read of it; so every image install leaves its index in the slot's own spare room,
after the filesystem and before the partition's end, where nothing else writes. It is a
hint: delta.py hashes every block it reads from the card before writing it, and the whole
slot after, so a stale or damaged record costs fetches, never a bad slot.

Bytes (notes/formats.md): the index's body (delta.BlockIndex.body, not gzipped), starting
on a 4 KiB boundary at least the image's size into the slot; then in the partition's last
512 bytes a trailer, little-endian: magic ``RBSLTIX1``, u64 body length, the image's sha256
(32 bytes), the body's sha256 (32 bytes), u32 CRC32 of all of it before. The body is written
and synced before the trailer, so a cut leaves an old trailer (whose image sha256 no longer
matches the slot state), a torn one (bad CRC), or the whole record. A slot rsync mode fills
loses the record: mke2fs zeroes the partition's end (as it does to old RAID superblocks),
which tests/integration/test_rsync.py pins.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from .delta import MAX_INDEX, BlockIndex, Slot, parse_body
from .errors import UpdaterError

MAGIC = b"RBSLTIX1"
TRAILER = struct.Struct("<8sQ32s32s")
CRC = struct.Struct("<I")
SECTOR = 512
ALIGN = 4096


def body_start(capacity: int, length: int) -> int:
    """Where a body of ``length`` bytes starts in a slot of ``capacity``: aligned down, before the trailer."""
    return (capacity - SECTOR - length) // ALIGN * ALIGN


def store(slot: Slot, image_size: int, image_sha256: str, index: BlockIndex, sync) -> str | None:
    """Keep ``index`` behind the image in ``slot``; None, or why there is no room."""
    body = index.body()
    start = body_start(slot.capacity, len(body))
    if start < image_size:
        return f"{len(body)} bytes of index do not fit between the image and the slot's end"
    slot.write(start, body)
    sync()
    head = TRAILER.pack(MAGIC, len(body), bytes.fromhex(image_sha256), bytes.fromhex(index.plain_sha256))
    slot.write(slot.capacity - SECTOR, head + CRC.pack(zlib.crc32(head)))
    sync()
    return None


def load(slot: Slot, image_sha256: str, *, where: str) -> BlockIndex:
    """The index kept in ``slot`` for the image ``image_sha256``; UpdaterError, saying why, when
    there is none (never written, another image's, torn, damaged)."""
    if slot.capacity < SECTOR + ALIGN:
        raise UpdaterError(f"{where}: no room for a kept index")
    raw = slot.read(slot.capacity - SECTOR, SECTOR)
    head = raw[: TRAILER.size]
    magic, length, image, digest = TRAILER.unpack(head)
    if magic != MAGIC:
        raise UpdaterError(f"{where}: no kept index")
    if CRC.unpack_from(raw, TRAILER.size)[0] != zlib.crc32(head):
        raise UpdaterError(f"{where}: the kept index's trailer is damaged")
    if image.hex() != image_sha256:
        raise UpdaterError(f"{where}: the kept index is of another image")
    start = body_start(slot.capacity, length)
    if not 0 < length <= MAX_INDEX or start < 0:
        raise UpdaterError(f"{where}: the kept index's length {length} does not fit the slot")
    body = slot.read(start, length)
    if hashlib.sha256(body).digest() != digest:
        raise UpdaterError(f"{where}: the kept index does not match its trailer's sha256")
    return parse_body(body, where=where)
