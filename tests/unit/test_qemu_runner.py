"""The runner's QEMU command line for disks: plain raw files as before, blkdebug under
raw for disks with faults (tests/e2e/test_faults.py checks the spec against QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.qemu.machines import profile
from rackboot.qemu.runner import DiskFault, QemuWorker, grow_to_power_of_two


def drives(**options) -> list[str]:
    worker = QemuWorker(profile("qemu-virt", "arm64"), log_path=Path("console.log"), **options)
    try:
        cmd = worker.command()
    finally:
        worker.kill()  # removes its temporary directory; nothing was started
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-drive"]


def test_plain_disks_are_raw_files_as_before():
    assert drives(disks=[Path("/c/a.img"), Path("/c/b.img")]) == [
        "if=none,id=disk0,format=raw,file=/c/a.img,cache=writeback",
        "if=none,id=disk1,format=raw,file=/c/b.img,cache=writeback",
    ]


def test_faults_put_blkdebug_under_raw_on_their_disk_only():
    plain, faulty = drives(
        disks=[Path("/c/a.img"), Path("/c/b.img")],
        faults=[DiskFault("write", sector=2048, disk=1), DiskFault("read", errno=28, once=True, disk=1)],
    )
    assert plain == "if=none,id=disk0,format=raw,file=/c/a.img,cache=writeback"
    assert faulty == (
        "if=none,id=disk1,format=raw,cache=writeback,werror=report,rerror=report,"
        "file.driver=blkdebug,file.image.filename=/c/b.img,"
        "file.inject-error.0.event=write_aio,file.inject-error.0.iotype=write,file.inject-error.0.errno=5,"
        "file.inject-error.0.once=off,file.inject-error.0.sector=2048,"
        "file.inject-error.1.event=read_aio,file.inject-error.1.iotype=read,file.inject-error.1.errno=28,"
        "file.inject-error.1.once=on"
    )


def test_bad_faults_are_refused_in_one_line():
    with pytest.raises(RackbootError, match="iotype 'discard' is not one of read, write"):
        DiskFault("discard")
    with pytest.raises(RackbootError, match="disk fault on disk 1: the worker has 1 disks"):
        drives(disks=[Path("/c/a.img")], faults=[DiskFault("read", disk=1)])


def raspi3b_command(**options) -> list[str]:
    options.setdefault("kernel", Path("/card/u-boot.bin"))
    options.setdefault("dtb", Path("/card/bcm2837-rpi-3-b.dtb"))
    worker = QemuWorker(profile("rpi3", "arm64"), log_path=Path("console.log"), disks=[Path("/c/card.img")], **options)
    try:
        return worker.command()
    finally:
        worker.kill()


def test_raspi3b_boots_the_cards_uboot_and_tree_on_the_sd_host_with_the_console_on_the_mini_uart():
    cmd = raspi3b_command(tftp_dir=Path("/build"))
    joined = " ".join(cmd)
    assert "-M raspi3b" in joined and "-smp 4" in joined  # the SoC's four cores, no fewer
    assert "-kernel /card/u-boot.bin -dtb /card/bcm2837-rpi-3-b.dtb" in joined and "-bios" not in cmd
    assert "-serial null -serial stdio" in joined  # UART0 (PL011) idle, UART1 the console
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-drive"] == [
        "if=sd,index=0,format=raw,file=/c/card.img,cache=writeback"
    ]
    # the NIC waits for the kernel (QMP device_add): only its netdev is on the command line
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"] == []
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-netdev"] == ["user,id=net0,tftp=/build"]


def test_raspi3b_needs_the_cards_uboot_and_a_single_power_on():
    with pytest.raises(RackbootError, match="boots the card's U-Boot: give its kernel= and dtb="):
        QemuWorker(profile("rpi3", "arm64"), log_path=Path("console.log"))
    with pytest.raises(RackbootError, match="plugs its NIC in once per power-on: it needs no_reboot"):
        raspi3b_command(no_reboot=False)


def test_cards_grow_to_a_power_of_two_and_no_further(tmp_path):
    card = tmp_path / "card.img"
    card.write_bytes(b"x" * 1000)
    grow_to_power_of_two(card)
    assert card.stat().st_size == 1024 and card.read_bytes()[:1000] == b"x" * 1000
    grow_to_power_of_two(card)
    assert card.stat().st_size == 1024
