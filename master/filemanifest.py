"""rsync mode at publish: the version's tree kept for the rsync daemon, and its signed file
manifest (the format: initramfs/updater/filemanifest.py, notes/formats.md).

The tree is the staged root that mke2fs made the image of, moved (not copied) into the
version directory as ``.tree``: a dot name, which HTTP never serves, and what
master/rsyncd.py offers as the read-only module ``<image>.<version>``. The file manifest
beside it lists every inode of that tree; its size and sha256 go into the manifest, whose
signature then covers every byte rsync delivers.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

from rackboot.errors import RackbootError
from rackboot.files import write_durable
from rackboot.initramfs.updater import filemanifest
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import FileList

FILE = "files.list.gz"  # gzip: ~100 bytes a file plain, a quarter of that compressed
TREE = ".tree"


def module_name(image: str, version: int) -> str:
    """The rsync module of one version: versions are whole numbers, so the last dot splits it."""
    return f"{image}.{version}"


def prepare(root: Path, work: Path, *, image: str, version: int, epoch: int) -> FileList:
    """List ``root`` into ``work``/files.list.gz and move it to ``work``/.tree; ``place`` then
    puts both into the version directory. Every time in the tree becomes ``epoch``, as in
    the image: rsync then finds a file unchanged by its size and time, on a slot the image
    filled as on one rsync filled."""
    if os.geteuid() == 0:
        os.chown(root, 0, 0)  # as mke2fs's root_owner=0:0 makes the image's root directory
    stamp(root, epoch)
    try:
        data = gzip.compress(filemanifest.dump(filemanifest.scan(root)), compresslevel=9, mtime=0)
    except (OSError, UpdaterError) as e:
        raise RackbootError(f"cannot list {root} for the file manifest: {e}") from None
    work.mkdir()
    write_durable(work / FILE, data)
    os.rename(root, work / TREE)
    return FileList(
        file=FILE, size=len(data), sha256=hashlib.sha256(data).hexdigest(), module=module_name(image, version)
    )


def stamp(root: Path, epoch: int) -> None:
    """atime and mtime of every inode under ``root`` (links themselves, not their targets)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def place(work: Path, out: Path) -> None:
    """The file manifest and the tree into the version's directory being built."""
    for name in (FILE, TREE):
        os.rename(work / name, out / name)


def tree(version_dir: Path) -> Path:
    return version_dir / TREE
