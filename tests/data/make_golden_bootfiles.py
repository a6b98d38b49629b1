"""Make the boot files' golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_bootfiles.py
plan rev5 (boot: the boot manifest's path), the boot manifest's rev1 (boot/<build>/boot.json),
the boot record's rev1 (the sector at 3 MiB + 64 KiB) and report rev7 (phase boot-files);
the .sig files with the committed test key (tests/data/keys).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rackboot.initramfs.updater import bootfiles, formats
from rackboot.master import signing

HERE = Path(__file__).resolve().parent
KEY = HERE / "keys" / "test-master.key"
MIB = 1 << 20
NODE = "52-54-00-12-34-56"
IMAGE_SHA256 = hashlib.sha256(b"boot area of build 2").hexdigest()
BUILD = IMAGE_SHA256[:16]

PLAN = formats.Plan(
    node="default",
    layout=formats.Layout(
        (
            formats.Partition("boot", 4, 128, "0c"),
            formats.Partition("a", 132, 256, "83"),
            formats.Partition("b", 388, 256, "83"),
            formats.Partition("data", 644, "rest", "83"),
        )
    ),
    image="/images/example/2/manifest.json",
    pin=True,
    tries=5,
    boot=f"/boot/{BUILD}/boot.json",
)
MANIFEST = bootfiles.BootManifest(
    build=BUILD,
    size=64 * MIB,
    sha256=IMAGE_SHA256,
    crc32="0badf00d",
    stream="boot.vfat.gz",
    stream_size=14680064,
    stream_sha256=hashlib.sha256(b"boot area of build 2, gzip").hexdigest(),
)
RECORD = bootfiles.BootRecord(start=68 * 2048, sectors=64 * 2048, size=64 * MIB, sha256=IMAGE_SHA256, build=BUILD)
REPORT = formats.Report(
    node=NODE,
    phase=formats.Phase.BOOT_FILES,
    bytes=14680064,
    seconds=3.25,
    output=f"switched: build {BUILD}, area b",
    time=1700000400.5,
)


def main() -> None:
    for name, doc in (("plan.format1.rev5.boot.json", PLAN), ("boot.format1.rev1.json", MANIFEST)):
        data = formats.dump(doc)
        (HERE / name).write_bytes(data)
        (HERE / (name + ".sig")).write_bytes(signing.sign(KEY, data))
        print(f"{name}: {len(data)} bytes, signed")
    (HERE / "boot-record.rev1.bin").write_bytes(bootfiles.encode_record(RECORD))
    (HERE / "report.rev7.boot-files.json").write_bytes(formats.dump(REPORT))


if __name__ == "__main__":
    main()
