"""What one arm64 netboot sends over TFTP: the files the example's netboot script loads,
at most 16 MB together (an uncompressed Image alone was 33 MB), and a compressed kernel
that booti can inflate: the script sets kernel_comp_size from the kernel's own load."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from rackboot import build, config
from rackboot.master import signing
from rackboot.uboot import image as uimage

from tests.helpers import quiet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qemu-virt" / "rackboot.toml"
GOAL = 16_000_000  # bytes
_LOAD = re.compile(r"\btftpboot \$\{(\w+)\} ([^\s;]+)")  # as a line or an `if`'s condition


@pytest.fixture(scope="module")
def example_build(tmp_path_factory) -> Path:
    """The example as configured, but with its key, master and output of the test's own
    (a fresh clone has no key yet: the demo makes it on its first run)."""
    cfg = config.load(EXAMPLE)
    directory = tmp_path_factory.mktemp("example")
    key = directory / "keys" / "master.key"
    signing.keygen(key)
    cfg = replace(
        cfg,
        master=replace(cfg.master, key=key, directory=directory / "master"),
        output=replace(cfg.output, directory=directory / "build"),
    )
    return build.build(cfg, log=quiet)


def netboot_script(out: Path) -> str:
    _, script = uimage.parse_legacy_image((out / build.NETBOOT_SCRIPT).read_bytes())
    return script.decode("latin-1")  # the payload starts with its binary length table


@pytest.mark.slow
def test_one_arm64_netboot_of_the_example_sends_at_most_16_mb(example_build):
    loads = _LOAD.findall(netboot_script(example_build))
    assert [address for address, _ in loads][:2] == ["kernel_addr_r", "ramdisk_addr_r"]
    sizes = {name: (example_build / name).stat().st_size for _, name in loads}
    assert sum(sizes.values()) <= GOAL, sizes


@pytest.mark.slow
def test_the_arm64_kernel_goes_out_compressed_for_booti_to_inflate(example_build):
    script = netboot_script(example_build)
    kernel = _LOAD.findall(script)[0][1]
    assert (example_build / kernel).read_bytes()[:2] == b"\x5d\x00"  # lzma, as booti recognises it
    lines = [line.strip() for line in script.splitlines()]
    at = next(i for i, line in enumerate(lines) if f"tftpboot ${{kernel_addr_r}} {kernel}" in line)
    assert lines[at + 1] == "setenv kernel_comp_size ${filesize}"  # the kernel's size, before the next load
    assert "kernel_comp_addr_r" in lines[at + 2]
