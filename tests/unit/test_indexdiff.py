"""The block index as a diff against another (indexdiff.py): apply(base, diff(base, new)) is
new, byte for byte of its body, whatever moved between them; a one-block change is a few
bytes; a diff of another base, or one that does not add up, is refused in one line; and
fuzzed diffs let only UpdaterError out."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import struct
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rackboot.initramfs.updater import delta, indexdiff
from rackboot.initramfs.updater.errors import UpdaterError

BS = delta.BLOCK_SIZE
ZERO_HASH = delta.block_hash(bytes(BS))


def entry(label: str) -> tuple[int, bytes]:
    """A non-zero block's (stored length, hash), the same for the same label."""
    digest = hashlib.sha256(label.encode()).digest()
    return 1 + int.from_bytes(digest[:2], "little") % BS, digest[: delta.HASH_LEN]


def index(labels: list[str], *, tail: int = 0, window: int = delta.WINDOW) -> delta.BlockIndex:
    """An index of one block per label ("0": a zero block); the last block ``tail`` bytes when
    ``tail``. Entries only (no image behind them): a diff works on lengths and hashes."""
    size = len(labels) * BS - (BS - tail if tail else 0)
    lengths, stored = array("H"), []
    for label in labels:
        if label == "0":
            lengths.append(0)
        else:
            n, h = entry(label)
            lengths.append(min(n, tail) if tail and len(lengths) == len(labels) - 1 else n)
            stored.append(h)
    hashes = delta.with_zero_hashes(size, BS, delta.HASH_LEN, lengths, stored)
    return delta.BlockIndex(size, lengths, hashes, BS, delta.HASH_LEN, window)


def labels(n: int, prefix: str = "b") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def round_trip(base: delta.BlockIndex, new: delta.BlockIndex) -> bytes:
    data = indexdiff.diff(base, new)
    again = indexdiff.apply(base, data)
    assert again.body() == new.body() and again == new
    return data


BASE = labels(40)
CASES = {
    "identical": (BASE, BASE),
    "a run moved on by 3": (BASE, BASE[:10] + ["n1", "n2", "n3"] + BASE[10:]),
    "a run moved back by 5": (BASE, BASE[:10] + BASE[15:]),
    "blocks inserted and removed": (BASE, ["x"] + BASE[:7] + BASE[9:20] + ["y", "z"] + BASE[20:33] + BASE[35:]),
    "two runs swapped": (BASE, BASE[20:] + BASE[:20]),
    "zero runs": (BASE, BASE[:5] + ["0"] * 7 + BASE[5:30] + ["0"] + BASE[30:]),
    "zero runs removed": (BASE[:5] + ["0"] * 7 + BASE[5:], BASE),
    "all new": (BASE, labels(40, "n")),
    "one block": (BASE, ["b3"]),
    "repeats": (BASE, BASE[:4] * 10),
    "base all zero": (["0"] * 40, BASE),
    "new all zero": (BASE, ["0"] * 40),
}


@pytest.mark.parametrize("case", CASES)
def test_apply_rebuilds_the_new_index(case):
    base, new = CASES[case]
    round_trip(index(base), index(new))


@pytest.mark.parametrize("base_tail,new_tail", [(0, 100), (100, 0), (100, 100), (100, 2000), (BS - 1, 1)])
def test_a_short_last_block_and_different_sizes(base_tail, new_tail):
    base = index(BASE, tail=base_tail)
    round_trip(base, index(BASE, tail=new_tail))
    round_trip(base, index(BASE[:25], tail=new_tail))
    round_trip(base, index(BASE + labels(30, "n"), tail=new_tail))
    round_trip(base, index(BASE[:-1] + ["0"], tail=new_tail))  # a short zero tail: its own hash


def test_a_short_zero_tail_is_not_a_whole_zero_block():
    base = index(BASE[:3] + ["0"], tail=100)  # the base's last block: 100 zero bytes
    new = index(BASE[:3] + ["0", "0"])
    assert base.hashes[3] != new.hashes[3] == new.hashes[4] == ZERO_HASH
    round_trip(base, new)


def image(seed: int, blocks: int) -> bytes:
    rng = random.Random(seed)
    parts = [bytes(BS), b"".join(b"line %d\n" % rng.randrange(1000) for _ in range(600))[:BS], rng.randbytes(BS)]
    return b"".join(parts[i % 3] if i % 5 else rng.randbytes(BS) for i in range(blocks))


def built(data: bytes, window: int) -> delta.BlockIndex:
    return delta.build_index(io.BytesIO(data), len(data), io.BytesIO(), window=window)


def test_a_rev1_base_and_a_rev2_new_index_of_real_images():
    """A card that holds a version published before b92f4a2 (rev1 index) and a rev2 new one:
    random blocks (stored as is in both) and zero runs are copied, the rest is new."""
    old = image(1, 30)
    new = old[: 10 * BS] + random.Random(2).randbytes(BS) + old[10 * BS : 25 * BS] + bytes(700)
    base, target = built(old, 0), built(new, delta.WINDOW)
    data = round_trip(base, target)
    again = indexdiff.apply(base, data)
    assert again.window == delta.WINDOW and base.window == 0
    round_trip(target, base)  # and back: a rev2 base, a rev1 new index


def test_a_one_block_change_is_a_few_bytes():
    base = index(labels(5000))
    new = index(labels(2000) + ["changed"] + labels(5000)[2001:])
    data = round_trip(base, new)
    assert len(base.dump()) > 40_000 and len(data) < 150  # a gzip member, the 68-byte header, 4 ops
    shifted = index(labels(2000) + ["inserted"] + labels(5000)[2000:4000] + labels(5000)[4001:])
    assert len(round_trip(base, shifted)) < 150


def test_the_same_indexes_give_the_same_bytes():
    base, new = index(BASE), index(CASES["blocks inserted and removed"][1])
    data = indexdiff.diff(base, new)
    assert data == indexdiff.diff(base, new) and data[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_a_diff_of_another_base_is_refused():
    base, new = index(BASE), index(BASE[:30])
    data = indexdiff.diff(base, new)
    for other in (index(BASE[:39]), index(BASE, window=0), index(BASE, window=4096), index(BASE, tail=5)):
        with pytest.raises(UpdaterError) as e:
            indexdiff.apply(other, data, where="diff rootfs.ext4.index.from-ab")
        assert str(e.value) == "diff rootfs.ext4.index.from-ab: made against another index than the card's"


def test_the_master_diffs_only_like_indexes():
    small = delta.BlockIndex(2048, array("H", [0, 0]), [delta.block_hash(bytes(1024))] * 2, 1024)
    with pytest.raises(ValueError):
        indexdiff.diff(small, index(BASE))
    assert indexdiff.diff_name("rootfs.ext4.index", "0f" * 32) == "rootfs.ext4.index.from-" + "0f" * 32


# --- bad diffs, made by hand -------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def zigzag(n: int) -> int:
    return n << 1 if n >= 0 else (-n << 1) - 1


BASE_INDEX = index(BASE[:8])
BASE_SHA = hashlib.sha256(BASE_INDEX.body()).digest()


def head(**kw) -> bytes:
    fields = dict(magic=b"RBIDXDF1", base=BASE_SHA, block_size=BS, hash_len=8, size=4 * BS, blocks=4, window=0) | kw
    return indexdiff.HEADER.pack(*fields.values())


def copy(n: int, offset: int) -> bytes:
    return varint(n << 2 | indexdiff.COPY) + varint(zigzag(offset))


def new_entries(*lengths: int) -> bytes:
    return varint(len(lengths) << 2 | indexdiff.NEW) + b"".join(struct.pack("<H", n) + b"h" * 8 for n in lengths)


ZEROS = varint(4 << 2 | indexdiff.ZERO)


@pytest.mark.parametrize(
    "raw,problem",
    [
        (b"short", "5 bytes is shorter than its header"),
        (head(magic=b"RBIDXDF9") + ZEROS, "magic b'RBIDXDF9' is not b'RBIDXDF1'"),
        (head(block_size=2048, size=4 * 2048) + ZEROS, "block size 2048 or hash length 8 is not the base's"),
        (head(hash_len=16) + ZEROS, "block size 4096 or hash length 16 is not the base's"),
        (head(blocks=5) + ZEROS, "5 blocks of 4096 cannot hold 16384 bytes"),
        (head(size=0, blocks=0), "0 blocks of 4096 cannot hold 0 bytes"),
        (head(window=delta.WINDOW + 1) + ZEROS, "window 32769 is not in 0..32768"),
        (head(window=1 << 31) + ZEROS, "window 2147483648 is not in 0..32768"),
        (head(), "ops give 0 blocks, the header says 4"),
        (head() + copy(3, 0), "ops give 3 blocks, the header says 4"),
        (head() + varint(5 << 2 | indexdiff.ZERO), "an op of 5 blocks at byte 69 does not fit 4 blocks"),
        (head() + varint(0 << 2 | indexdiff.ZERO) + ZEROS, "an op of 0 blocks at byte 69 does not fit 4 blocks"),
        (head() + copy(2, 0) + copy(2, 5), "copies base blocks 7..8 of 8"),  # past the base's end
        (head() + copy(4, -1), "copies base blocks -1..2 of 8"),  # before its start
        (head() + copy(2, 4) + copy(2, -7), "copies base blocks -1..0 of 8"),  # relative to where the last ended
        (head() + copy(4, 1 << 40), f"copies base blocks {1 << 40}..{(1 << 40) + 3} of 8"),
        (head() + new_entries(10, 0, 10, 10), "a new entry's length 0 is not in 1..4096"),
        (head() + new_entries(10, BS + 1, 10, 10), "a new entry's length 4097 is not in 1..4096"),
        (head() + new_entries(10, 10, 10, 10)[:-1], "ends inside 4 new entries"),
        (head() + varint(4 << 2 | 3), "unknown op 3 at byte 69"),
        (head() + b"\x80\x80", "a number runs past byte 70"),
        (head() + varint(4 << 2 | indexdiff.COPY), "a number runs past byte 69"),  # its offset is missing
        (head() + b"\xff" * 12, "a number runs past byte 78"),  # 70 bits: no number is that long
    ],
)
def test_bad_diffs_are_refused_in_one_line(raw, problem):
    with pytest.raises(UpdaterError) as e:
        indexdiff.apply(BASE_INDEX, gzip.compress(raw), where="block index of example v3: diff x")
    assert str(e.value) == f"block index of example v3: diff x: {problem}"


def test_a_diff_for_another_image_size_is_refused_before_anything_is_built():
    """A diff is not signed: a few bytes claiming a 128 GiB image (32 Mi zero blocks) would
    have the worker build tables of that many entries (~0.6 GiB); the manifest's size stops it."""
    blocks = delta.MAX_INDEX // 2
    bomb = gzip.compress(head(size=blocks * BS, blocks=blocks) + varint(blocks << 2 | indexdiff.ZERO))
    assert len(bomb) < 100
    with pytest.raises(UpdaterError) as e:
        indexdiff.apply(BASE_INDEX, bomb, expected=4 * BS, where="diff x")
    assert str(e.value) == f"diff x: describes an image of {blocks * BS} bytes, the manifest's has {4 * BS}"
    good = indexdiff.diff(BASE_INDEX, index(BASE[:4]))
    assert indexdiff.apply(BASE_INDEX, good, expected=4 * BS) == index(BASE[:4])


def test_a_hand_made_diff_of_every_op_applies():
    raw = (
        head(size=4 * BS - 100, window=delta.WINDOW)
        + copy(1, 6)
        + ZEROS[:0]
        + new_entries(77)
        + varint(1 << 2)
        + copy(1, -1)
    )
    got = indexdiff.apply(BASE_INDEX, gzip.compress(raw))
    assert list(got.lengths) == [BASE_INDEX.lengths[6], 77, 0, BASE_INDEX.lengths[6]]
    assert got.hashes[:2] == [BASE_INDEX.hashes[6], b"h" * 8] and got.hashes[2] == ZERO_HASH
    assert (got.size, got.window) == (4 * BS - 100, delta.WINDOW) and delta.parse_body(got.body()) == got


def test_not_gzip_trailing_bytes_and_a_bomb_are_refused():
    good = indexdiff.diff(BASE_INDEX, index(BASE[:4]))
    with pytest.raises(UpdaterError, match="^block index diff: not valid gzip"):
        indexdiff.apply(BASE_INDEX, b"not gzip")
    with pytest.raises(UpdaterError, match="^block index diff: not one gzip member"):
        indexdiff.apply(BASE_INDEX, good + good)
    with pytest.raises(UpdaterError, match=f"not one gzip member of at most {delta.MAX_INDEX} bytes"):
        indexdiff.apply(BASE_INDEX, gzip.compress(bytes(delta.MAX_INDEX + 1)))


# --- fuzzing: only UpdaterError, and what comes out has the header's blocks ----------------------

FUZZ_BASE = index(BASE, tail=300)
FUZZ_DIFF = gzip.decompress(indexdiff.diff(FUZZ_BASE, index(CASES["blocks inserted and removed"][1] + ["0"] * 3)))


def check(raw: bytes) -> None:
    try:
        got = indexdiff.apply(FUZZ_BASE, gzip.compress(raw, mtime=0))
    except UpdaterError:
        return
    _, _, block_size, hash_len, size, blocks, _ = indexdiff.HEADER.unpack_from(raw)
    assert (got.blocks, got.size, got.block_size, got.hash_len) == (blocks, size, block_size, hash_len)
    assert len(got.hashes) == blocks and got.pack_size == sum(got.lengths)
    assert delta.parse_body(got.body()) == got  # what a diff rebuilds, the index reader takes


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 80),
    st.binary(max_size=8),
)
def test_fuzz_mutated_diffs(flips, cut, inserted):
    raw = bytearray(FUZZ_DIFF)
    for at, value in flips:
        raw[at % len(raw)] = value
    at = flips[0][0] % len(raw) if flips else len(raw)
    raw[at:at] = inserted
    check(bytes(raw[: len(raw) - cut]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_ops_after_a_valid_header(ops):
    raw = FUZZ_DIFF[: indexdiff.HEADER.size] + ops
    check(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    for body in (data, gzip.compress(data, mtime=0), gzip.compress(b"RBIDXDF1" + data, mtime=0)):
        try:
            indexdiff.apply(FUZZ_BASE, body)
        except UpdaterError:
            pass


EDIT = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 60), st.integers(1, 5)),
    st.tuples(st.just("delete"), st.integers(0, 60), st.integers(1, 8)),
    st.tuples(st.just("zero"), st.integers(0, 60), st.integers(1, 8)),
    st.tuples(st.just("move"), st.integers(0, 60), st.integers(1, 12)),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 60), st.lists(EDIT, max_size=6), st.integers(0, BS - 1), st.integers(0, BS - 1))
def test_fuzz_edits_round_trip(n, edits, base_tail, new_tail):
    """Any mix of inserted, deleted, zeroed and moved runs: apply(base, diff(base, new)) is new."""
    old = labels(n)
    new = list(old)
    for k, (kind, at, length) in enumerate(edits):
        at %= len(new) + 1
        if kind == "insert":
            new[at:at] = [f"new{k}.{j}" for j in range(length)]
        elif kind == "delete" and len(new) > length:
            del new[at : at + length]
        elif kind == "zero":
            new[at : at + length] = ["0"] * length
        elif kind == "move":
            run = new[at : at + length]
            del new[at : at + length]
            new.extend(run)
    round_trip(index(old, tail=base_tail), index(new, tail=new_tail))
