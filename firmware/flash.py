"""`rackboot flash`: the SD card image onto cards, one device path typo away from nothing.

It lists the machine's disks (pyudev: the kernel's and udev's records) with model, size
and mounts, and writes only a card that passes every rule: removable media (sysfs
`removable`, or on a USB or SD/MMC bus: card readers), not holding `/`, nothing of it
mounted, used as swap or held by device-mapper, writable, big enough for the image, and
no larger than a bound (default 256 GiB: an SD card, not a backup disk) unless --force.
The device is opened O_EXCL, which the kernel refuses while anything has it claimed.

Like `bmaptool copy`, it writes only the blocks the bmap maps, after checking the image
against the bmap's sha256 per range (a corrupt image writes nothing); then it fsyncs,
drops the card's cached pages and reads every mapped range back from the card against
the same checksums: a card that does not hold what was written is reported, never
passed as good. With --loop it waits (a pyudev monitor) for the next card inserted,
writes it, and says when it may be removed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from rackboot.errors import RackbootError

from . import bmap as bmapfile

if TYPE_CHECKING:  # imported where used: the CLI's other commands never load it
    import pyudev

GIB = 1 << 30
DEFAULT_MAX_GIB = 256
CHUNK = 1 << 20
CARD_BUSES = ("usb", "mmc")  # card readers on USB, SD hosts on MMC


@dataclass(frozen=True)
class Card:
    """One whole block device as the flash command judges it."""

    devnode: str
    size: int  # bytes; 0 = no medium in the reader
    model: str
    bus: str  # usb, mmc, or "" (virtual, PCI, SATA...)
    removable: bool  # sysfs removable=1
    read_only: bool
    mounted: tuple[str, ...]  # mount points (and "swap") of the disk and its partitions
    holders: tuple[str, ...]  # device-mapper / md devices built on it
    holds_root: bool

    def describe(self) -> str:
        what = [self.model or "unknown model", f"{self.size / GIB:.1f} GiB" if self.size else "no medium"]
        what.append(f"on {self.bus}" if self.bus else "not on USB or an SD host")
        if self.mounted:
            what.append("mounted at " + ", ".join(self.mounted))
        return f"{self.devnode}: " + ", ".join(what)


def refusal(card: Card, *, image_size: int, max_bytes: int, force: bool) -> str:
    """Why ``card`` must not be written ("" when it may), most serious reason first."""
    if card.holds_root:
        return "it holds / (the running system)"
    if not (card.removable or card.bus in CARD_BUSES):
        return "it is not removable media (not a card reader, USB or SD device)"
    if card.mounted:
        return f"it is mounted at {', '.join(card.mounted)} (unmount it first)"
    if card.holders:
        return f"it is in use by {', '.join(card.holders)}"
    if card.size == 0:
        return "there is no card in it"
    if card.read_only:
        return "it is read-only (the card's lock switch?)"
    if card.size < image_size:
        return f"it holds {card.size} bytes, less than the image's {image_size}"
    if card.size > max_bytes and not force:
        return (
            f"it is {card.size / GIB:.1f} GiB, larger than the {max_bytes / GIB:g} GiB a card should be "
            "(--force writes it anyway)"
        )
    return ""


# --- the machine's disks -------------------------------------------------------------


def _mounts() -> dict[int, list[str]]:
    """Device number -> mount points, from the mount table (and active swap devices)."""
    found: dict[int, list[str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            major, minor = fields[2].split(":")
            point = fields[4].replace("\\040", " ")
            found.setdefault(os.makedev(int(major), int(minor)), []).append(point)
    with open("/proc/swaps", encoding="utf-8") as f:
        for line in f.readlines()[1:]:
            path = line.split()[0]
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                found.setdefault(st.st_rdev, []).append("swap")
    return found


def _disk_of(device: pyudev.Device) -> pyudev.Device:
    return device if device.properties.get("DEVTYPE") == "disk" else device.find_parent("block", "disk") or device


def root_disks(context: pyudev.Context) -> set[str]:
    """The disks under `/`: its device's disk, and through device-mapper the disks below."""
    import pyudev

    number = os.stat("/").st_dev
    if os.major(number) == 0:  # an overlay, tmpfs or network root: no block device of its own
        return set()
    try:
        start = pyudev.Devices.from_device_number(context, "block", number)
    except pyudev.DeviceNotFoundError:
        return set()
    disks: set[str] = set()
    todo = [start]
    while todo:
        device = _disk_of(todo.pop())
        if device.sys_path in disks:
            continue
        disks.add(device.sys_path)
        slaves = Path(device.sys_path) / "slaves"
        for name in sorted(os.listdir(slaves)) if slaves.is_dir() else []:
            todo.append(pyudev.Devices.from_name(context, "block", name))
    return disks


def _attribute(device: pyudev.Device, name: str) -> str:
    value = device.attributes.get(name)
    return value.decode("utf-8", "replace").strip() if value is not None else ""


def _bus(device: pyudev.Device) -> str:
    bus = device.properties.get("ID_BUS", "")  # udev's, where udevd runs
    if bus:
        return str(bus)
    for parent in device.ancestors:  # the kernel's own record otherwise
        if parent.subsystem in CARD_BUSES:
            return str(parent.subsystem)
    return ""


def card_from_device(device: pyudev.Device, mounts: dict[int, list[str]], roots: set[str]) -> Card:
    """A Card from pyudev's record of a whole disk."""
    parts = [device, *(c for c in device.children if c.subsystem == "block")]
    mounted = sorted({p for d in parts for p in mounts.get(d.device_number, [])})
    holders = sorted(
        name
        for d in parts
        if (Path(d.sys_path) / "holders").is_dir()
        for name in os.listdir(Path(d.sys_path) / "holders")
    )
    model = " ".join(
        v
        for v in (
            device.properties.get("ID_VENDOR", "") or _attribute(device, "device/vendor"),
            device.properties.get("ID_MODEL", "") or _attribute(device, "device/model"),
        )
        if v
    )
    size = _attribute(device, "size")
    return Card(
        devnode=str(device.device_node),
        size=int(size) * 512 if size.isdigit() else 0,
        model=model.replace("_", " "),
        bus=_bus(device),
        removable=_attribute(device, "removable") == "1",
        read_only=_attribute(device, "ro") == "1",
        mounted=tuple(mounted),
        holders=tuple(holders),
        holds_root=device.sys_path in roots,
    )


def list_cards(context: pyudev.Context | None = None) -> list[Card]:
    """Every whole disk with a device node, sorted by name (the rules judge them, not this)."""
    import pyudev

    context = context or pyudev.Context()
    mounts, roots = _mounts(), root_disks(context)
    disks = [d for d in context.list_devices(subsystem="block", DEVTYPE="disk") if d.device_node]
    return sorted((card_from_device(d, mounts, roots) for d in disks), key=lambda c: c.devnode)


def card(devnode: str, context: pyudev.Context | None = None) -> Card:
    """The Card for ``devnode``: a whole disk's device node (not a partition's)."""
    import pyudev

    context = context or pyudev.Context()
    try:
        st = os.stat(devnode)
    except OSError as exc:
        raise RackbootError(f"{devnode}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise RackbootError(f"{devnode} is not a block device")
    device = pyudev.Devices.from_device_number(context, "block", st.st_rdev)
    if device.properties.get("DEVTYPE") != "disk":
        raise RackbootError(f"{devnode} is a partition: name the whole card ({_disk_of(device).device_node})")
    return card_from_device(device, _mounts(), root_disks(context))


# --- writing ---------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal; nothing elsewhere (logs get the summary line)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = max(total, 1), what, 0
        self.tty = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done += n
        if self.tty:
            filled = 30 * self.done // self.total
            sys.stderr.write(
                f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] {100 * self.done // self.total:3d}% "
                f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _ranges(f: BinaryIO, block_map: bmapfile.BlockMap) -> Iterator[tuple[bmapfile.Range, int, Iterator[bytes]]]:
    """Each mapped range with its offset and its bytes in chunks, read from ``f``."""
    for r in block_map.ranges:
        start = r.first * block_map.block_size
        length = min((r.last + 1) * block_map.block_size, block_map.image_size) - start

        def chunks(start: int = start, length: int = length) -> Iterator[bytes]:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(left, CHUNK))
                if not chunk:
                    raise RackbootError(f"{f.name}: ends at byte {start + length - left}, inside a mapped range")
                left -= len(chunk)
                yield chunk

        yield r, start, chunks()


def check_image(image: Path, block_map: bmapfile.BlockMap) -> None:
    """The image is the one the bmap describes: its size and every mapped range's sha256."""
    size = image.stat().st_size
    if size != block_map.image_size:
        raise RackbootError(f"{image} is {size} bytes; its bmap says {block_map.image_size}")
    with open(image, "rb") as f:
        for r, _, chunks in _ranges(f, block_map):
            h = hashlib.sha256()
            for chunk in chunks:
                h.update(chunk)
            if h.hexdigest() != r.sha256:
                raise RackbootError(f"{image}: blocks {r.first}-{r.last} differ from its bmap (a damaged image?)")


def write_card(
    image: Path, block_map: bmapfile.BlockMap, devnode: str, *, progress: Callable[[int, str], Progress] = Progress
) -> int:
    """Write the image's mapped ranges onto ``devnode``, fsync, and read them back from the
    card against the bmap; returns the bytes written. The caller has judged the device."""
    check_image(image, block_map)
    total = block_map.mapped_bytes
    try:
        fd = os.open(devnode, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)  # EBUSY while anything claims it
    except OSError as exc:
        raise RackbootError(f"cannot open {devnode} for writing: {exc.strerror}") from None
    bar = progress(total, f"writing {devnode}")
    try:
        if os.lseek(fd, 0, os.SEEK_END) < block_map.image_size:
            raise RackbootError(f"{devnode} is smaller than the image ({block_map.image_size} bytes)")
        with open(image, "rb") as f:
            for _, start, chunks in _ranges(f, block_map):
                os.lseek(fd, start, os.SEEK_SET)
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    bar.add(len(chunk))
        os.fsync(fd)
    except OSError as exc:
        raise RackbootError(f"writing {devnode}: {exc.strerror}") from None
    finally:
        os.close(fd)
        bar.close()
    verify_card(devnode, block_map, progress=progress)
    return total


def verify_card(
    devnode: str, block_map: bmapfile.BlockMap, *, progress: Callable[[int, str], Progress] = Progress
) -> None:
    """Read every mapped range back from the card itself (its cached pages dropped first)
    and check it against the bmap's sha256."""
    bar = progress(block_map.mapped_bytes, f"verifying {devnode}")
    try:
        with open(devnode, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for r, _, chunks in _ranges(f, block_map):
                h = hashlib.sha256()
                for chunk in chunks:
                    h.update(chunk)
                    bar.add(len(chunk))
                if h.hexdigest() != r.sha256:
                    raise RackbootError(
                        f"{devnode}: blocks {r.first}-{r.last} read back differently from what was written "
                        "(a failing or fake-capacity card?)"
                    )
    except OSError as exc:
        raise RackbootError(f"reading {devnode} back: {exc.strerror}") from None
    finally:
        bar.close()


# --- waiting for cards -------------------------------------------------------------------


def udev_running() -> bool:
    return os.path.exists("/run/udev/control")


def inserted(monitor: pyudev.Monitor, *, timeout: float | None, seen: set[str]) -> Iterator[pyudev.Device | None]:
    """Whole disks as they get a medium (a reader's disk appears, or its size stops being
    0); None each time ``timeout`` seconds pass without one. A card stays in ``seen`` until
    it is removed, so one insertion is one write."""
    while True:
        device = monitor.poll(timeout=timeout)
        if device is None:
            yield None
            continue
        if device.properties.get("DEVTYPE") != "disk" or not device.device_node:
            continue
        size = _attribute(device, "size") if device.action != "remove" else "0"
        if device.action == "remove" or size in ("", "0"):
            seen.discard(device.device_node)
            continue
        if device.action in ("add", "change") and device.device_node not in seen:
            seen.add(device.device_node)
            yield device


# --- the command -----------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", nargs="?", help="the card's whole-disk device, e.g. /dev/sdb or /dev/mmcblk0")
    p.add_argument("--image", type=Path, help="the SD image (default: sdcard.img in the config's output directory)")
    p.add_argument("--bmap", type=Path, help="its block map (default: the image's name with .bmap)")
    p.add_argument("--list", action="store_true", help="list the machine's disks and whether each may be written")
    p.add_argument(
        "--max-size-gib",
        type=int,
        default=DEFAULT_MAX_GIB,
        help=f"refuse a device larger than this (default {DEFAULT_MAX_GIB}): an SD card, not a backup disk",
    )
    p.add_argument("--force", action="store_true", help="write a device larger than --max-size-gib (nothing else)")
    p.add_argument("--loop", action="store_true", help="write every card inserted from now on, one after another")
    p.add_argument("--count", type=int, default=0, help="with --loop: stop after this many cards (default: Ctrl-C)")


def _image_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    image = args.image
    if image is None:
        from rackboot import config

        image = config.load(args.config).output.directory / "sdcard.img"
    bmap_path = args.bmap or image.with_suffix(".bmap")
    for path, what in ((image, "image"), (bmap_path, "bmap")):
        if not path.is_file():
            raise RackbootError(f"the {what} {path} does not exist (rackboot build makes it)")
    return image, bmap_path


def _print_list(cards: Iterable[Card], image_size: int, max_bytes: int, force: bool) -> None:
    for c in cards:
        why = refusal(c, image_size=image_size, max_bytes=max_bytes, force=force)
        print(f"{c.describe()}: {'refused: ' + why if why else 'may be written'}")


def command(args: argparse.Namespace) -> int:
    image, bmap_path = _image_paths(args)
    block_map = bmapfile.read_bmap(bmap_path)
    max_bytes = args.max_size_gib * GIB
    if args.list or (args.device is None and not args.loop):
        _print_list(list_cards(), block_map.image_size, max_bytes, args.force)
        if not args.list:
            print("name one of them, or --loop to write cards as they are inserted")
        return 0
    if args.loop:
        return loop(image, block_map, max_bytes=max_bytes, force=args.force, count=args.count)
    target = card(args.device)
    why = refusal(target, image_size=block_map.image_size, max_bytes=max_bytes, force=args.force)
    if why:
        raise RackbootError(f"refusing to write {target.describe()}: {why}")
    written = write_card(image, block_map, target.devnode)
    print(f"{target.devnode}: wrote and verified {written} bytes of {image.name}; it may be removed")
    return 0


def loop(
    image: Path,
    block_map: bmapfile.BlockMap,
    *,
    max_bytes: int,
    force: bool,
    count: int = 0,
    judge: Callable[[Card], str] | None = None,
    timeout: float | None = None,
    ready: Callable[[], None] = lambda: None,
) -> int:
    """Write each card inserted from now on; refused ones are named with their reason.
    Stops after ``count`` cards (0: never) or after ``timeout`` seconds with none inserted."""
    import pyudev

    check_image(image, block_map)
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="udev" if udev_running() else "kernel")
    monitor.filter_by("block")
    monitor.start()
    judge = judge or (lambda c: refusal(c, image_size=block_map.image_size, max_bytes=max_bytes, force=force))
    seen = {c.devnode for c in list_cards(context) if c.size}  # cards already in: not this loop's
    print(f"waiting for cards to write {image.name} onto (Ctrl-C to stop)", flush=True)
    ready()
    written = 0
    for device in inserted(monitor, timeout=timeout, seen=seen):
        if device is None:
            raise RackbootError(f"no card was inserted within {timeout:g} s")
        found = card_from_device(device, _mounts(), root_disks(context))
        why = judge(found)
        if why:
            print(f"not writing {found.describe()}: {why}", flush=True)
            continue
        write_card(image, block_map, found.devnode)
        written += 1
        print(f"card {written}: {found.devnode} written and verified; it may be removed", flush=True)
        if count and written >= count:
            break
    return 0
