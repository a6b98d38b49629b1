"""`rackboot publish`: a root filesystem -> a versioned image on the master.

A directory becomes an ext4 image (ext4.py) of a staged copy (rootfs.py); an OS image
gives up one of its partitions as is (osimage.py). Either way the bytes are compressed
(stream.py) and land, with their manifest, in ``<master>/images/<image>/<version>/``
(layout: notes/formats.md).

Atomicity: everything is built in a hidden work directory beside the versions and
renamed into place; latest.json is replaced, never rewritten. A publication holds an
exclusive lock on the image's directory, under which it sweeps the work directories and
temporaries that a killed publication left.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from rackboot.errors import RackbootError
from rackboot.files import TMP_RE, atomic_write_bytes, fsync_dir, lock_dir, sweep, write_durable
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import HOOK_TIMEOUT, Hook, HookName, Latest, Manifest, StreamCompression

from . import filemanifest, signing
from .ext4 import make_ext4
from .index import write_index
from .numbers import ascii_int
from .osimage import ext4_magic, find_partition
from .rootfs import add_modules, has_modules, image_has_modules, stage
from .stream import STREAM_NAME, compress_stream

PathLike = str | Path
# a publication's work directory, and atomic_write's temporaries
_PUBLICATION_RE = re.compile(rf"\.publish-\d+-.+|{TMP_RE.pattern}")


def publish_directory(
    src: PathLike,
    master: PathLike,
    *,
    image: str,
    version: int | None = None,
    label: str = "",
    size_mib: int | None = None,
    kernel_release: str | None = None,
    modules_from: PathLike | None = None,
    modules: Sequence[str] = (),
    source_date_epoch: int = 0,
    force: bool = False,
    key: Path | None = None,
    hooks: Mapping[str, PathLike] = {},
    hook_timeout: int = HOOK_TIMEOUT,
) -> Manifest:
    """Make an ext4 image of directory `src` and publish it; returns its manifest.

    version None = latest + 1. With `kernel_release`, the root must carry
    lib/modules/<kernel_release>; `modules_from` (an unpacked kernel package) fills it
    in on a staged copy: the whole module tree, or with `modules` just those names and
    their dependencies. The staged copy also gets /usr/sbin/rackboot-mark-good, which
    the booted system runs to confirm its slot. `force` allows a version lower than latest.
    `hooks` maps pre-install/post-install to scripts the worker runs as root; they need a
    `key`, since workers run only signed hooks.
    """
    src = Path(src)
    if not src.is_dir():
        raise RackbootError(f"root filesystem {src} is not a directory")
    with _Publication(Path(master), image, version, force, key, hooks, hook_timeout) as pub:
        if kernel_release and not has_modules(src, kernel_release) and modules_from is None:
            raise RackbootError(
                f"root filesystem {src} has no modules for kernel {kernel_release}; "
                f"pass --modules-from or add lib/modules/{kernel_release}"
            )
        root = stage(src, pub.work / "root")
        if kernel_release and not has_modules(src, kernel_release):
            assert modules_from is not None  # refused above
            add_modules(root, src, Path(modules_from), kernel_release, modules)
        fs = pub.work / "rootfs.ext4"
        # seeded by the name alone: versions of one image differ only where their trees do
        make_ext4(root, fs, uuid_seed=image, size_mib=size_mib, source_date_epoch=source_date_epoch)
        # rsync mode: the tree and its file manifest
        pub.files = filemanifest.prepare(
            root, pub.work / "files", image=image, version=pub.version, epoch=source_date_epoch
        )
        with open(fs, "rb") as f:
            return pub.finish(
                f, os.path.getsize(fs), label=label, created=source_date_epoch, kernel_release=kernel_release
            )


def publish_image(
    img: PathLike,
    partition: int | str,
    master: PathLike,
    *,
    image: str,
    version: int | None = None,
    label: str = "",
    kernel_release: str | None = None,
    source_date_epoch: int = 0,
    force: bool = False,
    key: Path | None = None,
    hooks: Mapping[str, PathLike] = {},
    hook_timeout: int = HOOK_TIMEOUT,
) -> Manifest:
    """Publish the bytes of one ext4 partition of OS image `img` (MBR) as they are.

    `partition` is a number (1-4, or "2"), a filesystem label ("rootfs") or an MBR
    type ("type:83", first match).
    """
    img = Path(img)
    if not img.is_file():
        raise RackbootError(f"OS image {img} does not exist")
    part = find_partition(img, partition)
    where = f"partition {part.number} of {img}"
    if not ext4_magic(img, part.start):
        raise RackbootError(f"{where} is not an ext4 filesystem")
    if kernel_release and not image_has_modules(img, part.start, kernel_release):
        raise RackbootError(
            f"{where} has no modules for kernel {kernel_release} "
            f"(no /lib/modules/{kernel_release}); add them to the OS image"
        )
    with _Publication(Path(master), image, version, force, key, hooks, hook_timeout) as pub, open(img, "rb") as f:
        f.seek(part.start)
        return pub.finish(f, part.size, label=label, created=source_date_epoch, kernel_release=kernel_release)


def latest(master: PathLike, image: str) -> Latest | None:
    """The image's latest.json, or None when nothing is published yet."""
    path = Path(master) / "images" / image / "latest.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return formats.parse_latest(data)
    except UpdaterError as e:
        raise RackbootError(f"{path}: {e}") from None


class _Publication:
    """One version being published: picks the number, owns the work dir, commits by rename."""

    def __init__(
        self,
        master: Path,
        image: str,
        version: int | None,
        force: bool,
        key: Path | None = None,
        hooks: Mapping[str, PathLike] = {},
        hook_timeout: int = HOOK_TIMEOUT,
    ):
        self.key = key
        self.hooks = read_hooks(hooks, hook_timeout, signed=key is not None)
        if not formats.IMAGE_RE.fullmatch(image):
            raise RackbootError(f"image name {image!r} is not valid ([a-z0-9][a-z0-9._-]*)")
        self.master, self.image = master, image
        self.dir = master / "images" / image
        self.asked, self.force = version, force
        self._choose_version()  # refuse a bad version before creating anything
        self.lock: int | None = None
        self.files: formats.FileList | None = None  # the tree rsync serves, when published from a directory

    def _choose_version(self) -> None:
        current = latest(self.master, self.image)
        newest = max([current.version if current else 0, *_published_versions(self.dir)])
        version = newest + 1 if self.asked is None else self.asked
        if version < 1:
            raise RackbootError(f"image {self.image}: version must be >= 1, got {version}")
        if (self.dir / str(version)).exists():
            raise RackbootError(f"image {self.image} version {version} is already published in {self.dir}")
        if version < newest and not self.force:
            raise RackbootError(
                f"image {self.image}: version {version} is lower than the latest ({newest}); "
                "pass force=True to publish it anyway"
            )
        self.version, self.newest = version, newest

    def __enter__(self) -> _Publication:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = lock_dir(self.dir)
        try:
            sweep(self.dir, _PUBLICATION_RE)
            self._choose_version()  # again: another publication may have taken it meanwhile
            self.work = Path(tempfile.mkdtemp(prefix=f".publish-{self.version}-", dir=self.dir))
        except BaseException:
            os.close(self.lock)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.lock is not None  # __enter__ took it
        try:
            shutil.rmtree(self.work, ignore_errors=True)
        finally:
            os.close(self.lock)  # closing drops the flock

    def finish(self, data: BinaryIO, size: int, *, label: str, created: int, kernel_release: str | None) -> Manifest:
        out = self.work / "out"
        out.mkdir()
        if self.files:
            filemanifest.place(self.work / "files", out)
        start = data.tell()
        digests = compress_stream(data, size, out / STREAM_NAME)
        data.seek(start)
        earlier = [self.dir / str(v) for v in sorted(_published_versions(self.dir), reverse=True) if v < self.version]
        block_delta = write_index(data, size, out, earlier)  # index, diffs and pack for delta installs
        for hook, script in self.hooks:
            write_durable(out / hook.file, script)
        manifest = Manifest(
            image=self.image,
            version=self.version,
            label=label,
            created=created,
            fstype="ext4",
            compression=StreamCompression.GZIP,
            stream=STREAM_NAME,
            kernel_release=kernel_release,
            hooks=tuple(h for h, _ in self.hooks),
            files=self.files,
            delta=block_delta,
            **digests,
        )
        write_durable(out / "manifest.json", formats.dump(manifest))
        if self.key:
            write_durable(out / "manifest.json.sig", signing.sign(self.key, formats.dump(manifest)))
        fsync_dir(out)
        final = self.dir / str(self.version)
        try:
            os.rename(out, final)
        except OSError:
            raise RackbootError(
                f"image {self.image} version {self.version} appeared in {self.dir} while publishing; not overwritten"
            ) from None
        fsync_dir(self.dir)
        if self.version >= self.newest:  # a forced older version does not move latest back
            path = formats.manifest_path(self.image, self.version)
            atomic_write_bytes(
                self.dir / "latest.json", formats.dump(Latest(image=self.image, version=self.version, manifest=path))
            )
        return manifest


def read_hooks(hooks: Mapping[str, PathLike], timeout: int, *, signed: bool) -> list[tuple[Hook, bytes]]:
    """Each hook script with the manifest entry that pins it; refused unless it can be signed."""
    if hooks and not signed:
        raise RackbootError("hooks need the master's key ([master] key): workers run only signed hooks")
    if not 1 <= timeout <= formats.MAX_HOOK_TIMEOUT:
        raise RackbootError(f"hook timeout {timeout} s is not between 1 and {formats.MAX_HOOK_TIMEOUT}")
    out = []
    for name, path in sorted(hooks.items()):
        if name not in formats.HOOKS:
            raise RackbootError(f"hook {name!r} is not one of {', '.join(formats.HOOKS)}")
        try:
            script = Path(path).read_bytes()
        except OSError as e:
            raise RackbootError(f"hook {name}: cannot read {path}: {e.strerror}") from None
        if not 0 < len(script) <= formats.MAX_HOOK_BYTES:
            raise RackbootError(f"hook {name}: {path} is {len(script)} bytes; a hook has 1 to {formats.MAX_HOOK_BYTES}")
        hook = Hook(
            name=HookName(name),
            file=f"{name}.sh",
            size=len(script),
            sha256=hashlib.sha256(script).hexdigest(),
            timeout=timeout,
        )
        out.append((hook, script))
    return out


def _published_versions(image_dir: Path) -> list[int]:
    if not image_dir.is_dir():
        return []
    found = ((ascii_int(p.name), p) for p in image_dir.iterdir())
    return [version for version, p in found if version is not None and p.is_dir()]
