"""main: identity discovery and the decision file /init sources."""

from __future__ import annotations

import subprocess

import pytest

from rackboot.initramfs.updater.disk import partition_device
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.main import Decision, discover_identity


def fake_root(tmp_path, nets: dict, dt_serial=None, cpuinfo=None):
    for name, mac in nets.items():
        (tmp_path / "sys/class/net" / name).mkdir(parents=True)
        (tmp_path / "sys/class/net" / name / "address").write_text(mac + "\n")
    if dt_serial is not None:
        (tmp_path / "proc/device-tree").mkdir(parents=True)
        (tmp_path / "proc/device-tree/serial-number").write_bytes(dt_serial)
    if cpuinfo is not None:
        (tmp_path / "proc").mkdir(exist_ok=True)
        (tmp_path / "proc/cpuinfo").write_text(cpuinfo)
    return str(tmp_path)


def test_first_real_interface_and_device_tree_serial(tmp_path):
    root = fake_root(tmp_path, {"lo": "00:00:00:00:00:00", "eth0": "B8:27:EB:00:11:22", "wlan0": "b8:27:eb:99:99:99"},
                     dt_serial=b"00000000abcdef01\0")
    ident = discover_identity(root=root)
    assert (ident.mac, ident.serial, ident.node) == ("b8:27:eb:00:11:22", "00000000abcdef01", "b8-27-eb-00-11-22")


def test_cpuinfo_serial_and_given_mac(tmp_path):
    root = fake_root(tmp_path, {}, cpuinfo="processor\t: 0\nHardware\t: BCM2835\nSerial\t\t: 100000003c2d9b81\n")
    ident = discover_identity("52:54:00:12:34:56", root=root)
    assert (ident.node, ident.serial) == ("52-54-00-12-34-56", "100000003c2d9b81")


def test_no_interface_no_identity(tmp_path):
    with pytest.raises(UpdaterError, match="identity: no network interface"):
        discover_identity(root=fake_root(tmp_path, {"lo": "00:00:00:00:00:00"}))


def test_partition_device_names():
    assert partition_device("/dev/vda", 3) == "/dev/vda3"
    assert partition_device("/dev/mmcblk0", 2) == "/dev/mmcblk0p2"
    assert partition_device("/dev/nvme0n1", 1) == "/dev/nvme0n1p1"


def test_decision_shell_lines_survive_quotes():
    d = Decision(slot="b", partition_number=3, device="/dev/vda3", mount="ro+overlay:tmpfs",
                 action="fallback", bytes_fetched=10, seconds=1.5, error="it's $(broken) `x`")
    out = subprocess.run(["sh", "-c", d.to_shell() + 'printf "%s|%s|%s|%s" "$slot" "$partition_number" "$error" "$data_device"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == "b|3|it's $(broken) `x`|"
