"""A rack master's mirror of the region: what the region's plans reference, pulled with
rsync from the region's ``published`` module (rsyncd.py) and checked against the region's
signatures before the rack's workers see a byte of it.

The rack master's directory holds ``trees/<n>`` (one mirror each) and ``current``, a
symlink to the tree serve hands out. A sync builds the next tree beside it: first plans/
and keys/, whose signatures say which versions and boot builds the plans reference, then
those (rsync --link-dest against the current tree: an unchanged file is a hard link, not a
transfer). Then every document is checked as a worker would check it (keyring.follow for
the key chain from [master] upstream_key, each plan's and manifest's signature and
binding, binding.py), and every file they pin against its size and sha256; a block index
diff is kept only when it rebuilds the index its manifest pins from one that another signed
manifest of the image pins (those versions' manifests and indexes are fetched for that
alone). Anything else in the new
tree is removed, so it holds only what was verified. Only then is ``current`` renamed over
by a symlink to it: a worker never sees a half-synced tree. A sync that fails (the region
unreachable, a signature or hash that does not match) leaves ``current`` as it was.

A tree remembers what it verified (``.verified``: path -> sha256, a dot name HTTP never
serves), so a file the next sync hard-links from it with the same pinned sha256 is not
hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rackboot.errors import RackbootError
from rackboot.files import fsync_dir, remove, sha256_file
from rackboot.initramfs.updater import binding, delta, formats, indexdiff, keyring
from rackboot.initramfs.updater.bootfiles import BUILD_RE, parse_boot_manifest
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import DEFAULT_PLAN, Manifest, manifest_named
from rackboot.initramfs.updater.signature import Verifier

from .rsyncd import PUBLISHED

CURRENT = "current"
TREES = "trees"
VERIFIED = ".verified"
RSYNC_TIMEOUT = 60  # seconds a transfer may stall
CONNECT_TIMEOUT = 10  # seconds to reach the region's daemon
_TREE_RE = re.compile(r"[0-9]{1,18}")
_PLAN_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})\.json")
_BOOT_PATH_RE = re.compile(rf"/boot/({BUILD_RE.pattern})/boot\.json")
_DIFF_RE = re.compile(r"(.+)\.from-([0-9a-f]{64})")
# rsync's partial transfers (a file unreadable or vanished): what arrived is still checked,
# and a referenced file that did not arrive fails the check
_PARTIAL = (23, 24)


class SyncError(RackbootError):
    """A sync that could not be taken: the current tree stays."""


@dataclass
class Checked:
    """What a verification kept: path (relative, no leading /) -> its sha256 (what a later
    sync may trust without hashing it again), and counts for the log line."""

    files: dict[str, str] = field(default_factory=dict)
    plans: int = 0
    versions: int = 0
    builds: int = 0
    diffs_dropped: int = 0
    keys: int = 0
    changed: bool = True  # False: the same files as the current tree, which stays


def rsync_url(upstream: str, port: int) -> str:
    host = urlsplit(upstream).hostname or ""
    return f"rsync://{host}:{port}/{PUBLISHED}/"


class Mirror:
    """The mirror under ``root`` ([master] directory of a rack master)."""

    def __init__(
        self,
        root: Path,
        upstream: str,
        rsync_port: int,
        key: Path,
        *,
        log: Callable[[str], None] = lambda _line: None,
        openssl: str = "openssl",
    ):
        self.root = Path(root).resolve()
        self.upstream = upstream
        self.url = rsync_url(upstream, rsync_port)
        self.key = key
        self.log = log
        self.openssl = openssl

    @property
    def link(self) -> Path:
        return self.root / CURRENT

    def current(self) -> Path | None:
        """The tree serve hands out now, None before the first good sync."""
        try:
            target = os.readlink(self.link)
        except OSError:
            return None
        tree = (self.root / target).resolve()
        return tree if tree.is_dir() else None

    def check_key(self) -> Verifier:
        """The region's key as configured: one line when it does not read."""
        verifier = Verifier(str(self.key), self.openssl)
        if verifier.key is None:
            raise RackbootError(f"[master] upstream_key: {verifier.problem}")
        return verifier

    # --- a sync -------------------------------------------------------------------------------

    def sync(self) -> Checked:
        """Pull, verify and swap in a new tree; SyncError (the current tree stays) otherwise."""
        verifier = self.check_key()
        trees = self.root / TREES
        trees.mkdir(parents=True, exist_ok=True)
        for leftover in trees.glob(".new-*"):  # a sync killed half-way
            remove(leftover)
        old = self.current()
        staging = trees / f".new-{os.getpid()}"
        staging.mkdir()
        try:
            self._rsync(staging, old, ["/plans/***", "/keys/***"])
            wanted = referenced(staging)
            self._rsync(staging, old, wanted)
            checked = verify(staging, verifier, old, log=self.log)
            prune(staging, set(checked.files))
            if old is not None and _same(staging, old, checked.files):
                checked.changed = False
                remove(staging)  # nothing new: the current tree stays, no swap
                return checked
            (staging / VERIFIED).write_text(json.dumps(checked.files, sort_keys=True, indent=0) + "\n")
            os.chmod(staging / VERIFIED, 0o600)
            self._swap(staging, old)
        except BaseException:
            remove(staging)
            raise
        return checked

    def _rsync(self, dest: Path, old: Path | None, include: list[str]) -> None:
        rsync = shutil.which("rsync")
        if rsync is None:
            raise SyncError("rsync is not installed (apt install rsync); a rack master mirrors with it")
        argv = [
            rsync,
            "-rtp",  # regular files and directories only: a link from the region is not followed
            "--chmod=D755,F644",  # served as world-readable, whatever umask
            # to the nanosecond: a document re-signed within the second it was last synced in keeps
            # its size, and at rsync's default (whole seconds) would be linked from the old tree
            "--modify-window=-1",
            f"--timeout={RSYNC_TIMEOUT}",
            f"--contimeout={CONNECT_TIMEOUT}",
            "--no-motd",
            *(["--link-dest", str(old)] if old is not None else []),
            *[f"--include={pattern}" for pattern in include],
            "--exclude=*",
            self.url,
            f"{dest}/",
        ]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode not in (0, *_PARTIAL):
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise SyncError(f"rsync from {self.url} failed (exit {done.returncode}): {last}")

    def _swap(self, staging: Path, old: Path | None) -> None:
        """``current`` renamed over by a link to the new tree, then the tree before the old one goes."""
        numbers = [int(p.name) for p in staging.parent.iterdir() if _TREE_RE.fullmatch(p.name)]
        final = staging.parent / str(max(numbers, default=0) + 1)
        os.rename(staging, final)
        link = self.root / f".{CURRENT}.new"
        remove(link)
        os.symlink(f"{TREES}/{final.name}", link)
        os.replace(link, self.link)
        fsync_dir(self.root)
        keep = {final.name, old.name if old is not None else ""}
        for tree in staging.parent.iterdir():  # the one just replaced stays for workers mid-download
            if _TREE_RE.fullmatch(tree.name) and tree.name not in keep:
                remove(tree)


def referenced(tree: Path) -> list[str]:
    """rsync include patterns for the versions and boot builds the plans in ``tree`` name (and
    every earlier version of those images whose index a diff may be made against: only their
    indexes are mirrored, to check the diffs)."""
    patterns = ["/images/", "/boot/"]
    for path in sorted(plan_references(tree)):
        named = manifest_named(path)
        if named is not None:
            image = f"/images/{named[0]}"
            patterns += [f"{image}/", f"{image}/{named[1]}/***"]
            # the other versions' signed manifests and indexes: the bases a diff is checked against
            patterns += [
                f"{image}/*/",
                f"{image}/*/manifest.json",
                f"{image}/*/manifest.json.sig",
                f"{image}/*/*.index",
            ]
        elif (build := _BOOT_PATH_RE.fullmatch(path)) is not None:
            patterns.append(f"/boot/{build.group(1)}/***")
    return list(dict.fromkeys(patterns))


def plan_references(tree: Path) -> set[str]:
    """The manifest and boot manifest paths the plans in ``tree`` name (unverified: only
    what to fetch; verify() checks the plans before anything they name is kept)."""
    found: set[str] = set()
    for path in sorted((tree / "plans").glob("*.json")):
        try:
            plan = formats.parse_plan(path.read_bytes())
        except (OSError, UpdaterError):
            continue  # verify() refuses the sync with its reason
        found.update(p for p in (plan.image, plan.boot) if p is not None)
    return found


def verify(tree: Path, root: Verifier, old: Path | None, *, log: Callable[[str], None]) -> Checked:
    """Every signed document in ``tree`` checked as a worker checks it, every file they pin
    against its size and sha256. SyncError names the first that fails."""
    checked = Checked()
    trusted = _previous(old)

    def get(path: str) -> bytes | None:
        try:
            return (tree / path.lstrip("/")).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UpdaterError(f"{path}: {e.strerror}") from None

    followed = keyring.follow(get, root, log=lambda line: log(f"mirror: {line}"))
    if followed.stopped is not None:
        raise SyncError(f"key chain: {followed.stopped}")
    verifier = followed.verifier
    assert verifier.key is not None and root.key is not None
    for n in range(root.key.n + 1, verifier.key.n + 1):
        link = formats.key_link_path(n).lstrip("/")
        checked.files[link] = checked.files[link + ".sig"] = ""
        checked.keys += 1

    def signed(path: str) -> bytes:
        data, signature = get(path), get(path + ".sig")
        if data is None:
            raise SyncError(
                f"{path}: named by a plan, missing from the region's tree (or not world-readable there: "
                "its rsync module reads as nobody)"
            )
        if signature is None:
            raise SyncError(f"{path}: no signature beside it")
        try:
            verifier.check(path, data, signature)
        except UpdaterError as e:
            raise SyncError(str(e)) from None
        checked.files[path.lstrip("/")] = checked.files[path.lstrip("/") + ".sig"] = ""
        return data

    def pinned(path: str, size: int | None, sha256: str | None) -> None:
        """A file a signed document pins, checked (or taken as the last sync checked it)."""
        rel = path.lstrip("/")
        local = tree / rel
        try:
            st = local.stat()
        except FileNotFoundError:
            raise SyncError(f"{path}: pinned by a signed manifest, missing from the region's tree") from None
        if size is not None and st.st_size != size:
            raise SyncError(f"{path}: {st.st_size} bytes, its signed manifest says {size}")
        if sha256 is not None:
            known = trusted.get(rel)
            if known is None or known[0] != sha256 or known[1] != (st.st_dev, st.st_ino):
                got = sha256_file(local)
                if got != sha256:
                    raise SyncError(f"{path}: sha256 {got[:16]}…, its signed manifest says {sha256[:16]}…")
        checked.files[rel] = sha256 or ""

    references: set[str] = set()
    for plan_file in sorted((tree / "plans").glob("*.json")):
        match = _PLAN_RE.fullmatch(plan_file.name)
        where = f"/plans/{plan_file.name}"
        if match is None:
            raise SyncError(f"{where}: not a plan's file name")
        try:
            plan = formats.parse_plan(signed(where))
        except UpdaterError as e:
            raise SyncError(f"{where}: {e}") from None
        if plan.node != match.group(1) and not (match.group(1) == DEFAULT_PLAN and plan.node == DEFAULT_PLAN):
            raise SyncError(f"{where}: signed for node {plan.node}, not {match.group(1)}; refused")
        checked.plans += 1
        references.update(p for p in (plan.image, plan.boot) if p is not None)

    manifests: dict[str, Manifest] = {}
    for path in sorted(references):
        if manifest_named(path) is not None:
            try:
                manifest = formats.parse_manifest(signed(path))
                binding.check_manifest(path, manifest)
            except UpdaterError as e:
                raise SyncError(f"{path}: {e}") from None
            manifests[path] = manifest
            _check_manifest_files(path, manifest, pinned)
            checked.versions += 1
        elif (build := _BOOT_PATH_RE.fullmatch(path)) is not None:
            try:
                boot = parse_boot_manifest(signed(path))
                binding.check_boot_manifest(path, boot.build, build.group(1))
            except UpdaterError as e:
                raise SyncError(f"{path}: {e}") from None
            pinned(formats.beside(path, boot.stream), boot.stream_size, boot.stream_sha256)
            checked.builds += 1
        else:
            raise SyncError(f"a plan names {path[:120]!r}, neither a manifest nor a boot manifest path")
    bases = dict(manifests)
    for image in sorted({manifest.image for manifest in manifests.values()}):
        for other in sorted((tree / "images" / image).glob("*/manifest.json")):
            path = "/" + str(other.relative_to(tree))
            if path in bases or manifest_named(path) is None or not other.with_name("manifest.json.sig").is_file():
                continue
            try:  # not kept in the mirror (no plan names it): only its index, to check diffs with
                verifier.check(path, other.read_bytes(), other.with_name("manifest.json.sig").read_bytes())
                base = formats.parse_manifest(other.read_bytes())
                binding.check_manifest(path, base)
            except (OSError, UpdaterError):
                continue
            bases[path] = base
    checked.diffs_dropped = _check_diffs(tree, manifests, bases, checked)
    return checked


def _check_manifest_files(path: str, manifest: Manifest, pinned: Callable[[str, int | None, str | None], None]) -> None:
    pinned(manifest.stream_path(path), manifest.stream_size, manifest.stream_sha256)
    for hook in manifest.hooks:
        pinned(formats.beside(path, hook.file), hook.size, hook.sha256)
    if manifest.files is not None:  # the file manifest; its tree is not mirrored (rsync mode is the region's)
        pinned(formats.beside(path, manifest.files.file), manifest.files.size, manifest.files.sha256)
    if manifest.delta is not None:
        pinned(formats.beside(path, manifest.delta.index), manifest.delta.index_size, manifest.delta.index_sha256)
        # the pack's blocks are pinned by the index, which the worker checks each against
        pinned(formats.beside(path, manifest.delta.pack), manifest.delta.pack_size, None)


def _check_diffs(tree: Path, manifests: dict[str, Manifest], bases: dict[str, Manifest], checked: Checked) -> int:
    """Keep each block index diff that rebuilds its version's signed index from an index
    some signed manifest of the image pins (``bases``); drop the rest (a worker then takes the
    whole index). Returns how many were dropped."""
    indexes: dict[str, delta.BlockIndex] = {}  # plain sha256 -> an index its signed manifest pins
    for path, manifest in bases.items():
        if manifest.delta is not None:
            local = tree / formats.beside(path, manifest.delta.index).lstrip("/")
            try:
                data = local.read_bytes()
                if len(data) != manifest.delta.index_size or sha256_bytes(data) != manifest.delta.index_sha256:
                    continue
                index = delta.parse_index(data)
            except (OSError, UpdaterError):
                continue
            indexes[index.plain_sha256] = index
    dropped = 0
    for path, manifest in manifests.items():
        directory = tree / path.lstrip("/").rsplit("/", 1)[0]
        for candidate in sorted(directory.iterdir()):
            match = _DIFF_RE.fullmatch(candidate.name)
            if match is None or manifest.delta is None or match.group(1) != manifest.delta.index:
                continue
            base = indexes.get(match.group(2))
            ok = False
            if base is not None and manifest.delta.plain_sha256 is not None:
                try:
                    rebuilt = indexdiff.apply(base, candidate.read_bytes(), expected=manifest.size)
                    ok = rebuilt.plain_sha256 == manifest.delta.plain_sha256
                except (OSError, UpdaterError):
                    ok = False
            if ok:
                checked.files[str(candidate.relative_to(tree))] = ""
            else:
                dropped += 1
    return dropped


def _same(new: Path, old: Path, files: dict[str, str]) -> bool:
    """Whether ``new`` holds exactly ``old``'s verified files, each a hard link to old's."""
    try:
        listed = json.loads((old / VERIFIED).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(listed, dict) or set(listed) != set(files):
        return False
    try:
        return all((new / rel).stat().st_ino == (old / rel).stat().st_ino for rel in files)
    except OSError:
        return False


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _previous(old: Path | None) -> dict[str, tuple[str, tuple[int, int]]]:
    """What the current tree verified: path -> (sha256, its (device, inode)), for files that
    a new tree hard-links rather than fetches."""
    if old is None:
        return {}
    try:
        listed = json.loads((old / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, tuple[str, tuple[int, int]]] = {}
    for rel, sha in listed.items() if isinstance(listed, dict) else ():
        if isinstance(rel, str) and isinstance(sha, str) and sha:
            try:
                st = (old / rel).stat()
            except OSError:
                continue
            found[rel] = (sha, (st.st_dev, st.st_ino))
    return found


def prune(tree: Path, keep: set[str]) -> None:
    """Remove from ``tree`` every file not in ``keep`` (and the directories left empty)."""
    for directory, dirs, files in os.walk(tree, topdown=False):
        for name in files:
            path = Path(directory) / name
            if str(path.relative_to(tree)) not in keep:
                path.unlink()
        for name in dirs:
            path = Path(directory) / name
            if path.is_symlink():
                path.unlink()
            elif not any(path.iterdir()):
                path.rmdir()


def describe(checked: Checked) -> str:
    return (
        f"{checked.plans} plans, {checked.versions} versions, {checked.builds} boot builds"
        + (f", {checked.keys} key links" if checked.keys else "")
        + (f" ({checked.diffs_dropped} index diffs not checkable, left out)" if checked.diffs_dropped else "")
    )


def synced_at(tree: Path | None) -> str:
    """When ``tree`` was swapped in, for the log lines."""
    if tree is None:
        return "never"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime((tree / VERIFIED).stat().st_mtime))
    except OSError:
        return "at an unknown time"
