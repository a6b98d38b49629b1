"""The file manifest: every inode of a published root, one line each (notes/formats.md).

rsync carries no signature, so what an rsync install put into a slot is trusted only
after the slot's tree matches this list, whose sha256 the signed manifest carries. The
master makes it with ``scan`` of the tree it publishes, the worker runs the same ``scan``
over the slot it filled and compares: one code path, so both sides agree on every field.

    rackboot-files 1
    <type> <mode> <uid> <gid> <size> <sha256|-> <major:minor|-> <path> [<target>]

type: f file, h hard link (target: the first path of its inode, in sort order), d
directory, l symlink (target: the link's text), c/b character/block device, p fifo,
s socket. mode: the permission bits in octal (0755, 4755). size: a file's bytes, a
symlink's target length, else 0. Paths are relative to the root ("." is the root),
bytes sorted, each byte outside ``!``..``~`` (and ``%`` itself) written %XX.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import UpdaterError
from .formats import MAX_FILE_LIST as MAX_BYTES  # a root of ~500k inodes fits; anything bigger is hostile

MAGIC = b"rackboot-files 1\n"
GZIP_MAGIC = b"\x1f\x8b"
MAX_ID = (1 << 32) - 1
TYPES = "fhdlcbps"
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_MODE = re.compile(rb"[0-7]{4}")
_INT = re.compile(rb"0|[1-9][0-9]{0,19}")
_RDEV = re.compile(rb"(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9})")
_PLAIN = frozenset(range(0x21, 0x7F)) - {ord("%")}
_ESCAPE = re.compile(rb"%([0-9A-F]{2})")
_READ = 1 << 20


@dataclass(frozen=True)
class Entry:
    path: bytes  # relative, b"." for the root
    type: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str | None = None  # files and hard links
    rdev: tuple[int, int] | None = None  # devices
    target: bytes | None = None  # symlinks and hard links

    def line(self) -> bytes:
        rdev = b"%d:%d" % self.rdev if self.rdev else b"-"
        fields = [
            self.type.encode(),
            b"%04o" % self.mode,
            b"%d" % self.uid,
            b"%d" % self.gid,
            b"%d" % self.size,
            (self.sha256 or "-").encode(),
            rdev,
            quote(self.path),
        ]
        if self.target is not None:
            fields.append(quote(self.target))
        return b" ".join(fields) + b"\n"

    def shown(self) -> str:
        """The path as a console line may show it (escaped, never raw bytes)."""
        return "/" + quote(self.path).decode() if self.path != b"." else "/"


def quote(name: bytes) -> bytes:
    return b"".join(bytes([c]) if c in _PLAIN else b"%%%02X" % c for c in name)


def unquote(text: bytes) -> bytes:
    """quote's inverse for its own output only: one spelling per name."""
    name = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text)
    if quote(name) != text:
        raise ValueError(f"{text[:80]!r} is not a name as quote writes it (%XX for bytes outside ! to ~, and %)")
    return name


def dump(entries: list[Entry]) -> bytes:
    return MAGIC + b"".join(e.line() for e in entries)


def load(data: bytes) -> list[Entry]:
    """``parse`` of the file as the master serves it: gzip (publish writes it so: a root's
    list is ~100 bytes a file, a quarter of that compressed), or plain."""
    if data[:2] != GZIP_MAGIC:
        return parse(data)
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        plain = inflate.decompress(data, MAX_BYTES + 1)
    except zlib.error as e:
        raise UpdaterError(f"file manifest: not valid gzip: {e}") from None
    if len(plain) > MAX_BYTES:
        raise UpdaterError(f"file manifest: inflates to more than the {MAX_BYTES} bytes allowed")
    if not inflate.eof or inflate.unused_data:
        raise UpdaterError("file manifest: the gzip stream is truncated or followed by other bytes")
    return parse(plain)


def parse(data: bytes) -> list[Entry]:
    """Untrusted bytes -> entries, sorted, every parent a directory listed before its
    children, every hard link naming an earlier file; only UpdaterError escapes."""
    if not isinstance(data, (bytes, bytearray)):
        raise UpdaterError(f"file manifest: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_BYTES:
        raise UpdaterError(f"file manifest: {len(data)} bytes is larger than the {MAX_BYTES} allowed")
    if not data.startswith(MAGIC):
        raise UpdaterError("file manifest: does not start with 'rackboot-files 1'")
    if not data.endswith(b"\n"):
        raise UpdaterError("file manifest: does not end with a newline")
    entries: list[Entry] = []
    dirs: set[bytes] = set()
    files: dict[bytes, Entry] = {}
    for number, raw in enumerate(bytes(data[len(MAGIC) : -1]).split(b"\n") if len(data) > len(MAGIC) else [], 2):
        try:
            entry = _entry(raw)
        except ValueError as e:
            raise UpdaterError(f"file manifest: line {number}: {e}") from None
        where = f"file manifest: line {number}: {entry.shown()}"
        if not entries:
            if entry.path != b"." or entry.type != "d":
                raise UpdaterError(f"{where}: the first entry must be the root directory '.'")
        elif entry.path == b"." or (len(entries) > 1 and entry.path <= entries[-1].path):
            raise UpdaterError(f"{where}: not after {entries[-1].shown()} (paths are sorted and unique)")
        elif (os.path.dirname(entry.path) or b".") not in dirs:
            raise UpdaterError(f"{where}: its directory is not listed before it")
        if entry.type == "d":
            dirs.add(entry.path)
        elif entry.type == "f":
            files[entry.path] = entry
        elif entry.type == "h":
            first = files.get(entry.target or b"")
            if first is None or (first.mode, first.uid, first.gid, first.size, first.sha256) != (
                entry.mode,
                entry.uid,
                entry.gid,
                entry.size,
                entry.sha256,
            ):
                raise UpdaterError(f"{where}: a hard link must name an earlier file with the same attributes")
        entries.append(entry)
    if not entries:
        raise UpdaterError("file manifest: the root directory '.' is not listed")
    return entries


def _entry(raw: bytes) -> Entry:
    fields = raw.split(b" ")
    if len(fields) not in (8, 9):
        raise ValueError(f"expected 8 or 9 fields, got {len(fields)}")
    kind, mode, uid, gid, size, digest, rdev, path = (f for f in fields[:8])
    if len(kind) != 1 or kind.decode("latin-1") not in TYPES:
        raise ValueError(f"type {kind[:8]!r} is not one of {', '.join(TYPES)}")
    t = kind.decode()
    if not _MODE.fullmatch(mode):
        raise ValueError(f"mode {mode[:12]!r} is not 4 octal digits")
    ids = []
    for key, value in (("uid", uid), ("gid", gid), ("size", size)):
        if not _INT.fullmatch(value):
            raise ValueError(f"{key} {value[:24]!r} is not a whole number")
        ids.append(int(value))
    if ids[0] > MAX_ID or ids[1] > MAX_ID:
        raise ValueError("uid or gid is above 2^32-1")
    has_target = t in "lh"
    if (len(fields) == 9) != has_target:
        raise ValueError(f"a target is given {'only ' if not has_target else ''}for symlinks and hard links")
    if (digest != b"-") != (t in "fh") or (t in "fh" and not _HEX64.fullmatch(digest)):
        raise ValueError("sha256 is 64 lowercase hex digits for files and hard links, '-' otherwise")
    if (rdev != b"-") != (t in "cb") or (t in "cb" and not _RDEV.fullmatch(rdev)):
        raise ValueError("major:minor is given for devices only")
    if t not in "fhl" and ids[2] != 0:
        raise ValueError(f"size of a {t} entry must be 0")
    name = unquote(path)
    if name != b"." and (
        not name or name.startswith(b"/") or any(p in (b"", b".", b"..") for p in name.split(b"/")) or b"\0" in name
    ):
        raise ValueError(f"path {path[:80]!r} is not a relative path without '.', '..' or empty parts")
    target = unquote(fields[8]) if has_target else None
    if target is not None and (not target or b"\0" in target):
        raise ValueError("empty target or NUL in it")
    if t == "l" and target is not None and len(target) != ids[2]:
        raise ValueError("a symlink's size is its target's length")
    major_minor = None
    if t in "cb":
        major, minor = rdev.split(b":")
        major_minor = (int(major), int(minor))
    return Entry(
        name,
        t,
        int(mode, 8),
        ids[0],
        ids[1],
        ids[2],
        digest.decode() if t in "fh" else None,
        major_minor,
        target,
    )


# --- scanning a tree ------------------------------------------------------------------


def scan(
    root: str | bytes | os.PathLike[str],
    *,
    skip: frozenset[bytes] = frozenset(),
    progress: Callable[[], None] = lambda: None,
) -> list[Entry]:
    """Every inode under ``root`` (not following links), in manifest order; ``skip``:
    top-level names left out (the worker's own lost+found)."""
    base = os.fsencode(root)
    if not stat.S_ISDIR(os.lstat(base).st_mode):
        raise UpdaterError(f"file manifest: {os.fsdecode(base)} is not a directory")
    found = [(b".", os.lstat(base)), *_walk(base, b"", skip)]
    found.sort(key=lambda item: (item[0] != b".", item[0]))  # a-b sorts before a/b: not walk order
    first: dict[tuple[int, int], bytes] = {}  # inode -> its first path in manifest order
    out = []
    for path, st in found:
        target = None
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            target = first.setdefault((st.st_dev, st.st_ino), path)
        out.append(_entry_of(base, path, st, None if target == path else target, progress))
    return out


def _walk(base: bytes, rel: bytes, skip: frozenset[bytes]) -> Iterator[tuple[bytes, os.stat_result]]:
    for name in os.listdir(os.path.join(base, rel) if rel else base):
        if not rel and name in skip:
            continue
        path = rel + b"/" + name if rel else name
        st = os.lstat(os.path.join(base, path))
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(base, path, skip)


_KINDS = (("d", stat.S_ISDIR), ("c", stat.S_ISCHR), ("b", stat.S_ISBLK), ("p", stat.S_ISFIFO), ("s", stat.S_ISSOCK))


def _entry_of(base: bytes, path: bytes, st: os.stat_result, link: bytes | None, progress: Callable[[], None]) -> Entry:
    """``link``: the earlier path of a hard-linked file's inode (then it is an h entry)."""
    mode, full = st.st_mode, os.path.join(base, path)
    perms = stat.S_IMODE(mode)
    if stat.S_ISREG(mode):
        digest = _sha256(full, progress)
        return Entry(path, "h" if link else "f", perms, st.st_uid, st.st_gid, st.st_size, digest, target=link)
    if stat.S_ISLNK(mode):
        target = os.readlink(full)
        return Entry(path, "l", perms, st.st_uid, st.st_gid, len(target), target=target)
    kind = next((t for t, test in _KINDS if test(mode)), None)
    if kind is None:
        raise UpdaterError(f"file manifest: {os.fsdecode(full)}: not a file, directory, link, device, fifo or socket")
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in "cb" else None
    return Entry(path, kind, perms, st.st_uid, st.st_gid, rdev=rdev)


def _sha256(path: bytes, progress: Callable[[], None]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
            progress()
    return h.hexdigest()


# --- comparing ---------------------------------------------------------------------------


_COMPARED = ("type", "mode", "uid", "gid", "size", "sha256", "rdev", "target")


def difference(expected: list[Entry], found: list[Entry]) -> str | None:
    """The first way ``found`` (a slot's tree) differs from ``expected`` (the signed list),
    as one line; None when they agree in every field."""
    have = {e.path: e for e in found}
    for want in expected:
        got = have.pop(want.path, None)
        if got is None:
            return f"{want.shown()} is missing"
        if got != want:
            key = next(k for k in _COMPARED if getattr(got, k) != getattr(want, k))
            return (
                f"{want.shown()}: {key} is {_show(key, getattr(got, key))}, "
                f"the signed file manifest says {_show(key, getattr(want, key))}"
            )
    if have:
        extra = min(have)
        return f"{have[extra].shown()} is not in the signed file manifest"
    return None


def _show(field: str, value: object) -> str:
    if isinstance(value, bytes):
        return quote(value).decode()
    if field == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if field == "sha256" and isinstance(value, str):
        return value[:16] + "..."
    return str(value)
