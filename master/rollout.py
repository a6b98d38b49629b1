"""Rolling waves: a version goes to a few nodes first and to the rest only once they confirmed it.

`rackboot rollout --image NAME [--version N] --waves 1,25%,rest [--max-failed K]` splits the
adopted nodes (sorted by id) into waves and writes the first wave's plans. Every report the
master takes advances it (and so does `rackboot rollout --status`): when every node of the
wave has confirmed the new version (its `confirm` report), the next wave gets its plans;
when more than K nodes of the wave failed (an install error, or a trial that never confirmed
and fell back), the rollout halts, the wave's unconfirmed nodes get their previous plans
back and the later waves are never touched. Its state is in the inventory, so a master that
restarts carries on where it was.

A node fails when, after its plan was written, it boots with an error on a version other
than the new one (it fell back); the reason is the last error it reported about the new
version, or that boot's error.

Only authenticated reports count, either way: those that verified against the node's
pinned key (master/nodekeys.py). Refused reports never reach the judge; an unsigned one
(a node with no key pinned, an initramfs from before node keys) moves nothing, and the
node's reason says so.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rackboot.errors import RackbootError
from rackboot.files import atomic_write_bytes, remove
from rackboot.initramfs.updater import formats

from . import plans, publish
from .inventory import Inventory

if TYPE_CHECKING:
    from rackboot.config import Config

RUNNING, HALTED, DONE, ABORTED = "running", "halted", "done", "aborted"
WAITING, ASSIGNED, CONFIRMED, FAILED = "waiting", "assigned", "confirmed", "failed"
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "version": self.version,
            "state": self.state,
            "wave": self.wave,
            "waves": self.waves,
            "nodes": self.nodes,
            "max_failed": self.max_failed,
            "message": self.message,
            "confirmed": sum(1 for n in self.nodes.values() if n["state"] == CONFIRMED),
            "failed": sum(1 for n in self.nodes.values() if n["state"] == FAILED),
        }

    def text(self) -> str:
        done = sum(1 for n in self.nodes.values() if n["state"] == CONFIRMED)
        lines = [
            f"rollout {self.id}: {self.image} v{self.version}: {self.state}, wave {self.wave + 1} of "
            f"{len(self.waves)}, {done} of {len(self.nodes)} nodes confirmed (max failed per wave {self.max_failed})"
        ]
        if self.message:
            lines.append(f"  {self.message}")
        for i, wave in enumerate(self.waves):
            cells = []
            for node in wave:
                info = self.nodes[node]
                reason = f" ({info['reason']})" if info["reason"] else ""
                cells.append(f"{node} {info['state']}{reason}")
            lines.append(f"  wave {i + 1}: " + "; ".join(cells))
        return "\n".join(lines)


Power = Callable[[list[str]], None]  # power-cycles nodes (rollout --cycle)


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
    now: float | None = None,
) -> Progress:
    """Create a rollout over every adopted node and write its first wave's plans."""
    sizes = parse_waves(waves)
    if max_failed < 0:
        raise RackbootError(f"--max-failed {max_failed}: must be 0 or more")
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
        raise RackbootError(f"no adopted nodes in {inventory.path}: nothing to roll out to")
    now = time.time() if now is None else now
    with _lock, inventory.write() as db:
        running = db.execute("SELECT id FROM rollouts WHERE state = ?", (RUNNING,)).fetchone()
        if running:
            raise RackbootError(f"rollout {running[0]} is still running (rackboot rollout --status; --abort ends it)")
        cur = db.execute(
            "INSERT INTO rollouts (image, version, manifest, waves, max_failed, cycle, state, wave, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
            (image, version, manifest, ",".join(map(str, sizes)), max_failed, int(cycle), RUNNING, now, now),
        )
        rollout = cur.lastrowid
        assert rollout is not None
        db.executemany(
            "INSERT INTO rollout_nodes (rollout, node, wave, state) VALUES (?, ?, ?, ?)",
            [(rollout, node, i, WAITING) for i, wave in enumerate(split(sizes, nodes)) for node in wave],
        )
        first = _assign_wave(cfg, db, rollout, 0, manifest, now)
    if cycle and power is not None:
        power(first)
    progress = advance(cfg, inventory, power=power)
    assert progress is not None
    return progress


def _assign_wave(cfg: Config, db: Any, rollout: int, wave: int, manifest: str, now: float) -> list[str]:
    """Write the wave's plans (keeping each node's previous plan to give back on a halt)."""
    nodes = [
        r[0]
        for r in db.execute(
            "SELECT node FROM rollout_nodes WHERE rollout = ? AND wave = ? ORDER BY node", (rollout, wave)
        )
    ]
    directory = cfg.master.directory / "plans"
    for node in nodes:
        own, sig = directory / f"{node}.json", directory / f"{node}.json.sig"
        previous = own.read_bytes() if own.is_file() else None
        previous_sig = sig.read_bytes() if previous is not None and sig.is_file() else None
        plan = plans.make_plan(cfg, node=node, manifest=manifest)
        plans.write_plan(cfg.master.directory, node, plan, key=cfg.master.key)
        db.execute(
            "UPDATE rollout_nodes SET state = ?, assigned_at = ?, previous_plan = ?, previous_sig = ?"
            " WHERE rollout = ? AND node = ?",
            (ASSIGNED, now, previous, previous_sig, rollout, node),
        )
    db.execute("UPDATE rollouts SET wave = ?, updated = ? WHERE id = ?", (wave, now, rollout))
    return nodes


def _restore(master: Path, node: str, previous: bytes | None, previous_sig: bytes | None) -> None:
    """Give a node back the plan it had before the rollout (none: the default plan again)."""
    directory = master / "plans"
    own, sig = directory / f"{node}.json", directory / f"{node}.json.sig"
    if previous is None:
        remove(own)
        remove(sig)
        return
    if previous_sig is not None:
        atomic_write_bytes(sig, previous_sig)
    else:
        remove(sig)
    atomic_write_bytes(own, previous)


def advance(
    cfg: Config, inventory: Inventory, *, power: Power | None = None, now: float | None = None, quick: bool = False
) -> Progress | None:
    """Judge the running rollout's current wave and move it on: the next wave, done, or
    halted. Returns the newest rollout's progress (None: there never was one). ``quick``
    (after every report): with no rollout running, return None at once, taking no lock."""
    if quick and not inventory.db.execute("SELECT 1 FROM rollouts WHERE state = ?", (RUNNING,)).fetchone():
        return None
    now = time.time() if now is None else now
    cycle_nodes: list[str] = []
    with _lock, inventory.write() as db:
        row = db.execute("SELECT * FROM rollouts ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
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
                for m in members:  # the wave's nodes that did not confirm go back to what they ran
                    if judged[m["node"]] != CONFIRMED:
                        _restore(cfg.master.directory, m["node"], m["previous_plan"], m["previous_sig"])
                why = "; ".join(f"{n}: {r}" for n, r in failed)
                message = (
                    f"halted in wave {wave + 1}: {len(failed)} failed (more than {row['max_failed']}): {why}; "
                    "the other nodes keep their version"
                )
                db.execute(
                    "UPDATE rollouts SET state = ?, message = ?, updated = ? WHERE id = ?",
                    (HALTED, message, now, rollout),
                )
                inventory.log(f"rollout {rollout}: {message}")
            elif waiting == 0:
                more = db.execute(
                    "SELECT COUNT(*) FROM rollout_nodes WHERE rollout = ? AND wave > ?", (rollout, wave)
                ).fetchone()[0]
                if more:
                    nodes = _assign_wave(cfg, db, rollout, wave + 1, row["manifest"], now)
                    inventory.log(f"rollout {rollout}: wave {wave + 1} confirmed; wave {wave + 2}: {', '.join(nodes)}")
                    if row["cycle"]:
                        cycle_nodes += nodes
                else:
                    # every node has it now: so does a node that turns up later
                    plan = plans.make_plan(cfg, node=plans.DEFAULT, manifest=row["manifest"])
                    plans.write_plan(cfg.master.directory, plans.DEFAULT, plan, key=cfg.master.key)
                    db.execute(
                        "UPDATE rollouts SET state = ?, message = ?, updated = ? WHERE id = ?",
                        (
                            DONE,
                            f"every node confirmed {row['image']} v{version}; the default plan names it",
                            now,
                            rollout,
                        ),
                    )
                    inventory.log(f"rollout {rollout}: done")
            else:
                break
            row = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout,)).fetchone()
        progress = _progress(db, row)
    if cycle_nodes and power is not None:
        power(cycle_nodes)
    return progress


def abort(inventory: Inventory, now: float | None = None) -> Progress:
    """Stop the running rollout where it is: nodes keep the plans they have."""
    now = time.time() if now is None else now
    with _lock, inventory.write() as db:
        row = db.execute("SELECT * FROM rollouts WHERE state = ? ORDER BY id DESC LIMIT 1", (RUNNING,)).fetchone()
        if row is None:
            raise RackbootError("no rollout is running")
        db.execute(
            "UPDATE rollouts SET state = ?, message = ?, updated = ? WHERE id = ?",
            (ABORTED, f"aborted in wave {row['wave'] + 1}; nodes keep the plans they have", now, row["id"]),
        )
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
    )


def listing(inventory: Inventory, limit: int = 10) -> list[Progress]:
    """The newest rollouts first."""
    db = inventory.db
    rows = db.execute("SELECT * FROM rollouts ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [_progress(db, r) for r in rows]
