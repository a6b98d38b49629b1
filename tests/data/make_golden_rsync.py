"""Make rsync mode's golden samples in tests/data with today's code (the revision that wrote them).

Run from the repository:  .venv/bin/python tests/data/make_golden_rsync.py
plan rev6 (method rsync, rsync_port), manifest rev4 (files: the file manifest it pins) and
the file manifest's rev1; the .sig files with the committed test key (tests/data/keys).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rackboot.initramfs.updater import filemanifest, formats
from rackboot.initramfs.updater.filemanifest import Entry
from rackboot.master import signing

HERE = Path(__file__).resolve().parent
KEY = HERE / "keys" / "test-master.key"
MIB = 1 << 20


def files_rev1() -> bytes:
    """One entry of every kind, names that need escapes, a hard link and a setuid file."""
    data = hashlib.sha256(b"#!/bin/sh\necho hello\n").hexdigest()
    return filemanifest.dump(
        [
            Entry(b".", "d", 0o755, 0, 0),
            Entry(b"bin", "l", 0o777, 0, 0, 7, target=b"usr/bin"),
            Entry(b"dev", "d", 0o755, 0, 0),
            Entry(b"dev/console", "c", 0o600, 0, 5, rdev=(5, 1)),
            Entry(b"dev/initctl", "p", 0o600, 0, 0),
            Entry(b"dev/sda", "b", 0o660, 0, 6, rdev=(8, 0)),
            Entry(b"etc", "d", 0o755, 0, 0),
            Entry(b"etc/mtab", "l", 0o777, 0, 0, 19, target=b"../proc/self/mounts"),
            Entry(b"etc/my file\n", "f", 0o640, 0, 42, 22, data),
            Entry(b"run", "d", 0o755, 0, 0),
            Entry(b"run/sock", "s", 0o666, 0, 0),
            Entry(b"usr", "d", 0o755, 0, 0),
            Entry(b"usr/bin", "d", 0o755, 0, 0),
            Entry(b"usr/bin/hello", "f", 0o4755, 1000, 1000, 22, data),
            Entry(b"usr/bin/hello-again", "h", 0o4755, 1000, 1000, 22, data, target=b"usr/bin/hello"),
        ]
    )


def main() -> None:
    listed = files_rev1()
    (HERE / "files.format1.rev1.list").write_bytes(listed)
    part = formats.Partition
    layout = formats.Layout(
        (part("boot", 4, 16, "0c"), part("a", 20, 64, "83"), part("b", 84, 64, "83"), part("data", 148, "rest", "83"))
    )
    plan = formats.Plan(
        node="default",
        layout=layout,
        image="/images/example/2/manifest.json",
        mount=formats.Mount.OVERLAY_TMPFS,
        tries=5,
        method=formats.Method.RSYNC,
        rsync_port=873,
    )
    manifest = formats.Manifest(
        image="example",
        version=2,
        size=64 * MIB,
        sha256=hashlib.sha256(b"example v2").hexdigest(),
        crc32="0badcafe",
        stream="rootfs.ext4.gz",
        stream_size=12345678,
        stream_sha256=hashlib.sha256(b"example v2 stream").hexdigest(),
        label="v2",
        created=1700000000,
        kernel_release="6.1.0-28-arm64",
        files=formats.FileList(
            file="files.list", size=len(listed), sha256=hashlib.sha256(listed).hexdigest(), module="example.2"
        ),
    )
    for name, doc in (("plan.format1.rev6.rsync.json", plan), ("manifest.format1.rev4.files.json", manifest)):
        data = formats.dump(doc)
        (HERE / name).write_bytes(data)
        (HERE / (name + ".sig")).write_bytes(signing.sign(KEY, data))
        print(f"{name}: {len(data)} bytes, signed")


if __name__ == "__main__":
    main()
