"""The `rackboot` command: a thin layer over the library, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import RackbootError
from .signals import clean_up_on_termination


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path("rackboot.toml"),
        help="the rackboot.toml to use (default: ./rackboot.toml)",
    )


def _cmd_build(args: argparse.Namespace) -> int:
    from . import build, config

    cfg = config.load(args.config)
    out = build.build(cfg, out=args.output)
    print(f"artefacts in {out}")
    return 0


def _cmd_qemu(args: argparse.Namespace) -> int:
    from . import boot, config

    cfg = config.load(args.config)
    return boot.qemu_command(cfg, expect=args.expect, timeout=args.timeout, disks=args.disk, log=args.log)


def _cmd_publish(args: argparse.Namespace) -> int:
    from . import config
    from .master import publish

    cfg = config.load(args.config)
    master = cfg.master.directory
    kernel_release, modules_from = args.kernel_release, args.modules_from
    if kernel_release is None and not args.no_modules:  # the kernel this config's workers boot
        from .build import Inputs

        kernel = Inputs(cfg).kernel
        kernel_release, modules_from = kernel.release, modules_from or kernel.root
    common = dict(
        image=args.image,
        version=args.version,
        label=args.label or "",
        kernel_release=kernel_release,
        source_date_epoch=config.source_date_epoch(),
        key=cfg.master.key,
        hooks=dict(args.hook),
        hook_timeout=args.hook_timeout,
    )
    if args.directory:
        manifest = publish.publish_directory(
            args.directory,
            master,
            size_mib=args.size_mib,
            modules_from=modules_from,
            modules=cfg.kernel.root_modules,
            **common,
        )
    else:
        manifest = publish.publish_image(args.os_image, args.partition, master, **common)
    print(f"published {manifest.image} version {manifest.version} into {master}")
    return 0


def _hook_arg(value: str) -> tuple[str, Path]:
    when, sep, script = value.partition("=")
    if not sep or not script:
        raise argparse.ArgumentTypeError(f"{value!r} is not WHEN=SCRIPT (e.g. post-install=fix.sh)")
    return when, Path(script)


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import config
    from .master import serve

    cfg = config.load(args.config)
    port = args.port if args.port is not None else cfg.master.port
    serve.serve_forever(
        cfg.master.directory,
        args.bind,
        port,
        idle_timeout=args.timeout,
        max_connections=args.max_connections,
        max_streams=cfg.master.max_streams,
        netboot=None if args.no_netboot else cfg,
        config=cfg,
        proxied_by=args.proxied_by,
    )
    return 0


def _cmd_nginx_config(args: argparse.Namespace) -> int:
    from . import config
    from .master import nginx

    cfg = config.load(args.config)
    sys.stdout.write(nginx.render_config(cfg, args.listen, args.serve, user=args.user, group=args.group))
    return 0


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds above 0")
    return number


def _cmd_keygen(args: argparse.Namespace) -> int:
    from . import config
    from .master import signing

    cfg = config.load(args.config)
    key = cfg.master.key
    if key is None:
        raise RackbootError(f"{cfg.path}: [master] key is not set; name the private key's path there first")
    if args.rotate:
        from .master import keychain

        done = keychain.rotate(key, cfg.master.directory, created=config.source_date_epoch())
        print(
            f"{done.new.name} signs from now on: {done.link} names it, signed by key {done.old.n}, "
            f"which it retires (its private key kept as {done.retired}); {len(done.resigned)} signed "
            "documents signed again. Workers take the new key on their next boot; rebuild so new cards carry it"
        )
        return 0
    print(f"public key written to {signing.keygen(key)}; rebuild so workers carry it")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from . import config
    from .master import plans

    cfg = config.load(args.config)
    path = plans.assign(
        cfg, node=args.node, image=args.image, version=args.version, hostname=args.hostname, method=args.method
    )
    print(f"plan written to {path}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from . import config
    from .master import inventory, plans, status

    cfg = config.load(args.config)
    node = plans.node_name(args.node) if args.node else None
    inv = inventory.Inventory(cfg.master.directory)
    return status.run(inv, cfg.master.stale, sys.stdout, as_json=args.json, node=node)


def _cmd_adopt(args: argparse.Namespace) -> int:
    from . import config
    from .master import web

    cfg = config.load(args.config)
    inv = web.inventory_for(cfg.master.directory, cfg)
    adopted = web.adopt(cfg, inv, args.node, image=args.image, version=args.version, replace_key=args.replace)
    plan = f"its own plan ({args.image})" if args.image else "the default plan"
    print(f"{adopted.node.id} adopted: it gets {plan} from its next boot; {adopted.said}")
    return 0


def _cmd_forget(args: argparse.Namespace) -> int:
    from . import config
    from .master import web

    cfg = config.load(args.config)
    print(web.forget(cfg, web.inventory_for(cfg.master.directory, cfg, log=print), args.node).text())
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from . import config
    from .master import power, rollout, web

    cfg = config.load(args.config)
    inv = web.inventory_for(cfg.master.directory, cfg)
    progress: rollout.Progress | None
    if args.abort:
        progress = rollout.abort(inv)
    elif args.status:
        progress = rollout.advance(cfg, inv)
        if progress is None:
            print("no rollouts yet")
            return 0
    else:
        if not args.image:
            raise RackbootError("rollout needs --image NAME (or --status, --abort)")
        progress = rollout.start(
            cfg,
            inv,
            image=args.image,
            version=args.version,
            waves=args.waves,
            max_failed=args.max_failed,
            cycle=args.cycle,
            power=power.cycler(cfg, print) if args.cycle else None,
            wave_timeout=args.wave_timeout,
        )
    assert progress is not None  # start made one
    print(progress.text())
    return 1 if progress.shown_state in (rollout.HALTED, rollout.STUCK) else 0


def _cmd_power(args: argparse.Namespace) -> int:
    from . import config
    from .master import inventory, plans, power

    cfg = config.load(args.config)
    if args.all:
        nodes = [n.id for n in inventory.Inventory(cfg.master.directory).nodes()]
        if not nodes:
            raise RackbootError(f"no nodes in the inventory of {cfg.master.directory}")
    elif args.node:
        nodes = [plans.node_name(args.node)]
    else:
        raise RackbootError("power needs a NODE or --all")
    power.check(power.switch(cfg, nodes, args.action, stagger=args.stagger, log=print))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(args.config, workdir=args.workdir, rack=args.rack or 0)


def _cmd_torture(args: argparse.Namespace) -> int:
    from rackboot.qemu import torture

    return torture.run(args.config, cuts=args.cuts, seed=args.seed, workdir=args.workdir)


def _cmd_flash(args: argparse.Namespace) -> int:
    from .firmware import flash

    return flash.command(args)


def _cmd_config(args: argparse.Namespace) -> int:
    from . import config

    if args.reference:
        print(config.reference())
        return 0
    cfg = config.load(args.config)
    for section in config.SECTIONS:
        for key, value in config.plain(getattr(cfg, section)).items():
            print(f"[{section}] {key} = {value!r}")
    return 0


def parser() -> argparse.ArgumentParser:
    from .initramfs.updater.formats import HOOK_TIMEOUT, Method  # one default for the CLI and publish
    from .master.limits import IDLE_TIMEOUT, MAX_CONNECTIONS  # not serve: http.server is slow to import

    p = argparse.ArgumentParser(prog="rackboot", description="Netboot and update racks of Pi-class workers.")
    p.add_argument("--version", action="version", version=f"rackboot {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build boot artefacts from rackboot.toml")
    _config_arg(b)
    b.add_argument("-o", "--output", type=Path, help="output directory (default: [output] directory)")
    b.set_defaults(func=_cmd_build)

    q = sub.add_parser("qemu", help="boot the built artefacts on an emulated worker")
    _config_arg(q)
    q.add_argument("--expect", help="exit 0 only when a console line matches this regex")
    q.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for --expect")
    q.add_argument("--disk", type=Path, action="append", default=[], help="a raw disk image for the worker")
    q.add_argument("--log", type=Path, help="console log (default: <output>-console.log beside the build)")
    q.set_defaults(func=_cmd_qemu)

    pub = sub.add_parser("publish", help="publish a root filesystem as a versioned image")
    _config_arg(pub)
    src = pub.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", dest="directory", type=Path, help="a root filesystem directory")
    src.add_argument("--os-image", type=Path, help="an OS image (.img) to take a partition from")
    pub.add_argument("--partition", default="2", help="partition number or label in --os-image")
    pub.add_argument("--image", required=True, help="image name, e.g. example")
    pub.add_argument("--version", type=int, help="version number (default: latest + 1)")
    pub.add_argument("--label", help="free text shown to humans, e.g. v2")
    pub.add_argument("--size-mib", type=int, help="filesystem size (default: fitted to the content)")
    pub.add_argument(
        "--kernel-release", help="the kernel release whose modules the root must carry (default: the config's kernel)"
    )
    pub.add_argument("--no-modules", action="store_true", help="do not check or add kernel modules")
    pub.add_argument("--modules-from", type=Path, help="an unpacked kernel package to copy modules from")
    pub.add_argument(
        "--hook",
        type=_hook_arg,
        action="append",
        default=[],
        metavar="WHEN=SCRIPT",
        help="a script the worker runs as root, signed with the image: pre-install (before "
        "the slot is written), post-install (after it verified, before it is committed) or "
        "first-boot (chrooted into the new root before it boots, once per node and version)",
    )
    pub.add_argument(
        "--hook-timeout",
        type=int,
        default=HOOK_TIMEOUT,
        metavar="S",
        help="seconds a hook may run before the worker kills it (default: %(default)s)",
    )
    pub.set_defaults(func=_cmd_publish)

    s = sub.add_parser("serve", help="run the master: plans, images, reports over HTTP")
    _config_arg(s)
    s.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: [master] port)")
    s.add_argument(
        "--timeout",
        type=_positive_float,
        default=IDLE_TIMEOUT,
        metavar="S",
        help="seconds a client may keep one read or write waiting before its connection "
        "is closed (default: %(default)s)",
    )
    s.add_argument(
        "--max-connections",
        type=_positive_int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; past that a client gets 503 and retries (default: %(default)s)",
    )
    s.add_argument(
        "--no-netboot",
        action="store_true",
        help="HTTP only: do not run dnsmasq even when [network] interface is set",
    )
    s.add_argument(
        "--proxied-by",
        metavar="ADDR",
        help="the address a reverse proxy (rackboot nginx-config's nginx) connects from: requests "
        "from it name the worker in X-Real-IP, which the inventory records (default: none trusted)",
    )
    s.set_defaults(func=_cmd_serve)

    ng = sub.add_parser(
        "nginx-config", help="print an nginx config that serves the master's tree, with serve behind it"
    )
    _config_arg(ng)
    ng.add_argument("--listen", required=True, metavar="ADDR:PORT", help="where nginx listens (workers' master URL)")
    ng.add_argument("--serve", required=True, metavar="URL", help="rackboot serve's URL, e.g. http://127.0.0.1:8081")
    ng.add_argument("--user", default="nobody", help="the user nginx's workers read the tree as (default: %(default)s)")
    ng.add_argument("--group", default="nogroup", help="their group (default: %(default)s)")
    ng.set_defaults(func=_cmd_nginx_config)

    k = sub.add_parser("keygen", help="make the master's Ed25519 signing key ([master] key)")
    _config_arg(k)
    k.add_argument(
        "--rotate",
        action="store_true",
        help="replace the key: a new one in its place, named in the master's keys/<n>.json (signed by the "
        "old key, which workers then refuse), every signed document signed again, the old key kept aside",
    )
    k.set_defaults(func=_cmd_keygen)

    pl = sub.add_parser("plan", help="assign an image to a node (or to 'default')")
    _config_arg(pl)
    pl.add_argument(
        "--node",
        default="default",
        help="the node's MAC (52:54:00:12:34:56, 52-54-00-12-34-56, 5254.0012.3456 or 525400123456, "
        "any case) or 'default' (default: %(default)s)",
    )
    pl.add_argument("--image", required=True, help="published image name")
    pl.add_argument(
        "--version",
        type=int,
        help="pin a version (default: latest); workers take a pinned version even when it is older",
    )
    pl.add_argument(
        "--hostname",
        help="the node's hostname, one RFC 1123 label (default: the one it has, else [master] hostname's pattern)",
    )
    pl.add_argument(
        "--method",
        type=Method,
        choices=list(Method),
        default=Method.IMAGE,
        help="image: the image's blocks; rsync: its files into a fresh slot from serve's rsync daemon "
        "([master] rsync_port), checked against the signed file manifest (default: %(default)s)",
    )
    pl.set_defaults(func=_cmd_plan)

    st = sub.add_parser("status", help="every node: what it runs, its state, when it was last seen")
    _config_arg(st)
    st.add_argument("--json", action="store_true", help="JSON for scripts")
    st.add_argument("--node", help="one node (its MAC) with its report history")
    st.set_defaults(func=_cmd_status)

    ad = sub.add_parser(
        "adopt", help='let a new node have a plan ([master] adopt = "manual") and pin the key it presented'
    )
    _config_arg(ad)
    ad.add_argument("node", help="the node's MAC")
    ad.add_argument(
        "--replace",
        action="store_true",
        help="its card was replaced: unpin its key and pin the one it presents now (auto adoption: the next one)",
    )
    ad.add_argument("--image", help="write its own plan for this image (default: it gets the default plan)")
    ad.add_argument("--version", type=int, help="with --image: pin a version (default: latest)")
    ad.set_defaults(func=_cmd_adopt)

    fg = sub.add_parser("forget", help="remove a node: its inventory rows, its plan, its name")
    _config_arg(fg)
    fg.add_argument("node", help="the node's MAC")
    fg.set_defaults(func=_cmd_forget)

    ro = sub.add_parser("rollout", help="roll a version out in waves, halting when a wave fails")
    _config_arg(ro)
    ro.add_argument("--image", help="published image name")
    ro.add_argument("--version", type=int, help="the version to roll out (default: latest)")
    ro.add_argument(
        "--waves",
        default="1,25%,rest",
        help="wave sizes: node counts, percentages of all nodes, and 'rest' (default: %(default)s)",
    )
    ro.add_argument(
        "--max-failed",
        type=int,
        default=0,
        metavar="K",
        help="halt when more than K nodes of a wave fail (default: %(default)s)",
    )
    ro.add_argument(
        "--wave-timeout",
        type=_positive_float,
        metavar="S",
        help="a node that has not confirmed S seconds after its plan was written counts as failed "
        "and gets its previous plan back (default: a wave waits as long as it takes)",
    )
    ro.add_argument("--cycle", action="store_true", help="power-cycle each wave's nodes when it starts ([power])")
    ro.add_argument(
        "--status", action="store_true", help="show the newest rollout (and move it on); exit 1 if halted or stuck"
    )
    ro.add_argument("--abort", action="store_true", help="stop the running rollout; nodes keep their plans")
    ro.set_defaults(func=_cmd_rollout)

    pw = sub.add_parser("power", help="switch nodes on, off or cycle them ([power] driver)")
    _config_arg(pw)
    pw.add_argument("action", choices=("on", "off", "cycle"))
    pw.add_argument("node", nargs="?", help="the node's MAC")
    pw.add_argument("--all", action="store_true", help="every node in the inventory")
    pw.add_argument(
        "--stagger",
        type=float,
        metavar="S",
        help="seconds between two nodes switched on (default: [power] stagger)",
    )
    pw.set_defaults(func=_cmd_power)

    d = sub.add_parser("demo", help="the whole story on emulated workers")
    _config_arg(d)
    d.add_argument("--workdir", type=Path, help="where the demo keeps its master, disks and logs")
    d.add_argument(
        "--rack",
        type=_positive_int,
        metavar="N",
        help="switch N blank workers on together on a rack network in a namespace (needs root; "
        "default: one worker on QEMU's user-mode network)",
    )
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("torture", help="cut an emulated worker's power during updates; check what it boots")
    _config_arg(t)
    t.add_argument("--cuts", type=int, default=50, help="power cuts, one per update (default: %(default)s)")
    t.add_argument("--seed", type=int, default=1, help="seed of the random cut points (default: %(default)s)")
    t.add_argument("--workdir", type=Path, help="where the run keeps its disk image and console logs")
    t.set_defaults(func=_cmd_torture)

    from .firmware import flash

    fl = sub.add_parser(
        "flash",
        help="write the SD image onto a card: only removable, unmounted ones, verified",
        description=(flash.__doc__ or "").split("\n\n")[1],
        epilog="without a device: lists the disks and says which may be written",
    )
    _config_arg(fl)
    flash.add_arguments(fl)
    fl.set_defaults(func=_cmd_flash)

    c = sub.add_parser("config", help="show the parsed config, or the settings reference")
    _config_arg(c)
    c.add_argument("--reference", action="store_true", help="print every setting as a Markdown table")
    c.set_defaults(func=_cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    clean_up_on_termination()  # SIGTERM and SIGHUP unwind like Ctrl-C, so temporaries are removed
    # serve sends only world-readable files (a private key never is): what rackboot writes
    # for the master's tree must be readable by others whatever the caller's umask says
    os.umask(os.umask(0) & 0o022)
    command: Callable[[argparse.Namespace], int] = args.func  # set by each subparser
    try:
        return command(args)
    except RackbootError as exc:
        print(f"rackboot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rackboot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
