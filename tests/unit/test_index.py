"""The block index (delta.py), rev1 (each block deflated alone) and rev2 (each block deflated
with the window of the image before it as dictionary): bytes, round trips, one-line
refusals, and fuzzing (only UpdaterError escapes); the manifest's "delta" and "block_delta"
entries. The build with a window (fetched blocks' dictionaries read back from the slot) is
in test_delta_planner.py, beside the other builds on file-backed slots."""

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
WINDOWS = [0, delta.WINDOW]  # rev1, rev2


def image(blocks: int = 12, tail: int = 0) -> bytes:
    """Zero, text (compressible) and random (not) blocks, and a short last block of ``tail`` bytes."""
    rng = random.Random(5)
    parts = []
    for i in range(blocks):
        parts.append([bytes(BS), (b"rackboot %d\n" % i * 400)[:BS], rng.randbytes(BS)][i % 3])
    return b"".join(parts) + rng.randbytes(tail)


def linked(blocks: int, zeros: tuple[int, ...] = (), tail: int = 0, seed: int = 7) -> bytes:
    """Blocks that each repeat half of the non-zero block before them (as files of one package
    share strings), the other half fresh from a 16-letter alphabet: alone each deflates to
    about 60%; with the window, the repeated half is a few bytes that refer into it. The
    short tail of ``tail`` bytes is made the same way."""
    rng = random.Random(seed)
    out, previous = bytearray(), b""
    for i in range(blocks + 1):
        if i in zeros:
            out += bytes(BS)
            continue
        fresh = bytes(rng.choices(b"abcdefghijklmnop", k=BS))
        block = (previous[: BS // 2] + fresh)[: BS if i < blocks else tail]
        out += block
        previous = block[BS // 2 :] + block[: BS // 2]
    return bytes(out)


def indexed(data: bytes, window: int = delta.WINDOW) -> tuple[delta.BlockIndex, bytes]:
    pack = io.BytesIO()
    return delta.build_index(io.BytesIO(data), len(data), pack, window=window), pack.getvalue()


def unpack_all(index: delta.BlockIndex, pack: bytes, data: bytes) -> bytes:
    """The image from ``pack``, each block given its window of ``data`` as dictionary."""
    out = []
    for i in range(index.blocks):
        if not index.lengths[i]:
            out.append(bytes(index.block_len(i)))
            continue
        start = i * index.block_size
        window = data[max(0, start - index.window) : start] if index.window else b""
        out.append(delta.unpack_block(index, i, pack[index.offsets[i] : index.offsets[i + 1]], window))
    return b"".join(out)


def raw_body(index: delta.BlockIndex) -> bytes:
    return gzip.decompress(index.dump())


def test_blocks_are_zero_deflated_or_stored_as_is():
    index, pack = indexed(image(6))
    assert list(index.lengths[:3]) == [0, index.lengths[1], BS] and 0 < index.lengths[1] < BS // 4
    assert index.pack_size == len(pack) == sum(index.lengths)
    assert index.hashes[0] == delta.block_hash(bytes(BS)) and len(index.hashes[2]) == delta.HASH_LEN


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("tail", [0, 1, 100, BS - 1])
def test_round_trip_and_every_block_unpacks(tail, window):
    data = image(9, tail)
    index, pack = indexed(data, window)
    again = delta.parse_index(index.dump())
    assert again == index and again.offsets == index.offsets and again.size == len(data)
    assert again.window == window and delta.parse_body(index.body()) == index
    assert unpack_all(again, pack, data) == data


@pytest.mark.parametrize("window", [512, 4096, 5000, delta.WINDOW])
@pytest.mark.parametrize("tail", [0, 700])
def test_rev2_round_trips_with_any_window_across_read_chunks(window, tail, monkeypatch):
    """Windows that do not align with blocks, and reads of a few blocks: a block's dictionary
    crosses the writer's read chunks."""
    monkeypatch.setattr(delta, "READ_CHUNK", 3 * BS)
    data = linked(14, zeros=(5, 6), tail=tail)
    index, pack = indexed(data, window)
    assert delta.parse_index(index.dump()) == index and index.window == window
    assert unpack_all(index, pack, data) == data
    monkeypatch.setattr(delta, "READ_CHUNK", 1 << 20)
    assert indexed(data, window) == (index, pack)  # the chunking does not change a byte


def test_the_window_makes_repeated_bytes_cheap():
    data = linked(12, tail=300)
    rev1, rev2 = indexed(data, 0)[0], indexed(data)[0]
    assert rev2.body()[:8] == delta.MAGIC2 and rev1.body()[:8] == delta.MAGIC
    assert rev1.hashes == rev2.hashes
    # alone, every block is ~60% of its bytes; with the window, each one after the first ~30%
    assert all(rev2.lengths[i] < 0.8 * rev1.lengths[i] for i in range(1, 12)) and rev2.lengths[0] == rev1.lengths[0]
    assert rev2.pack_size < 0.7 * rev1.pack_size


def test_a_rev2_block_unpacks_only_with_its_own_window():
    data = linked(12, zeros=(4,), tail=500)
    index, pack = indexed(data)
    for i in range(1, index.blocks):
        stored = pack[index.offsets[i] : index.offsets[i + 1]]
        if not stored:
            continue
        start = i * BS
        right = data[max(0, start - delta.WINDOW) : start]
        assert delta.unpack_block(index, i, stored, right) == data[start : start + BS]
        for wrong in (b"", right[:-1], right[1:] + b"x", bytes(len(right)), right[: len(right) // 2]):
            with pytest.raises(UpdaterError, match=f"^block {i}: (not valid deflate data|its bytes do not match)"):
                delta.unpack_block(index, i, stored, wrong)
    assert delta.unpack_block(index, 0, pack[: index.offsets[1]]) == data[:BS]  # block 0: nothing before it


def test_a_block_stored_as_is_needs_no_window():
    data = image(6)
    index, pack = indexed(data)
    assert index.lengths[2] == BS
    for dictionary in (b"", b"anything", data[: 2 * BS]):
        assert (
            delta.unpack_block(index, 2, pack[index.offsets[2] : index.offsets[3]], dictionary) == data[2 * BS : 3 * BS]
        )


def test_a_zero_tail_block_is_short_and_zero():
    data = image(3) + bytes(100)
    index = delta.parse_index(indexed(data)[0].dump())
    assert index.block_len(3) == 100 and index.lengths[3] == 0 and index.hashes[3] == delta.block_hash(bytes(100))


@pytest.mark.parametrize("window", WINDOWS)
def test_the_same_image_gives_the_same_bytes(window):
    assert indexed(image(), window)[0].dump() == indexed(image(), window)[0].dump()
    assert indexed(image(), window)[0].dump()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert gzip.decompress(indexed(image(), window)[0].dump()) == indexed(image(), window)[0].body()


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


def header2(**kw) -> bytes:
    fields = dict(magic=delta.MAGIC2, block_size=BS, hash_len=8, size=2 * BS, blocks=2, window=delta.WINDOW) | kw
    return delta.HEADER2.pack(*fields.values())


@pytest.mark.parametrize(
    "body,problem",
    [
        (b"short", "5 bytes is shorter than its header"),
        (header(magic=b"RBINDEX9"), "magic b'RBINDEX9' is neither b'RBINDEX1' nor b'RBINDEX2'"),
        (header(block_size=3000), "block size 3000 is not a power of two in 512..32768"),
        (header(block_size=1 << 16), "block size 65536 is not a power of two in 512..32768"),
        (header(hash_len=4), "hash length 4 is not in 8..32"),
        (header(blocks=3), "3 blocks of 4096 cannot hold 8192 bytes"),
        (header(size=0, blocks=0), "0 blocks of 4096 cannot hold 0 bytes"),
        (header() + b"\0\0", "ends inside its block lengths"),
        (header() + struct.pack("<HH", BS + 1, 0), "a block's stored length is larger than the block size 4096"),
        (header() + struct.pack("<HH", 10, 0) + b"x" * 7, "7 bytes of hashes, expected 1 x 8"),
        (header() + struct.pack("<HH", 10, 0) + b"x" * 9, "9 bytes of hashes, expected 1 x 8"),
        (header2(window=0), "window 0 is not in 1..32768"),
        (header2(window=delta.WINDOW + 1), "window 32769 is not in 1..32768"),
        (header2(window=1 << 31), "window 2147483648 is not in 1..32768"),
        (header2()[:-4], "32 bytes is shorter than its header"),  # rev1's header length, rev2's magic
        (header2()[:-1], "35 bytes is shorter than its header"),
        (header2(block_size=3000), "block size 3000 is not a power of two in 512..32768"),
        (header2(blocks=1), "1 blocks of 4096 cannot hold 8192 bytes"),
        (header2() + b"\0\0", "ends inside its block lengths"),
        (header2() + struct.pack("<HH", 10, 0) + b"x" * 7, "7 bytes of hashes, expected 1 x 8"),
        (header(magic=delta.MAGIC2) + bytes(4), "window 0 is not in 1..32768"),  # a rev1 header under rev2's magic
    ],
)
def test_bad_indexes_are_refused_in_one_line(body, problem):
    with pytest.raises(UpdaterError) as e:
        delta.parse_index(gzip.compress(body), where="block index of example v2")
    assert str(e.value) == f"block index of example v2: {problem}"
    with pytest.raises(UpdaterError) as e:
        delta.parse_body(body, where="slot b")  # the kept index and the diff's base: no gzip around it
    assert str(e.value) == f"slot b: {problem}"


def test_a_rev1_header_with_a_window_after_it_is_not_rev2():
    """rev1's magic never reads a window: its four bytes after the header are block lengths."""
    body = header() + struct.pack("<HH", 0, 0)
    assert delta.parse_index(gzip.compress(body)).window == 0


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
    for prefix in (delta.MAGIC, delta.MAGIC2):
        try:
            index = delta.parse_body(prefix + data)
        except UpdaterError:
            continue
        assert delta.parse_body(index.body()) == index


BODIES = {window: raw_body(indexed(image(5, 7), window)[0]) for window in WINDOWS}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(WINDOWS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 400),
)
def test_fuzz_mutated_indexes(window, flips, cut):
    body = bytearray(BODIES[window])
    for at, value in flips:
        body[at % len(body)] = value
    body = body[: len(body) - cut] if cut < len(body) else body
    try:
        index = delta.parse_index(gzip.compress(bytes(body)))
    except UpdaterError:
        return
    assert delta.parse_index(index.dump()) == index  # whatever parses, round trips
    assert index.body() == bytes(body) and 0 <= index.window <= delta.WINDOW


LINKED = linked(12)
LINKED_INDEXED = indexed(LINKED)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 11), st.binary(max_size=64), st.binary(max_size=64))
def test_fuzz_unpacking_with_any_dictionary(i, stored, dictionary):
    """Any stored bytes and any dictionary: a block that hashes right, or UpdaterError."""
    data, (index, pack) = LINKED, LINKED_INDEXED
    for candidate in (stored, pack[index.offsets[i] : index.offsets[i + 1]][: len(stored)]):
        try:
            plain = delta.unpack_block(index, i, candidate, dictionary)
        except UpdaterError:
            continue
        assert plain == data[i * BS : (i + 1) * BS]


MANIFEST_DELTA = {
    "index": "rootfs.ext4.index",
    "index_size": 100,
    "index_sha256": "ab" * 32,
    "pack": "rootfs.ext4.pack",
    "pack_size": 5000,
    "block_size": 4096,
}


MANIFEST_BLOCK_DELTA = {**MANIFEST_DELTA, "window": 32768, "plain_sha256": "cd" * 32}


def test_the_manifest_entry_round_trips_and_is_checked():
    entry = formats.BlockDelta.from_dict(MANIFEST_DELTA)
    assert (
        entry.to_dict() == MANIFEST_DELTA and entry.key == "delta" and (entry.window, entry.plain_sha256) == (0, None)
    )
    entry = formats.BlockDelta.from_dict(MANIFEST_BLOCK_DELTA, key="block_delta")
    assert entry.to_dict() == MANIFEST_BLOCK_DELTA and entry.key == "block_delta" and entry.window == 32768
    # under "delta" the rev2 fields are not read: a rev1 index has neither
    assert formats.BlockDelta.from_dict(MANIFEST_BLOCK_DELTA).to_dict() == MANIFEST_DELTA
    with pytest.raises(UpdaterError, match=r"^manifest: delta: block_size: 5000 is not a power of two in 512..32768$"):
        formats.BlockDelta.from_dict({**MANIFEST_DELTA, "block_size": 5000})
    with pytest.raises(UpdaterError, match=r"^manifest: delta: index: '../x' is not a plain file name$"):
        formats.BlockDelta.from_dict({**MANIFEST_DELTA, "index": "../x"})


@pytest.mark.parametrize("window", WINDOWS)
def test_lengths_are_little_endian_on_the_wire(window):
    index = indexed(image(2), window)[0]
    body = raw_body(index)
    head = delta.HEADER2.size if window else delta.HEADER.size
    lengths = array("H", body[head : head + 4])
    assert list(lengths) == list(index.lengths) and body[head + 2 : head + 4] != b"\0\0"
    assert struct.unpack_from("<I", body, 32)[0] == window if window else body[:8] == delta.MAGIC
