"""Cards that keep their boot files current, on an emulated worker: a card flashed from
build 1 netboots against a master whose build 2 has another kernel command line. A
tampered boot image is refused and the card keeps area A; the real one goes into area B
and entry 1 moves there; with the master stopped, the card's own U-Boot script, kernel
and initramfs, now build 2's, boot the slot (the kernel prints build 2's command line)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from rackboot import build
from rackboot.initramfs.updater import bootfiles, mbr
from rackboot.initramfs.updater.disk import Disk
from rackboot.master import plans
from rackboot.qemu import harness, torture

from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

MARK = torture.SECOND_CMDLINE
UP = r"rackboot-demo: v1 is up"


@pytest.fixture(scope="module")
def rack(example, tmp_path_factory):
    """Build 1 (the card's: the session's) and build 2 (the master's, another command line),
    v1 published, the plan naming build 2's boot files, and a worker's card flashed from
    build 1."""
    directory = tmp_path_factory.mktemp("bootfiles")
    example.start(0, directory)  # its keys as made
    cfg1 = example.cfg
    work = directory / "work"
    out1 = harness.prepare(cfg1, work, quiet)  # a no-op rebuild; the master tree afresh
    cfg2 = torture.second_build(cfg1, out1, directory / "build2")  # only the command line differs
    out2 = cfg2.output.directory
    harness.publish_example(cfg2, cfg2.base / "rootfs", work, 1)
    plans.assign(cfg2, node="default", image=harness.IMAGE)
    disk = work / "worker-disk.img"
    harness.blank_card(out1 / "sdcard.img", disk)
    masters = [harness.MasterThread(cfg2)]
    yield cfg2, out1, out2, disk, work, masters
    for master in masters:  # the last test stops it itself
        master.stop()


def entry_1(disk: Path) -> tuple[int, int]:
    with Disk(str(disk), writable=False) as d:
        e = mbr.parse(d.read(0, 512)).entry(1)
    assert e is not None
    return e.start >> 11, e.sectors >> 11  # MiB


def area_sha256(disk: Path, start_mib: int, size: int) -> str:
    with open(disk, "rb") as f:
        f.seek(start_mib << 20)
        return hashlib.sha256(f.read(size)).hexdigest()


def boot(cfg, out: Path, disk: Path, log: Path, *, offline: bool = False) -> str:
    with harness.new_worker(cfg, out, disk, log, offline=offline) as worker:
        worker.expect(UP, timeout=300)
        worker.wait_exit(timeout=60)
    return log.read_text(errors="replace")


def test_a_tampered_boot_image_is_refused_and_the_card_keeps_area_a(rack):
    cfg, out1, out2, disk, work, _ = rack
    stream = next((cfg.master.directory / "boot").glob("*/boot.vfat.gz"))
    kept = work / "boot.vfat.gz.orig"
    shutil.copyfile(stream, kept)
    data = bytearray(stream.read_bytes())
    data[len(data) // 3] ^= 0x5A
    stream.write_bytes(bytes(data))
    try:
        console = boot(cfg, out2, disk, work / "logs/tampered.log")
    finally:
        shutil.copyfile(kept, stream)
    assert "installing example v1 into slot a" in console  # the slot update goes on
    refused = next(line for line in console.splitlines() if "rackboot: boot files failed: " in line)
    assert "the card keeps its boot area" in refused and "gzip" in refused, refused  # the flipped byte, found
    assert entry_1(disk) == (4, 64)
    card1 = (out1 / build.BOOT_IMAGE).read_bytes()
    assert area_sha256(disk, 4, len(card1)) == hashlib.sha256(card1).hexdigest()


def test_the_card_switches_to_build_2_and_then_boots_it_from_the_card(rack):
    cfg, _, out2, disk, work, masters = rack
    online = boot(cfg, out2, disk, work / "logs/switch.log")
    image = (out2 / build.BOOT_IMAGE).read_bytes()
    digest = hashlib.sha256(image).hexdigest()
    assert f"partition 1 is boot area b now, build {digest[:16]}" in online
    assert entry_1(disk) == (68, 64) and area_sha256(disk, 68, len(image)) == digest
    with Disk(str(disk), writable=False) as d:
        assert bootfiles.read_record(d) == bootfiles.BootRecord(68 << 11, 64 << 11, len(image), digest, digest[:16])

    masters.pop().stop()  # no plan, no TFTP: the card's own boot files and the updater's offline boot
    offline = boot(cfg, out2, disk, work / "logs/offline.log", offline=True)
    assert "master unreachable; booting from the card" in offline
    cmdline = next(line for line in offline.splitlines() if "Kernel command line:" in line)
    assert MARK in cmdline and "rackboot.source=card" in cmdline, cmdline  # build 2's card script and kernel
    assert "booting slot a (offline)" in offline
