"""Debian packages for the board's arch, fetched once into a cache and unpacked once.

    cache = PackageCache(arch="arm64")
    refs = cache.resolve(["python3.11-minimal"])   # with Depends/Pre-Depends
    root = cache.sysroot(refs)                        # one merged tree of all of them

Resolution asks apt once per set of names and is remembered, keyed by the apt lists it
read, so a warm build neither calls apt nor touches the network. Downloads are checked
against apt's SHA256 before they enter the cache; unpacking and merging happen in a
temporary directory renamed into place, so an interrupted build never leaves half a
tree that a later one would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .elf import host_path
from .errors import RackbootError
from .files import atomic_write_bytes, sha256_file
from .proc import run

LISTS = Path("/var/lib/apt/lists")


@dataclass(frozen=True)
class PackageRef:
    name: str
    version: str
    arch: str  # the package's own Architecture (may be "all")
    sha256: str
    filename: str  # pool path in the archive
    size: int
    depends: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}_{self.version}_{self.arch}".replace(":", "%3a")


def default_cache() -> Path:
    return Path(os.environ.get("RACKBOOT_CACHE") or Path.home() / ".cache" / "rackboot")


def parse_records(text: str) -> list[dict[str, str]]:
    """Debian control records (apt-cache show output) as dicts; continuation lines joined."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                records.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        records.append(current)
    return records


def _dependency_names(record: dict[str, str]) -> tuple[str, ...]:
    """First alternative of each Pre-Depends/Depends entry, without versions or arch qualifiers."""
    names = []
    for field in ("Pre-Depends", "Depends"):
        for entry in record.get(field, "").split(","):
            first = entry.split("|")[0].strip().split(" ")[0].split(":")[0]
            if first:
                names.append(first)
    return tuple(names)


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory walk: relative path, type, exec bit, link target, content."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    if not path.exists():
        raise RackbootError(f"{path} does not exist")
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(path)).encode()
            if full.is_symlink():
                h.update(b"L" + rel + b"\0" + os.readlink(full).encode() + b"\0")
            elif full.is_dir():
                h.update(b"D" + rel + b"\0")
            else:
                h.update(b"F" + rel + b"\0" + (b"x" if os.access(full, os.X_OK) else b"-"))
                h.update(content_hash(full).encode())
    return h.hexdigest()


class PackageCache:
    def __init__(self, arch: str, root: Path | None = None):
        self.arch = arch
        self.root = Path(root) if root else default_cache()
        for sub in ("debs", "unpacked", "sysroots", "resolved"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- resolution --------------------------------------------------------------------

    def _lists_key(self) -> str:
        h = hashlib.sha256()
        for path in sorted(LISTS.glob("*_Packages*")):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def resolve(self, names: list[str], *, with_depends: bool = True) -> list[PackageRef]:
        """Candidate versions of ``names`` (and their dependency closure), sorted by name."""
        if not names:
            return []
        key = hashlib.sha256(json.dumps([sorted(names), self.arch, with_depends, self._lists_key()]).encode())
        memo = self.root / "resolved" / f"{key.hexdigest()[:24]}.json"
        try:
            return [PackageRef(**{**d, "depends": tuple(d["depends"])}) for d in json.loads(memo.read_text())]
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            pass
        refs = self._resolve_with_apt(names, with_depends)
        atomic_write_bytes(memo, json.dumps([asdict(r) for r in refs], indent=1).encode())
        return refs

    def _show(self, names: list[str]) -> dict[str, PackageRef]:
        """apt-cache show for the candidates; names apt does not know are missing from the result."""
        found = self._show_qualified(names, self.arch)
        rest = [n for n in names if n not in found]
        if rest:  # Architecture: all packages (firmware, tzdata) answer only to :all
            found.update(self._show_qualified(rest, "all"))
        return found

    def _show_qualified(self, names: list[str], arch: str) -> dict[str, PackageRef]:
        qualified = [f"{n}:{arch}" for n in names]
        done = subprocess.run(["apt-cache", "show", "--no-all-versions", *qualified], capture_output=True, text=True)
        found: dict[str, PackageRef] = {}
        for rec in parse_records(done.stdout):
            if "SHA256" not in rec or "Filename" not in rec:
                continue
            found.setdefault(
                rec["Package"],
                PackageRef(
                    name=rec["Package"],
                    version=rec["Version"],
                    arch=rec.get("Architecture", self.arch),
                    sha256=rec["SHA256"],
                    filename=rec["Filename"],
                    size=int(rec.get("Size", 0)),
                    depends=_dependency_names(rec),
                ),
            )
        if (
            not found
            and done.returncode
            and "No packages found" not in done.stderr
            and "Unable to locate" not in done.stderr
        ):
            raise RackbootError(f"apt-cache show failed: {done.stderr.strip().splitlines()[-1:]}")
        return found

    def _resolve_with_apt(self, names: list[str], with_depends: bool) -> list[PackageRef]:
        refs: dict[str, PackageRef] = {}
        wanted = list(dict.fromkeys(names))
        first = True
        while wanted:
            found = self._show(wanted)
            if first:
                missing = [n for n in wanted if n not in found]
                if missing:
                    raise RackbootError(
                        f"unknown Debian package '{missing[0]}' for {self.arch} (apt-cache has no candidate; "
                        f"is the arch enabled with dpkg --add-architecture and apt-get update run?)"
                    )
            first = False
            refs.update(found)
            if not with_depends:
                break
            # Virtual packages (no record of their own) are skipped: a real provider is
            # always among the dependencies of the packages rackboot takes files from.
            wanted = sorted({d for r in found.values() for d in r.depends} - set(refs) - set(wanted))
            wanted = [d for d in wanted if d not in refs]
        return sorted(refs.values(), key=lambda r: r.name)

    # --- fetching and unpacking ----------------------------------------------------------

    def fetch(self, ref: PackageRef) -> Path:
        """The .deb of ``ref``, downloaded once and checked against apt's SHA256."""
        deb, verified = self._deb(ref), self._sidecar(ref)
        if self._is_cached(ref):
            return deb
        spec = _spec(ref)
        with tempfile.TemporaryDirectory(dir=self.root / "debs", prefix=".fetch-") as tmp:
            try:
                done = subprocess.run(["apt-get", "download", "-q", spec], cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise RackbootError("apt-get is not installed; rackboot fetches boot artefacts with it") from None
            got = sorted(Path(tmp).glob("*.deb"))
            if done.returncode or len(got) != 1:
                detail = (done.stderr.strip().splitlines() or ["no file downloaded"])[-1]
                raise RackbootError(f"cannot download Debian package {spec}: {detail}")
            digest = content_hash(got[0])
            if digest != ref.sha256:
                raise RackbootError(
                    f"Debian package {spec} has sha256 {digest[:16]}..., apt expects {ref.sha256[:16]}...; not cached"
                )
            os.replace(got[0], deb)
        atomic_write_bytes(verified, ref.sha256.encode() + b"\n")
        return deb

    def fetch_all(self, refs: list[PackageRef]) -> None:
        """Fetch every missing .deb with one apt-get call (apt's start-up dominates small packages)."""
        missing = [r for r in refs if not self._is_cached(r)]
        if len(missing) > 1:
            with tempfile.TemporaryDirectory(dir=self.root / "debs", prefix=".fetch-") as tmp:
                subprocess.run(["apt-get", "download", "-q", *map(_spec, missing)], cwd=tmp, capture_output=True)
                for ref in missing:
                    got = list(Path(tmp).glob(f"{ref.name}_*.deb"))
                    if len(got) == 1 and content_hash(got[0]) == ref.sha256:
                        os.replace(got[0], self._deb(ref))
                        atomic_write_bytes(self._sidecar(ref), ref.sha256.encode() + b"\n")
        for ref in refs:  # anything the batch missed gets the one-by-one path and its error
            self.fetch(ref)

    def _deb(self, ref: PackageRef) -> Path:
        return self.root / "debs" / f"{ref.key}.deb"

    def _sidecar(self, ref: PackageRef) -> Path:
        return self.root / "debs" / f"{ref.key}.deb.sha256"

    def _is_cached(self, ref: PackageRef) -> bool:
        sidecar = self._sidecar(ref)
        return self._deb(ref).exists() and sidecar.exists() and sidecar.read_text().strip() == ref.sha256

    def unpack(self, ref: PackageRef) -> Path:
        dest = self.root / "unpacked" / ref.key
        if dest.is_dir():
            return dest
        deb = self.fetch(ref)
        work = Path(tempfile.mkdtemp(dir=self.root / "unpacked", prefix=".unpack-"))
        try:
            run(["dpkg-deb", "-x", str(deb), str(work)], f"cannot unpack {deb.name}", missing="apt-get install dpkg")
            os.rename(work, dest)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            if not dest.is_dir():  # a concurrent build won the race: theirs is as good as ours
                raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return dest

    def sysroot(self, refs: list[PackageRef]) -> Path:
        """One tree holding every package in ``refs``, hard-linked from the unpacked trees."""
        key = hashlib.sha256("\n".join(sorted(f"{r.key}:{r.sha256}" for r in refs)).encode()).hexdigest()[:24]
        dest = self.root / "sysroots" / key
        if dest.is_dir():
            return dest
        self.fetch_all(refs)
        work = Path(tempfile.mkdtemp(dir=self.root / "sysroots", prefix=".merge-"))
        try:
            for ref in sorted(refs, key=lambda r: r.name):
                merge_tree(self.unpack(ref), work)
            os.rename(work, dest)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            if not dest.is_dir():
                raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return dest


def _spec(ref: PackageRef) -> str:
    return f"{ref.name}:{ref.arch}={ref.version}" if ref.arch != "all" else f"{ref.name}={ref.version}"


def merge_tree(src: Path, root: Path, at: str = "/", copy_file: Callable[[Path, Path], None] | None = None) -> None:
    """Lay the tree ``src`` into the tree ``root`` at ``at``, as unpacking it there would:
    links already in ``root`` are followed inside it (a package's lib/x lands where another's
    lib link points), never on the host, where shutil.copytree followed them; a later file
    or link replaces an earlier one, and ``src``'s own links are copied as links."""
    copy_file = copy_file or _link
    for dirpath, dirnames, filenames in os.walk(src):  # links to directories are listed, not entered
        rel = os.path.relpath(dirpath, src)
        where = host_path(root, at if rel == "." else f"{at.rstrip('/')}/{rel}")
        where.mkdir(parents=True, exist_ok=True)
        for name in sorted(dirnames + filenames):
            source, dest = Path(dirpath) / name, where / name
            if source.is_symlink():
                if dest.is_dir() and not dest.is_symlink():
                    raise RackbootError(f"{source} is a link where {dest} is a directory")
                if os.path.lexists(dest):
                    os.unlink(dest)
                os.symlink(os.readlink(source), dest)
            elif not source.is_dir():
                copy_file(source, dest)


def _link(src: Path, dst: Path) -> None:
    try:
        if os.path.lexists(dst):
            os.unlink(dst)
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
