"""The index kept behind the image in a slot (slotindex.py), on file-backed slots: it loads
back as stored; anything else (never written, another image's, a torn trailer, a damaged
body, a length that does not fit) is refused with its reason; a body that would overlap the
image is not written; and a store cut before its trailer never gives the new image an index."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from array import array

import pytest
from rackboot.initramfs.updater import delta, slotindex
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError

BS = delta.BLOCK_SIZE
MIB = 1 << 20
SLOT_AT, CAPACITY = MIB, MIB  # slot b of a 3 MiB card: 1 MiB before it, 1 MiB after


class Cut(Exception):
    """The power goes at a sync."""


def image(seed: int, blocks: int) -> bytes:
    rng = random.Random(seed)
    parts = [bytes(BS), (b"rackboot %d\n" % seed * 400)[:BS], rng.randbytes(BS)]
    return b"".join(parts[i % 3] for i in range(blocks)) + rng.randbytes(300)


def index_of(data: bytes, window: int = delta.WINDOW) -> delta.BlockIndex:
    return delta.build_index(io.BytesIO(data), len(data), io.BytesIO(), window=window)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Card:
    """A 3 MiB file with a slot at 1 MiB; its bytes around the slot are marked to see them kept."""

    def __init__(self, tmp_path, capacity: int = CAPACITY):
        self.path = tmp_path / "card.img"
        self.path.write_bytes(b"\xa5" * SLOT_AT + bytes(capacity) + b"\x5a" * MIB)
        self.disk = Disk(str(self.path))
        self.slot = delta.Slot(self.disk, SLOT_AT, capacity)
        self.syncs: list[bytes] = []  # the slot's last sector at each sync

    def install(self, data: bytes) -> str:
        self.slot.write(0, data)
        return sha(data)

    def sync(self) -> None:
        self.syncs.append(self.slot.read(self.slot.capacity - slotindex.SECTOR, slotindex.SECTOR))

    def cut_at_first_sync(self) -> None:
        raise Cut()

    def store(self, data: bytes, index: delta.BlockIndex) -> str | None:
        return slotindex.store(self.slot, len(data), sha(data), index, self.sync)

    def load(self, image_sha: str) -> delta.BlockIndex:
        return slotindex.load(self.slot, image_sha, where="slot b")

    def outside(self) -> bytes:
        data = self.path.read_bytes()
        return data[:SLOT_AT] + data[SLOT_AT + self.slot.capacity :]

    def trailer(self) -> bytes:
        return self.slot.read(self.slot.capacity - slotindex.SECTOR, slotindex.SECTOR)

    def write_trailer(self, length: int, image_sha: str, body_sha: bytes) -> None:
        head = slotindex.TRAILER.pack(slotindex.MAGIC, length, bytes.fromhex(image_sha), body_sha)
        self.slot.write(self.slot.capacity - slotindex.SECTOR, head + struct.pack("<I", zlib.crc32(head)))


@pytest.mark.parametrize("window", [0, delta.WINDOW])
def test_store_then_load(tmp_path, window):
    card = Card(tmp_path)
    data = image(1, 60)
    index = index_of(data, window)
    image_sha = card.install(data)
    assert card.store(data, index) is None
    assert card.load(image_sha) == index and card.load(image_sha).body() == index.body()
    assert card.outside() == b"\xa5" * SLOT_AT + b"\x5a" * MIB  # nothing written outside the slot
    assert card.slot.read(0, len(data)) == data  # nor into the image
    # the body is synced before the trailer is written, the trailer after
    assert card.syncs[0] == bytes(slotindex.SECTOR) and card.syncs[1] == card.trailer() and len(card.syncs) == 2


def test_the_body_lies_behind_the_image_on_a_4k_boundary_before_the_trailer(tmp_path):
    card = Card(tmp_path)
    data = image(2, 40)
    index = index_of(data)
    card.install(data)
    card.store(data, index)
    body = index.body()
    start = slotindex.body_start(CAPACITY, len(body))
    assert start % 4096 == 0 and start >= len(data) and start + len(body) <= CAPACITY - slotindex.SECTOR
    assert card.slot.read(start, len(body)) == body
    assert slotindex.body_start(MIB, 100) == slotindex.body_start(MIB, 3584) == MIB - 4096
    assert slotindex.body_start(MIB, 3585) == MIB - 8192


def test_a_slot_not_a_multiple_of_4k(tmp_path):
    card = Card(tmp_path, capacity=64 * 1024 + 1536)
    data = image(3, 10)
    index = index_of(data)
    image_sha = card.install(data)
    assert card.store(data, index) is None and card.load(image_sha) == index


def test_a_large_index_spans_many_blocks(tmp_path):
    card = Card(tmp_path, capacity=4 * MIB)
    blocks = 700
    index = delta.BlockIndex(
        blocks * BS,
        array("H", [BS] * blocks),
        [delta.block_hash(b"%d" % i) for i in range(blocks)],
    )
    assert len(index.body()) > 4096
    assert slotindex.store(card.slot, blocks * BS, "ab" * 32, index, card.sync) is None
    assert slotindex.load(card.slot, "ab" * 32, where="slot b") == index


# --- what load refuses ---------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path):
    card = Card(tmp_path)
    data = image(4, 30)
    index = index_of(data)
    card.install(data)
    assert card.store(data, index) is None
    return card, data, index


def refused(card: Card, image_sha: str) -> str:
    with pytest.raises(UpdaterError) as e:
        card.load(image_sha)
    return str(e.value)


def test_never_written(tmp_path):
    card = Card(tmp_path)
    assert refused(card, sha(image(4, 30))) == "slot b: no kept index"
    card.slot.write(CAPACITY - 512, b"RBSLTIX2" + bytes(100))  # another layout: not read as this one
    assert refused(card, sha(image(4, 30))) == "slot b: no kept index"


def test_another_images(stored):
    card, data, _ = stored
    assert refused(card, sha(data + b"x")) == "slot b: the kept index is of another image"


@pytest.mark.parametrize("at", [8, 15, 16, 47, 48, 79, 80, 83])
def test_a_torn_trailer(stored, at):
    card, data, _ = stored
    trailer = bytearray(card.trailer())
    trailer[at] ^= 0x10
    card.slot.write(CAPACITY - 512, bytes(trailer))
    assert refused(card, sha(data)) == "slot b: the kept index's trailer is damaged"


def test_a_damaged_body(stored):
    card, data, index = stored
    start = slotindex.body_start(CAPACITY, len(index.body()))
    card.slot.write(start + 40, b"\xff")
    assert refused(card, sha(data)) == "slot b: the kept index does not match its trailer's sha256"


@pytest.mark.parametrize(
    "length",
    [0, CAPACITY - 512 + 1, CAPACITY, delta.MAX_INDEX + 1, 1 << 63],
)
def test_a_length_that_does_not_fit(stored, length):
    card, data, index = stored
    card.write_trailer(length, sha(data), hashlib.sha256(index.body()).digest())
    assert refused(card, sha(data)) == f"slot b: the kept index's length {length} does not fit the slot"


def test_a_body_that_hashes_right_but_is_no_index(stored):
    card, data, _ = stored
    body = b"RBINDEX1" + bytes(100)
    card.slot.write(slotindex.body_start(CAPACITY, len(body)), body)
    card.write_trailer(len(body), sha(data), hashlib.sha256(body).digest())
    assert refused(card, sha(data)).startswith("slot b: block size 0 is not a power of two")


def test_a_slot_too_small_for_one(tmp_path):
    card = Card(tmp_path, capacity=4096 + 511)
    assert refused(card, "ab" * 32) == "slot b: no room for a kept index"


# --- what store refuses, and cuts ------------------------------------------------------------------


def test_store_refuses_a_body_over_the_image_and_writes_nothing(tmp_path):
    card = Card(tmp_path)
    index = index_of(image(5, 30))
    start = slotindex.body_start(CAPACITY, len(index.body()))
    before = card.path.read_bytes()
    why = slotindex.store(card.slot, start + 1, "ab" * 32, index, card.sync)
    assert why == f"{len(index.body())} bytes of index do not fit between the image and the slot's end"
    assert card.path.read_bytes() == before and card.syncs == []
    assert slotindex.store(card.slot, start, "ab" * 32, index, card.sync) is None  # the image ends where it starts
    assert slotindex.load(card.slot, "ab" * 32, where="slot b") == index


def test_a_store_cut_before_its_trailer_never_gives_the_new_image_an_index(stored):
    """The slot held v1 with its index; v2 is installed and its index stored, and the power
    goes after the body, before the trailer: the trailer still names v1."""
    card, v1, v1_index = stored
    v2 = image(6, 30)
    v2_index = index_of(v2)
    assert len(v2_index.body()) == len(v1_index.body())  # the same place: v2's body is over v1's
    card.install(v2)
    with pytest.raises(Cut):
        slotindex.store(card.slot, len(v2), sha(v2), v2_index, card.cut_at_first_sync)
    assert refused(card, sha(v2)) == "slot b: the kept index is of another image"
    assert refused(card, sha(v1)) == "slot b: the kept index does not match its trailer's sha256"


def test_an_image_grown_over_the_old_body_leaves_no_index(tmp_path):
    """v2 reaches over where v1's index lay, and leaves no room for its own: v1's trailer
    stays, and gives neither image an index."""
    card = Card(tmp_path, capacity=256 * 1024)
    v1 = image(7, 10)
    card.install(v1)
    assert card.store(v1, index_of(v1)) is None
    v2 = image(8, 63)
    assert slotindex.body_start(card.slot.capacity, len(index_of(v1).body())) < len(v2) < card.slot.capacity - 512
    card.install(v2)
    assert refused(card, sha(v1)) == "slot b: the kept index does not match its trailer's sha256"
    assert refused(card, sha(v2)) == "slot b: the kept index is of another image"
    card.syncs.clear()
    assert card.store(v2, index_of(v2)) is not None and card.syncs == []
    assert refused(card, sha(v2)) == "slot b: the kept index is of another image"


def test_a_trailer_half_written_is_refused_for_both_images(stored):
    card, v1, _ = stored
    old = card.trailer()
    v2 = image(9, 30)
    card.install(v2)
    assert card.store(v2, index_of(v2)) is None
    new = card.trailer()
    for torn in (new[:40] + old[40:], old[:40] + new[40:], new[:82] + old[82:]):
        card.slot.write(CAPACITY - 512, torn)
        for image_sha in (sha(v1), sha(v2)):
            assert refused(card, image_sha) == "slot b: the kept index's trailer is damaged"


def test_a_store_cut_with_a_longer_body_leaves_the_old_index_whole(tmp_path):
    """v2's body is longer than v1's and starts a block earlier, ending before v1's: after a
    cut the trailer still names v1, whose body is whole. load gives v1's own index for v1
    (what the slot state says the slot holds until v2 is committed), never one for v2."""
    card = Card(tmp_path, capacity=4 * MIB)
    v1 = image(10, 30)
    v1_index = index_of(v1)
    card.install(v1)
    assert card.store(v1, v1_index) is None
    v2 = image(11, 510)
    v2_index = index_of(v2)
    capacity = card.slot.capacity
    v1_start = slotindex.body_start(capacity, len(v1_index.body()))
    assert slotindex.body_start(capacity, len(v2_index.body())) + len(v2_index.body()) <= v1_start
    card.install(v2)
    with pytest.raises(Cut):
        slotindex.store(card.slot, len(v2), sha(v2), v2_index, card.cut_at_first_sync)
    assert refused(card, sha(v2)) == "slot b: the kept index is of another image"
    assert card.load(sha(v1)) == v1_index
