"""The dd-able SD card image for new workers: an MBR and the boot region's two FAT32 areas.

The config's boot partition is the card's boot region, split into boot areas A and B
(initramfs/updater/bootfiles.py): the image holds this build's boot files in area A,
where MBR entry 1 points, and leaves area B a hole (zeros, not in the bmap), which the
updater fills with a later build's boot files before it moves entry 1 there. The FAT of
area A is also the build's boot.vfat, the image the master serves to keep cards current.

The boot partition's MBR type is the config's (the plan carries the same one, and the
updater refuses a boot partition that differs from the plan), so only the FAT types the
firmware reads are taken.

Built without root or loop devices: mkfs.fat on a plain file, mtools to copy the
files in, then the FAT image spliced in after the MBR. Everything that could vary is
pinned: the disk signature, the volume id (`--invariant`), and every file's timestamp,
so the same inputs give the same bytes. The gap before the boot partition, where the
updater keeps its slot-state records, is written as explicit zeros but for the boot
record naming what area A holds: a card flashed over an old one starts with no slot
state at all. The rest of the card is laid out by
the updater on first boot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import bootfiles, mbr
from rackboot.initramfs.updater.errors import UpdaterError
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


def area_mib(boot_size_mib: int, boot_start_mib: int = 4) -> int:
    """One boot area's MiB: half the boot partition, as the updater splits it; the whole
    partition when a half is too small for FAT32 (such a card keeps the boot files it was
    flashed with, and its updater says so)."""
    per_mib = MIB // mbr.SECTOR
    try:
        return bootfiles.areas(boot_start_mib * per_mib, boot_size_mib * per_mib)["a"][1] // per_mib
    except UpdaterError:
        return boot_size_mib


def fat_image(
    out: Path,
    files: dict[str, Path | bytes],
    *,
    size_mib: int,
    volume_id: int,
    label: str,
    mtime: int,
    what: str = "boot partition",
) -> None:
    """A FAT32 filesystem image holding ``files`` (target path -> source path or bytes)."""
    need = sum(len(s) if isinstance(s, bytes) else Path(s).stat().st_size for s in files.values())
    if need > (size_mib - 2) * MIB:
        raise RackbootError(
            f"{what} of {size_mib} MiB is too small for {need / MIB:.1f} MiB of files "
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


def boot_image(
    out: Path,
    files: dict[str, Path | bytes],
    *,
    boot_size_mib: int,
    volume_id: int,
    boot_start_mib: int = 4,
    label: str = "RACKBOOT",
    mtime: int = 0,
) -> None:
    """One boot area's FAT32 image: what the card's area A holds and the master serves."""
    size = area_mib(boot_size_mib, boot_start_mib)
    what = "boot partition"
    if size < boot_size_mib:
        what = f"a boot area (half the {boot_size_mib} MiB boot partition: the other half takes the next build's)"
    fat_image(out, files, size_mib=size, volume_id=volume_id, label=label, mtime=mtime, what=what)


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
    with tempfile.TemporaryDirectory(prefix="rackboot-sdcard-") as tmp:
        fat = Path(tmp) / "boot.vfat"
        boot_image(
            fat,
            files,
            boot_size_mib=boot_size_mib,
            volume_id=volume_id,
            boot_start_mib=boot_start_mib,
            label=label,
            mtime=mtime,
        )
        card_image(
            out,
            fat,
            boot_size_mib=boot_size_mib,
            disk_signature=disk_signature,
            boot_start_mib=boot_start_mib,
            boot_type=boot_type,
        )


def card_image(
    out: Path,
    fat: Path,
    *,
    boot_size_mib: int,
    disk_signature: int,
    boot_start_mib: int = 4,
    boot_type: int = FAT32_LBA,
) -> None:
    """The card image around a boot area image (boot_image): MBR, the zero gap, area A,
    and area B and whatever follows as a hole."""
    if boot_type not in FAT_TYPES:
        raise RackbootError(
            f"boot partition type {boot_type:02x} is not a FAT type the firmware reads "
            f"({', '.join(f'{t:02x}' for t in FAT_TYPES)})"
        )
    size_mib = area_mib(boot_size_mib, boot_start_mib)
    if fat.stat().st_size != size_mib * MIB:
        raise RackbootError(f"{fat}: {fat.stat().st_size} bytes is not a boot area of {size_mib} MiB")
    per_mib = MIB // mbr.SECTOR
    table = mbr.Mbr(
        disk_signature,
        (mbr.Entry(1, boot_type, boot_start_mib * per_mib, size_mib * per_mib, bootable=True),),
    )
    gap = bytearray(boot_start_mib * MIB - mbr.SECTOR)  # the slot-state gap, explicitly zero
    if size_mib < boot_size_mib and boot_start_mib * MIB >= bootfiles.RECORD + mbr.SECTOR:
        # what area A holds, so the first boot need not hash it (bootfiles.holds)
        sha256 = _sha256(fat)
        record = bootfiles.BootRecord(
            boot_start_mib * per_mib, size_mib * per_mib, size_mib * MIB, sha256, bootfiles.build_id(sha256)
        )
        at = bootfiles.RECORD - mbr.SECTOR
        gap[at : at + mbr.SECTOR] = bootfiles.encode_record(record)
    with open(out, "wb") as disk:
        disk.write(mbr.dump(table))
        disk.write(gap)
        _copy_data(fat, disk, boot_start_mib * MIB)
        disk.truncate((boot_start_mib + boot_size_mib) * MIB)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()
