"""Rolling waves: a version goes to a few nodes first and to the rest only once they confirmed it.

`rackboot rollout --image NAME [--version N] --waves 1,25%,rest [--max-failed K]
[--wave-timeout S]` splits the adopted nodes (sorted by id) into waves and writes the first
wave's plans. Every report the master takes advances it (and so do `rackboot rollout
--status` and serve's tick, every TICK s): when every node of the wave has confirmed the new
version (its `confirm` report), the next wave gets its plans; when more than K nodes of the
wave failed (an install error, a trial that never confirmed and fell back, or no
confirmation within the wave timeout), the rollout halts, the wave's unconfirmed nodes get
their previous plans back and the later waves are never touched. Its state is in the
inventory, so a master that restarts carries on where it was.

A node fails when, after its plan was written, it boots with an error on a version other
than the new one (it fell back); the reason is the last error it reported about the new
version, or that boot's error. With a wave timeout, a node that has not confirmed by then
fails too, and gets its previous plan back at once. A node stale when its wave starts (not
heard from for [master] stale seconds) is skipped: it gets no plan, and the wave does not
wait for it.

Only authenticated reports count, either way: those that verified against the node's
pinned key (master/nodekeys.py). Refused reports never reach the judge; an unsigned one
(a node with no key pinned, an initramfs from before node keys) moves nothing, and the
node's reason says so.

A wave starts whole or not at all: its plans are all made before one is written, and a
failure while writing them puts back the files already written as the database rolls back.
advance never raises: a rollout that cannot move on (a plan it cannot write) stays where it
is, marked stuck with the reason, and the next advance tries again.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackboot.errors import RackbootError
from rackboot.files import atomic_write_bytes, remove
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError

from . import database, hostnames, plans, publish
from .inventory import Inventory, Node
from .status import ago, is_stale

if TYPE_CHECKING:
    from rackboot.config import Config

RUNNING, HALTED, DONE, ABORTED = "running", "halted", "done", "aborted"
STUCK = "stuck"  # shown for a running rollout that could not move on (rollouts.stuck says why)
WAITING, ASSIGNED, CONFIRMED, FAILED, SKIPPED = "waiting", "assigned", "confirmed", "failed", "skipped"
TICK = 10.0  # seconds between serve's looks at a running rollout (a silent wave still times out)
_ITEM_RE = re.compile(r"([1-9][0-9]{0,5})(%?)|rest")
_lock = threading.Lock()  # serve's threads advance one at a time (other processes wait on the database)


@dataclass(frozen=True)
class WaveSize:
    count: int = 0  # nodes, or percent of all nodes when percent
    percent: bool = False
    rest: bool = False

    def __str__(self) -> str:
        return "rest" if self.rest else f"{self.count}{'%' if self.percent else ''}"


def parse_waves(spec: str) -> list[WaveSize]:
    """'1,25%,rest' -> the wave sizes; 'rest' only last; percentages 1 to 100."""
    items = [item.strip() for item in spec.split(",")]
    sizes: list[WaveSize] = []
    for i, item in enumerate(items):
        match = _ITEM_RE.fullmatch(item)
        if not match:
            raise RackbootError(f"--waves {spec!r}: {item!r} is not a number of nodes, a percentage (25%) or 'rest'")
        if item == "rest":
            if i != len(items) - 1:
                raise RackbootError(f"--waves {spec!r}: 'rest' can only be the last wave")
            sizes.append(WaveSize(rest=True))
        else:
            count, percent = int(match[1]), bool(match[2])
            if percent and count > 100:
                raise RackbootError(f"--waves {spec!r}: {item} is more than 100%")
            sizes.append(WaveSize(count, percent))
    return sizes


def split(sizes: list[WaveSize], nodes: list[str]) -> list[list[str]]:
    """``nodes`` (in order) cut into waves: N nodes, P% of all of them (rounded up, at least
    one), the rest; nodes left after the last wave form one more, empty waves are dropped."""
    waves: list[list[str]] = []
    left = list(nodes)
    for size in sizes:
        if size.rest:
            n = len(left)
        elif size.percent:
            n = max(1, math.ceil(len(nodes) * size.count / 100))
        else:
            n = size.count
        wave, left = left[:n], left[n:]
        if wave:
            waves.append(wave)
    if left:
        waves.append(left)
    return waves


def judge(reports: list[dict[str, Any]], version: int) -> tuple[str, str | None]:
    """A wave node's outcome from its reports since its plan was written: confirmed, failed
    (with why) or still assigned. Only signed reports (verified against the node's pinned
    key) decide; an unsigned one that would have is named in the reason."""
    pending: str | None = None
    unsigned: str | None = None
    for r in reports:
        decides = (r["phase"] == "confirm" and r["version"] == version) or (
            r["phase"] == "boot" and r["error"] and r["version"] != version
        )
        if not r.get("signed", False):
            if decides and unsigned is None:
                unsigned = f"its {r['phase']} report is unsigned (no key pinned for it): only signed reports count"
            continue
        if r["phase"] == "confirm" and r["version"] == version:
            return CONFIRMED, None
        if r["phase"] == "error" and r["version"] == version:
            pending = r["error"]
        elif r["phase"] == "boot" and r["error"] and r["version"] != version:
            return FAILED, pending or r["error"]
    return ASSIGNED, unsigned


@dataclass(frozen=True)
class Progress:
    """One rollout as `rackboot rollout --status` and the web page show it."""

    id: int
    image: str
    version: int
    state: str
    wave: int  # the current wave, from 0
    waves: list[list[str]]
    nodes: dict[str, dict[str, Any]]  # node -> {wave, state, reason}
    max_failed: int
    message: str | None
    wave_timeout: float | None = None  # seconds a node has to confirm once its plan is written
    stuck: str | None = None  # why a running rollout could not move on at its last advance
    unstuck: str | None = None  # why it was stuck until this advance moved it (said once, in the log)

    @property
    def shown_state(self) -> str:
        return STUCK if self.stuck and self.state == RUNNING else self.state

    def count(self, state: str) -> int:
        return sum(1 for n in self.nodes.values() if n["state"] == state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "version": self.version,
            "state": self.state,
            "shown_state": self.shown_state,
            "stuck": self.stuck,
            "wave": self.wave,
            "waves": self.waves,
            "nodes": self.nodes,
            "max_failed": self.max_failed,
            "wave_timeout": self.wave_timeout,
            "message": self.message,
            "confirmed": self.count(CONFIRMED),
            "failed": self.count(FAILED),
            "skipped": self.count(SKIPPED),
        }

    def text(self) -> str:
        skipped = f", {n} skipped" if (n := self.count(SKIPPED)) else ""
        timeout = f", wave timeout {self.wave_timeout:g} s" if self.wave_timeout else ""
        lines = [
            f"rollout {self.id}: {self.image} v{self.version}: {self.shown_state}, wave {self.wave + 1} of "
            f"{len(self.waves)}, {self.count(CONFIRMED)} of {len(self.nodes)} nodes confirmed{skipped} "
            f"(max failed per wave {self.max_failed}{timeout})"
        ]
        if self.stuck and self.state == RUNNING:
            lines.append(f"  stuck: {self.stuck} (tried again at every report, tick and rollout --status)")
        if self.message:
            lines.append(f"  {self.message}")
        for i, wave in enumerate(self.waves):
            cells = []
            for node in wave:
                info = self.nodes[node]
                reason = f" ({info['reason']})" if info["reason"] else ""
                cells.append(f"{node} {info['state']}{reason}")
            lines.append(f"  wave {i + 1}: " + "; ".join(cells))
        return "\n".join(formats.escape_controls(line) for line in lines)  # reasons quote the rack's reports


Power = Callable[[list[str]], None]  # power-cycles nodes (rollout --cycle)


@dataclass(frozen=True)
class _Written:
    """A plan file a wave wrote, with what was there before (to put back if the wave fails)."""

    node: str
    previous: bytes | None
    previous_sig: bytes | None


def start(
    cfg: Config,
    inventory: Inventory,
    *,
    image: str,
    version: int | None,
    waves: str,
    max_failed: int,
    cycle: bool = False,
    power: Power | None = None,
    wave_timeout: float | None = None,
    now: float | None = None,
) -> Progress:
    """Create a rollout over every adopted node and write its first wave's plans."""
    sizes = parse_waves(waves)
    if max_failed < 0:
        raise RackbootError(f"--max-failed {max_failed}: must be 0 or more")
    if wave_timeout is not None and not 0 < wave_timeout < math.inf:
        raise RackbootError(f"--wave-timeout {wave_timeout}: must be a number of seconds above 0")
    master = cfg.master.directory
    if version is None:
        latest = publish.latest(master, image)
        if latest is None:
            raise RackbootError(f"image {image!r} is not published in {master} (run rackboot publish first)")
        version = latest.version
    manifest = formats.manifest_path(image, version)
    if not (master / manifest.lstrip("/")).is_file():
        raise RackbootError(f"image {image!r} has no version {version} in {master}")
    if cycle and power is None:
        raise RackbootError(f"{cfg.path}: --cycle needs [power] driver to be set")
    nodes = [n.id for n in inventory.nodes() if n.adopted]
    if not nodes:
        raise RackbootError(f"no adopted nodes in {inventory.where}: nothing to roll out to")
    now = time.time() if now is None else now
    with _lock, _undone_on_failure(master) as written, inventory.write() as db:
        running = db.execute("SELECT id FROM rollouts WHERE state = ?", (RUNNING,)).fetchone()
        if running:
            raise RackbootError(f"rollout {running[0]} is still running (rackboot rollout --status; --abort ends it)")
        rollout = db.execute(
            "INSERT INTO rollouts (image, version, manifest, waves, max_failed, cycle, state, wave, created, updated,"
            " wave_timeout) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) RETURNING id",
            (image, version, manifest, ",".join(map(str, sizes)), max_failed, int(cycle), RUNNING, now, now)
            + (wave_timeout,),
        ).fetchone()[0]
        db.executemany(
            "INSERT INTO rollout_nodes (rollout, node, wave, state) VALUES (?, ?, ?, ?)",
            [(rollout, node, i, WAITING) for i, wave in enumerate(split(sizes, nodes)) for node in wave],
        )
        first = _assign_wave(cfg, inventory, rollout, 0, manifest, now, written)
    if cycle and power is not None:
        power(first)
    progress = advance(cfg, inventory, power=power)
    assert progress is not None
    return progress


@contextmanager
def _undone_on_failure(master: Path) -> Iterator[list[_Written]]:
    """The plan files written inside (listed in what it yields) are put back as they were
    when anything inside fails, the database's COMMIT included: a wave's files and its rows
    change together or not at all."""
    written: list[_Written] = []
    try:
        yield written
    except BaseException:
        for w in reversed(written):
            try:
                _put_back(master, w.node, w.previous, w.previous_sig)
            except (OSError, RackbootError):
                pass  # the error on its way out says what went wrong first
        raise


def _skip_reason(cfg: Config, db: Any, node: str, now: float) -> str | None:
    """Why a node is left out of its wave as it starts: stale, or gone from the inventory."""
    row = db.execute("SELECT last_seen FROM nodes WHERE id = ?", (node,)).fetchone()
    if row is None:
        return "not in the inventory any more (rackboot forget)"
    if is_stale(Node(id=node, last_seen=row["last_seen"]), now, cfg.master.stale):
        return f"stale when its wave started: last heard from {ago(now - row['last_seen'])} ([master] stale)"
    return None


def _assign_wave(
    cfg: Config, inventory: Inventory, rollout: int, wave: int, manifest: str, now: float, written: list[_Written]
) -> list[str]:
    """In ``inventory``'s write transaction, write the wave's plans (keeping each node's
    previous plan to give back on a halt), leaving out stale nodes; every plan is made
    before the first is written, and each file written is listed in ``written`` so that a failure can put it back."""
    db = inventory.db
    members = [
        r[0]
        for r in db.execute(
            "SELECT node FROM rollout_nodes WHERE rollout = ? AND wave = ? AND state = ? ORDER BY node",
            (rollout, wave, WAITING),
        )
    ]
    skipped = {node: why for node in members if (why := _skip_reason(cfg, db, node, now))}
    nodes = [n for n in members if n not in skipped]
    made = {
        node: plans.make_plan(cfg, node=node, manifest=manifest, names=inventory) for node in nodes
    }  # may fail: nothing written
    directory = cfg.master.directory / "plans"
    for node, plan in made.items():
        own, sig = directory / f"{node}.json", directory / f"{node}.json.sig"
        previous = own.read_bytes() if own.is_file() else None
        previous_sig = sig.read_bytes() if previous is not None and sig.is_file() else None
        written.append(_Written(node, previous, previous_sig))
        plans.write_plan(cfg.master.directory, node, plan, key=cfg.master.key)
        db.execute(
            "UPDATE rollout_nodes SET state = ?, assigned_at = ?, previous_plan = ?, previous_sig = ?"
            " WHERE rollout = ? AND node = ?",
            (ASSIGNED, now, previous, previous_sig, rollout, node),
        )
    db.executemany(
        "UPDATE rollout_nodes SET state = ?, reason = ? WHERE rollout = ? AND node = ?",
        [(SKIPPED, why, rollout, node) for node, why in skipped.items()],
    )
    db.execute("UPDATE rollouts SET wave = ?, updated = ? WHERE id = ?", (wave, now, rollout))
    return nodes


def _put_back(master: Path, node: str, previous: bytes | None, previous_sig: bytes | None) -> None:
    """Undo a wave's write that failed before it was committed: the plan's exact bytes as
    they were (none: no plan of its own). The window is one transaction; a worker that asked
    in it holds the newer serial and refuses the old plan until its next one is written."""
    directory = master / "plans"
    own, sig = directory / f"{node}.json", directory / f"{node}.json.sig"
    if previous is None:  # (files only: whatever else is there is no plan of ours)
        sig.unlink(missing_ok=True)
        own.unlink(missing_ok=True)
        return
    if previous_sig is not None:
        atomic_write_bytes(sig, previous_sig)
    else:
        sig.unlink(missing_ok=True)
    atomic_write_bytes(own, previous)


def _restore(cfg: Config, inventory: Inventory, node: str, previous: bytes | None) -> None:
    """Give a node back the plan it had before the rollout, written anew (write_plan): a fresh
    serial and signature, since a worker refuses a plan older than the rollout's as a replay.
    A node that had none followed the default plan: it gets the default plan's content as its
    own (a worker that took a plan of its own refuses the default one); with no default plan
    either, its plan is removed and the worker boots what it has."""
    master = cfg.master.directory
    directory = master / "plans"
    try:
        if previous is not None:
            plan = replace(formats.parse_plan(previous), node=node, default=False)
        else:
            default = formats.parse_plan((directory / f"{plans.DEFAULT}.json").read_bytes())
            hostname = hostnames.assign(inventory, node, hostname=None, pattern=cfg.master.hostname)
            plan = replace(default, node=node, hostname=hostname)
    except (OSError, UpdaterError):  # no default plan (or none readable): nothing to give back
        remove(directory / f"{node}.json")
        remove(directory / f"{node}.json.sig")
        return
    plans.write_plan(master, node, plan, key=cfg.master.key)


def advance(
    cfg: Config,
    inventory: Inventory,
    *,
    power: Power | None = None,
    now: float | None = None,
    quick: bool = False,
    say_stuck: bool = False,
) -> Progress | None:
    """Judge the running rollout's current wave and move it on: the next wave, done, or
    halted. Returns the newest rollout's progress (None: there never was one). ``quick``
    (after every report, at every tick): with no rollout running, return None at once,
    taking no lock. Never raises for a rollout that cannot move on: it stays where it is,
    marked stuck with the reason, logged when the reason is new (or ``say_stuck``: as
    serve starts), and the next advance tries again."""
    try:
        if quick and not inventory.db.execute("SELECT 1 FROM rollouts WHERE state = ?", (RUNNING,)).fetchone():
            return None
    except database.ERRORS as e:
        inventory.log(f"rollout: cannot read the inventory: {database.describe(e)}")
        return None
    now = time.time() if now is None else now
    try:
        progress, cycle_nodes = _advance(cfg, inventory, now)
    except Exception as e:  # a master's rollout must never stop the master: say why, try again later
        why = e if isinstance(e, RackbootError) else f"{type(e).__name__}: {e}"
        return _stuck(inventory, why, now, say=say_stuck)
    if progress is not None and progress.unstuck:
        inventory.log(f"rollout {progress.id}: moving again (was stuck: {progress.unstuck})")
    if cycle_nodes and power is not None:
        try:
            power(cycle_nodes)
        except Exception as e:  # the wave has its plans: a node not switched boots them when it next boots
            inventory.log(f"rollout: power-cycling {', '.join(cycle_nodes)} failed: {e}")
    return progress


def _advance(cfg: Config, inventory: Inventory, now: float) -> tuple[Progress | None, list[str]]:
    cycle_nodes: list[str] = []
    master = cfg.master.directory
    with _lock, _undone_on_failure(master) as written, inventory.write() as db:
        row = db.execute("SELECT * FROM rollouts ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None, []
        unstuck = row["stuck"] if row["state"] == RUNNING else None
        if unstuck:
            db.execute("UPDATE rollouts SET stuck = NULL WHERE id = ?", (row["id"],))
        while row["state"] == RUNNING:
            rollout, wave, version = row["id"], row["wave"], row["version"]
            members = db.execute(
                "SELECT * FROM rollout_nodes WHERE rollout = ? AND wave = ? ORDER BY node", (rollout, wave)
            ).fetchall()
            failed: list[tuple[str, str]] = []
            judged: dict[str, str] = {}
            waiting = 0
            for m in members:
                state, reason = m["state"], m["reason"]
                if state == ASSIGNED:
                    reports = db.execute(
                        "SELECT phase, version, error, signed FROM reports WHERE node = ? AND received >= ?"
                        " AND late = 0 AND refused IS NULL ORDER BY id",
                        (m["node"], m["assigned_at"]),
                    ).fetchall()
                    state, reason = judge([dict(r) for r in reports], version)
                    if state == ASSIGNED and row["wave_timeout"] and now >= m["assigned_at"] + row["wave_timeout"]:
                        unsigned = f"; {reason}" if reason else ""  # a confirm that did not count says why
                        state, reason = (
                            FAILED,
                            (
                                f"not confirmed within the wave timeout ({row['wave_timeout']:g} s){unsigned}; "
                                "its previous plan is back"
                            ),
                        )
                        _restore(cfg, inventory, m["node"], m["previous_plan"])
                    if (state, reason) != (m["state"], m["reason"]):
                        db.execute(
                            "UPDATE rollout_nodes SET state = ?, reason = ? WHERE rollout = ? AND node = ?",
                            (state, reason, rollout, m["node"]),
                        )
                judged[m["node"]] = state
                if state == FAILED:
                    failed.append((m["node"], reason or "failed"))
                elif state == ASSIGNED:
                    waiting += 1
            if len(failed) > row["max_failed"]:
                for m in members:  # the wave's nodes that got the plan and did not confirm go back
                    if judged[m["node"]] in (ASSIGNED, FAILED):
                        _restore(cfg, inventory, m["node"], m["previous_plan"])
                why = "; ".join(f"{n}: {r}" for n, r in failed)
                message = (
                    f"halted in wave {wave + 1}: {len(failed)} failed (more than {row['max_failed']}): {why}; "
                    "the other nodes keep their version"
                )
                _finish(db, rollout, HALTED, message, now)
                inventory.log(f"rollout {rollout}: {message}")
            elif waiting == 0:
                more = db.execute(
                    "SELECT COUNT(*) FROM rollout_nodes WHERE rollout = ? AND wave > ?", (rollout, wave)
                ).fetchone()[0]
                if more:
                    nodes = _assign_wave(cfg, inventory, rollout, wave + 1, row["manifest"], now, written)
                    inventory.log(
                        f"rollout {rollout}: wave {wave + 1} through; wave {wave + 2}: {', '.join(nodes) or 'none'}"
                    )
                    if row["cycle"]:
                        cycle_nodes += nodes
                else:
                    _done(cfg, db, row, now, inventory.log)
            else:
                break
            row = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout,)).fetchone()
        progress = replace(_progress(db, row), unstuck=unstuck)
    return progress, cycle_nodes


def _done(cfg: Config, db: Any, row: Any, now: float, log: Callable[[str], None]) -> None:
    """The last wave is through: the default plan names the version, so a node that turns
    up later gets it too; unless no node confirmed it at all (every one was skipped)."""
    rollout, name = row["id"], f"{row['image']} v{row['version']}"
    counts = dict(
        db.execute("SELECT state, COUNT(*) FROM rollout_nodes WHERE rollout = ? GROUP BY state", (rollout,)).fetchall()
    )
    skipped = f"; {counts[SKIPPED]} skipped" if counts.get(SKIPPED) else ""
    if not counts.get(CONFIRMED):
        _finish(db, rollout, HALTED, f"no node confirmed {name}{skipped}; the default plan is unchanged", now)
        log(f"rollout {rollout}: halted: no node confirmed it")
        return
    plan = plans.make_plan(cfg, node=plans.DEFAULT, manifest=row["manifest"])
    plans.write_plan(cfg.master.directory, plans.DEFAULT, plan, key=cfg.master.key)
    _finish(db, rollout, DONE, f"every node confirmed {name}{skipped}; the default plan names it", now)
    log(f"rollout {rollout}: done")


def _finish(db: Any, rollout: int, state: str, message: str, now: float) -> None:
    db.execute("UPDATE rollouts SET state = ?, message = ?, updated = ? WHERE id = ?", (state, message, now, rollout))


def _stuck(inventory: Inventory, why: object, now: float, *, say: bool = False) -> Progress | None:
    """The running rollout could not move on: keep why on its row (logged when it changes,
    or when ``say``) and show it; the rollout stays where it was (its transaction rolled back)."""
    reason = str(why)[:1000]
    try:
        with inventory.write() as db:
            row = db.execute("SELECT * FROM rollouts WHERE state = ? ORDER BY id DESC LIMIT 1", (RUNNING,)).fetchone()
            if row is not None and (row["stuck"] != reason or say):
                db.execute("UPDATE rollouts SET stuck = ?, updated = ? WHERE id = ?", (reason, now, row["id"]))
                inventory.log(f"rollout {row['id']}: stuck in wave {row['wave'] + 1}: {reason}")
        newest = listing(inventory, limit=1)
    except database.ERRORS as e:
        inventory.log(f"rollout: cannot advance ({reason}) nor say so in the inventory: {database.describe(e)}")
        return None
    return newest[0] if newest else None


def leave_out(db: Any, node: str, reason: str) -> int:
    """A node forgotten (rackboot forget) while a rollout runs: skipped where it has not
    confirmed or failed yet, so no wave waits for it. How many rollouts it was in."""
    cur = db.execute(
        "UPDATE rollout_nodes SET state = ?, reason = ? WHERE node = ? AND state IN (?, ?)"
        " AND rollout IN (SELECT id FROM rollouts WHERE state = ?)",
        (SKIPPED, reason, node, WAITING, ASSIGNED, RUNNING),
    )
    return int(cur.rowcount)


def abort(inventory: Inventory, now: float | None = None) -> Progress:
    """Stop the running rollout where it is: nodes keep the plans they have."""
    now = time.time() if now is None else now
    with _lock, inventory.write() as db:
        row = db.execute("SELECT * FROM rollouts WHERE state = ? ORDER BY id DESC LIMIT 1", (RUNNING,)).fetchone()
        if row is None:
            raise RackbootError("no rollout is running")
        _finish(db, row["id"], ABORTED, f"aborted in wave {row['wave'] + 1}; nodes keep the plans they have", now)
        row = db.execute("SELECT * FROM rollouts WHERE id = ?", (row["id"],)).fetchone()
        return _progress(db, row)


def _progress(db: Any, row: Any) -> Progress:
    members = db.execute("SELECT * FROM rollout_nodes WHERE rollout = ? ORDER BY wave, node", (row["id"],)).fetchall()
    waves: list[list[str]] = []
    for m in members:
        while len(waves) <= m["wave"]:
            waves.append([])
        waves[m["wave"]].append(m["node"])
    return Progress(
        id=row["id"],
        image=row["image"],
        version=row["version"],
        state=row["state"],
        wave=row["wave"],
        waves=waves,
        nodes={m["node"]: {"wave": m["wave"], "state": m["state"], "reason": m["reason"]} for m in members},
        max_failed=row["max_failed"],
        message=row["message"],
        wave_timeout=row["wave_timeout"],
        stuck=row["stuck"],
    )


def listing(inventory: Inventory, limit: int = 10) -> list[Progress]:
    """The newest rollouts first."""
    db = inventory.db
    rows = db.execute("SELECT * FROM rollouts ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [_progress(db, r) for r in rows]
