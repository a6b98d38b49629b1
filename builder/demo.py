"""`make demo`: the whole story on an emulated worker with a blank 1 GiB card.

Build; publish the example root filesystem as v1; serve; boot a worker whose card
holds only the SD image. Boot 1 lays out the card and installs v1; boot 2 fetches
nothing; v2 is published and boot 3 installs it; boot 4 runs with the master down and
boots v2 from the card. A summary table ends it.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import build, config
from .master import plans, publish, serve, signing
from .build import Inputs
from .errors import RackbootError
from .initramfs.updater.formats import HOOKS

DISK_MIB = 1024
IMAGE = "example"
# Marks a directory the demo created, and so may empty again on its next run; the demo
# never deletes a directory without it.
MARKER = ".rackboot-demo"


@dataclass
class BootRow:
    boot: int
    expected: str
    action: str
    bytes_fetched: int
    seconds: float


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


class Master:
    """`rackboot serve` in a thread, on the port the worker's kernel command line names."""

    def __init__(self, cfg: config.Config):
        self.server = serve.make_server(cfg.get("master", "directory"), "127.0.0.1", cfg.get("master", "port"),
                                        quiet=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bytes_sent(self) -> int:
        """Image bytes served: streams only, not the plans and manifests every boot reads."""
        return sum(n for path, n in self.server.stats()["bytes_sent"].items()
                   if path.startswith("/images/") and not path.endswith((".json", ".sig")))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def new_worker(cfg: config.Config, out: Path, disk: Path, log: Path, *, offline: bool = False, **options):
    """An emulated worker (not started) that netboots ``out`` with ``disk`` as its card;
    ``options`` go to QemuWorker (faults=[...], for one)."""
    from rackboot.qemu.runner import QemuWorker
    from rackboot.qemu.machines import profile

    machine = profile(cfg.get("board", "name"), cfg.get("board", "arch"))
    # Offline: no TFTP either, so U-Boot falls back to the card's own kernel and initramfs.
    return QemuWorker(machine, log_path=log, tftp_dir=None if offline else out,
                      bootfile=build.NETBOOT_SCRIPT, disks=[disk], **options)


def _boot(cfg, out: Path, disk: Path, log: Path, expect: str, *, master: Master | None, offline: bool) -> BootRow:
    before = master.bytes_sent() if master else 0
    start = time.monotonic()
    with new_worker(cfg, out, disk, log, offline=offline) as worker:
        worker.expect(expect, timeout=300)
        worker.wait_exit(timeout=60)
    seconds = time.monotonic() - start
    fetched = (master.bytes_sent() - before) if master else 0
    action = _last_action(log)
    return BootRow(0, expect, action, fetched, seconds)


def _last_action(log: Path) -> str:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "rackboot: booting slot" in line:
            return line.split("(", 1)[1].split(")", 1)[0]
    return "?"


def check_rootfs(rootfs: Path) -> None:
    if not rootfs.is_dir():
        raise RackbootError(f"the demo publishes the example root filesystem {rootfs}, which is not a directory")


def check_owned(path: Path, what: str, setting: str) -> None:
    """Refuse a directory the demo would empty but did not create (no marker, not empty)."""
    if path.exists() and not path.is_dir():
        raise RackbootError(f"{what} {path} is not a directory")
    if path.is_dir() and not (path / MARKER).is_file() and any(path.iterdir()):
        raise RackbootError(f"{what} {path} holds files the demo did not make; "
                            f"point {setting} at a new directory for the demo")


def check_apart(dirs: dict[str, Path]) -> None:
    """The directories the demo empties must not hold each other or the build output."""
    named = [(what, path.resolve()) for what, path in dirs.items()]
    for i, (what, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if path == other_path or path.is_relative_to(other_path) or other_path.is_relative_to(path):
                raise RackbootError(f"{what} {path} and {other} {other_path} overlap; the demo empties "
                                    "its master and work directories on every run")


def start_afresh(path: Path) -> None:
    """Empty a directory the demo owns (see check_owned), or create it, and mark it as the demo's."""
    if path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by `rackboot demo`, which empties this directory on every run\n")


def prepare(cfg: config.Config, work: Path, log=print) -> Path:
    """Build, and start ``work`` (logs/) and the master's tree afresh; returns the build output.
    Either directory must be the demo's own (or new, or empty): anything else is refused
    before the build."""
    master_dir = cfg.get("master", "directory")
    check_apart({"the master directory": master_dir, "the demo's work directory": work,
                 "the build output": cfg.get("output", "directory")})
    check_owned(master_dir, "the master directory", f"{cfg.path}: [master] directory")
    check_owned(work, "the demo's work directory", "--workdir")
    key = cfg.get("master", "key")
    if key and not key.exists():  # the demo's own key; a real rack makes one with rackboot keygen
        signing.keygen(key)
    out = build.build(cfg, log=log)
    start_afresh(work)
    (work / "logs").mkdir()
    start_afresh(master_dir)
    return out


def example_hooks(cfg: config.Config) -> dict[str, Path]:
    """The example's signed hooks (hooks/<when>.sh beside the config), when it has a key."""
    if not cfg.get("master", "key"):
        return {}
    return {when: path for when in HOOKS if (path := cfg.base / "hooks" / f"{when}.sh").is_file()}


def publish_example(cfg: config.Config, rootfs: Path, work: Path, version: int, *, broken: bool = False):
    """Publish ``rootfs`` as the example image's ``version``, with the example's hooks;
    returns its manifest."""
    kernel = Inputs(cfg).kernel
    root = example_root(cfg, rootfs, f"v{version}", work / f"rootfs-v{version}", broken=broken)
    return publish.publish_directory(root, cfg.get("master", "directory"), image=IMAGE, version=version,
                                     label=f"v{version}", kernel_release=kernel.release,
                                     modules_from=kernel.root, modules=cfg.get("kernel", "root_modules"),
                                     source_date_epoch=build.source_date_epoch(), key=cfg.get("master", "key"),
                                     hooks=example_hooks(cfg))


STORY = [(1, False), (1, False), (2, False), (2, True)]  # (version expected, master stopped)


def story(cfg: config.Config, work: Path, rootfs: Path | None = None, log=print,
          steps: list[tuple[int, bool]] = STORY, broken: frozenset[int] = frozenset()) -> list[BootRow]:
    """Build, publish v1, serve, and boot the worker through ``steps`` (version expected,
    master stopped); versions in ``broken`` never confirm their slot. One row per boot."""
    rootfs = rootfs or cfg.base / "rootfs"
    check_rootfs(rootfs)
    out = prepare(cfg, work, log)
    master_dir = cfg.get("master", "directory")

    def release(version: int) -> None:
        publish_example(cfg, rootfs, work, version, broken=version in broken)
        plans.assign(cfg, node="default", image=IMAGE)
        log(f"published {IMAGE} v{version}")

    disk = work / "worker-disk.img"
    blank_card(out / "sdcard.img", disk)
    rows: list[BootRow] = []
    release(1)
    master: Master | None = Master(cfg)
    try:
        for n, (version, offline) in enumerate(steps, start=1):
            newest = max(v for v, _ in steps[:n])
            if newest > 1 and not (master_dir / "images" / IMAGE / str(newest)).is_dir():
                release(newest)
            if offline and master:
                master.stop()
                master = None
            log(f"boot {n}: expecting v{version}{' (master stopped)' if offline else ''} ...")
            row = _boot(cfg, out, disk, work / "logs" / f"boot{n}.log", rf"rackboot-demo: v{version} is up",
                        master=master, offline=offline)
            row.boot = n
            rows.append(row)
    finally:
        if master:
            master.stop()
    return rows


def table(rows: list[BootRow]) -> str:
    lines = [f"{'boot':<5} {'expected':<10} {'action':<12} {'image bytes':>14} {'seconds':>8}"]
    for r in rows:
        version = r.expected.split(": ")[1].split()[0]
        lines.append(f"{r.boot:<5} {version:<10} {r.action:<12} {r.bytes_fetched:>14} {r.seconds:>8.1f}")
    return "\n".join(lines)


def run(config_path: Path, workdir: Path | None = None) -> int:
    cfg = config.load(config_path)
    work = Path(workdir) if workdir else cfg.get("output", "directory").parent / "demo"
    rows = story(cfg, work, log=lambda line: print(line, flush=True))
    print()
    print(table(rows))
    print(f"worker disk image and console logs: {work}")
    return 0
