"""The SD card image and its bmap: MBR, FAT32 contents, same bytes from same inputs, bmaptool's view."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.firmware import bmap, sdcard
from rackboot.initramfs.updater import bootfiles, mbr

MIB = 1 << 20
START_MIB, SIZE_MIB = 4, 80  # boot areas of 40 MiB: FAT32 under mtools needs 33 or more
AREA_MIB = SIZE_MIB // 2
SIGNATURE, VOLUME_ID = 0x7261636B, 0xC0FFEE42
FILES = {
    "config.txt": b"arm_64bit=1\nkernel=u-boot.bin\n",
    "Image": bytes(range(256)) * 1500 + b"tail",
    "dtbs/x.dtb": b"\xd0\x0d\xfe\xed" + bytes(range(200)) * 30,
    "overlays/deep/er.dtbo": b"nested twice\n",
}
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def make_card(out: Path, files=FILES, **kw) -> Path:
    args = (
        dict(
            boot_size_mib=SIZE_MIB,
            boot_start_mib=START_MIB,
            disk_signature=SIGNATURE,
            volume_id=VOLUME_ID,
            mtime=1_700_000_000,
        )
        | kw
    )
    sdcard.build_sdcard(out, dict(files), **args)
    return out


@pytest.fixture
def card(tmp_path) -> Path:
    return make_card(tmp_path / "sdcard.img")


@pytest.fixture(scope="module")
def bmaptool() -> str:
    if not shutil.which("bmaptool"):
        subprocess.run(["apt-get", "install", "-y", "-q", "bmap-tools"], capture_output=True)
    if not shutil.which("bmaptool"):
        pytest.skip("bmaptool is missing and `apt-get install bmap-tools` could not install it")
    return shutil.which("bmaptool")


def mtools(tool: str, image: Path, *args: str) -> bytes:
    done = subprocess.run([tool, "-i", f"{image}@@{START_MIB * MIB}", *args], capture_output=True, env=MTOOLS_ENV)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def block_map(text: str) -> tuple[int, list[tuple[int, int, str]]]:
    """(MappedBlocksCount, [(first, last, sha256)]) of a bmap document."""
    root = ET.fromstring(text)
    assert root.tag == "bmap" and root.get("version") == "2.0"
    ranges = []
    for r in root.find("BlockMap"):
        first, _, last = r.text.strip().partition("-")
        ranges.append((int(first), int(last or first), r.get("chksum")))
    return int(root.findtext("MappedBlocksCount")), ranges


def test_mbr_has_one_fat32_partition_on_area_a_and_a_zero_gap_before_it(card):
    data = card.read_bytes()
    assert len(data) == (START_MIB + SIZE_MIB) * MIB
    table = mbr.parse(data[: mbr.SECTOR])
    assert table.signature == SIGNATURE
    assert [(e.number, e.type, e.start, e.sectors, e.bootable) for e in table.entries] == [
        (1, 0x0C, START_MIB * MIB // 512, AREA_MIB * MIB // 512, True)
    ]
    record = bootfiles.RECORD
    gap = data[mbr.SECTOR : record] + data[record + mbr.SECTOR : START_MIB * MIB]
    assert gap == bytes(START_MIB * MIB - 2 * mbr.SECTOR), "slot-state gap is not zero"
    fat = data[START_MIB * MIB : (START_MIB + AREA_MIB) * MIB]
    digest = hashlib.sha256(fat).hexdigest()
    assert bootfiles.decode_record(data[record : record + mbr.SECTOR]) == bootfiles.BootRecord(
        START_MIB * 2048, AREA_MIB * 2048, AREA_MIB * MIB, digest, digest[:16]
    )
    assert data[(START_MIB + AREA_MIB) * MIB :] == bytes(AREA_MIB * MIB)
    assert bmap.mapped_ranges(card)[-1][1] < (START_MIB + AREA_MIB) * MIB // bmap.BLOCK, "area B is a hole"
    ranges = bmap.mapped_ranges(card)
    assert ranges[0][0] == 0 and ranges[0][1] >= START_MIB * MIB // bmap.BLOCK - 1, "gap must be written, not a hole"


def test_partition_start_and_size_follow_the_arguments(tmp_path):
    data = make_card(tmp_path / "c.img", boot_start_mib=1, boot_size_mib=73).read_bytes()
    (entry,) = mbr.parse(data[:512]).entries
    assert (entry.start * 512, entry.sectors * 512, len(data)) == (MIB, 36 * MIB, 74 * MIB)
    assert data[MIB + 510 : MIB + 512] == b"\x55\xaa" and data[MIB + 0x52 : MIB + 0x5A] == b"FAT32   "


@pytest.mark.parametrize("boot_type", [0x0B, 0x0E])
def test_boot_partition_type_is_the_one_passed(tmp_path, boot_type):
    """The plan carries the config's boot type; a card that always said 0c was refused by the
    updater as a boot partition the plan would change."""
    data = make_card(tmp_path / "c.img", boot_type=boot_type).read_bytes()
    (entry,) = mbr.parse(data[:512]).entries
    assert entry.type == boot_type


@pytest.mark.parametrize("boot_type", [0x05, 0x0F, 0x85, 0x83, 0x00])
def test_a_boot_type_the_firmware_cannot_read_is_one_line_and_writes_nothing(tmp_path, boot_type):
    out = tmp_path / "c.img"
    with pytest.raises(RackbootError, match=f"boot partition type {boot_type:02x} is not a FAT type"):
        make_card(out, boot_type=boot_type)
    assert not out.exists()


def test_fat32_passes_fsck_and_holds_every_file_byte_for_byte(card, tmp_path):
    part = tmp_path / "boot.vfat"
    part.write_bytes(card.read_bytes()[START_MIB * MIB : (START_MIB + AREA_MIB) * MIB])
    fsck = subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listed = set(mtools("mdir", card, "-/", "-b", "::/").decode().split())
    assert {f"::/{name}" for name in FILES} <= listed
    assert {"::/dtbs/", "::/overlays/", "::/overlays/deep/"} <= listed
    assert len(listed) == len(FILES) + 3, listed
    for name, content in FILES.items():
        assert mtools("mcopy", card, f"::/{name}", "-") == content, name


def test_volume_id_label_and_file_times_are_the_ones_passed(card):
    with open(card, "rb") as f:
        f.seek(START_MIB * MIB)
        boot = f.read(512)
    assert struct.unpack_from("<I", boot, 0x43)[0] == VOLUME_ID
    assert boot[0x47:0x52] == b"RACKBOOT   "
    times = re.findall(r"(\d{4}-\d\d-\d\d)\s+(\d+:\d\d)", mtools("mdir", card, "-/", "::/").decode())
    assert len(times) == 13 and set(times) == {("2023-11-14", "22:13")}, times  # mtime 1_700_000_000, in UTC


def test_same_inputs_same_bytes_whatever_mtimes_umask_and_timezone(tmp_path, monkeypatch):
    images = []
    for n, (umask, mtime, tz) in enumerate([(0o022, 1_000_000_000, "UTC0"), (0o077, 1_600_000_000, "EST5")]):
        src = tmp_path / f"src{n}"
        files = {}
        for name in sorted(FILES, reverse=bool(n)):  # insertion order differs too
            path = src / name.replace("/", "_")
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(FILES[name])
            os.utime(path, (mtime, mtime))
            files[name] = path
        monkeypatch.setenv("TZ", tz)
        old = os.umask(umask)
        try:
            images.append(make_card(tmp_path / f"card{n}.img", files).read_bytes())
        finally:
            os.umask(old)
    assert images[0] == images[1]
    changed = make_card(tmp_path / "changed.img", FILES | {"config.txt": b"arm_64bit=0\nkernel=u-boot.bin\n"})
    assert changed.read_bytes() != images[0]


@pytest.mark.parametrize("size", [AREA_MIB * MIB, (AREA_MIB - 2) * MIB + 1])
def test_file_too_large_for_the_partition_is_one_line_and_writes_nothing(tmp_path, size):
    big = tmp_path / "Image"
    with open(big, "wb") as f:
        f.truncate(size)
    out = tmp_path / "sdcard.img"
    with pytest.raises(
        RackbootError, match=rf"boot area \(half the {SIZE_MIB} MiB boot partition.*\) of {AREA_MIB} MiB is too small"
    ) as err:
        make_card(out, {"config.txt": b"x\n", "Image": big})
    assert "\n" not in str(err.value)
    assert not out.exists()


def sparse_file(path: Path) -> Path:
    """Data, a hole, a lone byte, a hole, and a partial last block: the shapes a bmap must get right."""
    with open(path, "wb") as f:
        f.write(b"head" * 3000)
        f.seek(3 * MIB + 7)
        f.write(b"!")
        f.seek(5 * MIB + 100)
        f.write(b"end")
    return path


@pytest.mark.parametrize("shape", ["card", "sparse"])
def test_bmap_ranges_and_checksums_agree_with_bmaptool_create(tmp_path, bmaptool, shape):
    image = make_card(tmp_path / "img") if shape == "card" else sparse_file(tmp_path / "img")
    ours = bmap.bmap_text(image)
    ref = subprocess.run([bmaptool, "create", str(image)], capture_output=True, text=True, check=True).stdout
    assert block_map(ours) == block_map(ref)
    for field in ("ImageSize", "BlockSize", "BlocksCount"):
        assert ET.fromstring(ours).findtext(field).strip() == ET.fromstring(ref).findtext(field).strip(), field
    assert block_map(ours)[0] < int(ET.fromstring(ours).findtext("BlocksCount")), "no holes: a weak comparison"


def test_bmaptool_copy_with_our_bmap_writes_every_mapped_range(card, tmp_path, bmaptool):
    ours = tmp_path / "sdcard.bmap"
    ours.write_text(bmap.bmap_text(card))
    dest = tmp_path / "old-card.img"
    dest.write_bytes(b"\xa5" * card.stat().st_size)  # a used card: old slot state and junk everywhere
    done = subprocess.run([bmaptool, "copy", str(card), str(dest), "--bmap", str(ours)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    image, written = card.read_bytes(), dest.read_bytes()
    for first, last, _ in block_map(ours.read_text())[1]:
        span = slice(first * bmap.BLOCK, (last + 1) * bmap.BLOCK)
        assert written[span] == image[span], (first, last)
    assert written[mbr.SECTOR : START_MIB * MIB] == image[mbr.SECTOR : START_MIB * MIB]  # zeros and the boot record
    assert bootfiles.decode_record(written[bootfiles.RECORD : bootfiles.RECORD + mbr.SECTOR]) is not None


def test_corrupted_mapped_byte_makes_bmaptool_copy_fail(card, tmp_path, bmaptool):
    ours = tmp_path / "sdcard.bmap"
    ours.write_text(bmap.bmap_text(card))
    with open(card, "r+b") as f:  # one flipped byte in the middle of the zero gap, a mapped range
        f.seek(START_MIB * MIB // 2)
        f.write(b"\x01")
    done = subprocess.run(
        [bmaptool, "copy", str(card), str(tmp_path / "dest.img"), "--bmap", str(ours)], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "checksum mismatch" in done.stderr.lower(), done.stderr


@pytest.mark.network
def test_built_card_bmap_is_ours_and_bmaptool_flashes_it(probe_build, tmp_path, bmaptool):
    image, ours = probe_build / "sdcard.img", probe_build / "sdcard.bmap"
    assert ours.read_text() == bmap.bmap_text(image)
    assert [e.type for e in mbr.parse(image.read_bytes()[:512]).entries] == [0x0C]
    done = subprocess.run(
        [bmaptool, "copy", str(image), str(tmp_path / "flashed.img"), "--bmap", str(ours)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "flashed.img").read_bytes() == image.read_bytes()
