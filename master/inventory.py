"""The fleet's inventory: one SQLite file in the master's tree, fed by reports and plan requests.

`rackboot serve` records every report (the full history, and what it says about the node:
booted slot and version, each slot's image, version and state, the last action and error,
the last install's bytes and seconds) and the plan requests of nodes it knows (IP, board
serial, the plan it got). `rackboot status`, the web page, adoption and rollouts read it.

A node enters it with its first report, the sign that it booted our initramfs (`_admit`),
or when `rackboot adopt` names it; a plan request alone records nothing: anyone can ask
for /plans/<any MAC>.json, and a made-up node must not join every later rollout nor spend
a hostname index. What an unknown node's plan request said (its serial, the plan it got)
is kept in memory, for at most SEEN nodes, until its first report files it.

The file is `.inventory.db` (a dot name: serve's static side never hands it out), in WAL
mode so readers never wait for the writer and other processes (`rackboot status`,
`rackboot rollout`) share it with serve. Its schema version is SQLite's user_version; a
file of an older version is migrated step by step when it is opened, one transaction per
step; a newer one is refused. A new file takes in the reports an older master kept in
`reports/<node>.jsonl`.

Reports are checked before they count: a replay (the same report again) is ignored and an
out-of-order one (older, by the worker's clock, than the last one taken from that node
within REORDER_WINDOW) goes into the history but changes nothing; both are logged. Once a
node's key is pinned (adoption; master/nodekeys.py), a report of that node that is unsigned
or signed by another key is refused: kept in the history marked so, never counted.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Phase, Report

from . import hostnames, nodekeys
from .nodekeys import Auth

FILE = ".inventory.db"
SCHEMA = 5
IDLE = 64  # connections kept for the next threads (release())
SEEN = 256  # unknown nodes whose plan request is kept in memory until their first report
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another (a rack reporting at once queues here)
CLOCK_SET = 1e9  # a worker time below this (2001) is a board without a set clock: no ordering by it
REORDER_WINDOW = 3600.0  # further back than this is a clock that was reset, not a late report
MAX_SERIAL = 64
_SERIAL_RE = re.compile(r"[A-Za-z0-9:._-]{1,64}")
_MANIFEST_RE = re.compile(r"/images/([a-z0-9][a-z0-9_-]*)/([0-9]+)/manifest\.json")


class NodeState:
    """What `rackboot status` says a node is doing (stale is added when it is read)."""

    NEW = "new"  # adopted (rackboot adopt) before it reported anything
    WAITING = "waiting"  # reported, not adopted ([master] adopt = "manual"): gets no plan
    INSTALLING = "installing"
    TRIAL = "trial"  # booted a new slot that has not confirmed itself yet
    OK = "ok"
    ERROR = "error"  # reported an error; what it boots comes next
    FALLBACK = "fallback"  # booted its last good slot after an error


# Each step takes the schema from the version before it to its own (index + 1).
MIGRATIONS: tuple[str, ...] = (
    # 1: nodes, their slots, the report history
    """
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY, serial TEXT, ip TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
        adopted INTEGER NOT NULL DEFAULT 1, plan TEXT, image TEXT, version INTEGER,
        state TEXT NOT NULL, booted_slot TEXT, booted_version INTEGER, last_phase TEXT, last_action TEXT,
        last_error TEXT, last_error_at REAL, install_bytes INTEGER, install_seconds REAL,
        installing INTEGER NOT NULL DEFAULT 0, last_time REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE slots (
        node TEXT NOT NULL, slot TEXT NOT NULL, image TEXT, version INTEGER, state TEXT NOT NULL,
        PRIMARY KEY (node, slot)
    );
    CREATE TABLE reports (
        id INTEGER PRIMARY KEY, node TEXT NOT NULL, received REAL NOT NULL, ip TEXT, time REAL NOT NULL,
        phase TEXT NOT NULL, slot TEXT, version INTEGER, bytes INTEGER NOT NULL, seconds REAL NOT NULL,
        error TEXT, output TEXT, late INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX reports_node ON reports (node, id);
    """,
    # 2: rolling waves
    """
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY, image TEXT NOT NULL, version INTEGER NOT NULL, manifest TEXT NOT NULL,
        waves TEXT NOT NULL, max_failed INTEGER NOT NULL, cycle INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL, wave INTEGER NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, message TEXT
    );
    CREATE TABLE rollout_nodes (
        rollout INTEGER NOT NULL, node TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
        reason TEXT, assigned_at REAL, previous_plan BLOB, previous_sig BLOB, pending_error TEXT,
        PRIMARY KEY (rollout, node)
    );
    """,
    # 3: a label per node (a rack position, a hostname) and the replay lookup
    """
    ALTER TABLE nodes ADD COLUMN label TEXT NOT NULL DEFAULT '';
    CREATE INDEX reports_replay ON reports (node, time);
    """,
    # 4: a wave's deadline, and why a rollout cannot move on
    """
    ALTER TABLE rollouts ADD COLUMN wave_timeout REAL;
    ALTER TABLE rollouts ADD COLUMN stuck TEXT;
    """,
    # 5: node keys: the one pinned at adoption, the one a node presents beside it; each report's
    # key, whether it verified against the pinned key, and why it was refused
    """
    ALTER TABLE nodes ADD COLUMN pubkey TEXT;
    ALTER TABLE nodes ADD COLUMN pubkey_candidate TEXT;
    ALTER TABLE nodes ADD COLUMN pubkey_pinned_at REAL;
    ALTER TABLE reports ADD COLUMN pubkey TEXT;
    ALTER TABLE reports ADD COLUMN signed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE reports ADD COLUMN refused TEXT;
    """,
)
assert len(MIGRATIONS) == SCHEMA


@dataclass(frozen=True)
class SlotInfo:
    image: str | None
    version: int | None
    state: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "version": self.version, "state": self.state}


@dataclass(frozen=True)
class Node:
    """A node as the inventory knows it (the row, its slots), and what a report makes of it."""

    id: str
    state: str = NodeState.NEW
    label: str = ""
    serial: str | None = None
    ip: str | None = None
    first_seen: float = 0.0
    last_seen: float = 0.0
    adopted: bool = True
    plan: str | None = None  # "own", "default" or None (none served)
    image: str | None = None  # what its plan assigns
    version: int | None = None
    booted_slot: str | None = None
    booted_version: int | None = None
    last_phase: str | None = None
    last_action: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    install_bytes: int | None = None
    install_seconds: float | None = None
    installing: bool = False
    last_time: float = 0.0
    pubkey: str | None = None  # the key pinned at adoption (base64 of the raw 32 bytes)
    pubkey_candidate: str | None = None  # a key it presented (and signed with) that is not pinned
    pubkey_pinned_at: float | None = None
    slots: dict[str, SlotInfo] = field(default_factory=dict)

    @property
    def key_state(self) -> str:
        """pinned; mismatch (it presents another key: a new card); candidate (presented, not
        pinned yet: manual adoption); none (never presented one: an older initramfs)."""
        if self.pubkey is not None:
            return "mismatch" if self.pubkey_candidate not in (None, self.pubkey) else "pinned"
        return "candidate" if self.pubkey_candidate is not None else "none"

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _NODE_COLUMNS}
        out["adopted"] = self.adopted
        out["slots"] = {name: s.to_dict() for name, s in sorted(self.slots.items())}
        del out["installing"], out["last_time"]
        return out


_NODE_COLUMNS = (
    "id",
    "label",
    "serial",
    "ip",
    "first_seen",
    "last_seen",
    "adopted",
    "plan",
    "image",
    "version",
    "state",
    "booted_slot",
    "booted_version",
    "last_phase",
    "last_action",
    "last_error",
    "last_error_at",
    "install_bytes",
    "install_seconds",
    "installing",
    "last_time",
    "pubkey",
    "pubkey_candidate",
    "pubkey_pinned_at",
)


def apply(node: Node, report: Report, received: float) -> Node:
    """What ``report`` says about ``node``: a pure step of the node's state machine."""
    slots = dict(node.slots)
    slot = slots.get(report.slot) if report.slot else None
    image = node.image if report.version is not None and report.version == node.version else None
    changes: dict[str, Any] = {"last_phase": str(report.phase), "last_seen": max(node.last_seen, received)}
    if report.time >= CLOCK_SET:
        changes["last_time"] = report.time
    if report.hostname:  # the name its plan gave it (report rev5) labels it
        changes["label"] = report.hostname
    phase = report.phase
    if phase == Phase.PLAN:  # about to ask for its plan (a card's first contact): seen, nothing under way yet
        pass
    elif phase in (Phase.LAYOUT, Phase.DOWNLOAD, Phase.VERIFY, Phase.HOOK, Phase.WAIT):
        changes.update(state=NodeState.INSTALLING, installing=True)
        if phase == Phase.DOWNLOAD and report.slot:
            changes.update(install_bytes=report.bytes, install_seconds=report.seconds)
            slots[report.slot] = SlotInfo(image, report.version, "writing")
    elif phase == Phase.COMMIT and report.slot:
        slots[report.slot] = SlotInfo(image or (slot.image if slot else None), report.version, "trial")
        changes.update(state=NodeState.TRIAL, installing=True)
    elif phase == Phase.CONFIRM and report.slot:
        kept = slot.image if slot else image
        slots[report.slot] = SlotInfo(kept, report.version, "good")
        changes.update(state=NodeState.OK)
    elif phase == Phase.ERROR:
        changes.update(state=NodeState.ERROR, last_error=report.error, last_error_at=received)
        if report.slot and report.version is not None:
            on_trial = slot is not None and slot.state == "trial" and slot.version == report.version
            kept = slot.image if slot else image
            slots[report.slot] = SlotInfo(kept, report.version, "failed" if on_trial else "bad")
    elif phase == Phase.BOOT:
        if report.error:
            action, state = "fallback", NodeState.FALLBACK
            changes.update(last_error=report.error, last_error_at=received)
        else:
            action = "installed" if node.installing else "up-to-date"
            state = NodeState.TRIAL if slot is not None and slot.state == "trial" else NodeState.OK
        if report.slot and (slot is None or slot.version != report.version):
            slots[report.slot] = SlotInfo(image, report.version, "good")  # a slot it had before we knew it
        changes.update(
            state=state,
            last_action=action,
            installing=False,
            booted_slot=report.slot,
            booted_version=report.version,
        )
    named = slots.get(report.slot) if report.slot else None
    if report.slot and named and named.image is None and image is not None and named.version == report.version:
        slots[report.slot] = replace(named, image=image)  # reported before its plan told us the image
    if not node.adopted:  # what it reports is kept; what it waits for is adoption
        changes["state"] = NodeState.WAITING
    return replace(node, slots=slots, **changes)


def pin_key(node: Node, key: str, now: float) -> Node:
    """``node`` with ``key`` pinned: from now on only reports it signs count. The one place a
    key is pinned: adoption (rackboot adopt, or trust on first use in ingest)."""
    return replace(node, pubkey=key, pubkey_candidate=None, pubkey_pinned_at=now)


def with_key(node: Node, auth: Auth, now: float) -> Node:
    """What a report's key does to the node: pinned, kept as a candidate, or nothing. A
    report signed by the pinned key drops the candidate beside it: the node's own card still
    signs, so the other key was not a new card's (anyone may sign with a key of their own)."""
    if auth.pin is not None:
        return pin_key(node, auth.pin, now)
    if auth.candidate is not None and auth.candidate != node.pubkey:
        return replace(node, pubkey_candidate=auth.candidate)
    if auth.signed and node.pubkey is not None and node.pubkey_candidate is not None:
        return replace(node, pubkey_candidate=None)
    return node


def parse_manifest_path(path: str | None) -> tuple[str | None, int | None]:
    """A plan's image path as (image, version); (None, None) for anything else."""
    match = _MANIFEST_RE.fullmatch(path or "")
    return (match[1], int(match[2])) if match else (None, None)


def clean_serial(value: str | None) -> str | None:
    """The X-Rackboot-Serial header as stored: only what a board serial can look like."""
    return value if value and _SERIAL_RE.fullmatch(value) else None


@dataclass(frozen=True)
class Seen:
    """An unknown node's plan request, until its first report files it."""

    serial: str | None
    plan: str | None
    image: str | None
    version: int | None


@dataclass(frozen=True)
class Ingested:
    """What became of a report: taken (it changed the node), late (history only), a replay,
    or refused (history only, marked so: its key or signature is not the node's)."""

    outcome: str  # "taken", "late", "replay", "refused"
    reason: str = ""


@dataclass(frozen=True)
class Adoption:
    """What `rackboot adopt` did: the node, and one line about its key."""

    node: Node
    said: str


class Inventory:
    """The inventory of the master tree ``master``; one connection per thread. ``auto_adopt``
    ([master] adopt = "auto"): a node is adopted with its first report and the first key it
    presents is pinned (trust on first use); else it waits for `rackboot adopt`, which pins
    the key it presented. ``hostname_pattern`` ([master] hostname): an adopted node gets its
    index and name then. ``verify`` checks a report's signature (nodekeys.Verifier)."""

    def __init__(
        self,
        master: Path,
        *,
        log: Callable[[str], None] | None = None,
        auto_adopt: bool = True,
        hostname_pattern: str = "",
        verify: nodekeys.Verify | None = None,
    ):
        self.master = Path(master)
        self.path = self.master / FILE
        self.log = log or (lambda _line: None)
        self.auto_adopt = auto_adopt
        self.hostname_pattern = hostname_pattern
        self.verify: nodekeys.Verify = verify or nodekeys.Verifier()
        self._local = threading.local()
        self._idle: list[sqlite3.Connection] = []  # connections released by threads done with them
        self._idle_lock = threading.Lock()
        self._writer = threading.RLock()  # this process's writers, one at a time (write()); nested: as before
        self._seen: OrderedDict[str, Seen] = OrderedDict()  # unknown nodes' plan requests, newest last
        self._seen_lock = threading.Lock()
        self.hooks: list[Callable[[Inventory, str], object]] = []  # run after a report was taken
        if not Path(master).is_dir():
            raise RackbootError(f"master directory {master} does not exist")
        created = not self.path.exists()
        try:
            self._migrate()
            if created:
                self._import_reports(Path(master) / "reports")
        except sqlite3.Error as e:
            raise RackbootError(f"{self.path}: {e}") from None

    # --- connections, schema ------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection: one another thread released (release()), else a new one."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._idle_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            # (check_same_thread off: a released connection serves the next thread, one thread at a time)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut loses at most the last reports, never the file
            conn.execute("PRAGMA foreign_keys=ON")
        self._local.conn = conn
        return conn

    def release(self) -> None:
        """This thread is done with the inventory: its connection goes to the next thread that
        needs one. serve's threads each serve one HTTP connection, and the updater makes one
        per request: opening SQLite anew for each cost more than the report's transaction."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        if conn.in_transaction:  # (write() never leaves one open; a reader's is not the next thread's)
            conn.close()
            return
        with self._idle_lock:
            if len(self._idle) < IDLE:
                self._idle.append(conn)
                return
        conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue up front, never deadlock).
        This process's writers queue on a lock first, each woken as the one before is done:
        left to SQLite's busy handler, which sleeps and polls (up to 100 ms a nap), a report
        storm's writers waited several times the work. Other processes (rackboot status,
        rollout, adopt) still meet serve's writers there."""
        db = self.db
        with self._writer:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # (a COMMIT that failed leaves it open)
                    db.execute("ROLLBACK")
                raise

    def schema(self) -> int:
        version: int = self.db.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self) -> None:
        with self.write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                raise RackbootError(
                    f"{self.path}: schema version {version} is newer than this rackboot's {SCHEMA}; "
                    "upgrade rackboot on the master"
                )
        first = version
        while version < SCHEMA:
            with self.write() as db:  # one step per transaction: a crash leaves a whole version
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
            if first:  # a new file says nothing; an older one says what it became
                self.log(f"inventory {self.path}: migrated from schema {version - 1} to {version}")

    def _import_reports(self, reports: Path) -> None:
        """The reports an older master kept only as files, so a new inventory starts with them.
        A file keeps no signatures: its reports come in unsigned (their key left out), and each
        node's key is pinned again by its next report, as on first use."""
        if not reports.is_dir():
            return
        for path in sorted(reports.glob("*.jsonl")):
            for n, line in enumerate(path.read_bytes().splitlines(), start=1):
                try:
                    obj = json.loads(line)
                    received = float(obj.pop("received"))
                    report = replace(formats.parse_report(formats.dump(obj)), pubkey=None)
                except (ValueError, KeyError, TypeError, UpdaterError) as e:
                    self.log(f"inventory: {path.name}:{n} not imported: {str(e)[:200]}")
                    continue
                self.ingest(report, received=received, ip=None)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- feeding it ---------------------------------------------------------------------------

    def plan_request(
        self,
        node: str,
        *,
        ip: str | None,
        serial: str | None,
        plan: str | None,
        manifest: str | None,
        now: float | None = None,
    ) -> Node | None:
        """A node asked for its plan; ``plan`` is what it got ("own", "default", None) and
        ``manifest`` the image path in it. A known node's row takes it in (a plan of its own
        adopts it); an unknown node's is only remembered (SEEN at most) for its first report.
        Returns the node as recorded, None when it is not in the inventory."""
        now = time.time() if now is None else now
        image, version = parse_manifest_path(manifest)
        if self.db.execute("SELECT 1 FROM nodes WHERE id = ?", (node,)).fetchone() is None:
            with self._seen_lock:  # (no write lock taken: made-up MACs cost the writers nothing)
                self._seen.pop(node, None)
                self._seen[node] = Seen(clean_serial(serial), plan, image, version)
                while len(self._seen) > SEEN:
                    self._seen.popitem(last=False)
            return None
        with self.write() as db:
            row = db.execute("SELECT state, adopted FROM nodes WHERE id = ?", (node,)).fetchone()
            if row is None:  # forgotten in between
                return None
            adopted = bool(row["adopted"]) or plan == "own"
            state = row["state"]
            if not adopted:
                state = NodeState.WAITING
            elif state == NodeState.WAITING:
                state = NodeState.NEW
            db.execute(
                "UPDATE nodes SET serial = COALESCE(?, serial), ip = COALESCE(?, ip),"
                " last_seen = MAX(last_seen, ?), adopted = ?, plan = ?, image = ?, version = ?, state = ?"
                " WHERE id = ?",
                (clean_serial(serial), ip, now, int(adopted), plan, image, version, state, node),
            )
        return self.node(node)

    def ingest(
        self,
        report: Report,
        *,
        received: float | None = None,
        ip: str | None = None,
        body: bytes | None = None,
        signature: bytes | None = None,
    ) -> Ingested:
        """Take one parsed report (its node id already checked) into the history and the node.
        ``body``: the exact bytes it came as (default: its canonical bytes), ``signature``: the
        X-Rackboot-Signature over them. nodekeys.Busy or Unavailable when it cannot be checked."""
        received = time.time() if received is None else received
        body = formats.dump(report) if body is None else body
        pinned = self._pinned(report.node)  # judged outside the write lock: writers wait for no check
        auth = nodekeys.judge(report, body, signature, pinned, may_pin=self.auto_adopt, verify=self.verify)
        with self.write() as db:
            node = self._load(db, report.node)
            if (node.pubkey if node else None) != pinned:  # re-adopted meanwhile: judged against another key
                auth = Auth(refused=f"{report.node}'s key changed while its report was checked; not counted")
            if report.time >= CLOCK_SET:
                same = db.execute(
                    "SELECT 1 FROM reports WHERE node = ? AND time = ? AND phase = ? AND slot IS ? AND version IS ?"
                    " AND bytes = ? AND seconds = ? AND error IS ? AND (refused IS NULL) = ?",
                    (
                        report.node,
                        report.time,
                        str(report.phase),
                        report.slot,
                        report.version,
                        report.bytes,
                        report.seconds,
                        report.error,
                        int(auth.refused is None),
                    ),
                ).fetchone()
                if same and auth.refused is not None:
                    return Ingested("refused", f"{auth.refused} (the same report was refused before)")
                if same:
                    result = Ingested("replay", f"the same report from {report.node} at {report.time} came before")
                    self.log(f"inventory: report ignored: {result.reason}")
                    return result
            late = (
                auth.refused is None
                and node is not None
                and report.time >= CLOCK_SET
                and node.last_time >= CLOCK_SET
                and node.last_time - REORDER_WINDOW < report.time < node.last_time
            )
            db.execute(
                "INSERT INTO reports (node, received, ip, time, phase, slot, version, bytes, seconds, error, output,"
                " late, pubkey, signed, refused) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    report.node,
                    received,
                    ip,
                    report.time,
                    str(report.phase),
                    report.slot,
                    report.version,
                    report.bytes,
                    report.seconds,
                    report.error,
                    report.output,
                    int(late),
                    report.pubkey,
                    int(auth.signed),
                    auth.refused,
                ),
            )
            if auth.refused is not None or late:
                if node is not None and with_key(node, auth, received) != node:
                    self._store(db, with_key(node, auth, received), None)  # its key, not its state
                if auth.refused is not None:
                    self.log(f"inventory: report refused: {report.phase} from {report.node}: {auth.refused}")
                    return Ingested("refused", auth.refused)
                assert node is not None
                reason = (
                    f"{report.phase} report from {report.node} is older ({report.time:.3f}) than the last one taken "
                    f"({node.last_time:.3f}); kept in the history, the node's state unchanged"
                )
                self.log(f"inventory: out of order: {reason}")
                return Ingested("late", reason)
            admitted = node is None
            if node is None:  # its first report admits it (never a refused one: that returned above)
                node = self._admit(report.node, received)
            if auth.pin is not None:
                self.log(f"inventory: {report.node}: key {nodekeys.fingerprint(auth.pin)} pinned (first use)")
            self._store(db, apply(with_key(node, auth, received), report, received), ip)
        if admitted:
            self.log(
                f"inventory: new node {report.node}{' from ' + ip if ip else ''}"
                f" ({'adopted' if node.adopted else 'waiting for adoption: rackboot adopt ' + report.node})"
            )
            if node.adopted:
                self._name(report.node)
        for hook in self.hooks:
            try:
                hook(self, report.node)
            except Exception as e:  # a rollout step that fails must not lose the report or the master
                self.log(f"inventory: after a report from {report.node}: {type(e).__name__}: {e}")
        return Ingested("taken")

    def _pinned(self, node_id: str) -> str | None:
        row = self.db.execute("SELECT pubkey FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return row["pubkey"] if row is not None else None

    def _admit(self, node_id: str, received: float) -> Node:
        """A node's first report (the sign it booted our initramfs) brings it in: adopted with
        auto adoption or a plan of its own, else waiting for `rackboot adopt`; with what its
        plan request said, when this master heard one. (Its key: ingest's judge pins it with
        auto adoption, else keeps it as the candidate `rackboot adopt` pins.)"""
        with self._seen_lock:
            seen = self._seen.pop(node_id, None) or Seen(None, None, None, None)
        adopted = self.auto_adopt or seen.plan == "own"
        return Node(
            id=node_id,
            state=NodeState.NEW if adopted else NodeState.WAITING,
            serial=seen.serial,
            first_seen=received,
            last_seen=received,
            adopted=adopted,
            plan=seen.plan,
            image=seen.image,
            version=seen.version,
        )

    def _name(self, node_id: str) -> None:
        """An adopted node's index and name from the [master] hostname pattern (kept, never
        reused); a registry that cannot be written is logged: its next plan request asks again."""
        if not self.hostname_pattern:
            return
        try:
            hostnames.assign(self.master, node_id, hostname=None, pattern=self.hostname_pattern)
        except (OSError, RackbootError) as e:
            self.log(f"inventory: {node_id} adopted but not named: {e}")

    def _load(self, db: sqlite3.Connection, node_id: str) -> Node | None:
        row = db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None:
            return None
        slots = {
            s["slot"]: SlotInfo(s["image"], s["version"], s["state"])
            for s in db.execute("SELECT * FROM slots WHERE node = ? ORDER BY slot", (node_id,))
        }
        values = {k: row[k] for k in _NODE_COLUMNS}
        values["adopted"], values["installing"] = bool(row["adopted"]), bool(row["installing"])
        return Node(**values, slots=slots)

    def _store(self, db: sqlite3.Connection, node: Node, ip: str | None) -> None:
        values = {k: getattr(node, k) for k in _NODE_COLUMNS}
        values["ip"] = ip or node.ip
        values["adopted"], values["installing"] = int(node.adopted), int(node.installing)
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        db.execute(f"INSERT OR REPLACE INTO nodes ({names}) VALUES ({marks})", tuple(values.values()))
        db.execute("DELETE FROM slots WHERE node = ?", (node.id,))
        db.executemany(
            "INSERT INTO slots (node, slot, image, version, state) VALUES (?, ?, ?, ?, ?)",
            [(node.id, name, s.image, s.version, s.state) for name, s in sorted(node.slots.items())],
        )

    # --- reading it ---------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        db = self.db
        db.execute("BEGIN")
        try:
            ids = [r[0] for r in db.execute("SELECT id FROM nodes ORDER BY id")]
            found = [self._load(db, i) for i in ids]
        finally:
            db.execute("COMMIT")
        return [n for n in found if n is not None]

    def node(self, node_id: str) -> Node | None:
        return self._load(self.db, node_id)

    def history(self, node_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The node's last ``limit`` reports, oldest first."""
        rows = self.db.execute(
            "SELECT * FROM (SELECT * FROM reports WHERE node = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            (node_id, limit),
        ).fetchall()
        return [
            {k: v for k, v in dict(r).items() if k not in ("id", "node")}
            | {"late": bool(r["late"]), "signed": bool(r["signed"])}
            for r in rows
        ]

    def reports_after(self, node_id: str, after: float) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM reports WHERE node = ? AND received >= ? AND late = 0 AND refused IS NULL ORDER BY id",
            (node_id, after),
        ).fetchall()

    def count_reports(self) -> int:
        n: int = self.db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
        return n

    # --- changing it --------------------------------------------------------------------------

    def adopt(self, node_id: str, *, replace_key: bool = False, now: float | None = None) -> Adoption:
        """Mark a node adopted (it gets the default plan, or its own once written), named by
        the [master] hostname pattern when it has no name yet, and pin the key it presented
        (its candidate). ``replace_key`` (a new card): the pinned key goes; the candidate is
        pinned in its place, or, with none, or under automatic adoption, the next key the
        node presents is. Returns the node and one line on its key."""
        now = time.time() if now is None else now
        with self.write() as db:
            node = self._load(db, node_id) or Node(id=node_id, adopted=False)
            was = node.pubkey
            state = NodeState.NEW if node.state == NodeState.WAITING else node.state
            node = replace(node, adopted=True, state=state)
            candidate = node.pubkey_candidate
            if replace_key and (self.auto_adopt or candidate is None):
                node = replace(node, pubkey=None, pubkey_candidate=None, pubkey_pinned_at=None)
                said = (f"key {nodekeys.fingerprint(was)} unpinned; " if was else "no key was pinned; ") + (
                    "the next key it presents is pinned"
                    if self.auto_adopt
                    else f"the next key it presents is kept for rackboot adopt {node_id} to show and pin"
                )
                if candidate is not None:
                    said += f" (it presented {nodekeys.fingerprint(candidate)} last)"
            elif candidate is not None and (node.pubkey is None or replace_key):
                node = pin_key(node, candidate, now)
                said = f"key {nodekeys.fingerprint(candidate)} pinned" + (
                    f" in place of {nodekeys.fingerprint(was)}" if was else ""
                )
            elif node.pubkey is not None:
                said = f"key {nodekeys.fingerprint(node.pubkey)} stays pinned"
                if candidate is not None:
                    said += (
                        f"; it presents {nodekeys.fingerprint(candidate)}: "
                        f"rackboot adopt --replace {node_id} pins that one (a new card?)"
                    )
            elif self.auto_adopt:
                said = "no key presented yet: the first one it presents is pinned"
            else:
                said = f"no key presented yet: once it has booted, rackboot adopt {node_id} shows and pins it"
            self._store(db, node, None)
        self.log(f"inventory: {node_id} adopted: {said}")
        self._name(node_id)
        found = self.node(node_id)
        assert found is not None
        return Adoption(found, said)

    def remove(self, db: sqlite3.Connection, node_id: str) -> bool:
        """Delete the node's rows (node, slots, report history) in the transaction ``db``;
        whether it had any. Its rows in rollouts stay (rollout.leave_out)."""
        with self._seen_lock:
            self._seen.pop(node_id, None)
        found = db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None
        found |= db.execute("SELECT 1 FROM reports WHERE node = ? LIMIT 1", (node_id,)).fetchone() is not None
        for table, column in (("slots", "node"), ("reports", "node"), ("nodes", "id")):
            db.execute(f"DELETE FROM {table} WHERE {column} = ?", (node_id,))
        return found

    def set_label(self, node_id: str, label: str) -> None:
        with self.write() as db:
            db.execute("UPDATE nodes SET label = ? WHERE id = ?", (label, node_id))
