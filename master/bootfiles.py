"""The build's boot files in the master's tree: boot/<build>/boot.vfat.gz and its signed boot.json.

`rackboot plan` publishes the build output's boot.vfat (one boot area's FAT32, the same
bytes as the card image's area A) and names its manifest in every plan it writes; the
updater brings each card's boot area to it (initramfs/updater/bootfiles.py). The build id
is the first 16 hex digits of the image's sha256, so the same build publishes once, and
a directory is built aside under the lock on boot/ and renamed into place, like a version.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

from rackboot.build import BOOT_IMAGE
from rackboot.config import Config
from rackboot.files import TMP_RE, fsync_dir, lock_dir, sweep, write_durable
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.bootfiles import BootManifest, build_id
from rackboot.initramfs.updater.formats import StreamCompression

from . import signing

MANIFEST = "boot.json"
STREAM = BOOT_IMAGE + ".gz"
_WORK_RE = re.compile(rf"\.boot-.+|{TMP_RE.pattern}")
_CHUNK = 1 << 20


def manifest_path(build: str) -> str:
    """Where a build's boot manifest lies on the master."""
    return f"/boot/{build}/{MANIFEST}"


def publish(cfg: Config) -> str | None:
    """Publish the config's built boot image (once per build); its manifest's master path,
    or None when the build output holds none (nothing built yet: plans then leave boot files be)."""
    image = cfg.output.directory / BOOT_IMAGE
    if not image.is_file():
        return None
    return publish_image(image, cfg.master.directory, key=cfg.master.key)


def publish_image(image: Path, master: Path, *, key: Path | None = None) -> str:
    sha256, crc32, size = _digests(image)
    build = build_id(sha256)
    boot = Path(master) / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    final = boot / build
    lock = lock_dir(boot)
    try:
        sweep(boot, _WORK_RE)
        if not (final / MANIFEST).is_file():
            work = Path(tempfile.mkdtemp(prefix=f".boot-{build}-", dir=boot))
            work.chmod(0o755)  # mkdtemp's 0700 would keep a server that reads as nobody (nginx) out
            try:
                manifest = _stream(image, work / STREAM, build, sha256, crc32, size)
                data = formats.dump(manifest)
                if key:
                    write_durable(work / (MANIFEST + ".sig"), signing.sign(key, data))
                write_durable(work / MANIFEST, data)
                if final.exists():  # a half-built directory of a killed run that got renamed: replace it
                    shutil.rmtree(final)
                os.rename(work, final)
                fsync_dir(boot)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        os.close(lock)
    return manifest_path(build)


def _digests(image: Path) -> tuple[str, str, int]:
    sha, crc, size = hashlib.sha256(), 0, 0
    with open(image, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return sha.hexdigest(), f"{crc:08x}", size


def _stream(image: Path, out: Path, build: str, sha256: str, crc32: str, size: int) -> BootManifest:
    """gzip (level 6, mtime 0, no name: the same image gives the same stream) and its manifest."""
    with open(image, "rb") as src, open(out, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw, mtime=0) as gz:
            while chunk := src.read(_CHUNK):
                gz.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    stream_sha = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(_CHUNK):
            stream_sha.update(chunk)
    return BootManifest(
        build=build,
        size=size,
        sha256=sha256,
        crc32=crc32,
        stream=STREAM,
        stream_size=out.stat().st_size,
        stream_sha256=stream_sha.hexdigest(),
        compression=StreamCompression.GZIP,
    )
