"""The make-style build graph: artefacts rebuilt only when their inputs change.

Each artefact declares its inputs as plain data (the config slice it reads, content
hashes of the files and packages it consumes, the names of artefacts it depends on).
The graph hashes that with the builder version into a key; a stamp per artefact in
``<out>/.rackboot/`` remembers the key, the inputs and the output's identity, so the
graph can say *why* it rebuilt something.

A run builds what is stale into a staging directory (``<out>/.rackboot/stage``, where
the outputs it keeps are hard-linked too, so later steps read this run's inputs) and
renames the new outputs into place only after every step succeeded, artefacts.json
last: a failed build leaves the previous consistent set. The whole run holds an
exclusive lock on the output directory, under which it also sweeps what a killed run
left (the stage, ``.*.tmp-<pid>`` files), so neither an interrupted build nor two
concurrent builds leave a half artefact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict

from . import __version__
from .errors import RackbootError
from .files import TMP_RE, atomic_write, fsync_dir, remove, sha256_file

STATE_DIR = ".rackboot"
MANIFEST = "artefacts.json"


@dataclass
class Artefact:
    name: str
    kind: str  # uboot-script | kernel | initramfs | dtb | sdcard | bmap | ...
    filename: str  # relative to the output directory
    inputs: dict[str, Any]  # JSON-able: what the output depends on
    build: Callable[[Path], None]  # writes the output to the given (temporary) path
    after: tuple[str, ...] = ()  # artefacts whose outputs this one reads
    # Cheap validation of the inputs, run for every stale artefact before any is built,
    # so bad input fails the build before it writes anything.
    check: Callable[[], None] | None = None


@dataclass
class ArtefactResult:
    name: str
    rebuilt: bool
    reason: str


@dataclass
class BuildResult:
    outcomes: list[ArtefactResult] = field(default_factory=list)

    @property
    def rebuilt(self) -> list[str]:
        return [o.name for o in self.outcomes if o.rebuilt]


class Stamp(TypedDict):
    """What ``<out>/.rackboot/<name>.json`` remembers of an artefact's last build."""

    builder: str
    key: str
    inputs: dict[str, Any]
    after: dict[str, str]
    sha256: str
    output_stat: list[int]


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def _key(artefact: Artefact, dep_hashes: dict[str, str]) -> str:
    material = {"builder": __version__, "inputs": artefact.inputs, "after": dep_hashes}
    return hashlib.sha256(canonical(material)).hexdigest()


def _why(old: dict[str, Any] | None, artefact: Artefact, dep_hashes: dict[str, str], out: Path) -> str | None:
    """None when up to date, else a short reason naming what changed."""
    if old is None:
        return "never built"
    if not out.exists():
        return "output missing"
    st = out.stat()
    if [st.st_size, st.st_mtime_ns] != old.get("output_stat"):
        return "output changed on disk"
    if old.get("builder") != __version__:
        return f"builder version {old.get('builder')} -> {__version__}"
    changed = sorted(
        k
        for k in set(old.get("inputs", {})) | set(artefact.inputs)
        if canonical(old.get("inputs", {}).get(k)) != canonical(artefact.inputs.get(k))
    )
    changed += sorted(f"{d} rebuilt" for d in dep_hashes if old.get("after", {}).get(d) != dep_hashes[d])
    return ", ".join(f"{c} changed" if not c.endswith("rebuilt") else c for c in changed) or None


def code_hash(*modules: ModuleType) -> str:
    """Identity of the builder code that makes an artefact: part of its rebuild key, so a
    fix to a recipe rebuilds what it made even before the version number moves."""
    h = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        if module.__file__ is None:
            raise RackbootError(f"{module.__name__} has no source file to hash")
        h.update(module.__name__.encode() + b"\0" + Path(module.__file__).read_bytes())
    return h.hexdigest()


def stage_dir(out: Path) -> Path:
    """Where a run builds before it commits: artefacts that read another artefact's output
    read it here, since the output directory holds the previous build until the commit."""
    return out / STATE_DIR / "stage"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Exclusive lock on the output directory for the whole build."""
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run(artefacts: list[Artefact], out: Path, log: Callable[[str], None] = print) -> BuildResult:
    """Bring every artefact up to date, in the given (dependency) order, in the stage; then
    commit the rebuilt ones and artefacts.json together. Nothing in ``out`` changes unless
    every artefact built."""
    names = [a.name for a in artefacts]
    if len(set(names)) != len(names):
        raise RackbootError(f"build graph has duplicate artefact names: {names}")
    result = BuildResult()
    with locked(out):
        state, stage = out / STATE_DIR, stage_dir(out)
        sweep(out, artefacts)
        try:
            stage.mkdir()
            for artefact in artefacts:
                if artefact.check and _inputs_changed(state, artefact):
                    artefact.check()
            hashes: dict[str, str] = {}
            stamps: dict[str, Stamp] = {}  # of the rebuilt artefacts, written at the commit
            for artefact in artefacts:
                missing = [d for d in artefact.after if d not in hashes]
                if missing:
                    raise RackbootError(f"artefact {artefact.name} needs {missing[0]}, which is not built before it")
                deps = {d: hashes[d] for d in artefact.after}
                old = _read_stamp(state / f"{artefact.name}.json")
                target, staged = out / artefact.filename, stage / artefact.filename
                reason = _why(old, artefact, deps, target)
                if reason is None:
                    assert old is not None  # _why calls a missing stamp "never built"
                    _link_or_copy(target, staged)
                    hashes[artefact.name] = old["sha256"]
                    result.outcomes.append(ArtefactResult(artefact.name, False, "up to date"))
                    log(f"  {artefact.name:<16} up to date")
                    continue
                log(f"  {artefact.name:<16} rebuilding ({reason})")
                atomic_write(staged, artefact.build, shown=target)
                digest = sha256_file(staged)
                st = staged.stat()  # a rename keeps it: the stamp matches the committed output
                stamps[artefact.name] = {
                    "builder": __version__,
                    "key": _key(artefact, deps),
                    "inputs": artefact.inputs,
                    "after": deps,
                    "sha256": digest,
                    "output_stat": [st.st_size, st.st_mtime_ns],
                }
                hashes[artefact.name] = digest
                result.outcomes.append(ArtefactResult(artefact.name, True, reason))
            _commit(out, artefacts, stamps, hashes)
        finally:
            remove(stage)
    return result


def _link_or_copy(src: Path, dst: Path) -> None:
    """An up-to-date output into the stage, for the steps that read it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _commit(out: Path, artefacts: list[Artefact], stamps: dict[str, Stamp], hashes: dict[str, str]) -> None:
    """Rename the rebuilt outputs into place with their stamps, drop what the previous build
    made and this one does not (another compression's initramfs), then write artefacts.json."""
    stage, state = stage_dir(out), out / STATE_DIR
    previous = _manifest_paths(out)
    for artefact in artefacts:
        if artefact.name not in stamps:
            continue
        target = out / artefact.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / artefact.filename, target)
        fsync_dir(target.parent)
        write_bytes_atomic(state / f"{artefact.name}.json", canonical(stamps[artefact.name]))
    current = {a.filename for a in artefacts}
    for rel in sorted(previous - current):
        stale = out / rel
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    names = {f"{a.name}.json" for a in artefacts}
    for stamp in state.glob("*.json"):
        if stamp.name not in names:  # an artefact this config no longer has
            stamp.unlink()
    write_manifest(out, artefacts, hashes)


def _manifest_paths(out: Path) -> set[str]:
    """The outputs the previous artefacts.json lists: only plain relative paths inside ``out``."""
    try:
        entries = json.loads((out / MANIFEST).read_bytes())["artefacts"]
        paths = {e["path"] for e in entries}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return set()
    return {
        p
        for p in paths
        if isinstance(p, str)
        and p
        and not p.startswith("/")
        and not any(part in ("", ".", "..", STATE_DIR) for part in p.split("/"))
        and p != MANIFEST
    }


def sweep(out: Path, artefacts: list[Artefact]) -> None:
    """Remove what a killed run left: its stage and ``.<name>.tmp-<pid>`` files. Only under
    the lock, so no running build owns them."""
    remove(stage_dir(out))
    dirs = {out, out / STATE_DIR, *((out / a.filename).parent for a in artefacts)}
    for d in sorted(dirs):
        if d.is_dir():
            for p in d.iterdir():
                if TMP_RE.fullmatch(p.name) and p.is_file():
                    p.unlink()


def _inputs_changed(state: Path, artefact: Artefact) -> bool:
    old = _read_stamp(state / f"{artefact.name}.json")
    return old is None or canonical(old.get("inputs")) != canonical(artefact.inputs)


def _read_stamp(path: Path) -> dict[str, Any] | None:
    """The stamp as JSON: one an older builder wrote may lack keys, so readers use .get."""
    try:
        stamp = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def write_manifest(out: Path, artefacts: list[Artefact], hashes: dict[str, str]) -> None:
    """artefacts.json: name, kind, path, size, sha256 of each artefact, sorted by name."""
    entries = []
    for a in sorted(artefacts, key=lambda a: a.name):
        entries.append(
            {
                "name": a.name,
                "kind": a.kind,
                "path": a.filename,
                "size": (out / a.filename).stat().st_size,
                "sha256": hashes[a.name],
            }
        )
    doc = json.dumps({"builder": __version__, "artefacts": entries}, indent=2, sort_keys=True) + "\n"
    path = out / MANIFEST
    if not path.exists() or path.read_text() != doc:
        write_bytes_atomic(path, doc.encode())
