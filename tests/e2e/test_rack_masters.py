"""A fleet of two racks: a region and a rack master on each of two rack networks, each rack
its own namespace and bridge with its master's dnsmasq (DHCP and TFTP), the region in a
third namespace that each rack master reaches through an uplink (a veth pair). Every
piece is `rackboot serve` as a process: the region with its rsync daemon, the rack
masters with [master] upstream, mirroring it.

One QEMU worker in each rack netboots from its rack master (both racks use the same
address for their master, so one build serves both), installs v1 from the rack's mirror
and confirms it; v2 is published once, at the region, and once each rack master's next
sync has it, both workers install it. The region's `rackboot status` then names each
node's rack: its reports came through its rack master. Run under `flock /tmp/netns.lock`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from rackboot import config
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.master import plans, signing
from rackboot.qemu import harness
from rackboot.qemu.netns import RackNetwork
from rackboot.qemu.runner import QemuWorker

from tests.e2e.rack import EXAMPLE
from tests.helpers import quiet, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.network]

MASTER = "10.213.0.1"  # each rack master's address on its own rack network: one build for both
REGION_SUBNET = "10.214.0.0/24"  # the region's network; the rack masters' uplinks are on it
RACKS = ("rack-a", "rack-b")
BOOT_TIMEOUT = 600
SYNC = 5  # seconds between the rack masters' syncs


def _example(directory: Path, build: Path | None, **master: object) -> config.Config:
    example = config.load(EXAMPLE / "rackboot.toml")
    for part in ("rootfs", "hooks"):
        if not (directory / part).exists():
            shutil.copytree(EXAMPLE / part, directory / part, symlinks=True)
    sections: dict[str, dict] = {
        "kernel": {"root_modules": list(example.kernel.root_modules)},
        "master": {"address": MASTER, "port": 8080, **master},
        "layout": {"partitions": [p.to_dict() for p in example.layout.partitions], "mount": example.layout.mount},
    }
    if build is not None:
        sections["output"] = {"directory": str(build / "build")}
    return config.load(write_config(directory, updater=True, **sections))


@pytest.fixture(scope="module")
def fleet_build(tmp_path_factory) -> Path:
    """One build for both racks: its boot scripts name MASTER, each rack master's address."""
    directory = tmp_path_factory.mktemp("fleet")
    cfg = _example(directory, None, key="keys/master.key")
    harness.prepare(cfg, directory / "work", log=quiet)
    return directory


def _expect(worker: QemuWorker, rack: str, pattern: str) -> None:
    try:
        worker.expect(pattern, timeout=BOOT_TIMEOUT)
    except RackbootError as exc:
        tail = "\n".join(worker.console[-25:])
        pytest.fail(f"{rack}'s worker ({worker.mac}): {exc}\nits last console lines:\n{tail}", pytrace=False)


def _wait(what: str, check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s", pytrace=False)
        time.sleep(0.5)


def _mirrored_plan(cfg: config.Config) -> str | None:
    """The image the default plan names in a rack master's current mirror."""
    try:
        return formats.parse_plan((cfg.master.directory / "current/plans/default.json").read_bytes()).image
    except (OSError, ValueError):
        return None


def test_two_racks_install_v1_then_v2_through_their_rack_masters_and_the_region_names_each_nodes_rack(
    fleet_build, rack_network, tmp_path
):
    build = fleet_build
    key = build / "keys/master.key"
    region_net: RackNetwork = rack_network(1, subnet=REGION_SUBNET)
    region_dir = tmp_path / "region"
    region_dir.mkdir()
    region = _example(region_dir, build, key=str(key), rsync_port=873)
    region.master.directory.mkdir()

    # two rack networks, each with its own bridge and dnsmasq; rack b's worker is its worker 1,
    # so that the two workers' MACs (and node ids) differ
    racks: list[tuple[str, RackNetwork, config.Config, int]] = []
    for n, name in enumerate(RACKS):
        net = rack_network(2)
        assert net.master == MASTER
        net.uplink(region_net, region_net.host(10 + n))
        directory = tmp_path / name
        directory.mkdir()
        first, last = net.dhcp_range()
        cfg = _example(
            directory,
            build,
            upstream=f"http://{region_net.master}:8080",
            upstream_key=str(signing.public_key_path(key)),
            upstream_rsync_port=873,
            sync_interval=SYNC,
            rack=name,
        )
        text = cfg.path.read_text() + (
            f'[network]\ninterface = "{net.bridge}"\ndhcp = "full"\nrange_start = "{first}"\nrange_end = "{last}"\n'
        )
        cfg.path.write_text(text)
        racks.append((name, net, config.load(cfg.path), n))

    work = tmp_path / "work"
    work.mkdir()
    harness.publish_example(region, region.base / "rootfs", work, 1)
    plans.assign(region, node="default", image=harness.IMAGE)
    region_proc = harness.MasterProcess(region, region_net, work / "region.log")
    masters = [harness.MasterProcess(cfg, net, work / f"{name}.log") for name, net, cfg, _ in racks]
    for (name, _, _, _), master in zip(racks, masters, strict=True):
        assert "mirror: synced" in master.log.read_text(), f"{name} started without its first sync"

    cards = []
    for name, _, cfg, _ in racks:
        card = work / f"{name}.img"
        harness.blank_card(cfg.output.directory / "sdcard.img", card)
        cards.append(card)

    def boot_all(boot: int, expect: str) -> list[str]:
        workers = [
            harness.new_rack_worker(cfg, net, i, card, work / "logs" / f"{name}-boot{boot}.log")
            for (name, net, cfg, i), card in zip(racks, cards, strict=True)
        ]
        try:
            for worker in workers:
                worker.start()
            for (name, _, _, _), worker in zip(racks, workers, strict=True):
                _expect(worker, name, expect)
                worker.wait_exit(timeout=60)
        finally:
            for worker in workers:
                worker.kill()
        return [w.log_path.read_text(errors="replace") for w in workers]

    for log in boot_all(1, r"rackboot-demo: v1 is up"):
        assert f"rackboot: netboot qemu-virt/arm64 from {MASTER}" in log
        assert "installing example v1 into slot a" in log
        assert "rackboot-mark-good: slot a (example v1) confirmed" in log

    harness.publish_example(region, region.base / "rootfs", work, 2)
    plans.assign(region, node="default", image=harness.IMAGE)
    v2 = formats.manifest_path(harness.IMAGE, 2)
    for _, _, cfg, _ in racks:  # the rack masters' next sync
        _wait(f"{cfg.master.rack} mirroring v2", lambda cfg=cfg: _mirrored_plan(cfg) == v2)
    for log in boot_all(2, r"rackboot-demo: v2 is up"):
        assert "installing example v2 into slot b" in log
    # neither worker ever fetched an image from the region: only the rack masters' rsync did
    assert harness.image_bytes(json.loads(region_proc.get("/stats"))) == 0
    assert all(harness.image_bytes(json.loads(m.get("/stats"))) > 0 for m in masters)

    nodes = {net.mac(i).replace(":", "-"): name for name, net, _, i in racks}

    def status() -> dict[str, dict]:
        done = subprocess.run(
            [str(harness.rackboot_command()), "status", "-c", str(region.path), "--json"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        rows = found["nodes"] if isinstance(found, dict) else found
        return {row["id"]: row for row in rows}

    _wait(
        "the region's inventory naming both racks, at v2",
        lambda: all(
            (row := status().get(node)) is not None and row.get("rack") == rack and row.get("booted_version") == 2
            for node, rack in nodes.items()
        ),
    )
    # each node's address is its own on its rack's network (X-Rackboot-Worker), not its rack master's uplink
    assert all(row["ip"].startswith("10.213.0.") for row in status().values() if row["id"] in nodes), status()
    table = subprocess.run(
        [str(harness.rackboot_command()), "status", "-c", str(region.path)], capture_output=True, text=True
    ).stdout
    for node, rack in nodes.items():
        assert any(node in line and rack in line for line in table.splitlines()), table
