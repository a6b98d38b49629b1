"""Make the block delta's golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_delta.py
index rev1 (the block index of a small image: zero, text and random blocks and a short tail)
with its pack, manifest rev5 (delta: the index and pack it pins) and its .sig with the
committed test key, report rev8 (card_bytes, delta): 9ee3183. Then b92f4a2: index rev2 and
its pack (the next version's image, each block deflated with the 32 KiB before it), manifest
rev6 (block_delta) and its .sig, the rev2 index as a diff against the rev1 one (what a card
that holds v2 fetches for v3), and the last 4 KiB of a slot holding v3 with its index kept
behind the image. tests/unit/test_golden_delta.py checks today's code against them.
"""

from __future__ import annotations

import hashlib
import io
import random
import zlib
from pathlib import Path

from rackboot.initramfs.updater import delta, formats, indexdiff, slotindex
from rackboot.master import signing

HERE = Path(__file__).resolve().parent
KEY = HERE / "keys" / "test-master.key"
BS = delta.BLOCK_SIZE


def image_rev1() -> bytes:
    """Eight blocks (zero, text, random in turn) and a 1000-byte random tail."""
    rng = random.Random(11)
    blocks = [[bytes(BS), (b"rackboot golden %d\n" % i * 300)[:BS], rng.randbytes(BS)][i % 3] for i in range(8)]
    return b"".join(blocks) + rng.randbytes(1000)


def index_rev1() -> tuple[bytes, bytes]:
    """Index rev1 and its pack: today's writer without a window."""
    data = image_rev1()
    pack = io.BytesIO()
    index = delta.build_index(io.BytesIO(data), len(data), pack, window=0)
    return index.dump(), pack.getvalue()


def text(label: str) -> bytes:
    return (b"rackboot golden %s\n" % label.encode() * 300)[:BS]


def image_v3() -> bytes:
    """v3's image, made of v2's (image_rev1) pieces so that its index diffs against v2's: 14
    blocks and v2's 1000-byte tail. Random blocks come again: 2 and 3 blocks on (blocks 7 and
    10), inside the 32 KiB window, they are a few bytes of the pack; 9 blocks on (block 11),
    just outside it, stored as is."""
    v2 = image_rev1()
    r2, r5, tail = v2[2 * BS : 3 * BS], v2[5 * BS : 6 * BS], v2[8 * BS :]
    r_new = random.Random(13).randbytes(BS)
    zero = bytes(BS)
    blocks = [
        text("v3 0"),
        zero,
        r2,
        text("1"),
        r5,
        zero,
        zero,
        r5,
        r_new,
        text("v3 9"),
        r_new,
        r2,
        zero,
        text("v3 13"),
    ]
    return b"".join(blocks) + tail


def index_rev2() -> tuple[bytes, bytes]:
    """Index rev2 (window 32 KiB) of v3's image and its pack."""
    data = image_v3()
    pack = io.BytesIO()
    index = delta.build_index(io.BytesIO(data), len(data), pack)
    return index.dump(), pack.getvalue()


def indexdiff_rev1() -> bytes:
    """v3's index (rev2) as a diff against v2's (rev1): a card that holds v2 fetches this."""
    base = delta.parse_index(index_rev1()[0])
    return indexdiff.diff(base, delta.parse_index(index_rev2()[0]))


SLOT_CAPACITY = 128 << 10  # the sample slot (a real one is MiB-aligned, so its last 4 KiB are the same bytes)
SLOT_TAIL = 4096


class _Memory:
    """A slot's bytes in memory, for slotindex.store."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def read(self, at: int, length: int) -> bytes:
        return bytes(self.data[at : at + length])

    def write(self, at: int, data: bytes) -> None:
        self.data[at : at + len(data)] = data


def slotindex_rev1() -> bytes:
    """The last 4 KiB of a slot that holds v3's image with its index (rev2) kept behind it."""
    data = image_v3()
    memory = _Memory(SLOT_CAPACITY)
    memory.write(0, data)
    index = delta.parse_index(index_rev2()[0])
    why = slotindex.store(
        delta.Slot(memory, 0, SLOT_CAPACITY), len(data), hashlib.sha256(data).hexdigest(), index, lambda: None
    )
    assert why is None, why
    return memory.read(SLOT_CAPACITY - SLOT_TAIL, SLOT_TAIL)


def manifest_rev5(index: bytes, pack: bytes) -> formats.Manifest:
    data = image_rev1()
    stream = b"stand-in for the gzip stream"
    return formats.Manifest(
        image="example",
        version=2,
        label="v2",
        created=1_700_000_000,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        crc32=f"{zlib.crc32(data):08x}",
        stream="rootfs.ext4.gz",
        stream_size=len(stream),
        stream_sha256=hashlib.sha256(stream).hexdigest(),
        delta=formats.BlockDelta(
            index="rootfs.ext4.index",
            index_size=len(index),
            index_sha256=hashlib.sha256(index).hexdigest(),
            pack="rootfs.ext4.pack",
            pack_size=len(pack),
            block_size=BS,
        ),
    )


def manifest_rev6(index: bytes, pack: bytes) -> formats.Manifest:
    """v3 with ``block_delta``: the rev2 index and pack, the window, the inflated index's sha256."""
    data = image_v3()
    stream = b"stand-in for the gzip stream of v3"
    parsed = delta.parse_index(index)
    return formats.Manifest(
        image="example",
        version=3,
        label="v3",
        created=1_700_000_500,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        crc32=f"{zlib.crc32(data):08x}",
        stream="rootfs.ext4.gz",
        stream_size=len(stream),
        stream_sha256=hashlib.sha256(stream).hexdigest(),
        delta=formats.BlockDelta(
            index="rootfs.ext4.index",
            index_size=len(index),
            index_sha256=hashlib.sha256(index).hexdigest(),
            pack="rootfs.ext4.pack",
            pack_size=len(pack),
            block_size=BS,
            window=parsed.window,
            plain_sha256=hashlib.sha256(parsed.body()).hexdigest(),
        ),
    )


def report_rev8() -> formats.Report:
    return formats.Report(
        node="52-54-00-12-34-56",
        phase=formats.Phase.DOWNLOAD,
        bytes=1_234_567,
        seconds=4.5,
        slot="b",
        version=2,
        time=1_700_000_100.0,
        card_bytes=300_000_000,
        delta="delta: 286.1 MiB from the card (80.0 MiB already in place), 98.0 MiB zeros, "
        "4.2 MiB fetched as 1.18 MiB in 9 requests; 210.3 MiB written",
    )


SAMPLES = (
    "index.format1.rev1.bin",
    "pack.format1.rev1.bin",
    "manifest.format1.rev5.delta.json",
    "index.format1.rev2.bin",
    "pack.format1.rev2.bin",
    "manifest.format1.rev6.block-delta.json",
    "indexdiff.format1.rev1.bin",
    "slotindex.format1.rev1.bin",
)


def main() -> None:
    index, pack = index_rev1()
    (HERE / "index.format1.rev1.bin").write_bytes(index)
    (HERE / "pack.format1.rev1.bin").write_bytes(pack)
    manifest = formats.dump(manifest_rev5(index, pack))
    (HERE / "manifest.format1.rev5.delta.json").write_bytes(manifest)
    (HERE / "manifest.format1.rev5.delta.json.sig").write_bytes(signing.sign(KEY, manifest))
    (HERE / "report.rev8.delta.json").write_bytes(formats.dump(report_rev8()))
    index, pack = index_rev2()
    (HERE / "index.format1.rev2.bin").write_bytes(index)
    (HERE / "pack.format1.rev2.bin").write_bytes(pack)
    manifest = formats.dump(manifest_rev6(index, pack))
    (HERE / "manifest.format1.rev6.block-delta.json").write_bytes(manifest)
    (HERE / "manifest.format1.rev6.block-delta.json.sig").write_bytes(signing.sign(KEY, manifest))
    (HERE / "indexdiff.format1.rev1.bin").write_bytes(indexdiff_rev1())
    (HERE / "slotindex.format1.rev1.bin").write_bytes(slotindex_rev1())
    for name in sorted(SAMPLES):
        print(f"{name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
