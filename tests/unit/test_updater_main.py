"""main: identity discovery, the offline boot of a board without one, a worker without a
card, and the decision file /init sources."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import pytest
from rackboot.initramfs.updater import __main__ as updater_main
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk, partition_device
from rackboot.initramfs.updater.errors import NoCard, UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Slot, SlotState
from rackboot.initramfs.updater.main import Decision, Identity, NoIdentity, discover_identity, run
from rackboot.master import serve

SHA_A, SHA_B = "a" * 64, "b" * 64


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
    root = fake_root(
        tmp_path,
        {"lo": "00:00:00:00:00:00", "eth0": "B8:27:EB:00:11:22", "wlan0": "b8:27:eb:99:99:99"},
        dt_serial=b"00000000abcdef01\0",
    )
    ident = discover_identity(root=root)
    assert (ident.mac, ident.serial, ident.node) == ("b8:27:eb:00:11:22", "00000000abcdef01", "b8-27-eb-00-11-22")


def test_cpuinfo_serial_and_given_mac(tmp_path):
    root = fake_root(tmp_path, {}, cpuinfo="processor\t: 0\nHardware\t: BCM2835\nSerial\t\t: 100000003c2d9b81\n")
    ident = discover_identity("52:54:00:12:34:56", root=root)
    assert (ident.node, ident.serial) == ("52-54-00-12-34-56", "100000003c2d9b81")


def test_no_interface_no_identity(tmp_path):
    with pytest.raises(NoIdentity, match="identity: no network interface"):
        discover_identity(root=fake_root(tmp_path, {"lo": "00:00:00:00:00:00"}))


def card_with(tmp_path, slots: SlotState, confirm: bytes = b"") -> str:
    """A card file holding only slot state (and a confirmation sector, if given)."""
    card = str(tmp_path / "card.img")
    with open(card, "wb") as f:
        f.truncate(8 << 20)
    with Disk(card) as disk:
        state.write(disk, slots)
        disk.write(state.CONFIRM, confirm.ljust(512, b"\0"))
    return card


@pytest.fixture
def silent_master():
    """A listening socket that never answers: any request the updater makes is seen."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def contacted(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_a_board_without_identity_boots_its_good_slot_offline_and_asks_nobody(tmp_path, silent_master):
    # slot b confirmed itself on its last boot: that is taken without a master as well
    card = card_with(
        tmp_path,
        SlotState(
            slots={"a": Slot("good", "lab", 1, SHA_A, 2), "b": Slot("trial", "lab", 2, SHA_B, 3, tries=2)},
            primary="b",
            last_good="a",
        ),
        confirm=f"rackboot-good b {SHA_B}\n".encode(),
    )
    url = f"http://127.0.0.1:{silent_master.getsockname()[1]}"
    lines = []
    decision = run(
        card,
        url,
        None,
        log=lines.append,
        master=MasterClient(url, connect_timeout=0.5, read_timeout=0.5, retries=0, report_timeout=0.5),
    )
    assert (decision.slot, decision.action, decision.device, decision.version) == ("b", "offline", f"{card}3", 2)
    assert decision.error == "identity: no network interface with a MAC address"
    assert "plan failed: identity: no network interface with a MAC address" in lines
    assert not contacted(silent_master)  # no plan asked for, no report sent
    with Disk(card, writable=False) as disk:
        after = state.read(disk)
    assert (after.slots["b"].state, after.last_good) == ("good", "b")


def test_a_board_without_identity_or_good_slot_is_left_to_the_rescue_loop(tmp_path, silent_master):
    card = card_with(tmp_path, SlotState())
    url = f"http://127.0.0.1:{silent_master.getsockname()[1]}"
    with pytest.raises(UpdaterError, match=r"^no good slot to boot \(plan: identity: no network interface"):
        run(card, url, None, log=lambda m: None, master=MasterClient(url, connect_timeout=0.5, retries=0))
    assert not contacted(silent_master)


def test_partition_device_names():
    assert partition_device("/dev/vda", 3) == "/dev/vda3"
    assert partition_device("/dev/mmcblk0", 2) == "/dev/mmcblk0p2"
    assert partition_device("/dev/nvme0n1", 1) == "/dev/nvme0n1p1"


def test_decision_shell_lines_survive_quotes():
    d = Decision(
        slot="b",
        partition_number=3,
        device="/dev/vda3",
        mount="ro+overlay:tmpfs",
        action="fallback",
        bytes_fetched=10,
        seconds=1.5,
        error="it's $(broken) `x`",
    )
    out = subprocess.run(
        ["sh", "-c", d.to_shell() + 'printf "%s|%s|%s|%s" "$slot" "$partition_number" "$error" "$data_device"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "b|3|it's $(broken) `x`|"


@pytest.fixture
def serve_master(tmp_path):
    """A real rackboot serve on loopback; its reports land in master/reports/<node>.jsonl."""
    (tmp_path / "master").mkdir()
    srv = serve.make_server(tmp_path / "master", "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", tmp_path / "master"
    srv.shutdown()
    srv.server_close()


def test_a_worker_without_a_card_says_so_once_and_is_powered_off_not_retried(tmp_path, serve_master):
    url, master_dir = serve_master
    missing = str(tmp_path / "vda")
    lines: list[str] = []
    with pytest.raises(NoCard, match=rf"^no card: {missing} does not exist$"):
        run(missing, url, Identity("52:54:00:12:34:56"), log=lines.append, card_wait=0)
    assert lines == [
        f"no card: {missing} does not exist; nothing to install to or boot from (no diskless boot): powering off"
    ]
    sent = [json.loads(line) for line in (master_dir / "reports/52-54-00-12-34-56.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["error"]) for r in sent] == [("error", f"no card: {missing} does not exist")]
    # the updater's command hands /init a decision to power off with that reason (exit 0: not the rescue loop)
    decision = tmp_path / "decision"
    argv = ["--disk", missing, "--master", url, "--mac", "52:54:00:12:34:56", "--decision-file", str(decision)]
    assert updater_main.main([*argv, "--card-wait", "0"]) == 0
    said = subprocess.run(
        ["sh", "-c", f'. {decision}; printf "%s|%s" "$action" "$error"'], capture_output=True, text=True, check=True
    ).stdout
    assert said == f"poweroff|no card: {missing} does not exist"


def test_a_card_that_shows_up_while_waited_for_is_used(tmp_path):
    card = card_with(tmp_path, SlotState(slots={"a": Slot("good", "lab", 1, SHA_A, 2)}, primary="a", last_good="a"))
    hidden = tmp_path / "not-yet"
    os.rename(card, hidden)
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the SD host finds the card during the first wait
        waits.append(seconds)
        os.rename(hidden, card)

    decision = run(card, "http://127.0.0.1:9", None, log=lambda m: None, card_wait=10, sleep=sleep)
    assert (decision.slot, decision.action) == ("a", "offline") and len(waits) == 1


def test_a_card_that_is_there_but_cannot_be_opened_is_left_to_the_rescue_loop(tmp_path):
    there = tmp_path / "vda"
    there.mkdir()  # open(O_RDWR) answers EISDIR: not "no card", so /init retries
    with pytest.raises(UpdaterError, match=r"cannot open") as caught:
        run(str(there), "http://127.0.0.1:9", None, log=lambda m: None, card_wait=0)
    assert not isinstance(caught.value, NoCard)
