"""record: the framing the slot state, the key record and the node key share."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import pytest
from rackboot.initramfs.updater import bootfiles, keyring, nodekey, record, state
from rackboot.initramfs.updater.errors import UpdaterError

MAGIC = b"TEST"
BODY = b'{"format":1,"seq":7}\n'


def test_a_frame_is_magic_seq_length_body_crc_and_reads_back():
    raw = record.frame(MAGIC, 7, BODY, 64)
    head = struct.pack("<4sII", MAGIC, 7, len(BODY)) + BODY
    assert raw == head + struct.pack("<I", zlib.crc32(head))
    assert record.unframe(MAGIC, raw, 64) == (7, BODY)
    assert record.unframe(MAGIC, raw + bytes(100), 1 << 10) == (7, BODY)  # the rest of the area


def test_a_frame_over_its_reserved_area_is_refused():
    size = 12 + len(BODY) + 4
    assert len(record.frame(MAGIC, 1, BODY, size)) == size
    with pytest.raises(UpdaterError, match=f"^slot state: record of {size} bytes exceeds {size - 1}$"):
        record.frame(MAGIC, 1, BODY, size - 1, what="slot state")


def test_a_torn_foreign_or_oversized_copy_reads_as_none():
    raw = record.frame(MAGIC, 7, BODY, 64)
    assert record.unframe(b"TESU", raw, 64) is None
    assert all(record.unframe(MAGIC, raw[:cut], 64) is None for cut in range(len(raw)))
    flipped = bytearray(raw)
    flipped[20] ^= 1
    assert record.unframe(MAGIC, bytes(flipped), 64) is None
    assert record.unframe(MAGIC, raw, len(raw) - 1) is None  # whole bytes, but longer than the area
    assert record.unframe(MAGIC, struct.pack("<4sII", MAGIC, 1, 1 << 31), 64) is None


def test_newer_format_names_only_a_whole_record_above_ours():
    assert record.newer_format(MAGIC, record.frame(MAGIC, 1, b'{"format":2}', 64), 64) == 2
    for body in (BODY, b'{"format":"2"}', b"[2]", b"not json"):
        assert record.newer_format(MAGIC, record.frame(MAGIC, 1, body, 64), 64) is None
    assert record.newer_format(MAGIC, record.frame(MAGIC, 1, b'{"format":2}', 64)[:-1], 64) is None
    ours, newer = record.frame(MAGIC, 1, BODY, 64), record.frame(MAGIC, 2, b'{"format":3}', 64)
    offsets = [1 << 20, (3 << 20) + (192 << 10)]
    assert record.newer(MAGIC, [ours, bytes(64)], offsets, 64) is None
    said = "the copy at 3 MiB + 192 KiB is format 3, newer than this updater reads (1)"
    assert record.newer(MAGIC, [ours, newer], offsets, 64) == said
    assert record.newer(MAGIC, [newer, newer[:-1]], offsets, 64) == said.replace("3 MiB + 192 KiB", "1 MiB")


@dataclass(frozen=True)
class Copy:
    seq: int


def test_newest_and_target_pick_by_seq():
    assert record.newest([None, None]) is None and record.target([None, None]) == 0
    assert record.newest([Copy(3), Copy(2)]) == Copy(3) and record.target([Copy(3), Copy(2)]) == 1
    assert record.newest([None, Copy(0)]) == Copy(0) and record.target([None, Copy(0)]) == 0
    assert record.target([Copy(4), None]) == 1 and record.target([Copy(5), Copy(5)]) == 0


def test_each_record_on_the_card_has_its_own_magic():
    """The node key once shared the key record's "RKBK": each passed the other's framing check."""
    magics = [state.MAGIC, keyring.MAGIC, nodekey.MAGIC, bootfiles.MAGIC]
    assert len(set(magics)) == len(magics)
