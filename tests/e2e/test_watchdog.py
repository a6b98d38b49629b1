"""The board's watchdog against a hung updater: the worker's disk stops taking writes
(QEMU throttles it to a byte a second) while v2 goes into slot b. The updater stops
feeding the i6300esb watchdog once it sees no progress, the watchdog fires, and after
the reset the same worker installs v2 cleanly; slot b was never committed meanwhile."""

from __future__ import annotations

import time

import pytest
from rackboot import config, demo
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.master import plans
from rackboot.qemu import harness

from tests.e2e.rack import example_config
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

STALL = 10  # seconds without progress before the updater stops feeding the watchdog
THROTTLE = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


def throttle_writes(worker, bps_wr: int) -> None:
    limits = {name: 0 for name in THROTTLE}  # 0 = unlimited
    worker.qmp("block_set_io_throttle", device="disk0", **{**limits, "bps_wr": bps_wr})


def wait_for_status(worker, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := worker.qmp("query-status")["status"]) != status:
        if time.monotonic() > deadline:
            raise RackbootError(f"worker status is {now!r}, not {status!r}, after {timeout:g} s")
        time.sleep(1)


def test_a_hung_updater_is_reset_by_the_watchdog_and_the_next_boot_installs(tmp_path):
    cfg = config.load(example_config(tmp_path, initramfs={"watchdog": STALL}))
    work = tmp_path / "demo"
    assert [r.action for r in demo.story(cfg, work, log=quiet, steps=[(1, False)])] == ["installed"]
    harness.publish_example(cfg, cfg.base / "rootfs", work, 2)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    disk = work / "worker-disk.img"
    master = harness.MasterThread(cfg)
    try:
        # pause, not reset, when it fires: QEMU's run state then says the watchdog did it
        with harness.new_worker(
            cfg, cfg.output.directory, disk, tmp_path / "console.log", no_reboot=False, watchdog_action="pause"
        ) as worker:
            worker.expect(r"watchdog: /dev/watchdog armed", timeout=300)
            worker.expect(r"installing example v2 into slot b", timeout=120)
            throttle_writes(worker, 1)
            worker.expect(rf"watchdog: no progress for {STALL} s; no longer feeding it", timeout=300)
            wait_for_status(worker, "watchdog", timeout=120)
            with Disk(str(disk), writable=False) as d:
                hung = state.read(d)
            assert (hung.slots["b"].state, hung.primary, hung.last_good) == ("writing", "a", "a")

            throttle_writes(worker, 0)
            worker.qmp("system_reset")
            worker.qmp("cont")
            worker.expect(r"installing example v2 into slot b", timeout=300)  # the next boot, same worker
            worker.expect(r"rackboot-demo: v2 is up", timeout=300)
            worker.wait_exit(timeout=60)
    finally:
        master.stop()
    console = (tmp_path / "console.log").read_text(errors="replace")
    assert "Kernel panic" not in console and "Traceback" not in console
    with Disk(str(disk), writable=False) as d:
        after = state.read(d)
    assert (after.slots["b"].state, after.slots["b"].version, after.primary) == ("trial", 2, "b")
