"""Block-delta installs on an emulated worker: a blank card takes v1 by the full stream;
v2 is built from slot a's blocks and a few ranges of the pack (the reports say how many
bytes came from the card and how many from the master) and confirms itself; a tampered
pack block and a tampered index are each refused with one line, and v1 boots.

One provisioned card (slot a holds v1 good, v2 published and assigned) is shared; each
case boots a copy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from rackboot import config, demo
from rackboot.initramfs.updater import state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import BOOTABLE, Manifest
from rackboot.master import plans
from rackboot.qemu import harness

from tests.e2e.rack import example_config
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]


@dataclass(frozen=True)
class Card:
    cfg: config.Config
    out: Path
    disk: Path  # slot a holds v1 (good); v2 is published and assigned
    v2: Manifest
    v2_dir: Path


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Card:
    directory = tmp_path_factory.mktemp("delta")
    cfg = config.load(example_config(directory))
    work = directory / "demo"
    rows = demo.story(cfg, work, log=quiet, steps=[(1, False), (1, False)])  # v1, then its confirmation
    assert [r.action for r in rows] == ["installed", "up-to-date"]
    v2 = harness.publish_example(cfg, cfg.base / "rootfs", work, 2)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    assert v2.delta is not None
    return Card(cfg, cfg.output.directory, work / "worker-disk.img", v2, cfg.master.directory / "images/example/2")


def received(cfg: config.Config) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted((cfg.master.directory / "reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def boot(card: Card, tmp_path: Path) -> tuple[str, list[dict], Path, int]:
    """Boot a copy of the card until a version is up: console, this boot's reports, the
    copy, and the image bytes the master sent."""
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", card.disk, disk], check=True)
    log = tmp_path / "console.log"
    before = len(received(card.cfg))
    master = harness.MasterThread(card.cfg)
    try:
        with harness.new_worker(card.cfg, card.out, disk, log) as worker:
            worker.expect(r"rackboot-demo: v\d is up", timeout=300)
            worker.wait_exit(timeout=60)
        sent = master.bytes_sent()
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


def assert_refused(console: str, reports: list[dict], disk: Path, line: str) -> None:
    assert re.search(rf"^rackboot: download failed: {line}", console, re.M), console
    assert "rackboot-demo: v1 is up" in console and "v2 is up" not in console and "Traceback" not in console
    card = slots(disk)
    assert card.slots["b"].state not in BOOTABLE and (card.primary, card.slots["a"].state) == ("a", "good")
    errors = [r["error"] for r in reports if r["phase"] == "error"]
    assert len(errors) == 1 and re.match(f"download: {line}", errors[0]) and "\n" not in errors[0]
    assert [(r["slot"], r["version"]) for r in reports if r["phase"] == "boot"] == [("a", 1)]


def test_v2_is_built_from_the_card_and_confirms_itself(card, tmp_path):
    console, reports, disk, sent = boot(card, tmp_path)
    assert "rackboot-demo: v2 is up" in console and "rackboot-mark-good: slot b (example v2) confirmed" in console
    assert re.search(r"^rackboot: delta: .* MiB from the card", console, re.M), console
    download = next(r for r in reports if r["phase"] == "download")
    assert download["delta"].startswith("delta: ") and download["slot"] == "b"
    assert download["card_bytes"] > card.v2.size // 4  # the card gave much of the new slot
    # index, a few pack ranges and the hook (the master counts it, the report does not): no stream
    assert 0 < download["bytes"] <= sent < card.v2.stream_size // 10
    assert slots(disk).slots["b"].state == "trial"  # confirmed in the booted system; taken at the next boot


def test_a_tampered_pack_block_is_refused_and_v1_boots(card, tmp_path):
    pack = card.v2_dir / card.v2.delta.pack
    with tampered(pack, list(range(0, pack.stat().st_size, 509))):
        console, reports, disk, _ = boot(card, tmp_path)
    assert_refused(console, reports, disk, r"block \d+: ")


def test_a_tampered_index_is_refused_and_v1_boots(card, tmp_path):
    index = card.v2_dir / card.v2.delta.index
    with tampered(index, [index.stat().st_size // 2]):
        console, reports, disk, _ = boot(card, tmp_path)
    assert_refused(console, reports, disk, "block index of example v2: sha256 is ")
