"""`rackboot qemu`: boot a build's artefacts on an emulated worker."""

from __future__ import annotations

from pathlib import Path

from . import build
from .config import Config
from .errors import RackbootError


def qemu_command(cfg: Config, *, expect: str | None, timeout: float, disks: list[Path], log: Path | None) -> int:
    """Boot through U-Boot, DHCP and TFTP from the build directory; 0 when ``expect`` was
    seen, or without it when the worker powered off having booted (or probed). It says
    what it booted, and a worker that powered off with nothing to boot (no card) is an
    error naming the reason /init gave."""
    from rackboot.qemu.machines import profile
    from rackboot.qemu.runner import QemuWorker

    out = cfg.output.directory
    if not (out / build.NETBOOT_SCRIPT).is_file():
        raise RackbootError(f"{out} has no {build.NETBOOT_SCRIPT}; run rackboot build -c {cfg.path} first")
    for disk in disks:
        if not disk.is_file():
            raise RackbootError(f"disk image {disk} does not exist")
    log = log or out.parent / f"{out.name}-console.log"
    machine = profile(cfg.board.name, cfg.board.arch)
    options: dict[str, Path] = {}
    if machine.uboot == "card":  # an emulated Pi: its U-Boot and tree come from the card
        from rackboot.qemu.harness import card_uboot

        if not disks:
            raise RackbootError(
                f"the emulated {machine.name} boots from its card: give --disk (sdcard.img at its start)"
            )
        options = card_uboot(cfg, out)
    with QemuWorker(
        machine,
        log_path=log,
        tftp_dir=out,
        bootfile=build.NETBOOT_SCRIPT,
        disks=disks,
        kernel=options.get("kernel"),
        dtb=options.get("dtb"),
    ) as worker:
        cards = ", ".join(str(d) for d in disks) if disks else "no disk (a worker without a card)"
        print(f"booting {machine.name}/{machine.arch} with {cards}; console log: {log}", flush=True)
        if expect is None:
            worker.wait_exit(timeout)
            if (why := worker.nothing_to_boot()) is not None:
                raise RackbootError(f"worker powered off with nothing to boot: {why} (log: {log})")
            booted = worker.booted()
            print(f"worker booted slot {booted}, then powered off" if booted else "worker powered off")
            return 0
        match = worker.expect(expect, timeout)
        print(f"seen: {match.string.strip()}")
        if booted := worker.booted():
            print(f"worker booted slot {booted}")
    return 0
