"""The update flow: plan -> layout -> (install -> verify -> commit) -> which slot to boot.

`run` always ends in a Decision for /init (mount this partition, switch_root into it)
or, when no slot on the card is good, an UpdaterError (/init waits, offering a rescue
shell, and retries); a worker with no card at all ends in NoCard, reported once, and
/init powers it off (waiting would not bring a card, and there is no diskless boot).
Any failure after the plan arrived falls back to the last good slot ("fallback"); a
failure to get the plan at all boots it as "offline", and so does a board with no
identity (no network interface: no master to ask). An exception no step foresaw (a bug,
a master's answer nobody thought of) is one of those failures too, named by its type: it
never sends a card with a good slot into the rescue loop. Each phase is reported to the
master, best effort.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from . import binding, delta, hooks, install, keyring, layout, node, nodekey
from . import report as reports
from . import rsync as rsync_mode
from . import state as slot_state
from .bootfiles import run as update_boot_files
from .disk import Disk, partition_device
from .errors import NoCard, Refused, UpdaterError
from .fetch import MasterClient, NotFound
from .filemanifest import Entry as FileEntry
from .formats import (
    BOOTABLE,
    DEFAULT_MOUNT,
    EXT_MAGIC,
    EXT_MAGIC_OFFSET,
    SLOTS,
    Action,
    HookName,
    Manifest,
    Method,
    Phase,
    Plan,
    PlanRecord,
    Slot,
    SlotState,
    SlotStatus,
    T,
    node_id,
    parse_manifest,
    parse_plan,
)
from .mbr import Mbr
from .signature import Verifier, from_environment
from .sources import Sources
from .watchdog import NoWatchdog, Watchdog

WRITE_ATTEMPTS = 2  # a slot whose read-back differs is written once more, then left bad
DEFAULT_NUMBERS = {"a": 2, "b": 3, "data": 4}  # the standard layout, for state written without numbers
# An SD host may probe its card after /init starts: a device that is not there yet gets this
# long to appear before the worker is taken to have no card
CARD_WAIT = 10.0


@contextmanager
def expected() -> Iterator[None]:
    """Any exception the code inside did not foresee becomes an UpdaterError (one line: its
    type and message), so it ends where a master that is down ends: the good slot boots."""
    try:
        yield
    except UpdaterError:
        raise
    except Exception as e:
        raise UpdaterError(f"unexpected {type(e).__name__}: {e}") from e


class NoIdentity(UpdaterError):
    """The board has no network interface to be known by: it cannot ask the master,
    but the card's good slot still boots."""


@dataclass(frozen=True)
class Identity:
    mac: str
    serial: str | None = None

    @property
    def node(self) -> str:
        return node_id(self.mac)


@dataclass(frozen=True)
class Decision:
    slot: str
    partition_number: int
    device: str
    mount: str
    action: Action
    bytes_fetched: int = 0
    seconds: float = 0.0
    image: str | None = None
    version: int | None = None
    sha256: str | None = None
    data_device: str | None = None
    data_blank: bool = False  # no ext2/3/4 superblock on the data partition: /init formats it
    error: str | None = None
    settings: node.NodeSettings | None = None  # what /init writes into the root (node.py)

    def to_shell(self) -> str:
        """KEY=VALUE lines that /init sources (lowercase keys, single-quoted values)."""
        fields = {
            "slot": self.slot,
            "partition_number": self.partition_number,
            "device": self.device,
            "mount": self.mount,
            "action": self.action,
            "bytes_fetched": self.bytes_fetched,
            "seconds": f"{self.seconds:.3f}",
            "image": self.image,
            "version": self.version,
            "sha256": self.sha256,
            "confirm_offset": slot_state.CONFIRM,
            "data_device": self.data_device,
            "data_blank": "1" if self.data_blank else "",
            "error": self.error,
            **(self.settings or node.NodeSettings()).shell_fields(),
        }
        return "".join(f"{k}={_quote('' if v is None else str(v))}\n" for k, v in fields.items())


def poweroff_shell(reason: str) -> str:
    """The decision that boots nothing: /init powers the worker off, saying ``reason``."""
    return f"action={_quote(Action.POWEROFF)}\nerror={_quote(reason)}\n"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


# --- identity -----------------------------------------------------------------------


def discover_identity(mac: str | None = None, serial: str | None = None, *, root: str = "/") -> Identity:
    """MAC of the first real interface (sorted, as /init picks it); the board serial if any."""
    if mac is None:
        for path in sorted(glob.glob(os.path.join(root, "sys/class/net/*/address"))):
            name = path.split(os.sep)[-2]
            value = _read_text(path)
            if name != "lo" and value and value != "00:00:00:00:00:00":
                mac = value
                break
        else:
            raise NoIdentity("identity: no network interface with a MAC address in /sys/class/net")
    if serial is None:
        serial = _board_serial(root)
    node_id(mac)  # validates
    return Identity(mac.strip().lower(), serial)


def _board_serial(root: str) -> str | None:
    value = _read_text(os.path.join(root, "proc/device-tree/serial-number"))
    if value:
        return value
    for line in (_read_text(os.path.join(root, "proc/cpuinfo")) or "").splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "Serial" and rest.strip():
            return rest.strip()
    return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(65536).decode("ascii", "replace").strip("\0 \n\t") or None
    except OSError:
        return None


# --- the flow -----------------------------------------------------------------------


def run(
    disk_path: str,
    master_url: str,
    identity: Identity | None,
    *,
    now: Callable[[], float] = time.monotonic,
    layout_check: bool = True,
    master: MasterClient | Sources | None = None,
    sources: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    offline_mount: str = DEFAULT_MOUNT,
    verifier: Verifier | None = None,
    open_disk: Callable[[str], Disk] = Disk,
    watchdog: Watchdog | None = None,
    card_wait: float = CARD_WAIT,
    sleep: Callable[[float], None] = time.sleep,
) -> Decision:
    """Bring the card in line with this node's plan; the Decision says what /init boots.
    ``identity`` None: the board has none (discover_identity raised NoIdentity), so the
    master is neither asked nor told, and the card's good slot boots offline.
    ``offline_mount`` is how to mount a slot when no plan arrives (the card's own config);
    ``watchdog`` (started by the caller) hears of every step forward. No card at
    ``disk_path`` within ``card_wait`` seconds: NoCard, after a report saying so.
    ``sources``: URLs asked after the master for every document and byte range (sources.py);
    ``master`` given (one client or several) replaces them and ``master_url``."""
    log = log or console_log
    if isinstance(master, MasterClient):
        master = Sources([master])
    master = master or Sources.of(master_url, sources)
    if master.log is None:
        master.log = log
    try:
        disk = open_card(disk_path, open_disk, wait=card_wait, now=now, sleep=sleep)
    except NoCard as e:
        log(f"{e}; nothing to install to or boot from (no diskless boot): powering off")
        if identity is not None:  # said once: the worker powers off after it
            reports.send(master, reports.make(identity.node, Phase.ERROR, error=str(e)))
        raise
    with expected(), disk:
        update = _Update(
            disk,
            disk_path,
            master,
            identity,
            now=now,
            log=log,
            offline_mount=offline_mount,
            verifier=verifier or from_environment(),
            watchdog=watchdog or NoWatchdog(),
        )
        return update.run(layout_check)


def open_card(
    path: str,
    open_disk: Callable[[str], Disk],
    *,
    wait: float,
    now: Callable[[], float],
    sleep: Callable[[float], None],
) -> Disk:
    """The card, once its device exists (it gets ``wait`` seconds to appear). NoCard when
    it never does or holds no medium; any other failure to open it is an UpdaterError
    (a card that is there and fails: /init tries again)."""
    deadline = None
    while not os.path.exists(path):
        deadline = now() + wait if deadline is None else deadline
        left = deadline - now()
        if left <= 0:
            raise NoCard(f"no card: {path} does not exist")
        sleep(min(left, 0.5))
    return open_disk(path)


def console_log(message: str) -> None:
    print(f"rackboot: {message}", file=sys.stderr, flush=True)


class _Update:
    def __init__(
        self,
        disk: Disk,
        disk_path: str,
        master: Sources,
        identity: Identity | None,
        *,
        now: Callable[[], float],
        log: Callable[[str], None],
        offline_mount: str,
        verifier: Verifier,
        watchdog: Watchdog,
    ):
        self.disk = disk
        self.disk_path = disk_path
        self.master = master
        self.identity = identity
        self.node = identity.node if identity else None
        self.now = now
        self.log = log
        self.offline_mount = offline_mount
        self.verifier = keyring.trusted(disk, verifier, log)  # the card's newer key, offline too
        self.watchdog = watchdog
        master.progress = watchdog.progress  # passing over a source is a step forward
        self.t0 = now()
        self.state = slot_state.read(disk)
        self.plan: Plan | None = None
        self.phase = "plan"  # the step under way: a failure's report and console line name it
        self.installing: tuple[str | None, int | None] = (None, None)  # slot, version: for reports
        self.replaced = Slot()  # the target slot's state before this install marked it writing
        self.card_bytes = 0  # bytes of the new slot a block delta took from the card (delta.py)
        self.delta_note: str | None = None  # how the slot was built, or why not by delta: for reports
        self.new_index: delta.BlockIndex | None = None  # the installing version's block index, once fetched
        self.scripts: dict[str, bytes] = {}  # the install's checked hook scripts
        self.node_key: nodekey.NodeKey | None = None  # signs every report, once it is on the card

    def run(self, layout_check: bool) -> Decision:
        self.take_node_key()
        try:
            with expected():
                self.take_confirmation()
        except UpdaterError as e:  # the state cannot be written: boot as it stands, confirm next time
            self.log(f"confirm failed: {e}")
            self.report(Phase.ERROR, error=f"confirm: {e}")
        if self.identity is None:  # no plan to ask for: what the card holds boots
            return self.fall_back(Action.OFFLINE, NoIdentity("identity: no network interface with a MAC address"))
        if self.state.plan is None:  # first contact: the master files (adopts, names) a node on a report,
            self.report(Phase.PLAN)  # so one before the first plan request makes its first plan like the next
        try:
            headers = {"X-Rackboot-Serial": self.identity.serial} if self.identity.serial else None
            with expected(), self.step("plan"):
                self.follow_keys()  # the master's newer keys first: the plan may be signed by one
                plan, record = self.signed_doc(f"/plans/{self.node}.json", self.bound_plan, headers=headers)
        except Refused as e:
            return self.fall_back(Action.REFUSED, e)
        except UpdaterError as e:
            return self.fall_back(Action.OFFLINE, e)
        self.plan = plan  # only now: a refused plan's mount, hostname or layout is never used
        signed = "signature verified" if self.verifier.required else "unsigned: this card has no master key"
        serial = f", serial {plan.serial}" if plan.serial is not None else ""
        self.log(f"plan for {plan.node} ({plan.kind} plan{serial}): image {plan.image or '(keep)'} ({signed})")
        try:
            with expected():
                if record is not None and record != self.state.plan:
                    with self.step("plan"):  # acted on from here: a lower serial is a replay from now on
                        self.commit(replace(self.state, plan=record))
                with self.step("layout"):
                    table = self.check_layout(plan, layout_check)
                table = update_boot_files(self, table)  # never fails the boot: the old boot area still boots
                return self.update(plan, table)
        except Refused as e:
            return self.fall_back(Action.REFUSED, e)
        except UpdaterError as e:
            return self.fall_back(Action.FALLBACK, e)

    def take_node_key(self) -> None:
        """The node's own key (nodekey.py), made on its first boot, before the first report:
        every report is signed with it. A card that cannot have one still boots, its reports
        unsigned; a damaged record is reported."""
        if self.identity is None:  # nothing to report, nobody to sign for: the first online boot makes it
            return
        try:
            with expected():
                self.node_key, problem = nodekey.ensure(self.disk, self.identity.node, log=self.log)
        except UpdaterError as e:
            self.log(f"{e}; reports go unsigned")
            return
        if problem:
            self.log(f"node key: {problem}")
            self.report(Phase.ERROR, error=f"node key: {problem}")

    def follow_keys(self) -> None:
        """Take the master's newer keys before anything they signed (keyring.follow), keep the
        newest on the card; a refused link (or a master gone quiet) ends the boot's update
        after the keys taken before it are kept."""
        if not self.verifier.required:
            return
        followed = keyring.follow(self.get_if_there, self.verifier, self.log)
        if followed.verifier is not self.verifier:
            self.verifier = followed.verifier
            self.keep_key()
        if followed.stopped:
            raise followed.stopped

    def keep_key(self) -> None:
        """The key record on the card. A failed write costs nothing but the next boot's walk
        of the chain again: this boot's key verified all the same."""
        key = self.verifier.key
        assert key is not None  # keyring.follow only hands over keys
        self.log(f"master key {key.n}: keeping it on the card")
        try:
            keyring.write(self.disk, key)
        except UpdaterError as e:
            self.log(f"key record not written: {e}; the next boot follows the chain again")
            self.report(Phase.ERROR, error=f"plan: key record not written: {e}")

    def get_if_there(self, path: str) -> bytes | None:
        """A document's bytes, None when the master has none."""
        try:
            return self.master.get(path)
        except NotFound:
            return None

    def bound_plan(self, data: bytes) -> tuple[Plan, PlanRecord | None]:
        """A plan's bytes -> the plan and what the card records of it; Refused unless it is this
        node's and no replay (binding.py)."""
        assert self.identity is not None  # only a board with an identity asks for a plan
        plan = parse_plan(data)
        return plan, binding.plan_record(plan, self.identity.node, self.state.plan)

    def signed_doc(self, path: str, parse: Callable[[bytes], T], headers: dict[str, str] | None = None) -> T:
        """A plan or manifest, parsed only after its signature verified (when the card has a key).
        ``parse`` also checks what the document is bound to (binding.py): a source whose document
        or signature fails any of it is passed over for the next one's pair."""

        def take(source: MasterClient) -> T:
            if not self.verifier.required:
                return source.get_doc(path, parse, headers=headers)
            data = source.get(path, headers=headers)
            try:
                signature = source.get(path + ".sig", headers=headers)
            except UpdaterError as e:
                raise Refused(f"{path}: no signature ({e}); this card only takes signed documents") from None
            self.verifier.check(path, data, signature)
            return parse(data)

        return self.master.verified(f"GET {path}", take)

    # --- layout -----------------------------------------------------------------------

    def check_layout(self, plan: Plan, layout_check: bool) -> Mbr:
        if not layout_check:
            table = layout.read_table(self.disk)
            if table is None:
                raise UpdaterError(f"layout: {self.disk_path} has no MBR and layout checks are off")
            return table
        decision = layout.decide(plan.layout, layout.read_table(self.disk), self.disk.size, node=plan.node)
        if decision.action == "repartition":
            self.log(
                f"repartitioning: {', '.join(decision.changed)} change; kept: {', '.join(decision.kept) or 'none'}"
            )
            with self.step("layout", report=True):
                layout.write_table(self.disk, decision.table)
        self.forget_moved_slots(plan, set(decision.changed))
        return decision.table

    def forget_moved_slots(self, plan: Plan, changed: set[str]) -> None:
        """A slot whose partition moved (or was renumbered) no longer holds its image."""
        slots = dict(self.state.slots)
        for name, slot in self.state.slots.items():
            part = plan.layout.get(name)
            number = plan.layout.number(name) if part else None
            if slot.state != "empty" and (name in changed or number is None or slot.partition not in (None, number)):
                slots[name] = Slot()
        if slots != dict(self.state.slots):
            self.commit(
                replace(
                    self.state,
                    slots=slots,
                    primary=_bootable(slots, self.state.primary),
                    last_good=_good(slots, self.state.last_good),
                )
            )

    # --- install ----------------------------------------------------------------------

    def update(self, plan: Plan, table: Mbr) -> Decision:
        with self.step("download"):  # the manifest, and whether a slot holds its image already
            if plan.image is None:
                current = self.state.primary or self.state.last_good
                if current is None:
                    raise UpdaterError("plan: assigns no image and no slot on the card is good")
                return self.decision(current, Action.UP_TO_DATE)
            image = plan.image

            def bound_manifest(data: bytes) -> Manifest:  # the version asked for: the replay rule judges it
                manifest = parse_manifest(data)
                binding.check_manifest(image, manifest)
                return manifest

            manifest = self.signed_doc(image, bound_manifest)
            self.refuse_replay(plan, manifest)
            for name, slot in sorted(self.state.slots.items()):
                if slot.state == "failed" and (slot.image, slot.sha256) == (manifest.image, manifest.sha256):
                    raise UpdaterError(
                        f"{manifest.image} v{manifest.version} never confirmed itself in slot "
                        f"{name}; it is not installed again until the plan assigns another version"
                    )
            for name in SLOTS:
                slot = self.state.slot(name)
                if slot.holds(manifest) and slot.partition in (None, plan.layout.number(name)):
                    if self.state.primary != name:
                        last_good = name if slot.state == "good" else self.state.last_good
                        self.commit(replace(self.state, primary=name, last_good=last_good))
                    self.log(f"slot {name} already holds {manifest.image} v{manifest.version}")
                    return self.decision(name, Action.UP_TO_DATE, manifest)
            target = self.inactive_slot()
        self.install(plan, plan.image, target, manifest, table)
        return self.decision(target, Action.INSTALLED, manifest)

    def refuse_replay(self, plan: Plan, manifest: Manifest) -> None:
        """An older version of an image a slot holds is a replay unless the plan pins it."""
        newer = [
            (name, slot.version)
            for name, slot in sorted(self.state.slots.items())
            if slot.state in BOOTABLE
            and slot.image == manifest.image
            and slot.version is not None
            and slot.version > manifest.version
        ]
        if newer and not plan.pin:
            name, version = newer[0]
            raise Refused(
                f"manifest: {manifest.image} v{manifest.version} is older than v{version} in "
                f'slot {name}; refused as a replay (a plan with "pin": true rolls back)'
            )

    def inactive_slot(self) -> str:
        """The slot to write: never the last good one. A slot still on trial is replaced
        before a proven one is overwritten, so a card always keeps a system that worked."""
        keep = _good(self.state.slots, self.state.last_good) or self.state.primary
        return next(name for name in SLOTS if name != keep)

    def install(self, plan: Plan, path: str, target: str, manifest: Manifest, table: Mbr) -> None:
        """Write ``manifest``'s image (which the master has at ``path``) into slot ``target``."""
        self.installing = (target, manifest.version)
        number = plan.layout.number(target)
        with self.step("download"):  # the slot's room and the hooks' scripts, before a byte of it is written
            offset, capacity = layout.partition_range(table, number)
            if manifest.size > capacity:
                raise UpdaterError(
                    f"install: {manifest.image} v{manifest.version} needs {manifest.size} "
                    f"bytes, slot {target} has {capacity}"
                )
            scripts = self.scripts = hooks.fetch(self.master, path, manifest, self.verifier.required)
            listed = self.rsync_list(plan, path, manifest)  # rsync mode: checked before the slot is touched
        self.run_hook(HookName.PRE_INSTALL, manifest, scripts, target, number)  # the slot is untouched so far
        entry = Slot(SlotStatus.WRITING, manifest.image, manifest.version, manifest.sha256, number)
        self.replaced = self.state.slot(target)  # what the slot held: a block delta's first guess at it
        if self.state.primary == target:  # replacing an unconfirmed slot: the good one boots meanwhile
            self.state = replace(self.state, primary=_good(self.state.slots, self.state.last_good))
        self.commit(self.with_slot(target, entry))
        self.log(
            f"installing {manifest.image} v{manifest.version} into slot {target} "
            f"({partition_device(self.disk_path, number)})"
        )
        try:
            if listed is not None:
                self.rsync_fill(plan, target, number, offset, capacity, manifest, listed)
            else:
                for attempt in range(1, WRITE_ATTEMPTS + 1):
                    last = attempt == WRITE_ATTEMPTS
                    if self.write_and_read_back(path, target, offset, capacity, manifest, last=last):
                        break
            self.run_hook(HookName.POST_INSTALL, manifest, scripts, target, number)
        except Exception:  # whatever stopped the install, the slot holds no version
            self.commit(self.with_slot(target, replace(entry, state=SlotStatus.BAD)))
            raise
        with self.step("commit", report=True, slot=target, version=manifest.version):
            self.log(f"committing slot {target}")
            # on trial until the system it boots runs rackboot-mark-good; last_good stays the old slot
            self.commit(
                replace(
                    self.with_slot(target, replace(entry, state=SlotStatus.TRIAL, tries=plan.tries)), primary=target
                )
            )

    def run_hook(self, name: HookName, manifest: Manifest, scripts: dict[str, bytes], target: str, number: int) -> None:
        """Run the manifest's signed hook ``name``, if it has one; its output goes to the
        master either way, and a failure stops the install."""
        hook = manifest.hook(name)
        if hook is None:
            return
        assert self.node is not None  # a hook comes with a plan, which only a board with an identity gets
        with self.step(name, allow=hook.timeout + self.watchdog.stall):  # it is killed before then
            env = hooks.environment(
                manifest,
                hook=name,
                node=self.node,
                slot=target,
                slot_device=partition_device(self.disk_path, number),
                disk=self.disk_path,
            )
            self.log(f"running the signed {name} hook {hook.file} (timeout {hook.timeout} s)")
            result = hooks.run(hook, scripts[name], env, log=self.log)
            # reported whether it passed or not: its output is what the master needs to see
            self.report(
                Phase.HOOK,
                seconds=result.seconds,
                slot=target,
                version=manifest.version,
                output=result.output,
                error=None if result.ok else result.problem(),
                hook=name,
            )
            hooks.check(result)

    def write_and_read_back(
        self, path: str, target: str, offset: int, capacity: int, manifest: Manifest, *, last: bool
    ) -> bool:
        """Stream, verify what was written, then re-read the slot from the medium: False
        when the read-back differs and another attempt remains."""
        with self.step("download", report=True, timed=True, slot=target, version=manifest.version):
            waits, waited = self.master.busy_waits, self.master.busy_seconds
            # a block delta from the card and the master when it can; a second attempt streams it all
            built = None if last else delta.install(self, path, target, offset, capacity, manifest)
            if built is None:  # from one source, checked whole; the next source's from byte 0 if it fails
                stream_path = manifest.stream_path(path)
                self.master.verified(
                    f"GET {stream_path}",
                    lambda source: self.stream_from(source, stream_path, offset, capacity, manifest),
                )
            if self.master.busy_waits > waits:  # the master was busy: how long this download queued
                self.report(
                    Phase.WAIT, seconds=self.master.busy_seconds - waited, slot=target, version=manifest.version
                )
        with self.step("read-back"):  # a delta is checked block by block, a stream whole: now the medium
            self.log(f"reading back slot {target}")
            digests = install.read_back(self.disk, offset, manifest.size, progress=self.watchdog.progress)
        if digests == (manifest.sha256, manifest.crc32):
            delta.keep_index(self, target, offset, capacity, path, manifest)  # for the next delta
            return True
        problem = f"read-back of slot {target} differs from what was written"
        if last:
            raise UpdaterError(f"{problem}, again; the slot stays uncommitted")
        self.log(f"{problem}; writing it once more")
        self.report(Phase.ERROR, slot=target, version=manifest.version, error=problem)
        return False

    def stream_from(self, source: MasterClient, path: str, offset: int, capacity: int, manifest: Manifest) -> None:
        """The image stream from ``source`` into the slot, verified whole against the manifest
        (UpdaterError when it differs: the slot stays uncommitted and the next source is asked)."""
        self.phase = "download"
        stream = self.watchdog.watch(source.stream(path, manifest.stream_size, on_wait=self.wait_for_stream))
        written = install.write_stream(stream, self.disk, offset, capacity, manifest)
        self.phase = "verify"
        install.verify(written, manifest)

    def rsync_list(self, plan: Plan, path: str, manifest: Manifest) -> list[FileEntry] | None:
        """For a plan of method rsync: the tools, and the file manifest checked against the signed one."""
        if plan.method is not Method.RSYNC:
            return None
        rsync_mode.tools()
        return rsync_mode.fetch_list(self.master, path, manifest)

    def rsync_fill(
        self,
        plan: Plan,
        target: str,
        number: int,
        offset: int,
        capacity: int,
        manifest: Manifest,
        listed: list[FileEntry],
    ) -> None:
        """Format slot ``target`` and rsync ``manifest``'s tree into it, checked file by file."""
        assert manifest.files is not None and plan.rsync_port is not None  # fetch_list and the plan parser
        port, files, basis = plan.rsync_port, manifest.files, self.rsync_basis(plan, target)

        def take(source: MasterClient) -> rsync_mode.Filled:
            filled = rsync_mode.fill(
                master_host=source.host or "",
                port=port,
                files=files,
                expected=listed,
                device=partition_device(self.disk_path, number),
                disk_path=self.disk_path,
                offset=offset,
                capacity=capacity,
                basis=basis,
                log=self.log,
                progress=self.watchdog.progress,
                stage=lambda phase: setattr(self, "phase", phase),
            )
            source.stream_bytes += filled.bytes_received  # the report's and decision's bytes fetched
            return filled

        with self.step("download", report=True, timed=True, slot=target, version=manifest.version):
            filled = self.master.verified(f"rsync module {files.module}", take)
        self.disk.drop_cache(offset, capacity)  # written through the partition's node, not this disk's
        self.log(
            f"slot {target} matches the signed file manifest ({filled.files} entries; "
            f"{filled.bytes_received} bytes over rsync in {filled.seconds:.1f} s)"
        )

    def rsync_basis(self, plan: Plan, target: str) -> tuple[str, int, int] | None:
        """The slot that stays bootable (device, offset, size), for rsync to copy unchanged files from."""
        other = next((name for name in SLOTS if name != target), None)
        slot = self.state.slot(other) if other else None
        if other is None or slot is None or slot.state not in BOOTABLE or plan.layout.get(other) is None:
            return None
        number = slot.partition or plan.layout.number(other)
        table = layout.read_table(self.disk)
        entry = table.entry(number) if table else None
        if entry is None or not self.has_ext_superblock(number):
            return None
        return partition_device(self.disk_path, number), entry.start * 512, entry.sectors * 512

    def wait_for_stream(self, seconds: float) -> None:
        """The master is busy and asked for a wait: the update still moves, it queues. The
        watchdog is fed through it (the client bounds the waits, so this ends too)."""
        self.log(f"master busy: waiting {seconds:.1f} s for an image stream")
        self.watchdog.progress(seconds + self.watchdog.stall)

    # --- steps, state, decisions, reports -----------------------------------------------

    @contextmanager
    def step(
        self,
        phase: str,
        *,
        report: bool = False,
        timed: bool = False,
        slot: str | None = None,
        version: int | None = None,
        allow: float | None = None,
    ) -> Iterator[None]:
        """One step of the update. ``self.phase`` names it from here on, so a step that
        raises is the phase fall_back's error names. The watchdog hears of it (``allow``:
        seconds it may then go quiet, for a hook). With ``report``, a step that ends well
        is reported under its phase: ``timed``, with its own seconds (the download: the
        stream alone), else with the seconds since the updater started."""
        self.phase = phase
        self.watchdog.progress(allow)
        started = self.now()
        yield
        if report:
            self.report(Phase(phase), seconds=self.now() - started if timed else None, slot=slot, version=version)

    def has_ext_superblock(self, number: int) -> bool:
        table = layout.read_table(self.disk)
        entry = table.entry(number) if table else None
        return entry is not None and self.disk.read(entry.start * 512 + EXT_MAGIC_OFFSET, 2) == EXT_MAGIC

    def with_slot(self, name: str, slot: Slot) -> SlotState:
        return replace(self.state, slots={**self.state.slots, name: slot})

    def commit(self, new: SlotState) -> None:
        self.state = slot_state.write(self.disk, new)

    def take_confirmation(self) -> None:
        """A trial slot whose system booted well said so in the confirmation sector: it is
        good from now on. The sector is cleared after the state commit, so a power cut in
        between only leaves a stale confirmation of a slot that is already good."""
        raw = self.disk.read(slot_state.CONFIRM, 512)
        if not raw.strip(b"\0"):
            return
        words = raw.split(b"\n", 1)[0].decode("ascii", "replace").split()
        name = words[1] if len(words) == 3 and words[0] == slot_state.CONFIRM_WORD else None
        slot = self.state.slot(name) if name else None
        if name and slot and slot.state == "trial" and slot.sha256 == words[2]:
            confirmed = replace(self.with_slot(name, replace(slot, state=SlotStatus.GOOD, tries=None)), last_good=name)
            try:
                self.commit(confirmed)
            except UpdaterError:
                self.state = confirmed  # it did confirm itself; the sector stays for the next boot
                raise
            self.log(f"slot {name} confirmed itself good ({slot.image} v{slot.version})")
            self.report(Phase.CONFIRM, slot=name, version=slot.version)
        self.disk.write(slot_state.CONFIRM, bytes(512))
        self.disk.fsync()

    def count_try(self, name: str, action: Action, error: str | None) -> tuple[str, Action, str | None]:
        """Booting a trial slot spends one of its tries; with none left it has failed, and
        the last good slot boots instead (RAUC's BOOT_x_LEFT, kept in the slot state)."""
        slot = self.state.slot(name)
        if slot.state != "trial" or slot.tries is None:  # (slot state makes every trial slot count its tries)
            return name, action, error
        fallback = _good(self.state.slots, self.state.last_good)  # never this slot: it is on trial, not good
        if slot.tries > 0 or fallback is None:
            tries = max(slot.tries - 1, 0)
            try:
                self.commit(self.with_slot(name, replace(slot, tries=tries)))
            except UpdaterError as e:
                if fallback is None:  # nothing else to boot: an uncounted try beats no boot
                    self.log(f"slot {name}: its try cannot be counted ({e}); booting it all the same")
                    return name, action, error
                return self.give_up_trial(name, fallback, f"its try cannot be counted ({e})")
            self.log(
                f"slot {name} is on trial: {tries} more unconfirmed boots before "
                + (f"slot {fallback} takes over" if fallback is not None else "nothing (no other slot)")
            )
            return name, action, error
        try:
            self.commit(
                replace(self.with_slot(name, replace(slot, state=SlotStatus.FAILED, tries=None)), primary=fallback)
            )
        except UpdaterError as e:  # boot the good slot anyway; the next boot marks it failed again
            self.log(f"slot {name}: cannot mark it failed ({e})")
        return self.give_up_trial(name, fallback, "never confirmed itself")

    def give_up_trial(self, name: str, fallback: str, why: str) -> tuple[str, Action, str]:
        slot = self.state.slot(name)
        problem = f"slot {name} ({slot.image} v{slot.version}) {why}; back to slot {fallback}"
        self.log(problem)
        self.report(Phase.ERROR, slot=name, version=slot.version, error=problem)
        return fallback, Action.FALLBACK, problem

    def decision(
        self, name: str, action: Action, manifest: Manifest | None = None, error: str | None = None
    ) -> Decision:
        name, action, error = self.count_try(name, action, error)
        slot = self.state.slot(name)
        number = slot.partition or (
            self.plan.layout.number(name) if self.plan and self.plan.layout.get(name) else DEFAULT_NUMBERS.get(name, 0)
        )
        if self.plan:
            data = self.plan.layout.number("data") if self.plan.layout.get("data") else None
        else:  # offline: the standard data partition, if the card has one
            table = layout.read_table(self.disk)
            data = DEFAULT_NUMBERS["data"] if table and table.entry(DEFAULT_NUMBERS["data"]) else None
        result = Decision(
            slot=name,
            partition_number=number,
            device=partition_device(self.disk_path, number),
            mount=self.plan.mount if self.plan else self.offline_mount,
            action=action,
            bytes_fetched=self.master.stream_bytes,
            seconds=round(self.now() - self.t0, 3),
            image=slot.image,
            version=slot.version,
            sha256=slot.sha256,
            data_device=partition_device(self.disk_path, data) if data else None,
            data_blank=not self.has_ext_superblock(data) if data else False,
            error=error,
            settings=self.node_settings(slot, manifest),
        )
        self.report(Phase.BOOT, slot=name, version=slot.version, error=error)
        self.log(f"boot slot {name} ({action}) from {result.device}")
        return result

    def node_settings(self, slot: Slot, manifest: Manifest | None) -> node.NodeSettings:
        """The node's own settings for /init: from the plan, and the first-boot hook of the
        manifest the booted slot holds (fetched and checked against it)."""
        script = None
        hook = manifest.hook(HookName.FIRST_BOOT) if manifest and slot.holds(manifest) else None
        if hook is not None and manifest is not None and self.plan and self.plan.image:
            try:
                scripts = self.scripts or hooks.fetch(self.master, self.plan.image, manifest, self.verifier.required)
                script = scripts.get(HookName.FIRST_BOOT)
            except UpdaterError as e:  # the slot still boots; the next boot tries the hook again
                self.log(f"first-boot hook: {e}")
                self.report(Phase.ERROR, version=manifest.version, error=f"first-boot: {e}")
        return node.NodeSettings(
            node=self.node,
            hostname=self.plan.hostname if self.plan else None,
            machine_id=node.machine_id(self.node, slot.image) if self.node and slot.image else None,
            persist=self.plan.persist if self.plan else (),
            planned=self.plan is not None,
            first_boot_script=script,
            first_boot_timeout=hook.timeout if hook and script is not None else 0,
        )

    def fall_back(self, action: Action, error: UpdaterError) -> Decision:
        self.log(f"{self.phase} {'refused' if action == Action.REFUSED else 'failed'}: {error}")
        slot, version = self.installing
        self.report(Phase.ERROR, error=f"{self.phase}: {error}", slot=slot, version=version)
        name = _bootable(self.state.slots, self.state.primary) or _good(self.state.slots, self.state.last_good)
        if name is None:
            raise UpdaterError(f"no good slot to boot ({self.phase}: {error})")
        return self.decision(name, action, error=str(error))

    def report(
        self,
        phase: Phase,
        *,
        seconds: float | None = None,
        error: str | None = None,
        slot: str | None = None,
        version: int | None = None,
        output: str | None = None,
        hook: HookName | None = None,
    ) -> None:
        if self.identity is None:  # no network interface: no master to tell, nor a node name
            return
        elapsed = self.now() - self.t0 if seconds is None else seconds
        self.watchdog.progress()
        reports.send(
            self.master,
            reports.make(
                self.identity.node,
                phase,
                bytes=self.master.stream_bytes,
                seconds=elapsed,
                error=error,
                slot=slot,
                version=version,
                output=output,
                hostname=self.plan.hostname if self.plan else None,
                hook=hook,
                card_bytes=self.card_bytes if self.delta_note else None,
                delta=self.delta_note,
                sources=self.master.uses(),
            ),
            key=self.node_key,
        )


def _bootable(slots: Mapping[str, Slot], name: str | None) -> str | None:
    return name if name is not None and name in slots and slots[name].state in BOOTABLE else None


def _good(slots: Mapping[str, Slot], name: str | None) -> str | None:
    return name if name is not None and name in slots and slots[name].state == "good" else None
