"""ELF closure: a binary, its interpreter and every library it needs, found in a sysroot.

Libraries are searched the way the glibc loader would on the target, inside the
package sysroot and never on the host: DT_RPATH (only when there is no DT_RUNPATH),
DT_RUNPATH, the paths in etc/ld.so.conf (and its includes), then the multiarch and
default directories. $ORIGIN expands to the needing object's directory. A candidate
only matches when its ELF class and machine match the binary's, as with ld.so.
Symlinks on the way are kept, so the copier can recreate them.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import RackbootError

if TYPE_CHECKING:  # pyelftools is imported where it is used: it is slow to import
    from elftools.elf.dynamic import DynamicTag

# Debian arch -> (ELF class, e_machine, multiarch triplet)
ARCHES = {
    "arm64": (64, "EM_AARCH64", "aarch64-linux-gnu"),
    "armhf": (32, "EM_ARM", "arm-linux-gnueabihf"),
    "amd64": (64, "EM_X86_64", "x86_64-linux-gnu"),
}
MACHINE_NAMES = {"EM_AARCH64": "aarch64", "EM_ARM": "arm", "EM_X86_64": "x86_64", "EM_386": "i386"}
BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class ElfInfo:
    elf_class: int
    machine: str
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


def read_elf_info(path: Path) -> ElfInfo:
    """What the loader reads from one ELF file; RackbootError if it is not ELF."""
    # imported here: pyelftools costs a no-op `rackboot build` more than its whole check
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import InterpSegment

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            interp = None
            needed: list[str] = []
            rpath: list[str] = []
            runpath: list[str] = []
            for seg in elf.iter_segments():
                if isinstance(seg, InterpSegment):  # what pyelftools makes of PT_INTERP
                    interp = seg.get_interp_name()
            for section in elf.iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(_tag_string(tag))
                        elif tag.entry.d_tag == "DT_RPATH":
                            rpath += _tag_string(tag).split(":")
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            runpath += _tag_string(tag).split(":")
            return ElfInfo(elf.elfclass, elf["e_machine"], interp, tuple(needed), tuple(rpath), tuple(runpath))
    except (ELFError, OSError) as exc:
        raise RackbootError(f"{path} is not an ELF file ({exc})") from None


def _tag_string(tag: DynamicTag) -> str:
    """The string of a DT_NEEDED, DT_RPATH or DT_RUNPATH tag. pyelftools sets it as an
    attribute named after the tag (``needed``...), which its type hints cannot list."""
    value: str = getattr(tag, tag.entry.d_tag[3:].lower())
    return value


def _describe(info: ElfInfo) -> str:
    return f"ELF{info.elf_class} {MACHINE_NAMES.get(info.machine, info.machine)}"


def check_arch(path: str, info: ElfInfo, arch: str) -> None:
    elf_class, machine, _ = ARCHES[arch]
    if (info.elf_class, info.machine) != (elf_class, machine):
        raise RackbootError(f"{path} is {_describe(info)}, not {arch} (the board's arch)")


def resolve_in_sysroot(sysroot: Path, path: str) -> tuple[str, list[str]]:
    """Follow symlinks of ``path`` inside the sysroot as a chroot would: (final path, the links
    on the way). Absolute link targets start again at the sysroot's root; a '..' that would
    climb above it, in ``path`` or in a link's target, is refused: it would read (or, for a
    staging tree, write) the host's files."""
    links: list[str] = []
    pending = list(_parts(path))
    current = PurePosixPath("/")
    while pending:
        part = pending.pop(0)
        if part == "..":
            if current == current.parent:
                through = f" through the link {links[-1]}" if links else ""
                raise RackbootError(f"{path} leads out of {sysroot}{through}; refusing")
            current = current.parent
            continue
        candidate = current / part
        host = sysroot / str(candidate).lstrip("/")
        if host.is_symlink():
            if len(links) > 40:
                raise RackbootError(f"too many levels of symlinks resolving {path} in {sysroot}")
            links.append(str(candidate))
            target = os.readlink(host)
            if target.startswith("/"):
                current = PurePosixPath("/")
            pending = list(_parts(target)) + pending
            continue
        current = candidate
    return str(current), links


def _parts(path: str) -> tuple[str, ...]:
    """The components of a path, '.' and repeated slashes dropped, '..' kept."""
    p = PurePosixPath(path)
    return p.parts[1:] if p.anchor else p.parts


def host_path(sysroot: Path, path: str) -> Path:
    """Where ``path`` inside the sysroot (or a staging tree) is on the host, links followed
    inside it; RackbootError when it leads out."""
    final, _ = resolve_in_sysroot(sysroot, path)
    return sysroot / final.lstrip("/")


@cache
def ld_so_conf_paths(sysroot: Path) -> tuple[str, ...]:
    """Directories from etc/ld.so.conf and its `include` globs, read inside the sysroot."""
    out: list[str] = []
    read_already: set[Path] = set()

    def read(conf: str) -> None:
        path = host_path(sysroot, conf)
        if path in read_already:  # a file that includes itself (or a loop of them) is read once
            return
        read_already.add(path)
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line.startswith("include "):
                pattern = line.split(None, 1)[1]
                directory, _, name = pattern.rpartition("/")
                if pattern.startswith("/"):
                    base = PurePosixPath(directory or "/")
                else:  # as ldconfig: relative to the including file's directory
                    base = PurePosixPath(conf).parent / directory
                try:
                    found = sorted(os.listdir(host_path(sysroot, str(base))))
                except OSError:
                    continue
                for match in fnmatch.filter(found, name):
                    read(str(base / match))
            elif line:
                out.append(line)

    read("/etc/ld.so.conf")
    return tuple(out)


def search_paths(info: ElfInfo, origin: str, sysroot: Path, arch: str) -> list[str]:
    triplet = ARCHES[arch][2]

    def expand(p: str) -> str:
        return p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)

    paths = [] if info.runpath else [expand(p) for p in info.rpath]
    paths += [expand(p) for p in info.runpath]
    paths += list(ld_so_conf_paths(sysroot))
    paths += [f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib", "/usr/lib"]
    return [p for p in dict.fromkeys(paths) if p]


def _find_library(name: str, info: ElfInfo, origin: str, sysroot: Path, arch: str) -> str | None:
    for directory in search_paths(info, origin, sysroot, arch):
        candidate = str(PurePosixPath(directory) / name)
        final, _ = resolve_in_sysroot(sysroot, candidate)
        host = sysroot / final.lstrip("/")
        if host.is_file():
            try:
                lib = read_elf_info(host)
            except RackbootError:
                continue
            if (lib.elf_class, lib.machine) == ARCHES[arch][:2]:
                return candidate
    return None


def _locate_binary(binary: str, sysroot: Path) -> str:
    if binary.startswith("/"):
        return binary
    for directory in BIN_DIRS:
        candidate = f"{directory}/{binary}"
        final, _ = resolve_in_sysroot(sysroot, candidate)
        if (sysroot / final.lstrip("/")).is_file():
            return candidate
    raise RackbootError(f"binary {binary!r} not found in {', '.join(BIN_DIRS)} of {sysroot}")


def closure(binaries: list[str], sysroot: Path, arch: str) -> list[str]:
    """Every path (inside the sysroot) to copy for ``binaries`` to run: sorted, links included."""
    if arch not in ARCHES:
        raise RackbootError(f"ELF closure: unknown arch {arch!r} (known: {', '.join(ARCHES)})")
    sysroot = Path(sysroot)
    result: set[str] = set()
    queue = []
    for binary in binaries:
        try:
            queue.append(_locate_binary(binary, sysroot))
        except RackbootError as exc:
            raise RackbootError(f"binary {binary!r}: {exc}") from None
    why = {path: "a binary" for path in queue}  # what the error names a path as
    seen: set[str] = set()
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            final, links = resolve_in_sysroot(sysroot, path)
        except RackbootError as exc:
            raise RackbootError(f"{exc} ({why[path]})") from None
        host = sysroot / final.lstrip("/")
        if not host.is_file():
            raise RackbootError(f"{path} does not exist in {sysroot}")
        result.update(links)
        result.add(final)
        info = read_elf_info(host)
        check_arch(path, info, arch)
        if info.interp:
            queue.append(info.interp)
            why.setdefault(info.interp, f"the interpreter of {path}")
        origin = str(PurePosixPath(final).parent)
        for name in info.needed:
            try:
                found = _find_library(name, info, origin, sysroot, arch)
            except RackbootError as exc:
                raise RackbootError(f"{name}, needed by {path}: {exc}") from None
            if found is None:
                searched = ", ".join(search_paths(info, origin, sysroot, arch))
                raise RackbootError(
                    f"{name}, needed by {path}, not found for {arch} in {sysroot} (searched {searched})"
                )
            queue.append(found)
            why.setdefault(found, f"needed by {path}")
    return sorted(result)
