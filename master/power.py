"""`rackboot power on|off|cycle NODE|--all [--stagger S]`: switching workers, with a driver per rack.

``qemu``: an emulated worker's QMP socket ([power] qmp, with {node}); QEMU runs with
-no-shutdown so a powered-off worker keeps its process (and without -no-reboot, which
would turn the reset into a shutdown): off stops the CPUs, on is a reset and a cold start,
cycle both. ``command``: a shell command template ([power] command, with
{node} and {action}) for relay boards, PoE switches or uhubctl; it must finish within
COMMAND_TIMEOUT and exit 0.

Several nodes are switched one after another, [power] stagger seconds apart (only between
switch-ons), so a rack powering up does not ask the master for its plans all at once
(raspberrypi/firmware #764: netboot storms). Every node is tried; the failures are listed
at the end, and any makes the command fail.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rackboot.errors import RackbootError

if TYPE_CHECKING:
    from rackboot.config import Config

ACTIONS = ("on", "off", "cycle")
QMP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    node: str
    action: str
    ok: bool
    detail: str


def qmp(path: str, *commands: str, timeout: float = QMP_TIMEOUT) -> list[Any]:
    """Run QMP commands in order on one connection; their 'return' values."""
    results: list[Any] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            with sock.makefile("rwb") as f:
                json.loads(f.readline())  # the greeting
                for command in ("qmp_capabilities", *commands):
                    f.write(json.dumps({"execute": command}).encode() + b"\n")
                    f.flush()
                    while True:
                        line = f.readline()
                        if not line:
                            raise RackbootError(f"QMP {path}: closed during {command}")
                        reply = json.loads(line)
                        if "return" in reply or "error" in reply:
                            break  # asynchronous events are skipped
                    if "error" in reply:
                        raise RackbootError(f"QMP {path}: {command}: {reply['error'].get('desc')}")
                    if command != "qmp_capabilities":
                        results.append(reply["return"])
    except (OSError, ValueError) as e:
        raise RackbootError(f"QMP {path}: {e}") from None
    return results


def qemu_switch(path: str, action: str) -> str:
    """Switch an emulated worker (QEMU with -no-shutdown) through its QMP socket."""
    status = qmp(path, "query-status")[0]
    running = bool(status.get("running"))
    if action == "off":
        if not running:
            return "already off"
        qmp(path, "stop")
        return "off"
    if action == "on" and running:
        return "already on"
    qmp(path, "stop", "system_reset", "cont")  # a cold start: whatever ran is gone
    return "on" if action == "on" else "cycled"


def command_switch(template: str, node: str, action: str) -> str:
    """Run the rack's own switch command for one node."""
    line = template.format(node=shlex.quote(node), action=shlex.quote(action))
    try:
        done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RackbootError(f"{line!r} did not finish within {COMMAND_TIMEOUT:g} s") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise RackbootError(f"{line!r} exited {done.returncode}: {said[-1] if said else 'no output'}")
    return action


def switcher(cfg: Config) -> Callable[[str, str], str]:
    """The config's driver as one function: (node, action) -> what it did."""
    from rackboot.config import PowerDriver

    driver = cfg.power.driver
    if driver == PowerDriver.QEMU:
        if not cfg.power.qmp:
            raise RackbootError(f'{cfg.path}: [power] qmp: driver = "qemu" needs the QMP socket path with {{node}}')
        return lambda node, action: qemu_switch(cfg.power.qmp.format(node=node), action)
    if driver == PowerDriver.COMMAND:
        if not cfg.power.command:
            raise RackbootError(f'{cfg.path}: [power] command: driver = "command" needs the command with {{node}}')
        return lambda node, action: command_switch(cfg.power.command, node, action)
    raise RackbootError(f"{cfg.path}: [power] driver is not set: rackboot cannot switch nodes")


def switch(
    cfg: Config,
    nodes: list[str],
    action: str,
    *,
    stagger: float | None = None,
    log: Callable[[str], None] = lambda _line: None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Outcome]:
    """Switch ``nodes`` in order, ``stagger`` seconds ([power] stagger) between switch-ons."""
    if action not in ACTIONS:
        raise RackbootError(f"power action {action!r}: expected one of {', '.join(ACTIONS)}")
    do = switcher(cfg)
    gap = cfg.power.stagger if stagger is None else stagger
    outcomes = []
    for i, node in enumerate(nodes):
        if i and action != "off" and gap > 0:
            sleep(gap)
        try:
            outcome = Outcome(node, action, True, do(node, action))
        except RackbootError as e:
            outcome = Outcome(node, action, False, str(e))
        log(f"{node}: {outcome.detail}")
        outcomes.append(outcome)
    return outcomes


def check(outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RackbootError(
            f"power {failed[0].action}: {len(failed)} of {len(outcomes)} failed: "
            + "; ".join(f"{o.node}: {o.detail}" for o in failed)
        )


def cycler(cfg: Config, log: Callable[[str], None] = lambda _line: None) -> Callable[[list[str]], None]:
    """What a rollout with --cycle calls for each wave."""
    switcher(cfg)  # a driver that is not set fails here, before the rollout starts

    def cycle(nodes: list[str]) -> None:
        for o in switch(cfg, nodes, "cycle", log=log):
            if not o.ok:
                log(f"power cycle of {o.node} failed: {o.detail}")

    return cycle
