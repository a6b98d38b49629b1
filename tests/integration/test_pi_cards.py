"""SD cards for Raspberry Pis: the Pi firmware from Debian's raspi-firmware (matched
start/fixup pairs), config.txt, U-Boot from u-boot-rpi, the device trees and our boot
script, on a FAT32 partition that mtools reads back. (Not booted: QEMU's raspi boards
do not run the GPU firmware; the qemu-virt e2e tests boot the same scripts and initramfs.)"""

from __future__ import annotations

import subprocess

import pytest
from rackboot import build, config, modules
from rackboot.firmware.boards import BOARDS, COMMON_MODULES
from rackboot.uboot import image as uimage

from tests.helpers import quiet, write_config

BOOT_OFFSET = f"@@{config.BOOT_START_MIB}M"


def card_file(card, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", f"{card}{BOOT_OFFSET}", f"::{name}"], capture_output=True, check=True).stdout


def card_names(card) -> set[str]:
    out = subprocess.run(
        ["mdir", "-i", f"{card}{BOOT_OFFSET}", "-b", "-/", "::"], capture_output=True, text=True, check=True
    ).stdout
    return {line.removeprefix("::/").rstrip("/") for line in out.split()}


@pytest.mark.parametrize(
    "board, arch, firmware, absent",
    [
        ("rpi4", "arm64", {"start4.elf", "fixup4.dat"}, {"start.elf", "bootcode.bin"}),
        ("rpi3", "armhf", {"bootcode.bin", "start.elf", "fixup.dat"}, {"start4.elf"}),
    ],
)
@pytest.mark.slow
def test_pi_card_holds_firmware_uboot_config_and_scripts(tmp_path, board, arch, firmware, absent):
    cfg_path = write_config(tmp_path, board={"name": board, "arch": arch})
    out = build.build(config.load(cfg_path), log=quiet)
    inp = build.Inputs(config.load(cfg_path))
    card = out / "sdcard.img"
    names = card_names(card)
    assert firmware <= names and not absent & names
    firmware_dir = inp.unpacked("raspi-firmware") / "usr/lib/raspi-firmware"
    for name in firmware:
        assert card_file(card, name) == (firmware_dir / name).read_bytes()
    uboot = inp.unpacked("u-boot-rpi") / inp.board.uboot_binary
    assert card_file(card, "u-boot.bin") == uboot.read_bytes()

    config_txt = card_file(card, "config.txt").decode()
    assert "kernel=u-boot.bin" in config_txt
    assert ("arm_64bit=1" in config_txt) == (arch == "arm64")
    # no fixed tree: the firmware picks the board's own (3B or 3B+) among the upstream names in the root
    assert "device_tree=" not in config_txt and "upstream_kernel=1" in config_txt.splitlines()
    assert {rel.rsplit("/", 1)[-1] for rel in inp.board.dtbs} <= names

    header, script = uimage.parse_legacy_image(card_file(card, "boot.scr"))
    assert header.type == uimage.TYPES["script"]
    assert b"tftpboot" in script and inp.board.boot_command.encode() in script
    # U-Boot boots the tree the firmware passed (fdt_addr); the named one only when none was
    fallback = script.index(b'if test -n "${fdt_addr}"; then')
    assert script.index(b"fdt move ${fdt_addr} ${fdt_addr_r}") > fallback
    assert script.index(b"${fdt_addr_r} dtbs/" + inp.board.dtbs[0].rsplit("/", 1)[-1].encode()) > fallback
    kernel = "Image.lzma" if arch == "arm64" else "zImage"
    assert card_file(card, kernel) == (out / kernel).read_bytes()


@pytest.mark.parametrize("board, arch", sorted(BOARDS))
def test_every_board_profile_names_modules_its_kernel_has(tmp_path, board, arch):
    inp = build.Inputs(config.load(write_config(tmp_path, board={"name": board, "arch": arch})))
    wanted = [*inp.board.modules, *inp.board.watchdog, *COMMON_MODULES]
    closure = modules.module_closure(wanted, inp.kernel.root, arch=arch)
    loaded = {m.name for m in closure.modules} | set(closure.builtin)
    assert {modules.canonical(m) for m in wanted} <= loaded
