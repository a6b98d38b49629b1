"""Power-cut torture (`make torture`): pull an emulated worker's plug at random points of
an update, power it back, and check that it boots a slot whose bytes are intact.

Every cycle installs something. Three versions of the example image are published and
the node's plan pins one that no slot on the card holds (with two, both slots would soon
hold both, and every boot would be up to date). Once a slot holds a version, installs build
the other slot by block delta (delta.py): its "delta" phase runs from the planned blocks to the
read-back, and a cut there leaves a half-built slot that the next boot hashes and finishes.
After the read-back, "keep-index" writes the version's block index behind the image
(slotindex.py); a cut there leaves the slot writing, and its index is not trusted.
A "key-chain" cut rotates the master key first (keychain.py: every signed document is signed
again), so the cut boot takes the new link and writes the card's key record (keyring.py);
the recovery boot must then hold the master's newest key on the card.
Boot files change every cycle too: a second build differs from the first in its kernel
command line, and each plan names the build whose boot image the card's active boot area
does not hold, so every cycle writes the other area and moves MBR entry 1 (bootfiles.py).
A blank card makes the node's key first (nodekey.py, "node-key": openssl, then two copies
written one after the other); the master's pin of the previous card's key is dropped as
`rackboot adopt --replace` drops it, so each new card's key is pinned by its first report.
A cut waits for its phase's console marker, then a seeded fraction of that phase's length as last measured. The recovery
boot survives when it reaches "is up", the slot it booted holds, on the disk image, the
sha256 that the slot state records and that the master published, MBR entry 1 points
at a boot area holding one build's boot image whole (QEMU's virt board boots U-Boot from
-bios, so only this check sees a torn boot area; a Pi would not boot from one), and the
card holds the node's key whole, the very key the master pinned from its reports (a key
reported and then lost to a cut would leave the master pinning another).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rackboot import build, config
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import filemanifest, install, keyring, layout, nodekey
from rackboot.initramfs.updater import state as slot_state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import BOOTABLE, Manifest, Method, SlotState, manifest_path, parse_manifest
from rackboot.initramfs.updater.main import DEFAULT_NUMBERS
from rackboot.initramfs.updater.signature import MasterKey
from rackboot.master import keychain, plans, rsyncd, signing
from rackboot.master.filemanifest import FILE as FILE_LIST
from rackboot.master.inventory import Inventory
from rackboot.qemu import harness
from rackboot.qemu.runner import QemuWorker

VERSIONS = (1, 2, 3)
PHASES = (
    "node-key",
    "key-chain",
    "layout",
    "boot-files",
    "stream",
    "delta",
    "read-back",
    "keep-index",
    "commit",
    "first-boot",
)
BLANK = ("node-key", "layout")  # phases only a blank card goes through
RSYNC = "rsync"  # cut while an rsync install formats and fills its slot (a config whose initramfs has rsync)
MARKERS = {  # the console line that starts each phase, in boot order; "confirmed" ends the last one
    "node-key": r"rackboot: node key: making a key",  # openssl, then copy 1 and copy 2 (nodekey.py)
    "key-chain": r"rackboot: master key \d+: keeping it on the card",  # a new key from the chain (keyring.py)
    "layout": r"rackboot: repartitioning",
    "boot-files": r"rackboot: boot files: writing build",
    "stream": r"rackboot: installing \S+ v\d+ into slot",
    RSYNC: r"rackboot: formatting \S+ as ext4 for rsync",  # an rsync install (updater/rsync.py)
    "delta": r"rackboot: delta: \d+ of \d+ blocks to fetch",  # a block delta builds the slot (delta.py)
    "read-back": r"rackboot: reading back slot",
    "keep-index": r"rackboot: slot \w+: keeping its block index",  # behind the verified image (slotindex.py)
    "commit": r"rackboot: committing slot",
    "first-boot": r"rackboot: booting slot \w+ \(installed\)",
    "confirmed": r"rackboot-mark-good: slot",
}
# Seconds each phase lasted with the demo root on a 2-core host; replaced by what each boot measures.
WINDOWS = {
    "node-key": 0.3,
    "key-chain": 0.1,
    "layout": 0.19,
    "boot-files": 3.0,
    "stream": 0.6,
    RSYNC: 2.5,
    "delta": 1.0,
    "read-back": 0.22,
    "keep-index": 0.2,
    "commit": 0.13,
    "first-boot": 0.33,
}
SECOND_CMDLINE = "rackboot.torture=build2"  # what the second build's boot files differ in
UP = re.compile(r"rackboot-demo: v(\d+) is up")
RESCUE = re.compile(r"rackboot: rescue:")
BOOTING = re.compile(r"rackboot: booting slot (\w+) \(([\w-]+)\)")
BOOT_TIMEOUT = 300  # seconds; a boot takes ~11 s, but other QEMUs may share the CPUs


@dataclass(frozen=True)
class Cut:
    phase: str
    fraction: float  # where in the phase, 0..1 of its length
    blank: bool  # start from a blank card (only the SD image): the only way to cut a layout or a node key


@dataclass(frozen=True)
class Verdict:
    survived: bool
    detail: str  # what booted, or why the worker counts as bricked
    slot: str | None = None  # the slot it booted, when it came up


@dataclass(frozen=True)
class CutResult:
    cut: Cut
    version: int  # the version the plan pinned
    delay: float  # seconds after the phase's marker
    landed: str  # the last phase marker on the console when the power went
    verdict: Verdict
    seconds: float
    recovery_log: Path


# --- pure parts ---------------------------------------------------------------------


def plan_cuts(rng: random.Random, n: int, phases: Sequence[str] = PHASES) -> list[Cut]:
    """``n`` cuts: every phase once per round, in a shuffled order. Layout and node key cuts
    start from a blank card, and so does the first cut (the card is new)."""
    cuts: list[Cut] = []
    while len(cuts) < n:
        order = list(phases)
        rng.shuffle(order)
        cuts += [Cut(phase, rng.random(), phase in BLANK) for phase in order]
    cuts = cuts[:n]
    return [replace(cuts[0], blank=True)] + cuts[1:] if cuts else cuts


def next_version(state: SlotState, versions: Sequence[int] = VERSIONS) -> int:
    """The first version no slot holds (bootable, or failed and never installed again)."""
    held = {s.version for s in state.slots.values() if s.state in (*BOOTABLE, "failed")}
    free = [v for v in versions if v not in held]
    if not free:
        raise RackbootError(f"every version of {versions} is on the card; publish one more")
    return free[0]


def landed(console: list[str]) -> str:
    """The phase whose marker the worker printed last: where the cut fell."""
    last = "boot"
    for line in console:
        last = next((p for p, m in MARKERS.items() if re.search(m, line)), last)
    return last


def measure(seen: dict[str, float], windows: dict[str, float]) -> None:
    """A phase lasts from its marker to the next one the boot printed; keep the latest length."""
    names = [name for name in MARKERS if name in seen]  # an install prints some phases only (stream, delta, rsync)
    for phase, following in itertools.pairwise(names):
        if phase in seen and following in seen and seen[following] > seen[phase]:
            windows[phase] = seen[following] - seen[phase]


def check(
    console: list[str], disk: Path, manifests: dict[int, Manifest], rsynced: frozenset[str] = frozenset()
) -> Verdict:
    """Survived: the console says vN is up, and the slot it booted holds vN's bytes, or, for
    a slot in ``rsynced`` (last filled by an rsync install), vN's files."""
    up = next(((i, m) for i, line in enumerate(console) if (m := UP.search(line))), None)
    if up is None:
        if any(RESCUE.search(line) for line in console):
            return Verdict(False, "rescue shell")
        last = next((line for line in reversed(console) if line.strip()), "")
        return Verdict(False, f"never came up; last line: {last.strip()[:100]!r}")
    booted = [m for line in console[: up[0]] if (m := BOOTING.search(line))]
    if not booted:
        return Verdict(False, "came up without the updater saying which slot it booted")
    name, action = booted[-1].groups()
    return check_slot(disk, name, int(up[1][1]), manifests, action, files=name in rsynced)


def check_slot(
    disk: Path, name: str, version: int, manifests: dict[int, Manifest], action: str = "", *, files: bool = False
) -> Verdict:
    """Slot ``name`` on the disk image is bootable, records ``version``'s sha256, and its
    first manifest.size bytes hash to it; with ``files`` (an rsync install filled it), its
    files may match the signed file manifest instead."""
    try:
        with Disk(str(disk), writable=False) as d:
            slot = slot_state.read(d).slot(name)
            if slot.state not in BOOTABLE or slot.version != version:
                return Verdict(
                    False, f"booted slot {name} (v{version} up), but the slot state says {slot.state} v{slot.version}"
                )
            assert slot.sha256 is not None  # formats refuses a bootable slot without one
            manifest = manifests.get(version)
            if manifest is None:
                return Verdict(False, f"slot {name} holds v{version}, which the master never published")
            table = layout.read_table(d)
            entry = table.entry(slot.partition or DEFAULT_NUMBERS[name]) if table else None
            if entry is None or manifest.size > entry.sectors * 512:
                return Verdict(False, f"slot {name}: no partition that holds v{version}")
            digest, _ = install.read_back(d, entry.start * 512, manifest.size)
    except UpdaterError as e:
        return Verdict(False, f"cannot read the disk image: {e}")
    if slot.sha256 != manifest.sha256:
        return Verdict(
            False, f"slot {name}: the slot state's sha256 {slot.sha256[:12]} is not v{version}'s {manifest.sha256[:12]}"
        )
    if digest != manifest.sha256:
        rsync = files and manifest.files is not None
        problem = tree_problem(disk, entry.start * 512, entry.sectors * 512, version) if rsync else None
        if rsync and problem is None:
            return Verdict(True, f"slot {name} ({action}) holds v{version}'s files (rsync)", name)
        return Verdict(
            False,
            f"slot {name}: its bytes hash to sha256 {digest[:12]}, v{version}'s manifest says {manifest.sha256[:12]}"
            + (f", nor do its files match: {problem}" if problem else ""),
        )
    return Verdict(True, f"slot {name} ({action}) holds v{version}", name)


_MASTER: list[Path] = []  # the master tree whose file manifests tree_problem reads (torture sets it)


def tree_problem(disk: Path, offset: int, size: int, version: int) -> str | None:
    """How the ext4 filesystem at ``offset`` of the disk image differs from ``version``'s
    signed file manifest (an rsync install fills a slot with the files, not the image's
    bytes), or None; read through a read-only loop mount."""
    if not _MASTER:
        return "no master tree to read the file manifest from"
    listed = filemanifest.load((_MASTER[0] / "images" / harness.IMAGE / str(version) / FILE_LIST).read_bytes())
    with tempfile.TemporaryDirectory(prefix="rackboot-torture-") as point:
        mount = ["mount", "-o", f"ro,noload,loop,offset={offset},sizelimit={size}", str(disk), point]
        done = subprocess.run(mount, capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot mount it: {done.stderr.strip()[:100]}"
        try:
            lost = frozenset() if any(e.path == b"lost+found" for e in listed) else frozenset([b"lost+found"])
            return filemanifest.difference(listed, filemanifest.scan(point, skip=lost))
        finally:
            subprocess.run(["umount", point], check=False)


def check_boot_area(disk: Path, images: dict[str, str], size: int) -> Verdict | None:
    """None when MBR entry 1 points at a boot area whose first ``size`` bytes are one
    build's boot image (``images``: sha256 -> build); else the verdict that says why not."""
    try:
        with Disk(str(disk), writable=False) as d:
            table = layout.read_table(d)
            entry = table.entry(1) if table else None
            if entry is None or entry.sectors * 512 < size:
                return Verdict(False, f"MBR entry 1 is {entry}: no boot area to boot from")
            digest, _ = install.read_back(d, entry.start * 512, size)
    except UpdaterError as e:
        return Verdict(False, f"cannot read the boot area: {e}")
    if digest not in images:
        return Verdict(False, f"the boot area at {entry.start >> 11} MiB holds no build's boot image whole")
    return None


def check_node_key(disk: Path, pinned: Callable[[str], str | None]) -> Verdict | None:
    """None when the card holds a node key whole in both copies and it is the one the master
    pinned for that node (``pinned``: node id -> its pinned key); else the verdict that says why."""
    try:
        with Disk(str(disk), writable=False) as d:
            copies = nodekey.read_copies(d)
    except UpdaterError as e:
        return Verdict(False, f"cannot read the node key: {e}")
    keys = [nodekey.decode(raw) for raw in copies]
    if keys[0] is None or keys[0] != keys[1]:
        return Verdict(False, "the node key is not whole in both copies after the recovery boot")
    key = keys[0]
    master = pinned(key.node)
    if master != key.public_b64:
        said = "none" if master is None else f"another ({master[:12]}...)"
        return Verdict(False, f"the card's node key is {key.public_b64[:12]}..., the master pinned {said}")
    return None


def forget_keys(master: Path) -> None:
    """A blank card is a new card: drop the master's pins as `rackboot adopt --replace` does."""
    inventory = Inventory(master)
    try:
        for node in inventory.nodes():
            if node.pubkey is not None:
                inventory.adopt(node.id, replace_key=True)
    finally:
        inventory.close()


def pinned_key(master: Path, node: str) -> str | None:
    inventory = Inventory(master)
    try:
        found = inventory.node(node)
        return found.pubkey if found is not None else None
    finally:
        inventory.close()


def check_key_record(disk: Path, newest: MasterKey) -> Verdict | None:
    """None when the card keeps the master's ``newest`` key (or the master never rotated:
    key 0 is the initramfs's, and no record is written for it); else why not."""
    try:
        with Disk(str(disk), writable=False) as d:
            record = keyring.read(d)
    except UpdaterError as e:
        return Verdict(False, f"cannot read the key record: {e}")
    kept = record.master_key if record else None
    if newest.n > 0 and kept != newest:
        held = f"key {kept.n} (sha256 {kept.fingerprint[:16]})" if kept else "no key"
        return Verdict(False, f"the card keeps {held}, not the master's {newest.name}")
    return None


def rotate(cfg: config.Config) -> MasterKey:
    """Rotate the master key (as `rackboot keygen --rotate`); the new key."""
    if cfg.master.key is None:
        raise RackbootError(f"{cfg.path}: a key-chain cut rotates the master key: set [master] key")
    return keychain.rotate(cfg.master.key, cfg.master.directory, created=config.source_date_epoch()).new


def boot_area_holds(disk: Path, size: int) -> str | None:
    """sha256 of what MBR entry 1's boot area holds (its first ``size`` bytes), if anything."""
    with Disk(str(disk), writable=False) as d:
        table = layout.read_table(d)
        entry = table.entry(1) if table else None
        return install.read_back(d, entry.start * 512, size)[0] if entry and entry.sectors * 512 >= size else None


def second_build(cfg: config.Config, out: Path, dest: Path) -> config.Config:
    """The config's second build in ``dest``, whose boot files differ in the kernel command
    line. Build 1's outputs and state are copied first, so only the scripts, the boot image
    and the card image are built again."""
    subprocess.run(["cp", "-a", "--sparse=always", str(out), str(dest)], check=True)
    cmdline = f"{cfg.kernel.cmdline} {SECOND_CMDLINE}".strip()
    second = replace(cfg, kernel=replace(cfg.kernel, cmdline=cmdline), output=replace(cfg.output, directory=dest))
    build.build(second, log=lambda line: None)
    return second


def boot_image(out: Path) -> tuple[str, int]:
    """(sha256, size) of a build's boot image."""
    data = (out / build.BOOT_IMAGE).read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def published(master: Path, image: str = harness.IMAGE) -> dict[int, Manifest]:
    return {v: parse_manifest((master / manifest_path(image, v).lstrip("/")).read_bytes()) for v in VERSIONS}


# --- the run ------------------------------------------------------------------------


def follow(
    worker: QemuWorker, until: re.Pattern[str], seen: dict[str, float], timeout: float = BOOT_TIMEOUT
) -> re.Match[str]:
    """Wait for a console line matching ``until``; note when each phase marker showed up."""
    anything = "|".join(f"(?:{p})" for p in (*MARKERS.values(), until.pattern))
    deadline = time.monotonic() + timeout
    while True:
        line = worker.expect(anything, max(deadline - time.monotonic(), 0.1)).string
        now = time.monotonic()
        for phase, pattern in MARKERS.items():
            if re.search(pattern, line):
                seen.setdefault(phase, now)
        if match := until.search(line):
            return match


def torture(cfg: config.Config, work: Path, cuts: list[Cut], log: Callable[[str], None] = print) -> list[CutResult]:
    """Build, publish the example image three times, serve, and run one cycle per cut."""
    rsync = any(c.phase == RSYNC for c in cuts)
    if rsync:  # the rsync cuts' plans name serve's rsync daemon
        cfg = replace(cfg, master=replace(cfg.master, rsync_port=_free_port()))
    out = harness.prepare(cfg, work, log)
    builds = [cfg, second_build(cfg, out, work / "build2")]
    images = {boot_image(b.output.directory)[0]: b for b in builds}
    for version in VERSIONS:
        harness.publish_example(cfg, cfg.base / "rootfs", work, version)
    manifests = published(cfg.master.directory)
    _MASTER[:] = [cfg.master.directory]
    disk = work / "worker-disk.img"
    windows = dict(WINDOWS)
    outcomes: list[CutResult] = []
    rsynced: set[str] = set()  # slots an rsync install filled: they hold the version's files, not its bytes
    master = harness.MasterThread(cfg)
    daemon = rsyncd.RsyncService(cfg.master.directory, "127.0.0.1", cfg.master.rsync_port, log=False) if rsync else None
    try:
        if daemon is not None:
            daemon.start()
        for n, cut in enumerate(cuts, start=1):
            if outcomes and not outcomes[-1].verdict.survived:
                cut = replace(cut, blank=True)  # one brick must not decide the next cycles
            outcome = cycle(cfg, out, disk, work / "logs" / f"{n:03}", cut, windows, manifests, images, rsynced)
            outcomes.append(outcome)
            log(
                f"cut {n:>3}/{len(cuts)} {cut.phase:<10} {'blank card, ' if cut.blank else ''}"
                f"v{outcome.version}, +{outcome.delay:.3f} s, landed in {outcome.landed:<10} -> "
                f"{'survived' if outcome.verdict.survived else 'BRICKED'}: {outcome.verdict.detail} "
                f"({outcome.seconds:.0f} s)"
            )
            if not outcome.verdict.survived:
                subprocess.run(["cp", "--sparse=always", str(disk), str(work / f"bricked-{n:03}.img")], check=False)
    finally:
        if daemon is not None:
            daemon.stop()
        master.stop()
    return outcomes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cycle(
    cfg: config.Config,
    out: Path,
    disk: Path,
    logs: Path,
    cut: Cut,
    windows: dict[str, float],
    manifests: dict[int, Manifest],
    images: dict[str, config.Config],
    rsynced: set[str],
) -> CutResult:
    """One cut boot, then one recovery boot with the master still up. ``images``: each
    build's boot image sha256 -> its config; the plan names a build the card's boot area
    does not hold. ``rsynced``: the slots an rsync install last filled, kept across cycles."""
    start = time.monotonic()
    if cut.blank:
        harness.blank_card(out / "sdcard.img", disk)
        forget_keys(cfg.master.directory)
        rsynced.clear()
    before = frozenset(rsynced)
    with Disk(str(disk), writable=False) as d:
        version = next_version(slot_state.read(d))
    size = boot_image(out)[1]
    held = boot_area_holds(disk, size)
    other = next(b for sha, b in sorted(images.items()) if sha != held)
    method = Method.RSYNC if cut.phase == RSYNC else Method.IMAGE
    if cut.phase == "key-chain":  # before the plan: it is signed by the new key
        rotate(cfg)
    plans.assign(other, node="default", image=harness.IMAGE, version=version, method=method)
    delay = 0.0
    with harness.new_worker(cfg, out, disk, Path(f"{logs}-cut.log")) as worker:
        seen: dict[str, float] = {}
        try:
            follow(worker, re.compile(MARKERS[cut.phase]), seen)
            delay = cut.fraction * windows[cut.phase]
            time.sleep(delay)
        except RackbootError:
            pass  # the marker never came: the cut falls where the boot stopped, as `landed` shows
        _unplug(worker)
        measure(seen, windows)
        where = landed(worker.console)
        cut_console = worker.console
    recovery_log = Path(f"{logs}-recovery.log")
    with harness.new_worker(cfg, out, disk, recovery_log) as worker:
        seen = {}
        try:
            if UP.search(follow(worker, re.compile(f"{UP.pattern}|{RESCUE.pattern}"), seen).string):
                worker.wait_exit(60)  # the demo root powers off once it confirmed its slot
        except RackbootError:
            pass  # check() says what the console shows
        _unplug(worker)  # the disk image is complete once QEMU is gone
        measure(seen, windows)
        console = worker.console
    rsynced.clear()
    rsynced.update(rsync_filled(cut_console + console, before))
    verdict = check(console, disk, manifests, frozenset(rsynced))
    if verdict.survived:
        verdict = (
            check_boot_area(disk, {sha: str(b.output.directory) for sha, b in images.items()}, size)
            or check_node_key(disk, lambda node: pinned_key(cfg.master.directory, node))
            or verdict
        )
    if verdict.survived and cfg.master.key:
        verdict = check_key_record(disk, signing.read_public(signing.public_key_path(cfg.master.key))) or verdict
    return CutResult(cut, version, delay, where, verdict, time.monotonic() - start, recovery_log)


INSTALLING = re.compile(r"rackboot: installing \S+ v\d+ into slot (\w+)")


def rsync_filled(console: list[str], before: frozenset[str]) -> set[str]:
    """The slots an rsync install filled last, after the boots of ``console``: each install
    into a slot says so, and an rsync one then formats it (MARKERS[RSYNC])."""
    filled, current = set(before), None
    for line in console:
        if m := INSTALLING.search(line):
            current = m.group(1)
            filled.discard(current)
        elif current and re.search(MARKERS[RSYNC], line):
            filled.add(current)
    return filled


def _unplug(worker: QemuWorker) -> None:
    if worker.running:
        worker.power_off()
    else:
        worker.kill()  # it powered itself off; QMP would wait for a socket that is gone


def summary(outcomes: list[CutResult], seconds: float, seed: int, work: Path) -> list[str]:
    tally = {p: sum(o.landed == p for o in outcomes) for p in (*MARKERS, "boot")}
    bricked = sum(not o.verdict.survived for o in outcomes)
    return [
        "cuts landed in: " + ", ".join(f"{p} {n}" for p, n in tally.items() if n),
        f"{len(outcomes)} cycles in {seconds / 60:.1f} min (seed {seed}); console logs in {work / 'logs'}",
        f"power-cuts: {len(outcomes)} survived: {len(outcomes) - bricked} bricked: {bricked}",
    ]


def run(config_path: Path, cuts: int, seed: int, workdir: Path | None = None) -> int:
    if cuts < 1:
        raise RackbootError(f"--cuts must be at least 1, got {cuts}")
    cfg = config.load(config_path)
    work = Path(workdir) if workdir else cfg.output.directory.parent / "torture"
    start = time.monotonic()
    phases = (*PHASES, RSYNC) if "/usr/bin/rsync" in cfg.initramfs.binaries else PHASES  # rsync mode's cuts too
    outcomes = torture(
        cfg, work, plan_cuts(random.Random(seed), cuts, phases), log=lambda line: print(line, flush=True)
    )
    lines = summary(outcomes, time.monotonic() - start, seed, work)
    print("\n".join(lines), flush=True)
    return 1 if any(not o.verdict.survived for o in outcomes) else 0
