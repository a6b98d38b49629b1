"""The MBR partition table: four primaries in sector 0, pure bytes in and out.

Only what a card needs: type, LBA start, sector count, the boot flag, and the disk
signature (PARTUUID=<signature>-<nn>). CHS fields are written as the "beyond CHS"
marker; nothing that boots these cards reads them. Boot code bytes are preserved.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from .errors import UpdaterError

SECTOR = 512
_ENTRIES = 446
_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, LBA start, sectors
_BOOT_SIG = b"\x55\xaa"
_CHS_MAX = b"\xfe\xff\xff"  # C=1023 H=254 S=63: "use the LBA fields"
_GPT_PROTECTIVE = 0xEE
_EXTENDED = (0x05, 0x0F, 0x85)


@dataclass(frozen=True)
class Entry:
    number: int  # 1..4, as in /dev/vda<number>
    type: int
    start: int  # LBA
    sectors: int
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.sectors


@dataclass(frozen=True)
class Mbr:
    signature: int
    entries: tuple[Entry, ...]  # used entries only, by number
    boot_code: bytes = bytes(440)

    def entry(self, number: int) -> Entry | None:
        return next((e for e in self.entries if e.number == number), None)


def parse(sector: bytes) -> Mbr:
    """Sector 0 -> Mbr; UpdaterError for anything that is not a sane MBR."""
    if len(sector) < SECTOR:
        raise UpdaterError(f"mbr: need {SECTOR} bytes, got {len(sector)}")
    if sector[510:512] != _BOOT_SIG:
        raise UpdaterError("mbr: no 55aa boot signature in sector 0 (blank or unpartitioned card)")
    entries = []
    for i in range(4):
        status, _, ptype, _, start, sectors = _ENTRY.unpack_from(sector, _ENTRIES + 16 * i)
        if ptype == 0:
            continue
        where = f"mbr: partition {i + 1}"
        if status not in (0x00, 0x80):
            raise UpdaterError(f"{where}: status byte {status:#04x} is neither 00 nor 80")
        if ptype == _GPT_PROTECTIVE:
            raise UpdaterError(f"{where}: GPT protective entry (GPT cards are not supported)")
        if ptype in _EXTENDED:
            raise UpdaterError(f"{where}: extended partitions are not supported")
        if start == 0 or sectors == 0:
            raise UpdaterError(f"{where}: start {start} / {sectors} sectors is empty or overlaps sector 0")
        if start + sectors > 1 << 32:
            raise UpdaterError(f"{where}: ends past MBR's 2 TiB")
        entries.append(Entry(i + 1, ptype, start, sectors, status == 0x80))
    _check_overlaps(entries)
    signature = struct.unpack_from("<I", sector, 440)[0]
    return Mbr(signature, tuple(entries), bytes(sector[:440]))


def dump(mbr: Mbr) -> bytes:
    """Mbr -> the 512 bytes of sector 0."""
    if len(mbr.boot_code) != 440:
        raise UpdaterError(f"mbr: boot code must be 440 bytes, got {len(mbr.boot_code)}")
    if not 0 <= mbr.signature <= 0xFFFFFFFF:
        raise UpdaterError(f"mbr: disk signature {mbr.signature} does not fit 32 bits")
    out = bytearray(SECTOR)
    out[:440] = mbr.boot_code
    struct.pack_into("<I", out, 440, mbr.signature)
    numbers = [e.number for e in mbr.entries]
    if len(set(numbers)) != len(numbers):
        raise UpdaterError(f"mbr: partition numbers {numbers} repeat")
    for e in mbr.entries:
        where = f"mbr: partition {e.number}"
        if not 1 <= e.number <= 4:
            raise UpdaterError(f"{where}: only primaries 1..4 exist")
        if not 1 <= e.type <= 0xFF:
            raise UpdaterError(f"{where}: type {e.type} is not 01..ff")
        if not (1 <= e.start <= 0xFFFFFFFF and 1 <= e.sectors <= 0xFFFFFFFF and e.end <= 1 << 32):
            raise UpdaterError(f"{where}: start {e.start} + {e.sectors} sectors is outside MBR's 2 TiB")
        _ENTRY.pack_into(
            out,
            _ENTRIES + 16 * (e.number - 1),
            0x80 if e.bootable else 0,
            _CHS_MAX,
            e.type,
            _CHS_MAX,
            e.start,
            e.sectors,
        )
    _check_overlaps(list(mbr.entries))
    out[510:512] = _BOOT_SIG
    return bytes(out)


def _check_overlaps(entries: list[Entry]) -> None:
    ordered = sorted(entries, key=lambda e: e.start)
    for prev, cur in itertools.pairwise(ordered):
        if cur.start < prev.end:
            raise UpdaterError(f"mbr: partitions {prev.number} and {cur.number} overlap")
