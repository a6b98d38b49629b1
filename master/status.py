"""`rackboot status`: the rack at a glance, from the inventory (no running master needed).

One row per node: id, label, IP, the rack master its reports come through, the booted
slot and its version, the other slot, the state, when it was last heard from ("2 min
ago") and its last error, trimmed. Nodes not heard from for [master] stale seconds are
marked stale. Colour only on a terminal;
--json for scripts; --node for one node with its report history. What the rack sent is
printed with its control characters written out (\x1b): a report stored before the master
refused them must not drive the admin's terminal.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, TextIO

from rackboot.errors import RackbootError
from rackboot.initramfs.updater.formats import escape_controls

from .inventory import Inventory, Node, NodeState
from .nodekeys import fingerprint

ERROR_WIDTH = 48
STALE = "stale"
KEY_MISMATCH = "key-mismatch"  # it presents another key than the pinned one: its reports are refused
_COLOURS = {
    NodeState.OK: "32",  # green
    NodeState.TRIAL: "36",  # cyan
    NodeState.INSTALLING: "36",
    NodeState.NEW: "33",  # yellow: someone should look
    NodeState.WAITING: "33",
    NodeState.ERROR: "31",  # red
    NodeState.FALLBACK: "31",
    STALE: "2",  # dim
    KEY_MISMATCH: "31",
}
COLUMNS = ("node", "label", "ip", "rack", "booted", "other slot", "state", "last seen", "last error")


def ago(seconds: float) -> str:
    """How long ago, as a person says it: "just now", "42 s ago", "2 min ago", "3 h ago", "5 d ago"."""
    if seconds < 0:
        return "just now"  # the clocks of two processes on the master: a hair apart
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def trim(text: str | None, width: int = ERROR_WIDTH) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def is_stale(node: Node, now: float, stale_after: float) -> bool:
    return node.last_seen > 0 and now - node.last_seen > stale_after


def shown_state(node: Node, now: float, stale_after: float) -> str:
    if node.key_state == "mismatch":  # what it reports is refused: nothing else it says is news
        return KEY_MISMATCH
    return STALE if is_stale(node, now, stale_after) else node.state


def key_problem(node: Node) -> str | None:
    """What to do about the node's key, when something must be done."""
    if node.key_state == "mismatch":
        return f"key mismatch, re-adopt with rackboot adopt --replace {node.id}"
    return None


def slot_text(node: Node, name: str | None) -> str:
    """'a v2 (good)' for a slot, '-' when unknown."""
    slot = node.slots.get(name) if name else None
    if slot is None or name is None:
        return "-"
    version = f" v{slot.version}" if slot.version is not None else ""
    image = f"{slot.image}" if slot.image else ""
    return f"{name} {image}{version}".replace("  ", " ") + f" ({slot.state})"


def other_slot(node: Node) -> str | None:
    others = sorted(name for name in node.slots if name != node.booted_slot)
    return others[0] if others else None


def row(node: Node, now: float, stale_after: float) -> dict[str, str]:
    booted = slot_text(node, node.booted_slot) if node.booted_slot else "-"
    cells = {
        "node": node.id,
        "label": node.label or "-",
        "ip": node.ip or "-",
        "rack": node.rack or "-",  # the rack master that relayed its last report
        "booted": booted,
        "other slot": slot_text(node, other_slot(node)),
        "state": shown_state(node, now, stale_after),
        "last seen": ago(now - node.last_seen) if node.last_seen else "never",
        "last error": key_problem(node) or trim(escape_controls(node.last_error or "")) or "-",
    }
    return {column: escape_controls(text) for column, text in cells.items()}


def table(nodes: list[Node], now: float, stale_after: float, *, colour: bool = False) -> str:
    """The nodes as an aligned text table; states coloured when ``colour``."""
    if not nodes:
        return "no nodes yet: a worker appears here with its first report to the master"
    rows = [row(n, now, stale_after) for n in nodes]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    for r in rows:
        cells = []
        for c in COLUMNS:
            cell = r[c].ljust(widths[c])
            if colour and c == "state":
                cell = f"\x1b[{_COLOURS.get(r[c], '0')}m{cell}\x1b[0m"
            cells.append(cell)
        lines.append("  ".join(cells).rstrip())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines.append(f"{len(rows)} node{'' if len(rows) == 1 else 's'}: {summary}")
    return "\n".join(lines)


def node_json(node: Node, now: float, stale_after: float) -> dict[str, Any]:
    return {
        **node.to_dict(),
        "stale": is_stale(node, now, stale_after),
        "shown_state": shown_state(node, now, stale_after),
        "key_state": node.key_state,
        "key_fingerprint": fingerprint(node.pubkey) if node.pubkey else None,
        "key_candidate_fingerprint": fingerprint(node.pubkey_candidate) if node.pubkey_candidate else None,
    }


def key_lines(node: Node) -> list[str]:
    """The node's key as `status --node` shows it: what is pinned, what it presents."""
    pinned = fingerprint(node.pubkey) if node.pubkey else "none pinned"
    lines = [f"{'key':<16} {pinned}"]
    state = node.key_state
    if state == "mismatch":
        lines.append(f"{'presents':<16} {fingerprint(node.pubkey_candidate)}: {key_problem(node)}")
    elif state == "candidate":
        lines.append(
            f"{'presents':<16} {fingerprint(node.pubkey_candidate)}, not pinned (rackboot adopt {node.id} pins it)"
        )
    elif state == "none":
        lines.append(f"{'':<16} (it never presented one: an initramfs from before node keys; its reports are unsigned)")
    return lines


def detail(inventory: Inventory, node: Node, now: float, stale_after: float) -> str:
    """One node: every field, then its report history."""
    lines = [f"{k:<16} {v}" for k, v in row(node, now, stale_after).items()]
    lines.append(f"{'serial':<16} {node.serial or '-'}")
    lines.append(f"{'adopted':<16} {'yes' if node.adopted else 'no (rackboot adopt ' + node.id + ')'}")
    lines += key_lines(node)
    lines.append(f"{'plan':<16} {node.plan or 'none'}: {node.image or '-'} v{node.version or '-'}")
    lines.append(f"{'last action':<16} {node.last_action or '-'}")
    if node.install_bytes is not None:
        lines.append(f"{'last install':<16} {node.install_bytes} bytes in {node.install_seconds or 0:.1f} s")
    lines.append(f"{'first seen':<16} {ago(now - node.first_seen) if node.first_seen else 'never'}")
    if node.last_error:
        lines.append(f"{'last error':<16} {node.last_error}")
    lines.append("")
    lines.append("history (oldest first):")
    for r in inventory.history(node.id):
        version = f" v{r['version']}" if r["version"] is not None else ""
        slot = f" slot {r['slot']}" if r["slot"] else ""
        late = " (out of order)" if r["late"] else ""
        error = f": {r['error']}" if r["error"] else ""
        refused = f" REFUSED: {r['refused']}" if r["refused"] else ""
        lines.append(f"  {ago(now - r['received']):>12}  {r['phase']:<8}{slot}{version}{late}{error}{refused}")
    return "\n".join(escape_controls(line) for line in lines)


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def run(
    inventory: Inventory, stale_after: float, out: TextIO, *, as_json: bool = False, node: str | None = None
) -> int:
    now = time.time()
    if node is not None:
        found = inventory.node(node)
        if found is None:
            raise RackbootError(f"node {node} is not in the inventory {inventory.where}")
        if as_json:
            doc = node_json(found, now, stale_after) | {"history": inventory.history(found.id)}
            out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        else:
            out.write(detail(inventory, found, now, stale_after) + "\n")
        return 0
    nodes = inventory.nodes()
    if as_json:
        out.write(json.dumps([node_json(n, now, stale_after) for n in nodes], indent=2, sort_keys=True) + "\n")
    else:
        out.write(table(nodes, now, stale_after, colour=use_colour(out)) + "\n")
    return 0
