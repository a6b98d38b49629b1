"""The whole updater against a sparse file as the card and a real HTTP master on loopback."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rackboot.initramfs.updater import __main__ as updater_cli
from rackboot.initramfs.updater import install, mbr, state
from rackboot.initramfs.updater import main as updater_main
from rackboot.initramfs.updater.__main__ import main as cli_main
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.watchdog import NoWatchdog

from tests.integration.updater_master import MAC, CannedServer, image_bytes, publish, write_plan

MIB = 1 << 20
SLOT_OFFSET = {"a": 20 * MIB, "b": 84 * MIB}  # STANDARD layout


def client(url: str) -> MasterClient:
    return MasterClient(url, connect_timeout=1.0, read_timeout=0.5, retries=2, backoff=0.01, report_timeout=0.5)


def update(card: str, url: str, **kw):
    return run(card, url, Identity(MAC), master=client(url), log=lambda m: None, **kw)


def slot_bytes(card: str, slot: str, size: int) -> bytes:
    with open(card, "rb") as f:
        f.seek(SLOT_OFFSET[slot])
        return f.read(size)


def card_state(card: str):
    with Disk(card, writable=False) as d:
        return state.read(d)


MARK_GOOD = Path(__file__).resolve().parents[2] / "initramfs/rackboot-mark-good.sh"


def mark_good(card: str, decision, tmp_path: Path) -> str:
    """What the booted system does: rackboot-mark-good, fed the file /init leaves in /run."""
    booted = tmp_path / "booted"
    booted.write_text(decision.to_shell() + f"disk='{card}'\n")
    done = subprocess.run(
        ["sh", str(MARK_GOOD)],
        env={"RACKBOOT_BOOTED": str(booted), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def install_v1(server, card):
    v1 = image_bytes(1)
    write_plan(server.root, publish(server.root, 1, v1))
    decision = update(card, server.url)
    assert decision.action == "installed"
    mark_good(card, decision, Path(card).parent)
    return v1


def test_fresh_card_is_laid_out_installed_and_committed(server, card):
    data = image_bytes(1)
    write_plan(server.root, publish(server.root, 1, data))
    decision = update(card, server.url)
    assert (decision.slot, decision.partition_number, decision.action) == ("a", 2, "installed")
    assert decision.device == card + "2" and decision.data_device == card + "4"
    assert decision.mount == "ro+overlay:tmpfs" and decision.version == 1
    with open(card, "rb") as f:
        table = mbr.parse(f.read(512))
    assert [(e.number, e.start // 2048, e.sectors // 2048, e.type) for e in table.entries] == [
        (1, 4, 16, 0x0C),
        (2, 20, 64, 0x83),
        (3, 84, 64, 0x83),
        (4, 148, 108, 0x83),
    ]
    assert slot_bytes(card, "a", len(data)) == data
    st = card_state(card)
    # on trial (its first boot spent one of three tries) until the system confirms itself
    assert st.primary == "a" and st.last_good is None
    assert (st.slots["a"].state, st.slots["a"].tries) == ("trial", 2)
    assert st.slots["a"].sha256 == hashlib.sha256(data).hexdigest()
    assert decision.bytes_fetched == server.image_bytes > 0
    assert {r["phase"] for r in server.reports} >= {"download", "commit", "boot"}


def test_up_to_date_card_fetches_no_image_bytes(server, card):
    install_v1(server, card)
    served = server.image_bytes
    decision = update(card, server.url)
    assert (decision.slot, decision.action, decision.bytes_fetched) == ("a", "up-to-date", 0)
    assert server.image_bytes == served


def test_new_version_goes_to_the_other_slot_and_keeps_the_old_one_good(server, card):
    v1 = install_v1(server, card)
    v2 = image_bytes(2)
    write_plan(server.root, publish(server.root, 2, v2))
    decision = update(card, server.url)
    assert (decision.slot, decision.partition_number, decision.action) == ("b", 3, "installed")
    assert decision.device == card + "3"
    st = card_state(card)
    assert st.primary == "b" and st.slots["a"].state == "good" and st.slots["a"].version == 1
    assert slot_bytes(card, "a", len(v1)) == v1 and slot_bytes(card, "b", len(v2)) == v2


def test_an_older_version_is_refused_as_a_replay_and_the_current_slot_boots(server, card):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)))
    update(card, server.url)
    write_plan(server.root, "/images/example/1/manifest.json")
    decision = update(card, server.url)
    assert (decision.slot, decision.action, decision.version) == ("b", "refused", 2)
    assert "older than v2" in decision.error and card_state(card).primary == "b"
    assert server.reports[-2]["phase"] == "error" and "replay" in server.reports[-2]["error"]


def test_a_pinned_older_version_switches_back_without_fetching(server, card):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)))
    update(card, server.url)
    served = server.image_bytes
    write_plan(server.root, "/images/example/1/manifest.json", pin=True)
    decision = update(card, server.url)
    assert (decision.slot, decision.action, decision.bytes_fetched) == ("a", "up-to-date", 0)
    assert server.image_bytes == served and card_state(card).primary == "a"


def test_dropped_connection_resumes_with_range(server, card):
    data = image_bytes(3)
    manifest = publish(server.root, 1, data)
    write_plan(server.root, manifest)
    stream_size = (server.root / "images/example/1/rootfs.ext4.gz").stat().st_size
    server.faults.drop_after = stream_size // 2
    decision = update(card, server.url)
    assert decision.action == "installed"
    assert slot_bytes(card, "a", len(data)) == data
    ranges = server.range_requests()
    assert len(ranges) == 1 and ranges[0].headers["Range"] == f"bytes={stream_size // 2}-"
    assert stream_size <= server.image_bytes < 2 * stream_size


def test_resume_answered_with_200_restarts_from_zero(server, card):
    data = image_bytes(4)
    write_plan(server.root, publish(server.root, 1, data))
    stream_size = (server.root / "images/example/1/rootfs.ext4.gz").stat().st_size
    server.faults.drop_after = stream_size // 3
    server.faults.ignore_range = True
    decision = update(card, server.url)
    assert decision.action == "installed" and card_state(card).primary == "a"
    assert slot_bytes(card, "a", len(data)) == data
    assert server.range_requests() and server.image_bytes == stream_size // 3 + stream_size


def test_wrong_sha256_is_not_committed_and_the_old_slot_boots(server, card):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2), sha256="0" * 64))
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "fallback")
    assert "sha256" in decision.error
    st = card_state(card)
    assert st.primary == "a" and st.slots["b"].state == "bad"
    assert any(r["phase"] == "error" and "sha256" in r["error"] for r in server.reports)


def test_truncated_stream_is_refused(server, card):
    install_v1(server, card)
    v2 = image_bytes(2)
    cut = gzip.compress(v2, mtime=0)[:-5000]
    write_plan(server.root, publish(server.root, 2, v2, stream=cut))
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "fallback")
    assert "truncated" in decision.error
    assert card_state(card).slots["b"].state != "good"


def test_oversized_stream_is_refused(server, card):
    install_v1(server, card)
    v2 = image_bytes(2)
    big = gzip.compress(v2 + bytes(MIB), mtime=0)
    write_plan(server.root, publish(server.root, 2, v2, stream=big))
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "fallback")
    assert "oversized" in decision.error
    assert card_state(card).primary == "a"


def test_manifest_that_does_not_parse_falls_back(server, card):
    install_v1(server, card)
    path = publish(server.root, 2, image_bytes(2))
    (server.root / path.lstrip("/")).write_bytes(b'{"format": 1, "image": "example", "version": "two"}\n')
    write_plan(server.root, path)
    decision = update(card, server.url)
    assert (decision.slot, decision.action, decision.bytes_fetched) == ("a", "fallback", 0)
    assert decision.error.startswith("manifest: ")


def test_unknown_node_on_a_fresh_card_raises(server, card):
    publish(server.root, 1, image_bytes(1))  # no plans/ at all: 404
    with pytest.raises(UpdaterError, match="404"):
        update(card, server.url)


def test_unknown_node_boots_the_last_good_slot(server, card):
    install_v1(server, card)
    (server.root / "plans/52-54-00-12-34-56.json").unlink()
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "offline")
    assert "404" in decision.error


def test_default_plan_serves_unknown_nodes(server, card):
    data = image_bytes(1)
    write_plan(server.root, publish(server.root, 1, data), node="default")
    assert update(card, server.url).action == "installed"


def test_plan_for_a_card_too_small(server, card):
    parts = (("boot", 4, 16, "0c"), ("a", None, 200, "83"), ("b", None, 200, "83"), ("data", None, "rest", "83"))
    write_plan(server.root, publish(server.root, 1, image_bytes(1)), parts=parts)
    with pytest.raises(UpdaterError, match=r"card too small: the plan needs 421 MiB, the card has 256 MiB"):
        update(card, server.url)
    with open(card, "rb") as f:
        assert f.read(512) == bytes(512)  # nothing written


def test_layout_change_keeps_boot_and_data(server, card):
    install_v1(server, card)
    with open(card, "r+b") as f:  # contents that must survive
        f.seek(4 * MIB)
        f.write(b"BOOT" * 1024)
        f.seek(148 * MIB)
        f.write(b"DATA" * 1024)
    new = (("boot", 4, 16, "0c"), ("a", None, 48, "83"), ("b", None, 80, "83"), ("data", None, "rest", "83"))
    v2 = image_bytes(2)
    write_plan(server.root, publish(server.root, 2, v2), parts=new)
    decision = update(card, server.url)
    with open(card, "rb") as f:
        table = mbr.parse(f.read(512))
        f.seek(4 * MIB)
        boot = f.read(4096)
        f.seek(148 * MIB)
        data = f.read(4096)
    assert [(e.start // 2048, e.sectors // 2048) for e in table.entries] == [(4, 16), (20, 48), (68, 80), (148, 108)]
    assert boot == b"BOOT" * 1024 and data == b"DATA" * 1024
    # both slots moved, so neither still counts as holding v1: v2 lands in a
    assert (decision.slot, decision.action, decision.version) == ("a", "installed", 2)
    st = card_state(card)
    assert st.slot("b").state == "empty" and st.primary == "a" and st.slots["a"].version == 2
    assert {r["phase"] for r in server.reports} >= {"layout"}


def test_layout_mismatch_with_repartition_never_is_refused(server, card):
    install_v1(server, card)
    before = first_sector(card)
    new = (("boot", 4, 16, "0c"), ("a", None, 48, "83"), ("b", None, 80, "83"), ("data", None, "rest", "83"))
    write_plan(server.root, publish(server.root, 2, image_bytes(2)), parts=new, repartition="never")
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "fallback")
    assert "repartition never" in decision.error
    assert first_sector(card) == before


def first_sector(card: str) -> bytes:
    with open(card, "rb") as f:
        return f.read(512)


def test_offline_boot_mounts_as_the_card_was_built_to(server, card):
    install_v1(server, card)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        decision = update(card, f"http://127.0.0.1:{s.getsockname()[1]}", offline_mount="ro+overlay:data")
    assert (decision.action, decision.mount, decision.data_device) == ("offline", "ro+overlay:data", card + "4")


def test_master_unreachable_boots_the_last_good_slot(server, card):
    install_v1(server, card)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        decision = update(card, dead)
    assert (decision.slot, decision.action, decision.bytes_fetched) == ("a", "offline", 0)
    assert decision.device == card + "2"


def test_master_answering_500_boots_the_last_good_slot(server, card):
    install_v1(server, card)
    before = len(server.requests)
    server.faults.status = 500
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "offline")
    assert "HTTP 500" in decision.error
    plan_gets = [r for r in server.requests[before:] if r.path.startswith("/plans/")]
    assert len(plan_gets) == 3  # retries=2: bounded


def test_a_header_of_other_digits_boots_the_last_good_slot(server, card):
    """A Content-Length of '²' passed isdigit and crashed int(): the ValueError escaped run()
    and a card with a good slot went into the rescue loop."""
    install_v1(server, card)
    canned = CannedServer(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}")
    try:
        decision = update(card, canned.url)
    finally:
        canned.close()
    assert (decision.slot, decision.action) == ("a", "offline")
    plan = "/plans/52-54-00-12-34-56.json"
    assert decision.error.startswith(f"master {canned.url}: GET {plan}: a bad Content-Length '²' (after 3 attempts)")


def broken(exception: Exception):
    """A step that raises what no step expects: the fault stands for any bug or surprise."""

    def step(*args, **kw):
        raise exception

    return step


def test_an_unexpected_exception_in_an_install_falls_back_and_is_reported(server, card, monkeypatch):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)))
    monkeypatch.setattr(install, "read_back", broken(ValueError("injected fault")))
    decision = update(card, server.url)
    assert (decision.slot, decision.action, decision.version) == ("a", "fallback", 1)
    assert decision.error == "unexpected ValueError: injected fault"
    st = card_state(card)
    assert (st.primary, st.slots["a"].state, st.slots["b"].state) == ("a", "good", "bad")
    errors = [r["error"] for r in server.reports if r["phase"] == "error"]
    assert errors == ["read-back: unexpected ValueError: injected fault"]
    assert server.reports[-1]["phase"] == "boot" and server.reports[-1]["slot"] == "a"


def test_an_unexpected_exception_before_the_plan_boots_the_good_slot_offline(server, card, monkeypatch):
    install_v1(server, card)
    monkeypatch.setattr(updater_main, "parse_plan", broken(KeyError("format")))
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "offline")
    assert decision.error == "unexpected KeyError: 'format'"
    assert [(r["phase"], r["error"]) for r in server.reports[-2:]] == [
        ("error", "plan: unexpected KeyError: 'format'"),
        ("boot", "unexpected KeyError: 'format'"),
    ]


def test_an_unexpected_exception_without_a_good_slot_is_left_to_the_rescue_loop(server, card, monkeypatch):
    write_plan(server.root, publish(server.root, 1, image_bytes(1)))
    monkeypatch.setattr(updater_main, "parse_plan", broken(KeyError("format")))
    with pytest.raises(UpdaterError, match=r"^no good slot to boot \(plan: unexpected KeyError: 'format'\)$"):
        update(card, server.url)


def test_cli_boots_offline_when_the_identity_fails_unexpectedly(server, card, tmp_path, monkeypatch, capsys):
    install_v1(server, card)
    monkeypatch.setattr(updater_cli, "discover_identity", broken(RuntimeError("sysfs went away")))
    out = tmp_path / "decision"
    assert cli_main(["--disk", card, "--master", server.url, "--decision-file", str(out)]) == 0
    assert "action='offline'" in out.read_text() and "slot='a'" in out.read_text()
    err = capsys.readouterr().err
    assert "unexpected RuntimeError: sysfs went away; the master cannot be asked: offline boot" in err


def test_cli_says_in_one_line_what_escaped(server, card, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(updater_cli, "run", broken(OverflowError("a\nb")))
    out = tmp_path / "decision"
    assert cli_main(["--disk", card, "--master", server.url, "--mac", MAC, "--decision-file", str(out)]) == 1
    assert capsys.readouterr().err == "rackboot: error: unexpected OverflowError: a b\n"


@pytest.mark.slow
def test_master_hanging_times_out(server, card):
    install_v1(server, card)
    server.faults.hang = 3.0
    decision = update(card, server.url)
    assert (decision.slot, decision.action) == ("a", "offline")
    assert "timed out" in decision.error


@pytest.mark.slow
def test_hanging_master_on_a_fresh_card_raises(server, card):
    server.faults.hang = 3.0
    with pytest.raises(UpdaterError, match="no good slot.*timed out"):
        update(card, server.url)


def test_no_layout_uses_the_card_table(server, card):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)))
    decision = update(card, server.url, layout_check=False)
    assert (decision.slot, decision.action) == ("b", "installed")


def test_cli_writes_a_decision_init_can_source(server, card, tmp_path):
    write_plan(server.root, publish(server.root, 1, image_bytes(1)))
    out = tmp_path / "decision"
    assert cli_main(["--disk", card, "--master", server.url, "--mac", MAC, "--decision-file", str(out)]) == 0
    shown = subprocess.run(
        ["sh", "-c", f'. "{out}"; echo "$slot|$device|$mount|$action|$data_device"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == f"a|{card}2|ro+overlay:tmpfs|installed|{card}4\n"


def test_cli_without_a_good_slot_exits_1(server, card, tmp_path, capsys):
    out = tmp_path / "decision"
    assert cli_main(["--disk", card, "--master", server.url, "--mac", MAC, "--decision-file", str(out)]) == 1
    assert not out.exists()
    assert "rackboot: error: no good slot" in capsys.readouterr().err


def test_module_runs_as_a_top_level_package_like_on_the_worker(server, card, tmp_path):
    """/init runs `python3 -m updater` from /usr/lib/rackboot: only relative imports work there."""
    import rackboot.initramfs.updater as pkg

    lib = tmp_path / "lib"
    shutil.copytree(os.path.dirname(pkg.__file__), lib / "updater", ignore=shutil.ignore_patterns("__pycache__"))
    write_plan(server.root, publish(server.root, 1, image_bytes(1)))
    out = tmp_path / "decision"
    proc = subprocess.run(
        [
            sys.executable,
            "-s",
            "-m",
            "updater",
            "--disk",
            card,
            "--master",
            server.url,
            "--mac",
            MAC,
            "--decision-file",
            str(out),
        ],
        cwd=lib,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "slot='a'" in out.read_text()


def test_blank_data_partition_is_flagged_for_formatting_and_a_filesystem_is_left_alone(server, card):
    install_v1(server, card)
    assert update(card, server.url).data_blank  # laid out, never formatted
    data_start = (4 + 16 + 64 + 64) << 20
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={data_start}", card, "4M"], check=True)
    assert not update(card, server.url).data_blank


class LossyCard(Disk):
    """A card that acknowledges every write but, for its first ``bad_reads`` read-backs,
    returns one flipped byte: the silent corruption a file-backed disk cannot produce."""

    def __init__(self, path: str, bad_reads: int):
        super().__init__(path)
        self.bad_reads = bad_reads
        self.reading_back = False

    def drop_cache(self, offset: int, length: int) -> None:  # the read-back starts here
        super().drop_cache(offset, length)
        self.reading_back = self.bad_reads > 0
        self.bad_reads -= 1

    def read(self, offset: int, length: int) -> bytes:
        data = super().read(offset, length)
        if self.reading_back and offset >= SLOT_OFFSET["a"]:
            self.reading_back = False
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def test_read_back_mismatch_is_written_once_more_then_committed(server, card):
    data = image_bytes(1)
    write_plan(server.root, publish(server.root, 1, data))
    decision = update(card, server.url, open_disk=lambda path: LossyCard(path, bad_reads=1))
    assert decision.action == "installed" and card_state(card).slots["a"].state == "trial"
    assert server.image_bytes == 2 * (server.root / "images/example/1/rootfs.ext4.gz").stat().st_size  # twice
    assert any("read-back of slot a differs" in (r["error"] or "") for r in server.reports)


def test_read_back_mismatch_twice_leaves_the_slot_uncommitted_and_the_old_one_boots(server, card):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)))
    decision = update(card, server.url, open_disk=lambda path: LossyCard(path, bad_reads=2))
    assert (decision.action, decision.slot, decision.version) == ("fallback", "a", 1)
    assert "again; the slot stays uncommitted" in decision.error
    st = card_state(card)
    assert st.primary == "a" and st.slots["b"].state == "bad"


def install_v2(server, card, tries: int = 3):
    install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)), tries=tries)
    decision = update(card, server.url)
    assert (decision.action, decision.slot) == ("installed", "b")
    return decision


def test_a_new_version_replaces_an_unconfirmed_one_and_never_the_last_good_slot(server, card):
    install_v2(server, card)  # b holds v2 on trial; a holds v1, the last good
    write_plan(server.root, publish(server.root, 3, image_bytes(3)))
    decision = update(card, server.url)
    assert (decision.action, decision.slot, decision.version) == ("installed", "b", 3)
    st = card_state(card)
    assert (st.slots["a"].state, st.slots["a"].version, st.last_good) == ("good", 1, "a")
    assert slot_bytes(card, "a", 3 << 20) == image_bytes(1)


def test_a_failed_install_over_an_unconfirmed_slot_leaves_the_card_on_the_good_one(server, card):
    install_v2(server, card)  # b: v2 on trial, primary; a: v1, last good
    write_plan(server.root, publish(server.root, 3, image_bytes(3), sha256="0" * 64))
    decision = update(card, server.url)
    assert (decision.slot, decision.action, decision.version) == ("a", "fallback", 1)
    st = card_state(card)  # what the next boot reads: b's old v2 bytes are gone, so b must not boot
    assert (st.primary, st.last_good, st.slots["b"].state) == ("a", "a", "bad")


def test_mark_good_confirms_the_trial_slot_at_the_next_boot(server, card, tmp_path):
    decision = install_v2(server, card)
    assert "slot b (example v2) confirmed" in mark_good(card, decision, tmp_path)
    st = card_state(card)
    assert (st.slots["b"].state, st.last_good) == ("trial", "a")  # the updater has not run yet
    again = update(card, server.url)
    st = card_state(card)
    assert (again.slot, again.action) == ("b", "up-to-date")
    assert (st.slots["b"].state, st.slots["b"].tries, st.last_good) == ("good", None, "b")
    assert any(r["phase"] == "confirm" and r["slot"] == "b" for r in server.reports)
    with open(card, "rb") as f:
        f.seek(3 << 20)
        assert f.read(512) == bytes(512)  # the confirmation is consumed


def test_slot_that_never_confirms_falls_back_after_its_tries_and_is_not_installed_again(server, card):
    install_v2(server, card, tries=2)  # the install's boot spent one try
    served = server.image_bytes
    assert (update(card, server.url).slot, card_state(card).slots["b"].tries) == ("b", 0)
    decision = update(card, server.url)  # no tries left: back to v1
    assert (decision.slot, decision.action, decision.version) == ("a", "fallback", 1)
    assert "never confirmed itself" in decision.error
    st = card_state(card)
    assert (st.primary, st.slots["b"].state) == ("a", "failed")
    assert any("never confirmed itself" in (r["error"] or "") for r in server.reports)
    decision = update(card, server.url)  # the plan still says v2: it is not tried again
    assert (decision.slot, decision.action) == ("a", "fallback") and server.image_bytes == served
    write_plan(server.root, publish(server.root, 3, image_bytes(3)))  # the master ships a fix
    assert (update(card, server.url).action, card_state(card).slots["b"].version) == ("installed", 3)


def test_a_confirmation_for_another_image_is_ignored(server, card, tmp_path):
    decision = install_v2(server, card)
    stale = type(decision)(**{**decision.__dict__, "sha256": "0" * 64})
    mark_good(card, stale, tmp_path)
    update(card, server.url)
    assert card_state(card).slots["b"].state == "trial"


def test_offline_boot_of_a_trial_slot_counts_too(server, card):
    install_v2(server, card, tries=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        decision = update(card, f"http://127.0.0.1:{s.getsockname()[1]}")
    assert (decision.slot, decision.action) == ("a", "fallback")


def test_every_step_of_an_install_tells_the_watchdog(server, card):
    class Recorder(NoWatchdog):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def progress(self, allow=None):
            self.steps += 1

    dog = Recorder()
    write_plan(server.root, publish(server.root, 1, image_bytes(1)))
    assert update(card, server.url, watchdog=dog).action == "installed"
    reads = 3  # the 3 MiB image read back in 1 MiB chunks
    assert dog.steps >= 2 + reads + 1  # plan and manifest, read-back, at least one stream chunk


class StateWritesFail(Disk):
    """A card whose slot-state sectors went bad: reads work, writes there fail."""

    def write(self, offset: int, data) -> None:
        if offset in state.COPIES:
            raise UpdaterError(f"disk {self.path}: write at {offset}: Input/output error")
        super().write(offset, data)


def test_unwritable_slot_state_still_boots_a_confirmed_slot_and_installs_nothing(server, card, tmp_path):
    decision = install_v2(server, card)
    mark_good(card, decision, tmp_path)  # v2 confirmed itself; the updater has not seen it yet
    lines: list[str] = []
    again = run(card, server.url, Identity(MAC), master=client(server.url), log=lines.append, open_disk=StateWritesFail)
    assert (again.slot, again.action, again.version) == ("b", "up-to-date", 2)
    assert any(line.startswith("confirm failed: disk") for line in lines)
    assert card_state(card).slots["b"].state == "trial"  # nothing was written...
    with open(card, "rb") as f:
        f.seek(state.CONFIRM)
        assert f.read(13) == b"rackboot-good"  # ...and the confirmation waits for the next boot
    assert update(card, server.url).action == "up-to-date" and card_state(card).slots["b"].state == "good"


def test_unwritable_slot_state_boots_the_good_slot_instead_of_an_uncountable_trial(server, card):
    install_v2(server, card)  # v2 on trial in b, never confirmed
    write_plan(server.root, publish(server.root, 3, image_bytes(3)))
    served = server.image_bytes
    decision = run(
        card, server.url, Identity(MAC), master=client(server.url), log=lambda m: None, open_disk=StateWritesFail
    )
    assert (decision.slot, decision.action, decision.version) == ("a", "fallback", 1)
    assert "Input/output error" in decision.error and server.image_bytes == served  # nothing streamed
    st = card_state(card)
    assert (st.primary, st.slots["b"].version, st.slots["b"].state) == ("b", 2, "trial")  # untouched
