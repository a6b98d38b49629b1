"""Golden formats: every revision of every on-card and on-master format that may be out in
the field (tests/data, made by the code of its revision: tests/data/README.md) is read by
today's code with its values, and today's writers make the current revision byte for byte.

A writer that grows a field fails the byte-for-byte test: add a new sample revision (and
keep the old one), or bump "format" if older readers must refuse it (notes/formats.md).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import struct
import subprocess
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from rackboot import graph
from rackboot.initramfs.updater import formats, layout, mbr, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import Refused, UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import (
    Hook,
    Latest,
    Layout,
    Manifest,
    Partition,
    Plan,
    Report,
    Slot,
    SlotState,
    SourceUse,
)
from rackboot.initramfs.updater.main import Decision, Identity, run
from rackboot.initramfs.updater.node import NodeSettings, machine_id
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import plans, publish, serve, signing

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
KEY = DATA / "keys" / "test-master.key"
MARK_GOOD = REPO / "initramfs" / "rackboot-mark-good.sh"

MAC = "52:54:00:12:34:56"
NODE = "52-54-00-12-34-56"
MIB = 1 << 20
CARD = 256 * MIB
H1 = hashlib.sha256(b"example v1").hexdigest()
H2 = hashlib.sha256(b"example v2").hexdigest()
LAYOUT = Layout(
    (
        Partition("boot", 4, 16, "0c"),
        Partition("a", 20, 64, "83"),
        Partition("b", 84, 64, "83"),
        Partition("data", 148, "rest", "83"),
    ),
    "allowed",
)
GOOD_A = Slot("good", "example", 1, H1, 2)


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


# --- slot state: two copies at 1 MiB and 2 MiB ------------------------------------------------


def card_with(tmp_path, *, area: bytes = b"", confirm: bytes = b"", table: bytes = b"") -> str:
    """A sparse card with the given samples where the writers put them."""
    path = tmp_path / "card.img"
    with open(path, "wb") as f:
        f.truncate(CARD)
        f.write(table)
        for i, offset in enumerate(state.COPIES):
            f.seek(offset)
            f.write(area[i * state.RESERVED : (i + 1) * state.RESERVED])
        if confirm:
            f.seek(state.CONFIRM)
            f.write(confirm)
    return str(path)


def copies(tmp_path, name: str):
    with Disk(card_with(tmp_path, area=sample(name)), writable=False) as d:
        return state.read_copies(d), state.read(d)


def test_slot_state_rev1_without_tries_is_read(tmp_path):
    (newer, older), current = copies(tmp_path, "slot-state.format1.rev1.bin")
    assert (
        newer
        == current
        == SlotState(seq=3, slots={"a": GOOD_A, "b": Slot("good", "example", 2, H2, 3)}, primary="b", last_good="b")
    )
    assert older == SlotState(
        seq=2, slots={"a": GOOD_A, "b": Slot("writing", "example", 2, H2, 3)}, primary="a", last_good="a"
    )
    assert all(s.tries is None for s in newer.slots.values())


REV2_STATES = [
    SlotState(slots={"a": GOOD_A}, primary="a", last_good="a"),
    SlotState(slots={"a": GOOD_A, "b": Slot("writing", "example", 2, H2, 3)}, primary="a", last_good="a"),
    SlotState(slots={"a": GOOD_A, "b": Slot("trial", "example", 2, H2, 3, tries=3)}, primary="b", last_good="a"),
    SlotState(slots={"a": GOOD_A, "b": Slot("trial", "example", 2, H2, 3, tries=2)}, primary="b", last_good="a"),
]


def test_slot_state_rev2_with_trial_slots_is_read(tmp_path):
    (older, newer), current = copies(tmp_path, "slot-state.format1.rev2.bin")
    assert (older.seq, newer.seq) == (3, 4) and current == newer
    assert older == SlotState(seq=3, slots=REV2_STATES[2].slots, primary="b", last_good="a")
    assert newer == SlotState(seq=4, slots=REV2_STATES[3].slots, primary="b", last_good="a")


def test_slot_state_writer_makes_the_rev2_area_byte_for_byte(tmp_path):
    path = card_with(tmp_path)
    with Disk(path) as d:
        for s in REV2_STATES:
            state.write(d, s)
        area = b"".join(d.read(offset, state.RESERVED) for offset in state.COPIES)
    assert area == sample("slot-state.format1.rev2.bin")


def record(body: dict, seq: int) -> bytes:
    """A slot-state record laid out by hand (not by state.encode), as notes/formats.md says."""
    data = (json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n").encode()
    head = b"RKBS" + struct.pack("<II", seq, len(data)) + data
    return head + struct.pack("<I", zlib.crc32(head))


def newest_record(name: str) -> dict:
    raw = sample(name)[state.RESERVED :]  # rev2's seq 4 is the second copy
    length = struct.unpack_from("<I", raw, 8)[0]
    return json.loads(raw[12 : 12 + length])


def test_slot_state_record_with_unknown_keys_is_read():
    body = newest_record("slot-state.format1.rev2.bin")
    body["later_addition"] = {"x": [1]}
    body["slots"]["b"]["later_addition"] = "y"
    assert state.decode(record(body, 4)) == SlotState(seq=4, slots=REV2_STATES[3].slots, primary="b", last_good="a")


def test_slot_state_of_a_higher_format_is_refused_by_name():
    body = {**newest_record("slot-state.format1.rev2.bin"), "format": 2}
    with pytest.raises(UpdaterError, match=r"^slot state: format: unsupported format 2 \(this updater reads 1\)$"):
        formats.parse_slot_state(json.dumps(body))


# --- the confirmation sector and the file it is made from -------------------------------------

BOOTED = Decision(
    slot="b",
    partition_number=3,
    device="/dev/mmcblk0p3",
    mount="ro+overlay:tmpfs",
    action="installed",
    bytes_fetched=1234,
    seconds=5.5,
    image="example",
    version=2,
    sha256=H2,
    data_device="/dev/mmcblk0p4",
    data_blank=False,
)


BOOTED_REV2 = replace(
    BOOTED,
    settings=NodeSettings(
        node=NODE,
        hostname="worker-01",
        machine_id=machine_id(NODE, "example"),
        persist=("/etc/ssh", "/var/lib/myservice"),
        planned=True,
        first_boot="/run/rackboot/first-boot.sh",
        first_boot_timeout=120,
    ),
)


def test_booted_file_is_what_init_writes_today():
    assert (BOOTED_REV2.to_shell() + "disk='/dev/mmcblk0'\n").encode() == sample("booted.rev2.sh")
    # rev2 only adds lines after rev1's, which stay as they were
    assert sample("booted.rev2.sh").startswith(sample("booted.rev1.sh").removesuffix(b"disk='/dev/mmcblk0'\n"))


@pytest.mark.parametrize("name", ["booted.rev1.sh", "booted.rev2.sh"])
def test_mark_good_writes_the_confirmation_sector_byte_for_byte(tmp_path, name):
    path = card_with(tmp_path)
    booted = tmp_path / "booted"
    booted.write_bytes(sample(name) + f"disk='{path}'\n".encode())  # the card, not /dev/mmcblk0
    subprocess.run(
        ["sh", str(MARK_GOOD)],
        env={"RACKBOOT_BOOTED": str(booted), "PATH": os.environ["PATH"]},
        capture_output=True,
        check=True,
    )
    with open(path, "rb") as f:
        f.seek(state.CONFIRM)
        assert f.read(512) == sample("confirm.rev1.bin")
    assert sample("confirm.rev1.bin") == f"{state.CONFIRM_WORD} b {H2}\n".encode().ljust(512, b"\0")


# --- the partition table --------------------------------------------------------------------


def test_mbr_is_read_and_laid_out_byte_for_byte():
    table = mbr.parse(sample("mbr.rev1.bin"))
    assert [(e.number, e.type, e.start, e.sectors, e.bootable) for e in table.entries] == [
        (1, 0x0C, 4 * 2048, 16 * 2048, True),
        (2, 0x83, 20 * 2048, 64 * 2048, False),
        (3, 0x83, 84 * 2048, 64 * 2048, False),
        (4, 0x83, 148 * 2048, 108 * 2048, False),
    ]
    assert table.signature == zlib.crc32(b"rackboot:" + NODE.encode())
    assert mbr.dump(table) == sample("mbr.rev1.bin")
    assert mbr.dump(layout.decide(LAYOUT, None, CARD, node=NODE).table) == sample("mbr.rev1.bin")


# --- a card in the field: today's updater boots it offline -------------------------------------


def boot_offline(path: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused at once
        master = MasterClient(dead, connect_timeout=1.0, read_timeout=0.5, retries=1, backoff=0.01, report_timeout=0.5)
        return run(path, dead, Identity(MAC), master=master, log=lambda m: None, verifier=Verifier(None))


def test_rev1_card_boots_its_primary_slot(tmp_path):
    path = card_with(tmp_path, area=sample("slot-state.format1.rev1.bin"), table=sample("mbr.rev1.bin"))
    decision = boot_offline(path)
    assert (decision.slot, decision.action, decision.device, decision.sha256) == ("b", "offline", path + "3", H2)


def test_rev2_card_takes_its_confirmation_and_boots_the_confirmed_slot(tmp_path):
    path = card_with(
        tmp_path,
        area=sample("slot-state.format1.rev2.bin"),
        table=sample("mbr.rev1.bin"),
        confirm=sample("confirm.rev1.bin"),
    )
    decision = boot_offline(path)
    assert (decision.slot, decision.action, decision.device) == ("b", "offline", path + "3")
    with Disk(path, writable=False) as d:
        now = state.read(d)
        assert (now.seq, now.slots["b"], now.last_good) == (5, Slot("good", "example", 2, H2, 3), "b")
        assert d.read(state.CONFIRM, 512) == bytes(512)


# --- plans -----------------------------------------------------------------------------------

PLAN_REV3 = Plan(
    node="default", layout=LAYOUT, image="/images/example/2/manifest.json", mount="ro+overlay:tmpfs", pin=True, tries=5
)
PLAN_UNSIGNED = Plan(node=NODE, layout=LAYOUT, image=None, mount="ro+overlay:data", pin=False, tries=3)
PLAN_REV4 = replace(PLAN_REV3, node=NODE, hostname="worker-01", persist=("/etc/ssh", "/var/lib/myservice"))


@pytest.mark.parametrize(
    "name, pin, tries",
    [
        ("plan.format1.rev1.json", False, 3),  # no pin, no tries: defaults
        ("plan.format1.rev2.json", True, 3),  # no tries: default
        ("plan.format1.rev3.json", True, 5),
    ],
)
def test_plans_of_every_revision_are_read(name, pin, tries):
    plan = formats.parse_plan(sample(name))
    assert plan == Plan(
        node="default",
        layout=LAYOUT,
        image="/images/example/2/manifest.json",
        mount="ro+overlay:tmpfs",
        pin=pin,
        tries=tries,
    )
    assert (plan.layout.number("a"), plan.layout.number("b"), plan.layout.number("data")) == (2, 3, 4)


def test_plan_rev4_with_a_hostname_and_persisted_paths_is_read_and_its_bytes_kept():
    assert formats.parse_plan(sample("plan.format1.rev4.json")) == PLAN_REV4
    assert formats.dump(PLAN_REV4) == sample("plan.format1.rev4.json")  # no serial: the bytes before rev7


def test_write_plan_makes_plan_rev7_with_its_seventh_serial_byte_for_byte(tmp_path):
    for _ in range(7):
        path = plans.write_plan(tmp_path, NODE, PLAN_REV4, key=KEY)
    assert path.read_bytes() == sample("plan.format1.rev7.serial.json")
    assert (tmp_path / f"plans/{NODE}.json.sig").read_bytes() == sample("plan.format1.rev7.serial.json.sig")


def test_unsigned_plan_that_keeps_the_card_is_read():
    assert formats.parse_plan(sample("plan.format1.rev3.unsigned.json")) == PLAN_UNSIGNED


def test_plans_without_a_serial_keep_their_bytes_and_write_plan_gives_each_its_first(tmp_path):
    assert formats.dump(PLAN_REV3) == sample("plan.format1.rev3.json")
    assert formats.dump(PLAN_UNSIGNED) == sample("plan.format1.rev3.unsigned.json")
    signed = plans.write_plan(tmp_path, "default", PLAN_REV3, key=KEY)
    unsigned = plans.write_plan(tmp_path, NODE, PLAN_UNSIGNED)
    assert signed.read_bytes() == formats.dump(replace(PLAN_REV3, serial=1))
    Verifier(str(signing.public_key_path(KEY))).check(
        "default.json", signed.read_bytes(), (tmp_path / "plans/default.json.sig").read_bytes()
    )
    assert unsigned.read_bytes() == formats.dump(replace(PLAN_UNSIGNED, serial=1))  # a sequence of its own
    assert not (tmp_path / f"plans/{NODE}.json.sig").exists()


# --- manifests, hooks, latest.json --------------------------------------------------------------


def manifest(version: int, **extra) -> Manifest:
    return Manifest(
        image="example",
        version=version,
        size=64 * MIB,
        sha256=hashlib.sha256(f"example v{version}".encode()).hexdigest(),
        crc32="0badcafe",
        stream="rootfs.ext4.gz",
        stream_size=12345678,
        stream_sha256=hashlib.sha256(f"example v{version} stream".encode()).hexdigest(),
        label=f"v{version}",
        created=1700000000,
        fstype="ext4",
        kernel_release="6.1.0-28-arm64",
        **extra,
    )


HOOK = Hook(
    name="post-install",
    file="post-install.sh",
    size=83,
    sha256="edeadc0c7e7ffeec014877c6fb4484021c6721b14c75a40daa22b75894e25229",
    timeout=120,
)


def test_manifest_rev1_without_hooks_is_read_and_written_byte_for_byte():
    m = formats.parse_manifest(sample("manifest.format1.rev1.json"))
    assert m == manifest(1) and m.hooks == () and m.hook("post-install") is None
    assert m.stream_path("/images/example/1/manifest.json") == "/images/example/1/rootfs.ext4.gz"
    assert formats.dump(manifest(1)) == sample("manifest.format1.rev1.json")


def test_manifest_rev2_with_a_hook_is_read_and_written_byte_for_byte():
    m = formats.parse_manifest(sample("manifest.format1.rev2.hooks.json"))
    assert m == manifest(2, hooks=(HOOK,)) and m.hook("post-install") == HOOK
    script = sample("post-install.rev1.sh")
    assert (len(script), hashlib.sha256(script).hexdigest()) == (HOOK.size, HOOK.sha256)
    assert formats.beside("/images/example/2/manifest.json", HOOK.file) == "/images/example/2/post-install.sh"
    assert formats.dump(manifest(2, hooks=(HOOK,))) == sample("manifest.format1.rev2.hooks.json")


FIRST_BOOT = Hook(
    name="first-boot",
    file="first-boot.sh",
    size=len(sample("first-boot.rev1.sh")),
    sha256=hashlib.sha256(sample("first-boot.rev1.sh")).hexdigest(),
    timeout=300,
)


def test_manifest_rev3_with_a_first_boot_hook_is_read_and_written_byte_for_byte(tmp_path):
    m = formats.parse_manifest(sample("manifest.format1.rev3.first-boot.json"))
    assert m == manifest(2, hooks=(FIRST_BOOT,)) and m.hook("first-boot") == FIRST_BOOT
    assert formats.dump(manifest(2, hooks=(FIRST_BOOT,))) == sample("manifest.format1.rev3.first-boot.json")
    (tmp_path / "hook").write_bytes(sample("first-boot.rev1.sh"))
    [(hook, _)] = publish.read_hooks({"first-boot": tmp_path / "hook"}, 300, signed=True)
    assert hook == FIRST_BOOT


def test_publish_pins_the_hook_as_the_sample_does(tmp_path):
    (tmp_path / "hook").write_bytes(sample("post-install.rev1.sh"))
    [(hook, script)] = publish.read_hooks({"post-install": tmp_path / "hook"}, formats.HOOK_TIMEOUT, signed=True)
    assert hook == HOOK and script == sample("post-install.rev1.sh")


def test_latest_is_read_and_written_byte_for_byte():
    latest = Latest(image="example", version=2, manifest="/images/example/2/manifest.json")
    assert formats.parse_latest(sample("latest.format1.rev1.json")) == latest
    assert formats.dump(latest) == sample("latest.format1.rev1.json")


# --- signatures ------------------------------------------------------------------------------

SIGNED = [
    "plan.format1.rev2.json",
    "plan.format1.rev3.json",
    "manifest.format1.rev1.json",
    "manifest.format1.rev2.hooks.json",
    "plan.format1.rev4.json",
    "manifest.format1.rev3.first-boot.json",
    "plan.format1.rev7.serial.json",
    "plan.format1.rev7.named-default.json",
]


@pytest.mark.parametrize("name", SIGNED)
def test_signatures_verify_on_the_worker_and_are_remade_byte_for_byte(name):
    data, sig = sample(name), sample(name + ".sig")
    Verifier(str(signing.public_key_path(KEY))).check(name, data, sig)
    assert signing.sign(KEY, data) == sig  # Ed25519 signatures are deterministic
    with pytest.raises(Refused, match="does not verify"):
        Verifier(str(signing.public_key_path(KEY))).check(name, data.replace(b'"format":1', b'"format":1 '), sig)


# --- reports --------------------------------------------------------------------------------

REPORTS = {
    "report.rev1.json": Report(
        node=NODE, phase="boot", bytes=1234, seconds=5.5, slot="b", version=2, time=1700000100.25
    ),
    "report.rev2.json": Report(
        node=NODE, phase="hook", seconds=0.125, slot="b", version=2, time=1700000200.5, output="post-install ok\n"
    ),
    "report.rev3.json": Report(node=NODE, phase="confirm", slot="b", version=2, time=1700000300.75),
    "report.rev4.json": Report(
        node=NODE, phase="wait", bytes=12345678, seconds=7.25, slot="b", version=2, time=1700000400.5
    ),
}
# revisions after reports.rev1.jsonl was made, which keeps its four lines
LATER_REPORTS = {
    "report.rev5.json": Report(
        node=NODE,
        phase="hook",
        seconds=0.25,
        slot="b",
        version=2,
        time=1700000500.5,
        output="first boot of worker-01\n",
        hostname="worker-01",
        hook="first-boot",
    ),
    # where a worker given three sources took its bytes from (make_golden_sources.py)
    "report.rev10.sources.json": Report(
        node=NODE,
        phase="boot",
        bytes=4194304,
        seconds=12.5,
        slot="b",
        version=2,
        time=1700001000.25,
        hostname="worker-01",
        sources=(
            SourceUse(
                "http://10.0.2.2:8080",
                0,
                "master http://10.0.2.2:8080: GET /plans/52-54-00-12-34-56.json: connection refused (after 2 attempts)",
            ),
            SourceUse(
                "http://10.1.0.2:8080",
                1048576,
                f"GET /images/example/2/rootfs.ext4.gz: verify example v2: sha256 is {'0' * 64}, "
                f"the manifest says {'1' * 64}",
            ),
            SourceUse("http://cache.rack/rackboot", 3145728, None),
        ),
    ),
}


@pytest.mark.parametrize("name", sorted({**REPORTS, **LATER_REPORTS}))
def test_reports_of_every_revision_are_read_and_written_byte_for_byte(name):
    report = {**REPORTS, **LATER_REPORTS}[name]
    assert formats.parse_report(sample(name)) == report
    assert formats.dump(report) == sample(name)


def test_stored_report_lines_are_read():
    lines = sample("reports.rev1.jsonl").splitlines(keepends=True)
    assert [formats.parse_report(line) for line in lines] == list(REPORTS.values())
    assert [json.loads(line)["received"] for line in lines] == [
        1700000100.75,
        1700000201.0,
        1700000301.25,
        1700000401.0,
    ]


@pytest.fixture
def master(tmp_path):
    srv = serve.make_server(tmp_path, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, tmp_path
    srv.shutdown()
    srv.server_close()


def test_serve_stores_each_report_as_the_sample_line(master):
    srv, root = master
    for name in sorted(REPORTS):
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
        conn.request("POST", "/report", body=sample(name))
        assert conn.getresponse().status == 204
        conn.close()
    stored = (root / f"reports/{NODE}.jsonl").read_bytes().splitlines(keepends=True)
    golden = sample("reports.rev1.jsonl").splitlines(keepends=True)
    for line, want in zip(stored, golden, strict=True):  # the arrival time is today's, not the sample's
        received = json.loads(line)["received"]
        assert line == formats.dump({**json.loads(want), "received": received})


def test_serve_takes_a_rev10_report_into_its_inventory_and_its_report_lines(master):
    """A master reads the report that says where a worker's bytes came from (rev10) as it
    reads the older ones: into the inventory, and stored whole in the node's report lines."""
    srv, root = master
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
    conn.request("POST", "/report", body=sample("report.rev10.sources.json"))
    assert conn.getresponse().status == 204
    conn.close()
    (line,) = (root / f"reports/{NODE}.jsonl").read_bytes().splitlines()
    assert formats.parse_report(line) == LATER_REPORTS["report.rev10.sources.json"]
    history = srv.fleet.inventory.history(NODE)
    assert [(h["phase"], h["slot"], h["version"], h["bytes"]) for h in history] == [("boot", "b", 2, 4194304)]


# --- artefacts.json ----------------------------------------------------------------------------

ARTEFACTS = (
    ("kernel", "kernel", "vmlinuz"),
    ("initramfs", "initramfs", "initramfs.cpio.gz"),
    ("card-script", "uboot-script", "boot.scr"),
    ("sdcard", "sdcard", "sdcard.img"),
)


def test_artefacts_json_is_read_and_written_byte_for_byte(tmp_path, monkeypatch):
    doc = json.loads(sample("artefacts.rev1.json"))
    assert doc["builder"] == "0.1.0"
    assert {e["name"]: (e["kind"], e["path"], e["size"]) for e in doc["artefacts"]} == {
        name: (kind, path, len(name) + 1) for name, kind, path in ARTEFACTS
    }
    monkeypatch.setattr(graph, "__version__", doc["builder"])  # a value in the sample, not its format
    arts, hashes = [], {}
    for name, kind, path in ARTEFACTS:  # each file holds its name and a newline
        (tmp_path / path).write_bytes(f"{name}\n".encode())
        arts.append(graph.Artefact(name, kind, path, {}, lambda _: None))
        hashes[name] = graph.sha256_file(tmp_path / path)
    assert {e["name"]: e["sha256"] for e in doc["artefacts"]} == hashes
    graph.write_manifest(tmp_path, arts, hashes)
    assert (tmp_path / "artefacts.json").read_bytes() == sample("artefacts.rev1.json")


# --- evolution: later additions are tolerated, a higher format is refused -----------------------

PARSERS = {
    "plan": formats.parse_plan,
    "manifest": formats.parse_manifest,
    "latest": formats.parse_latest,
    "report": formats.parse_report,
}
DOCUMENTS = [
    "plan.format1.rev1.json",
    "plan.format1.rev2.json",
    "plan.format1.rev3.json",
    "plan.format1.rev3.unsigned.json",
    "manifest.format1.rev1.json",
    "manifest.format1.rev2.hooks.json",
    "latest.format1.rev1.json",
    "report.rev1.json",
    "report.rev2.json",
    "report.rev3.json",
    "report.rev4.json",
    "plan.format1.rev4.json",
    "manifest.format1.rev3.first-boot.json",
    "report.rev5.json",
    "report.rev9.signed.json",
    "report.rev10.sources.json",
    "plan.format1.rev7.serial.json",
    "plan.format1.rev7.named-default.json",
]


def parser(name: str):
    return PARSERS[name.split(".")[0]]


def with_later_additions(doc: dict) -> dict:
    """The document as a later writer might add to it: a new key at the top and in nested objects."""
    doc = json.loads(json.dumps(doc))
    doc["later_addition"] = {"x": [1]}
    if "layout" in doc:
        doc["layout"]["later_addition"] = 1
        doc["layout"]["partitions"][0]["later_addition"] = True
    for hook in doc.get("hooks", []):
        hook["later_addition"] = "y"
    return doc


@pytest.mark.parametrize("name", DOCUMENTS)
def test_unknown_keys_are_tolerated(name):
    parse = parser(name)
    assert parse(json.dumps(with_later_additions(json.loads(sample(name))))) == parse(sample(name))


@pytest.mark.parametrize("name", [n for n in DOCUMENTS if not n.startswith("report.")])
def test_a_higher_format_is_refused_by_name(name):
    doc = {**json.loads(sample(name)), "format": 2}
    what = name.split(".")[0]
    with pytest.raises(UpdaterError, match=rf"^{what}: format: unsupported format 2 \(this updater reads 1\)$"):
        parser(name)(json.dumps(doc))


def test_every_sample_is_covered():
    """A sample added to tests/data without a test here is a sample nobody checks."""
    covered = {
        *DOCUMENTS,
        *(n + ".sig" for n in SIGNED),
        "slot-state.format1.rev1.bin",
        "slot-state.format1.rev2.bin",
        "booted.rev1.sh",
        "booted.rev2.sh",
        "first-boot.rev1.sh",
        "confirm.rev1.bin",
        "mbr.rev1.bin",
        "post-install.rev1.sh",
        "reports.rev1.jsonl",
        "artefacts.rev1.json",
        # the boot files' samples, checked in test_golden_bootfiles.py
        *(f"{n}{sig}" for n in ("plan.format1.rev5.boot.json", "boot.format1.rev1.json") for sig in ("", ".sig")),
        "boot-record.rev1.bin",
        "report.rev7.boot-files.json",
        # the block delta's samples, checked in test_golden_delta.py
        *(f"{n}.format1.rev1.bin" for n in ("index", "pack")),
        *(f"manifest.format1.rev5.delta.json{sig}" for sig in ("", ".sig")),
        "report.rev8.delta.json",
        *(f"{n}.format1.rev2.bin" for n in ("index", "pack")),
        *(f"manifest.format1.rev6.block-delta.json{sig}" for sig in ("", ".sig")),
        "indexdiff.format1.rev1.bin",
        "slotindex.format1.rev1.bin",
        # the inventory's first schema, opened and migrated in tests/integration/test_fleet.py
        "inventory.schema1.sql",
        # rsync mode's samples, checked in test_golden_rsync.py
        *(
            f"{n}{sig}"
            for n in ("plan.format1.rev6.rsync.json", "manifest.format1.rev4.files.json")
            for sig in ("", ".sig")
        ),
        "files.format1.rev1.list",
        # node keys' samples, checked in test_golden_nodekeys.py
        "node-key.format1.rev1.bin",
        *(f"report.rev9.signed.json{sig}" for sig in ("", ".sig")),
        # plan serials' samples, checked in test_golden_serial.py
        "slot-state.format1.rev3.bin",
        # the key chain's samples, checked in test_golden_keys.py
        *(f"keychain.format1.rev1.json{sig}" for sig in ("", ".sig")),
        "key-record.format1.rev1.bin",
        # rackboot nginx-config's output, checked in test_nginx_config.py
        "nginx.conf.golden",
    }
    present = {p.name for p in DATA.iterdir() if p.is_file()} - {
        "README.md",
        "make_golden.py",
        "make_golden_bootfiles.py",
        "make_golden_delta.py",
        "make_golden_keys.py",
        "make_golden_rsync.py",
        "make_golden_nodekeys.py",
        "make_golden_serial.py",
        "make_golden_sources.py",
    }
    assert present == covered


@pytest.mark.parametrize("start_mib", [1, 2, 3])
def test_a_plan_cannot_put_a_partition_over_the_slot_state_or_the_confirmation_sector(start_mib):
    """Everything below 4 MiB is the updater's: slot-state copies at 1 and 2 MiB, the
    confirmation sector at 3 MiB (which rackboot-mark-good writes and the updater zeroes)."""
    doc = json.loads(sample("plan.format1.rev3.json"))
    doc["layout"]["partitions"][0]["start_mib"] = start_mib
    with pytest.raises(
        UpdaterError, match=rf"^plan: layout.partitions\[0\]: start_mib: must be >= 4, got {start_mib}$"
    ):
        formats.parse_plan(json.dumps(doc))
    assert state.CONFIRM + 512 <= formats.MIN_START_MIB * MIB
