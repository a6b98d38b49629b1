"""The rpi3 arm64 card on an emulated Raspberry Pi 3 Model B (QEMU's raspi3b): the card's
own U-Boot, boot script, device tree, kernel and initramfs, the network through QEMU's
usb-net on the Pi's dwc2 USB host. One worker boots once: a blank card that lays itself
out, installs v1 from the master over HTTP, switches root into it and confirms it, the
confirmation written on the Pi's card for the next boot to take. (The GPU firmware is the
one step QEMU plays itself: see qemu/machines.py.) What a next boot does with the card,
taking the confirmation and booting the good slot without a master, is the updater's and
the card's boot script's, the same on every board: tests/e2e/test_story.py boots it
(and test_recovery.py a worker with no network at all)."""

from __future__ import annotations

import json

import pytest
from rackboot import config
from rackboot.initramfs.updater import mbr, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.master import plans
from rackboot.qemu import harness

from tests.e2e.rack import example_config
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

# TCG emulates four Cortex-A53s on whatever the host spares; the install boot is the long one
BOOT_TIMEOUT = 1200
# The example root's last act is `poweroff -f`: the kernel has no power-off for the Pi and halts
HALTED = r"reboot: (System halted|Power down|Restarting system)"


def pi3_config(directory):
    # QEMU's model of the Pi's PM block resets the board the moment a watchdog is armed (it
    # has no countdown): the emulated Pi leaves its watchdog alone (the qemu-virt e2e tests
    # prove the updater's watchdog on i6300esb)
    path = example_config(directory, initramfs={"watchdog": 0})
    path.write_text(path.read_text().replace('name = "qemu-virt"', 'name = "rpi3"', 1))
    cfg = config.load(path)
    assert (cfg.board.name, cfg.board.arch, cfg.initramfs.watchdog) == ("rpi3", "arm64", 0)
    return cfg


def boot(cfg, out, disk, log, version: str) -> list[str]:
    with harness.new_worker(cfg, out, disk, log) as worker:
        worker.expect(rf"rackboot-demo: {version} is up", timeout=BOOT_TIMEOUT)
        worker.end_on(HALTED, timeout=120)
        return worker.console


@pytest.fixture(scope="module")
def pi3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("raspi3b")
    cfg = pi3_config(directory)
    work = directory / "work"
    out = harness.prepare(cfg, work, log=quiet)
    disk = work / "worker-disk.img"
    harness.blank_card(out / "sdcard.img", disk)
    harness.publish_example(cfg, cfg.base / "rootfs", work, 1)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    master = harness.MasterThread(cfg)
    try:
        online = boot(cfg, out, disk, work / "logs/boot1.log", "v1")
        fetched = master.bytes_sent()
    finally:
        master.stop()
    return cfg, disk, online, fetched


def test_the_card_boots_its_own_uboot_script_and_kernel_on_a_pi_3(pi3):
    _, _, online, _ = pi3
    text = "\n".join(online)
    assert "rackboot: card boot script rpi3/arm64" in text
    # U-Boot has no usb-net driver: the card's own kernel and initramfs boot
    assert "rackboot: master unreachable; booting from the card" in text
    assert "Machine model: Raspberry Pi 3 Model B" in text
    assert "mmcblk0: mmc0:" in text


def test_uboot_hands_on_the_tree_the_firmware_passed(pi3):
    _, _, online, _ = pi3
    text = "\n".join(online)
    assert "rackboot: device tree from the firmware at" in text
    assert "no device tree from the firmware" not in text


def test_blank_card_is_laid_out_and_v1_installed_over_usb_ethernet(pi3):
    cfg, disk, online, fetched = pi3
    text = "\n".join(online)
    assert "rndis_host" in text and "network up:" in text
    assert "repartitioning" in text and "installing example v1 into slot a" in text
    assert fetched > 0  # the image came from the master over HTTP
    with open(disk, "rb") as f:
        table = mbr.parse(f.read(512))
    sizes = [e.sectors * 512 >> 20 for e in table.entries]
    assert sizes[1:3] == [p.size_mib for p in cfg.layout.partitions][1:3]  # slots a and b (boot: the boot areas')
    assert table.entries[-1].end * 512 == harness.DISK_MIB << 20  # data takes the rest


def test_v1_committed_switched_root_and_confirmed_itself(pi3):
    cfg, disk, online, _ = pi3
    assert any("rackboot-demo: v1 is up" in line for line in online)
    assert any("rackboot-mark-good: slot a (example v1) confirmed" in line for line in online)
    reports = [
        json.loads(line)
        for f in sorted((cfg.master.directory / "reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    phases = [(r["phase"], r["slot"], r["version"]) for r in reports]
    assert ("commit", "a", 1) in phases and ("boot", "a", 1) in phases
    # v1's rackboot-mark-good reached the card before the halt: slot a on trial, and the
    # confirmation sector naming it, which the next boot's updater takes (take_confirmation)
    with Disk(str(disk), writable=False) as d:
        slots = state.read(d)
        confirmation = d.read(state.CONFIRM, 512).split(b"\n", 1)[0].decode()
    a = slots.slot("a")
    assert (slots.primary, a.state, a.version) == ("a", "trial", 1)
    assert confirmation == f"{state.CONFIRM_WORD} a {a.sha256}"
