"""`rackboot publish`: a root filesystem -> a versioned image on the master.

A directory becomes an ext4 image made by `mke2fs -d`; an OS image gives up one of its
partitions as is. Either way the bytes are gzip-compressed and land, with their
manifest, in ``<master>/images/<image>/<version>/`` (layout: notes/formats.md).

Determinism: the same tree gives the same bytes. mke2fs gets a UUID and hash seed
derived from image+version, E2FSPROGS_FAKE_TIME for its own clock, and populates in
sorted name order; it copies each inode's times from the source (ctime cannot be set
by anyone), so a debugfs pass then stamps every inode with source_date_epoch.

Atomicity: everything is built in a hidden work directory beside the versions and
renamed into place; latest.json is replaced, never rewritten. A publication holds an
exclusive lock on the image's directory, under which it sweeps the work directories and
temporaries that a killed publication left.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import uuid
import zlib
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Optional, Sequence, Union

from rackboot import modules as kernel_modules
from . import signing
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats, mbr
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import HOOK_TIMEOUT, Hook, Latest, Manifest, Plan

PathLike = Union[str, Path]

STREAM_NAME = "rootfs.ext4.gz"
CHUNK = 1 << 20
MIB = 1 << 20
BLOCK = 4096
INODE_SIZE = 256
# Fixed namespace so image+version always maps to the same filesystem UUID and hash seed.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rackboot.invalid/ext4")
# The names the documents accept are also the names we create files under.
_IMAGE_RE = formats._IMAGE_RE
_NODE_RE = formats._NODE_RE
_MODULE_DIRS = ("lib/modules", "usr/lib/modules")
MARK_GOOD = "rackboot-mark-good"
MARK_GOOD_SOURCE = "rackboot-mark-good.sh"
MARK_GOOD_UNIT = "rackboot-mark-good.service"


# --- public API ------------------------------------------------------------------------

def publish_directory(src: PathLike, master: PathLike, *, image: str, version: Optional[int] = None,
                      label: str = "", size_mib: Optional[int] = None,
                      kernel_release: Optional[str] = None, modules_from: Optional[PathLike] = None,
                      modules: Sequence[str] = (), source_date_epoch: int = 0, force: bool = False,
                      key: Optional[Path] = None, hooks: Mapping[str, PathLike] = {},
                      hook_timeout: int = HOOK_TIMEOUT) -> Manifest:
    """Make an ext4 image of directory `src` and publish it; returns its manifest.

    version None = latest + 1. With `kernel_release`, the root must carry
    lib/modules/<kernel_release>; `modules_from` (an unpacked kernel package) fills it
    in on a staged copy: the whole module tree, or with `modules` just those names and
    their dependencies. The staged copy also gets /usr/sbin/rackboot-mark-good, which
    the booted system runs to confirm its slot. `force` allows a version lower than latest.
    `hooks` maps pre-install/post-install to scripts the worker runs as root; they need a
    `key`, since workers run only signed hooks.
    """
    src = Path(src)
    if not src.is_dir():
        raise RackbootError(f"root filesystem {src} is not a directory")
    with _Publication(Path(master), image, version, force, key, hooks, hook_timeout) as pub:
        if kernel_release and not _has_modules(src, kernel_release) and modules_from is None:
            raise RackbootError(
                f"root filesystem {src} has no modules for kernel {kernel_release}; "
                f"pass --modules-from or add lib/modules/{kernel_release}")
        root = _stage(src, pub.work / "root")
        if kernel_release and not _has_modules(src, kernel_release):
            _add_modules(root, src, Path(modules_from), kernel_release, modules)
        fs = pub.work / "rootfs.ext4"
        make_ext4(root, fs, uuid_seed=f"{image}/{pub.version}", size_mib=size_mib,
                  source_date_epoch=source_date_epoch)
        with open(fs, "rb") as f:
            return pub.finish(f, os.path.getsize(fs), label=label, created=source_date_epoch,
                              kernel_release=kernel_release)


def publish_image(img: PathLike, partition: Union[int, str], master: PathLike, *, image: str,
                  version: Optional[int] = None, label: str = "",
                  kernel_release: Optional[str] = None, source_date_epoch: int = 0,
                  force: bool = False, key: Optional[Path] = None, hooks: Mapping[str, PathLike] = {},
                  hook_timeout: int = HOOK_TIMEOUT) -> Manifest:
    """Publish the bytes of one ext4 partition of OS image `img` (MBR) as they are.

    `partition` is a number (1-4, or "2"), a filesystem label ("rootfs") or an MBR
    type ("type:83", first match).
    """
    img = Path(img)
    if not img.is_file():
        raise RackbootError(f"OS image {img} does not exist")
    part = find_partition(img, partition)
    where = f"partition {part.number} of {img}"
    if not _ext4_magic(img, part.start):
        raise RackbootError(f"{where} is not an ext4 filesystem")
    if kernel_release and not _image_has_modules(img, part.start, kernel_release):
        raise RackbootError(f"{where} has no modules for kernel {kernel_release} "
                            f"(no /lib/modules/{kernel_release}); add them to the OS image")
    with _Publication(Path(master), image, version, force, key, hooks, hook_timeout) as pub, \
            open(img, "rb") as f:
        f.seek(part.start)
        return pub.finish(f, part.size, label=label, created=source_date_epoch,
                          kernel_release=kernel_release)


def write_plan(master: PathLike, node_id: str, plan: Plan, key: Optional[Path] = None) -> Path:
    """Write plans/<node_id>.json ("default" for every node without its own), and with a
    key its .sig first; each file is replaced atomically."""
    if node_id != "default" and not _NODE_RE.fullmatch(node_id):
        raise RackbootError(f"node id {node_id!r} is not valid (MAC with dashes, or 'default')")
    path = Path(master) / "plans" / f"{node_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_dir(path.parent)
    try:
        sweep(path.parent, _TMP_RE)
        if key:
            _write_atomic(path.with_name(path.name + ".sig"), signing.sign(key, formats.dump(plan)))
        _write_atomic(path, formats.dump(plan))
    finally:
        os.close(lock)
    return path


def latest(master: PathLike, image: str) -> Optional[Latest]:
    """The image's latest.json, or None when nothing is published yet."""
    path = Path(master) / "images" / image / "latest.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return formats.parse_latest(data)
    except UpdaterError as e:
        raise RackbootError(f"{path}: {e}") from None


# --- the ext4 image --------------------------------------------------------------------

def make_ext4(root: Path, out: Path, *, uuid_seed: str, size_mib: Optional[int],
              source_date_epoch: int) -> None:
    """`mke2fs -d root` into file `out`, reproducibly (see the module docstring)."""
    usage = tree_usage(root)
    if size_mib is None:
        size_mib = fitted_size_mib(usage)
    inodes = usage.inodes + usage.inodes // 4 + 64  # room for the worker's own files
    env = _fake_time_env(source_date_epoch)
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE),
           "-N", str(inodes), "-m", "0",
           "-U", str(uuid.uuid5(_UUID_NAMESPACE, uuid_seed)),
           "-E", f"root_owner=0:0,hash_seed={uuid.uuid5(_UUID_NAMESPACE, uuid_seed + '/hash')}",
           "-d", str(root), str(out), f"{size_mib}M"]
    _run(cmd, env, f"mke2fs could not make a {size_mib} MiB ext4 filesystem from {root}")
    _stamp_times(root, out, source_date_epoch, env)


@dataclass(frozen=True)
class TreeUsage:
    bytes: int   # file data and directories, rounded up to blocks
    inodes: int


def tree_usage(root: Path) -> TreeUsage:
    """What `root` needs on ext4: block-rounded data and the inode count."""
    used, inodes, seen = BLOCK, 1, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue  # a hard link costs only its directory entry
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            used += -(-max(st.st_size, 1) // BLOCK) * BLOCK
    return TreeUsage(used, inodes)


def fitted_size_mib(usage: TreeUsage) -> int:
    """Content * 1.3, plus inode tables, journal and slack, in whole MiB."""
    inode_tables = (usage.inodes + usage.inodes // 4 + 64) * INODE_SIZE
    base = usage.bytes * 1.3 + inode_tables
    journal = 4 * MIB if base < 256 * MIB else 16 * MIB if base < 2048 * MIB else 64 * MIB
    return math.ceil((base + journal + 8 * MIB) / MIB)


def _stamp_times(root: Path, fs: Path, epoch: int, env: dict) -> None:
    """Set every inode's times to `epoch` with one debugfs run."""
    lines = []
    for rel in ["/", "/lost+found", *("/" + p for p in _tree_paths(root))]:
        if "\n" in rel:
            raise RackbootError(f"{root}: file name {rel!r} contains a newline; it cannot be published")
        quoted = '"' + rel.replace('"', '""') + '"'  # debugfs doubles quotes inside quotes
        lines += [f"sif {quoted} {field} {epoch}" for field in ("atime", "mtime", "ctime", "crtime")]
    script = fs.with_name(fs.name + ".debugfs")
    script.write_text("\n".join(lines) + "\n")
    try:
        proc = subprocess.run(["debugfs", "-w", "-f", str(script), str(fs)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        script.unlink()
    problems = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("debugfs ")]
    if proc.returncode != 0 or problems:
        raise RackbootError(f"debugfs could not set times in {fs}: {(problems or ['exit status'])[0]}")


def _tree_paths(root: Path) -> Iterator[str]:
    """Every inode below ``root``: mke2fs -d makes sockets, fifos and devices too."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            yield name if rel == "." else f"{rel}/{name}"


def _fake_time_env(epoch: int) -> dict:
    # E2FSPROGS_FAKE_TIME = 0 means "not set" to e2fsprogs; 1 s past the epoch is close enough.
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch or 1), "LC_ALL": "C"}


# --- kernel modules ---------------------------------------------------------------------

def _has_modules(root: Path, kernel_release: str) -> bool:
    return any((root / d / kernel_release).is_dir() for d in _MODULE_DIRS)


def _stage(src: Path, staged: Path) -> Path:
    """A copy of `src` (owners, modes, links kept) with rackboot-mark-good added, and on
    a systemd root its unit, enabled."""
    staged.mkdir()
    _run(["cp", "-a", f"{src}/.", str(staged)], None, f"could not copy {src} to {staged}")
    sbin = staged / "usr/sbin"
    if any(p.is_symlink() for p in (staged / "usr", sbin)):
        raise RackbootError(f"root filesystem {src}: {sbin.relative_to(staged)} is a symlink")
    sbin.mkdir(parents=True, exist_ok=True)
    script = resources.files("rackboot.initramfs").joinpath(MARK_GOOD_SOURCE).read_bytes()
    (sbin / MARK_GOOD).write_bytes(script)
    (sbin / MARK_GOOD).chmod(0o755)
    units = staged / "usr/lib/systemd/system"
    if units.is_dir() and not units.is_symlink():
        unit = resources.files("rackboot.initramfs").joinpath(MARK_GOOD_UNIT).read_bytes()
        (units / MARK_GOOD_UNIT).write_bytes(unit)
        wants = staged / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / MARK_GOOD_UNIT).unlink(missing_ok=True)
        (wants / MARK_GOOD_UNIT).symlink_to(f"/usr/lib/systemd/system/{MARK_GOOD_UNIT}")
    return staged


def _add_modules(staged: Path, src: Path, modules_from: Path, kernel_release: str,
                 wanted: Sequence[str] = ()) -> None:
    """The kernel's modules (all, or ``wanted`` and their dependencies) added to ``staged``."""
    found = [modules_from / d / kernel_release for d in _MODULE_DIRS
             if (modules_from / d / kernel_release).is_dir()]
    if not found:
        raise RackbootError(f"--modules-from {modules_from} has no lib/modules/{kernel_release}")
    # usrmerged roots have lib -> usr/lib; never write through a link that may point off-tree.
    dest = staged / ("usr/lib/modules" if (staged / "lib").is_symlink() else "lib/modules")
    if any(p.is_symlink() for p in (dest, dest.parent)):
        raise RackbootError(f"root filesystem {src}: {dest.relative_to(staged)} is a symlink")
    dest.mkdir(parents=True, exist_ok=True)
    if wanted:
        closure = kernel_modules.module_closure(list(wanted), modules_from, kernel_release)
        kernel_modules.copy_subset(closure, modules_from, dest / kernel_release)
    else:
        _run(["cp", "-a", str(found[0]), str(dest)], None, f"could not copy modules from {found[0]}")
        if not (dest / kernel_release / "modules.dep.bin").is_file():
            kernel_modules.depmod(dest / kernel_release)


def _image_has_modules(img: Path, offset: int, kernel_release: str) -> bool:
    """Ask debugfs (through the e2fsprogs `?offset=` io option) without mounting anything."""
    for d in _MODULE_DIRS:
        proc = subprocess.run(["debugfs", "-R", f"ls -p /{d}", f"{img}?offset={offset}"],
                              capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        # `ls -p` lines: /inode/mode/uid/gid/name/size/
        if kernel_release in {line.split("/")[5] for line in proc.stdout.splitlines()
                              if line.count("/") >= 6}:
            return True
    return False


# --- partitions of an OS image ------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    number: int
    type: str   # two lowercase hex digits
    start: int  # bytes
    size: int   # bytes


def read_mbr(img: Path) -> list[Part]:
    """The used primary entries of `img`'s MBR."""
    with open(img, "rb") as f:
        sector = f.read(mbr.SECTOR)
    try:
        table = mbr.parse(sector)
    except UpdaterError as e:
        raise RackbootError(f"OS image {img}: {e}") from None
    return [Part(e.number, f"{e.type:02x}", e.start * mbr.SECTOR, e.sectors * mbr.SECTOR)
            for e in table.entries]


def find_partition(img: Path, which: Union[int, str]) -> Part:
    parts = read_mbr(img)
    size = img.stat().st_size
    spec = str(which).strip()
    if spec.isdigit():
        hits = [p for p in parts if p.number == int(spec)]
    elif spec.lower().startswith("type:"):
        hits = [p for p in parts if p.type == spec[5:].lower().removeprefix("0x").zfill(2)][:1]
    else:
        hits = [p for p in parts if _fs_label(img, p) == spec][:1]
    if not hits:
        have = ", ".join(f"{p.number} (type {p.type}, label {_fs_label(img, p) or '-'})"
                         for p in parts) or "none"
        raise RackbootError(f"OS image {img} has no partition {spec!r}; it has: {have}")
    part = hits[0]
    if part.start + part.size > size:
        raise RackbootError(f"partition {part.number} of {img} runs past the end of the file")
    return part


def _fs_label(img: Path, part: Part) -> str:
    """ext4 volume name or FAT volume label of a partition, '' if neither."""
    with open(img, "rb") as f:
        f.seek(part.start)
        head = f.read(2048)
    if _ext4_magic_in(head):
        return head[1024 + 120: 1024 + 136].split(b"\0")[0].decode("utf-8", "replace")
    if head[510:512] == b"\x55\xaa":
        fat32 = head[82:87] == b"FAT32"
        raw = head[71:82] if fat32 else head[43:54]
        return raw.decode("ascii", "replace").strip()
    return ""


def _ext4_magic_in(head: bytes) -> bool:
    return len(head) >= 1082 and head[1080:1082] == b"\x53\xef"


def _ext4_magic(img: Path, offset: int) -> bool:
    with open(img, "rb") as f:
        f.seek(offset)
        return _ext4_magic_in(f.read(2048))


# --- the publication: version choice, work dir, stream, manifest ------------------------

class _Publication:
    """One version being published: picks the number, owns the work dir, commits by rename."""

    def __init__(self, master: Path, image: str, version: Optional[int], force: bool,
                 key: Optional[Path] = None, hooks: Mapping[str, PathLike] = {},
                 hook_timeout: int = HOOK_TIMEOUT):
        self.key = key
        self.hooks = read_hooks(hooks, hook_timeout, signed=key is not None)
        if not _IMAGE_RE.fullmatch(image):
            raise RackbootError(f"image name {image!r} is not valid ([a-z0-9][a-z0-9._-]*)")
        self.master, self.image = master, image
        self.dir = master / "images" / image
        self.asked, self.force = version, force
        self._choose_version()  # refuse a bad version before creating anything
        self.lock: Optional[int] = None

    def _choose_version(self) -> None:
        current = latest(self.master, self.image)
        newest = max([current.version if current else 0, *_published_versions(self.dir)])
        version = newest + 1 if self.asked is None else self.asked
        if version < 1:
            raise RackbootError(f"image {self.image}: version must be >= 1, got {version}")
        if (self.dir / str(version)).exists():
            raise RackbootError(f"image {self.image} version {version} is already published in {self.dir}")
        if version < newest and not self.force:
            raise RackbootError(f"image {self.image}: version {version} is lower than the latest ({newest}); "
                                "pass force=True to publish it anyway")
        self.version, self.newest = version, newest

    def __enter__(self) -> "_Publication":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = _lock_dir(self.dir)
        try:
            sweep(self.dir, _PUBLICATION_RE)
            self._choose_version()  # again: another publication may have taken it meanwhile
            self.work = Path(tempfile.mkdtemp(prefix=f".publish-{self.version}-", dir=self.dir))
        except BaseException:
            os.close(self.lock)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            shutil.rmtree(self.work, ignore_errors=True)
        finally:
            os.close(self.lock)  # closing drops the flock

    def finish(self, data: BinaryIO, size: int, *, label: str, created: int,
               kernel_release: Optional[str]) -> Manifest:
        out = self.work / "out"
        out.mkdir()
        digests = compress_stream(data, size, out / STREAM_NAME)
        for hook, script in self.hooks:
            _write_durable(out / hook.file, script)
        manifest = Manifest(image=self.image, version=self.version, label=label, created=created,
                            fstype="ext4", compression="gzip", stream=STREAM_NAME,
                            kernel_release=kernel_release, hooks=tuple(h for h, _ in self.hooks), **digests)
        _write_durable(out / "manifest.json", formats.dump(manifest))
        if self.key:
            _write_durable(out / "manifest.json.sig", signing.sign(self.key, formats.dump(manifest)))
        _fsync_dir(out)
        final = self.dir / str(self.version)
        try:
            os.rename(out, final)
        except OSError:
            raise RackbootError(f"image {self.image} version {self.version} appeared in {self.dir} "
                                "while publishing; not overwritten") from None
        _fsync_dir(self.dir)
        if self.version >= self.newest:  # a forced older version does not move latest back
            path = f"/images/{self.image}/{self.version}/manifest.json"
            _write_atomic(self.dir / "latest.json",
                          formats.dump(Latest(image=self.image, version=self.version, manifest=path)))
        return manifest


_TMP_RE = re.compile(r"\..+\.\d+\.tmp")  # _write_atomic's temporaries
_PUBLICATION_RE = re.compile(rf"\.publish-\d+-.+|{_TMP_RE.pattern}")  # and a publication's work directory


def _lock_dir(path: Path) -> int:
    """An exclusive flock on the directory itself (no lock file among what the master
    serves); closing the returned descriptor releases it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep(directory: Path, leftovers: re.Pattern) -> None:
    """Remove what a killed publish or plan left in ``directory`` (a publication's work
    directory is as big as the image). Only under the directory's lock."""
    for p in directory.iterdir():
        if leftovers.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def read_hooks(hooks: Mapping[str, PathLike], timeout: int, *, signed: bool) -> list[tuple[Hook, bytes]]:
    """Each hook script with the manifest entry that pins it; refused unless it can be signed."""
    if hooks and not signed:
        raise RackbootError("hooks need the master's key ([master] key): workers run only signed hooks")
    if not 1 <= timeout <= formats.MAX_HOOK_TIMEOUT:
        raise RackbootError(f"hook timeout {timeout} s is not between 1 and {formats.MAX_HOOK_TIMEOUT}")
    out = []
    for name, path in sorted(hooks.items()):
        if name not in formats.HOOKS:
            raise RackbootError(f"hook {name!r} is not one of {', '.join(formats.HOOKS)}")
        try:
            script = Path(path).read_bytes()
        except OSError as e:
            raise RackbootError(f"hook {name}: cannot read {path}: {e.strerror}") from None
        if not 0 < len(script) <= formats.MAX_HOOK_BYTES:
            raise RackbootError(f"hook {name}: {path} is {len(script)} bytes; a hook has 1 to "
                                f"{formats.MAX_HOOK_BYTES}")
        hook = Hook(name=name, file=f"{name}.sh", size=len(script),
                    sha256=hashlib.sha256(script).hexdigest(), timeout=timeout)
        out.append((hook, script))
    return out


def _published_versions(image_dir: Path) -> list[int]:
    if not image_dir.is_dir():
        return []
    return [int(p.name) for p in image_dir.iterdir() if p.name.isdigit() and p.is_dir()]


def compress_stream(data: BinaryIO, size: int, out: Path) -> dict:
    """gzip `size` bytes of `data` into `out`; the manifest's sizes and digests of both sides."""
    raw_sha, crc, done = hashlib.sha256(), 0, 0
    with open(out, "wb") as f:
        hashing = _HashingWriter(f)
        # mtime=0 and no file name in the header: the stream depends only on the bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=6, mtime=0) as gz:
            while done < size:
                chunk = data.read(min(CHUNK, size - done))
                if not chunk:
                    raise RackbootError(f"{getattr(data, 'name', 'input')} ended after {done} of {size} bytes")
                raw_sha.update(chunk)
                crc = zlib.crc32(chunk, crc)
                gz.write(chunk)
                done += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": raw_sha.hexdigest(), "crc32": f"{crc:08x}",
            "stream_size": hashing.count, "stream_sha256": hashing.sha.hexdigest()}


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.count = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.count += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


# --- small helpers --------------------------------------------------------------------

def _run(cmd: list[str], env: Optional[dict], what: str) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
        raise RackbootError(f"{what}: {lines[-1] if lines else f'exit status {proc.returncode}'}")


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
