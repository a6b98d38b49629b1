"""bmap files (bmaptool's format 2.0): which blocks of an image hold data, with their
sha256, so `bmaptool copy` writes only those and verifies them as it goes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rackboot.errors import RackbootError

BLOCK = 4096
_ZERO_SUM = "0" * 64


def mapped_ranges(image: Path, block: int = BLOCK) -> list[tuple[int, int]]:
    """Inclusive block ranges that hold data (SEEK_DATA/SEEK_HOLE), merged and sorted."""
    ranges: list[tuple[int, int]] = []
    with open(image, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            first, last = start // block, (end - 1) // block
            if ranges and first <= ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], max(last, ranges[-1][1]))
            else:
                ranges.append((first, last))
            pos = end
    return ranges


def _range_sha256(f: BinaryIO, first: int, last: int, block: int) -> str:
    h = hashlib.sha256()
    f.seek(first * block)
    left = (last - first + 1) * block
    while left:
        chunk = f.read(min(left, 1 << 22))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def render_bmap(image: Path, block: int = BLOCK) -> str:
    size = image.stat().st_size
    ranges = mapped_ranges(image, block)
    with open(image, "rb") as f:
        rows = []
        for first, last in ranges:
            span = f"{first}" if first == last else f"{first}-{last}"
            rows.append(f'        <Range chksum="{_range_sha256(f, first, last, block)}"> {span} </Range>\n')
    mapped = sum(last - first + 1 for first, last in ranges)
    return (
        '<?xml version="1.0" ?>\n'
        "<!-- Block map of a rackboot SD card image: the blocks to write and their sha256.\n"
        "     Flash it with: bmaptool copy sdcard.img /dev/sdX -->\n"
        '<bmap version="2.0">\n'
        f"    <ImageSize> {size} </ImageSize>\n"
        f"    <BlockSize> {block} </BlockSize>\n"
        f"    <BlocksCount> {(size + block - 1) // block} </BlocksCount>\n"
        f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n"
        "    <ChecksumType> sha256 </ChecksumType>\n"
        f"    <BmapFileChecksum> {_ZERO_SUM} </BmapFileChecksum>\n"
        "    <BlockMap>\n" + "".join(rows) + "    </BlockMap>\n"
        "</bmap>\n"
    )


def bmap_text(image: Path, block: int = BLOCK) -> str:
    """The bmap with its own checksum filled in (computed over the text with zeros there)."""
    text = render_bmap(image, block)
    return text.replace(_ZERO_SUM, hashlib.sha256(text.encode()).hexdigest(), 1)


@dataclass(frozen=True)
class Range:
    first: int  # blocks, inclusive
    last: int
    sha256: str


@dataclass(frozen=True)
class BlockMap:
    """A bmap as `rackboot flash` reads it back."""

    image_size: int
    block_size: int
    ranges: tuple[Range, ...]

    @property
    def mapped_bytes(self) -> int:
        return sum(
            min((r.last + 1) * self.block_size, self.image_size) - r.first * self.block_size for r in self.ranges
        )


def read_bmap(path: Path) -> BlockMap:
    """Parse a bmap (format 2.x, sha256) and check its own checksum; errors name the file."""
    import xml.etree.ElementTree as ET

    text = path.read_text(encoding="utf-8")
    try:
        root = ET.fromstring(text)
        if root.tag != "bmap" or not root.get("version", "").startswith("2."):
            raise ValueError(f"not a version 2 bmap (version {root.get('version')!r})")
        if root.findtext("ChecksumType", "").strip() != "sha256":
            raise ValueError("checksum type is not sha256")
        own = root.findtext("BmapFileChecksum", "").strip()
        if hashlib.sha256(text.replace(own, _ZERO_SUM, 1).encode()).hexdigest() != own:
            raise ValueError("its BmapFileChecksum does not match its text (edited or truncated?)")
        ranges = []
        for item in root.iterfind("BlockMap/Range"):
            first, _, last = (item.text or "").strip().partition("-")
            ranges.append(Range(int(first), int(last or first), item.get("chksum", "")))
        block_map = BlockMap(int(root.findtext("ImageSize", "")), int(root.findtext("BlockSize", "")), tuple(ranges))
    except (ET.ParseError, ValueError) as exc:
        raise RackbootError(f"{path}: {exc}") from None
    if block_map.block_size <= 0 or any(
        r.first > r.last or (r.last + 1) * block_map.block_size > block_map.image_size + block_map.block_size - 1
        for r in ranges
    ):
        raise RackbootError(f"{path}: a range lies outside the {block_map.image_size}-byte image")
    return block_map
