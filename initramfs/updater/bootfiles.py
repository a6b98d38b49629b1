"""Boot files kept current: two boot areas and one MBR sector between them (RAUC's boot-mbr-switch).

The plan's boot partition is the card's boot *region*: area A is its first half, area B
its second (each aligned down to 1 MiB), and MBR entry 1 points at one of them, the active
area, which the Pi firmware and U-Boot read. The live FAT is never written: a new build's
boot image goes into the inactive area, is fsynced, read back and hashed, and only then
does one 512-byte write of sector 0 move entry 1 onto it. A power cut before that sector
leaves the old area and the old MBR; after it, the new area, complete and verified.

Skipping is by hash, like slots: a one-sector record (BootRecord, at RECORD) names the
area last written or checked and the sha256 of its first ``size`` bytes. It is written
only after the area verified and the MBR points at it, and is trusted only while entry 1
still points at the area it names; any other case (no record, a torn one, a cut between
switch and record) hashes the active area once and records it.

A card flashed before boot areas has entry 1 and one FAT over the whole region. When no
cluster of that FAT lies in the region's upper half (a flashed FAT fills from its start),
the upper half becomes area B like any inactive area; otherwise the card keeps its boot
files as flashed and the report says why (a newer sdcard.img gives it two areas).
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import binding, formats, install, mbr
from . import report as reports
from .disk import Disk
from .errors import Refused, UpdaterError
from .formats import _FILE_RE, _HEX8_RE, _HEX64_RE, FORMAT, Manifest, Phase, StreamCompression, _Fields

if TYPE_CHECKING:
    from .fetch import MasterClient
    from .main import _Update

SECTORS_PER_MIB = (1 << 20) // mbr.SECTOR
RECORD = (3 << 20) + (64 << 10)  # one sector in the gap: after the confirmation sector (3 MiB), before 4 MiB
MAGIC = b"RKBA"
_HEAD = struct.Struct("<4sI")  # magic, body length
_CRC = struct.Struct("<I")
BUILD_RE = re.compile(r"[0-9a-f]{16}")  # the first 16 hex digits of the boot image's sha256
_MANIFEST_PATH_RE = re.compile(rf"/boot/({BUILD_RE.pattern})/boot\.json")  # master/bootfiles.manifest_path
WHOLE = "whole"  # entry 1 spans the whole region: a card from before boot areas
AREAS = ("a", "b")
# FAT32 needs 65525 clusters: below 33 MiB mtools (and the spec) take it for FAT16 and find no root directory
MIN_AREA_MIB = 33


def build_id(sha256: str) -> str:
    """A build's id: the first 16 hex digits of its boot image's sha256."""
    return sha256[:16]


def build_named(path: str) -> str | None:
    """The build a boot manifest's path names (/boot/<build>/boot.json), or None."""
    match = _MANIFEST_PATH_RE.fullmatch(path)
    return match[1] if match else None


# --- the boot manifest ------------------------------------------------------------------


@dataclass(frozen=True)
class BootManifest:
    """boot/<build>/boot.json on the master: the FAT image of one build's boot area."""

    build: str
    size: int  # bytes of the FAT image (one boot area's)
    sha256: str
    crc32: str
    stream: str  # beside the manifest
    stream_size: int
    stream_sha256: str
    compression: StreamCompression = StreamCompression.GZIP
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> BootManifest:
        f = _Fields("boot manifest", obj)
        return cls(
            format=f.format(),
            build=f.text("build", BUILD_RE, what="16 lowercase hex digits"),
            size=f.integer("size", minimum=mbr.SECTOR),
            sha256=f.text("sha256", _HEX64_RE, what="64 lowercase hex digits"),
            crc32=f.text("crc32", _HEX8_RE, what="8 lowercase hex digits"),
            compression=f.choice("compression", StreamCompression),
            stream=f.text("stream", _FILE_RE, what="a plain file name"),
            stream_size=f.integer("stream_size", minimum=1),
            stream_sha256=f.text("stream_sha256", _HEX64_RE, what="64 lowercase hex digits"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "build": self.build,
            "size": self.size,
            "sha256": self.sha256,
            "crc32": self.crc32,
            "compression": self.compression,
            "stream": self.stream,
            "stream_size": self.stream_size,
            "stream_sha256": self.stream_sha256,
        }

    def as_image(self) -> Manifest:
        """The same checks a slot's image gets (install.write_stream, verify)."""
        return Manifest(
            image="boot-files",
            version=1,
            size=self.size,
            sha256=self.sha256,
            crc32=self.crc32,
            stream=self.stream,
            stream_size=self.stream_size,
            stream_sha256=self.stream_sha256,
            compression=self.compression,
            label=self.build,
            fstype="vfat",
        )


def parse_boot_manifest(data: bytes | str) -> BootManifest:
    """Untrusted bytes -> validated boot manifest; only UpdaterError escapes."""
    return BootManifest.from_dict(formats.load_json("boot manifest", data))


# --- the record of what the active area holds --------------------------------------------


@dataclass(frozen=True)
class BootRecord:
    start: int  # LBA of the area it describes
    sectors: int
    size: int  # bytes hashed from the area's start
    sha256: str
    build: str
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "start": self.start,
            "sectors": self.sectors,
            "size": self.size,
            "sha256": self.sha256,
            "build": self.build,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> BootRecord:
        f = _Fields("boot record", obj)
        return cls(
            format=f.format(),
            start=f.integer("start", minimum=1),
            sectors=f.integer("sectors", minimum=1),
            size=f.integer("size", minimum=1),
            sha256=f.text("sha256", _HEX64_RE, what="64 lowercase hex digits"),
            build=f.text("build", BUILD_RE, what="16 lowercase hex digits"),
        )


def encode_record(record: BootRecord) -> bytes:
    """magic "RKBA", u32 length, canonical JSON, u32 CRC32 of all before it; zero-padded to a sector."""
    body = formats.dump(record)
    head = _HEAD.pack(MAGIC, len(body)) + body
    raw = head + _CRC.pack(zlib.crc32(head))
    if len(raw) > mbr.SECTOR:
        raise UpdaterError(f"boot record: {len(raw)} bytes do not fit one sector")
    return raw.ljust(mbr.SECTOR, b"\0")


def decode_record(raw: bytes) -> BootRecord | None:
    """The record, or None for a blank, torn or foreign sector (the area is then hashed)."""
    if len(raw) < _HEAD.size or raw[:4] != MAGIC:
        return None
    length = _HEAD.unpack_from(raw)[1]
    end = _HEAD.size + length
    if end + _CRC.size > min(len(raw), mbr.SECTOR) or _CRC.unpack_from(raw, end)[0] != zlib.crc32(raw[:end]):
        return None
    try:
        return BootRecord.from_dict(json.loads(raw[_HEAD.size : end]))
    except (ValueError, UpdaterError):
        return None


def read_record(disk: Disk) -> BootRecord | None:
    return decode_record(disk.read(RECORD, mbr.SECTOR))


def write_record(disk: Disk, record: BootRecord) -> None:
    disk.write(RECORD, encode_record(record))
    disk.fsync()


# --- areas: pure ---------------------------------------------------------------------------


def areas(region_start: int, region_sectors: int) -> dict[str, tuple[int, int]]:
    """{"a": (start, sectors), "b": ...}: the region's halves, each whole MiB; UpdaterError
    when a half is too small for FAT32 (the region then stays one area)."""
    half = region_sectors // 2 // SECTORS_PER_MIB * SECTORS_PER_MIB
    if half < MIN_AREA_MIB * SECTORS_PER_MIB:
        raise UpdaterError(
            f"boot files: a boot partition of {region_sectors // SECTORS_PER_MIB} MiB has no room for two "
            f"boot areas of FAT32 ({MIN_AREA_MIB} MiB each): its boot files stay as flashed"
        )
    return {"a": (region_start, half), "b": (region_start + half, half)}


def which_area(entry: mbr.Entry | None, region_start: int, region_sectors: int) -> str | None:
    """Which of "a", "b", WHOLE (one area: a card from before boot areas, or a region too
    small for two) or None: what MBR entry 1 points at."""
    if entry is None:
        return None
    span = (entry.start, entry.sectors)
    if span == (region_start, region_sectors):
        return WHOLE
    try:
        halves = areas(region_start, region_sectors)
    except UpdaterError:
        return None
    return next((name for name, area in halves.items() if area == span), None)


def switched(table: mbr.Mbr, start: int, sectors: int) -> mbr.Mbr:
    """``table`` with entry 1 moved onto the area at ``start``; type and boot flag kept."""
    entries = tuple(replace(e, start=start, sectors=sectors) if e.number == 1 else e for e in table.entries)
    return replace(table, entries=entries)


# --- the step ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    action: str  # "up-to-date" | "switched" | "kept" (a card that cannot take boot files)
    area: str | None
    build: str
    bytes: int = 0  # of the boot image stream
    seconds: float = 0.0
    reason: str = ""


def keep_current(update: _Update, region: tuple[int, int], table: mbr.Mbr, path: str) -> tuple[Outcome, mbr.Mbr]:
    """Bring the card's active boot area to the boot manifest at ``path`` (signed like a plan):
    (what happened, the card's table now). UpdaterError/Refused: the old area still boots."""
    started = time.monotonic()
    expected = build_named(path)
    if expected is None:
        raise Refused(f"boot manifest: {path[:120]!r} is not a build's boot manifest path (/boot/<build>/boot.json)")
    manifest = update.signed_doc(path, parse_boot_manifest)
    binding.check_boot_manifest(path, manifest.build, expected)  # the build the plan asked for, or none
    region_start, region_sectors = region
    entry = table.entry(1)
    active = which_area(entry, region_start, region_sectors)
    if active is None or entry is None:
        return Outcome("kept", None, manifest.build, reason=_NOT_AN_AREA), table
    try:
        halves = areas(region_start, region_sectors)
    except UpdaterError as e:  # a region too small for two areas: one FAT over all of it, as flashed
        return Outcome("kept", None, manifest.build, reason=str(e).removeprefix("boot files: ")), table
    if manifest.size > halves["a"][1] * mbr.SECTOR:
        raise UpdaterError(
            f"boot files: build {manifest.build} is {manifest.size} bytes, a boot area of this card "
            f"holds {halves['a'][1] * mbr.SECTOR}"
        )
    if active == WHOLE:  # a card from before boot areas: area B is the FAT's upper half, if it is free
        busy = fat_upper_half_in_use(update.disk, entry, halves["b"][0] - entry.start)
        if busy:
            return Outcome("kept", None, manifest.build, reason=f"{_OLD_CARD}: {busy}"), table
        update.log(f"boot files: {_MIGRATING}")
    elif holds(update.disk, entry, manifest, progress=update.watchdog.progress):
        return Outcome("up-to-date", active, manifest.build, seconds=time.monotonic() - started), table
    target = "b" if active == WHOLE else next(name for name in AREAS if name != active)
    start, sectors = halves[target]
    update.log(f"boot files: writing build {manifest.build} into boot area {target} (partition 1 boots meanwhile)")
    fetched = write_area(update, path, manifest, start * mbr.SECTOR, sectors * mbr.SECTOR)
    new = switched(table, start, sectors)
    update.disk.write(0, mbr.dump(new))  # the switch: one sector
    update.disk.fsync()
    try:
        update.disk.reread_partitions()
    except UpdaterError as e:  # entry 1 alone moved: the slots' partitions the kernel knows are unchanged
        update.log(f"boot files: {e}")
    write_record(update.disk, BootRecord(start, sectors, manifest.size, manifest.sha256, manifest.build))
    update.log(f"boot files: partition 1 is boot area {target} now, build {manifest.build}")
    return Outcome("switched", target, manifest.build, fetched, time.monotonic() - started), new


_OLD_CARD = (
    "partition 1 fills the whole boot region (a card flashed before boot areas) and its boot files stay "
    "as flashed (write this build's sdcard.img to it to have them kept current)"
)
_MIGRATING = (
    "partition 1 fills the whole boot region (a card flashed before boot areas); no file of its FAT "
    "lies in the upper half, which becomes boot area b"
)


def fat_upper_half_in_use(disk: Disk, entry: mbr.Entry, half: int) -> str | None:
    """None when no cluster of the FAT32 in ``entry`` lies at or past sector ``half`` of it
    (its free clusters are nobody's: writing them leaves every file as it is), else why not.
    mkfs.fat and mcopy fill a fresh FAT from its start, so a flashed card has the room."""
    boot = disk.read(entry.start * mbr.SECTOR, mbr.SECTOR)
    per_sector, per_cluster, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
    fat16_size, total, fat_size, flags = struct.unpack_from("<H", boot, 22)[0], *struct.unpack_from("<IIH", boot, 32)
    if boot[510:512] != b"\x55\xaa" or per_sector != mbr.SECTOR or fat16_size or not fat_size or fats not in (1, 2):
        return "partition 1 does not hold a FAT32 of 512-byte sectors"
    if not per_cluster or per_cluster & (per_cluster - 1) or not 0 < total <= entry.sectors or flags & 0x80:
        return "its FAT32's geometry is not one this updater reads"
    data = reserved + fats * fat_size
    if data >= half:
        return "its FAT tables reach the upper half"
    clusters = (total - data) // per_cluster
    first = (half - data) // per_cluster + 2  # the first cluster that ends past `half`
    if first > clusters + 1:
        return None
    at = entry.start * mbr.SECTOR + reserved * mbr.SECTOR + 4 * first
    table = disk.read(at, 4 * (clusters + 2 - first))
    used = sum(1 for (value,) in struct.iter_unpack("<I", table) if value & 0x0FFFFFFF)
    return f"{used} clusters of its FAT lie in the upper half" if used else None


_NOT_AN_AREA = "partition 1 is neither boot area of the plan's boot partition: its boot files stay as they are"


def holds(disk: Disk, entry: mbr.Entry, manifest: BootManifest, *, progress: Callable[[], None]) -> bool:
    """True when the area entry 1 points at holds ``manifest``'s image: by the record when it
    names this area, else by hashing the area once (and recording what it holds)."""
    record = read_record(disk)
    if record is not None and (record.start, record.sectors) == (entry.start, entry.sectors):
        return record.size == manifest.size and record.sha256 == manifest.sha256
    sha256, _ = install.read_back(disk, entry.start * mbr.SECTOR, manifest.size, progress=progress)
    if sha256 == manifest.sha256:
        write_record(disk, BootRecord(entry.start, entry.sectors, manifest.size, sha256, manifest.build))
        return True
    return False


def write_area(update: _Update, path: str, manifest: BootManifest, offset: int, capacity: int) -> int:
    """Stream the image into the inactive area, verify it as it went and as it reads back;
    returns the stream bytes fetched. Nothing points at the area yet."""
    image = manifest.as_image()
    stream = formats.beside(path, manifest.stream)
    fetched = 0

    def take(source: MasterClient) -> None:  # from one source, verified whole; else the next source's
        nonlocal fetched
        before = source.stream_bytes
        try:
            chunks: Iterable[bytes] = update.watchdog.watch(
                source.stream(stream, manifest.stream_size, on_wait=update.wait_for_stream)
            )
            written = install.write_stream(chunks, update.disk, offset, capacity, image)
        finally:  # a Decision's bytes_fetched counts image bytes; the boot-files report carries these
            fetched += source.stream_bytes - before
            source.stream_bytes = before
        install.verify(written, image)

    update.master.verified(f"GET {stream}", take)
    digests = install.read_back(update.disk, offset, manifest.size, progress=update.watchdog.progress)
    if digests != (manifest.sha256, manifest.crc32):
        raise UpdaterError(f"boot files: read-back of build {manifest.build} differs from what was written")
    return fetched


def region_of(layout: formats.Layout) -> tuple[int, int]:
    """(start, sectors) of the plan's boot partition: the card's boot region."""
    boot = layout.get("boot")
    if boot is None or not isinstance(boot.size_mib, int):
        raise UpdaterError("boot files: the plan's layout has no boot partition of a fixed size")
    return boot.start_mib * SECTORS_PER_MIB, boot.size_mib * SECTORS_PER_MIB


def run(update: _Update, table: mbr.Mbr) -> mbr.Mbr:
    """The plan's boot files, when it names them; never fails the boot (the old area boots).
    Returns the card's table as it is now."""
    plan = update.plan
    if plan is None or plan.boot is None:
        return table
    update.phase = "boot-files"
    update.watchdog.progress()
    try:
        outcome, table = keep_current(update, region_of(plan.layout), table, plan.boot)
    except UpdaterError as e:
        verdict = "refused" if isinstance(e, Refused) else "failed"
        update.log(f"boot files {verdict}: {e}; the card keeps its boot area")
        update.report(Phase.ERROR, error=f"boot-files: {e}")
        return table
    if outcome.action == "up-to-date":  # like a slot that holds its image: said on the console, not reported
        update.log(f"boot files: boot area {outcome.area} holds build {outcome.build}")
        return table
    if outcome.action == "kept":
        update.log(f"boot files: {outcome.reason}")
    if update.identity is not None:
        reports.send(
            update.master,
            reports.make(
                update.identity.node,
                Phase.BOOT_FILES,
                bytes=outcome.bytes,
                seconds=outcome.seconds,
                error=outcome.reason or None,
                output=f"{outcome.action}: build {outcome.build}" + (f", area {outcome.area}" if outcome.area else ""),
            ),
            key=update.node_key,
        )
    return table
