"""state: redundant records survive a torn write at every byte."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Slot, SlotState

H = "ab" * 32


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    with Disk(str(path)) as d:
        yield d


def good(version: int) -> SlotState:
    slot = "a" if version % 2 else "b"
    return SlotState(slots={slot: Slot("good", "example", version, H, 2)}, primary=slot, last_good=slot)


def test_blank_card_reads_as_empty(disk):
    assert state.read(disk) == SlotState()


def test_writes_alternate_copies_and_seq_grows(disk):
    first = state.write(disk, good(1))
    second = state.write(disk, good(2))
    assert (first.seq, second.seq) == (1, 2)
    copies = state.read_copies(disk)
    assert copies[0] == first and copies[1] == second
    assert state.read(disk) == second
    third = state.write(disk, good(3))
    assert state.read_copies(disk) == (third, second) and state.read(disk).primary == "a"


def test_record_layout(disk):
    record = state.encode(state.write(disk, good(1)))
    assert record[:4] == b"RKBS" and int.from_bytes(record[4:8], "little") == 1
    assert disk.read(state.COPIES[0], len(record)) == record


def test_corrupt_newest_copy_falls_back_to_the_other(disk):
    state.write(disk, good(1))
    state.write(disk, good(2))
    disk.write(state.COPIES[1] + 20, b"X")
    assert state.read(disk).seq == 1
    assert state.write(disk, good(3)).seq == 2  # the invalid copy is rewritten, seq continues


@pytest.mark.parametrize("history", [0, 1, 2])
def test_torn_write_at_every_byte_leaves_old_or_new(disk, history):
    for v in range(1, history + 1):
        state.write(disk, good(v))
    old = state.read(disk)
    copies = state.read_copies(disk)
    target = state.COPIES[state.target_copy(copies)]
    new = SlotState(seq=old.seq + 1, slots={"b": Slot("good", "example", 9, H, 3)}, primary="b", last_good="b")
    record = state.encode(new)
    saved = disk.read(target, state.RESERVED)
    for cut in range(len(record) + 1):
        disk.write(target, saved)
        disk.write(target, record[:cut])  # the power went out after `cut` bytes
        got = state.read(disk)
        assert got == (new if cut == len(record) else old), cut


def test_torn_write_through_the_real_writer(disk, monkeypatch):
    state.write(disk, good(1))
    state.write(disk, good(2))
    old = state.read(disk)
    real = Disk.write
    for cut in (0, 1, 11, 12, 100, 200):

        def torn(self, offset, data, cut=cut):
            real(self, offset, bytes(data)[:cut])
            raise OSError("power cut")

        monkeypatch.setattr(Disk, "write", torn)
        with pytest.raises(OSError):
            state.write(disk, good(3))
        monkeypatch.setattr(Disk, "write", real)
        assert state.read(disk) == old


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_is_a_state_or_none(raw):
    got = state.decode(state.MAGIC + raw)
    assert got is None or isinstance(got, SlotState)


def test_a_state_a_reader_would_discard_is_never_written(disk):
    state.write(disk, good(1))
    inconsistent = SlotState(slots={"a": Slot("writing", "example", 2, H, 2)}, primary="a")
    with pytest.raises(UpdaterError, match="slot state: primary: 'a' is not a good or trial slot"):
        state.write(disk, inconsistent)
    assert state.read(disk).slot("a").state == "good"  # the card still says what it said


def test_a_copy_of_a_newer_format_stops_reads_and_writes(disk):
    """A card that a newer updater wrote is not blank to an older one: neither read as
    empty (the card would be laid out and installed afresh) nor written over."""
    state.write(disk, good(1))
    body = b'{"format":2,"seq":2,"slots":{}}\n'
    head = struct.pack("<4sII", state.MAGIC, 2, len(body)) + body
    disk.write(state.COPIES[1], head + struct.pack("<I", zlib.crc32(head)))
    before = disk.read(0, 4 << 20)
    with pytest.raises(
        state.NewerState, match=r"^slot state: the copy at 2 MiB is format 2, newer than this updater reads \(1\)"
    ):
        state.read(disk)
    with pytest.raises(state.NewerState):
        state.write(disk, good(3))
    assert disk.read(0, 4 << 20) == before
