"""The framing every updater record on the card shares: the slot state (state.py, magic
"RKBS"), the master key record (keyring.py, "RKBK") and the node key (nodekey.py, "RKBN").

Record (little-endian): a 4-byte magic, u32 seq, u32 len, <len> bytes of canonical JSON,
u32 CRC32 of everything before it; the whole record fits the copy's reserved area, whose
rest is left as it was. Each record is kept in two copies, each in its own reserved area
of the card's first 4 MiB, so that a power cut tears at most the copy being written. A copy
whose magic, length or CRC fails is torn, blank or not this record's: the reader ignores it.
What the body means is each record's own, and so is the order the copies are written in:
the slot state and the key record overwrite the invalid or older copy (``target``), the
node key writes copy 1, then copy 2. Every reader takes the valid copy with the highest
seq (``newest``), and a whole copy of a newer format stops it (``newer``).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

from .errors import UpdaterError
from .formats import FORMAT

HEAD = struct.Struct("<4sII")  # magic, seq, body length
CRC = struct.Struct("<I")


def frame(magic: bytes, seq: int, body: bytes, reserved: int, *, what: str = "record") -> bytes:
    """The record's bytes; UpdaterError when they would not fit its reserved area."""
    head = HEAD.pack(magic, seq, len(body)) + body
    raw = head + CRC.pack(zlib.crc32(head))
    if len(raw) > reserved:
        raise UpdaterError(f"{what}: record of {len(raw)} bytes exceeds {reserved}")
    return raw


def unframe(magic: bytes, raw: bytes, reserved: int) -> tuple[int, bytes] | None:
    """A whole record's (seq, body), or None when the copy is torn, blank or not ``magic``'s."""
    if len(raw) < HEAD.size or raw[:4] != magic:
        return None
    _, seq, length = HEAD.unpack_from(raw)
    end = HEAD.size + length
    if end + CRC.size > min(len(raw), reserved) or CRC.unpack_from(raw, end)[0] != zlib.crc32(raw[:end]):
        return None
    return seq, raw[HEAD.size : end]


def newer_format(magic: bytes, raw: bytes, reserved: int) -> int | None:
    """The ``format`` of a whole record that a newer updater wrote, else None."""
    whole = unframe(magic, raw, reserved)
    try:
        value = json.loads(whole[1]).get("format") if whole else None
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int and value > FORMAT else None


def place(offset: int) -> str:
    """Where a copy lives, as notes/formats.md says it: '2 MiB', '3 MiB + 128 KiB'."""
    kib = (offset % (1 << 20)) >> 10
    return f"{offset >> 20} MiB" + (f" + {kib} KiB" if kib else "")


def newer(magic: bytes, raws: Sequence[bytes], offsets: Sequence[int], reserved: int) -> str | None:
    """What is wrong when a whole copy (the first such) was written by a newer updater, else
    None: such a card is left as it is, neither read as blank nor written over."""
    for raw, offset in zip(raws, offsets, strict=True):
        found = newer_format(magic, raw, reserved)
        if found is not None:
            return f"the copy at {place(offset)} is format {found}, newer than this updater reads ({FORMAT})"
    return None


class _Counted(Protocol):
    @property
    def seq(self) -> int: ...


C = TypeVar("C", bound=_Counted)


def newest(copies: Sequence[C | None]) -> C | None:
    """The valid copy (not None) with the highest seq, the first of equals; None when none is."""
    valid = [c for c in copies if c is not None]
    return max(valid, key=lambda c: c.seq) if valid else None


def target(copies: Sequence[_Counted | None]) -> int:
    """Index of the copy to overwrite: an invalid one, else the one with the older seq."""
    seqs = [c.seq if c is not None else -1 for c in copies]
    return seqs.index(min(seqs))
