"""The delta's planner (where each block comes from), range merging, and the build on
file-backed slots: only what the card lacks is fetched, right blocks are not rewritten,
and nothing from the card or the master is written unchecked. With a rev2 index each
fetched block needs the window of the new image before it: read back from the target
(or kept from the fetched blocks just before), so it must be right wherever the fetched
blocks fall."""

from __future__ import annotations

import io
import random

import pytest
from rackboot.initramfs.updater import delta
from rackboot.initramfs.updater.delta import FETCH, KEEP, OTHER, TARGET, ZERO, Step
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError

BS = delta.BLOCK_SIZE


def blocks(*labels: str) -> bytes:
    """An image of one block per label: "0" a zero block, any other label its own random bytes."""
    return b"".join(bytes(BS) if x == "0" else random.Random(x).randbytes(BS) for x in labels)


def chained(*labels: str, tail: int = 0) -> bytes:
    """One block per label: "0" a zero block, any other half the non-zero block before it and
    half its own letters (16 of them): its deflate with the window refers into the block
    before, so it unpacks only with the right window. Then a tail of ``tail`` bytes, made so."""
    out, previous = bytearray(), b""
    for n, label in enumerate((*labels, "tail")):
        if label == "0":
            out += bytes(BS)
            continue
        block = (previous[: BS // 2] + bytes(random.Random(label).choices(b"abcdefghijklmnop", k=BS)))[:BS]
        out += block[:tail] if n == len(labels) else block
        previous = block[BS // 2 :] + block[: BS // 2]
    return bytes(out)


def index_of(data: bytes, window: int = delta.WINDOW) -> tuple[delta.BlockIndex, bytes]:
    pack = io.BytesIO()
    return delta.build_index(io.BytesIO(data), len(data), pack, window=window), pack.getvalue()


def hashes(data: bytes) -> list[bytes]:
    return index_of(data)[0].hashes


def sources(steps: list[Step]) -> list[tuple[str, int]]:
    return [(s.source, s.at) for s in steps]


def test_each_block_from_the_cheapest_place():
    new, _ = index_of(blocks("a", "0", "b", "c", "d", "e"))
    target = hashes(blocks("a", "x", "x", "x", "x", "d"))
    other = hashes(blocks("x", "b", "x"))
    assert sources(delta.plan(new, target, other)) == [
        (KEEP, -1),  # already in place: not written
        (ZERO, -1),
        (OTHER, 1),  # moved: found by hash in the other slot
        (FETCH, -1),
        (TARGET, 5),  # further on in the target, read before the build reaches it
        (FETCH, -1),
    ]


def test_a_target_block_already_behind_the_build_is_not_a_source():
    new, _ = index_of(blocks("q", "a", "r"))
    target = hashes(blocks("a", "x", "x"))  # "a" sits at block 0, which the build overwrites first
    assert sources(delta.plan(new, target, None))[1] == (FETCH, -1)
    target = hashes(blocks("a", "x", "x", "a"))  # a second copy further on will do
    assert sources(delta.plan(new, target, None))[1] == (TARGET, 3)


def test_an_unknown_card_fetches_everything_but_zeros():
    new, _ = index_of(blocks("a", "0", "b"))
    assert [s.source for s in delta.plan(new, None, None)] == [FETCH, ZERO, FETCH]
    zero_target = hashes(blocks("x", "0", "x"))
    assert [s.source for s in delta.plan(new, zero_target, None)] == [FETCH, KEEP, FETCH]


def test_fetch_share_counts_pack_bytes():
    new, pack = index_of(blocks("a", "b", "0"))
    steps = delta.plan(new, None, None)
    assert delta.fetch_share(new, steps) == len(pack) == 2 * BS  # random blocks are stored as is


def test_runs_merge_adjacent_blocks_and_small_gaps_and_skip_zeros():
    new, _ = index_of(blocks("a", "0", "b", "c", "d", "e", "f"))
    runs = delta.merge_runs(new, [0, 1, 2, 3, 6], gap=0)
    assert [(r.first, r.last) for r in runs] == [(0, 3), (6, 6)]  # the zero block has no pack bytes
    assert runs[0].start == 0 and runs[0].end == 3 * BS and runs[1].start == 5 * BS
    assert [(r.first, r.last) for r in delta.merge_runs(new, [0, 6], gap=4 * BS)] == [(0, 6)]
    assert delta.merge_runs(new, [1]) == []


class Card:
    """Two file-backed slots on one real Disk that counts the bytes written to it."""

    def __init__(self, tmp_path, target: bytes, other: bytes, size: int):
        path = tmp_path / "card.img"
        path.write_bytes(bytes(2 * size))
        self.disk = Disk(str(path))
        self.size = size
        self.disk.write(0, target)
        self.disk.write(size, other)
        self.writes: list[tuple[int, int]] = []
        write = self.disk.write
        self.disk.write = lambda at, data: (self.writes.append((at, len(data))), write(at, data))[1]

    def slots(self) -> tuple[delta.Slot, delta.Slot]:
        return delta.Slot(self.disk, 0, self.size), delta.Slot(self.disk, self.size, self.size)

    def target(self, n: int) -> bytes:
        return self.disk.read(0, n)


def build(
    card: Card,
    new_data: bytes,
    target_hashes,
    other_hashes,
    pack_override: bytes | None = None,
    *,
    window: int = delta.WINDOW,
    gap: int = 0,
):
    new, pack = index_of(new_data, window)
    pack = pack if pack_override is None else pack_override
    asked: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> bytes:
        asked.append((start, end))
        return pack[start:end]

    target, other = card.slots()
    steps = delta.plan(new, target_hashes, other_hashes)
    tally = delta.build(new, steps, target, other, fetch, gap=gap)
    return tally, asked


def test_build_takes_the_card_first_and_fetches_one_merged_range(tmp_path):
    old = blocks("a", "b", "c", "d", "0", "e")
    new = blocks("a", "n", "m", "b", "c", "0")  # two new blocks inserted: the rest shifted
    card = Card(tmp_path, target=blocks("0", "0", "0", "0", "0", "0"), other=old, size=8 * BS)
    tally, asked = build(card, new, hashes(card.target(len(new))), hashes(old))
    assert card.target(len(new)) == new
    assert len(asked) == 1 and asked[0][1] - asked[0][0] == 2 * BS  # "n" and "m", in one request
    assert (tally.copied, tally.fetched, tally.kept, tally.requests) == (3 * BS, 2 * BS, BS, 1)
    assert tally.written == 5 * BS and sum(n for _, n in card.writes) == 5 * BS  # the zero block stayed


def test_blocks_already_right_are_not_rewritten(tmp_path):
    new = blocks("a", "b", "c")
    card = Card(tmp_path, target=new, other=blocks("x"), size=4 * BS)
    tally, asked = build(card, new, hashes(new), None)
    assert (tally.kept, tally.written, asked, card.writes) == (3 * BS, 0, [], [])


def test_a_card_block_that_lies_is_fetched_instead(tmp_path):
    new = blocks("a", "b")
    card = Card(tmp_path, target=blocks("x", "y"), other=blocks("x", "y"), size=4 * BS)
    # the hashes claim the card holds "a" and "b" (a rw-mounted slot changed since, say)
    tally, asked = build(card, new, hashes(new), hashes(new))
    assert len(asked) == 1
    assert card.target(len(new)) == new and tally.fetched == 2 * BS and tally.kept == 0


def test_a_bad_fetched_block_stops_the_build(tmp_path):
    new = blocks("a", "b")
    card = Card(tmp_path, target=bytes(2 * BS), other=bytes(2 * BS), size=4 * BS)
    _, pack = index_of(new)
    bad = bytearray(pack)
    bad[BS + 7] ^= 1
    with pytest.raises(UpdaterError, match="^block 1: its bytes do not match the index's hash$"):
        build(card, new, None, None, pack_override=bytes(bad))


def test_a_short_answer_stops_the_build(tmp_path):
    new = blocks("a", "b")
    card = Card(tmp_path, target=bytes(2 * BS), other=bytes(2 * BS), size=4 * BS)
    with pytest.raises(UpdaterError, match=r"^pack bytes 0-8191: got 4096 bytes$"):
        build(card, new, None, None, pack_override=index_of(new)[1][:BS])


def test_zero_blocks_are_written_only_where_the_card_is_not_zero(tmp_path):
    new = blocks("0", "0", "a")
    card = Card(tmp_path, target=blocks("x", "0", "0"), other=blocks("a"), size=4 * BS)
    tally, asked = build(card, new, None, hashes(blocks("a")))  # an empty target: nothing known of it
    assert card.target(len(new)) == new and asked == []
    assert card.writes == [(0, BS), (2 * BS, BS)] and (tally.zero, tally.kept, tally.copied) == (BS, BS, BS)


def test_runs_stop_at_the_most_one_request_carries():
    new, _ = index_of(blocks(*"abcdefg"))
    runs = delta.merge_runs(new, range(7), gap=0, most=3 * BS)
    assert [(r.first, r.last) for r in runs] == [(0, 2), (3, 5), (6, 6)]
    assert all(r.end - r.start <= 3 * BS for r in runs)


# --- the window: a fetched block's dictionary is the new image before it -----------------------

LABELS = [str(n) for n in range(20)]  # 20 chained blocks, 80 KiB: the window is the last 8 of them
LABELS[4] = LABELS[5] = "0"


def junk(data: bytes, blocks) -> bytes:
    """``data`` with ``blocks`` replaced by bytes no index holds (the last may be short)."""
    out = bytearray(data)
    for i in blocks:
        end = min(len(data), (i + 1) * BS)
        out[i * BS : end] = random.Random(f"junk {i}").randbytes(end - i * BS)
    return bytes(out)


@pytest.mark.parametrize(
    "fetched,gap",
    [
        ([7, 8, 9], 0),  # adjacent: one run, each block's window the ones just unpacked
        ([2, 9, 15], 0),  # apart: each window read back from the target
        ([2, 9, 15], delta.MERGE_GAP * 8),  # apart but in one merged run: blocks between are skipped
        ([0, 1], 0),  # block 0 has nothing before it
        ([6], 0),  # after zero blocks, which the build writes over the target's junk first
        ([4, 5, 6, 7], 0),  # the zero blocks are not fetched, the blocks after them are
        ([19, 20], 0),  # the short tail
        ([0, 3, 6, 10, 11, 12, 13, 20], 0),
    ],
)
def test_fetched_blocks_unpack_with_the_window_the_target_holds(tmp_path, fetched, gap):
    new = chained(*LABELS, tail=700)
    card = Card(tmp_path, target=junk(new, fetched), other=blocks("x"), size=24 * BS)
    tally, asked = build(card, new, hashes(card.target(len(new))), None, gap=gap)
    assert card.target(len(new)) == new
    index = index_of(new)[0]
    pack_blocks = [i for i in fetched if index.lengths[i]]
    assert tally.fetched == sum(index.block_len(i) for i in pack_blocks) and tally.requests == len(asked)
    assert tally.zero == BS * len([i for i in fetched if not index.lengths[i]])


@pytest.mark.parametrize("window", [0, 4096, delta.WINDOW])
def test_a_card_block_that_fails_its_hash_is_fetched_with_its_window(tmp_path, window):
    """The slots' hashes say they hold these blocks (a kept index that is stale, say), the
    card holds other bytes: those blocks are fetched after the rest is in place, each with
    the window read back from the target, which by then holds the blocks copied from the
    other slot just before it."""
    new = chained(*LABELS, tail=700)
    target = junk(new, [3, 11, 12, 13])
    other = junk(new[: 14 * BS], [13])
    card = Card(tmp_path, target=target, other=other, size=24 * BS)
    claimed = hashes(new)[:10] + hashes(target)[10:]  # block 3 claimed, 11..13 known to be junk
    steps = delta.plan(index_of(new, window)[0], claimed, hashes(new[: 14 * BS]))
    assert [steps[i].source for i in (3, 11, 12, 13)] == [delta.KEEP, delta.OTHER, delta.OTHER, delta.OTHER]
    tally, asked = build(card, new, claimed, hashes(new[: 14 * BS]), window=window)
    assert card.target(len(new)) == new
    assert tally.fetched == 2 * BS and len(asked) == 2 and tally.copied == 2 * BS  # 3 and 13 lied, 11 and 12 did not


def test_a_window_of_the_wrong_bytes_stops_the_build(tmp_path):
    """The build cannot check a dictionary, only what comes out of it: when the target holds
    wrong bytes before a fetched block (here a plan that zeroes block 1, which is not zero),
    the fetched block fails its hash and nothing is committed."""
    new = chained("a", "b", "c")
    card = Card(tmp_path, target=junk(new, [1, 2]), other=blocks("x"), size=4 * BS)
    index, pack = index_of(new)
    target, other = card.slots()
    steps = [Step(0, KEEP), Step(1, ZERO), Step(2, FETCH)]
    with pytest.raises(UpdaterError, match="^block 2: "):
        delta.build(index, steps, target, other, lambda start, end: pack[start:end])
    right = [Step(0, KEEP), Step(1, FETCH), Step(2, FETCH)]
    delta.build(index, right, target, other, lambda start, end: pack[start:end])
    assert card.target(len(new)) == new
