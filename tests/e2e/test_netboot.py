"""The first link of the chain on booting kernels: U-Boot fetches our boot script over
TFTP, it loads our kernel and initramfs, our /init loads the modules, brings up the
network and powers off."""

from __future__ import annotations

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


@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_probe_boots_and_reports_its_address(tmp_path, arch):
    cfg_path = write_config(tmp_path, arch=arch)
    build.build(config.load(cfg_path), log=quiet)
    result = rackboot_qemu(cfg_path, "--expect", r"rackboot: network up: eth0 10\.0\.2\.\d+/24", "--timeout", "120")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "build-console.log").read_text()
    assert "rackboot: netboot qemu-virt/" + arch in log  # our boot script ran, from TFTP
    assert "Run /init as init process" in log
    assert "cannot load" not in log  # every module in the closure loaded, in order


def test_expect_that_never_comes_fails_with_the_last_line(probe_build):
    cfg_path = probe_build.parent / "rackboot.toml"
    result = rackboot_qemu(cfg_path, "--expect", "this line never appears", "--timeout", "60")
    assert result.returncode == 1
    assert result.stderr.startswith("rackboot: error: ")
    # the probe powers off: the error says the worker stopped, and shows what it said last
    assert "worker stopped before" in result.stderr or "within 60 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_qemu_without_a_build_says_so(tmp_path):
    result = rackboot_qemu(write_config(tmp_path), "--expect", "x")
    assert result.returncode == 1 and "run rackboot build" in result.stderr
