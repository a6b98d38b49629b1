"""Just the stdlib modules the updater imports, taken from the target's Python.

modulefinder walks the updater's imports against the target's stdlib (the
libpython3.11-minimal tree in the package sysroot), never the host's, so what ships
matches the interpreter that runs it. Modules it cannot find there are compiled into
Debian's python3.11 binary (zlib, _sha2, posix, ...) or imported only on other
platforms; the e2e boot proves the set.
"""

from __future__ import annotations

import modulefinder
from pathlib import Path

STDLIB = "usr/lib/python3.11"
# What the interpreter imports before any user code runs.
STARTUP = ("encodings", "encodings.aliases", "encodings.utf_8", "encodings.latin_1", "encodings.ascii",
           "codecs", "io", "abc", "site", "os", "stat", "posixpath", "genericpath", "_collections_abc",
           "_sitebuiltins", "runpy", "pkgutil", "importlib.machinery", "importlib.util")


def needed_stdlib(package_dir: Path, sysroot: Path) -> list[str]:
    """Sysroot-relative paths of the stdlib files ``package_dir`` (a package) needs, sorted."""
    stdlib = (sysroot / STDLIB).resolve()
    finder = modulefinder.ModuleFinder(path=[str(package_dir.parent), str(stdlib), str(stdlib / "lib-dynload")])
    imports = [f"import {m}" for m in STARTUP]
    imports += [f"import {package_dir.name}.{p.stem}" for p in sorted(package_dir.glob("*.py"))
                if p.stem != "__init__"] + [f"import {package_dir.name}"]
    script = package_dir.parent / ".rackboot-imports.py"
    script.write_text("\n".join(imports) + "\n")
    try:
        finder.run_script(str(script))
    finally:
        script.unlink()
    found = set()
    for module in finder.modules.values():
        if module.__file__ and Path(module.__file__).resolve().is_relative_to(stdlib):
            found.add("/" + str(Path(module.__file__).resolve().relative_to(sysroot.resolve())))
    return sorted(found)
