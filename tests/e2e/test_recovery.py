"""Workers that recover with nobody at their console: a blank worker switched on before
its master retries until the master answers and then installs (a person at the console
still gets a rescue shell meanwhile, and leaving it retries), a worker whose network
interface is gone boots the good slot its card holds, and one with no card at all says so
and powers off (`rackboot qemu` without --disk).

One build and one provisioned card (slot a holds v1, which confirmed itself; the
session's: tests/e2e/conftest.py) are shared; each case boots a fresh blank card or a copy
of that card."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from rackboot import config
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.master.inventory import Inventory
from rackboot.qemu import harness

pytestmark = [pytest.mark.e2e, pytest.mark.network]

RESCUE = "rackboot: rescue: updater failed; retrying in {} s"


@dataclass(frozen=True)
class Rack:
    cfg: config.Config
    out: Path  # the build; its sdcard.img makes blank cards
    card: Path  # slot a holds v1 (confirmed by v1's init); the master has v1 assigned


@pytest.fixture(scope="module")
def rack(example, tmp_path_factory) -> Rack:
    card = example.start(1, tmp_path_factory.mktemp("recovery"))  # v1 installed; no master runs
    return Rack(example.cfg, example.out, card)


def blank_card(rack: Rack, dest: Path) -> Path:
    harness.blank_card(rack.out / "sdcard.img", dest)
    return dest


def test_a_blank_worker_switched_on_before_its_master_installs_once_the_master_is_up(rack, tmp_path):
    """Its updater fails and waits, again and again, until the master answers; meanwhile a
    person at the console gets a rescue shell, and leaving it retries at once. One boot:
    the wait after the shell ends by itself, and that try finds the master up."""
    disk = blank_card(rack, tmp_path / "blank.img")
    log = tmp_path / "console.log"
    # nothing listens on the master's port yet, and no TFTP either: the card's own initramfs runs
    with harness.new_worker(rack.cfg, rack.out, disk, log, offline=True, console_input=True) as worker:
        worker.expect(re.escape(RESCUE.format(5) + " (press Enter for a shell)"), timeout=300)
        worker.type("\n")
        worker.expect(r"rescue shell: 'exit' retries now; it is closed after 900 s", timeout=30)
        worker.type("echo person-$((6*7))\n")
        worker.expect(r"^person-42$", timeout=30)  # the typed line reads 'person-$((6*7))'
        worker.type("exit\n")
        # the next try comes at the exit, long before the shell's 900 s bound
        worker.expect(re.escape(RESCUE.format(10)), timeout=120)
        master = harness.MasterThread(rack.cfg)  # the worker is waiting out its second backoff now
        try:
            worker.expect("installing example v1 into slot a", timeout=120)
            worker.expect("rackboot-demo: v1 is up", timeout=300)
            worker.wait_exit(timeout=60)
        finally:
            master.stop()
    console = log.read_text(errors="replace")
    assert "master unreachable; booting from the card" in console
    assert re.search(r"^rackboot: plan failed: master http://", console, re.M), console
    assert "booting slot a (installed)" in console
    # the one shell the person opened; nobody opened another: the last wait ended by itself
    assert console.count("rescue shell: 'exit' retries now") == 1


def test_a_worker_without_a_network_interface_boots_the_good_slot_on_its_card(rack, tmp_path):
    disk = tmp_path / "card.img"
    subprocess.run(["cp", "--sparse=always", rack.card, disk], check=True)  # 1 GiB, mostly holes
    log = tmp_path / "console.log"
    worker = harness.new_worker(rack.cfg, rack.out, disk, log, offline=True, nic=False)
    assert worker.command()[worker.command().index("-nic") :][:2] == ["-nic", "none"]
    with worker:
        worker.expect("rackboot-demo: v1 is up", timeout=300)
        worker.wait_exit(timeout=60)
    console = log.read_text(errors="replace")
    assert "master unreachable; booting from the card" in console  # U-Boot found no NIC either
    assert "rackboot: no network interface" in console  # /init
    assert (
        "rackboot: identity: no network interface with a MAC address in /sys/class/net; "
        "the master cannot be asked: offline boot"
    ) in console
    assert "slot a confirmed itself good (example v1)" in console  # v1's confirmation, taken offline
    assert "booting slot a (offline)" in console
    assert "rescue" not in console and "Traceback" not in console
    with Disk(str(disk), writable=False) as d:
        after = state.read(d)
    assert (after.primary, after.last_good, after.slots["a"].state) == ("a", "a", "good")


def test_rackboot_qemu_without_a_disk_says_the_worker_has_no_card_and_ends_when_it_powers_off(rack, tmp_path):
    log = tmp_path / "console.log"
    master = harness.MasterThread(rack.cfg)
    try:
        result = subprocess.run(
            [str(harness.rackboot_command()), "qemu", "-c", str(rack.cfg.path), "--log", str(log), "--timeout", "120"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        master.stop()
    assert result.stdout.startswith("booting qemu-virt/arm64 with no disk (a worker without a card); console log:")
    # not "worker did not power off within 120 s": the worker said why and switched itself off
    assert result.returncode == 1
    assert result.stderr == (
        f"rackboot: error: worker powered off with nothing to boot: no card: /dev/vda does not exist (log: {log})\n"
    )
    console = log.read_text(errors="replace")
    assert "rackboot: nothing to boot, powering off: no card: /dev/vda does not exist" in console
    assert "rescue" not in console and "Traceback" not in console
    # QEMU's own MAC, as the story's worker had: the last report is this boot's only one. Its
    # node key lives on the card it lacks, so the report comes unsigned, and the master, which
    # pinned this node's key at an earlier boot, keeps it in the history as refused, uncounted
    inventory = Inventory(rack.cfg.master.directory)
    history = inventory.history("52-54-00-12-34-56")
    said = [(r["phase"], r["error"]) for r in history if "card" in (r["error"] or "")]
    assert said == [("error", "no card: /dev/vda does not exist")] and history[-1]["error"] == said[0][1]
    node = inventory.node("52-54-00-12-34-56")
    assert not history[-1]["signed"] and bool(history[-1]["refused"]) == (node is not None and node.pubkey is not None)
