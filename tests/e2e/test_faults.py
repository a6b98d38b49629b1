"""Faults below the updater: QEMU's blkdebug makes the worker's disk fail writes or
reads inside slot b while v2 goes in. The updater must report the error, leave slot b
uncommitted and boot v1 from slot a; the same card without the fault then takes v2.

One provisioned card (slot a holds v1, v2 published; the session's: tests/e2e/conftest.py)
is shared; each case boots a copy."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from rackboot import config
from rackboot.initramfs.updater import mbr, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import BOOTABLE
from rackboot.initramfs.updater.main import DEFAULT_NUMBERS
from rackboot.master import plans
from rackboot.qemu import harness
from rackboot.qemu.runner import DiskFault

pytestmark = [pytest.mark.e2e, pytest.mark.network]


@dataclass(frozen=True)
class Card:
    cfg: config.Config
    out: Path  # the build the worker netboots
    disk: Path  # slot a holds v1; v2 is published and assigned
    slot_b: int  # slot b's first sector
    v2_sectors: int


@pytest.fixture(scope="module")
def card(example, tmp_path_factory) -> Card:
    work = tmp_path_factory.mktemp("faults")
    disk = example.start(1, work)  # v1 installed
    cfg = example.cfg
    v2 = harness.publish_example(cfg, cfg.base / "rootfs", work, 2)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    with open(disk, "rb") as f:
        slot_b = mbr.parse(f.read(512)).entry(DEFAULT_NUMBERS["b"]).start
    return Card(cfg, example.out, disk, slot_b, v2.size // 512)


def copy_card(card: Card, dest: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", card.disk, dest], check=True)  # 1 GiB, mostly holes
    return dest


def received(cfg: config.Config) -> list[dict]:
    """Every report the master holds, oldest first (one worker: one file)."""
    return [
        json.loads(line)
        for f in sorted((cfg.master.directory / "reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def boot(card: Card, disk: Path, log: Path, faults: list[DiskFault] = ()) -> tuple[str, list[dict]]:
    """Boot ``disk`` with the master up until a version is up: the console and the reports
    the master got during this boot."""
    before = len(received(card.cfg))
    master = harness.MasterThread(card.cfg)
    try:
        with harness.new_worker(card.cfg, card.out, disk, log, faults=faults) as worker:
            worker.expect(r"rackboot-demo: v\d is up", timeout=300)
            worker.wait_exit(timeout=60)
    finally:
        master.stop()
    return log.read_text(errors="replace"), received(card.cfg)[before:]


def slots(disk: Path) -> state.SlotState:
    with Disk(str(disk), writable=False) as d:
        return state.read(d)


def assert_fell_back_to_v1(console: str, reports: list[dict], disk: Path, phase: str) -> None:
    """The updater named the I/O error, booted v1 from slot a and committed nothing for slot b."""
    assert re.search(rf"rackboot: {phase} failed: disk /dev/vda: .*Input/output error$", console, re.M), console
    assert "booting slot a (fallback)" in console
    assert "rackboot-demo: v1 is up" in console and "v2 is up" not in console
    assert "committing slot b" not in console and "Traceback" not in console
    card = slots(disk)
    assert card.slots["b"].state not in BOOTABLE  # "bad": never trial or good
    assert (card.primary, card.last_good, card.slots["a"].state) == ("a", "a", "good")
    errors = [r["error"] for r in reports if r["phase"] == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"{phase}: ") and "Input/output error" in errors[0]
    assert not [r for r in reports if r["phase"] == "commit"]
    assert [(r["slot"], r["version"]) for r in reports if r["phase"] == "boot"] == [("a", 1)]


def test_fault_rules_reach_qemu(qemu_worker, tmp_path):
    """The runner's blkdebug spec, checked by qemu-io inside a paused worker (no guest runs)."""
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(bytes(1 << 20))
    worker = qemu_worker(
        disks=[scratch],
        extra_args=["-S"],
        faults=[DiskFault("write", sector=8), DiskFault("read", sector=16, once=True)],
    )
    steps = [
        ("write 0 4k", "wrote 4096/4096"),
        ("write 4k 4k", "write failed: Input/output error"),
        ("read 8k 4k", "read failed: Input/output error"),
        ("read 8k 4k", "read 4096/4096"),
        ("read 4k 4k", "read 4096/4096"),
    ]  # reads ignore the write rule; once means once
    for command, answer in steps:
        worker.qmp("human-monitor-command", **{"command-line": f'qemu-io disk0 "{command}"'})
        worker.expect(re.escape(answer), timeout=10)  # qemu-io prints on QEMU's stdout: the console


def test_write_errors_in_slot_b_leave_it_uncommitted_and_a_clean_boot_installs_v2(card, tmp_path):
    disk = copy_card(card, tmp_path / "disk.img")
    console, reports = boot(card, disk, tmp_path / "fault.log", [DiskFault("write", sector=card.slot_b)])
    assert "installing example v2 into slot b" in console
    assert_fell_back_to_v1(console, reports, disk, "download")

    # the same card, the same master, no fault: v2 goes into slot b as it should
    console, reports = boot(card, disk, tmp_path / "clean.log")
    assert "installing example v2 into slot b" in console and "rackboot-demo: v2 is up" in console
    assert not re.search(r"^rackboot: .*failed", console, re.M) and "I/O error" not in console
    after = slots(disk)
    assert (after.slots["b"].state, after.primary, after.last_good) == ("trial", "b", "a")
    assert [(r["phase"], r["slot"], r["version"]) for r in reports] == [
        ("download", "b", 2),
        ("hook", "b", 2),
        ("commit", "b", 2),
        ("boot", "b", 2),
    ]


def test_read_errors_during_read_back_leave_slot_b_uncommitted(card, tmp_path):
    disk = copy_card(card, tmp_path / "disk.img")
    # v2's superblock: only the read-back reads it (writing whole pages reads nothing; the block
    # delta reads slot b, which held nothing, only where v2 has zeros, to leave zeros unwritten)
    fault = DiskFault("read", sector=card.slot_b + 2)
    console, reports = boot(card, disk, tmp_path / "fault.log", [fault])
    assert "reading back slot b" in console
    downloads = [(r["slot"], r["version"], r["error"]) for r in reports if r["phase"] == "download"]
    assert downloads == [("b", 2, None)]  # written and verified; only reading it back failed
    assert_fell_back_to_v1(console, reports, disk, "read-back")


def test_a_card_whose_state_sectors_fail_writes_keeps_booting_its_good_slot(card, tmp_path):
    disk = copy_card(card, tmp_path / "disk.img")
    before = slots(disk)
    faults = [DiskFault("write", sector=offset // 512) for offset in state.COPIES]
    console, reports = boot(card, disk, tmp_path / "fault.log", faults)
    assert re.search(r"rackboot: confirm failed: disk /dev/vda: .*Input/output error$", console, re.M), console
    assert "booting slot a (fallback)" in console and "rackboot-demo: v1 is up" in console
    assert "installing example v2" not in console and "Traceback" not in console
    assert slots(disk) == before  # not a byte of state changed: old state, never a torn one
    errors = [r["error"] for r in reports if r["phase"] == "error"]
    # one line each, in order: the first state write after the confirmation's is the plan's record
    assert [e.split(":")[0] for e in errors] == ["confirm", "plan"]
