"""Make the block delta's golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_delta.py
index rev1 (the block index of a small image: zero, text and random blocks and a short tail)
with its pack, manifest rev5 (delta: the index and pack it pins) and its .sig with the
committed test key, report rev8 (card_bytes, delta). tests/unit/test_golden_delta.py checks
today's code against them.
"""

from __future__ import annotations

import hashlib
import io
import random
import zlib
from pathlib import Path

from rackboot.initramfs.updater import delta, formats
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
    data = image_rev1()
    pack = io.BytesIO()
    index = delta.build_index(io.BytesIO(data), len(data), pack)
    return index.dump(), pack.getvalue()


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


def main() -> None:
    index, pack = index_rev1()
    (HERE / "index.format1.rev1.bin").write_bytes(index)
    (HERE / "pack.format1.rev1.bin").write_bytes(pack)
    manifest = formats.dump(manifest_rev5(index, pack))
    (HERE / "manifest.format1.rev5.delta.json").write_bytes(manifest)
    (HERE / "manifest.format1.rev5.delta.json.sig").write_bytes(signing.sign(KEY, manifest))
    (HERE / "report.rev8.delta.json").write_bytes(formats.dump(report_rev8()))
    for name in ("index.format1.rev1.bin", "pack.format1.rev1.bin", "manifest.format1.rev5.delta.json"):
        print(f"{name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
