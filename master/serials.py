"""Plan serials: every write of a plan gives it the next serial of its own sequence.

Each node's own plan counts in a sequence of its own, and the default plan in another. A
worker keeps the newest serial it acted on and refuses a lower one (a replayed plan), so a
sequence must never go down: not when the master restarts, and not when a node's plan is
removed and written again later (a worker still holds the serial it had). The registry,
<master>/serials.json, keeps the last serial given in each sequence; it is written
atomically by plans.write_plan, under the lock on plans/, before the plan itself, so a
write cut in between skips a serial and never gives one twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rackboot.errors import RackbootError
from rackboot.files import atomic_write_bytes
from rackboot.initramfs.updater import formats
from rackboot.initramfs.updater.errors import UpdaterError

REGISTRY = "serials.json"


def _load(path: Path) -> dict[str, int]:
    try:
        doc: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RackbootError(f"{path}: cannot read the plan serial registry: {exc}") from None
    serials = doc.get("serials") if isinstance(doc, dict) else None
    if not isinstance(serials, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 1 for k, v in serials.items()
    ):
        raise RackbootError(f'{path}: not a plan serial registry ({{"serials": {{plan: last serial}}}})')
    return serials


def read(master: Path) -> dict[str, int]:
    """The last serial given to each plan name ('default' or a node id)."""
    return _load(Path(master) / REGISTRY)


def _current(plan_file: Path) -> int:
    """The serial of the plan now at ``plan_file`` (0: none, none readable, or no serial)."""
    try:
        return formats.parse_plan(plan_file.read_bytes()).serial or 0
    except (OSError, UpdaterError):
        return 0


def take_next(master: Path, name: str, plan_file: Path) -> int:
    """The next serial of plan ``name``, recorded as given. Above the registry's and the plan
    file's own (a registry lost or older than the plans). Only under the lock on plans/."""
    path = Path(master) / REGISTRY
    serials = _load(path)
    serial = max(serials.get(name, 0), _current(plan_file)) + 1
    serials[name] = serial
    atomic_write_bytes(path, (json.dumps({"serials": serials}, indent=2, sort_keys=True) + "\n").encode())
    return serial
