"""rsync mode on an emulated worker: a blank card takes v1 by the full stream, then v2 by
rsync from the master's real `rsync --daemon` (the initramfs formats the slot with its
e2fsprogs mke2fs, runs its rsync, checks the tree against the signed file manifest) and
v2 confirms itself; v3 with one file changed on the rsync side after it was signed is
refused with one line, its slot is not committed, and v2 boots."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rackboot import config, demo
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import Method
from rackboot.initramfs.updater.state import read as read_state
from rackboot.master import plans, rsyncd
from rackboot.qemu import harness, torture

from tests.e2e.rack import example_config, free_port
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

EXAMPLE_INITRAMFS = {
    "packages": ["busybox-static", "rsync", "e2fsprogs"],
    "binaries": ["/bin/busybox", "/usr/bin/rsync", "/sbin/mke2fs"],
}


@pytest.fixture(scope="module")
def rsync_story(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rsync")
    cfg = config.load(example_config(directory, initramfs=EXAMPLE_INITRAMFS))
    cfg = replace(cfg, master=replace(cfg.master, rsync_port=free_port()))
    work = directory / "demo"
    out = harness.prepare(cfg, work, quiet)
    disk = work / "worker-disk.img"
    harness.blank_card(out / "sdcard.img", disk)
    rootfs = cfg.base / "rootfs"

    def release(version: int, method: Method) -> None:
        harness.publish_example(cfg, rootfs, work, version)
        plans.assign(cfg, node="default", image=harness.IMAGE, method=method)

    def boot(n: int, expect: int) -> demo.BootRow:
        return demo._boot(
            cfg,
            out,
            disk,
            work / "logs" / f"boot{n}.log",
            rf"rackboot-demo: v{expect} is up",
            master=master,
            offline=False,
        )

    release(1, Method.IMAGE)
    master = harness.MasterThread(cfg)
    daemon = rsyncd.RsyncService(cfg.master.directory, "127.0.0.1", cfg.master.rsync_port, log=False)
    daemon.start()
    try:
        rows = [boot(1, 1)]
        release(2, Method.RSYNC)
        daemon.refresh()
        rows.append(boot(2, 2))
        release(3, Method.RSYNC)
        daemon.refresh()
        release_file = cfg.master.directory / "images" / harness.IMAGE / "3" / ".tree" / "etc" / "rackboot-release"
        release_file.write_text("vX\n")  # as long as the signed "v3\n": only the sha256 tells
        rows.append(boot(3, 2))
    finally:
        daemon.stop()
        master.stop()
    logs = [(work / "logs" / f"boot{n}.log").read_text(errors="replace") for n in (1, 2, 3)]
    return cfg, disk, rows, logs


def test_v1_by_stream_then_v2_by_rsync_each_installed(rsync_story):
    _, _, rows, logs = rsync_story
    assert [r.action for r in rows] == ["installed", "installed", "refused"]
    assert "installing example v1 into slot a" in logs[0] and "rsync" not in logs[0].split("boot slot")[0]
    assert "installing example v2 into slot b" in logs[1]
    assert "formatting /dev/vda3 as ext4 for rsync" in logs[1]
    assert "slot b matches the signed file manifest" in logs[1]
    assert "rackboot-mark-good: slot b (example v2) confirmed" in logs[1]


def test_rsync_fetched_far_less_than_the_stream_and_the_reports_say_so(rsync_story):
    cfg, _, _, _ = rsync_story
    reports = [
        json.loads(line)
        for f in sorted((cfg.master.directory / "reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    downloads = {r["version"]: r["bytes"] for r in reports if r["phase"] == "download"}
    manifest = json.loads((cfg.master.directory / "images/example/1/manifest.json").read_text())
    assert downloads[1] >= manifest["stream_size"]  # v1: the whole stream
    assert 0 < downloads[2] < manifest["stream_size"]  # v2 over rsync: the files, compressed on the wire
    assert any(r["phase"] == "confirm" and r["version"] == 2 for r in reports)


def test_a_file_changed_on_the_rsync_side_is_refused_and_the_good_slot_boots(rsync_story):
    _, disk, _, logs = rsync_story
    refused = [line for line in logs[2].splitlines() if "refused:" in line]
    assert len(refused) == 1, refused
    assert "/etc/rackboot-release: sha256 is" in refused[0] and "the slot is not committed" in refused[0]
    assert "booting slot b (refused)" in logs[2]
    with Disk(str(disk), writable=False) as d:
        state = read_state(d)
    assert (state.primary, state.last_good) == ("b", "b")
    assert state.slot("a").state == "bad" and state.slot("b").version == 2


def test_a_power_cut_during_an_rsync_install_leaves_the_card_bootable(rsync_story, tmp_path_factory):
    """One torture cycle on the story's build: a blank card whose plan says rsync loses power
    while the slot is being formatted and filled; the next boot comes up on a slot whose files
    match the signed file manifest (torture.check mounts it and compares)."""
    cfg, _, _, _ = rsync_story
    work = tmp_path_factory.mktemp("rsync-torture")
    outcomes = torture.torture(cfg, work, [torture.Cut(torture.RSYNC, 0.2, blank=True)], log=quiet)
    assert [o.verdict.survived for o in outcomes] == [True], [o.verdict.detail for o in outcomes]
    assert outcomes[0].landed == torture.RSYNC
    assert "files (rsync)" in outcomes[0].verdict.detail
    log = (work / "logs" / "001-cut.log").read_text(errors="replace")
    assert "formatting /dev/vda2 as ext4 for rsync" in log and "committing slot" not in log
