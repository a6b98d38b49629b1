"""Each worker its own on one shared image: two QEMU workers (user-mode network, their own
MACs) boot the example through v1, a reboot, v2 and an offline boot; one mounts its slot
under a tmpfs overlay, the other read-only (the node's files bind-mounted from /run). From
inside the booted root each prints its own hostname, /etc/hostname, /etc/hosts line and
machine-id; a persisted directory keeps the example's boot counter across the reboot, the
update and the offline boot; the signed first-boot hook runs once per node and version;
and the slots still hold the exact bytes the master signed."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from rackboot import config
from rackboot.initramfs.updater import formats, mbr
from rackboot.master import hostnames, plans
from rackboot.master.inventory import Inventory
from rackboot.qemu import harness

from tests.e2e.rack import example_config
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

PERSIST = "/var/lib/rackboot-demo"  # where the example's init counts its boots
MACS = ("02:52:00:d5:0e:01", "06:52:00:d5:0e:02")  # distinct first bytes, as qemu/netns.py explains
NAMES = ("worker-01", "pi-b")  # the pattern's first index; one given with --hostname
MOUNTS = (formats.Mount.OVERLAY_TMPFS, formats.Mount.RO)  # the second: no upper layer to write into
FIRST_BOOT = """#!/bin/sh
# the e2e's first-boot hook: runs chrooted in the new root, writes into a persisted directory
echo "v$RACKBOOT_VERSION $RACKBOOT_HOSTNAME" >> /var/lib/rackboot-demo/first-boot.log
echo "first-boot: $RACKBOOT_HOSTNAME is node $RACKBOOT_NODE, $RACKBOOT_IMAGE v$RACKBOOT_VERSION"
"""
STEPS = ((1, False), (1, False), (2, False), (2, True))  # (version, master stopped): v1, reboot, v2, offline


def assign(cfg, mac: str, version: int) -> None:
    """The node's own plan for ``version``, mounting its slot as MOUNTS says."""
    node = plans.node_name(mac)
    plan = plans.make_plan(cfg, node=node, manifest=formats.manifest_path(harness.IMAGE, version))
    plans.write_plan(cfg.master.directory, node, replace(plan, mount=MOUNTS[MACS.index(mac)]), key=cfg.master.key)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """Both workers through STEPS together; returns (directory, cfg, consoles[worker][boot], disks)."""
    directory = tmp_path_factory.mktemp("identity")
    path = example_config(directory, persist=[PERSIST])
    path.write_text(path.read_text().replace("[master]\n", '[master]\nhostname = "worker-{index:02d}"\n', 1))
    cfg = config.load(path)
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(exist_ok=True)
    (rootfs / "bin/sh").symlink_to("busybox")  # the hook's /bin/sh in the chroot
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc/machine-id").write_text("")  # systemd's sign that the image wants an id
    (rootfs / "etc/hostname").write_text("example\n")  # an ro root takes the node's over these
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\texample\n")
    (rootfs / PERSIST.lstrip("/")).mkdir(parents=True)  # an ro root cannot make it
    (directory / "hooks/first-boot.sh").write_text(FIRST_BOOT)
    work = directory / "work"
    out = harness.prepare(cfg, work, log=quiet)
    harness.publish_example(cfg, rootfs, work, 1)
    plans.assign(cfg, node=MACS[0], image=harness.IMAGE)  # named by the pattern
    subprocess.run(  # named on the command line, as a user would
        [str(harness.rackboot_command()), "plan", "-c", str(path), "--node", MACS[1], "--image", "example"]
        + ["--hostname", NAMES[1]],
        check=True,
        capture_output=True,
    )
    assign(cfg, MACS[1], 1)  # the same plan, read-only
    disks = [work / f"disk-{i}.img" for i in range(2)]
    for disk in disks:
        harness.blank_card(out / "sdcard.img", disk)
    consoles: list[list[str]] = [[], []]
    master: harness.MasterThread | None = harness.MasterThread(cfg)
    try:
        for n, (version, offline) in enumerate(STEPS, start=1):
            if version > 1 and not (cfg.master.directory / "images/example" / str(version)).is_dir():
                harness.publish_example(cfg, rootfs, work, version)
                for mac in MACS:  # each node's own plan to v2: the registry keeps its name
                    assign(cfg, mac, version)
            if offline and master:
                master.stop()
                master = None

            def boot(i: int, n: int = n, version: int = version, offline: bool = offline) -> str:
                log = work / "logs" / f"worker{i}-boot{n}.log"
                with harness.new_worker(cfg, out, disks[i], log, mac=MACS[i], offline=offline) as worker:
                    worker.expect(rf"rackboot-demo: v{version} is up", timeout=400)
                    worker.wait_exit(timeout=120)
                return log.read_text(errors="replace")

            with ThreadPoolExecutor(2) as pool:
                for i, text in enumerate(pool.map(boot, range(2))):
                    consoles[i].append(text)
    finally:
        if master:
            master.stop()
    return directory, cfg, consoles, disks


def _line(console: str, prefix: str) -> str:
    found = re.findall(rf"rackboot-demo: {prefix}([^\r\n]*)", console)
    assert found, f"no 'rackboot-demo: {prefix}' line on the console"
    return found[-1].strip()


def test_each_worker_reports_its_own_hostname_from_inside_the_booted_root(walk):
    _, _, consoles, _ = walk
    for name, mount, boots in zip(NAMES, MOUNTS, consoles, strict=True):
        assert all(f"mounted {mount}" in c for c in boots[:3])  # offline: the card's own mount setting
        assert [_line(c, "hostname ").split(",")[0] for c in boots] == [name] * len(STEPS)
        # the files too: the overlay's upper layer, or (ro) bind-mounted over the image's
        assert {_line(c, "/etc/hostname ") for c in boots} == {f"{name}, /etc/hosts 127.0.1.1\t{name}"}
    assert "no plan this boot: the node's settings as the card keeps them (hostname worker-01)" in consoles[0][3]


def test_machine_ids_are_distinct_per_node_and_stable_across_boots_and_updates(walk):
    _, _, consoles, _ = walk
    ids = [{_line(c, "hostname ").split("machine-id ")[1] for c in boots} for boots in consoles]
    assert all(len(s) == 1 for s in ids), ids  # the same on every boot of a node, v1 and v2
    (first,), (second,) = ids
    assert first != second and re.fullmatch(r"[0-9a-f]{32}", first) and first != "0" * 32


def test_a_persisted_directory_survives_a_reboot_and_an_update(walk):
    _, _, consoles, _ = walk
    for boots in consoles:  # the tmpfs overlay alone would say "boot 1" every time
        assert [re.search(r"boot (\d+) of this root", c).group(1) for c in boots] == ["1", "2", "3", "4"]
        assert "formatting the data partition" in boots[0]
        assert all("formatting the data partition" not in c for c in boots[1:])


def test_the_first_boot_hook_ran_once_per_version(walk):
    directory, _, consoles, _ = walk
    for name, boots in zip(NAMES, consoles, strict=True):
        assert [_line(c, "first-boot ran for: ") for c in boots] == [
            f"v1 {name}",
            f"v1 {name}",  # the reboot did not run it again
            f"v1 {name} v2 {name}",
            f"v1 {name} v2 {name}",  # offline: no manifest, no hook
        ]
        assert "first-boot hook of example v1 ran on this node before; not again" in boots[1]
    for mac, name in zip(MACS, NAMES, strict=True):
        node = formats.node_id(mac)
        lines = [json.loads(line) for line in (directory / f"master/reports/{node}.jsonl").read_text().splitlines()]
        first = [r for r in lines if r.get("hook") == "first-boot"]
        assert [(r["version"], r["error"]) for r in first] == [(1, None), (2, None)]
        assert first[0]["output"] == f"first-boot: {name} is node {node}, example v1\n"
        # every report sent once the plan is in carries it (a confirmation is read before the
        # plan, and a blank card's first-contact report comes before its first plan request)
        assert {r.get("hostname") for r in lines if r["phase"] not in ("confirm", "plan")} == {name}
        assert [r["phase"] for r in lines].count("plan") == 1


def test_the_slots_still_hold_the_signed_bytes_after_the_boots(walk):
    directory, _, _, disks = walk
    manifests = {
        v: formats.parse_manifest((directory / f"master/images/example/{v}/manifest.json").read_bytes()) for v in (1, 2)
    }
    for disk in disks:
        with open(disk, "rb") as f:
            table = mbr.parse(f.read(512))
            for number, version in ((2, 1), (3, 2)):  # slot a has v1, slot b v2
                entry = table.entry(number)
                assert entry is not None
                f.seek(entry.start * 512)
                data = f.read(manifests[version].size)
                assert hashlib.sha256(data).hexdigest() == manifests[version].sha256


def test_the_registry_numbers_the_nodes_in_the_order_their_plans_were_written(walk):
    directory, _, _, _ = walk
    registry = hostnames.read(Inventory(directory / "master"))  # (the fleet's database: here the SQLite file)
    assert registry == {
        formats.node_id(MACS[0]): hostnames.Entry(1, NAMES[0]),
        formats.node_id(MACS[1]): hostnames.Entry(2, NAMES[1]),
    }
