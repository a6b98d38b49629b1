"""Block-delta installs on the host updater against a real master (`rackboot serve` on
loopback) and real images (`rackboot publish` of two trees that differ by a little): the
new index as a diff against the one the card keeps, each install's index kept behind its
image in the slot, and what happens when either is missing, damaged or forged."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from rackboot.initramfs.updater import delta, formats, indexdiff, layout, slotindex
from rackboot.initramfs.updater import state as slot_state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Decision, Identity, run
from rackboot.master import publish, serve

from tests.integration.updater_master import MAC, NODE, Server, write_plan

EPOCH = 1_700_000_000
SLOT_A, SLOT_B = 20 << 20, 84 << 20  # the standard layout's slots


def tree(root: Path, *, extra: bool) -> Path:
    """A root of a few MiB: compressible text and incompressible binaries; ``extra`` is v2:
    one file changed, one added (a package upgraded, a package added)."""
    rng = random.Random(1)
    for d in range(8):
        for f in range(12):
            path = root / f"usr/lib/pkg{d}/file{f}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randrange(1, 64 << 10)) if f % 2 else b"line %d\n" % f * 3000)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("worker\n")
    if extra:
        (root / "usr/lib/pkg3/file5").write_bytes(random.Random(2).randbytes(40 << 10))
        (root / "usr/lib/pkg9").mkdir()
        (root / "usr/lib/pkg9/new").write_bytes(random.Random(3).randbytes(100 << 10))
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """v1 and v2 of image "example", published once for the module; each test copies them."""
    base = tmp_path_factory.mktemp("delta")
    master = base / "master"
    for version, extra in ((1, False), (2, True)):
        src = tree(base / f"tree{version}", extra=extra)
        publish.publish_directory(src, master, image="example", version=version, source_date_epoch=EPOCH)
    src = tree(base / "tree3", extra=True)  # v3: v2 with one more file changed
    (src / "etc/hostname").write_text("worker-3\n")
    publish.publish_directory(src, master, image="example", version=3, source_date_epoch=EPOCH)
    return master


@pytest.fixture
def master(images, tmp_path):
    root = tmp_path / "master"
    shutil.copytree(images, root)
    server = serve.make_server(root, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, server
    server.shutdown()
    server.server_close()


@pytest.fixture
def card(tmp_path) -> Path:
    path = tmp_path / "card.img"
    with open(path, "wb") as f:
        f.truncate(256 << 20)
    return path


def client(url: str, **kw) -> MasterClient:
    """Timeouts for a loaded 2-core host: a report that misses its POST timeout is dropped
    (best effort by design), and these tests read the reports."""
    return MasterClient(url, **{"read_timeout": 30.0, "retries": 2, "backoff": 0.01, "report_timeout": 30.0, **kw})


def update(card: Path, url: str, log: list[str] | None = None):
    return run(
        str(card), url, Identity(MAC), log=(log.append if log is not None else lambda m: None), master=client(url)
    )


def manifest(root: Path, version: int) -> formats.Manifest:
    return formats.parse_manifest((root / f"images/example/{version}/manifest.json").read_bytes())


def image(root: Path, version: int) -> bytes:
    return gzip.decompress((root / f"images/example/{version}/rootfs.ext4.gz").read_bytes())


def reports(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / f"reports/{NODE}.jsonl").read_text().splitlines()]


def slot_bytes(card: Path, at: int, size: int) -> bytes:
    with open(card, "rb") as f:
        f.seek(at)
        return f.read(size)


def index_of(root: Path, version: int) -> delta.BlockIndex:
    """The block index the master published for ``version``."""
    return delta.parse_index((root / f"images/example/{version}" / manifest(root, version).delta.index).read_bytes())


def diff_file(root: Path, version: int, base: int) -> Path:
    """Where publish put ``version``'s index as a diff against ``base``'s."""
    name = indexdiff.diff_name(
        manifest(root, version).delta.index, hashlib.sha256(index_of(root, base).body()).hexdigest()
    )
    return root / f"images/example/{version}" / name


def slot_range(card: Path, name: str) -> tuple[int, int]:
    """(offset, capacity) of slot ``name`` on the card, as its partition table says."""
    with Disk(str(card), writable=False) as d:
        number = slot_state.read(d).slot(name).partition
        return layout.partition_range(layout.read_table(d), number)


def kept_index(card: Path, name: str, image_sha256: str) -> delta.BlockIndex:
    """The index slot ``name`` keeps behind its image (UpdaterError when it keeps none for that image)."""
    with Disk(str(card), writable=False) as d:
        return slotindex.load(delta.Slot(d, *slot_range(card, name)), image_sha256, where=f"slot {name}")


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


class Sent:
    """The bytes the master sent per path since it was made: what one update fetched."""

    def __init__(self, server):
        self.server, self.before = server, dict(server.stats()["bytes_sent"])

    def __call__(self) -> dict[str, int]:
        now = self.server.stats()["bytes_sent"]
        return {p: n - self.before.get(p, 0) for p, n in now.items() if n != self.before.get(p, 0)}


def install_v1(root: Path, server, card: Path) -> Decision:
    write_plan(root, "/images/example/1/manifest.json")
    first = update(card, server.url)
    assert (first.slot, first.action, first.version) == ("a", "installed", 1)
    return first


def install_v2(root: Path, server, card: Path) -> tuple[Decision, list[str], dict[str, int]]:
    """v2 into slot b (v1 in slot a): the decision, the log, the bytes sent per path; checks
    the install and the slot's bytes."""
    write_plan(root, "/images/example/2/manifest.json")
    log: list[str] = []
    sent = Sent(server)
    second = update(card, server.url, log)
    assert (second.slot, second.action, second.version) == ("b", "installed", 2), log
    assert slot_bytes(card, SLOT_B, manifest(root, 2).size) == image(root, 2)
    return second, log, wait_for(sent)


def wait_for(sent: Sent) -> dict[str, int]:
    """What was sent, once the server's count has caught up with the client (it counts after each send)."""
    for _ in range(100):
        got = sent()
        time.sleep(0.05)
        if sent() == got:
            return got
    return sent()


V2 = "/images/example/2/"


def test_publish_writes_an_index_the_signed_manifest_pins(images):
    m = manifest(images, 2)
    assert m.delta is not None and m.delta.block_size == 4096
    d = images / "images/example/2"
    assert os.path.getsize(d / m.delta.index) == m.delta.index_size
    assert os.path.getsize(d / m.delta.pack) == m.delta.pack_size


def test_v2_is_built_from_the_card_and_a_few_blocks_of_the_master(master, card):
    root, server = master
    first = install_v1(root, server, card)
    v1, v2 = manifest(root, 1), manifest(root, 2)
    # a blank card takes the full stream, then the index it keeps (nothing to build from)
    assert first.bytes_fetched == v1.stream_size + v1.delta.index_size
    second, log, sent = install_v2(root, server, card)
    assert V2 + "rootfs.ext4.gz" not in sent  # no stream
    assert 0 < second.bytes_fetched < v2.stream_size / 3, log  # bytes_fetched: this run's alone
    download = [r for r in reports(root) if r["phase"] == "download" and r.get("version") == 2][-1]
    assert download["delta"].startswith("delta: ") and download["card_bytes"] > v2.size // 2
    assert download["bytes"] == second.bytes_fetched


def test_v2s_index_comes_as_a_diff_and_slot_as_from_the_index_kept_on_the_card(master, card):
    """Neither v2's whole index nor anything of v1 crosses the wire: the diff against the
    index slot a keeps, and the pack's ranges, are every byte fetched."""
    root, server = master
    install_v1(root, server, card)
    second, log, sent = install_v2(root, server, card)
    v2, diff = manifest(root, 2), diff_file(root, 2, 1)
    assert (
        f"delta: block index of example v2 from a {diff.stat().st_size}-byte diff against the index slot's install kept"
        in log
    ), log
    assert "delta: slot a holds example v1: its index kept on the card" in log, log
    assert not any("hashing slot" in line for line in log), log
    assert not [p for p in sent if p.endswith(".index") or p.startswith("/images/example/1/")], sent
    assert sent[V2 + diff.name] == diff.stat().st_size
    assert second.bytes_fetched == sent[V2 + diff.name] + sent[V2 + v2.delta.pack]  # every byte accounted for
    assert second.bytes_fetched < v2.delta.index_size + sent[V2 + v2.delta.pack]
    # and slot b keeps v2's index for the next delta: the one rebuilt from the diff is the signed one
    assert kept_index(card, "b", v2.sha256).body() == index_of(root, 2).body()


def test_a_full_stream_install_keeps_its_index_behind_the_image(master, card):
    root, server = master
    sent = Sent(server)
    install_v1(root, server, card)
    v1 = manifest(root, 1)
    assert wait_for(sent)["/images/example/1/rootfs.ext4.index"] == v1.delta.index_size  # fetched after the stream
    kept = kept_index(card, "a", v1.sha256)
    assert kept.body() == index_of(root, 1).body()
    offset, capacity = slot_range(card, "a")
    assert slotindex.body_start(capacity, len(kept.body())) >= v1.size  # behind the image, not in it
    assert slot_bytes(card, offset, v1.size) == image(root, 1)
    with pytest.raises(UpdaterError, match="slot a: the kept index is of another image"):
        kept_index(card, "a", manifest(root, 2).sha256)


def test_blocks_already_in_the_target_are_not_written_again(master, card):
    """v3 goes into slot a over v1 (neither v1 nor v2 confirmed itself, so the newer v2 in slot b
    stays): the blocks v1 and v3 share at the same offsets stay as they are, unwritten; both
    slots' hashes come from the indexes they keep, v3's index from a diff against v2's."""
    root, server = master
    for version in (1, 2):
        write_plan(root, f"/images/example/{version}/manifest.json")
        update(card, server.url)
    write_plan(root, "/images/example/3/manifest.json")
    log: list[str] = []
    third = update(card, server.url, log)
    v3 = manifest(root, 3)
    assert (third.slot, third.action, third.version) == ("a", "installed", 3)
    assert slot_bytes(card, SLOT_A, v3.size) == image(root, 3)
    summary = next(line for line in log if line.startswith("delta: ") and "written" in line)
    written = float(summary.rsplit("; ", 1)[1].split(" MiB")[0])
    kept = float(summary.split("MiB already in place")[0].rsplit("(", 1)[1])
    size = v3.size / (1 << 20)
    assert written < size / 4 and kept > size / 2, summary  # what moved since v1, not the slot
    assert "delta: slot a holds example v1: its index kept on the card" in log, log
    assert "delta: slot b holds example v2: its index kept on the card" in log, log
    diff = diff_file(root, 3, 2)  # the other slot's index is tried first
    assert (
        f"delta: block index of example v3 from a {diff.stat().st_size}-byte diff against the index slot's install kept"
        in log
    ), log


def test_a_tampered_block_is_refused_and_the_good_slot_boots(master, card):
    root, server = master
    write_plan(root, "/images/example/1/manifest.json")
    update(card, server.url)
    m = manifest(root, 2)
    pack = root / "images/example/2" / m.delta.pack
    data = bytearray(pack.read_bytes())
    for at in range(0, len(data), 4096):  # every block the delta might fetch
        data[at] ^= 0xFF
    pack.write_bytes(bytes(data))
    write_plan(root, "/images/example/2/manifest.json")
    log: list[str] = []
    result = update(card, server.url, log)
    assert (result.slot, result.action) == ("a", "fallback")
    assert "block" in result.error and "\n" not in result.error, result.error
    errors = [r["error"] for r in reports(root) if r["phase"] == "error"]
    assert any("hash" in e or "deflate" in e for e in errors)


def test_a_tampered_index_is_refused_and_the_good_slot_boots(master, card):
    """The diff is damaged too (else the whole index is never fetched): its failure is logged,
    the whole index fetched, and that one's sha256 refused."""
    root, server = master
    install_v1(root, server, card)
    m = manifest(root, 2)
    index = root / "images/example/2" / m.delta.index
    flip(index, index.stat().st_size // 2)
    diff = diff_file(root, 2, 1)
    flip(diff, diff.stat().st_size // 2)
    write_plan(root, "/images/example/2/manifest.json")
    log: list[str] = []
    result = update(card, server.url, log)
    assert (result.slot, result.action) == ("a", "fallback")
    assert result.error.startswith("block index of example v2: sha256 is") and "\n" not in result.error
    assert any(f"diff {diff.name}: " in line and line.endswith("; fetching the whole index") for line in log), log
    assert slot_bytes(card, SLOT_A, manifest(root, 1).size) == image(root, 1)


def forge(root: Path, how: str) -> tuple[Path, str]:
    """Damage or replace v2's diff against v1: the file, and the reason the updater must give."""
    diff = diff_file(root, 2, 1)
    data = diff.read_bytes()
    if how == "flipped":
        flip(diff, len(data) // 2)
        return diff, "not valid gzip"
    if how == "truncated":
        diff.write_bytes(data[: len(data) // 2])
        return diff, "not one gzip member"
    if how == "another version's":  # against v1 too, so it applies: only the signed plain_sha256 tells
        shutil.copy(diff_file(root, 3, 1), diff)
        return diff, "the index rebuilt from diff " + diff.name + " is not the signed one"
    if how == "against another base":
        shutil.copy(diff_file(root, 3, 2), diff)
        return diff, "made against another index than the card's"
    if how == "one hash forged":  # a well-formed diff against v1 of v2 with one block's hash changed
        v2 = index_of(root, 2)
        i = next(i for i, n in enumerate(v2.lengths) if n)
        hashes = list(v2.hashes)
        hashes[i] = bytes([hashes[i][0] ^ 0xFF]) + hashes[i][1:]
        forged = delta.BlockIndex(v2.size, v2.lengths, hashes, v2.block_size, v2.hash_len, v2.window)
        diff.write_bytes(indexdiff.diff(index_of(root, 1), forged))
        return diff, "the index rebuilt from diff " + diff.name + " is not the signed one"
    if how == "missing":  # a master from before diffs, or one that dropped them
        for old in diff.parent.glob("*.from-*"):
            old.unlink()
        return diff, "404 not found"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["flipped", "truncated", "another version's", "against another base", "one hash forged", "missing"]
)
def test_a_bad_or_missing_diff_costs_the_whole_index_and_nothing_else(master, card, how):
    root, server = master
    install_v1(root, server, card)
    diff, reason = forge(root, how)
    second, log, sent = install_v2(root, server, card)
    v2 = manifest(root, 2)
    failed = [line for line in log if line.startswith("delta: ") and line.endswith("; fetching the whole index")]
    assert len(failed) == 1 and reason in failed[0] and diff.name in failed[0], log
    assert not any("from a " in line and "-byte diff" in line for line in log), log
    assert sent[V2 + v2.delta.index] == v2.delta.index_size
    assert sent.get(V2 + diff.name, 0) == (0 if how == "missing" else diff.stat().st_size)
    assert "delta: slot a holds example v1: its index kept on the card" in log, log  # the card's index is fine
    assert second.bytes_fetched == sent.get(V2 + diff.name, 0) + v2.delta.index_size + sent[V2 + v2.delta.pack]
    assert kept_index(card, "b", v2.sha256).body() == index_of(root, 2).body()


@pytest.mark.parametrize(("part", "why"), [("trailer", "trailer is damaged"), ("body", "does not match its trailer")])
@pytest.mark.parametrize("masters_copy", [True, False], ids=["v1 index on the master", "none on the master"])
def test_a_damaged_kept_index_is_not_used(master, card, part, why, masters_copy):
    """A byte of what slot a keeps changed (the card wore, or something wrote there): the
    updater says so and takes v1's hashes from the master's copy, or hashes slot a itself;
    with no index of the card's to diff against, v2's comes whole."""
    root, server = master
    install_v1(root, server, card)
    v1 = manifest(root, 1)
    offset, capacity = slot_range(card, "a")
    length = len(index_of(root, 1).body())
    flip(card, offset + (capacity - 512 + 40 if part == "trailer" else slotindex.body_start(capacity, length) + 20))
    if not masters_copy:
        (root / "images/example/1" / v1.delta.index).unlink()
    second, log, sent = install_v2(root, server, card)
    v2 = manifest(root, 2)
    assert any(line.startswith("delta: slot a: the kept index") and why in line for line in log), log
    assert not any("its index kept on the card" in line for line in log), log
    if masters_copy:
        assert "delta: slot a holds example v1: its index from the master" in log, log
        assert sent["/images/example/1/rootfs.ext4.index"] == v1.delta.index_size
        assert not any("hashing slot" in line for line in log), log
    else:
        assert any(line.startswith("delta: no index for slot a from the master (") for line in log), log
        assert any(line.startswith("delta: hashing slot a (") for line in log), log
    assert sent[V2 + v2.delta.index] == v2.delta.index_size  # no base for a diff: the whole index
    assert not [p for p in sent if ".from-" in p], sent
    download = [r for r in reports(root) if r["phase"] == "download" and r.get("version") == 2][-1]
    assert download["delta"].startswith("delta: ") and second.bytes_fetched < v2.stream_size / 3


@pytest.mark.parametrize("kept", ["whole", "trailer torn"])
def test_a_cut_between_keeping_the_index_and_the_commit_leaves_a_good_slot_and_the_next_boot_finishes(
    master, card, kept
):
    """The power goes after v2's index was kept in slot b (whole, or its trailer half
    written) and before the commit: the card is as the install's last state write left it,
    slot b writing, slot a bootable. The next run does not trust b's kept index (b is not a
    committed slot), hashes b, finds every block in place, and commits it."""
    root, server = master
    install_v1(root, server, card)
    with Disk(str(card), writable=False) as d:
        before = slot_state.read(d)
    install_v2(root, server, card)
    v2 = manifest(root, 2)
    offset, capacity = slot_range(card, "b")
    with Disk(str(card)) as d:
        b = slot_state.read(d).slot("b")
        writing = formats.Slot(formats.SlotStatus.WRITING, b.image, b.version, b.sha256, b.partition)
        slot_state.write(d, dataclasses.replace(before, slots={**before.slots, "b": writing}))
        if kept == "trailer torn":
            d.write(offset + capacity - 512 + 48, os.urandom(64))
        cut = slot_state.read(d)
    assert cut.primary == "a" and cut.slots["a"].state in formats.BOOTABLE  # what boots after the cut
    log: list[str] = []
    sent = Sent(server)
    again = update(card, server.url, log)
    assert (again.slot, again.action, again.version) == ("b", "installed", 2), log
    assert slot_bytes(card, SLOT_B, v2.size) == image(root, 2)
    assert any(line.startswith("delta: hashing slot b (") for line in log), log
    assert not any("slot b holds" in line for line in log), log
    summary = next(line for line in log if line.startswith("delta: ") and "written" in line)
    assert summary.endswith("; 0.0 MiB written"), summary  # every block already in place
    # the Range probe at most: two one-byte parts with their headers
    assert wait_for(sent).get(V2 + v2.delta.pack, 0) <= 512
    assert kept_index(card, "b", v2.sha256).body() == index_of(root, 2).body()


def as_rev1(root: Path, version: int) -> formats.Manifest:
    """Rewrite ``version`` as a master from before rev2 published it: a rev1 index and pack
    (each block deflated alone) under the manifest's ``delta`` key, no diffs."""
    d = root / f"images/example/{version}"
    m = manifest(root, version)
    pack = io.BytesIO()
    index = delta.build_index(io.BytesIO(image(root, version)), m.size, pack, window=0)
    body = index.dump()
    (d / m.delta.index).write_bytes(body)
    (d / m.delta.pack).write_bytes(pack.getvalue())
    for old in d.glob("*.from-*"):
        old.unlink()
    spec = formats.BlockDelta(
        index=m.delta.index,
        index_size=len(body),
        index_sha256=hashlib.sha256(body).hexdigest(),
        pack=m.delta.pack,
        pack_size=index.pack_size,
        block_size=index.block_size,
    )
    raw = json.loads(formats.dump(dataclasses.replace(m, delta=spec)))
    assert "delta" in raw and "block_delta" not in raw
    (d / "manifest.json").write_bytes(formats.dump(raw))
    return manifest(root, version)


def test_a_rev1_manifest_from_an_older_master_still_installs_by_delta(master, card):
    """v1 and v2 as a master from before index rev2 published them. The card keeps v1's rev1
    index; v2's comes whole (a rev1 manifest has no plain_sha256 to check a diff's result
    against, so a diff, even a right one, is not asked for); the pack's blocks inflate alone."""
    root, server = master
    v1, v2 = as_rev1(root, 1), as_rev1(root, 2)
    assert (v1.delta.window, v1.delta.plain_sha256) == (0, None) and v2.delta.window == 0
    base = hashlib.sha256(index_of(root, 1).body()).hexdigest()
    planted = root / "images/example/2" / indexdiff.diff_name(v2.delta.index, base)
    planted.write_bytes(indexdiff.diff(index_of(root, 1), index_of(root, 2)))
    install_v1(root, server, card)
    assert kept_index(card, "a", v1.sha256).body()[:8] == delta.MAGIC  # rev1, as fetched
    second, log, sent = install_v2(root, server, card)
    assert "delta: slot a holds example v1: its index kept on the card" in log, log
    assert sent[V2 + v2.delta.index] == v2.delta.index_size and V2 + planted.name not in sent
    assert 0 < sent[V2 + v2.delta.pack] < v2.stream_size / 3
    assert second.bytes_fetched == v2.delta.index_size + sent[V2 + v2.delta.pack]
    download = [r for r in reports(root) if r["phase"] == "download" and r.get("version") == 2][-1]
    assert download["delta"].startswith("delta: ")
    assert kept_index(card, "b", v2.sha256).body() == index_of(root, 2).body()


def test_a_master_without_range_gets_the_full_stream_and_says_why(images, tmp_path, card):
    srv = Server(images)  # the test double, told to ignore Range
    try:
        write_plan(images, "/images/example/1/manifest.json")
        update(card, srv.master.url)
        srv.master.faults.ignore_range = True
        write_plan(images, "/images/example/2/manifest.json")
        log: list[str] = []
        result = update(card, srv.master.url, log)
    finally:
        srv.close()
        shutil.rmtree(images / "plans", ignore_errors=True)
    assert (result.slot, result.action, result.version) == ("b", "installed", 2)
    assert any(line.startswith("full stream: ") and "Range" in line for line in log), log
    assert slot_bytes(card, SLOT_B, manifest(images, 2).size) == image(images, 2)


def test_a_busy_master_is_waited_out_and_the_wait_reported(images, tmp_path, card):
    """The master's one stream slot is taken (another worker's stream) while v2's delta runs:
    the index diff is served all the same (serve does not count indexes and diffs as streams);
    the first pack range is told 503 and Retry-After, the updater waits, asks again, and
    reports the wait."""
    root = tmp_path / "master"
    shutil.copytree(images, root)
    server = serve.make_server(root, quiet=True, max_streams=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        if seconds < 1:  # a retry's backoff (a slow answer on a loaded host), not a busy master's wait
            time.sleep(seconds)
            return
        waits.append(seconds)
        server.end_stream()  # the other worker's stream ends while this one waits

    log: list[str] = []
    try:
        write_plan(root, "/images/example/1/manifest.json")
        update(card, server.url)
        write_plan(root, "/images/example/2/manifest.json")
        assert server.start_stream() is None  # the slot is taken
        result = run(str(card), server.url, Identity(MAC), log=log.append, master=client(server.url, sleep=sleep))
    finally:
        server.shutdown()
        server.server_close()
    assert (result.slot, result.action, result.version) == ("b", "installed", 2), log
    assert len(waits) == 1 and waits[0] >= 1
    busy = [n for n, line in enumerate(log) if line.startswith("master busy: waiting")]
    diffed = [n for n, line in enumerate(log) if line.startswith("delta: block index of example v2 from a ")]
    planned = [n for n, line in enumerate(log) if line.startswith("delta: ") and "blocks to fetch" in line]
    assert len(busy) == 1 and diffed and planned and diffed[0] < busy[0] < planned[0], log  # the diff came unqueued
    reported = [r for r in reports(root) if r["phase"] == "wait" and r["version"] == 2]
    assert len(reported) == 1 and reported[0]["seconds"] == pytest.approx(waits[0], abs=0.01)
    download = [r for r in reports(root) if r["phase"] == "download" and r["version"] == 2][-1]
    assert download["delta"].startswith("delta: ")


def requests_of(log: list[str]) -> int:
    found = [re.search(r" in (\d+) requests?; ", line) for line in log if line.startswith("delta: ")]
    return int(next(m for m in found if m)[1])


def test_scattered_blocks_come_in_one_multi_range_request(master, card):
    root, server = master
    install_v1(root, server, card)
    ask = index_of(root, 2)
    _, log, sent = install_v2(root, server, card)
    assert not any("one range per request" in line for line in log), log
    # every run of wanted blocks, merged across gaps of a part's headers only, in one request
    # (the probe before is two one-byte parts)
    assert requests_of(log) == 1, log
    assert sent[V2 + manifest(root, 2).delta.pack] < ask.pack_size


def test_a_master_without_multi_range_requests_is_asked_one_range_at_a_time(master, card, monkeypatch):
    """A server that answers several ranges with the whole file (RFC 9110 allows it) is
    never read to the end: the probe finds it out, and each run is then its own request."""
    root, server = master
    install_v1(root, server, card)
    monkeypatch.setattr(serve, "parse_ranges", lambda header, size: None)
    second, log, _ = install_v2(root, server, card)
    assert any("answered 200 to a multi-range request; one range per request" in line for line in log), log
    v2 = manifest(root, 2)
    # the probe's 200 is not read: what the updater took is the diff, a one-byte probe and the runs
    assert second.bytes_fetched < diff_file(root, 2, 1).stat().st_size + v2.delta.pack_size
    assert requests_of(log) > 1  # the runs one multi-range request takes (the test above), one by one


def test_a_worker_short_of_memory_for_the_plan_takes_the_full_stream_and_says_why(master, card, monkeypatch):
    root, server = master
    install_v1(root, server, card)
    v2 = manifest(root, 2)
    need = -(-v2.size // 4096) * delta.PLAN_BYTES
    monkeypatch.setattr(delta, "available_memory", lambda: 2 * need - 1)  # just short of twice the need
    _, log, sent = install_v2(root, server, card)
    assert f"full stream: planning would take ~{need >> 20} MiB of the {(2 * need - 1) >> 20} MiB" in "\n".join(log)
    assert sent[V2 + v2.stream] == v2.stream_size and V2 + v2.delta.pack not in sent  # nothing of the delta fetched
    monkeypatch.setattr(delta, "available_memory", lambda: 2 * need)
    write_plan(root, "/images/example/3/manifest.json")
    log.clear()
    assert update(card, server.url, log).action == "installed"  # v3 into slot a, by delta: just enough
    assert any(line.startswith("delta: ") and " written" in line for line in log), log


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000 kB\nMemFree:   100 kB\nMemAvailable:     512 kB\n")
    assert delta.available_memory(str(meminfo)) == 512 * 1024
    meminfo.write_text("MemTotal:        1000 kB\n")  # a kernel before 3.14
    assert delta.available_memory(str(meminfo)) is None
    assert delta.available_memory(str(tmp_path / "none")) is None
