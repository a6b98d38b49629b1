"""Just the stdlib modules the updater imports, taken from the target's Python.

modulefinder walks the updater's imports against the target's stdlib (the Debian
libpython3.11 trees in the package sysroot), never the host's, so what ships matches
the interpreter that runs it. Extension modules in lib-dynload carry the target's
triplet in their names, which the host's finder does not recognise, so they are
matched by name here and returned separately for the ELF closure. Names found in
neither place are compiled into Debian's python3.11 binary (posix, zlib, _sha256,
...) or only imported on other platforms; the e2e boot proves the set.
"""

from __future__ import annotations

import modulefinder
from dataclasses import dataclass
from pathlib import Path

STDLIB = "usr/lib/python3.11"
TRIPLETS = {"arm64": "aarch64-linux-gnu", "armhf": "arm-linux-gnueabihf", "amd64": "x86_64-linux-gnu"}
# What the interpreter imports before any user code runs, plus what C code imports by name
# where modulefinder cannot see it: socket.getaddrinfo encodes host names with the idna codec.
STARTUP = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.idna",
    "codecs",
    "io",
    "abc",
    "site",
    "os",
    "stat",
    "posixpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
    "runpy",
    "importlib.machinery",
    "importlib.util",
)
# Reached only through `if __name__ == "__main__"` blocks and test helpers of stdlib modules.
EXCLUDE = (
    "doctest",
    "unittest",
    "pydoc",
    "pdb",
    "asyncio",
    "tkinter",
    "idlelib",
    "lib2to3",
    "test",
    "distutils",
    "ensurepip",
    "sqlite3",
    "curses",
    "xmlrpc",
    "multiprocessing",
    "concurrent",
    "ctypes",
    "lzma",
    "bz2",
    "tty",
    "pty",
    "readline",
    "rlcompleter",
    "webbrowser",
    "ssl",
    "decimal",
)


@dataclass(frozen=True)
class StdlibSet:
    sources: list[str]  # sysroot-relative .py files
    extensions: list[str]  # sysroot-relative lib-dynload .so files (close over them with elf)


def needed_stdlib(package_dir: Path, sysroot: Path, arch: str) -> StdlibSet:
    """What ``package_dir`` (a package of .py files) needs from the target's stdlib."""
    stdlib = (sysroot / STDLIB).resolve()
    finder = modulefinder.ModuleFinder(path=[str(package_dir.parent), str(stdlib)], excludes=list(EXCLUDE))
    imports = [f"import {m}" for m in STARTUP]
    imports += [f"import {package_dir.name}.{p.stem}" for p in sorted(package_dir.glob("*.py"))]
    script = package_dir.parent / ".rackboot-imports.py"
    script.write_text("\n".join(imports) + "\n")
    try:
        finder.run_script(str(script))
    finally:
        script.unlink()
    root = sysroot.resolve()
    # typeshed leaves out the attributes of modulefinder's (undocumented) Module class.
    files: list[str | None] = [m.__file__ for m in finder.modules.values()]  # type: ignore[attr-defined]
    sources = {
        "/" + str(Path(file).resolve().relative_to(root))
        for file in files
        if file and Path(file).resolve().is_relative_to(stdlib)
    }
    dynload = stdlib / "lib-dynload"
    extensions = set()
    for name in sorted(set(finder.badmodules) - set(EXCLUDE)):
        so = dynload / f"{name}.cpython-311-{TRIPLETS[arch]}.so"
        if so.is_file():
            extensions.add("/" + str(so.relative_to(root)))
    return StdlibSet(sorted(sources), sorted(extensions))
