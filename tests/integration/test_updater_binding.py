"""Signatures that bind (issue 20, parts 1 and 2): the updater against the real master
(`rackboot serve` on loopback, plans written by rackboot's own writers and signed with the
master key) takes a signed document only when it was signed for this node and for what the
plan asked. Each attack below is refused with one error line in the node's reports, and the
good slot boots: another node's plan, the default plan after a plan of its own, a replayed
plan (a lower serial, or one from before serials), another image's or version's manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rackboot import config
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import PlanKind, PlanRecord, parse_plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import plans, serials, serve, signing

from tests.helpers import write_config
from tests.integration.signed_rack import sign
from tests.integration.updater_master import MAC, NODE, image_bytes, publish

OTHER = "52-54-00-65-43-21"
CARD = 1 << 30  # sparse: the config's standard layout (boot 128, slots 384 MiB each, data)
GOLDEN = Path(__file__).resolve().parents[1] / "data"


class Rack:
    """A master tree with a key, served by `rackboot serve`, and one blank card."""

    def __init__(self, tmp_path: Path, key: Path, **master):
        (tmp_path / "master").mkdir()
        self.cfg = config.load(write_config(tmp_path, master={"key": str(key), **master}))
        self.root = self.cfg.master.directory
        self.key = key
        self.card = str(tmp_path / "card.img")
        with open(self.card, "wb") as f:
            f.truncate(CARD)
        self.server = serve.make_server(self.root, quiet=True, config=self.cfg)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(self, version: int, image: str = "example") -> str:
        manifest = publish(self.root, version, image_bytes(version + 10 * len(image)), image=image)
        sign(self.root, manifest, self.key)
        return manifest

    def assign(self, node: str, version: int, **kw) -> Path:
        return plans.assign(self.cfg, node=node, image="example", version=version, **kw)

    def update(self, log=None):
        master = MasterClient(self.server.url, read_timeout=5.0, retries=1, backoff=0.01, report_timeout=2.0)
        verifier = Verifier(str(signing.public_key_path(self.key)))
        return run(
            self.card, self.server.url, Identity(MAC), master=master, log=log or (lambda m: None), verifier=verifier
        )

    def confirm(self) -> None:
        """What rackboot-mark-good does in the booted system: the next boot takes it as good."""
        with Disk(self.card) as d:
            st = state.read(d)
            assert st.primary is not None
            slot = st.slot(st.primary)
            d.write(state.CONFIRM, f"{state.CONFIRM_WORD} {st.primary} {slot.sha256}\n".encode().ljust(512, b"\0"))
            d.fsync()

    def installed(self, version: int) -> None:
        """Boot until ``version`` is installed and confirmed good."""
        decision = self.update()
        assert (decision.action, decision.version) == ("installed", version), decision.error
        self.confirm()

    def state(self):
        with Disk(self.card, writable=False) as d:
            return state.read(d)

    def reports(self) -> list[dict]:
        path = self.root / "reports" / f"{NODE}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def image_bytes_sent(self) -> int:
        return sum(n for p, n in self.server.stats()["bytes_sent"].items() if p.endswith(".gz"))

    def serve_as(self, source: str, target: str) -> None:
        """The document at ``source`` and its signature, served at ``target`` (what any cache,
        mirror or host that answers at the master's address can do)."""
        for suffix in ("", ".sig"):
            dest = self.root / (target.lstrip("/") + suffix)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / (source.lstrip("/") + suffix), dest)


@pytest.fixture
def rack(tmp_path, keys):
    r = Rack(tmp_path, keys["master"])
    yield r
    r.stop()


def refused(rack: Rack, before: int, message: str, *, slot: str, version: int, hostname: str | None = None):
    """The boot that just ran: refused, the good slot booted, one error line naming why
    (``message``: the report's, which starts with the step's name)."""
    decision = rack.update()
    assert (decision.action, decision.slot, decision.version) == ("refused", slot, version)
    assert message.split(": ", 1)[1] in decision.error and "\n" not in decision.error
    assert rack.state().slot(slot).state == "good"
    assert decision.settings is not None and decision.settings.hostname == hostname  # nothing of the refused plan
    new = rack.reports()[before:]
    errors = [r for r in new if r["phase"] == "error"]
    assert len(errors) == 1 and errors[0]["error"].startswith(message), new
    # (a confirm first, when the boot took the last install's confirmation)
    assert [r["phase"] for r in new if r["phase"] != "confirm"] == ["error", "boot"] and new[-1]["slot"] == slot
    return decision


def test_another_nodes_plan_served_at_this_nodes_path_is_refused(rack):
    rack.publish(1)
    rack.publish(2)
    rack.assign(NODE, 1)
    rack.installed(1)
    rack.assign(OTHER, 2, hostname="db-primary")  # signed by the same key, for another node
    rack.serve_as(f"/plans/{OTHER}.json", f"/plans/{NODE}.json")
    before, sent = len(rack.reports()), rack.image_bytes_sent()
    refused(rack, before, f"plan: the plan is node {OTHER}'s, not this node's ({NODE}); refused", slot="a", version=1)
    assert rack.image_bytes_sent() == sent  # not a byte of the other node's image
    assert rack.state().plan == PlanRecord(NODE, PlanKind.OWN, 1)


@pytest.mark.parametrize("pattern", ["", "worker-{index:02d}"])
def test_the_default_plan_after_a_plan_of_its_own_is_refused(tmp_path, keys, pattern):
    """Without a hostname pattern serve hands out plans/default.json itself; with one, the
    default plan named for the node (node its id, ``default`` true): the default either way."""
    rack = Rack(tmp_path, keys["master"], hostname=pattern)
    try:
        rack.publish(1)
        rack.publish(2)
        for _ in range(3):  # the default plan's sequence runs ahead of the node's own
            rack.assign("default", 1)
        rack.installed(1)  # a new node follows the default plan: taken
        assert rack.state().plan == PlanRecord(NODE, PlanKind.DEFAULT, 3)
        rack.assign(NODE, 2)  # its own plan starts its own sequence at 1, below the default's 3: taken
        rack.installed(2)
        assert rack.state().plan == PlanRecord(NODE, PlanKind.OWN, 1)
        (rack.root / "plans" / f"{NODE}.json").unlink()  # serve falls back to the default plan (v1)
        (rack.root / "plans" / f"{NODE}.json.sig").unlink()
        before = len(rack.reports())
        refused(
            rack,
            before,
            "plan: the default plan, but this node has had a plan of its own (serial 1)",
            slot="b",
            version=2,
        )
        assert rack.state().plan == PlanRecord(NODE, PlanKind.OWN, 1)
    finally:
        rack.stop()


def test_a_replayed_plan_with_a_lower_serial_is_refused(rack):
    rack.publish(1)
    rack.publish(2)
    rack.assign(NODE, 1)
    rack.installed(1)
    own = rack.root / "plans" / f"{NODE}.json"
    old_plan, old_sig = own.read_bytes(), own.with_name(own.name + ".sig").read_bytes()  # serial 1: v1
    rack.assign(NODE, 2)
    rack.installed(2)
    assert rack.state().plan == PlanRecord(NODE, PlanKind.OWN, 2)
    current = own.read_bytes(), own.with_name(own.name + ".sig").read_bytes()
    own.write_bytes(old_plan)  # the old plan, validly signed, replayed
    own.with_name(own.name + ".sig").write_bytes(old_sig)
    before = len(rack.reports())
    refused(
        rack,
        before,
        "plan: the plan's serial 1 (own plan) is lower than 2, the newest this card acted on",
        slot="b",
        version=2,
    )
    own.write_bytes(current[0])  # the same plan again (equal serial) is taken
    own.with_name(own.name + ".sig").write_bytes(current[1])
    decision = rack.update()
    assert (decision.action, decision.slot, decision.version) == ("up-to-date", "b", 2)


def test_a_plan_without_a_serial_is_refused_once_the_card_took_a_serialled_one(rack):
    rack.publish(1)
    rack.publish(2)
    own = rack.root / "plans" / f"{NODE}.json"
    # an older master's plan (no serial) is taken while the card never took a serialled one
    rack.assign(NODE, 1)
    plan = parse_plan(own.read_bytes())
    own.write_bytes(own.read_bytes().replace(b',"serial":1', b""))
    sign(rack.root, f"/plans/{NODE}.json", rack.key)
    assert parse_plan(own.read_bytes()).serial is None and plan.serial == 1
    rack.installed(1)
    assert rack.state().plan is None  # it binds nothing: the card has no serial to hold to
    rack.assign(NODE, 2)  # the upgraded master's plans carry serials
    rack.installed(2)
    own.write_bytes(own.read_bytes().replace(b',"serial":2', b"").replace(b"/2/", b"/1/"))  # v1 again, pre-upgrade
    sign(rack.root, f"/plans/{NODE}.json", rack.key)
    before = len(rack.reports())
    refused(
        rack, before, "plan: the plan has no serial, and this card took serial 2 of its own plan", slot="b", version=2
    )


@pytest.mark.parametrize(
    "source, message",
    [
        ("/images/other/2/manifest.json", "holds other v2, not example v2 as the plan asked"),
        ("/images/example/1/manifest.json", "holds example v1, not example v2 as the plan asked"),
    ],
)
def test_another_images_or_versions_manifest_at_the_planned_path_is_refused(rack, source, message):
    rack.publish(1)
    rack.publish(2, image="other")
    rack.assign(NODE, 1)
    rack.installed(1)
    planned = rack.publish(2)
    rack.assign(NODE, 2)
    rack.serve_as(source, planned)  # a signed manifest, but not the one the plan named
    before, sent = len(rack.reports()), rack.image_bytes_sent()
    refused(rack, before, f"download: manifest: {planned} {message}", slot="a", version=1)
    assert rack.image_bytes_sent() == sent


def test_a_card_with_a_rev2_state_migrates_and_keeps_its_slots(rack):
    """An old card (slot state rev2, from before serials) updating with this initramfs: the
    state is read as it was and written as rev3 with the plan it acted on."""
    area = (GOLDEN / "slot-state.format1.rev2.bin").read_bytes()
    with Disk(rack.card) as d:
        for i, offset in enumerate(state.COPIES):
            d.write(offset, area[i * state.RESERVED : (i + 1) * state.RESERVED])
        d.fsync()
    old = rack.state()
    assert old.plan is None and old.seq == 4
    rack.publish(1)
    rack.assign(NODE, 1)
    rack.update()
    now = rack.state()
    assert now.plan == PlanRecord(NODE, PlanKind.OWN, 1) and now.seq > old.seq


def test_the_master_keeps_serials_across_a_restart_and_a_removed_plan(rack):
    rack.publish(1)
    assert [parse_plan(rack.assign(NODE, 1).read_bytes()).serial for _ in range(3)] == [1, 2, 3]
    assert parse_plan(rack.assign("default", 1).read_bytes()).serial == 1  # the default's own sequence
    (rack.root / "plans" / f"{NODE}.json").unlink()  # a node forgotten, then planned again by another process
    cli = [
        sys.executable,
        "-m",
        "rackboot",
        "plan",
        "-c",
        str(rack.cfg.path),
        "--image",
        "example",
        "--version",
        "1",
        "--node",
        MAC,
    ]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = (rack.root / "plans" / f"{NODE}.json").read_bytes()
    assert parse_plan(plan).serial == 4
    Verifier(str(signing.public_key_path(rack.key))).check(
        "plan", plan, (rack.root / f"plans/{NODE}.json.sig").read_bytes()
    )
    assert serials.read(rack.root) == {NODE: 4, "default": 1}


def test_a_blank_cards_first_plan_already_carries_the_name_the_pattern_gives_it(tmp_path, keys):
    """The master files a node on its first report (issue 19): a blank card reports `plan`
    before its first plan request, so the default plan it gets is already named for it."""
    r = Rack(tmp_path, keys["master"], hostname="worker-{index:02d}")
    try:
        r.publish(1)
        r.assign("default", 1)
        decision = r.update()
        assert decision.action == "installed" and decision.settings is not None
        assert decision.settings.hostname == "worker-01"  # from the first boot, as from every other
        phases = [report["phase"] for report in r.reports()]
        assert phases[0] == "plan" and phases.count("plan") == 1
        r.confirm()
        assert r.update().settings.hostname == "worker-01"
        assert [report["phase"] for report in r.reports()].count("plan") == 1  # the card has a plan now: no more
    finally:
        r.stop()
