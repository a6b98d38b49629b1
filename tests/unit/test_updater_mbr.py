"""mbr: byte layout checked against sfdisk, round trips, and clear refusals."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import mbr
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.mbr import Entry, Mbr

TABLE = Mbr(
    0x12345678,
    (Entry(1, 0x0C, 8192, 32768, bootable=True), Entry(2, 0x83, 40960, 131072), Entry(4, 0x83, 172032, 100000)),
)


def test_round_trip_keeps_entries_signature_and_boot_code():
    code = bytes(range(256)) + bytes(184)
    table = Mbr(TABLE.signature, TABLE.entries, code)
    sector = mbr.dump(table)
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa" and sector[:440] == code
    assert mbr.parse(sector) == table


def test_entry_bytes():
    sector = mbr.dump(TABLE)
    assert struct.unpack_from("<I", sector, 440)[0] == 0x12345678
    assert sector[446:462] == bytes([0x80, 0xFE, 0xFF, 0xFF, 0x0C, 0xFE, 0xFF, 0xFF]) + struct.pack("<II", 8192, 32768)
    assert sector[446 + 32 : 446 + 48] == bytes(16)  # entry 3 unused


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")
def test_sfdisk_reads_what_we_write(tmp_path):
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(300000 * 512)
        f.write(mbr.dump(TABLE))
    out = subprocess.run(["sfdisk", "--dump", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "label-id: 0x12345678" in out
    assert f"{disk}1 : start=        8192, size=       32768, type=c, bootable" in out
    assert f"{disk}2 : start=       40960, size=      131072, type=83" in out
    assert f"{disk}4 : start=      172032, size=      100000, type=83" in out


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")
def test_we_read_what_sfdisk_writes(tmp_path):
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    script = "label: dos\nlabel-id: 0xcafe0001\nstart=2048, size=4096, type=c, bootable\nstart=6144, type=83\n"
    subprocess.run(["sfdisk", "--no-reread", "-q", str(disk)], input=script, text=True, check=True)
    table = mbr.parse(disk.read_bytes()[:512])
    assert table.signature == 0xCAFE0001
    assert table.entries == (Entry(1, 0x0C, 2048, 4096, True), Entry(2, 0x83, 6144, (64 << 11) - 6144))


def test_blank_sector_has_no_table():
    with pytest.raises(UpdaterError, match="no 55aa boot signature"):
        mbr.parse(bytes(512))


@pytest.mark.parametrize(
    "patch, message",
    [
        ((446 + 4, 0xEE), "GPT protective"),
        ((446 + 4, 0x05), "extended partitions"),
        ((446, 0x12), "status byte 0x12"),
    ],
)
def test_refusals(patch, message):
    sector = bytearray(mbr.dump(TABLE))
    sector[patch[0]] = patch[1]
    with pytest.raises(UpdaterError, match=message):
        mbr.parse(bytes(sector))


def test_overlap_is_refused_both_ways():
    overlapping = Mbr(1, (Entry(1, 0x83, 2048, 4096), Entry(2, 0x83, 4096, 4096)))
    with pytest.raises(UpdaterError, match="partitions 1 and 2 overlap"):
        mbr.dump(overlapping)
    sector = bytearray(mbr.dump(TABLE))
    struct.pack_into("<I", sector, 446 + 16 + 8, 8192)  # entry 2 starts inside entry 1
    with pytest.raises(UpdaterError, match="overlap"):
        mbr.parse(bytes(sector))


def test_dump_validates_numbers_and_limits():
    with pytest.raises(UpdaterError, match="only primaries"):
        mbr.dump(Mbr(1, (Entry(5, 0x83, 2048, 1),)))
    with pytest.raises(UpdaterError, match="2 TiB"):
        mbr.dump(Mbr(1, (Entry(1, 0x83, 2048, 1 << 32),)))


def test_short_input():
    with pytest.raises(UpdaterError, match="need 512 bytes, got 3"):
        mbr.parse(b"abc")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_fuzz_parse_raises_only_updater_error_and_round_trips(sector):
    sector = bytearray(sector)
    sector[510:512] = b"\x55\xaa"
    try:
        table = mbr.parse(bytes(sector))
    except UpdaterError:
        return
    assert mbr.parse(mbr.dump(table)) == table
