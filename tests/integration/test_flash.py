"""`rackboot flash` on real block devices: loop devices (losetup) this test makes, the
machine's own root disk, and pyudev's records of them. This machine's kernel has no
scsi_debug (it loads no modules) and reads no partition tables (no MSDOS_PARTITION), so
no device here calls itself removable and no card here has partitions: the write path runs on
loop devices through write_card and --loop's judge, and the rules are checked on the
records pyudev gives for them. Nothing mocks a write: every byte goes through a block
device and is read back from it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.firmware import bmap, flash

BLOCK = bmap.BLOCK
PATTERN = b"\xaa"  # what the "old card" holds where the image maps nothing


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the flash tests make loop devices: run them as root (make test does)")


class LoopDevice:
    def __init__(self, backing: Path, *, read_only: bool = False):
        need_root()
        args = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(backing)]
        self.node = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()

    def close(self) -> None:
        subprocess.run(["losetup", "-d", self.node], check=False)


@pytest.fixture
def loops():
    made: list[LoopDevice] = []

    def attach(backing: Path, **options) -> str:
        made.append(LoopDevice(backing, **options))
        return made[-1].node

    yield attach
    for loop in made:
        loop.close()


def old_card(path: Path, mib: int) -> Path:
    path.write_bytes(PATTERN * (mib << 20))
    return path


def sparse_image(path: Path) -> tuple[Path, bmap.BlockMap]:
    """A 4 MiB image with data in three places and holes between, and its bmap."""
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        for offset, data in ((0, b"MBR!" * 128), (BLOCK * 10, os.urandom(BLOCK * 3)), ((4 << 20) - 100, b"z" * 100)):
            f.seek(offset)
            f.write(data)
    text = bmap.bmap_text(path)
    (path.with_suffix(".bmap")).write_text(text)
    return path, bmap.read_bmap(path.with_suffix(".bmap"))


def test_bmap_reads_back_what_build_writes_and_refuses_an_edited_one(tmp_path):
    image, block_map = sparse_image(tmp_path / "card.img")
    assert [(r.first, r.last) for r in block_map.ranges] == bmap.mapped_ranges(image)
    assert block_map.image_size == 4 << 20 and block_map.block_size == BLOCK
    assert block_map.mapped_bytes == sum((last - first + 1) * BLOCK for first, last in bmap.mapped_ranges(image))
    edited = tmp_path / "edited.bmap"
    edited.write_text(image.with_suffix(".bmap").read_text().replace(" 10-12 ", " 10-13 "))
    with pytest.raises(RackbootError, match="BmapFileChecksum does not match"):
        bmap.read_bmap(edited)


def test_write_card_writes_only_mapped_blocks_and_reads_them_back(tmp_path, loops):
    image, block_map = sparse_image(tmp_path / "card.img")
    backing = old_card(tmp_path / "old-card", 8)
    node = loops(backing)
    written = flash.write_card(image, block_map, node)
    assert written == block_map.mapped_bytes
    card = backing.read_bytes()
    source = image.read_bytes()
    for first, last in bmap.mapped_ranges(image):
        assert card[first * BLOCK : (last + 1) * BLOCK] == source[first * BLOCK : (last + 1) * BLOCK]
    assert card[BLOCK * 5 : BLOCK * 6] == PATTERN * BLOCK  # a hole of the image: left as the card had it
    assert card[4 << 20 :] == PATTERN * (4 << 20)  # past the image


def test_a_damaged_image_writes_nothing(tmp_path, loops):
    image, block_map = sparse_image(tmp_path / "card.img")
    with open(image, "r+b") as f:
        f.seek(BLOCK * 11)
        f.write(b"bitrot")
    backing = old_card(tmp_path / "old-card", 8)
    node = loops(backing)
    with pytest.raises(RackbootError, match="differ from its bmap"):
        flash.write_card(image, block_map, node)
    assert backing.read_bytes() == PATTERN * (8 << 20)


def test_a_card_not_holding_the_image_fails_verification(tmp_path, loops):
    _, block_map = sparse_image(tmp_path / "card.img")
    node = loops(old_card(tmp_path / "old-card", 8))
    with pytest.raises(RackbootError, match="blocks 0-0 read back differently"):
        flash.verify_card(node, block_map)


def test_a_read_only_card_and_a_too_small_one_are_refused_by_the_kernel_or_the_size_check(tmp_path, loops):
    image, block_map = sparse_image(tmp_path / "card.img")
    locked = loops(old_card(tmp_path / "locked", 8), read_only=True)
    reader = dataclasses.replace(flash.card(locked), removable=True)
    assert "read-only" in flash.refusal(reader, image_size=1, max_bytes=1 << 40, force=False)
    with pytest.raises(RackbootError, match=f"writing {locked}: Operation not permitted"):
        flash.write_card(image, block_map, locked)  # and the kernel would not have it either
    small = loops(old_card(tmp_path / "small", 2))
    with pytest.raises(RackbootError, match="smaller than the image"):
        flash.write_card(image, block_map, small)


def test_a_mounted_card_is_seen_as_mounted_and_the_kernel_will_not_open_it(tmp_path, loops):
    backing = tmp_path / "mounted-card"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
    node = loops(backing)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", node, str(mountpoint)], check=True)
    try:
        card = flash.card(node)
        assert card.mounted == (str(mountpoint),)
        as_reader = dataclasses.replace(card, removable=True)  # the rules past "removable"
        assert "mounted at" in flash.refusal(as_reader, image_size=1, max_bytes=1 << 40, force=True)
        image, block_map = sparse_image(tmp_path / "card.img")
        with pytest.raises(RackbootError, match="Device or resource busy"):
            flash.write_card(image, block_map, node)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_the_rules_on_real_device_records(tmp_path, loops):
    root = next(c for c in flash.list_cards() if c.holds_root)
    assert "holds /" in flash.refusal(root, image_size=1, max_bytes=1 << 50, force=True)

    backing = tmp_path / "big-card"
    with open(backing, "wb") as f:
        f.truncate(300 << 30)  # sparse: a 300 GiB "card"
    big = flash.card(loops(backing))
    assert big.size == 300 << 30 and not big.holds_root and not big.mounted
    assert "not removable media" in flash.refusal(big, image_size=1, max_bytes=256 << 30, force=True)
    reader = dataclasses.replace(big, removable=True)  # as a USB reader's disk would be
    assert "larger than the 256 GiB" in flash.refusal(reader, image_size=1, max_bytes=256 << 30, force=False)
    assert flash.refusal(reader, image_size=1, max_bytes=256 << 30, force=True) == ""
    on_usb = dataclasses.replace(big, bus="usb")  # a USB disk that says removable=0
    assert flash.refusal(on_usb, image_size=1, max_bytes=512 << 30, force=False) == ""
    assert "less than the image" in flash.refusal(reader, image_size=301 << 30, max_bytes=1 << 50, force=False)


def rackboot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rackboot", "flash", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_lists_disks_and_refuses_a_loop_device_in_one_line(tmp_path, loops):
    image, _ = sparse_image(tmp_path / "sdcard.img")
    backing = old_card(tmp_path / "old-card", 8)
    node = loops(backing)
    listed = rackboot("--image", str(image), "--list")
    assert listed.returncode == 0
    assert any(line.startswith("/dev/") and "refused: it holds /" in line for line in listed.stdout.splitlines())
    refused = rackboot("--image", str(image), node)
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"rackboot: error: refusing to write {node}: ")
    assert line.endswith("it is not removable media (not a card reader, USB or SD device)")
    assert backing.read_bytes() == PATTERN * (8 << 20)
    helped = rackboot("--help")
    assert "--loop" in helped.stdout and "--force" in helped.stdout and "removable" in helped.stdout


def test_loop_writes_the_card_inserted_next_and_says_it_may_be_removed(tmp_path, loops, capsys):
    image, block_map = sparse_image(tmp_path / "card.img")
    backing = old_card(tmp_path / "inserted-card", 8)

    def judge(card: flash.Card) -> str:
        # this test's loop device stands in for a reader's card; every other device is refused
        name = Path(card.devnode).name
        held = Path(f"/sys/block/{name}/loop/backing_file")
        if not held.exists() or held.read_text().strip() != str(backing):
            return "not this test's card"
        return flash.refusal(
            dataclasses.replace(card, removable=True), image_size=4 << 20, max_bytes=1 << 30, force=False
        )

    listening = threading.Event()
    result: list[object] = []

    def run() -> None:
        try:
            result.append(
                flash.loop(
                    image,
                    block_map,
                    max_bytes=1 << 30,
                    force=False,
                    count=1,
                    judge=judge,
                    timeout=60,
                    ready=listening.set,
                )
            )
        except RackbootError as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert listening.wait(30)
    node = loops(backing)  # the card goes in
    thread.join(90)
    assert result == [0]
    out = capsys.readouterr().out
    assert f"card 1: {node} written and verified; it may be removed" in out
    card, source = backing.read_bytes(), image.read_bytes()
    for first, last in bmap.mapped_ranges(image):
        assert card[first * BLOCK : (last + 1) * BLOCK] == source[first * BLOCK : (last + 1) * BLOCK]
