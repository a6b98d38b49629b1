"""Each worker its own on one shared image: hostname, machine-id, persisted paths, first boot.

None of it touches the slot. The updater puts the node's settings into the decision
(NodeSettings.shell_fields); /init writes them into the root it is about to switch to
(initramfs/node.sh): into the overlay's upper layer, or through files bind-mounted from
its tmpfs /run for rw/ro mounts; persisted directories are bind mounts from the data
partition. The first-boot hook runs from there, chrooted into the new root before
switch_root (``python3 -m updater.node first-boot``): it needs nothing from the image
(no init system, no Python, no HTTP client), its output reaches the master through this
updater's client, and a stamp on the data partition makes it run once per node and version.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import hooks, nodekey
from . import report as reports
from .disk import Disk
from .errors import UpdaterError
from .fetch import MasterClient, wire_int
from .formats import HOOK_TIMEOUT, Hook, HookName, Phase

# Why stable per node and image rather than fresh per install: with a tmpfs overlay every
# boot is a fresh install, and a new id each boot would give systemd-networkd a new DHCP
# client id and journald a new /var/log/journal/<id> every time. systemd itself derives the
# id from a VM's SMBIOS UUID when it has one; here the node's MAC plays that part. A node
# that changes image gets another id (another installation); an update of the same image
# keeps it, as a package upgrade would.
MACHINE_ID_SALT = b"rackboot machine-id\0"
STAMP_DIR = "rackboot/first-boot"  # on the data partition: <image>-v<version> per hook run


def machine_id(node: str, image: str) -> str:
    """32 lowercase hex digits shaped like systemd's generated ids (UUID v4 version and
    variant bits), derived from the node id and the image name; never all zero."""
    raw = bytearray(hashlib.sha256(MACHINE_ID_SALT + f"{node}\0{image}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80  # the variant bits alone make it non-zero
    return raw.hex()


@dataclass(frozen=True)
class NodeSettings:
    """What /init applies to the root it boots, as decision-file fields."""

    node: str | None = None
    hostname: str | None = None
    machine_id: str | None = None
    persist: tuple[str, ...] = ()
    planned: bool = False  # from this boot's plan; without one /init uses the card's last copy
    first_boot: str | None = None  # path of the checked first-boot script (__main__ writes it)
    first_boot_timeout: int = 0
    first_boot_script: bytes | None = field(default=None, repr=False)  # not in the decision file

    def shell_fields(self) -> dict[str, object]:
        # persisted paths have no spaces or quotes (formats.persist_problem): /init splits on spaces
        return {
            "node": self.node,
            "hostname": self.hostname,
            "machine_id": self.machine_id,
            "persist": " ".join(self.persist),
            "planned": "1" if self.planned else "",
            "first_boot": self.first_boot,
            "first_boot_timeout": self.first_boot_timeout or "",
        }


def read_shell(text: str) -> dict[str, str]:
    """The decision file's KEY='VALUE' lines (main.Decision.to_shell) back as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 1 and "=" in words[0]:
            key, _, value = words[0].partition("=")
            out[key] = value
    return out


def hook_environment(d: Mapping[str, str], master: str) -> dict[str, str]:
    """What the first-boot hook knows: the node's settings (cloud-init's instance data)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "RACKBOOT_HOOK": HookName.FIRST_BOOT,
        "RACKBOOT_NODE": d.get("node", ""),
        "RACKBOOT_HOSTNAME": d.get("hostname", ""),
        "RACKBOOT_MACHINE_ID": d.get("machine_id", ""),
        "RACKBOOT_IMAGE": d.get("image", ""),
        "RACKBOOT_VERSION": d.get("version", ""),
        "RACKBOOT_SLOT": d.get("slot", ""),
        "RACKBOOT_PERSIST": d.get("persist", ""),
        "RACKBOOT_MASTER": master,
    }


def stamp_path(state_dir: str, image: str, version: str) -> str:
    return os.path.join(state_dir, STAMP_DIR, f"{image}-v{version}")


def first_boot(
    decision: Mapping[str, str],
    *,
    root: str,
    state_dir: str,
    master: MasterClient | None,
    log: Callable[[str], None],
    key: nodekey.NodeKey | None = None,
) -> hooks.HookResult | None:
    """Run the decision's first-boot hook chrooted into ``root`` unless its stamp under
    ``state_dir`` (the data partition; '' = none) says it ran for this image and version.
    The result goes to the master as a hook report; a failed hook does not stop the boot
    (the slot is committed; its trial decides), signed with the node's ``key``. None when
    nothing ran."""
    script_path = decision.get("first_boot", "")
    if not script_path:
        return None
    image, version, node = decision.get("image", ""), decision.get("version", ""), decision.get("node", "")
    stamp = stamp_path(state_dir, image, version) if state_dir else None
    if stamp and os.path.exists(stamp):
        log(f"first-boot hook of {image} v{version} ran on this node before; not again")
        return None
    if stamp is None:
        log("no data partition to remember the first-boot hook in: it runs on every boot")
    with open(script_path, "rb") as f:
        script = f.read()
    timeout = int(decision.get("first_boot_timeout") or HOOK_TIMEOUT)
    hook = Hook(HookName.FIRST_BOOT, "first-boot.sh", len(script), hashlib.sha256(script).hexdigest(), timeout)
    env = hook_environment(decision, master.url if master else "")
    log(f"running the signed first-boot hook of {image} v{version} in the new root (timeout {timeout} s)")
    result = hooks.run(hook, script, env, log=log, root=root)
    if stamp:  # after it ended, however: a power cut mid-hook runs it again, a failure is reported once
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        tmp = stamp + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"status={result.status} seconds={result.seconds} time={int(time.time())}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, stamp)
    if node and master is not None:
        reports.send(
            master,
            reports.make(
                node,
                Phase.HOOK,
                seconds=result.seconds,
                slot=decision.get("slot") or None,
                version=wire_int(version),
                output=result.output,
                error=None if result.ok else result.problem(),
                hostname=decision.get("hostname") or None,
                hook=HookName.FIRST_BOOT,
            ),
            key=key,
        )
    return result


def card_key(disk: str, node: str) -> nodekey.NodeKey | None:
    """The node's key from the card, read only (the updater made it); None when there is none."""
    if not disk or not node:
        return None
    try:
        with Disk(disk, writable=False) as card:
            return nodekey.read(card, node)
    except UpdaterError as e:
        _console(f"first-boot: {e}; its report goes unsigned")
        return None


def _console(message: str) -> None:
    print(f"rackboot: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="updater.node", description="rackboot: a node's first-boot hook")
    sub = p.add_subparsers(dest="command", required=True)
    fb = sub.add_parser("first-boot", help="run the decision's first-boot hook chrooted into --root, once")
    fb.add_argument("--decision-file", required=True)
    fb.add_argument("--root", required=True, help="the new root, its /run a tmpfs, /proc /sys /dev mounted")
    fb.add_argument("--state-dir", default="", help="the data partition's mount point ('' = none)")
    fb.add_argument("--master", default="", help="master URL for the report ('' = none)")
    fb.add_argument("--disk", default="", help="the card, whose node key signs the report ('' = unsigned)")
    args = p.parse_args(argv)
    try:
        with open(args.decision_file) as f:
            decision = read_shell(f.read())
        master = MasterClient(args.master) if args.master else None
        key = card_key(args.disk, decision.get("node", "")) if master is not None else None
        first_boot(decision, root=args.root, state_dir=args.state_dir, master=master, log=_console, key=key)
    except (UpdaterError, OSError, ValueError) as e:  # never keeps the node from booting
        print(f"rackboot: first-boot: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
