"""rsync mode: a blank slot formatted here, filled by rsync from the master's daemon, and
trusted only once its tree matches the signed file manifest.

rsync carries no signature and no encryption. The signed manifest pins the file
manifest's size and sha256 (formats.FileList); that list pins every inode's type, mode,
owner, size, sha256, link target and device numbers. So the steps are: fetch and check
the list before a byte of the slot is touched, mke2fs, mount, rsync (--delete, numeric
ids, hard links, xattrs, devices), then scan the slot with the very code the master
listed its tree with and compare. Any difference, a failed rsync or a failed unmount
raises, and the caller leaves the slot uncommitted (it is marked writing before the
format, so a power cut anywhere in here leaves it so too, and the good slot boots).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import filemanifest
from .errors import Refused, UpdaterError
from .fetch import MasterClient
from .formats import FileList, Manifest, beside
from .sources import Sources

MKE2FS = "/sbin/mke2fs"  # by path: busybox's applet of that name makes only ext2
RUN_DIR = "/run/rackboot"  # a tmpfs on the worker
LOST_FOUND = b"lost+found"  # mke2fs makes it here; the master's tree need not have it
ATTEMPTS = 3  # rsync runs resume (it skips what already arrived), so a dropped link costs little
RETRY_WAIT = 2.0  # seconds before the next run, doubled each time
IO_TIMEOUT = 30  # rsync --timeout: seconds without I/O before rsync gives up by itself
CONNECT_TIMEOUT = 15
RETRYABLE = {5, 10, 12, 23, 24, 30, 35}  # rsync's exit codes for a start, socket, protocol, partial or timeout
_RECEIVED = re.compile(rb"Total bytes received: ([\d,]+)")


@dataclass(frozen=True)
class Filled:
    """What an rsync install moved: bytes from the master, and the slot's checked tree."""

    bytes_received: int
    files: int  # entries of the file manifest the slot matched
    seconds: float


def fetch_list(master: MasterClient | Sources, manifest_path: str, manifest: Manifest) -> list[filemanifest.Entry]:
    """The file manifest, checked against the signed manifest before it is read at all."""
    files = manifest.files
    if files is None:
        raise UpdaterError(
            f"manifest: {manifest.image} v{manifest.version} has no file manifest (published from an OS "
            "image, or by an older master); rsync mode needs one published from a directory"
        )
    path = beside(manifest_path, files.file)

    def take(source: MasterClient) -> bytes:  # a source whose list is not the signed one: the next's
        data = b"".join(source.stream(path, files.size))
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != files.size or digest != files.sha256:
            raise Refused(
                f"file manifest: {path} is {len(data)} bytes with sha256 {digest[:16]}..., the signed manifest "
                f"says {files.size} bytes, {files.sha256[:16]}...; not used"
            )
        return data

    return filemanifest.load(master.verified(f"GET {path}", take))


def tools() -> tuple[str, str]:
    """rsync and e2fsprogs' mke2fs, or one line saying which this initramfs lacks."""
    rsync = shutil.which("rsync")
    mke2fs = MKE2FS if os.path.isfile(MKE2FS) else shutil.which("mke2fs")
    if not rsync:
        raise UpdaterError("rsync mode: this initramfs has no rsync (add rsync to [initramfs] packages and binaries)")
    if not mke2fs or os.path.basename(os.path.realpath(mke2fs)) == "busybox":
        raise UpdaterError(
            "rsync mode: this initramfs has no e2fsprogs mke2fs (add e2fsprogs and /sbin/mke2fs to [initramfs])"
        )
    return rsync, mke2fs


def fill(
    *,
    master_host: str,
    port: int,
    files: FileList,
    expected: list[filemanifest.Entry],
    device: str,
    disk_path: str,
    offset: int,
    capacity: int,
    basis: tuple[str, int, int] | None = None,
    log: Callable[[str], None],
    progress: Callable[[], None],
    stage: Callable[[str], None] = lambda phase: None,
    sleep: Callable[[float], None] = time.sleep,
) -> Filled:
    """Format the slot, rsync module ``files.module`` into it, and check it against
    ``expected``; the slot is unmounted on the way out, whatever happened. ``basis``: the
    good slot (device, offset, size), mounted read-only for rsync's --copy-dest, so that
    unchanged files are copied from the card and changed ones sent as deltas against it."""
    rsync, mke2fs = tools()
    started = time.monotonic()
    target = _Target(device, disk_path, offset, capacity)
    log(f"formatting {target.shown} as ext4 for rsync")
    progress()
    _run([mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", *target.mke2fs_args()], "mke2fs")
    point = tempfile.mkdtemp(prefix="rsync-slot-", dir=RUN_DIR if os.path.isdir(RUN_DIR) else None)
    try:
        _run(["mount", "-t", "ext4", *target.mount_args(), point], "mount")
        try:
            lost_found = not any(e.path == LOST_FOUND for e in expected)  # the slot's own, not the image's
            url = f"rsync://{_host(master_host)}:{port}/{files.module}/"
            with _basis(basis, disk_path, log) as seed:
                received = _rsync(rsync, url, point, lost_found, seed, log, progress, sleep)
            stage("verify")
            log(f"checking slot tree against the signed file manifest ({len(expected)} entries)")
            found = filemanifest.scan(
                point, skip=frozenset([LOST_FOUND]) if lost_found else frozenset(), progress=progress
            )
            problem = filemanifest.difference(expected, found)
            if problem:
                raise Refused(f"rsync: {problem}; the slot is not committed")
        finally:
            _unmount(point)
    finally:
        try:
            os.rmdir(point)
        except OSError:
            pass  # still mounted (the unmount's error is what is raised): /run is a tmpfs anyway
    return Filled(received, len(expected), time.monotonic() - started)


class _Target:
    """The slot as mke2fs and mount take it: its partition's device node on a worker, or
    the disk file at the slot's offset (a loop mount) where there is none (the host tests)."""

    def __init__(self, device: str, disk_path: str, offset: int, capacity: int):
        self.device, self.disk_path, self.offset, self.capacity = device, disk_path, offset, capacity
        self.block = _is_block(device)
        self.shown = device if self.block else f"{disk_path} at {offset}"

    def mke2fs_args(self) -> list[str]:
        if self.block:
            return [self.device]
        return ["-E", f"offset={self.offset}", self.disk_path, f"{self.capacity // 1024}k"]

    def mount_args(self, options: str = "") -> list[str]:
        if self.block:
            return [*(["-o", options] if options else []), self.device]
        return [
            "-o",
            f"{options + ',' if options else ''}loop,offset={self.offset},sizelimit={self.capacity}",
            self.disk_path,
        ]


@contextlib.contextmanager
def _basis(basis: tuple[str, int, int] | None, disk_path: str, log: Callable[[str], None]) -> Iterator[str | None]:
    """The good slot mounted read-only (noload: not even its journal is replayed), or None
    when there is none or it will not mount: then rsync sends every file whole."""
    if basis is None:
        yield None
        return
    slot = _Target(basis[0], disk_path, basis[1], basis[2])
    point = tempfile.mkdtemp(prefix="rsync-basis-", dir=RUN_DIR if os.path.isdir(RUN_DIR) else None)
    try:
        try:
            _run(["mount", "-t", "ext4", *slot.mount_args("ro,noload"), point], "mount the good slot")
        except UpdaterError as e:
            log(f"{e}; rsync sends every file")
            yield None
            return
        try:
            log(f"unchanged files come from the good slot ({slot.shown}), read-only")
            yield point
        finally:
            _run(["umount", point], "umount the good slot")
    finally:
        try:
            os.rmdir(point)
        except OSError:
            pass


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _rsync(
    rsync: str,
    url: str,
    point: str,
    lost_found: bool,
    seed: str | None,
    log: Callable[[str], None],
    progress: Callable[[], None],
    sleep: Callable[[float], None],
) -> int:
    """Run rsync until it succeeds or the attempts are spent; the bytes it received in all."""
    command = [
        rsync,
        "-a",
        "-H",
        "-X",
        "-D",
        "--delete",
        "--numeric-ids",
        # by content: published trees share their times (SOURCE_DATE_EPOCH), so size and time
        # would take a changed file of the same size for the good slot's copy
        "--checksum",
        "--compress",  # zstd when both ends have it (rsync 3.2), else zlib
        "--stats",
        "--info=progress2",
        f"--timeout={IO_TIMEOUT}",
        f"--contimeout={CONNECT_TIMEOUT}",
        *(["--exclude=/lost+found"] if lost_found else []),
        *([f"--copy-dest={seed}"] if seed else []),
        url,
        point + "/",
    ]
    received, wait = 0, RETRY_WAIT
    for attempt in range(1, ATTEMPTS + 1):
        log(f"rsync {url} into the slot" + (f" (attempt {attempt})" if attempt > 1 else ""))
        status, output = _watched(command, progress)
        received += sum(int(m.replace(b",", b"")) for m in _RECEIVED.findall(output))
        if status == 0:
            return received
        last = _last_error(output)
        if status not in RETRYABLE or attempt == ATTEMPTS:
            raise UpdaterError(f"rsync from {url} failed with status {status}: {last}")
        log(f"rsync failed with status {status} ({last}); again in {wait:g} s")
        progress()
        sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def _watched(command: list[str], progress: Callable[[], None]) -> tuple[int, bytes]:
    """Run ``command``; each piece of output (progress2 writes as data moves) is progress.
    rsync's own --timeout ends a stalled transfer. Returns the status and the output's tail."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail = b""
    with proc:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            progress()
            tail = (tail + chunk)[-16384:]
    return proc.returncode, tail


def _last_error(output: bytes) -> str:
    lines = [line.strip() for line in re.split(rb"[\r\n]", output) if line.strip()]
    errors = [line for line in lines if b"rsync" in line.lower() or b"error" in line.lower()]
    return (errors or lines or [b"no output"])[-1].decode("utf-8", "replace")[:300]


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
        raise UpdaterError(
            f"rsync mode: {what} failed with status {done.returncode}: {(last or ['no output'])[-1][:300]}"
        )


def _unmount(point: str) -> None:
    """Unmount, flushing the slot; a slot that cannot be unmounted is not trusted."""
    os.sync()
    _run(["umount", point], "umount")
