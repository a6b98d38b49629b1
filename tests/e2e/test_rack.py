"""A rack on a real network: N blank workers switched on within one second on a bridge in
a network namespace of the test's own, each on a tap device (no QEMU user-mode network).
`rackboot serve` runs in the namespace: HTTP, and its netboot service (dnsmasq, TFTP).

With dhcp "full" the master's dnsmasq hands out the leases; every worker netboots the
master's kernel and initramfs, lays out its card, installs v1 and confirms it, then
takes v2 on its next boot, all through a master that sends one image stream at a time
([master] max_streams = 1): a slow client holds that stream while the rack comes up, so
every worker is turned away with 503 + Retry-After and reports its wait, and the
master's /stats says its streams never overlapped, then or during the update. With dhcp
"none" a second dnsmasq stands in for the site's router, its next-server not the master:
two workers still find the master's TFTP.

RACKBOOT_RACK_WORKERS sets N (default: two per core, at least 4, at most 16).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
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
HOLD_TIMEOUT = 400  # the slow client lets the stream go by then, whoever has not been turned away


@pytest.fixture(scope="module")
def rack_build(tmp_path_factory) -> Path:
    """One build for every rack test here (the master's address is the same in each rack):
    the directory holding its rackboot.toml, rootfs and build/."""
    directory = tmp_path_factory.mktemp("rack")
    harness.prepare(config.load(rack_config(directory)), directory / "work", log=quiet)
    return directory


def rack_config(directory: Path, build: Path | None = None, max_streams: int = 0, **network: str) -> Path:
    """The qemu-virt example's settings for a rack whose master is MASTER, its tree under
    ``directory``; ``build`` is an existing build output to share; ``max_streams`` the
    master's cap on image streams (0: the default)."""
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
    if max_streams:
        sections["master"]["max_streams"] = max_streams
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

    def report_lines(self, i: int) -> list[dict]:
        path = self.cfg.master.directory / "reports" / f"{self.node(i)}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        assert all(r["error"] is None for r in lines), f"worker {i} ({self.node(i)}) reported errors: {lines}"
        return lines

    def reports(self, i: int) -> list[tuple[str, str | None, int | None]]:
        # the boot partition's own updates (updater/bootfiles.py) have their tests; whether a
        # boot reports them depends on the plan naming boot files, which is not this test's.
        # Waits for a stream come and go with the storm's timing: _check_waits checks them.
        return [
            (r["phase"], r["slot"], r["version"])
            for r in self.report_lines(i)
            if r["phase"] not in ("boot-files", "wait")
        ]

    def streams(self) -> dict:
        """The master's image streams as its /stats counts them: max, active, peak, refused."""
        assert self.master is not None
        return json.loads(self.master.get("/stats"))["streams"]


def _expect(worker: QemuWorker, i: int, pattern: str) -> None:
    try:
        worker.expect(pattern, timeout=BOOT_TIMEOUT)
    except RackbootError as exc:
        tail = "\n".join(worker.console[-25:])
        pytest.fail(f"worker {i} ({worker.mac}): {exc}\nits last console lines:\n{tail}", pytrace=False)


@pytest.fixture
def rack(rack_build, rack_network, tmp_path) -> Callable[[str], Rack]:
    """A rack network of ``workers`` and its config, the master's netboot service on its
    bridge in the given DHCP mode."""

    def make(dhcp: str, max_streams: int = 0, workers: int = WORKERS) -> Rack:
        network: RackNetwork = rack_network(workers)
        assert network.master == MASTER  # the shared build's boot scripts name it
        settings = {"interface": network.bridge, "dhcp": dhcp}
        if dhcp == "full":
            settings["range_start"], settings["range_end"] = network.dhcp_range()
        cfg = config.load(rack_config(tmp_path, rack_build, max_streams, **settings))
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


def test_a_blank_rack_netboots_installs_and_updates_with_the_masters_dhcp_one_stream_at_a_time(rack):
    r = rack("full", max_streams=1)
    r.release(1)
    r.serve()
    with stream_held(r, version=1):
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
    _check_one_stream_at_a_time(r, version=1)

    r.release(2)
    second = r.boot_all(2, r"rackboot-demo: v2 is up")
    for i, worker in enumerate(second):
        _check(i, worker.log_path.read_text(errors="replace"), *NETBOOTED, "installing example v2 into slot b")
        assert r.reports(i) == [
            ("plan", None, None),  # a blank card's first contact, before its first plan request
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
    assert r.streams()["peak"] == 1  # the update's storm too, however its requests met


@contextlib.contextmanager
def stream_held(r: Rack, version: int) -> Iterator[None]:
    """A slow client on the rack takes the master's one stream slot before the workers are
    switched on, and lets it go once the master has turned every worker away from
    ``version``'s stream (or after HOLD_TIMEOUT): the storm meets a busy master for
    certain, not by timing. (The example's 1.6 MB image fits in the sockets' buffers, so
    a worker's own stream frees the slot almost at once.)"""
    master = r.master
    assert master is not None
    blob = r.cfg.master.directory / "images" / "hold" / "blob"
    blob.parent.mkdir(parents=True, exist_ok=True)
    with open(blob, "wb") as f:
        f.truncate(2 << 30)  # sparse; at 2 MB/s it lasts past HOLD_TIMEOUT
    # slow, but fast enough that the master's socket is writable well within its idle
    # timeout (30 s per send), which would otherwise end the stream and free the slot
    holder = r.network.spawn(
        ["curl", "-sS", "--limit-rate", "2M", "-o", "/dev/null", f"{master.url}/images/hold/blob"],
        r.work / f"holder-v{version}.log",
    )
    deadline = time.monotonic() + 30
    while r.streams()["active"] != 1:
        assert holder.poll() is None and time.monotonic() < deadline, "the slow client never got its stream"
        time.sleep(0.2)
    refused = re.compile(rf'^(\S+) "GET /images/{harness.IMAGE}/{version}/\S+ HTTP/1.1" 503 ', re.M)
    done = threading.Event()

    def release() -> None:
        until = time.monotonic() + HOLD_TIMEOUT
        while not done.wait(1) and time.monotonic() < until:
            if len(set(refused.findall(master.log.read_text(errors="replace")))) >= WORKERS:
                break
        r.network.stop(holder)  # its connection drops: the slot is free

    thread = threading.Thread(target=release, name="stream-holder", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _check_one_stream_at_a_time(r: Rack, version: int) -> None:
    """The master sent one image stream at a time, turned the storm away with 503, and
    every worker reported how long it queued for ``version`` (behind stream_held)."""
    streams = r.streams()
    assert streams["max"] == 1 and streams["active"] == 0
    assert streams["peak"] == 1, f"the master sent {streams['peak']} image streams at once, with max_streams = 1"
    for i in range(WORKERS):
        waits = [w for w in r.report_lines(i) if w["phase"] == "wait" and w["version"] == version]
        assert waits and all(w["seconds"] > 0 and w["slot"] in ("a", "b") for w in waits), (
            f"worker {i} reported no wait for v{version}'s stream: {r.report_lines(i)}"
        )
    assert streams["refused"] >= WORKERS  # each wait is at least one 503 the master counted


def test_behind_a_site_router_the_workers_still_find_the_masters_tftp(rack):
    r = rack("none", workers=2)  # what the router's leases prove needs no storm: the test above has it
    r.release(1)
    harness.start_site_router(r.network, r.work, next_server=ROUTER_NEXT_SERVER)
    r.serve()  # TFTP only: the router leases the addresses
    workers = r.boot_all(1, r"rackboot-demo: v1 is up")
    for i, worker in enumerate(workers):
        _check(i, worker.log_path.read_text(errors="replace"), *NETBOOTED, "installing example v1 into slot a")
        assert ("commit", "a", 1) in r.reports(i)
