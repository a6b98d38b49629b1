"""The block delta's golden samples (tests/data/make_golden_delta.py): today's code reads
every revision and writes the current one byte for byte. The b92f4a2 samples are one chain,
as a worker meets them: a card holding v2 (index rev1) fetches v3's signed manifest (rev6,
block_delta), rebuilds v3's index (rev2) from the diff, checks it against plain_sha256,
unpacks the pack with each block's window, and keeps the index behind v3 in the slot."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from rackboot.initramfs.updater import delta, formats, indexdiff, slotindex
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import Refused, UpdaterError
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import signing

from tests.data import make_golden_delta as golden

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = DATA / "keys" / "test-master.key"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_index_rev1_reads_as_written():
    index = delta.parse_index(sample("index.format1.rev1.bin"))
    assert (index.size, index.blocks, index.block_size, index.hash_len, index.window) == (
        8 * 4096 + 1000,
        9,
        4096,
        8,
        0,
    )
    assert [n == 0 for n in index.lengths] == [True, False, False, True, False, False, True, False, False]
    assert index.lengths[2] == index.lengths[5] == 4096 and index.lengths[8] == 1000  # random: stored as is
    assert index.hashes[4].hex() == hashlib.sha256(golden.image_rev1()[4 * 4096 : 5 * 4096]).hexdigest()[:16]
    body = gzip.decompress(sample("index.format1.rev1.bin"))
    assert body[:8] == b"RBINDEX1" and len(body) == 32 + 2 * 9 + 6 * 8


def test_pack_rev1_unpacks_to_the_image():
    index = delta.parse_index(sample("index.format1.rev1.bin"))
    pack = sample("pack.format1.rev1.bin")
    assert index.pack_size == len(pack)
    out = b"".join(
        delta.unpack_block(index, i, pack[index.offsets[i] : index.offsets[i + 1]])
        if index.lengths[i]
        else bytes(index.block_len(i))
        for i in range(index.blocks)
    )
    assert out == golden.image_rev1()


def test_todays_writer_makes_index_and_pack_rev1_byte_for_byte():
    """Without a window today's writer still makes rev1: what a master publishes under ``delta``."""
    assert golden.index_rev1() == (sample("index.format1.rev1.bin"), sample("pack.format1.rev1.bin"))


def test_manifest_rev5_pins_the_index_and_verifies():
    data = sample("manifest.format1.rev5.delta.json")
    manifest = formats.parse_manifest(data)
    assert manifest.delta == formats.BlockDelta(
        index="rootfs.ext4.index",
        index_size=101,
        index_sha256=hashlib.sha256(sample("index.format1.rev1.bin")).hexdigest(),
        pack="rootfs.ext4.pack",
        pack_size=9345,
        block_size=4096,
    )
    assert formats.dump(manifest) == data == formats.dump(golden.manifest_rev5(*golden.index_rev1()))
    name = "/images/example/2/manifest.json"
    Verifier(str(signing.public_key_path(KEY))).check(name, data, sample("manifest.format1.rev5.delta.json.sig"))
    with pytest.raises(Refused, match="does not verify"):
        Verifier(str(signing.public_key_path(KEY))).check(
            name, data.replace(b'"pack_size":9345', b'"pack_size":9346'), sample("manifest.format1.rev5.delta.json.sig")
        )


def test_manifest_rev5_without_its_delta_is_rev4_reading():
    obj = json.loads(sample("manifest.format1.rev5.delta.json"))
    del obj["delta"]
    assert formats.parse_manifest(json.dumps(obj)).delta is None  # older masters: the full stream


# --- b92f4a2: index rev2, pack rev2, manifest rev6, the index diff, the kept index -------------


def unpack(index: delta.BlockIndex, pack: bytes, image: bytes) -> bytes:
    """The image from the pack, each block with its window of ``image`` before it as dictionary."""
    out = bytearray()
    for i in range(index.blocks):
        if not index.lengths[i]:
            out += bytes(index.block_len(i))
            continue
        start = i * index.block_size
        dictionary = image[max(0, start - index.window) : start]
        out += delta.unpack_block(index, i, pack[index.offsets[i] : index.offsets[i + 1]], dictionary)
    return bytes(out)


def test_index_rev2_reads_as_written():
    index = delta.parse_index(sample("index.format1.rev2.bin"))
    assert (index.size, index.blocks, index.block_size, index.hash_len, index.window) == (
        14 * 4096 + 1000,
        15,
        4096,
        8,
        32768,
    )
    assert [i for i, n in enumerate(index.lengths) if n == 0] == [1, 5, 6, 12]
    # random blocks seen 2 and 3 blocks before are a few pack bytes; 9 blocks before (36 KiB) is outside the window
    assert index.lengths[2] == index.lengths[4] == index.lengths[8] == index.lengths[11] == 4096
    assert index.lengths[7] < 100 and index.lengths[10] < 100 and index.lengths[14] == 1000
    assert index.hashes[13].hex() == hashlib.sha256(golden.image_v3()[13 * 4096 : 14 * 4096]).hexdigest()[:16]
    body = gzip.decompress(sample("index.format1.rev2.bin"))
    assert body[:8] == b"RBINDEX2" and struct.unpack_from("<IIQQI", body, 8) == (4096, 8, 58344, 15, 32768)
    assert len(body) == 36 + 2 * 15 + 11 * 8 and body == index.body()


def test_pack_rev2_unpacks_to_the_image_only_with_each_blocks_window():
    index = delta.parse_index(sample("index.format1.rev2.bin"))
    pack = sample("pack.format1.rev2.bin")
    assert index.pack_size == len(pack)
    assert unpack(index, pack, golden.image_v3()) == golden.image_v3()
    stored7 = pack[index.offsets[7] : index.offsets[8]]
    with pytest.raises(UpdaterError, match="^block 7: "):
        delta.unpack_block(index, 7, stored7)  # no dictionary: it refers to block 4's bytes


def test_todays_writer_makes_index_and_pack_rev2_byte_for_byte():
    assert golden.index_rev2() == (sample("index.format1.rev2.bin"), sample("pack.format1.rev2.bin"))


def test_manifest_rev6_pins_the_rev2_index_under_block_delta_and_verifies():
    data = sample("manifest.format1.rev6.block-delta.json")
    manifest = formats.parse_manifest(data)
    plain = gzip.decompress(sample("index.format1.rev2.bin"))
    assert manifest.delta == formats.BlockDelta(
        index="rootfs.ext4.index",
        index_size=len(sample("index.format1.rev2.bin")),
        index_sha256=hashlib.sha256(sample("index.format1.rev2.bin")).hexdigest(),
        pack="rootfs.ext4.pack",
        pack_size=len(sample("pack.format1.rev2.bin")),
        block_size=4096,
        window=32768,
        plain_sha256=hashlib.sha256(plain).hexdigest(),
    )
    assert manifest.sha256 == hashlib.sha256(golden.image_v3()).hexdigest()
    obj = json.loads(data)
    rev5_keys = set(json.loads(sample("manifest.format1.rev5.delta.json"))["delta"])
    assert "delta" not in obj and set(obj["block_delta"]) == rev5_keys | {"window", "plain_sha256"}
    assert formats.dump(manifest) == data == formats.dump(golden.manifest_rev6(*golden.index_rev2()))
    name = "/images/example/3/manifest.json"
    verifier = Verifier(str(signing.public_key_path(KEY)))
    verifier.check(name, data, sample("manifest.format1.rev6.block-delta.json.sig"))
    with pytest.raises(Refused, match="does not verify"):
        verifier.check(
            name,
            data.replace(b'"window":32768', b'"window":32767'),
            sample("manifest.format1.rev6.block-delta.json.sig"),
        )


def test_manifest_rev6_is_a_full_stream_to_an_updater_that_reads_only_delta():
    """Before b92f4a2 the reader looked at ``delta`` only: a rev2 index is never handed to it."""
    obj = json.loads(sample("manifest.format1.rev6.block-delta.json"))
    assert obj.get("delta") is None
    rev5 = json.loads(sample("manifest.format1.rev5.delta.json"))["delta"]
    both = formats.parse_manifest(json.dumps({**obj, "delta": rev5})).delta
    assert both is not None and both.window == 32768  # today's reader takes the rev2 index when both are there
    del obj["block_delta"]
    assert formats.parse_manifest(json.dumps(obj)).delta is None


def test_block_delta_is_checked_where_it_enters():
    obj = json.loads(sample("manifest.format1.rev6.block-delta.json"))
    for change, problem in [
        ({"window": 0}, "window: must be >= 1, got 0"),
        ({"window": 32769}, "window: must be <= 32768 (deflate's window), got 32769"),
        ({"plain_sha256": "AB" * 32}, "plain_sha256: 'ABAB"),
    ]:
        bad = {**obj, "block_delta": {**obj["block_delta"], **change}}
        with pytest.raises(UpdaterError, match="^" + re.escape(f"manifest: block_delta: {problem}")):
            formats.parse_manifest(json.dumps(bad))
    del obj["block_delta"]["plain_sha256"]
    with pytest.raises(UpdaterError, match="^manifest: block_delta: plain_sha256: missing$"):
        formats.parse_manifest(json.dumps(obj))


def diff_ops(data: bytes) -> tuple[tuple, list[tuple]]:
    """The diff's header and ops, read as notes/formats.md describes them (not with indexdiff's reader)."""
    raw = gzip.decompress(data)
    head, at, ops = struct.unpack_from("<8s32sIIQQI", raw), 68, []

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            byte = raw[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while at < len(raw):
        value = varint()
        n, op = value >> 2, value & 3
        if op == 1:
            zig = varint()
            ops.append(("copy", n, zig >> 1 if not zig & 1 else -((zig + 1) >> 1)))
        elif op == 2:
            ops.append(("new", n, [raw[k : k + 10] for k in range(at, at + 10 * n, 10)]))
            at += 10 * n
        else:
            assert op == 0
            ops.append(("zero", n))
    return head, ops


def test_indexdiff_rev1_rebuilds_v3s_index_from_v2s():
    base = delta.parse_index(sample("index.format1.rev1.bin"))
    manifest = formats.parse_manifest(sample("manifest.format1.rev6.block-delta.json"))
    new = indexdiff.apply(base, sample("indexdiff.format1.rev1.bin"), expected=manifest.size)
    plain = gzip.decompress(sample("index.format1.rev2.bin"))
    assert new.body() == plain and new == delta.parse_index(sample("index.format1.rev2.bin"))
    spec = manifest.delta
    assert spec is not None and hashlib.sha256(new.body()).hexdigest() == spec.plain_sha256
    head, ops = diff_ops(sample("indexdiff.format1.rev1.bin"))
    base_body = gzip.decompress(sample("index.format1.rev1.bin"))
    assert head == (b"RBIDXDF1", hashlib.sha256(base_body).digest(), 4096, 8, 58344, 15, 32768)
    assert [op[:2] for op in ops] == [
        ("new", 1),
        ("copy", 1),
        ("copy", 1),
        ("new", 1),
        ("copy", 2),
        ("zero", 1),
        ("new", 4),
        ("copy", 2),
        ("new", 1),
        ("copy", 1),
    ]
    assert [op[2] for op in ops if op[0] == "copy"] == [0, 1, 2, -5, 4]  # block 11 is v2's block 2 again
    assert ops[0][2] == [struct.pack("<H", new.lengths[0]) + new.hashes[0]]


def test_todays_writer_makes_indexdiff_rev1_byte_for_byte():
    assert golden.indexdiff_rev1() == sample("indexdiff.format1.rev1.bin")
    assert indexdiff.diff_name("rootfs.ext4.index", "ab" * 32) == "rootfs.ext4.index.from-" + "ab" * 32


def slot_with_sample(tmp_path, capacity: int) -> delta.Slot:
    """A file-backed slot of ``capacity`` bytes holding v3's image and, in its last 4 KiB, the kept-index sample."""
    path = tmp_path / "slot.img"
    path.write_bytes(
        golden.image_v3() + bytes(capacity - len(golden.image_v3()) - 4096) + sample("slotindex.format1.rev1.bin")
    )
    return delta.Slot(Disk(str(path)), 0, capacity)


@pytest.mark.parametrize("capacity", [golden.SLOT_CAPACITY, 1 << 20])
def test_slotindex_rev1_loads_behind_the_image(tmp_path, capacity):
    slot = slot_with_sample(tmp_path, capacity)
    image_sha = formats.parse_manifest(sample("manifest.format1.rev6.block-delta.json")).sha256
    assert slotindex.load(slot, image_sha, where="slot b") == delta.parse_index(sample("index.format1.rev2.bin"))
    tail = sample("slotindex.format1.rev1.bin")
    body = gzip.decompress(sample("index.format1.rev2.bin"))
    assert tail[: len(body)] == body and tail[len(body) : 4096 - 512] == bytes(4096 - 512 - len(body))
    trailer = tail[-512:]
    assert struct.unpack_from("<8sQ32s32s", trailer) == (
        b"RBSLTIX1",
        len(body),
        bytes.fromhex(image_sha),
        hashlib.sha256(body).digest(),
    )
    assert struct.unpack_from("<I", trailer, 80)[0] == zlib.crc32(trailer[:80]) and trailer[84:] == bytes(512 - 84)


def test_todays_writer_makes_slotindex_rev1_byte_for_byte(tmp_path):
    assert golden.slotindex_rev1() == sample("slotindex.format1.rev1.bin")
    path = tmp_path / "slot.img"
    image = golden.image_v3()
    path.write_bytes(image + bytes((1 << 20) - len(image)))
    slot = delta.Slot(Disk(str(path)), 0, 1 << 20)
    index = delta.parse_index(sample("index.format1.rev2.bin"))
    assert slotindex.store(slot, len(image), hashlib.sha256(image).hexdigest(), index, lambda: None) is None
    data = path.read_bytes()
    assert data[-4096:] == sample("slotindex.format1.rev1.bin") and data[:-4096] == image + bytes(
        (1 << 20) - 4096 - len(image)
    )


def test_report_rev8_reads_and_round_trips():
    data = sample("report.rev8.delta.json")
    report = formats.parse_report(data)
    assert (report.card_bytes, report.bytes) == (300_000_000, 1_234_567) and report.delta.startswith("delta: ")
    assert formats.dump(report) == data == formats.dump(golden.report_rev8())
