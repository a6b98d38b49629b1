"""The block index (delta.py): bytes, round trips, one-line refusals, and fuzzing (only
UpdaterError escapes); the manifest's "delta" entry."""

from __future__ import annotations

import gzip
import io
import random
import struct
import zlib
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import delta, formats
from rackboot.initramfs.updater.errors import UpdaterError

BS = delta.BLOCK_SIZE


def image(blocks: int = 12, tail: int = 0) -> bytes:
    """Zero, text (compressible) and random (not) blocks, and a short last block of ``tail`` bytes."""
    rng = random.Random(5)
    parts = []
    for i in range(blocks):
        parts.append([bytes(BS), (b"rackboot %d\n" % i * 400)[:BS], rng.randbytes(BS)][i % 3])
    return b"".join(parts) + rng.randbytes(tail)


def indexed(data: bytes) -> tuple[delta.BlockIndex, bytes]:
    pack = io.BytesIO()
    return delta.build_index(io.BytesIO(data), len(data), pack), pack.getvalue()


def raw_body(index: delta.BlockIndex) -> bytes:
    return gzip.decompress(index.dump())


def test_blocks_are_zero_deflated_or_stored_as_is():
    index, pack = indexed(image(6))
    assert list(index.lengths[:3]) == [0, index.lengths[1], BS] and 0 < index.lengths[1] < BS // 4
    assert index.pack_size == len(pack) == sum(index.lengths)
    assert index.hashes[0] == delta.block_hash(bytes(BS)) and len(index.hashes[2]) == delta.HASH_LEN


@pytest.mark.parametrize("tail", [0, 1, 100, BS - 1])
def test_round_trip_and_every_block_unpacks(tail):
    data = image(9, tail)
    index, pack = indexed(data)
    again = delta.parse_index(index.dump())
    assert again == index and again.offsets == index.offsets and again.size == len(data)
    out = b"".join(
        delta.unpack_block(again, i, pack[again.offsets[i] : again.offsets[i + 1]])
        if again.lengths[i]
        else bytes(again.block_len(i))
        for i in range(again.blocks)
    )
    assert out == data


def test_a_zero_tail_block_is_short_and_zero():
    data = image(3) + bytes(100)
    index = delta.parse_index(indexed(data)[0].dump())
    assert index.block_len(3) == 100 and index.lengths[3] == 0 and index.hashes[3] == delta.block_hash(bytes(100))


def test_the_same_image_gives_the_same_bytes():
    assert indexed(image())[0].dump() == indexed(image())[0].dump()
    assert indexed(image())[0].dump()[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_a_tampered_block_is_refused():
    index, pack = indexed(image(3))
    stored = bytearray(pack[index.offsets[1] : index.offsets[2]])
    stored[-3] ^= 1
    with pytest.raises(UpdaterError, match="^block 1: "):
        delta.unpack_block(index, 1, bytes(stored))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    other = c.compress((b"other %d\n" * 600)[:BS]) + c.flush()  # valid deflate, wrong bytes
    with pytest.raises(UpdaterError, match="^block 1: its bytes do not match the index's hash$"):
        delta.unpack_block(index, 1, other)


def header(**kw) -> bytes:
    fields = dict(magic=delta.MAGIC, block_size=BS, hash_len=8, size=2 * BS, blocks=2) | kw
    return delta.HEADER.pack(*fields.values())


@pytest.mark.parametrize(
    "body,problem",
    [
        (b"short", "5 bytes is shorter than its header"),
        (header(magic=b"RBINDEX9"), "magic b'RBINDEX9' is not b'RBINDEX1'"),
        (header(block_size=3000), "block size 3000 is not a power of two in 512..32768"),
        (header(block_size=1 << 16), "block size 65536 is not a power of two in 512..32768"),
        (header(hash_len=4), "hash length 4 is not in 8..32"),
        (header(blocks=3), "3 blocks of 4096 cannot hold 8192 bytes"),
        (header(size=0, blocks=0), "0 blocks of 4096 cannot hold 0 bytes"),
        (header() + b"\0\0", "ends inside its block lengths"),
        (header() + struct.pack("<HH", BS + 1, 0), "a block's stored length is larger than the block size 4096"),
        (header() + struct.pack("<HH", 10, 0) + b"x" * 7, "7 bytes of hashes, expected 1 x 8"),
        (header() + struct.pack("<HH", 10, 0) + b"x" * 9, "9 bytes of hashes, expected 1 x 8"),
    ],
)
def test_bad_indexes_are_refused_in_one_line(body, problem):
    with pytest.raises(UpdaterError) as e:
        delta.parse_index(gzip.compress(body), where="block index of example v2")
    assert str(e.value) == f"block index of example v2: {problem}"


def test_not_gzip_trailing_bytes_and_a_bomb_are_refused():
    good = indexed(image(3))[0].dump()
    with pytest.raises(UpdaterError, match="^block index: not valid gzip"):
        delta.parse_index(b"not gzip at all")
    with pytest.raises(UpdaterError, match="not one gzip member"):
        delta.parse_index(good + b"more")
    with pytest.raises(UpdaterError, match=f"not one gzip member of at most {delta.MAX_INDEX} bytes"):
        delta.parse_index(gzip.compress(bytes(delta.MAX_INDEX + 1)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    for body in (data, gzip.compress(data, mtime=0)):
        try:
            delta.parse_index(body)
        except UpdaterError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6), st.integers(0, 400))
def test_fuzz_mutated_indexes(flips, cut):
    body = bytearray(raw_body(indexed(image(5, 7))[0]))
    for at, value in flips:
        body[at % len(body)] = value
    body = body[: len(body) - cut] if cut < len(body) else body
    try:
        index = delta.parse_index(gzip.compress(bytes(body)))
    except UpdaterError:
        return
    assert delta.parse_index(index.dump()) == index  # whatever parses, round trips


MANIFEST_DELTA = {
    "index": "rootfs.ext4.index",
    "index_size": 100,
    "index_sha256": "ab" * 32,
    "pack": "rootfs.ext4.pack",
    "pack_size": 5000,
    "block_size": 4096,
}


def test_the_manifest_entry_round_trips_and_is_checked():
    entry = formats.BlockDelta.from_dict(MANIFEST_DELTA)
    assert entry.to_dict() == MANIFEST_DELTA
    with pytest.raises(UpdaterError, match=r"^manifest: delta: block_size: 5000 is not a power of two in 512..32768$"):
        formats.BlockDelta.from_dict({**MANIFEST_DELTA, "block_size": 5000})
    with pytest.raises(UpdaterError, match=r"^manifest: delta: index: '../x' is not a plain file name$"):
        formats.BlockDelta.from_dict({**MANIFEST_DELTA, "index": "../x"})


def test_lengths_are_little_endian_on_the_wire():
    index = indexed(image(2))[0]
    body = raw_body(index)
    lengths = array("H", body[delta.HEADER.size : delta.HEADER.size + 4])
    assert list(lengths) == list(index.lengths) and body[delta.HEADER.size + 2 : delta.HEADER.size + 4] != b"\0\0"
