"""What goes into the initramfs, staged as a tree, then archived.

The tree holds busybox and the /init shim, the ELF closure of each binary taken from
the package sysroot, the kernel modules in load order, and (unless the config turns
it off) the target's Python with just the stdlib modules the updater imports.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Protocol

from rackboot.firmware.boards import COMMON_MODULES, Board
from rackboot.initramfs.updater.signature import PUBLIC_KEY

from . import compress, cpio, elf, modules, pystdlib, sources
from .config import Config
from .errors import RackbootError

PYTHON = "/usr/bin/python3.11"
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")
SHIM_FILES = ("init.sh", "udhcpc.script", "node.sh")


@dataclass(frozen=True)
class Spec:
    arch: str
    packages: list[str]
    binaries: list[str]
    modules: list[str]
    files: dict[str, Path]
    compression: str
    updater: bool
    init_conf: dict[str, str] = field(default_factory=dict)


def spec(cfg: Config, board: Board) -> Spec:
    updater = cfg.initramfs.updater
    packages = list(cfg.initramfs.packages) + (list(PYTHON_PACKAGES) if updater else [])
    binaries = list(cfg.initramfs.binaries) + ([PYTHON] if updater else [])
    if updater:
        # /init formats a blank data partition as ext4 (busybox's mke2fs makes only ext2): for
        # an overlay or persisted paths, and for the node's name and first-boot stamps, which
        # any plan or image may bring after the build
        packages.append("e2fsprogs")
        binaries.append("/sbin/mke2fs")
    files = dict(cfg.initramfs.files)
    key = cfg.master.public_key
    if updater:  # openssl makes the node's key and signs its reports (updater/nodekey.py)
        packages.append("openssl")
        binaries.append("/usr/bin/openssl")
    if updater and key:  # the updater then takes only what this key signed, checked by openssl
        files[PUBLIC_KEY] = key
    watchdog = cfg.initramfs.watchdog if updater and board.watchdog else 0
    wanted = (
        list(board.modules)
        + list(COMMON_MODULES)
        + list(board.watchdog if watchdog else ())
        + list(cfg.initramfs.modules)
    )
    init_conf = {
        "RACKBOOT_MASTER": cfg.master.url,
        "RACKBOOT_SOURCES": ",".join(cfg.master.sources),  # the kernel's rackboot.sources overrides it
        "RACKBOOT_DISK": board.disk,
        "RACKBOOT_ACTION": "update" if updater else "probe",
        "RACKBOOT_MOUNT": cfg.layout.mount,  # for offline boots, when no plan says
        "RACKBOOT_WATCHDOG": str(watchdog),  # stall seconds; 0 = no watchdog
    }
    return Spec(
        arch=board.arch,
        packages=sorted(set(packages)),
        binaries=binaries,
        modules=list(dict.fromkeys(wanted)),
        files=files,
        compression=cfg.initramfs.compression,
        updater=updater,
        init_conf=init_conf,
    )


def _shim_dir() -> Traversable:
    return resources.files("rackboot.initramfs")


def shim_hash() -> str:
    """Identity of the shim and the updater sources: part of the initramfs rebuild key."""
    h = hashlib.sha256()
    for name in SHIM_FILES:
        h.update(name.encode() + b"\0" + _shim_dir().joinpath(name).read_bytes())
    for path in sorted(_updater_sources()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _updater_sources() -> list[Path]:
    root = Path(str(_shim_dir().joinpath("updater")))
    return sorted(root.glob("*.py")) if root.is_dir() else []


def _in_root(root: Path, path: str) -> Path:
    """Where ``path`` of the initramfs is in the staging tree ``root``: links already staged
    (copied from packages, e.g. lib -> /usr/lib) are followed inside it, never on the host."""
    return elf.host_path(root, path)


def _entry(root: Path, path: str) -> Path:
    """``path``'s own entry in ``root`` (its directory resolved inside it, its last
    component not followed): for copying or making a link itself."""
    parent, name = posixpath.split(posixpath.normpath("/" + path.lstrip("/")))
    if name in ("", ".", ".."):
        raise RackbootError(f"{path} names no file inside {root}")
    return _in_root(root, parent) / name


def _copy_from_sysroot(paths: list[str], sysroot: Path, stage: Path) -> None:
    for rel in paths:
        src, dst = _entry(sysroot, rel), _entry(stage, rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            if not os.path.lexists(dst):
                os.symlink(os.readlink(src), dst)
        elif not os.path.lexists(dst):
            shutil.copyfile(src, dst)
            shutil.copymode(src, dst)


def merge_trees(trees: list[Path], dest: Path) -> Path:
    """Layer ``trees`` into ``dest`` (later ones win), hard-linking files where possible."""
    for tree in trees:
        sources.merge_tree(tree, dest)
    return dest


def _write(stage: Path, rel: str, data: bytes, mode: int = 0o644) -> None:
    path = _in_root(stage, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _copy_file(source: Path, dst: Path) -> None:
    if dst.is_symlink():  # replaced, never written through
        os.unlink(dst)
    shutil.copyfile(source, dst)
    shutil.copymode(source, dst)


class KernelTree(Protocol):
    """What the initramfs reads of a kernel (build.Kernel): its unpacked tree."""

    @property
    def root(self) -> Path: ...


def check(spec: Spec, *, sysroot: Path, kernel: KernelTree) -> None:
    """Fail on what would stop the build (wrong-arch binaries, missing libraries or
    modules) before anything is written; both closures are cheap next to compression."""
    for target, src in sorted(spec.files.items()):
        if not src.is_file():
            hint = " (rackboot keygen makes it)" if target == PUBLIC_KEY else ""
            raise RackbootError(f"{src}, for {target} in the initramfs, does not exist{hint}")
    elf.closure(spec.binaries, sysroot, spec.arch)
    modules.module_closure(spec.modules, kernel.root, arch=spec.arch)


def stage(root: Path, spec: Spec, *, sysroot: Path, kernel: KernelTree) -> None:
    """Lay out the initramfs tree under ``root``."""
    _copy_from_sysroot(elf.closure(spec.binaries, sysroot, spec.arch), sysroot, root)
    if not _in_root(root, "/bin/busybox").is_file():
        raise RackbootError("the initramfs needs /bin/busybox (add busybox-static to [initramfs] packages)")
    for applet in ("sh",):
        link = _entry(root, f"/bin/{applet}")
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    shim = _shim_dir()
    _write(root, "/init", shim.joinpath("init.sh").read_bytes(), 0o755)
    _write(root, "/etc/rackboot/udhcpc.script", shim.joinpath("udhcpc.script").read_bytes(), 0o755)
    _write(root, "/etc/rackboot/node.sh", shim.joinpath("node.sh").read_bytes(), 0o644)
    conf = "".join(f"{k}={v}\n" for k, v in sorted(spec.init_conf.items()))
    _write(root, "/etc/rackboot/init.conf", conf.encode())

    closure = modules.module_closure(spec.modules, kernel.root, arch=spec.arch)
    for module in closure.modules:
        _write(root, modules.plain_path(module.path), modules.module_bytes(kernel.root / module.path))
    _write(root, "/etc/rackboot/modules.order", modules.load_order_text(closure).encode())

    if spec.updater:
        _stage_python(root, sysroot, spec.arch)
    for target, source in sorted(spec.files.items()):
        if not source.exists():
            raise RackbootError(f"[initramfs] files: {source} (for {target}) does not exist")
        try:
            if source.is_dir():
                sources.merge_tree(source, root, target, copy_file=_copy_file)
            else:
                dst = _in_root(root, target)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _copy_file(source, dst)
        except RackbootError as exc:
            raise RackbootError(f"[initramfs] files: {target}: {exc}") from None


def _stage_python(root: Path, sysroot: Path, arch: str) -> None:
    """The updater package and the stdlib modules it imports, from the target's stdlib."""
    updater_dst = _in_root(root, "/usr/lib/rackboot/updater")
    updater_dst.mkdir(parents=True, exist_ok=True)
    for src in _updater_sources():
        shutil.copyfile(src, updater_dst / src.name)
    needed = pystdlib.needed_stdlib(updater_dst, sysroot, arch)
    _copy_from_sysroot(needed.sources, sysroot, root)
    _copy_from_sysroot(elf.closure(needed.extensions, sysroot, arch), sysroot, root)
    python3 = _entry(root, "/usr/bin/python3")
    if not os.path.lexists(python3):
        os.symlink("python3.11", python3)


def archive(stage: Path, out: Path, compression: str, *, mtime: int) -> None:
    """The staged tree plus /dev/console as a deterministic newc archive, compressed."""
    entries = cpio.tree_entries(stage)
    entries.append(cpio.Device("dev/console", 0o600, "c", 5, 1))
    with open(out, "wb") as f:
        compress.write_compressed(compression, lambda sink: cpio.write_archive(entries, sink, mtime=mtime), f)
