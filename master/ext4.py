"""The ext4 image of a root directory, made reproducibly by `mke2fs -d`.

Determinism: the same tree gives the same bytes. mke2fs gets a UUID and hash seed
derived from the image's name (not its version: two versions of an image then differ
only where their trees do), E2FSPROGS_FAKE_TIME for its own clock, and populates in
sorted name order; it copies each inode's times from the source (ctime cannot be set
by anyone), so a debugfs pass then stamps every inode with source_date_epoch.

Stability across versions (block deltas, notes/delta.md): the fitted size and the inode
count are rounded up to a ladder of steps (1/8 of the power of two below them), so a
tree that grows by one package keeps the same geometry (groups, inode tables, bitmaps
at the same blocks) instead of shifting every table by a few blocks.
"""

from __future__ import annotations

import math
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rackboot.errors import RackbootError
from rackboot.proc import run

MIB = 1 << 20
BLOCK = 4096
INODE_SIZE = 256
# Fixed namespace so an image name always maps to the same filesystem UUID and hash seed.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rackboot.invalid/ext4")


def make_ext4(root: Path, out: Path, *, uuid_seed: str, size_mib: int | None, source_date_epoch: int) -> None:
    """`mke2fs -d root` into file `out`, reproducibly (see the module docstring)."""
    usage = tree_usage(root)
    if size_mib is None:
        size_mib = fitted_size_mib(usage)
    inodes = stable_inodes(usage.inodes)
    env = _fake_time_env(source_date_epoch)
    cmd = [
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        str(BLOCK),
        "-I",
        str(INODE_SIZE),
        "-N",
        str(inodes),
        "-m",
        "0",
        "-U",
        str(uuid.uuid5(_UUID_NAMESPACE, uuid_seed)),
        "-E",
        f"root_owner=0:0,hash_seed={uuid.uuid5(_UUID_NAMESPACE, uuid_seed + '/hash')}",
        "-d",
        str(root),
        str(out),
        f"{size_mib}M",
    ]
    run(cmd, f"mke2fs could not make a {size_mib} MiB ext4 filesystem from {root}", env=env)
    _stamp_times(root, out, source_date_epoch, env)


@dataclass(frozen=True)
class TreeUsage:
    bytes: int  # file data and directories, rounded up to blocks
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
    """Content * 1.3, plus inode tables, journal and slack, in whole MiB, rounded up the ladder."""
    inode_tables = stable_inodes(usage.inodes) * INODE_SIZE
    base = usage.bytes * 1.3 + inode_tables
    journal = 4 * MIB if base < 256 * MIB else 16 * MIB if base < 2048 * MIB else 64 * MIB
    return ladder(math.ceil((base + journal + 8 * MIB) / MIB))


def stable_inodes(used: int) -> int:
    """The inode count for ``used`` inodes plus a quarter for the worker's own files, up the ladder."""
    return ladder(used + used // 4 + 64)


def ladder(n: int) -> int:
    """``n`` rounded up to a multiple of 1/8 of the power of two at or below it (at least 8):
    at most 12.5 % more, and the same answer for small changes of ``n``."""
    step = max(8, (1 << (max(n, 1).bit_length() - 1)) // 8)
    return -(-n // step) * step


def _stamp_times(root: Path, fs: Path, epoch: int, env: dict[str, str]) -> None:
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
        proc = subprocess.run(
            ["debugfs", "-w", "-f", str(script), str(fs)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        script.unlink()
    problems = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if proc.returncode != 0 or problems:
        raise RackbootError(f"debugfs could not set times in {fs}: {(problems or ['exit status'])[0]}")


def _tree_paths(root: Path) -> Iterator[str]:
    """Every inode below ``root``: mke2fs -d makes sockets, fifos and devices too."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            yield name if rel == "." else f"{rel}/{name}"


def _fake_time_env(epoch: int) -> dict[str, str]:
    # E2FSPROGS_FAKE_TIME = 0 means "not set" to e2fsprogs; 1 s past the epoch is close enough.
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch or 1), "LC_ALL": "C"}
