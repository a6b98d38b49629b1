"""Kernel module closure from each module's own .modinfo: no depmod, no modules.dep.

A module's `depends=` names what must be loaded before it; `softdep=pre: ...` too,
`softdep=post: ...` after it. Only the modules reached are read. Names compare with
'-' and '_' equal, as the kernel does. Compressed modules (.ko.xz, .ko.zst) are read
in memory and written into the initramfs decompressed: the initramfs is compressed
as a whole, and busybox insmod then needs no decompressor.
"""

from __future__ import annotations

import difflib
import io
import lzma
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .elf import ARCHES
from .errors import RackbootError

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def canonical(name: str) -> str:
    return name.replace("-", "_")


def module_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return canonical(name[: -len(suffix)])
    return canonical(name)


def module_bytes(path: Path) -> bytes:
    """The plain ELF bytes of a module file, whatever its compression."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        done = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
        if done.returncode:
            raise RackbootError(f"cannot decompress {path}: {done.stderr.decode().strip()}")
        return done.stdout
    if path.name.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    return data


@dataclass(frozen=True)
class ModInfo:
    depends: tuple[str, ...]
    pre: tuple[str, ...]
    post: tuple[str, ...]
    machine: tuple[int, str]


def read_modinfo(path: Path) -> ModInfo:
    try:
        elf = ELFFile(io.BytesIO(module_bytes(path)))
        section = elf.get_section_by_name(".modinfo")
        raw = section.data() if section is not None else b""
    except (ELFError, lzma.LZMAError, OSError, EOFError) as exc:
        raise RackbootError(f"kernel module {path} is not a readable ELF object ({exc})") from None
    depends, pre, post = [], [], []
    for item in raw.split(b"\0"):
        key, _, value = item.decode("utf-8", "replace").partition("=")
        if key == "depends":
            depends += [canonical(d) for d in value.split(",") if d]
        elif key == "softdep":
            target = None
            for word in value.split():
                if word in ("pre:", "post:"):
                    target = pre if word == "pre:" else post
                elif target is not None:
                    target.append(canonical(word))
    return ModInfo(tuple(depends), tuple(pre), tuple(post), (elf.elfclass, elf["e_machine"]))


@dataclass(frozen=True)
class Module:
    name: str
    path: str  # relative to the kernel tree root, e.g. lib/modules/<kver>/kernel/...
    depends: tuple[str, ...]


@dataclass(frozen=True)
class ModuleClosure:
    kver: str
    modules: tuple[Module, ...]  # load order: dependencies first
    builtin: tuple[str, ...]


class KernelModules:
    """The modules of one kernel release in an unpacked kernel tree."""

    def __init__(self, kernel_root: Path, kver: str | None = None):
        self.root = Path(kernel_root)
        base = self.root / "lib/modules"
        releases = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        if kver is None:
            if len(releases) != 1:
                raise RackbootError(f"expected one kernel release under {base}, found {releases or 'none'}")
            kver = releases[0]
        elif kver not in releases:
            raise RackbootError(f"no modules for kernel {kver} under {base} (have {', '.join(releases) or 'none'})")
        self.kver = kver
        self.dir = base / kver

    @cached_property
    def index(self) -> dict[str, Path]:
        found = {}
        for path in sorted(self.dir.rglob("*.ko*")):
            if path.name.endswith(SUFFIXES):
                found.setdefault(module_name(path), path)
        return found

    @cached_property
    def builtin(self) -> set[str]:
        try:
            lines = (self.dir / "modules.builtin").read_text().split()
        except FileNotFoundError:
            return set()
        return {module_name(Path(line)) for line in lines}

    def missing(self, name: str) -> RackbootError:
        close = difflib.get_close_matches(name, list(self.index) + sorted(self.builtin), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RackbootError(f"kernel module '{name}' not found in linux {self.kver}{hint}")


def module_closure(names: list[str], kernel_root: Path, kver: str | None = None, *,
                   arch: str | None = None) -> ModuleClosure:
    """The wanted modules with their dependencies, in a deterministic topological load order."""
    kernel = KernelModules(kernel_root, kver)
    infos: dict[str, ModInfo] = {}
    builtin: set[str] = set()
    pending = [canonical(n) for n in names]
    wanted_soft: set[str] = set()
    while pending:
        name = pending.pop()
        if name in infos or name in builtin:
            continue
        if name not in kernel.index:
            if name in kernel.builtin:
                builtin.add(name)
                continue
            if name in wanted_soft:  # a softdep the kernel does not have is optional, as for modprobe
                continue
            raise kernel.missing(name)
        info = read_modinfo(kernel.index[name])
        if arch and info.machine != ARCHES[arch][:2]:
            raise RackbootError(f"kernel module {kernel.index[name]} is ELF{info.machine[0]} {info.machine[1]}, "
                                f"not {arch}")
        infos[name] = info
        pending += info.depends
        for soft in info.pre + info.post:
            wanted_soft.add(soft)
            pending.append(soft)
    order = _load_order(infos)
    modules = tuple(Module(n, str(kernel.index[n].relative_to(kernel.root)), infos[n].depends) for n in order)
    return ModuleClosure(kernel.kver, modules, tuple(sorted(builtin)))


def _load_order(infos: dict[str, ModInfo]) -> list[str]:
    """Dependencies and pre-softdeps before, post-softdeps after; ties broken by name."""
    before: dict[str, set[str]] = {n: set() for n in infos}
    for name, info in infos.items():
        before[name] |= {d for d in info.depends + info.pre if d in infos}
        for post in info.post:
            if post in infos:
                before[post].add(name)
    order, done, visiting = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise RackbootError(f"kernel modules depend on each other in a cycle: {' -> '.join(cycle)}")
        visiting.append(name)
        for dep in sorted(before[name]):
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in sorted(infos):
        visit(name)
    return order


def load_order_text(closure: ModuleClosure) -> str:
    """One module path per line, in load order: what /init insmods."""
    return "".join(plain_path(m.path) + "\n" for m in closure.modules)


def copy_subset(closure: ModuleClosure, kernel_root: Path, dest: Path) -> None:
    """Copy the closure's modules into ``dest`` (a root's lib/modules/<kver>) with the index
    files modprobe reads: modules.dep (text, as depmod writes it, every module listing
    its transitive dependencies) and modules.dep.bin (the same as kmod's index, which is
    what kmod's modprobe reads), modules.order and the kernel's builtin lists."""
    kernel = KernelModules(kernel_root, closure.kver)
    by_name = {m.name: m for m in closure.modules}
    rel = {m.name: str((kernel_root / m.path).relative_to(kernel.dir)) for m in closure.modules}

    def transitive(name: str) -> list[str]:
        seen: list[str] = []
        stack = list(by_name[name].depends)
        while stack:
            dep = stack.pop(0)
            if dep in by_name and dep not in seen:
                seen.append(dep)
                stack += by_name[dep].depends
        return seen

    for module in closure.modules:
        target = dest / rel[module.name]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel_root / module.path, target)
    names = sorted(by_name, key=lambda n: rel[n])
    lines = {n: f"{rel[n]}:{''.join(' ' + rel[d] for d in transitive(n))}" for n in names}
    (dest / "modules.dep").write_text("".join(lines[n] + "\n" for n in names))
    # kmod's modprobe reads only the binary index, never the text modules.dep
    (dest / "modules.dep.bin").write_bytes(kmod_index(lines))
    (dest / "modules.order").write_text("".join(rel[m.name] + "\n" for m in closure.modules))
    for extra in ("modules.builtin", "modules.builtin.modinfo"):
        if (kernel.dir / extra).is_file():
            shutil.copyfile(kernel.dir / extra, dest / extra)


def kmod_index(entries: dict[str, str]) -> bytes:
    """A kmod index file (modules.*.bin): each key to one value, in kmod's trie format
    (big-endian; a node is [prefix\\0][first last child offsets][count (priority value\\0)...],
    its flags in the high bits of the offset pointing at it; children are written first)."""
    out = bytearray(struct.pack(">III", 0xB007F457, 0x00020001, 0))

    def node(items: list[tuple[str, str]]) -> int:
        prefix = os.path.commonprefix([k for k, _ in items])
        items = [(k[len(prefix):], v) for k, v in items]
        groups: dict[str, list[tuple[str, str]]] = {}
        for key, value in items:
            if key:
                groups.setdefault(key[0], []).append((key[1:], value))
        children = {ord(c): node(sub) for c, sub in sorted(groups.items())}
        values = [v for k, v in items if not k]
        offset, flags = len(out), 0
        if prefix:
            flags |= 0x80000000
            out.extend(prefix.encode() + b"\0")
        if children:
            flags |= 0x20000000
            out.extend(bytes([min(children), max(children)]))
            for c in range(min(children), max(children) + 1):
                out.extend(struct.pack(">I", children.get(c, 0)))
        if values:
            flags |= 0x40000000
            out.extend(struct.pack(">I", len(values)))
            for value in values:
                out.extend(struct.pack(">I", 0) + value.encode() + b"\0")
        return flags | offset

    struct.pack_into(">I", out, 8, node(sorted(entries.items())))
    return bytes(out)


def plain_path(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path
