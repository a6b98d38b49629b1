"""The block delta's golden samples (tests/data/make_golden_delta.py): today's code reads
every revision and writes the current one byte for byte."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from rackboot.initramfs.updater import delta, formats
from rackboot.initramfs.updater.errors import Refused
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import signing

from tests.data import make_golden_delta as golden

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = DATA / "keys" / "test-master.key"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_index_rev1_reads_as_written():
    index = delta.parse_index(sample("index.format1.rev1.bin"))
    assert (index.size, index.blocks, index.block_size, index.hash_len) == (8 * 4096 + 1000, 9, 4096, 8)
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


def test_report_rev8_reads_and_round_trips():
    data = sample("report.rev8.delta.json")
    report = formats.parse_report(data)
    assert (report.card_bytes, report.bytes) == (300_000_000, 1_234_567) and report.delta.startswith("delta: ")
    assert formats.dump(report) == data == formats.dump(golden.report_rev8())
