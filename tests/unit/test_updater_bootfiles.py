"""bootfiles: the boot areas' arithmetic, the one-sector MBR switch, the hash record, and the
boot manifest's parser (field-naming errors; fuzzing: only UpdaterError escapes)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import bootfiles, formats, mbr
from rackboot.initramfs.updater.errors import UpdaterError

MIB_S = 2048  # sectors per MiB
MANIFEST = {
    "format": 1,
    "build": "0123456789abcdef",
    "size": 64 << 20,
    "sha256": "ab" * 32,
    "crc32": "0badf00d",
    "compression": "gzip",
    "stream": "boot.vfat.gz",
    "stream_size": 12345,
    "stream_sha256": "cd" * 32,
}
RECORD = bootfiles.BootRecord(68 * MIB_S, 64 * MIB_S, 64 << 20, "ef" * 32, "0123456789abcdef")


def card_table(boot_start: int, boot_sectors: int) -> mbr.Mbr:
    return mbr.Mbr(
        0x7261636B,
        (
            mbr.Entry(1, 0x0C, boot_start, boot_sectors, bootable=True),
            mbr.Entry(2, 0x83, 132 * MIB_S, 256 * MIB_S),
            mbr.Entry(3, 0x83, 388 * MIB_S, 256 * MIB_S),
            mbr.Entry(4, 0x83, 644 * MIB_S, 380 * MIB_S),
        ),
        bytes(range(256)) + bytes(184),
    )


def test_areas_are_the_halves_of_the_region_in_whole_mib():
    assert bootfiles.areas(4 * MIB_S, 128 * MIB_S) == {"a": (4 * MIB_S, 64 * MIB_S), "b": (68 * MIB_S, 64 * MIB_S)}
    assert bootfiles.areas(4 * MIB_S, 129 * MIB_S)["b"] == (68 * MIB_S, 64 * MIB_S)  # the odd MiB stays unused
    with pytest.raises(UpdaterError, match="no room for two boot areas of FAT32 \\(33 MiB each\\)"):
        bootfiles.areas(4 * MIB_S, 64 * MIB_S)


@pytest.mark.parametrize(
    "start, sectors, which",
    [(4, 64, "a"), (68, 64, "b"), (4, 128, "whole"), (4, 32, None), (68, 60, None), (8, 64, None)],
)
def test_which_area_entry_1_points_at(start, sectors, which):
    entry = mbr.Entry(1, 0x0C, start * MIB_S, sectors * MIB_S, bootable=True)
    assert bootfiles.which_area(entry, 4 * MIB_S, 128 * MIB_S) == which
    assert bootfiles.which_area(None, 4 * MIB_S, 128 * MIB_S) is None


def test_the_switch_is_one_sector_that_changes_only_entry_1():
    old = card_table(4 * MIB_S, 64 * MIB_S)
    new = bootfiles.switched(old, 68 * MIB_S, 64 * MIB_S)
    before, after = mbr.dump(old), mbr.dump(new)
    assert len(after) == mbr.SECTOR == 512
    changed = [i for i in range(512) if before[i] != after[i]]
    assert changed and all(446 <= i < 462 for i in changed)  # entry 1's 16 bytes: boot code, signature, slots kept
    parsed = mbr.parse(after)
    assert parsed.entry(1) == mbr.Entry(1, 0x0C, 68 * MIB_S, 64 * MIB_S, bootable=True)
    assert parsed.entries[1:] == old.entries[1:] and parsed.boot_code == old.boot_code
    assert bootfiles.switched(new, 4 * MIB_S, 64 * MIB_S) == old


def test_record_round_trips_in_one_sector():
    raw = bootfiles.encode_record(RECORD)
    assert len(raw) == 512 and raw[:4] == b"RKBA"
    assert bootfiles.decode_record(raw) == RECORD


def test_a_torn_blank_or_foreign_record_reads_as_none():
    raw = bytearray(bootfiles.encode_record(RECORD))
    assert bootfiles.decode_record(bytes(512)) is None
    assert bootfiles.decode_record(b"RKBS" + bytes(raw[4:])) is None
    for at in (5, 20, 100):
        torn = bytearray(raw)
        torn[at] ^= 0x01
        assert bootfiles.decode_record(bytes(torn)) is None, at
    huge = bytearray(raw)
    huge[4:8] = (1 << 31).to_bytes(4, "little")
    assert bootfiles.decode_record(bytes(huge)) is None


def test_record_lies_in_the_gap_clear_of_the_slot_state_and_the_confirmation_sector():
    from rackboot.initramfs.updater import state

    taken = [(c, c + state.RESERVED) for c in state.COPIES] + [(state.CONFIRM, state.CONFIRM + 512)]
    assert all(not (a < bootfiles.RECORD + 512 and b > bootfiles.RECORD) for a, b in taken)
    assert bootfiles.RECORD + 512 <= formats.MIN_START_MIB << 20


def test_manifest_round_trips_canonically():
    data = formats.dump(MANIFEST)
    manifest = bootfiles.parse_boot_manifest(data)
    assert formats.dump(manifest) == data and manifest.as_image().size == 64 << 20


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("format", 2, "boot manifest: format: unsupported format 2"),
        ("build", "xyz", "boot manifest: build: 'xyz' is not 16 lowercase hex digits"),
        ("size", 100, "boot manifest: size: must be >= 512"),
        ("sha256", "AB" * 32, "boot manifest: sha256: "),
        ("compression", "zstd", "boot manifest: compression: must be one of gzip, none"),
        ("stream", "../boot.vfat.gz", "boot manifest: stream: '../boot.vfat.gz' is not a plain file name"),
        ("stream_size", 0, "boot manifest: stream_size: must be >= 1"),
    ],
)
def test_a_bad_field_is_one_line_naming_it(field, value, message):
    with pytest.raises(UpdaterError) as e:
        bootfiles.parse_boot_manifest(json.dumps({**MANIFEST, field: value}))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_missing_field_is_named():
    with pytest.raises(UpdaterError, match="^boot manifest: sha256: missing$"):
        bootfiles.parse_boot_manifest(json.dumps({k: v for k, v in MANIFEST.items() if k != "sha256"}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    for parse in (bootfiles.parse_boot_manifest, bootfiles.decode_record):
        try:
            parse(data)
        except UpdaterError:
            pass


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["gzip", "none", "0123456789abcdef", "ab" * 32, "boot.vfat.gz"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(MANIFEST) + ["extra"]), json_values), max_size=4))
def test_fuzz_structured_mutations(changes):
    data = json.dumps({**MANIFEST, **dict(changes)}).encode()
    try:
        manifest = bootfiles.parse_boot_manifest(data)
    except UpdaterError:
        return
    assert bootfiles.parse_boot_manifest(formats.dump(manifest)) == manifest  # whatever parses, round trips


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=6))
def test_fuzz_record_bytes(flips):
    raw = bytearray(bootfiles.encode_record(RECORD))
    for at, value in flips:
        raw[at] = value
    record = bootfiles.decode_record(bytes(raw))
    assert record is None or bootfiles.encode_record(record)[:4] == b"RKBA"


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=512, max_size=512), st.integers(1, 200_000))
def test_fuzz_the_old_cards_fat_reader(sector, half):
    """Whatever a card's first boot sector holds, the FAT reader says "room" or why not, or
    fails with one UpdaterError line (a read past the card); it never raises anything else."""
    import tempfile

    from rackboot.initramfs.updater.disk import Disk

    with tempfile.NamedTemporaryFile() as f:
        f.truncate(8 << 20)
        with Disk(f.name) as d:
            d.write(0, sector)
            entry = mbr.Entry(1, 0x0C, 0, 16384, bootable=True)
            try:
                verdict = bootfiles.fat_upper_half_in_use(d, entry, half)
            except UpdaterError:
                return
            assert verdict is None or isinstance(verdict, str)
            if sector[510:512] != b"\x55\xaa":
                assert verdict is not None  # no FAT there: never "room"
