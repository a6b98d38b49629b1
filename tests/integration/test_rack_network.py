"""The rack network the e2e rack tests and `rackboot demo --rack` boot workers on: a real
namespace with a bridge and taps (needs root), torn down with whatever runs in it; the
QEMU command line of a worker on one of its taps; the rack demo's config."""

from __future__ import annotations

import subprocess
import time

import pytest
from rackboot import config, demo
from rackboot.config import DhcpMode
from rackboot.errors import RackbootError
from rackboot.qemu.machines import profile
from rackboot.qemu.netns import MAX_WORKERS, RackNetwork
from rackboot.qemu.runner import QemuWorker

from tests.e2e.rack import EXAMPLE


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ip(rack: RackNetwork, *args: str) -> str:
    return subprocess.run(["ip", "-n", rack.name, *args], capture_output=True, text=True, check=True).stdout


def test_a_rack_network_has_the_master_on_a_bridge_and_a_tap_per_worker(rack_network):
    rack = rack_network(3)
    assert rack.name in _namespaces()
    assert f"inet {rack.master}/24" in _ip(rack, "-o", "addr", "show", "dev", rack.bridge)
    attached = _ip(rack, "-o", "link", "show", "master", rack.bridge)
    assert [tap for tap in rack.taps if f" {tap}:" in attached] == ["tap0", "tap1", "tap2"]
    assert "state UNKNOWN" in _ip(rack, "-o", "link", "show", "lo")  # loopback is up
    first, last = rack.dhcp_range()
    assert rack.master not in (first, last) and first.startswith("10.213.0.")


def test_teardown_kills_what_runs_inside_and_removes_the_namespace(tmp_path):
    rack = RackNetwork(1).up()
    try:
        ours = rack.spawn(["sleep", "600"], tmp_path / "sleep.log")
        # started in the namespace by someone else (as QemuWorker does): found by `ip netns pids`
        theirs = subprocess.Popen(rack.command(["sleep", "600"]), start_new_session=True)
        deadline = time.monotonic() + 10
        while len(rack.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rack.pids()) == 2
    finally:
        rack.down()
    assert ours.wait(10) is not None and theirs.wait(10) is not None
    assert rack.name not in _namespaces()
    rack.down()  # twice is harmless: teardown runs after failures too


def test_a_taken_name_is_refused_and_the_namespace_holding_it_is_left_alone(rack_network):
    first = rack_network(1)
    with pytest.raises(RackbootError, match=f"create network namespace {first.name}"):
        RackNetwork(1, name=first.name).up()
    assert first.name in _namespaces()
    assert f"inet {first.master}/24" in _ip(first, "-o", "addr", "show", "dev", first.bridge)


def test_macs_differ_in_the_first_byte_which_is_all_debians_uboot_reads():
    rack = RackNetwork(MAX_WORKERS)
    macs = [rack.mac(i) for i in range(MAX_WORKERS)]
    first_bytes = [int(mac.split(":")[0], 16) for mac in macs]
    assert len(set(first_bytes)) == MAX_WORKERS
    assert all(b & 1 == 0 and b & 2 for b in first_bytes)  # unicast, locally administered
    with pytest.raises(RackbootError, match="at most"):
        RackNetwork(MAX_WORKERS + 1)


def test_a_worker_on_a_tap_runs_qemu_inside_the_namespace_with_its_own_mac(tmp_path):
    machine = profile("qemu-virt", "arm64")
    worker = QemuWorker(machine, log_path=tmp_path / "log", netns="ns0", tap="tap3", mac="0e:52:00:d5:00:03")
    cmd = worker.command()
    assert cmd[:5] == ["ip", "netns", "exec", "ns0", machine.qemu]
    assert cmd[cmd.index("-netdev") + 1] == "tap,id=net0,ifname=tap3,script=no,downscript=no"
    assert cmd[cmd.index("-device") + 1] == f"{machine.net_device},netdev=net0,romfile=,mac=0e:52:00:d5:00:03"
    assert not any(arg.startswith("user,") for arg in cmd)  # no slirp
    with pytest.raises(RackbootError, match="tap device"):
        QemuWorker(machine, log_path=tmp_path / "log", tap="tap0", tftp_dir=tmp_path)


def test_the_rack_demo_runs_the_example_with_the_master_and_its_netboot_service_on_the_rack(tmp_path):
    example = config.load(EXAMPLE / "rackboot.toml")
    rack = RackNetwork(4)
    cfg = demo.rack_config(example, tmp_path, rack)
    assert cfg.path == tmp_path / "rackboot.toml"
    assert cfg.master.url == "http://10.213.0.1:8080" and cfg.master.key == example.master.key
    assert cfg.network.interface == "br0" and cfg.network.dhcp is DhcpMode.FULL
    assert (cfg.network.range_start, cfg.network.range_end) == rack.dhcp_range()
    assert (cfg.output.directory, cfg.master.directory) == (tmp_path / "build", tmp_path / "master")
    for section in ("board", "kernel", "initramfs", "layout"):  # the rest as the example says
        assert config.plain(getattr(cfg, section)) == config.plain(getattr(example, section))
