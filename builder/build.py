"""`rackboot build`: the artefacts of one config, declared as a build graph.

Each artefact states what it reads (a config slice, package hashes, template text)
so the graph can skip it when nothing changed; the work itself happens only in the
build callbacks, which is what keeps a no-op rebuild cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import lzma
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TypedDict

from rackboot.firmware import bmap, sdcard
from rackboot.firmware.boards import Board
from rackboot.firmware.boards import board as board_profile
from rackboot.uboot import image as uimage
from rackboot.uboot import script as uscript

from . import compress, cpio, elf, graph, initramfs_tree, modules, pystdlib, templates
from .config import BOOT_START_MIB, Config, plain, source_date_epoch
from .errors import RackbootError
from .files import atomic_write_bytes
from .sources import PackageCache, PackageRef, content_hash

NETBOOT_SCRIPT = "boot.scr.uimg"  # the name U-Boot's distro boot asks DHCP/TFTP for
CARD_SCRIPT = "boot.scr"  # the name distro boot looks for on the card's boot partition
BOOT_IMAGE = "boot.vfat"  # one boot area's FAT32: the card's area A, and what `rackboot plan` publishes
# What an arm64 netboot sends of the kernel: U-Boot 2023.01's booti inflates gzip, lzma, lz4
# and bzip2 (not zstd); lzma sends 8 MB of a 33 MB Image, gzip 11 MB. A Pi's U-Boot moves one
# TFTP block per round trip, so bytes are what a boot waits for. Under QEMU's emulation TFTP is
# cheap and inflating is not: lzma there costs seconds to /init (benchmarks/bench_netboot.py).
ARM64_KERNEL_COMPRESSION = "lzma"
_KERNEL_SUFFIX = {"none": "", "gzip": ".gz", "lzma": ".lzma"}

DISK_SIGNATURE = 0x7261636B  # "rack": pinned so the same inputs give the same card image


@dataclass
class Kernel:
    """The kernel a build boots: a Debian package, or a local unpacked tree."""

    root: Path  # tree with boot/vmlinuz-* and lib/modules/<kver>/
    key: str  # content identity for rebuild keys

    @cached_property
    def release(self) -> str:
        vmlinuz = self.vmlinuz
        return vmlinuz.name.removeprefix("vmlinuz-")

    @cached_property
    def vmlinuz(self) -> Path:
        found = sorted((self.root / "boot").glob("vmlinuz-*"))
        if len(found) != 1:
            raise RackbootError(f"expected one boot/vmlinuz-* in {self.root}, found {len(found)}")
        return found[0]

    def dtb(self, rel: str) -> Path:
        path = self.root / "usr/lib" / f"linux-image-{self.release}" / rel
        if not path.is_file():
            raise RackbootError(f"kernel {self.release} has no device tree {rel}")
        return path


class Inputs:
    """What a config's artefacts are made from, resolved lazily and cached per build."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.board: Board = board_profile(cfg.board.name, cfg.board.arch)
        self.cache = PackageCache(arch=self.board.arch)

    def packages(self, names: list[str]) -> list[PackageRef]:
        return self.cache.resolve(names)

    def package(self, name: str) -> PackageRef:
        """One package by name, without its dependencies."""
        return self.cache.resolve([name], with_depends=False)[0]

    @cached_property
    def kernel_ref(self) -> PackageRef:
        """The kernel's Debian package, when [kernel] path does not name a local tree."""
        name = self.cfg.kernel.package or self.board.kernel_package
        ref = self.package(name)
        if not _is_kernel_image(ref.name):
            # a metapackage (linux-image-arm64) depends on the versioned image package
            images = [d for d in ref.depends if _is_kernel_image(d)]
            if not images:
                raise RackbootError(f"Debian package {name} is not a kernel image and does not depend on one")
            ref = self.package(images[0])
        return ref

    @cached_property
    def kernel_key(self) -> str:
        path = self.cfg.kernel.path
        return content_hash(path) if path else self.kernel_ref.sha256

    @cached_property
    def kernel(self) -> Kernel:
        path = self.cfg.kernel.path
        root = path if path else self.cache.unpack(self.kernel_ref)
        return Kernel(root=Path(root), key=self.kernel_key)

    def unpacked(self, name: str) -> Path:
        return self.cache.unpack(self.package(name))


def _is_kernel_image(package: str) -> bool:
    return package.startswith("linux-image-") and package[12:13].isdigit()


def kernel_artefact(inp: Inputs) -> graph.Artefact:
    """arm64: the Image compressed as ARM64_KERNEL_COMPRESSION says, for booti to inflate
    (the boot scripts set kernel_comp_*); armhf: the zImage, which inflates itself."""
    arm64 = inp.board.boot_command == "booti"
    method = ARM64_KERNEL_COMPRESSION if arm64 else "none"

    def build(tmp: Path) -> None:
        data = inp.kernel.vmlinuz.read_bytes()
        if arm64 and data[:2] == b"\x1f\x8b":  # some arm64 vmlinuz are gzip; Debian's is a raw Image
            data = gzip.decompress(data)
        tmp.write_bytes(compressed_kernel(inp.cache.root / "kernels", data, method))

    return graph.Artefact(
        "kernel",
        "kernel",
        ("Image" + _KERNEL_SUFFIX[method]) if arm64 else "zImage",
        {"kernel": inp.kernel_key, "boot_command": inp.board.boot_command, "compression": method},
        build,
    )


def compressed_kernel(cache: Path, image: bytes, method: str) -> bytes:
    """``image`` compressed for booti. lzma takes a CPU minute for an arm64 Image, so each
    result is kept in ``cache`` by the Image's sha256: a fresh output directory reuses it."""
    if method == "none":
        return image
    kept = cache / f"{hashlib.sha256(image).hexdigest()}{_KERNEL_SUFFIX[method]}"
    if kept.is_file():
        return kept.read_bytes()
    if method == "gzip":
        data = gzip.compress(image, 9, mtime=0)
    else:  # the .lzma ("alone") format U-Boot's booti knows by its 5d 00 magic
        data = lzma.compress(image, format=lzma.FORMAT_ALONE, preset=6)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(kept, data)
    return data


def dtb_artefacts(inp: Inputs) -> list[graph.Artefact]:
    out = []
    for rel in inp.board.dtbs:
        name = Path(rel).name
        out.append(
            graph.Artefact(
                f"dtb:{name}",
                "dtb",
                f"dtbs/{name}",
                {"kernel": inp.kernel_key, "dtb": rel},
                _dtb_copier(inp, rel),
            )
        )
    return out


def _dtb_copier(inp: Inputs, rel: str) -> Callable[[Path], None]:
    """Builds one dtb artefact; the kernel is unpacked only if it runs."""

    def build(tmp: Path) -> None:
        shutil.copyfile(inp.kernel.dtb(rel), tmp)

    return build


def _is_local(package: str) -> bool:
    return package.startswith(("/", "./", "../"))


def initramfs_artefact(inp: Inputs, scratch: Path) -> graph.Artefact:
    """The initramfs; its sysroot and staged tree live in ``scratch`` (the build's stage,
    which the graph sweeps under its lock, so a killed build leaves nothing in /tmp)."""
    cfg = inp.cfg
    spec = initramfs_tree.spec(cfg, inp.board)
    refs = inp.packages([p for p in spec.packages if not _is_local(p)])
    local_roots = [(cfg.base / p).resolve() for p in spec.packages if _is_local(p)]
    for root in local_roots:
        if not root.is_dir():
            raise RackbootError(f"{cfg.path}: [initramfs] packages: local sysroot {root} is not a directory")
    inputs = {
        "initramfs": plain(cfg.initramfs),
        "board": [inp.board.name, inp.board.arch],
        "master": {
            k: v for k, v in plain(cfg.master).items() if k not in ("max_streams", "adopt", "token", "stale")
        },  # serve's alone
        "mount": cfg.layout.mount,
        "packages": sorted(f"{r.name}={r.version}:{r.sha256}" for r in refs),
        "local": {str(root): content_hash(root) for root in local_roots},
        "kernel": inp.kernel_key,
        "files": {target: content_hash(src) for target, src in sorted(spec.files.items()) if src.exists()},
        "shim": initramfs_tree.shim_hash(),
        "recipe": graph.code_hash(initramfs_tree, pystdlib, elf, modules, cpio, compress),
        "epoch": source_date_epoch(),
    }
    suffix = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst", "none": ""}[spec.compression]

    @cache
    def work() -> Path:
        return Path(tempfile.mkdtemp(prefix=".initramfs-", dir=scratch))

    @cache
    def sysroot() -> Path:
        root = inp.cache.sysroot(refs)
        if local_roots:  # local trees layered over the packages, in config order
            root = initramfs_tree.merge_trees([root, *local_roots], work() / "sysroot")
        return root

    def check() -> None:
        initramfs_tree.check(spec, sysroot=sysroot(), kernel=inp.kernel)

    def build(tmp: Path) -> None:
        try:
            stage = work() / "stage"
            stage.mkdir()
            initramfs_tree.stage(stage, spec, sysroot=sysroot(), kernel=inp.kernel)
            initramfs_tree.archive(stage, tmp, spec.compression, mtime=source_date_epoch())
        finally:
            shutil.rmtree(work(), ignore_errors=True)  # the card step needs the room

    return graph.Artefact("initramfs", "initramfs", f"initramfs.cpio{suffix}", inputs, build, check=check)


def initramfs_uimage_artefact(inp: Inputs, initramfs: graph.Artefact, out: Path) -> graph.Artefact:
    def build(tmp: Path) -> None:
        payload = (out / initramfs.filename).read_bytes()
        tmp.write_bytes(
            uimage.legacy_image(
                payload,
                image_type="ramdisk",
                arch=inp.board.uboot_arch,
                name="rackboot initramfs",
                timestamp=source_date_epoch(),
            )
        )

    return graph.Artefact(
        "initramfs-uimage",
        "initramfs",
        "initramfs.uimg",
        {"epoch": source_date_epoch(), "arch": inp.board.uboot_arch},
        build,
        after=(initramfs.name,),
    )


class BoardContext(TypedDict):
    name: str
    arch: str
    console: str
    boot_command: str


class TftpContext(TypedDict):
    blocksize: int
    timeout_ms: int
    timeout_count: int


class ScriptContext(TypedDict):
    """What the boot script templates read."""

    board: BoardContext
    cmdline: str
    master_url: str
    sources: str  # rackboot.sources: [master] sources, comma-separated
    serverip: str
    tftp: TftpContext
    kernel: str
    kernel_comp: bool  # booti inflates the kernel: the scripts set kernel_comp_addr_r and _size
    initramfs: str
    dtb: str
    netboot_script: str


def serverip(address: str) -> str:
    """The master as U-Boot's TFTP server: its IPv4 address, or "" for a hostname (U-Boot
    resolves none; the DHCP server's next-server stays)."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        return ""


def script_context(inp: Inputs, kernel: str, initramfs: str) -> ScriptContext:
    """What the boot script templates read: also the scripts' rebuild key."""
    return {
        "board": {
            "name": inp.board.name,
            "arch": inp.board.arch,
            "console": inp.board.console,
            "boot_command": inp.board.boot_command,
        },
        "cmdline": inp.cfg.kernel.cmdline,
        "master_url": inp.cfg.master.url,
        "sources": ",".join(inp.cfg.master.sources),
        "serverip": serverip(inp.cfg.master.address),
        "tftp": {
            "blocksize": inp.board.tftp_blocksize,
            "timeout_ms": inp.board.tftp_timeout_ms,
            "timeout_count": inp.board.tftp_timeout_count,
        },
        "kernel": kernel,
        "kernel_comp": inp.board.boot_command == "booti" and ARM64_KERNEL_COMPRESSION != "none",
        "initramfs": initramfs,
        "dtb": f"dtbs/{Path(inp.board.dtbs[0]).name}" if inp.board.dtbs else "",
        "netboot_script": NETBOOT_SCRIPT,
    }


def script_artefact(inp: Inputs, name: str, filename: str, template: str, context: ScriptContext) -> graph.Artefact:
    def build(tmp: Path) -> None:
        text = uscript.render(template, **context)
        tmp.write_bytes(
            uimage.script_image(text, arch=inp.board.uboot_arch, name=f"rackboot {name}", timestamp=source_date_epoch())
        )

    inputs = {
        "context": context,
        "template": uscript.template_hash(template),
        "epoch": source_date_epoch(),
        "recipe": graph.code_hash(uimage, uscript),
    }
    return graph.Artefact(name, "uboot-script", filename, inputs, build)


def card_files(inp: Inputs, out: Path, on_card: list[graph.Artefact]) -> dict[str, Path | bytes]:
    """What the SD card's boot partition holds: our artefacts, and for Pis the firmware,
    config.txt and U-Boot from Debian's raspi-firmware and u-boot-rpi."""
    files: dict[str, Path | bytes] = {a.filename: out / a.filename for a in on_card}
    public = inp.cfg.master.public_key
    if public:  # for people checking a card by hand; the updater reads the initramfs's copy
        files["rackboot.pub"] = public
    board = inp.board
    if board.is_pi:
        uboot = inp.unpacked(board.uboot_package)
        files["u-boot.bin"] = uboot / board.uboot_binary
        firmware = inp.unpacked(board.firmware_package) / "usr/lib/raspi-firmware"
        for name in board.firmware_files:
            files[name] = firmware / name
        files["config.txt"] = templates.render("rackboot.firmware", "config.txt.j2", board=board).encode()
        for a in on_card:
            if a.kind == "dtb":  # the firmware picks the board's tree from the partition's root
                files[Path(a.filename).name] = out / a.filename
    return files


def _public_key_hash(cfg: Config) -> str:
    public = cfg.master.public_key
    return content_hash(public) if public and public.is_file() else ""


def sdcard_artefacts(inp: Inputs, out: Path, on_card: list[graph.Artefact]) -> list[graph.Artefact]:
    board = inp.board
    boot_size_mib, boot_type = inp.cfg.layout.boot_size_mib, inp.cfg.layout.partitions[0].type
    inputs = {
        "board": [board.name, board.arch],
        "boot_size_mib": boot_size_mib,
        "boot_type": boot_type,
        "epoch": source_date_epoch(),
        "config_txt": templates.source_hash("rackboot.firmware", "config.txt.j2"),
        "recipe": graph.code_hash(sdcard),
        "master_key": _public_key_hash(inp.cfg),
    }
    if board.is_pi:
        inputs["packages"] = [
            f"{r.name}={r.version}:{r.sha256}"
            for r in (inp.package(board.uboot_package), inp.package(board.firmware_package))
        ]

    def build_boot(tmp: Path) -> None:
        sdcard.boot_image(
            tmp,
            card_files(inp, out, on_card),
            boot_size_mib=boot_size_mib,
            boot_start_mib=BOOT_START_MIB,
            volume_id=DISK_SIGNATURE,
            mtime=source_date_epoch(),
        )

    def build_card(tmp: Path) -> None:
        sdcard.card_image(
            tmp,
            out / BOOT_IMAGE,
            boot_size_mib=boot_size_mib,
            boot_type=int(boot_type, 16),
            boot_start_mib=BOOT_START_MIB,
            disk_signature=DISK_SIGNATURE,
        )

    def build_bmap(tmp: Path) -> None:
        tmp.write_text(bmap.bmap_text(out / "sdcard.img"))

    # the boot area's FAT (the master serves it to keep cards current, bootfiles.py), then the card around it
    boot = graph.Artefact("boot-image", "boot", BOOT_IMAGE, inputs, build_boot, after=tuple(a.name for a in on_card))
    card = graph.Artefact("sdcard", "sdcard", "sdcard.img", inputs, build_card, after=(boot.name,))
    return [
        boot,
        card,
        graph.Artefact(
            "sdcard-bmap", "bmap", "sdcard.bmap", {"recipe": graph.code_hash(bmap)}, build_bmap, after=("sdcard",)
        ),
    ]


def artefacts(inp: Inputs, out: Path) -> list[graph.Artefact]:
    """The build graph of one config, in dependency order; ``out`` is where the steps read
    each other's outputs: the graph's stage."""
    kernel = kernel_artefact(inp)
    dtbs = dtb_artefacts(inp)
    ird = initramfs_artefact(inp, out)
    steps = [kernel, *dtbs, ird]
    if inp.cfg.initramfs.uboot_wrap:
        steps.append(initramfs_uimage_artefact(inp, ird, out))
    context = script_context(inp, kernel.filename, ird.filename)
    netboot = script_artefact(inp, "netboot-script", NETBOOT_SCRIPT, "netboot.cmd.j2", context)
    card_script = script_artefact(inp, "card-script", CARD_SCRIPT, "card.cmd.j2", context)
    steps += [netboot, card_script]
    steps += sdcard_artefacts(inp, out, [kernel, *dtbs, ird, card_script])
    return steps


def build(cfg: Config, out: Path | None = None, log: Callable[[str], None] = print) -> Path:
    out = Path(out) if out else cfg.output.directory
    inp = Inputs(cfg)
    log(f"rackboot build: {cfg.path} -> {out}")
    result = graph.run(artefacts(inp, graph.stage_dir(out)), out, log=log)
    log(f"rebuilt {len(result.rebuilt)} of {len(result.outcomes)} artefacts")
    return out
