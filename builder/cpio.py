"""Deterministic cpio "newc" archives, the format the Linux kernel unpacks as initramfs.

Each member is a 110-byte ASCII header (magic + 13 eight-digit hex fields), the path
with its NUL, zero padding to a multiple of 4, then the data, padded to 4 again. The
archive ends with a member named ``TRAILER!!!``.

Archives depend only on the entries and ``mtime``: members sorted by path, owner
root:root, inodes numbered from 1 in archive order, every device field of the source
filesystem zeroed. Device nodes and fifos are plain entries, so nothing needs root.

Directories implied by deeper paths but not listed are added as 0755 directories:
the kernel's unpacker does not create missing parents, so an archive without them
would unpack with files missing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from .errors import RackbootError

MAGIC = "070701"
TRAILER = "TRAILER!!!"
# The header after the magic, in order: field name and width in hex digits.
FIELDS: tuple[tuple[str, int], ...] = (
    ("ino", 8),
    ("mode", 8),
    ("uid", 8),
    ("gid", 8),
    ("nlink", 8),
    ("mtime", 8),
    ("filesize", 8),
    ("devmajor", 8),
    ("devminor", 8),
    ("rdevmajor", 8),
    ("rdevminor", 8),
    ("namesize", 8),
    ("check", 8),
)
HEADER_SIZE = len(MAGIC) + sum(width for _, width in FIELDS)
_HEADER_FORMAT = MAGIC + "".join(f"%0{width}X" for _, width in FIELDS)
_FIELD_MAX = 0xFFFFFFFF
CHUNK = 1 << 20  # file contents are streamed in pieces this big


# --- entries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Directory:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class File:
    path: str
    mode: int
    source: Path | bytes  # a file on disk, read at write time, or the contents


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str  # stored verbatim


@dataclass(frozen=True)
class HardLink:
    """Another name for the ``File`` entry at ``target_path``."""

    path: str
    target_path: str


@dataclass(frozen=True)
class Device:
    path: str
    mode: int
    kind: Literal["c", "b"]
    major: int
    minor: int


@dataclass(frozen=True)
class Fifo:
    path: str
    mode: int = 0o644


Entry = Directory | File | Symlink | HardLink | Device | Fifo


class Sink(Protocol):
    """Where an archive goes: a binary file, or a compressor's input."""

    def write(self, data: bytes, /) -> int: ...


# --- header --------------------------------------------------------------------------


def pack_header(**fields: int) -> bytes:
    """One header; fields not given are 0."""
    values = []
    for name, _ in FIELDS:
        value = fields.pop(name, 0)
        if not 0 <= value <= _FIELD_MAX:
            raise RackbootError(f"cpio header field {name}={value} does not fit in 8 hex digits")
        values.append(value)
    if fields:
        raise TypeError(f"unknown cpio header fields: {sorted(fields)}")
    return (_HEADER_FORMAT % tuple(values)).encode("ascii")


@dataclass(frozen=True)
class Member:
    """A member read back from an archive: header fields, name, data offset in the buffer."""

    name: str
    fields: dict[str, int]
    data_offset: int

    def __getattr__(self, name: str) -> int:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


def read_members(data: bytes) -> list[Member]:
    """Parse a whole uncompressed archive up to and including its trailer."""
    members, pos = [], 0
    while True:
        if data[pos : pos + len(MAGIC)] != MAGIC.encode():
            raise RackbootError(f"cpio: no newc magic at offset {pos}")
        fields, at = {}, pos + len(MAGIC)
        for name, width in FIELDS:
            try:
                fields[name] = int(data[at : at + width], 16)
            except ValueError:
                raise RackbootError(f"cpio: header field {name} at offset {at} is not hex") from None
            at += width
        name = data[at : at + fields["namesize"] - 1].decode("utf-8", "surrogateescape")
        data_offset = _align(at + fields["namesize"])
        members.append(Member(name, fields, data_offset))
        if name == TRAILER:
            return members
        pos = _align(data_offset + fields["filesize"])


def _align(n: int) -> int:
    return (n + 3) & ~3


def _pad(n: int) -> bytes:
    return b"\0" * (-n & 3)


# --- paths and the plan --------------------------------------------------------------


def normalise_path(path: str) -> str:
    """Archive paths are relative with no empty, '.' or '..' components."""
    parts = path.lstrip("/").split("/")
    if not path.strip("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise RackbootError(f"cpio: bad archive path {path!r} (want e.g. 'dev/console')")
    return "/".join(parts)


def _sort_key(path: str) -> tuple[bytes, ...]:
    # Component-wise byte order: parents first, a directory's contents right after it,
    # independent of locale.
    return tuple(os.fsencode(p) for p in path.split("/"))


@dataclass(frozen=True)
class _Planned:
    path: str
    entry: Entry
    ino: int
    nlink: int
    carries_data: bool  # False for all but the last member of a hard-link group


def _plan(entries: Iterable[Entry]) -> list[_Planned]:
    by_path: dict[str, Entry] = {}
    for entry in entries:
        path = normalise_path(entry.path)
        if path in by_path:
            raise RackbootError(f"cpio: duplicate path {path!r} in the archive entries")
        by_path[path] = entry
    for path in list(by_path):
        parent = path.rpartition("/")[0]
        while parent and parent not in by_path:
            by_path[parent] = Directory(parent, 0o755)
            parent = parent.rpartition("/")[0]
        if parent and not isinstance(by_path[parent], Directory):
            raise RackbootError(f"cpio: {path!r} lies under {parent!r}, which is not a directory")

    # Hard-link groups keyed by the File they name.
    groups: dict[str, list[str]] = {}
    for path, entry in by_path.items():
        if isinstance(entry, HardLink):
            target = normalise_path(entry.target_path)
            if not isinstance(by_path.get(target), File):
                raise RackbootError(
                    f"cpio: hard link {path!r} names {entry.target_path!r}, which is not a file in the archive"
                )
            groups.setdefault(target, [target]).append(path)
    group_of = {member: target for target, members in groups.items() for member in members}
    last_of = {target: max(members, key=_sort_key) for target, members in groups.items()}

    subdirs: dict[str, int] = {}
    for path, entry in by_path.items():
        if isinstance(entry, Directory):
            parent = path.rpartition("/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1

    planned: list[_Planned] = []
    inos: dict[str, int] = {}
    for path in sorted(by_path, key=_sort_key):
        entry = by_path[path]
        group = group_of.get(path)
        if group is None:
            ino = len(inos) + 1
            inos[path] = ino
            nlink = 2 + subdirs.get(path, 0) if isinstance(entry, Directory) else 1
            planned.append(_Planned(path, entry, ino, nlink, True))
        else:
            ino = inos.setdefault(group, len(inos) + 1)
            planned.append(_Planned(path, by_path[group], ino, len(groups[group]), path == last_of[group]))
    return planned


# --- writing -------------------------------------------------------------------------


def write_archive(entries: Iterable[Entry], out: Sink, *, mtime: int) -> None:
    """Write ``entries`` as one deterministic newc archive, trailer included, to ``out``."""
    if not 0 <= mtime <= _FIELD_MAX:
        raise RackbootError(f"cpio: mtime {mtime} is outside 0..2**32-1")
    for item in _plan(entries):
        _write_member(item, out, mtime)
    out.write(_member_head(TRAILER, ino=0, mode=0, nlink=1, mtime=0, filesize=0))


def _member_head(name: str, **fields: int) -> bytes:
    raw = os.fsencode(name) + b"\0"
    return pack_header(namesize=len(raw), **fields) + raw + _pad(HEADER_SIZE + len(raw))


def _write_member(item: _Planned, out: Sink, mtime: int) -> None:
    entry = item.entry
    common = dict(ino=item.ino, nlink=item.nlink, mtime=mtime)
    if isinstance(entry, Directory):
        out.write(_member_head(item.path, mode=stat.S_IFDIR | _perm(entry), filesize=0, **common))
    elif isinstance(entry, Symlink):
        target = os.fsencode(entry.target)
        head = _member_head(item.path, mode=stat.S_IFLNK | 0o777, filesize=len(target), **common)
        out.write(head + target + _pad(len(target)))
    elif isinstance(entry, Device):
        kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(entry.kind)
        if kind is None:
            raise RackbootError(f"cpio: device {item.path!r} has kind {entry.kind!r}, want 'c' or 'b'")
        out.write(
            _member_head(
                item.path, mode=kind | _perm(entry), filesize=0, rdevmajor=entry.major, rdevminor=entry.minor, **common
            )
        )
    elif isinstance(entry, Fifo):
        out.write(_member_head(item.path, mode=stat.S_IFIFO | _perm(entry), filesize=0, **common))
    elif isinstance(entry, File):
        mode = stat.S_IFREG | _perm(entry)
        if not item.carries_data:
            out.write(_member_head(item.path, mode=mode, filesize=0, **common))
        else:
            _write_file(item.path, entry.source, mode, common, out)
    else:
        raise RackbootError(f"cpio: {item.path!r}: unknown entry type {type(entry).__name__}")


def _perm(entry: Directory | File | Device | Fifo) -> int:
    if not 0 <= entry.mode <= 0o7777:
        raise RackbootError(f"cpio: {entry.path!r} has mode {entry.mode:#o}; give permission bits only")
    return entry.mode


def _write_file(path: str, source: Path | bytes, mode: int, common: dict[str, int], out: Sink) -> None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        out.write(_member_head(path, mode=mode, filesize=len(data), **common) + data + _pad(len(data)))
        return
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as e:
        raise RackbootError(f"cpio: cannot read {source} (for {path!r}): {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > _FIELD_MAX:
            raise RackbootError(f"cpio: {source} is {size} bytes; newc members stop at 4 GiB")
        head = _member_head(path, mode=mode, filesize=size, **common)
        if size <= CHUNK:  # most files: one read, one write
            data = b"".join(_read_chunks(fd, size))
            changed = len(data) != size
            out.write(head + data + _pad(size))
        else:
            out.write(head)
            written = 0
            for chunk in _read_chunks(fd, size):
                written += len(chunk)
                out.write(chunk)
            changed = written != size
            out.write(_pad(size))
        if changed or os.read(fd, 1):
            raise RackbootError(f"cpio: {source} changed size while it was archived")
    finally:
        os.close(fd)


def _read_chunks(fd: int, size: int) -> Iterator[bytes]:
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(CHUNK, remaining))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


# --- staged trees --------------------------------------------------------------------


def tree_entries(root: Path, prefix: str = "") -> list[Entry]:
    """Entries for everything under ``root`` (not ``root`` itself), at ``prefix`` in the archive.

    Modes are normalised so the result does not depend on umask: directories 0755,
    files 0755 if any execute bit is set else 0644; setuid/setgid/sticky are dropped.
    Symlinks stay symlinks; files sharing an inode become one hard-link group. Mtimes
    and owners are not looked at. Device nodes, sockets and the like are refused:
    describe device nodes as ``Device`` entries instead.
    """
    root = Path(root)
    if not root.is_dir():
        raise RackbootError(f"cpio: staged tree {root} is not a directory")
    base = prefix.strip("/")
    entries: list[Entry] = []
    first_by_inode: dict[tuple[int, int], str] = {}
    for rel, st, full in _walk(root):
        path = f"{base}/{rel}" if base else rel
        if stat.S_ISDIR(st.st_mode):
            entries.append(Directory(path, 0o755))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Symlink(path, os.readlink(full)))
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first_by_inode:
                entries.append(HardLink(path, first_by_inode[key]))
                continue
            if st.st_nlink > 1:
                first_by_inode[key] = path
            entries.append(File(path, 0o755 if st.st_mode & 0o111 else 0o644, Path(full)))
        elif stat.S_ISFIFO(st.st_mode):
            entries.append(Fifo(path, 0o644))
        else:
            raise RackbootError(
                f"cpio: {full} is a device node or socket; "
                f"add device nodes as cpio.Device entries, not files in the tree"
            )
    return entries


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result, str]]:
    """(relative path, lstat, full path) for everything under root, in archive order."""
    stack = [("", str(root))]
    while stack:
        rel_dir, dir_path = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                children = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            raise RackbootError(f"cpio: cannot list {dir_path}: {e.strerror}") from None
        subdirs = []
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            st = child.stat(follow_symlinks=False)
            yield rel, st, child.path
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((rel, child.path))
        stack.extend(reversed(subdirs))
