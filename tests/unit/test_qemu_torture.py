"""torture's pure parts: cut points, the version each cycle installs, and the survivor check."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rackboot.initramfs.updater import formats, keyring, layout, mbr, nodekey, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import Slot, SlotState
from rackboot.initramfs.updater.signature import MasterKey
from rackboot.master.inventory import Inventory
from rackboot.qemu import torture

SLOT_A = 8 << 20  # partition 2 starts here on the test card
MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def test_cuts_repeat_for_a_seed_and_visit_every_phase_each_round():
    n = len(torture.PHASES)
    cuts = torture.plan_cuts(random.Random(7), 2 * n)
    assert cuts == torture.plan_cuts(random.Random(7), 2 * n)
    assert cuts != torture.plan_cuts(random.Random(8), 2 * n)
    for start in (0, n):
        assert sorted(c.phase for c in cuts[start : start + n]) == sorted(torture.PHASES)
    assert cuts[0].blank and all(c.blank for c in cuts if c.phase in ("layout", "node-key"))
    assert all(0 <= c.fraction < 1 for c in cuts)


def test_make_torture_cuts_every_phase_several_times():
    """`make torture` (CUTS and SEED as the Makefile sets them) is where the phases the
    suite's e2e run (tests/e2e/test_torture.py) leaves out are cut: its plan visits each
    one several times, on a blank card where the phase needs one."""
    settings = dict(re.findall(r"^(CUTS|SEED) \?= (\d+)$", MAKEFILE.read_text(), re.M))
    cuts = torture.plan_cuts(random.Random(int(settings["SEED"])), int(settings["CUTS"]))
    for phase in torture.PHASES:
        assert sum(c.phase == phase for c in cuts) >= 3, phase
    assert all(c.blank for c in cuts if c.phase in torture.BLANK)


def test_each_cycle_pins_a_version_no_slot_holds():
    def card(**slots):
        return SlotState(
            slots={
                n: Slot(s, "example", v, "ab" * 32, None, 1 if s == "trial" else None) for n, (s, v) in slots.items()
            }
        )

    assert torture.next_version(SlotState()) == 1
    assert torture.next_version(card(a=("good", 1), b=("trial", 2))) == 3
    assert torture.next_version(card(a=("good", 3), b=("good", 2))) == 1
    assert torture.next_version(card(a=("good", 1), b=("bad", 2))) == 2  # a bad slot holds nothing
    assert torture.next_version(card(a=("good", 1), b=("failed", 2))) == 3  # failed is never reinstalled


def test_the_cut_lands_after_the_last_marker_printed():
    console = ["rackboot: plan for default", "rackboot: installing example v2 into slot b (/dev/vda3)"]
    assert torture.landed(console) == "stream"
    assert torture.landed(console + ["rackboot: reading back slot b"]) == "read-back"
    delta = console + ["rackboot: delta: slot a holds example v1: its index from the master"]
    assert torture.landed(delta + ["rackboot: delta: 37 of 5120 blocks to fetch (40112 bytes)"]) == "delta"
    assert torture.landed(delta) == "stream"  # the index, before the build: still the stream's phase
    assert torture.landed(["U-Boot 2023.01"]) == "boot"
    assert torture.landed(console[:1] + ["rackboot: boot files: writing build 0123 into boot area b"]) == "boot-files"
    made = "rackboot: node key: making a key for 52-54-00-12-34-56: none on the card"
    assert torture.landed(["U-Boot 2023.01", made]) == "node-key"
    assert torture.landed(["rackboot: master key 3: keeping it on the card"]) == "key-chain"
    assert torture.landed([made, "rackboot: master key 3: keeping it on the card"]) == "key-chain"  # in boot order


@pytest.fixture
def card(tmp_path):
    """A file-backed card whose slot a holds v1 (good), with the content that hashes to it."""
    path = tmp_path / "card"
    content = random.Random(1).randbytes(300_000)
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    with Disk(str(path)) as d:
        layout.write_table(d, mbr.Mbr(1, (mbr.Entry(2, 0x83, SLOT_A // 512, 4096),)))
        d.write(SLOT_A, content)
        sha = hashlib.sha256(content).hexdigest()
        state.write(d, SlotState(slots={"a": Slot("good", "example", 1, sha, 2)}, primary="a", last_good="a"))
    return path, {1: SimpleNamespace(size=len(content), sha256=sha, files=None)}


UP = ["rackboot: booting slot a (up-to-date) from /dev/vda2 mounted ro", "rackboot-demo: v1 is up (6.1), boot 1"]


def test_check_accepts_a_slot_whose_bytes_match(card):
    path, manifests = card
    verdict = torture.check(UP, path, manifests)
    assert verdict.survived, verdict.detail


def test_check_rejects_one_flipped_byte_in_the_booted_slot(card):
    path, manifests = card
    with open(path, "r+b") as f:
        f.seek(SLOT_A + 12345)
        byte = f.read(1)
        f.seek(SLOT_A + 12345)
        f.write(bytes([byte[0] ^ 1]))
    verdict = torture.check(UP, path, manifests)
    assert not verdict.survived and "bytes hash to" in verdict.detail


def test_check_rejects_a_version_the_slot_state_does_not_record(card):
    path, manifests = card
    verdict = torture.check(UP[:1] + ["rackboot-demo: v2 is up"], path, manifests)
    assert not verdict.survived and "slot state says good v1" in verdict.detail


@pytest.mark.parametrize(
    "console, why",
    [
        (["rackboot: rescue: updater failed; retrying in 5 s"], "rescue shell"),
        (["rackboot: installing example v1 into slot a"], "never came up"),
        (["rackboot-demo: v1 is up"], "without the updater saying"),
    ],
)
def test_check_counts_a_worker_that_never_came_up_as_bricked(card, console, why):
    verdict = torture.check(console, card[0], card[1])
    assert not verdict.survived and why in verdict.detail


@pytest.mark.parametrize("cut", ["none", "area", "entry"])
def test_check_boot_area_wants_entry_1_on_one_builds_boot_image_whole(tmp_path, cut):
    """A cut while area B is written leaves entry 1 on area A and build 1; a torn area that
    entry 1 points at, or an entry 1 off both areas, is a card a Pi would not boot."""
    path = tmp_path / "card"
    image = random.Random(2).randbytes(1 << 20)
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    with Disk(str(path)) as d:
        start = 4 << 11 if cut != "entry" else 6 << 11
        d.write(0, mbr.dump(mbr.Mbr(1, (mbr.Entry(1, 0x0C, start, 2 << 11, bootable=True),))))
        d.write(4 << 20, image)
        if cut == "area":
            d.write((4 << 20) + 4096, b"torn")
    images = {hashlib.sha256(image).hexdigest(): "build 1"}
    verdict = torture.check_boot_area(path, images, len(image))
    if cut == "none":
        assert verdict is None
    else:
        assert verdict is not None and not verdict.survived and "holds no build's boot image whole" in verdict.detail


def test_rsync_filled_follows_the_last_install_into_each_slot():
    console = [
        "rackboot: installing example v2 into slot b (/dev/vda3)",
        "rackboot: formatting /dev/vda3 as ext4 for rsync",
        "rackboot: installing example v3 into slot a (/dev/vda2)",
        "rackboot: delta: 10 of 900 blocks to fetch",
    ]
    assert torture.rsync_filled(console, frozenset({"a"})) == {"b"}  # a: refilled by a delta since
    assert torture.rsync_filled(console[2:], frozenset({"b"})) == {"b"}  # b untouched: still rsync's


@pytest.mark.parametrize("cut", ["whole", "copy 2 torn", "no key", "another pinned", "none pinned"])
def test_check_node_key_wants_the_key_whole_and_the_one_the_master_pinned(tmp_path, cut):
    """After a recovery boot the card holds its key in both copies, and it is the key the
    master pinned from its reports: a key reported, then lost to a cut, would differ."""
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    key = nodekey.generate("52-54-00-12-34-56")
    pins = {key.node: key.public_b64}
    with Disk(str(path)) as d:
        if cut != "no key":
            nodekey.store(d, key)
        if cut == "copy 2 torn":
            d.write(nodekey.COPIES[1] + 20, b"torn")
    if cut == "another pinned":
        pins[key.node] = nodekey.generate(key.node).public_b64
    if cut == "none pinned":
        pins.clear()
    verdict = torture.check_node_key(path, pins.get)
    if cut == "whole":
        assert verdict is None
    else:
        assert verdict is not None and not verdict.survived
        why = {
            "copy 2 torn": "not whole in both copies",
            "no key": "not whole in both copies",
            "another pinned": "the master pinned another",
            "none pinned": "the master pinned none",
        }[cut]
        assert why in verdict.detail


def test_a_blank_card_drops_the_masters_pin_as_adopt_replace_does(tmp_path):
    key = nodekey.generate("52-54-00-12-34-56")
    report = formats.Report(node=key.node, phase=formats.Phase.BOOT, time=1.7e9, pubkey=key.public_b64)
    body = formats.dump(report)
    assert Inventory(tmp_path).ingest(report, body=body, signature=key.sign(body)).outcome == "taken"
    assert torture.pinned_key(tmp_path, key.node) == key.public_b64
    torture.forget_keys(tmp_path)
    assert torture.pinned_key(tmp_path, key.node) is None and torture.pinned_key(tmp_path, "52-54-00-00-00-01") is None


def test_check_key_record_wants_the_masters_newest_key_on_the_card(tmp_path):
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    first, second = (MasterKey(n, bytes([n]) * 32) for n in (1, 2))
    assert torture.check_key_record(path, MasterKey(0, bytes(32))) is None  # never rotated: no record
    verdict = torture.check_key_record(path, first)
    assert verdict is not None and "the card keeps no key, not the master's master key 1" in verdict.detail
    with Disk(str(path)) as d:
        keyring.write(d, first)
    assert torture.check_key_record(path, first) is None
    verdict = torture.check_key_record(path, second)
    assert verdict is not None and not verdict.survived and "keeps key 1 (sha256" in verdict.detail
