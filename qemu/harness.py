"""The workers and master that `rackboot demo`, the power-cut torture and the e2e tests
share: a prepared master tree and build, the example image, a blank card, the master
serving in a thread, and an emulated worker that netboots the build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rackboot import build, config
from rackboot.build import Inputs
from rackboot.errors import RackbootError
from rackboot.initramfs.updater.formats import HOOKS, Manifest
from rackboot.master import publish, serve, signing

from .machines import profile
from .netns import RackNetwork
from .runner import QemuWorker

DISK_MIB = 1024
IMAGE = "example"
# Marks a directory the demo created, and so may empty again on its next run; the demo
# never deletes a directory without it.
MARKER = ".rackboot-demo"


def example_root(cfg: config.Config, src: Path, version: str, dest: Path, *, broken: bool = False) -> Path:
    """The example root filesystem: busybox, an init that says which version is up and
    confirms its slot (unless ``broken``: then it never does). ``dest`` is in the demo's
    work directory."""
    check_rootfs(src)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=True)
    inp = Inputs(cfg)
    busybox = inp.unpacked("busybox-static") / "bin/busybox"
    (dest / "bin").mkdir(exist_ok=True)
    shutil.copyfile(busybox, dest / "bin/busybox")
    (dest / "bin/busybox").chmod(0o755)
    for sub in ("etc", "proc", "sys", "dev", "tmp", "run"):
        (dest / sub).mkdir(exist_ok=True)
    (dest / "etc/rackboot-release").write_text(version + "\n")
    if broken:
        (dest / "etc/rackboot-demo-broken").write_text("this version never confirms its slot\n")
    return dest


def blank_card(sdcard: Path, disk: Path) -> None:
    """A blank 1 GiB card with the SD image written at its start, as `dd` would."""
    with open(disk, "wb") as out, open(sdcard, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
        out.truncate(DISK_MIB << 20)


def image_bytes(stats: dict[str, Any]) -> int:
    """Image bytes a master's /stats says it served: not the plans and manifests every boot reads."""
    return sum(
        n
        for path, n in stats["bytes_sent"].items()
        if path.startswith("/images/") and not path.endswith((".json", ".sig"))
    )


class MasterThread:
    """`rackboot serve` in a thread, on the port the worker's kernel command line names."""

    def __init__(self, cfg: config.Config):
        self.server = serve.make_server(
            cfg.master.directory,
            "127.0.0.1",
            cfg.master.port,
            quiet=True,
            max_streams=cfg.master.max_streams,
            config=cfg,  # the inventory's adoption mode, rollouts' plans
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bytes_sent(self) -> int:
        return image_bytes(self.server.stats())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def new_worker(
    cfg: config.Config, out: Path, disk: Path, log: Path, *, offline: bool = False, **options: Any
) -> QemuWorker:
    """An emulated worker (not started) that netboots ``out`` with ``disk`` as its card;
    ``options`` go to QemuWorker (faults=[...], for one)."""
    machine = profile(cfg.board.name, cfg.board.arch)
    options.update(card_uboot(cfg, out) if machine.uboot == "card" else {})
    if cfg.initramfs.watchdog and not machine.watchdog_can_arm:
        raise RackbootError(
            f"{cfg.path}: [initramfs] watchdog must be 0 on the emulated {machine.name}: "
            "QEMU resets it the moment the watchdog is armed"
        )
    # Offline: no TFTP either, so U-Boot falls back to the card's own kernel and initramfs.
    return QemuWorker(
        machine, log_path=log, tftp_dir=None if offline else out, bootfile=build.NETBOOT_SCRIPT, disks=[disk], **options
    )


def card_uboot(cfg: config.Config, out: Path) -> dict[str, Path]:
    """What a Pi's GPU firmware would hand the CPU from the card, for QEMU to load instead:
    config.txt's kernel= (u-boot-rpi's U-Boot) and the board's device tree (the build's,
    the same files the card holds)."""
    board = Inputs(cfg).board
    if not board.dtbs:
        raise RackbootError(f"board {board.name} has no device tree to hand its U-Boot")
    return {
        "kernel": Inputs(cfg).unpacked(board.uboot_package) / board.uboot_binary,
        "dtb": out / "dtbs" / Path(board.dtbs[0]).name,
    }


def rackboot_command() -> Path:
    """The `rackboot` entry point of the Python running us (the venv's, in a venv)."""
    return Path(sys.executable).parent / "rackboot"


class MasterProcess:
    """`rackboot serve` as a process inside a rack network's namespace, bound to the
    master's address there; its log (and its dnsmasq's) goes to ``log``."""

    def __init__(self, cfg: config.Config, rack: RackNetwork, log: Path, *, timeout: float = 30):
        self.rack = rack
        self.log = log
        self.url = f"http://{rack.master}:{cfg.master.port}"
        command = [str(rackboot_command()), "serve", "-c", str(cfg.path), "--bind", rack.master]
        self.proc = rack.spawn(command, log)
        self._wait_up(timeout)

    def get(self, path: str) -> bytes:
        """GET ``path`` from the master, from inside the namespace (the host has no route there)."""
        done = subprocess.run(
            self.rack.command(["curl", "-sSf", "--max-time", "10", self.url + path]), capture_output=True
        )
        if done.returncode != 0:
            raise RackbootError(f"GET {self.url}{path}: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RackbootError(f"rackboot serve in {self.rack.name} exited: {_last_line(self.log)}")
            try:
                self.get("/stats")
                return
            except RackbootError:
                if time.monotonic() > deadline:
                    raise RackbootError(
                        f"rackboot serve in {self.rack.name} did not answer within {timeout:g} s: "
                        f"{_last_line(self.log)}"
                    ) from None
                time.sleep(0.2)

    def bytes_sent(self) -> int:
        return image_bytes(json.loads(self.get("/stats")))

    def stop(self) -> None:
        self.rack.stop(self.proc)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1] if lines else f"(nothing in {log})"


def start_site_router(rack: RackNetwork, work: Path, next_server: str) -> subprocess.Popen[bytes]:
    """A dnsmasq standing in for a site's router inside ``rack``: DHCP only (no DNS, no
    TFTP), leasing from rack.dhcp_range() with ``next_server`` as the next-server, which
    U-Boot's dhcp takes for serverip. Its config, leases and log are work/router.*."""
    first, last = rack.dhcp_range()
    lines = [
        f"# the site's router: a DHCP-only dnsmasq the rackboot harness started in {rack.name}",
        "port=0",
        f"interface={rack.bridge}",
        "bind-interfaces",
        "user=root",  # its leases are in root's private tmp directory
        f"dhcp-leasefile={work / 'router.leases'}",
        "log-facility=-",
        f"dhcp-range={first},{last},{rack.network.netmask},1h",
        "dhcp-authoritative",
        "log-dhcp",
        f"dhcp-boot={build.NETBOOT_SCRIPT},,{next_server}",  # points netboots at another server
    ]
    conf = work / "router.conf"
    conf.write_text("\n".join(lines) + "\n")
    return rack.spawn(["dnsmasq", "--keep-in-foreground", "--pid-file", f"--conf-file={conf}"], work / "router.log")


def new_rack_worker(cfg: config.Config, rack: RackNetwork, i: int, disk: Path, log: Path, **options: Any) -> QemuWorker:
    """Worker ``i`` of ``rack`` (not started): QEMU in the namespace on tap ``i`` with its
    own MAC; DHCP and TFTP come from the rack's servers."""
    machine = profile(cfg.board.name, cfg.board.arch)
    return QemuWorker(
        machine, log_path=log, netns=rack.name, tap=rack.taps[i], mac=rack.mac(i), disks=[disk], **options
    )


def check_rootfs(rootfs: Path) -> None:
    if not rootfs.is_dir():
        raise RackbootError(f"the demo publishes the example root filesystem {rootfs}, which is not a directory")


def check_owned(path: Path, what: str, setting: str) -> None:
    """Refuse a directory the demo would empty but did not create (no marker, not empty)."""
    if path.exists() and not path.is_dir():
        raise RackbootError(f"{what} {path} is not a directory")
    if path.is_dir() and not (path / MARKER).is_file() and any(path.iterdir()):
        raise RackbootError(
            f"{what} {path} holds files the demo did not make; point {setting} at a new directory for the demo"
        )


def check_apart(dirs: dict[str, Path]) -> None:
    """The directories the demo empties must not hold each other or the build output."""
    named = [(what, path.resolve()) for what, path in dirs.items()]
    for i, (what, path) in enumerate(named):
        for other, other_path in named[i + 1 :]:
            if path == other_path or path.is_relative_to(other_path) or other_path.is_relative_to(path):
                raise RackbootError(
                    f"{what} {path} and {other} {other_path} overlap; the demo empties "
                    "its master and work directories on every run"
                )


def start_afresh(path: Path) -> None:
    """Empty a directory the demo owns (see check_owned), or create it, and mark it as the demo's."""
    if path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by `rackboot demo`, which empties this directory on every run\n")


def prepare(cfg: config.Config, work: Path, log: Callable[[str], None] = print) -> Path:
    """Build, and start ``work`` (logs/) and the master's tree afresh; returns the build output.
    Either directory must be the demo's own (or new, or empty): anything else is refused
    before the build."""
    master_dir = cfg.master.directory
    check_apart(
        {
            "the master directory": master_dir,
            "the demo's work directory": work,
            "the build output": cfg.output.directory,
        }
    )
    check_owned(master_dir, "the master directory", f"{cfg.path}: [master] directory")
    check_owned(work, "the demo's work directory", "--workdir")
    key = cfg.master.key
    if key and not key.exists():  # the demo's own key; a real rack makes one with rackboot keygen
        signing.keygen(key)
    out = build.build(cfg, log=log)
    start_afresh(work)
    (work / "logs").mkdir()
    start_afresh(master_dir)
    return out


def example_hooks(cfg: config.Config) -> dict[str, Path]:
    """The example's signed hooks (hooks/<when>.sh beside the config), when it has a key."""
    if not cfg.master.key:
        return {}
    return {when: path for when in HOOKS if (path := cfg.base / "hooks" / f"{when}.sh").is_file()}


def publish_example(cfg: config.Config, rootfs: Path, work: Path, version: int, *, broken: bool = False) -> Manifest:
    """Publish ``rootfs`` as the example image's ``version``, with the example's hooks;
    returns its manifest."""
    kernel = Inputs(cfg).kernel
    root = example_root(cfg, rootfs, f"v{version}", work / f"rootfs-v{version}", broken=broken)
    return publish.publish_directory(
        root,
        cfg.master.directory,
        image=IMAGE,
        version=version,
        label=f"v{version}",
        kernel_release=kernel.release,
        modules_from=kernel.root,
        modules=cfg.kernel.root_modules,
        source_date_epoch=config.source_date_epoch(),
        key=cfg.master.key,
        hooks=example_hooks(cfg),
    )
