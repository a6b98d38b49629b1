"""Slot state on the card: two redundant records in the gap before the first partition.

Record (little-endian): magic "RKBS", u32 seq, u32 len, <len> bytes of canonical JSON,
u32 CRC32 of everything before it. Copies live at 1 MiB and 2 MiB (64 KiB each).
A write goes to the copy holding the older seq and is fsynced; a reader takes the
valid copy with the highest seq. A power cut tears at most the copy being written,
so the reader still finds the other one: the old state or the new, never neither.
The body is a SlotState; rev3 adds the newest serialled plan acted on (binding.py), and
a record without one (rev2, rev1) reads as a card that never took one.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import replace

from . import formats
from .disk import Disk
from .errors import UpdaterError
from .formats import SlotState

MAGIC = b"RKBS"
COPIES = (1 << 20, 2 << 20)
CONFIRM = 3 << 20  # one sector the booted system writes with rackboot-mark-good
CONFIRM_WORD = "rackboot-good"
RESERVED = 64 << 10
_HEAD = struct.Struct("<4sII")
_CRC = struct.Struct("<I")


def encode(state: SlotState) -> bytes:
    body = formats.dump(state)
    formats.parse_slot_state(body)  # never store what a reader would throw away as invalid
    head = _HEAD.pack(MAGIC, state.seq, len(body)) + body
    record = head + _CRC.pack(zlib.crc32(head))
    if len(record) > RESERVED:
        raise UpdaterError(f"slot state: record of {len(record)} bytes exceeds {RESERVED}")
    return record


class NewerState(UpdaterError):
    """The card's state was written by a newer updater: reading it as blank would lose it."""


def _body(raw: bytes) -> tuple[int, bytes] | None:
    """A whole record's (seq, body), or None when the copy is torn, blank or not ours."""
    if len(raw) < _HEAD.size or raw[:4] != MAGIC:
        return None
    _, seq, length = _HEAD.unpack_from(raw)
    end = _HEAD.size + length
    if end + _CRC.size > len(raw) or end + _CRC.size > RESERVED:
        return None
    if _CRC.unpack_from(raw, end)[0] != zlib.crc32(raw[:end]):
        return None
    return seq, raw[_HEAD.size : end]


def decode(raw: bytes) -> SlotState | None:
    """A record's state, or None when the copy is torn, blank or otherwise invalid."""
    whole = _body(raw)
    if whole is None:
        return None
    seq, body = whole
    try:
        state = formats.parse_slot_state(body)
    except UpdaterError:
        return None
    return state if state.seq == seq else None


def newer_format(raw: bytes) -> int | None:
    """The format number of a whole record that a newer updater wrote, else None."""
    whole = _body(raw)
    try:
        value = json.loads(whole[1]).get("format") if whole else None
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int and value > formats.FORMAT else None


def read_copies(disk: Disk) -> tuple[SlotState | None, ...]:
    """Each copy's state; a whole copy of a newer format stops everything (NewerState):
    this updater cannot tell which slot it calls good, and must not write over it."""
    raws = [disk.read(offset, RESERVED) for offset in COPIES]
    for offset, raw in zip(COPIES, raws, strict=True):
        newer = newer_format(raw)
        if newer is not None:
            raise NewerState(
                f"slot state: the copy at {offset >> 20} MiB is format {newer}, newer than "
                f"this updater reads ({formats.FORMAT}); the card is left as it is until "
                "the worker boots a newer initramfs"
            )
    return tuple(decode(raw) for raw in raws)


def pick(copies: tuple[SlotState | None, ...]) -> SlotState:
    """The valid copy with the highest seq; a card with none starts empty at seq 0."""
    valid = [c for c in copies if c is not None]
    return max(valid, key=lambda c: c.seq) if valid else SlotState()


def read(disk: Disk) -> SlotState:
    return pick(read_copies(disk))


def target_copy(copies: tuple[SlotState | None, ...]) -> int:
    """Index of the copy to overwrite: an invalid one, else the one with the older seq."""
    seqs = [c.seq if c is not None else -1 for c in copies]
    return seqs.index(min(seqs))


def write(disk: Disk, state: SlotState) -> SlotState:
    """Store `state` with the next seq over the older copy; returns what was stored."""
    copies = read_copies(disk)
    seq = max((c.seq for c in copies if c is not None), default=0) + 1
    stored = replace(state, seq=seq, slots=dict(state.slots))
    disk.write(COPIES[target_copy(copies)], encode(stored))
    disk.fsync()
    return stored
