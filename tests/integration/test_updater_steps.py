"""What the master and the console hear of each step of an update: the reports' phases,
slots, versions and errors, the console line that names a failed step, and which reports
time their own step (the download) rather than the whole update so far."""

from __future__ import annotations

import pytest
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.main import Identity, run

from tests.integration.test_updater_flow import SLOT_OFFSET, LossyCard, client
from tests.integration.updater_master import MAC, image_bytes, publish, write_plan


def update(card: str, url: str, **kw):
    lines: list[str] = []
    decision = run(card, url, Identity(MAC), master=client(url), log=lines.append, **kw)
    return decision, lines


def heard(server, since: int = 0) -> list[tuple]:
    return [(r["phase"], r["slot"], r["version"], r["error"]) for r in server.reports[since:]]


def install_v1(server, card) -> int:
    """v1 installed on a fresh card; how many reports that sent."""
    write_plan(server.root, publish(server.root, 1, image_bytes(1)))
    assert update(card, server.url)[0].action == "installed"
    return len(server.reports)


def test_an_install_reports_each_step_with_its_slot_and_version(server, card):
    install_v1(server, card)
    assert heard(server) == [
        ("plan", None, None, None),  # first contact: before its first plan request
        ("layout", None, None, None),
        ("download", "a", 1, None),
        ("commit", "a", 1, None),
        ("boot", "a", 1, None),
    ]
    assert all(r["bytes"] == server.image_bytes for r in server.reports[2:])


def test_a_failed_verify_is_named_in_the_error_and_on_the_console(server, card):
    seen = install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2), sha256="0" * 64))
    decision, lines = update(card, server.url)
    assert (decision.action, decision.slot, decision.version) == ("fallback", "a", 1)
    # a stream is verified inside its download (a source whose stream fails is passed over
    # for the next: sources.py), so a download that fails verification is not reported done
    (plan, error, boot) = heard(server, seen)
    assert plan == ("plan", None, None, None)  # the card took no serialled plan yet: still first contact
    assert error[:3] == ("error", "b", 2) and error[3] == f"verify: {decision.error}"
    assert boot == ("boot", "a", 1, decision.error)
    assert f"verify failed: {decision.error}" in lines


def test_a_read_back_that_differs_twice_is_named_in_the_error(server, card):
    seen = install_v1(server, card)
    write_plan(server.root, publish(server.root, 2, image_bytes(2)))
    decision, lines = update(card, server.url, open_disk=lambda path: LossyCard(path, bad_reads=2))
    assert (decision.action, decision.slot) == ("fallback", "a")
    assert heard(server, seen) == [
        ("plan", None, None, None),
        ("download", "b", 2, None),
        ("error", "b", 2, "read-back of slot b differs from what was written"),
        ("download", "b", 2, None),
        ("error", "b", 2, f"read-back: {decision.error}"),
        ("boot", "a", 1, decision.error),
    ]
    assert f"read-back failed: {decision.error}" in lines
    assert lines.count("reading back slot b") == 2


def test_a_plan_that_cannot_be_had_is_named_in_the_error(server, card):
    seen = install_v1(server, card)
    (server.root / "plans/52-54-00-12-34-56.json").unlink()
    decision, lines = update(card, server.url)
    assert (decision.action, decision.slot) == ("offline", "a")
    assert heard(server, seen) == [
        ("plan", None, None, None),
        ("error", None, None, f"plan: {decision.error}"),
        ("boot", "a", 1, decision.error),
    ]
    assert f"plan failed: {decision.error}" in lines


def test_a_plan_without_image_on_a_blank_card_fails_in_the_download_step(server, card):
    write_plan(server.root, None)
    lines: list[str] = []
    with pytest.raises(UpdaterError, match=r"^no good slot to boot \(download: plan: assigns no image"):
        run(card, server.url, Identity(MAC), master=client(server.url), log=lines.append)
    assert heard(server) == [
        ("plan", None, None, None),
        ("layout", None, None, None),
        ("error", None, None, "download: plan: assigns no image and no slot on the card is good"),
    ]
    assert lines[-1] == "download failed: plan: assigns no image and no slot on the card is good"


class ClockCard(Disk):
    """A card that is the updater's clock: each write into a slot takes 1 s, each slot
    state write 1000 s, and nothing else takes any time."""

    def __init__(self, path: str):
        super().__init__(path)
        self.ticks = 0
        self.slot_writes = 0

    def write(self, offset: int, data) -> None:
        if offset >= SLOT_OFFSET["a"]:
            self.ticks += 1
            self.slot_writes += 1
        elif offset in state.COPIES:
            self.ticks += 1000
        super().write(offset, data)


def test_the_download_report_times_the_stream_and_the_others_the_update_so_far(server, card):
    write_plan(server.root, publish(server.root, 1, image_bytes(1)))
    cards: list[ClockCard] = []
    open_disk = lambda path: cards.append(ClockCard(path)) or cards[-1]  # noqa: E731
    decision, _ = update(card, server.url, open_disk=open_disk, now=lambda: cards[-1].ticks)
    assert decision.action == "installed"
    seconds = {r["phase"]: r["seconds"] for r in server.reports}
    writes = cards[-1].slot_writes
    assert seconds["download"] == writes  # the stream alone, not the slot state written before it
    # the slot marked writing, then on trial: both before the commit is reported
    assert seconds["commit"] == writes + 2000
    assert seconds["boot"] == decision.seconds == cards[-1].ticks
