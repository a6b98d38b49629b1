"""The dd-able SD card image for new workers: an MBR and one FAT32 boot partition.

The boot partition's MBR type is the config's (the plan carries the same one, and the
updater refuses a boot partition that differs from the plan), so only the FAT types the
firmware reads are taken.

Built without root or loop devices: mkfs.fat on a plain file, mtools to copy the
files in, then the FAT image spliced in after the MBR. Everything that could vary is
pinned: the disk signature, the volume id (`--invariant`), and every file's timestamp,
so the same inputs give the same bytes. The gap before the boot partition, where the
updater keeps its slot-state records, is written as explicit zeros: a card flashed
over an old one starts with no slot state at all. The rest of the card is laid out by
the updater on first boot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import mbr
from rackboot.initramfs.updater.layout import FAT_TYPES  # the updater refuses a plan's boot of any other
from rackboot.proc import run

MIB = 1 << 20
FAT_EPOCH = 315532800  # 1980-01-01: FAT cannot store anything earlier
FAT32_LBA = 0x0C
MISSING = "apt-get install dosfstools mtools"


def _stage(files: dict[str, Path | bytes], root: Path, mtime: int) -> None:
    for target in sorted(files):
        dst = root / target.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        source = files[target]
        if isinstance(source, bytes):
            dst.write_bytes(source)
        else:
            shutil.copyfile(source, dst)
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def fat_image(
    out: Path, files: dict[str, Path | bytes], *, size_mib: int, volume_id: int, label: str, mtime: int
) -> None:
    """A FAT32 filesystem image holding ``files`` (target path -> source path or bytes)."""
    need = sum(len(s) if isinstance(s, bytes) else Path(s).stat().st_size for s in files.values())
    if need > (size_mib - 2) * MIB:
        raise RackbootError(
            f"boot partition of {size_mib} MiB is too small for {need / MIB:.1f} MiB of files "
            f"(over by {(need - (size_mib - 2) * MIB) / MIB:.1f} MiB)"
        )
    with open(out, "wb") as f:
        f.truncate(size_mib * MIB)
    # --invariant also sets the volume id to 1234abcd, so it must come before -i
    run(
        ["mkfs.fat", "-F", "32", "--invariant", "-i", f"{volume_id:08x}", "-n", label, str(out)],
        f"formatting the {size_mib} MiB boot partition",
        missing=MISSING,
    )
    with tempfile.TemporaryDirectory(prefix="rackboot-fat-") as tmp:
        stage = Path(tmp)
        _stage(files, stage, max(mtime, FAT_EPOCH))
        top = sorted(p.name for p in stage.iterdir())
        if top:
            run(
                ["mcopy", "-i", str(out), "-s", "-m", "-Q", *top, "::/"],
                "copying files into the boot partition",
                cwd=stage,
                missing=MISSING,
                env={**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC0"},
            )  # FAT times are local


def _copy_data(src: Path, dst: BinaryIO, offset: int) -> None:
    """Copy the data extents of ``src`` into ``dst`` at ``offset``, leaving holes as holes."""
    with open(src, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            dst.seek(offset + start)
            left = end - start
            while left:
                chunk = f.read(min(left, 4 * MIB))
                dst.write(chunk)
                left -= len(chunk)
            pos = end


def build_sdcard(
    out: Path,
    files: dict[str, Path | bytes],
    *,
    boot_size_mib: int,
    disk_signature: int,
    volume_id: int,
    boot_start_mib: int = 4,
    boot_type: int = FAT32_LBA,
    label: str = "RACKBOOT",
    mtime: int = 0,
) -> None:
    """Write the card image to ``out``: (boot_start + boot_size) MiB, sparse where unused."""
    if boot_type not in FAT_TYPES:
        raise RackbootError(
            f"boot partition type {boot_type:02x} is not a FAT type the firmware reads "
            f"({', '.join(f'{t:02x}' for t in FAT_TYPES)})"
        )
    with tempfile.TemporaryDirectory(prefix="rackboot-sdcard-") as tmp:
        fat = Path(tmp) / "boot.vfat"
        fat_image(fat, files, size_mib=boot_size_mib, volume_id=volume_id, label=label, mtime=mtime)
        table = mbr.Mbr(
            disk_signature,
            (
                mbr.Entry(
                    1, boot_type, boot_start_mib * MIB // mbr.SECTOR, boot_size_mib * MIB // mbr.SECTOR, bootable=True
                ),
            ),
        )
        with open(out, "wb") as disk:
            disk.write(mbr.dump(table))
            disk.write(bytes(boot_start_mib * MIB - mbr.SECTOR))  # the slot-state gap, explicitly zero
            _copy_data(fat, disk, boot_start_mib * MIB)
            disk.truncate((boot_start_mib + boot_size_mib) * MIB)
