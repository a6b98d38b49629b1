"""`python3 -m updater --disk /dev/vda --master http://10.0.2.2:8080 --decision-file F`.

Exit 0: the decision is written (shell KEY=VALUE lines /init sources before it
mounts the slot and switch_roots; action 'poweroff' when the worker has no card: /init
powers it off). Exit 1: no slot can boot; the message is on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from .errors import NoCard, UpdaterError
from .formats import DEFAULT_MOUNT, MOUNTS
from .main import CARD_WAIT, Decision, console_log, discover_identity, expected, poweroff_shell, run
from .signature import PUBLIC_KEY, from_environment
from .sources import parse_list
from .watchdog import DEVICE, NoWatchdog, Watchdog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="updater", description="rackboot worker updater")
    p.add_argument("--disk", required=True, help="whole-disk device (or image file) of the card")
    p.add_argument("--master", required=True, help="master URL, e.g. http://10.0.2.2:8080")
    p.add_argument(
        "--sources",
        default="",
        help="rackboot.sources: comma-separated http:// URLs asked after the master for every "
        "document and byte range (default: none)",
    )
    p.add_argument("--mac", help="identity MAC (default: first interface in /sys/class/net)")
    p.add_argument("--serial", help="board serial (default: device tree or /proc/cpuinfo)")
    p.add_argument("--decision-file", help="write the decision here as shell KEY=VALUE lines")
    p.add_argument("--no-layout", action="store_true", help="use the card's partition table as is")
    p.add_argument(
        "--public-key",
        default=PUBLIC_KEY,
        help="the master's Ed25519 key; when the file exists, only signed plans and manifests "
        "are taken (default: %(default)s)",
    )
    p.add_argument(
        "--offline-mount",
        default=DEFAULT_MOUNT,
        choices=MOUNTS,
        help="how to mount the slot when no plan arrives (default: %(default)s)",
    )
    p.add_argument(
        "--card-wait",
        type=float,
        default=CARD_WAIT,
        metavar="S",
        help="seconds the card's device may take to appear before the worker has none (default: %(default)s)",
    )
    p.add_argument("--watchdog", default=DEVICE, help="the board's watchdog device (default: %(default)s)")
    p.add_argument(
        "--watchdog-stall",
        type=float,
        default=0,
        metavar="S",
        help="feed the watchdog while the update shows progress within S seconds; 0 = leave it alone (default)",
    )
    return p.parse_args(argv)


def write_decision(path: str, decision: Decision) -> None:
    """Atomically: /init must never source half a file. A first-boot script goes beside it."""
    settings = decision.settings
    if settings and settings.first_boot_script is not None:
        script = os.path.join(os.path.dirname(os.path.abspath(path)), "first-boot.sh")
        with open(script, "wb") as f:
            f.write(settings.first_boot_script)
        decision = replace(decision, settings=replace(settings, first_boot=script))
    write_shell(path, decision.to_shell())


def write_shell(path: str | None, text: str) -> None:
    """Atomically into ``path`` (None: stdout)."""
    if path is None:
        sys.stdout.write(text)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def extra_sources(text: str) -> tuple[str, ...]:
    """The sources after the master; a list that does not check is left out whole, said on the
    console (the master alone still updates the card: a typo must not stop a worker's boot)."""
    try:
        return parse_list(text)
    except UpdaterError as e:
        console_log(f"{e}; the master alone is asked")
        return ()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        try:
            with expected():
                identity = discover_identity(args.mac, args.serial)
        except UpdaterError as e:  # identity is for the master; the card's good slot boots without it
            console_log(f"{e}; the master cannot be asked: offline boot")
            identity = None
        watchdog = (
            Watchdog(args.watchdog, stall=args.watchdog_stall, log=console_log)
            if args.watchdog_stall > 0
            else NoWatchdog()
        )
        with watchdog:
            try:
                decision = run(
                    args.disk,
                    args.master,
                    identity,
                    sources=extra_sources(args.sources),
                    layout_check=not args.no_layout,
                    offline_mount=args.offline_mount,
                    verifier=from_environment(args.public_key),
                    watchdog=watchdog,
                    card_wait=args.card_wait,
                )
            except NoCard as e:  # not the rescue loop's to retry: waiting brings no card
                write_shell(args.decision_file, poweroff_shell(str(e)))
                return 0
        if args.decision_file:
            write_decision(args.decision_file, decision)
        else:
            sys.stdout.write(decision.to_shell())
    except UpdaterError as e:
        print(f"rackboot: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the decision file's directory is missing
        print(f"rackboot: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # run() ends every step in a decision or an UpdaterError: this is only the rest
        print(f"rackboot: error: {UpdaterError(f'unexpected {type(e).__name__}: {e}')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
