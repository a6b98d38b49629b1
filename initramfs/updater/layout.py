"""Compare the plan's layout with the card's MBR and decide: ok, repartition, or refuse.

Pure: `wanted_entries` and `decide` take numbers and tables, not devices. Rules:
partition i of the plan is MBR entry i+1; a match is exact (start, sectors, type);
"rest" runs to the card's size (or MBR's 2 TiB, whichever ends first) aligned down to
1 MiB. The plan's boot partition is the card's boot region, whose entry points at one of
two boot areas (bootfiles.py). Repartitioning never moves, resizes or retypes it, and a
partition whose start and type stay the same keeps its contents (the data partition
survives; a slot that changes is emptied).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

from . import bootfiles, mbr
from .disk import Disk
from .errors import UpdaterError
from .formats import Layout

MIB = 1 << 20
SECTORS_PER_MIB = MIB // mbr.SECTOR
MBR_BYTES = (1 << 32) * mbr.SECTOR  # the last byte a 32-bit LBA reaches
BOOT = "boot"
# FAT32 (CHS), FAT32 (LBA), FAT16 (LBA): the boot partition holds the card image's FAT32,
# which the Pi firmware and U-Boot read only under these types (the config and the card
# image take no other; the updater never retypes a card's boot partition)
FAT_TYPES = (0x0B, 0x0C, 0x0E)
# Types whose entries mbr.parse refuses: a table holding one would be unreadable next boot
UNREADABLE_TYPES = (0x05, 0x0F, 0x85, 0xEE)


@dataclass(frozen=True)
class Decision:
    action: str  # "ok" | "repartition"
    table: mbr.Mbr  # the table the card has (ok) or gets (repartition)
    changed: tuple[str, ...] = ()  # partitions whose entry changes
    kept: tuple[str, ...] = ()  # partitions whose contents survive (same start and type)


def wanted_entries(layout: Layout, disk_bytes: int) -> tuple[mbr.Entry, ...]:
    """The plan's partitions as MBR entries on a card of `disk_bytes`; too small -> error."""
    card_mib = min(disk_bytes, MBR_BYTES) // MIB  # MBR cannot address past 2 TiB: "rest" stops there
    entries = []
    for i, p in enumerate(layout.partitions):
        size_mib = p.size_mib if isinstance(p.size_mib, int) else card_mib - p.start_mib  # else: "rest"
        if p.start_mib + max(size_mib, 1) > card_mib:
            fixed = sum(q.size_mib for q in layout.partitions if isinstance(q.size_mib, int))
            needed = layout.partitions[0].start_mib + fixed + (1 if layout.partitions[-1].is_rest else 0)
            reach = " that MBR can address" if disk_bytes > MBR_BYTES else ""
            raise UpdaterError(
                f"layout: card too small: the plan needs {needed} MiB, the card has {card_mib} MiB{reach}"
            )
        ptype = int(p.type, 16)
        if ptype in UNREADABLE_TYPES:
            raise UpdaterError(
                f"layout: partition {p.name}: type {p.type} is an extended or GPT entry, "
                f"which this card's MBR cannot hold"
            )
        entries.append(
            mbr.Entry(
                i + 1, ptype, p.start_mib * SECTORS_PER_MIB, size_mib * SECTORS_PER_MIB, bootable=(p.name == BOOT)
            )
        )
    return tuple(entries)


def decide(layout: Layout, current: mbr.Mbr | None, disk_bytes: int, *, node: str = "") -> Decision:
    """ok | repartition (with the new table) | UpdaterError (refuse)."""
    wanted = _boot_as_the_card_has_it(layout, current, wanted_entries(layout, disk_bytes))
    have = current.entries if current is not None else ()
    names = [p.name for p in layout.partitions]
    changed = tuple(names[w.number - 1] for w in wanted if not _same(current, w))
    extra = [e.number for e in have if e.number > len(wanted)]
    if not changed and not extra:
        return Decision("ok", current)  # type: ignore[arg-type]
    diff = ", ".join(changed + tuple(f"extra partition {n}" for n in extra))
    if layout.repartition == "never":
        raise UpdaterError(
            f"layout: the card's partition table differs from the plan ({diff}) and the plan says repartition never"
        )
    if BOOT in names and current is not None:
        boot = wanted[names.index(BOOT)]
        old = current.entry(boot.number)
        if old is not None and (old.start, old.sectors, old.type) != (boot.start, boot.sectors, boot.type):
            raise UpdaterError(f"layout: the plan would change the boot partition's {_boot_diff(old, boot)}; refusing")
    kept = tuple(names[w.number - 1] for w in wanted if _kept(current, w))
    signature = current.signature if current is not None and current.signature else _signature(node)
    boot_code = current.boot_code if current is not None else bytes(440)
    return Decision("repartition", mbr.Mbr(signature, wanted, boot_code), changed, kept)


def _boot_as_the_card_has_it(
    layout: Layout, current: mbr.Mbr | None, wanted: tuple[mbr.Entry, ...]
) -> tuple[mbr.Entry, ...]:
    """The plan's boot partition is the card's boot region (bootfiles.py): entry 1 may point at
    either boot area or, on a card from before boot areas, span the region. The card's entry
    stands when it is one of those; a card without one gets area A."""
    names = [p.name for p in layout.partitions]
    if BOOT not in names:
        return wanted
    region = wanted[names.index(BOOT)]
    old = current.entry(region.number) if current is not None else None
    try:
        area = bootfiles.which_area(old, region.start, region.sectors)
        start, sectors = bootfiles.areas(region.start, region.sectors)["a"]
    except UpdaterError:  # a region too small for two areas: it stays one
        return wanted
    if old is not None and area is not None and old.type == region.type:
        start, sectors = old.start, old.sectors
    elif old is not None:
        return wanted  # some other boot partition: decide refuses to touch it
    return tuple(replace(w, start=start, sectors=sectors) if w is region else w for w in wanted)


def _boot_diff(old: mbr.Entry, new: mbr.Entry) -> str:
    """What differs, card -> plan: 'type (card 0c, plan 0e)', 'start (card 8192, plan 16384 sectors)'."""
    fields = (
        ("start", old.start, new.start, " sectors"),
        ("size", old.sectors, new.sectors, " sectors"),
        ("type", f"{old.type:02x}", f"{new.type:02x}", ""),
    )
    return " and ".join(f"{name} (card {a}, plan {b}{unit})" for name, a, b, unit in fields if a != b)


def _same(current: mbr.Mbr | None, w: mbr.Entry) -> bool:
    e = current.entry(w.number) if current is not None else None
    return e is not None and (e.start, e.sectors, e.type) == (w.start, w.sectors, w.type)


def _kept(current: mbr.Mbr | None, w: mbr.Entry) -> bool:
    e = current.entry(w.number) if current is not None else None
    return e is not None and (e.start, e.type) == (w.start, w.type)


def _signature(node: str) -> int:
    """A new card's disk signature: derived from the node so the same plan gives the same bytes."""
    return zlib.crc32(b"rackboot:" + node.encode()) or 1


def read_table(disk: Disk) -> mbr.Mbr | None:
    """The card's MBR, or None for a blank or unreadable table (it gets a new one)."""
    try:
        return mbr.parse(disk.read(0, mbr.SECTOR))
    except UpdaterError:
        return None


def write_table(disk: Disk, table: mbr.Mbr) -> None:
    """One 512-byte sector write, fsync, then the kernel re-reads it."""
    disk.write(0, mbr.dump(table))
    disk.fsync()
    disk.reread_partitions()


def partition_range(table: mbr.Mbr, number: int) -> tuple[int, int]:
    """(byte offset, byte length) of partition `number` on the card."""
    e = table.entry(number)
    if e is None:
        raise UpdaterError(f"layout: the card has no partition {number}")
    return e.start * mbr.SECTOR, e.sectors * mbr.SECTOR
