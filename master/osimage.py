"""Reading OS images: the partitions of an MBR disk image, their labels, ext4 or not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import mbr
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import EXT_MAGIC, EXT_MAGIC_OFFSET

from .numbers import ascii_int


@dataclass(frozen=True)
class Part:
    number: int
    type: str  # two lowercase hex digits
    start: int  # bytes
    size: int  # bytes


def read_mbr(img: Path) -> list[Part]:
    """The used primary entries of `img`'s MBR."""
    with open(img, "rb") as f:
        sector = f.read(mbr.SECTOR)
    try:
        table = mbr.parse(sector)
    except UpdaterError as e:
        raise RackbootError(f"OS image {img}: {e}") from None
    return [Part(e.number, f"{e.type:02x}", e.start * mbr.SECTOR, e.sectors * mbr.SECTOR) for e in table.entries]


def find_partition(img: Path, which: int | str) -> Part:
    parts = read_mbr(img)
    size = img.stat().st_size
    spec = str(which).strip()
    if (number := ascii_int(spec)) is not None:
        hits = [p for p in parts if p.number == number]
    elif spec.lower().startswith("type:"):
        hits = [p for p in parts if p.type == spec[5:].lower().removeprefix("0x").zfill(2)][:1]
    else:
        hits = [p for p in parts if fs_label(img, p) == spec][:1]
    if not hits:
        have = ", ".join(f"{p.number} (type {p.type}, label {fs_label(img, p) or '-'})" for p in parts) or "none"
        raise RackbootError(f"OS image {img} has no partition {spec!r}; it has: {have}")
    part = hits[0]
    if part.start + part.size > size:
        raise RackbootError(f"partition {part.number} of {img} runs past the end of the file")
    return part


def fs_label(img: Path, part: Part) -> str:
    """ext4 volume name or FAT volume label of a partition, '' if neither."""
    with open(img, "rb") as f:
        f.seek(part.start)
        head = f.read(2048)
    if ext4_magic_in(head):
        return head[1024 + 120 : 1024 + 136].split(b"\0")[0].decode("utf-8", "replace")
    if head[510:512] == b"\x55\xaa":
        fat32 = head[82:87] == b"FAT32"
        raw = head[71:82] if fat32 else head[43:54]
        return raw.decode("ascii", "replace").strip()
    return ""


def ext4_magic_in(head: bytes) -> bool:
    return head[EXT_MAGIC_OFFSET : EXT_MAGIC_OFFSET + 2] == EXT_MAGIC


def ext4_magic(img: Path, offset: int) -> bool:
    with open(img, "rb") as f:
        f.seek(offset)
        return ext4_magic_in(f.read(2048))
