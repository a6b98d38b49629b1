"""A rack on a real network: N blank workers switched on within one second on a bridge in
a network namespace of the test's own, each on a tap device (no QEMU user-mode network).
`rackboot serve` runs in the namespace: HTTP, and its netboot service (dnsmasq, TFTP).

With dhcp "full" the master's dnsmasq hands out the leases; every worker netboots the
master's kernel and initramfs, lays out its card, installs v1 and confirms it, then
takes v2 on its next boot. With dhcp "none" a second dnsmasq stands in for the site's
router, its next-server not the master: the workers still find the master's TFTP.

RACKBOOT_RACK_WORKERS sets N (default: two per core, at least 4, at most 16).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from rackboot import config
from rackboot.errors import RackbootError
from rackboot.master import dnsmasq, plans
from rackboot.qemu import harness
from rackboot.qemu.netns import RackNetwork
from rackboot.qemu.runner import QemuWorker

from tests.e2e.rack import EXAMPLE
from tests.helpers import quiet, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.network]

WORKERS = int(os.environ.get("RACKBOOT_RACK_WORKERS") or max(4, min(16, 2 * (os.cpu_count() or 1))))
MASTER = "10.213.0.1"  # the master's address inside every rack network (RackNetwork.master)
ROUTER_NEXT_SERVER = "10.213.0.254"  # where the site's router points netboots: not the master
BOOT_TIMEOUT = 600  # a whole storm on a small machine; a lone worker takes under a minute


@pytest.fixture(scope="module")
def rack_build(tmp_path_factory) -> Path:
    """One build for every rack test here (the master's address is the same in each rack):
    the directory holding its rackboot.toml, rootfs and build/."""
    directory = tmp_path_factory.mktemp("rack")
    harness.prepare(config.load(rack_config(directory)), directory / "work", log=quiet)
    return directory


def rack_config(directory: Path, build: Path | None = None, **network: str) -> Path:
    """The qemu-virt example's settings for a rack whose master is MASTER, its tree under
    ``directory``; ``build`` is an existing build output to share."""
    example = config.load(EXAMPLE / "rackboot.toml")
    for part in ("rootfs", "hooks"):
        if not (directory / part).exists():
            shutil.copytree(EXAMPLE / part, directory / part, symlinks=True)
    sections: dict[str, dict] = {
        "kernel": {"root_modules": list(example.kernel.root_modules)},
        "master": {"address": MASTER, "port": 8080, "key": "keys/master.key"},
        "layout": {"partitions": [p.to_dict() for p in example.layout.partitions], "mount": example.layout.mount},
    }
    if build is not None:
        sections["output"] = {"directory": str(build / "build")}
        sections["master"]["key"] = str(build / "keys/master.key")
    if network:
        sections["network"] = dict(network)
    return write_config(directory, updater=True, **sections)


class Rack:
    """One test's rack: its config, namespace, master and workers' cards and logs."""

    def __init__(self, cfg: config.Config, network: RackNetwork, work: Path):
        self.cfg = cfg
        self.network = network
        self.work = work
        self.out = cfg.output.directory
        self.cards = [work / f"card{i}.img" for i in range(network.workers)]
        for card in self.cards:
            harness.blank_card(self.out / "sdcard.img", card)
        self.master: harness.MasterProcess | None = None

    def release(self, version: int) -> None:
        harness.publish_example(self.cfg, self.cfg.base / "rootfs", self.work, version)
        plans.assign(self.cfg, node="default", image=harness.IMAGE)

    def serve(self) -> None:
        self.master = harness.MasterProcess(self.cfg, self.network, self.work / "master.log")

    def boot_all(self, boot: int, expect: str) -> list[QemuWorker]:
        """Switch every worker on together, wait until each says ``expect`` and powers off."""
        workers = [
            harness.new_rack_worker(self.cfg, self.network, i, card, self.work / "logs" / f"worker{i}-boot{boot}.log")
            for i, card in enumerate(self.cards)
        ]
        try:
            for worker in workers:  # Popen each: all are on within a fraction of a second
                worker.start()
            for i, worker in enumerate(workers):
                _expect(worker, i, expect)
                worker.wait_exit(timeout=60)
        finally:
            for worker in workers:
                worker.kill()
        return workers

    def node(self, i: int) -> str:
        return self.network.mac(i).replace(":", "-")

    def reports(self, i: int) -> list[tuple[str, str | None, int | None]]:
        path = self.cfg.master.directory / "reports" / f"{self.node(i)}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        assert all(r["error"] is None for r in lines), f"worker {i} ({self.node(i)}) reported errors: {lines}"
        # waits for a stream slot come and go with the storm's timing (master's max_streams)
        return [(r["phase"], r["slot"], r["version"]) for r in lines if r["phase"] != "wait"]


def _expect(worker: QemuWorker, i: int, pattern: str) -> None:
    try:
        worker.expect(pattern, timeout=BOOT_TIMEOUT)
    except RackbootError as exc:
        tail = "\n".join(worker.console[-25:])
        pytest.fail(f"worker {i} ({worker.mac}): {exc}\nits last console lines:\n{tail}", pytrace=False)


@pytest.fixture
def rack(rack_build, rack_network, tmp_path) -> Callable[[str], Rack]:
    """A rack network of WORKERS and its config, the master's netboot service on its
    bridge in the given DHCP mode."""

    def make(dhcp: str) -> Rack:
        network: RackNetwork = rack_network(WORKERS)
        assert network.master == MASTER  # the shared build's boot scripts name it
        settings = {"interface": network.bridge, "dhcp": dhcp}
        if dhcp == "full":
            settings["range_start"], settings["range_end"] = network.dhcp_range()
        cfg = config.load(rack_config(tmp_path, rack_build, **settings))
        return Rack(cfg, network, tmp_path)

    return make


def _check(i: int, log: str, *wanted: str) -> None:
    """Worker ``i``'s console says each of ``wanted``; else fail naming the worker and
    showing its rackboot and network lines."""
    missing = [w for w in wanted if w not in log]
    if missing:
        said = [line for line in log.splitlines() if re.search(r"rackboot|TFTP|DHCP|Retry", line)]
        pytest.fail(f"worker {i} never said {missing[0]!r}; it said:\n" + "\n".join(said[-25:]), pytrace=False)


NETBOOTED = (f"rackboot: netboot qemu-virt/arm64 from {MASTER}", "rackboot.source=net")


def _leases(path: Path) -> dict[str, str]:
    """dnsmasq's lease file: MAC -> address."""
    return {fields[1]: fields[2] for line in path.read_text().splitlines() if len(fields := line.split()) >= 3}


def _address(i: int, log: str) -> str:
    found = re.search(r"rackboot: network up: eth0 (10\.213\.0\.\d+)/24", log)
    assert found, f"worker {i}: no address in its console log"
    return found.group(1)


def test_a_blank_rack_netboots_installs_and_updates_with_the_masters_dhcp(rack):
    r = rack("full")
    r.release(1)
    r.serve()
    first = r.boot_all(1, r"rackboot-demo: v1 is up")
    logs = [w.log_path.read_text(errors="replace") for w in first]
    for i, log in enumerate(logs):
        _check(
            i, log, *NETBOOTED, "installing example v1 into slot a", "rackboot-mark-good: slot a (example v1) confirmed"
        )
    addresses = [_address(i, log) for i, log in enumerate(logs)]
    assert len(set(addresses)) == WORKERS and MASTER not in addresses
    leases = _leases(r.cfg.master.directory / dnsmasq.LEASES)
    assert [leases.get(r.network.mac(i)) for i in range(WORKERS)] == addresses  # each from the master's dnsmasq

    r.release(2)
    second = r.boot_all(2, r"rackboot-demo: v2 is up")
    for i, worker in enumerate(second):
        _check(i, worker.log_path.read_text(errors="replace"), *NETBOOTED, "installing example v2 into slot b")
        assert r.reports(i) == [
            ("layout", None, None),
            ("download", "a", 1),
            ("hook", "a", 1),
            ("commit", "a", 1),
            ("boot", "a", 1),
            ("confirm", "a", 1),
            ("download", "b", 2),
            ("hook", "b", 2),
            ("commit", "b", 2),
            ("boot", "b", 2),
        ]


def test_behind_a_site_router_the_workers_still_find_the_masters_tftp(rack):
    r = rack("none")
    r.release(1)
    harness.start_site_router(r.network, r.work, next_server=ROUTER_NEXT_SERVER)
    r.serve()  # TFTP only: the router leases the addresses
    workers = r.boot_all(1, r"rackboot-demo: v1 is up")
    for i, worker in enumerate(workers):
        _check(i, worker.log_path.read_text(errors="replace"), *NETBOOTED, "installing example v1 into slot a")
        assert ("commit", "a", 1) in r.reports(i)
