"""Slot state on the card: two redundant records in the gap before the first partition.

Record: framed as record.py describes, magic "RKBS"; copies at 1 MiB and 2 MiB (64 KiB each).
A write goes to the copy holding the older seq and is fsynced; a reader takes the
valid copy with the highest seq. A power cut tears at most the copy being written,
so the reader still finds the other one: the old state or the new, never neither.
The body is a SlotState; rev3 adds the newest serialled plan acted on (binding.py), and
a record without one (rev2, rev1) reads as a card that never took one.
"""

from __future__ import annotations

from dataclasses import replace

from . import formats, record
from .disk import Disk
from .errors import UpdaterError
from .formats import SlotState

MAGIC = b"RKBS"
COPIES = (1 << 20, 2 << 20)
CONFIRM = 3 << 20  # one sector the booted system writes with rackboot-mark-good
CONFIRM_WORD = "rackboot-good"
RESERVED = 64 << 10


def encode(state: SlotState) -> bytes:
    body = formats.dump(state)
    formats.parse_slot_state(body)  # never store what a reader would throw away as invalid
    return record.frame(MAGIC, state.seq, body, RESERVED, what="slot state")


class NewerState(UpdaterError):
    """The card's state was written by a newer updater: reading it as blank would lose it."""


def decode(raw: bytes) -> SlotState | None:
    """A record's state, or None when the copy is torn, blank or otherwise invalid."""
    whole = record.unframe(MAGIC, raw, RESERVED)
    if whole is None:
        return None
    seq, body = whole
    try:
        state = formats.parse_slot_state(body)
    except UpdaterError:
        return None
    return state if state.seq == seq else None


def read_copies(disk: Disk) -> tuple[SlotState | None, ...]:
    """Each copy's state; a whole copy of a newer format stops everything (NewerState):
    this updater cannot tell which slot it calls good, and must not write over it."""
    raws = [disk.read(offset, RESERVED) for offset in COPIES]
    newer = record.newer(MAGIC, raws, COPIES, RESERVED)
    if newer is not None:
        raise NewerState(f"slot state: {newer}; the card is left as it is until the worker boots a newer initramfs")
    return tuple(decode(raw) for raw in raws)


def pick(copies: tuple[SlotState | None, ...]) -> SlotState:
    """The valid copy with the highest seq; a card with none starts empty at seq 0."""
    newest = record.newest(copies)
    return newest if newest is not None else SlotState()


def read(disk: Disk) -> SlotState:
    return pick(read_copies(disk))


def target_copy(copies: tuple[SlotState | None, ...]) -> int:
    """Index of the copy to overwrite: an invalid one, else the one with the older seq."""
    return record.target(copies)


def write(disk: Disk, state: SlotState) -> SlotState:
    """Store `state` with the next seq over the older copy; returns what was stored."""
    copies = read_copies(disk)
    seq = max((c.seq for c in copies if c is not None), default=0) + 1
    stored = replace(state, seq=seq, slots=dict(state.slots))
    disk.write(COPIES[target_copy(copies)], encode(stored))
    disk.fsync()
    return stored
