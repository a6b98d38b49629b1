"""Staging a root directory for publication: a copy with rackboot-mark-good (and its
systemd unit) added, and the worker kernel's modules where the root lacks them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from rackboot import modules as kernel_modules
from rackboot.errors import RackbootError
from rackboot.proc import run

MODULE_DIRS = ("lib/modules", "usr/lib/modules")
MARK_GOOD = "rackboot-mark-good"
MARK_GOOD_SOURCE = "rackboot-mark-good.sh"
MARK_GOOD_UNIT = "rackboot-mark-good.service"


def has_modules(root: Path, kernel_release: str) -> bool:
    return any((root / d / kernel_release).is_dir() for d in MODULE_DIRS)


def stage(src: Path, staged: Path) -> Path:
    """A copy of `src` (owners, modes, links kept) with rackboot-mark-good added, and on
    a systemd root its unit, enabled."""
    staged.mkdir()
    run(["cp", "-a", f"{src}/.", str(staged)], f"could not copy {src} to {staged}")
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


def add_modules(staged: Path, src: Path, modules_from: Path, kernel_release: str, wanted: Sequence[str] = ()) -> None:
    """The kernel's modules (all, or ``wanted`` and their dependencies) added to ``staged``."""
    found = [modules_from / d / kernel_release for d in MODULE_DIRS if (modules_from / d / kernel_release).is_dir()]
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
        run(["cp", "-a", str(found[0]), str(dest)], f"could not copy modules from {found[0]}")
        if not (dest / kernel_release / "modules.dep.bin").is_file():
            kernel_modules.depmod(dest / kernel_release)


def image_has_modules(img: Path, offset: int, kernel_release: str) -> bool:
    """Ask debugfs (through the e2fsprogs `?offset=` io option) without mounting anything."""
    for d in MODULE_DIRS:
        proc = subprocess.run(
            ["debugfs", "-R", f"ls -p /{d}", f"{img}?offset={offset}"],
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        # `ls -p` lines: /inode/mode/uid/gid/name/size/
        if kernel_release in {line.split("/")[5] for line in proc.stdout.splitlines() if line.count("/") >= 6}:
            return True
    return False
