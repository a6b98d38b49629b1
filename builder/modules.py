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
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .elf import ARCHES, host_path
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
    # imported here: pyelftools costs a no-op `rackboot build` more than its whole check
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(module_bytes(path)))
        section = elf.get_section_by_name(".modinfo")
        raw = section.data() if section is not None else b""
    except (ELFError, lzma.LZMAError, OSError, EOFError) as exc:
        raise RackbootError(f"kernel module {path} is not a readable ELF object ({exc})") from None
    depends: list[str] = []
    pre: list[str] = []
    post: list[str] = []
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
    """The modules of one kernel release in an unpacked kernel tree. Links in the tree are
    followed inside it, never on the host: Debian's lib/modules/<kver>/build points at
    /usr/src, and a tree's lib -> /usr/lib must not lead to the host's own modules."""

    def __init__(self, kernel_root: Path, kver: str | None = None):
        self.root = Path(kernel_root)
        base = host_path(self.root, "/lib/modules")
        releases = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        if kver is None:
            if len(releases) != 1:
                raise RackbootError(f"expected one kernel release under {base}, found {releases or 'none'}")
            kver = releases[0]
        elif kver not in releases:
            raise RackbootError(f"no modules for kernel {kver} under {base} (have {', '.join(releases) or 'none'})")
        self.kver = kver
        self.dir = host_path(self.root, f"/{base.relative_to(self.root)}/{kver}")

    def inside(self, path: Path) -> Path:
        """``path`` (under the tree) with its links followed inside the tree; refused if it leaves."""
        return host_path(self.root, "/" + str(path.relative_to(self.root)))

    @cached_property
    def index(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(self.dir.rglob("*.ko*")):  # rglob lists links but does not enter linked directories
            if path.name.endswith(SUFFIXES):
                try:
                    real = self.inside(path) if path.is_symlink() else path
                except RackbootError as exc:
                    raise RackbootError(f"kernel module {path}: {exc}") from None
                if real.is_file() and real.is_relative_to(self.dir):
                    found.setdefault(module_name(path), real)
        return found

    @cached_property
    def builtin(self) -> set[str]:
        try:
            lines = self.inside(self.dir / "modules.builtin").read_text().split()
        except FileNotFoundError:
            return set()
        return {module_name(Path(line)) for line in lines}

    def missing(self, name: str) -> RackbootError:
        close = difflib.get_close_matches(name, list(self.index) + sorted(self.builtin), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RackbootError(f"kernel module '{name}' not found in linux {self.kver}{hint}")


def module_closure(
    names: list[str], kernel_root: Path, kver: str | None = None, *, arch: str | None = None
) -> ModuleClosure:
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
            raise RackbootError(
                f"kernel module {kernel.index[name]} is ELF{info.machine[0]} {info.machine[1]}, not {arch}"
            )
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
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name) :] + [name]
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
    """Copy the closure's modules into ``dest`` (a root's lib/modules/<kver>), with the
    kernel's order and builtin lists, and index them for modprobe."""
    kernel = KernelModules(kernel_root, closure.kver)
    for module in closure.modules:
        target = dest / (kernel_root / module.path).relative_to(kernel.dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel_root / module.path, target)
    (dest / "modules.order").write_text(
        "".join(str((kernel_root / m.path).relative_to(kernel.dir)) + "\n" for m in closure.modules)
    )
    for extra in ("modules.builtin", "modules.builtin.modinfo"):
        source = kernel.inside(kernel.dir / extra)
        if source.is_file():
            shutil.copyfile(source, dest / extra)
    depmod(dest)


def depmod(modules_dir: Path) -> None:
    """Write the index files modprobe and udev read (modules.dep, .alias, their .bin forms)
    for the modules under ``modules_dir`` (a lib/modules/<kver> directory). Debian's kernel
    packages leave this to depmod in their postinst, which a published root never runs.
    depmod reads ELF of any arch; it runs on a base directory of its own so that a root's
    absolute lib -> /usr/lib link can never send it to the host's modules."""
    with tempfile.TemporaryDirectory(prefix="rackboot-depmod-") as base:
        (Path(base) / "lib/modules").mkdir(parents=True)
        (Path(base) / "lib/modules" / modules_dir.name).symlink_to(modules_dir.resolve())
        try:
            done = subprocess.run(["depmod", "-b", base, modules_dir.name], capture_output=True, text=True)
        except FileNotFoundError:
            raise RackbootError("depmod (Debian package kmod) is needed to index a root's kernel modules") from None
    if done.returncode != 0 or not (modules_dir / "modules.dep.bin").is_file():
        detail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RackbootError(f"depmod on {modules_dir}: {detail}")


def plain_path(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path
