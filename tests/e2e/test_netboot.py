"""The first link of the chain on booting kernels: U-Boot fetches our boot script over
TFTP, it loads our kernel and initramfs, our /init loads the modules, brings up the
network and powers off."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from rackboot import build, config

from tests.helpers import quiet, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.network]


def rackboot_qemu(cfg_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "rackboot", "qemu", "-c", str(cfg_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_probe_booted(log: str, arch: str) -> None:
    assert "rackboot: netboot qemu-virt/" + arch in log  # our boot script ran, from TFTP
    assert "Run /init as init process" in log
    assert "cannot load" not in log  # every module in the closure loaded, in order
    assert re.search(r"rackboot: network up: eth0 10\.0\.2\.\d+/24", log), log[-2000:]


def test_probe_boots_and_reports_its_address(tmp_path):
    """The armhf probe, built here; the arm64 one (the session's) boots in the next test."""
    cfg_path = write_config(tmp_path, arch="armhf")
    build.build(config.load(cfg_path), log=quiet)
    result = rackboot_qemu(cfg_path, "--expect", r"rackboot: network up: eth0 10\.0\.2\.\d+/24", "--timeout", "120")
    assert result.returncode == 0, result.stderr
    assert_probe_booted((tmp_path / "build-console.log").read_text(), "armhf")


def test_expect_that_never_comes_fails_with_the_last_line(probe_build):
    cfg_path = probe_build.parent / "rackboot.toml"
    result = rackboot_qemu(cfg_path, "--expect", "this line never appears", "--timeout", "120")
    assert result.returncode == 1
    assert result.stderr.startswith("rackboot: error: ")
    # the probe powers off: the error says the worker stopped, and shows what it said last
    assert "worker stopped before" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # meanwhile the arm64 probe booted whole, as the armhf one in the test above
    assert_probe_booted((probe_build.parent / "build-console.log").read_text(), "arm64")


def test_qemu_without_a_build_says_so(tmp_path):
    result = rackboot_qemu(write_config(tmp_path), "--expect", "x")
    assert result.returncode == 1 and "run rackboot build" in result.stderr


def test_a_netboot_whose_kernel_download_fails_boots_the_card(probe_build, qemu_worker, tmp_path):
    """U-Boot's hush does not end a sourced script on `exit`: a netboot script that went on
    after a failed download booted half a kernel. Now it hands back to the card's script,
    which boots the card's own kernel and initramfs."""
    script = (probe_build / build.NETBOOT_SCRIPT).read_bytes().decode("latin-1")
    kernel = re.search(r"tftpboot \$\{kernel_addr_r\} (\S+?);", script)
    assert kernel, "the netboot script names no kernel"
    tftp = tmp_path / "tftp"
    shutil.copytree(probe_build, tftp, ignore=shutil.ignore_patterns(kernel.group(1)))
    card = tmp_path / "card.img"
    shutil.copyfile(probe_build / "sdcard.img", card)
    worker = qemu_worker("qemu-virt", "arm64", tftp_dir=tftp, bootfile=build.NETBOOT_SCRIPT, disks=[card])
    worker.expect("rackboot: netboot download failed, back to the card script", timeout=120)
    worker.expect("rackboot: master unreachable; booting from the card", timeout=30)
    worker.expect(r"rackboot: network up: eth0 10\.0\.2\.\d+/24", timeout=120)  # the card's /init ran
