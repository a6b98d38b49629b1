"""Block-delta installs on an emulated worker: a blank card takes v1 by the full stream and
keeps v1's index behind it in slot a; v2 is built from slot a's blocks (their hashes from
that kept index) and a few ranges of the pack, its index rebuilt from a diff against the
kept one (the reports say how many bytes came from the card and how many from the master),
keeps its own index in slot b, and confirms itself; a tampered pack block, and a tampered
index whose diff is damaged too, are each refused with one line, and v1 boots.

One provisioned card (slot a holds v1 good, v2 published and assigned; the session's:
tests/e2e/conftest.py) is shared; each case boots a copy."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from rackboot import config
from rackboot.initramfs.updater import delta, indexdiff, layout, slotindex, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import BOOTABLE, Manifest
from rackboot.master import plans
from rackboot.qemu import harness

pytestmark = [pytest.mark.e2e, pytest.mark.network]


@dataclass(frozen=True)
class Card:
    cfg: config.Config
    out: Path
    disk: Path  # slot a holds v1 (good); v2 is published and assigned
    v2: Manifest
    v2_dir: Path


@pytest.fixture(scope="module")
def card(example, tmp_path_factory) -> Card:
    work = tmp_path_factory.mktemp("delta")
    disk = example.start(2, work)  # v1 installed, then its confirmation taken
    cfg = example.cfg
    v2 = harness.publish_example(cfg, cfg.base / "rootfs", work, 2)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    assert v2.delta is not None
    return Card(cfg, example.out, disk, v2, cfg.master.directory / "images/example/2")


def received(cfg: config.Config) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted((cfg.master.directory / "reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def boot(card: Card, tmp_path: Path) -> tuple[str, list[dict], Path, dict[str, int]]:
    """Boot a copy of the card until a version is up: console, this boot's reports, the
    copy, and the bytes the master sent per path."""
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", card.disk, disk], check=True)
    log = tmp_path / "console.log"
    before = len(received(card.cfg))
    master = harness.MasterThread(card.cfg)
    try:
        with harness.new_worker(card.cfg, card.out, disk, log) as worker:
            worker.expect(r"rackboot-demo: v\d is up", timeout=300)
            worker.wait_exit(timeout=60)
        sent = dict(master.server.stats()["bytes_sent"])
    finally:
        master.stop()
    return log.read_text(errors="replace"), received(card.cfg)[before:], disk, sent


@contextmanager
def tampered(path: Path, flip: list[int]) -> Iterator[None]:
    """``path`` with the bytes at ``flip`` inverted, restored afterwards."""
    saved = path.with_name(path.name + ".good")
    shutil.copy2(path, saved)
    data = bytearray(path.read_bytes())
    for at in flip:
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        saved.replace(path)


def slots(disk: Path) -> state.SlotState:
    with Disk(str(disk), writable=False) as d:
        return state.read(d)


def published_index(card: Card, version: int) -> delta.BlockIndex:
    d = card.cfg.master.directory / f"images/example/{version}"
    return delta.parse_index((d / "rootfs.ext4.index").read_bytes())


def v2_diff(card: Card) -> Path:
    """v2's index as publish diffed it against v1's: what a card keeping v1's index asks for."""
    base = hashlib.sha256(published_index(card, 1).body()).hexdigest()
    return card.v2_dir / indexdiff.diff_name(card.v2.delta.index, base)


def kept_index(disk: Path, name: str) -> delta.BlockIndex:
    """The index slot ``name`` keeps behind its image, for the image its slot state names."""
    with Disk(str(disk), writable=False) as d:
        slot = state.read(d).slot(name)
        where = delta.Slot(d, *layout.partition_range(layout.read_table(d), slot.partition))
        return slotindex.load(where, slot.sha256, where=f"slot {name}")


def assert_refused(console: str, reports: list[dict], disk: Path, line: str) -> None:
    assert re.search(rf"^rackboot: download failed: {line}", console, re.M), console
    assert "rackboot-demo: v1 is up" in console and "v2 is up" not in console and "Traceback" not in console
    card = slots(disk)
    assert card.slots["b"].state not in BOOTABLE and (card.primary, card.slots["a"].state) == ("a", "good")
    errors = [r["error"] for r in reports if r["phase"] == "error"]
    assert len(errors) == 1 and re.match(f"download: {line}", errors[0]) and "\n" not in errors[0]
    assert [(r["slot"], r["version"]) for r in reports if r["phase"] == "boot"] == [("a", 1)]


def test_v2_is_built_from_the_card_and_confirms_itself(card, tmp_path):
    assert kept_index(card.disk, "a").body() == published_index(card, 1).body()  # the full stream kept v1's
    console, reports, disk, sent = boot(card, tmp_path)
    assert "rackboot-demo: v2 is up" in console and "rackboot-mark-good: slot b (example v2) confirmed" in console
    assert re.search(r"^rackboot: delta: .* MiB from the card", console, re.M), console
    diff = v2_diff(card)
    size = diff.stat().st_size
    assert (
        f"rackboot: delta: block index of example v2 from a {size}-byte diff against the index slot's install"
        in console
    )
    assert "rackboot: delta: slot a holds example v1: its index kept on the card" in console, console
    assert "fetching the whole index" not in console and "rackboot: delta: hashing slot" not in console
    download = next(r for r in reports if r["phase"] == "download")
    assert download["delta"].startswith("delta: ") and download["slot"] == "b"
    assert download["card_bytes"] > card.v2.size // 4  # the card gave much of the new slot
    # neither index crossed the wire whole, nor anything of v1: what the worker fetched is the
    # diff and the pack's ranges, so it is below the whole index plus those ranges
    v2 = "/images/example/2/"
    assert not [p for p in sent if p.endswith(".index") or p.startswith("/images/example/1/")], sent
    assert sent[v2 + diff.name] == size
    pack = sent[v2 + card.v2.delta.pack]
    assert 0 < download["bytes"] <= size + pack < card.v2.delta.index_size + pack
    # the hook's bytes the master counts, the report does not: no stream either way
    assert download["bytes"] <= harness.image_bytes({"bytes_sent": sent}) < card.v2.stream_size // 10
    assert slots(disk).slots["b"].state == "trial"  # confirmed in the booted system; taken at the next boot
    assert kept_index(disk, "b").body() == published_index(card, 2).body()  # for the next delta


def test_a_tampered_pack_block_is_refused_and_v1_boots(card, tmp_path):
    """The first byte of every block the delta must fetch (v2's blocks that v1 has nowhere:
    a one-file change is a block or two, so no sampled flips)."""
    v1, v2 = published_index(card, 1), published_index(card, 2)
    held = set(v1.hashes)
    new = [v2.offsets[i] for i, (n, h) in enumerate(zip(v2.lengths, v2.hashes, strict=True)) if n and h not in held]
    assert new, "v2 has no block v1 lacks: nothing to tamper with"
    with tampered(card.v2_dir / card.v2.delta.pack, new):
        console, reports, disk, _ = boot(card, tmp_path)
    assert_refused(console, reports, disk, r"block \d+: ")


def test_a_tampered_index_is_refused_and_v1_boots(card, tmp_path):
    """The diff is damaged too, else the whole index is never asked for: the diff's failure
    is logged, the whole index fetched and refused."""
    index, diff = card.v2_dir / card.v2.delta.index, v2_diff(card)
    with tampered(index, [index.stat().st_size // 2]), tampered(diff, [diff.stat().st_size // 2]):
        console, reports, disk, _ = boot(card, tmp_path)
    assert re.search(rf"^rackboot: delta: .*diff {diff.name}: .*; fetching the whole index", console, re.M), console
    assert_refused(console, reports, disk, "block index of example v2: sha256 is ")
