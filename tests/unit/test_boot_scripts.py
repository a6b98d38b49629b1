"""The boot scripts name the master as U-Boot's TFTP server after dhcp, and set U-Boot's
TFTP client from the board profile, for every board profile."""

from __future__ import annotations

import pytest
from rackboot import build, config
from rackboot.firmware.boards import BOARDS
from rackboot.uboot import script as uscript

from tests.helpers import write_config

TEMPLATES = ("card.cmd.j2", "netboot.cmd.j2")


def rendered(tmp_path, name: str, arch: str, address: str) -> dict[str, list[str]]:
    cfg = config.load(write_config(tmp_path, arch=arch, board={"name": name}, master={"address": address}))
    context = build.script_context(build.Inputs(cfg), "vmlinuz", "initrd.img")
    return {t: uscript.render(t, **context).splitlines() for t in TEMPLATES}


@pytest.mark.parametrize("name, arch", sorted(BOARDS))
def test_card_script_names_the_master_right_after_dhcp(tmp_path, name, arch):
    card = rendered(tmp_path, name, arch, "192.168.7.2")["card.cmd.j2"]
    after_dhcp = card[card.index("if dhcp; then") + 1]
    assert after_dhcp.strip() == "setenv serverip 192.168.7.2"


@pytest.mark.parametrize("name, arch", sorted(BOARDS))
def test_netboot_script_names_the_master_before_its_first_tftpboot(tmp_path, name, arch):
    netboot = rendered(tmp_path, name, arch, "192.168.7.2")["netboot.cmd.j2"]
    first_tftp = next(i for i, line in enumerate(netboot) if "tftpboot" in line and not line.startswith("#"))
    assert "setenv serverip 192.168.7.2" in netboot[:first_tftp]


@pytest.mark.parametrize("name, arch", sorted(BOARDS))
def test_tftp_settings_come_from_the_board_profile(tmp_path, name, arch):
    board = BOARDS[(name, arch)]
    wanted = [
        f"setenv tftpblocksize {board.tftp_blocksize}",
        f"setenv tftptimeout {board.tftp_timeout_ms}",
        f"setenv tftptimeoutcountmax {board.tftp_timeout_count}",
    ]
    for template, lines in rendered(tmp_path, name, arch, "10.0.2.2").items():
        first_tftp = next(i for i, line in enumerate(lines) if "tftpboot" in line)
        before = [line.strip() for line in lines[:first_tftp]]
        assert [line for line in before if line.startswith("setenv tftp")] == wanted, template


def test_pi_profiles_wait_longer_for_tftp_than_qemu():
    qemu = BOARDS[("qemu-virt", "arm64")]
    for (name, _arch), board in BOARDS.items():
        if name.startswith("rpi"):
            assert board.tftp_timeout_ms * board.tftp_timeout_count > qemu.tftp_timeout_ms * qemu.tftp_timeout_count


def test_a_hostname_master_leaves_serverip_to_dhcp(tmp_path):
    """U-Boot resolves no hostnames: the DHCP server's next-server stays."""
    for lines in rendered(tmp_path, "qemu-virt", "arm64", "master.rack.lan").values():
        assert not any("setenv serverip" in line for line in lines)


@pytest.mark.parametrize("name, arch", sorted(BOARDS))
def test_boot_scripts_keep_to_what_u_boots_hush_parses(tmp_path, name, arch):
    """U-Boot 2023.01's hush ends no sourced script on `exit` (a failed download went on to
    boot half a kernel), and an apostrophe inside double quotes is a syntax error to it
    (the whole block is skipped)."""
    for template, lines in rendered(tmp_path, name, arch, "192.168.7.2").items():
        code = [line for line in lines if not line.lstrip().startswith("#")]
        assert not any("exit" in line.split() for line in code), template
        assert not any("'" in line for line in code), template
