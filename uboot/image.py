"""U-Boot legacy images (uImage): a 64-byte big-endian header before the payload.

Written the way `mkimage` 2023.01 writes them, byte for byte, so U-Boot's `source`,
`bootm` and ramdisk loading accept them; mkimage itself is only a test oracle.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from rackboot.errors import RackbootError

MAGIC = 0x27051956
# (field, struct code): the header declared as data; name is a NUL-padded 32-byte string.
HEADER_FIELDS = (
    ("magic", "I"),
    ("hcrc", "I"),
    ("time", "I"),
    ("size", "I"),
    ("load", "I"),
    ("ep", "I"),
    ("dcrc", "I"),
    ("os", "B"),
    ("arch", "B"),
    ("type", "B"),
    ("comp", "B"),
    ("name", "32s"),
)
HEADER = struct.Struct(">" + "".join(code for _, code in HEADER_FIELDS))
NAME_MAX = 32

OS = {"linux": 5}
ARCH = {"arm": 2, "arm64": 22}
TYPES = {"kernel": 2, "ramdisk": 3, "multi": 4, "script": 6}
COMPRESSION = {"none": 0, "gzip": 1, "bzip2": 2, "lzma": 3, "lzo": 4, "lz4": 5, "zstd": 6}


@dataclass(frozen=True)
class Header:
    magic: int
    hcrc: int
    time: int
    size: int
    load: int
    ep: int
    dcrc: int
    os: int
    arch: int
    type: int
    comp: int
    name: bytes

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, f) for f, _ in HEADER_FIELDS))


def _code(table: dict[str, int], what: str, value: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise RackbootError(f"U-Boot image {what} {value!r} is not one of {', '.join(table)}") from None


def multi_payload(files: list[bytes]) -> bytes:
    """The multi-file layout that script images use too: sizes, a zero word, then the
    files, each but the last padded to 4 bytes."""
    table = b"".join(struct.pack(">I", len(f)) for f in files) + b"\0\0\0\0"
    body = b"".join(f + b"\0" * (-len(f) % 4) for f in files[:-1]) + files[-1]
    return table + body


def legacy_image(
    payload: bytes,
    *,
    image_type: str,
    arch: str,
    name: str,
    timestamp: int,
    load: int = 0,
    entry: int = 0,
    compression: str = "none",
    os: str = "linux",
) -> bytes:
    """Header + payload; a ``script`` payload is wrapped in the multi-file table as mkimage does."""
    encoded = name.encode()
    if len(encoded) >= NAME_MAX:
        # mkimage silently truncates; an artefact name that changes is worth refusing instead
        raise RackbootError(f"U-Boot image name {name!r} is longer than {NAME_MAX - 1} bytes")
    if not 0 <= timestamp < 1 << 32:
        raise RackbootError(f"U-Boot image timestamp {timestamp} does not fit 32 bits")
    data = multi_payload([payload]) if image_type == "script" else payload
    header = Header(
        MAGIC,
        0,
        timestamp,
        len(data),
        load,
        entry,
        zlib.crc32(data),
        _code(OS, "os", os),
        _code(ARCH, "arch", arch),
        _code(TYPES, "type", image_type),
        _code(COMPRESSION, "compression", compression),
        encoded.ljust(NAME_MAX, b"\0"),
    )
    packed = header.pack()
    return Header(**{**header.__dict__, "hcrc": zlib.crc32(packed)}).pack() + data


def script_image(text: str, *, arch: str, name: str, timestamp: int) -> bytes:
    return legacy_image(text.encode(), image_type="script", arch=arch, name=name, timestamp=timestamp)


def parse_legacy_image(data: bytes) -> tuple[Header, bytes]:
    """Validate a legacy image (magic, header CRC, size, data CRC) and return its payload."""
    if len(data) < HEADER.size:
        raise RackbootError(f"U-Boot image: {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    header = Header(*HEADER.unpack_from(data))
    if header.magic != MAGIC:
        raise RackbootError(f"U-Boot image: bad magic {header.magic:#010x}")
    blank = Header(**{**header.__dict__, "hcrc": 0}).pack()
    if zlib.crc32(blank) != header.hcrc:
        raise RackbootError("U-Boot image: header CRC mismatch")
    payload = data[HEADER.size : HEADER.size + header.size]
    if len(payload) != header.size:
        raise RackbootError(f"U-Boot image: truncated, header says {header.size} bytes, {len(payload)} present")
    if zlib.crc32(payload) != header.dcrc:
        raise RackbootError("U-Boot image: data CRC mismatch")
    return header, payload
