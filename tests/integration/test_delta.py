"""Block-delta installs on the host updater against a real master (`rackboot serve` on
loopback) and real images (`rackboot publish` of two trees that differ by a little)."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Identity, run
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


def update(card: Path, url: str, log: list[str] | None = None):
    return run(
        str(card),
        url,
        Identity(MAC),
        log=(log.append if log is not None else lambda m: None),
        master=MasterClient(url, read_timeout=5.0, retries=1, backoff=0.01),
    )


def manifest(root: Path, version: int) -> formats.Manifest:
    return formats.parse_manifest((root / f"images/example/{version}/manifest.json").read_bytes())


def image(root: Path, version: int) -> bytes:
    import gzip

    return gzip.decompress((root / f"images/example/{version}/rootfs.ext4.gz").read_bytes())


def reports(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / f"reports/{NODE}.jsonl").read_text().splitlines()]


def slot_bytes(card: Path, at: int, size: int) -> bytes:
    with open(card, "rb") as f:
        f.seek(at)
        return f.read(size)


def test_publish_writes_an_index_the_signed_manifest_pins(images):
    m = manifest(images, 2)
    assert m.delta is not None and m.delta.block_size == 4096
    d = images / "images/example/2"
    assert os.path.getsize(d / m.delta.index) == m.delta.index_size
    assert os.path.getsize(d / m.delta.pack) == m.delta.pack_size


def test_v2_is_built_from_the_card_and_a_few_blocks_of_the_master(master, card):
    root, server = master
    write_plan(root, "/images/example/1/manifest.json")
    first = update(card, server.url)
    assert (first.slot, first.action) == ("a", "installed")
    v1 = manifest(root, 1)
    assert first.bytes_fetched >= v1.stream_size  # a blank card takes the full stream
    write_plan(root, "/images/example/2/manifest.json")
    log: list[str] = []
    second = update(card, server.url, log)
    v2 = manifest(root, 2)
    assert (second.slot, second.action, second.version) == ("b", "installed", 2)
    assert slot_bytes(card, SLOT_B, v2.size) == image(root, 2)
    assert server.stats()["bytes_sent"].get("/images/example/2/rootfs.ext4.gz", 0) == 0  # no stream
    fetched = second.bytes_fetched - first.bytes_fetched
    assert fetched < v2.stream_size / 3, log
    download = [r for r in reports(root) if r["phase"] == "download" and r.get("version") == 2][-1]
    assert download["delta"].startswith("delta: ") and download["card_bytes"] > v2.size // 2
    assert download["bytes"] - first.bytes_fetched == fetched


def test_blocks_already_in_the_target_are_not_written_again(master, card):
    """v3 goes into slot a over v1 (neither v1 nor v2 confirmed itself, so the newer v2 in slot b
    stays): the blocks v1 and v3 share at the same offsets stay as they are, unwritten."""
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
    assert any("slot a holds example v1: its index from the master" in line for line in log), log


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
    root, server = master
    write_plan(root, "/images/example/1/manifest.json")
    update(card, server.url)
    m = manifest(root, 2)
    index = root / "images/example/2" / m.delta.index
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.write_bytes(bytes(data))
    write_plan(root, "/images/example/2/manifest.json")
    result = update(card, server.url)
    assert (result.slot, result.action) == ("a", "fallback")
    assert "block index of example v2: sha256 is" in result.error


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
    """The master's one stream slot is taken (another worker's stream) when v2's delta asks for
    its index: told 503 and Retry-After, the updater waits, asks again, and reports the wait."""
    root = tmp_path / "master"
    shutil.copytree(images, root)
    server = serve.make_server(root, quiet=True, max_streams=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the other worker's stream ends while this one waits
        waits.append(seconds)
        server.end_stream()

    try:
        write_plan(root, "/images/example/1/manifest.json")
        update(card, server.url)
        write_plan(root, "/images/example/2/manifest.json")
        assert server.start_stream() is None  # the slot is taken
        client = MasterClient(server.url, read_timeout=5.0, retries=1, backoff=0.01, sleep=sleep)
        result = run(str(card), server.url, Identity(MAC), log=lambda m: None, master=client)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.slot, result.action, result.version) == ("b", "installed", 2)
    assert len(waits) == 1 and waits[0] >= 1
    reported = [r for r in reports(root) if r["phase"] == "wait" and r["version"] == 2]
    assert len(reported) == 1 and reported[0]["seconds"] == pytest.approx(waits[0], abs=0.01)
    download = [r for r in reports(root) if r["phase"] == "download" and r["version"] == 2][-1]
    assert download["delta"].startswith("delta: ")
