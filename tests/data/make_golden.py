"""Make the golden samples in tests/data with the code of the revision that wrote each one.

Run from the repository (it reads old revisions with git):  .venv/bin/python tests/data/make_golden.py
Each revision's initramfs/ (the updater, rackboot-mark-good.sh) is taken out of git into a
temporary directory and imported under its own package name, so a sample dated
343430d is the bytes 343430d's writer makes, not today's. Signatures come from
builder/signing.py (unchanged since it appeared in 83c0782) with the test key in keys/.
Every sample is rewritten; `git diff --stat tests/data` must then show no change.
tests/unit/test_golden_formats.py holds the same values and checks today's code against them.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KEY = HERE / "keys" / "test-master.key"

# The commit that introduced each revision of a writer (README.md has the table).
FIRST = "343430d"  # every document, rev1
SIGNED = "83c0782"  # plan rev2 (pin); .sig files
TRIAL = "a6e6891"  # plan rev3 (tries), slot state rev2 (trial/failed, tries), confirm sector, booted file
HOOKS = "8e35f29"  # manifest rev2 (hooks), report rev2 (output, phase hook)
CONFIRM = "f609d68"  # report rev3 (phase confirm)
WAIT = "02e2eb7"  # report rev4 (phase wait)
IDENTITY = "a96e3f1"  # plan rev4 (hostname, persist), manifest rev3 (first-boot), report rev5, booted rev2

NODE = "52-54-00-12-34-56"
CARD = 256 << 20  # the card the MBR sample is laid out for
MIB = 1 << 20


def digest(label: str) -> str:
    """A stand-in sha256 that reads as one and is easy to recompute in the tests."""
    return hashlib.sha256(label.encode()).hexdigest()


H1, H2 = digest("example v1"), digest("example v2")
HOOK_SCRIPT = b"#!/bin/sh\n# golden post-install hook: checks nothing, says so\necho post-install ok\n"
FIRST_BOOT_SCRIPT = (
    b"#!/bin/sh\n# golden first-boot hook: says whose first boot it is\necho first boot of $RACKBOOT_HOSTNAME\n"
)


def revision(rev: str, tmp: Path):
    """That commit's updater package, importable as updater_<rev>; its files under tmp/<rev>."""
    root = tmp / rev
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "initramfs"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "initramfs" / "updater").rename(root / f"updater_{rev}")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"updater_{rev}"), root


def sub(package, name: str):
    return importlib.import_module(f"{package.__name__}.{name}")


def layout(formats, repartition: str = "allowed"):
    P = formats.Partition
    return formats.Layout(
        (P("boot", 4, 16, "0c"), P("a", 20, 64, "83"), P("b", 84, 64, "83"), P("data", 148, "rest", "83")), repartition
    )


def write(name: str, data: bytes) -> None:
    (HERE / name).write_bytes(data)
    print(f"{name}: {len(data)} bytes")


def sign(name: str) -> None:
    from rackboot.master import signing

    write(name + ".sig", signing.sign(KEY, (HERE / name).read_bytes()))


def ensure_key() -> None:
    """The test key is made once (openssl genpkey) and committed; never remade."""
    if not KEY.exists():
        from rackboot.master import signing

        signing.keygen(KEY)


# --- card --------------------------------------------------------------------------------


def slot_state_area(pkg, states) -> bytes:
    """Write `states` one after another with the revision's state.write on a blank card;
    the sample is both copies' reserved areas (at 1 MiB and at 2 MiB), one after the other."""
    state, disk = sub(pkg, "state"), sub(pkg, "disk")
    with tempfile.NamedTemporaryFile() as card:
        card.truncate(4 * MIB)
        with disk.Disk(card.name) as d:
            for s in states:
                state.write(d, s)
            return b"".join(d.read(offset, state.RESERVED) for offset in state.COPIES)


def slot_states_rev1(formats):
    S, St = formats.Slot, formats.SlotState
    a = S("good", "example", 1, H1, 2)
    return [
        St(slots={"a": a}, primary="a", last_good="a"),
        St(slots={"a": a, "b": S("writing", "example", 2, H2, 3)}, primary="a", last_good="a"),
        St(slots={"a": a, "b": S("good", "example", 2, H2, 3)}, primary="b", last_good="b"),
    ]


def slot_states_rev2(formats):
    S, St = formats.Slot, formats.SlotState
    a = S("good", "example", 1, H1, 2)
    return [
        St(slots={"a": a}, primary="a", last_good="a"),
        St(slots={"a": a, "b": S("writing", "example", 2, H2, 3)}, primary="a", last_good="a"),
        St(slots={"a": a, "b": S("trial", "example", 2, H2, 3, tries=3)}, primary="b", last_good="a"),
        St(slots={"a": a, "b": S("trial", "example", 2, H2, 3, tries=2)}, primary="b", last_good="a"),
    ]


def booted_rev1(pkg) -> bytes:
    """/run/rackboot/booted as /init leaves it: the updater's decision plus the disk line."""
    decision = sub(pkg, "main").Decision(
        slot="b",
        partition_number=3,
        device="/dev/mmcblk0p3",
        mount="ro+overlay:tmpfs",
        action="installed",
        bytes_fetched=1234,
        seconds=5.5,
        image="example",
        version=2,
        sha256=H2,
        data_device="/dev/mmcblk0p4",
        data_blank=False,
    )
    return (decision.to_shell() + "disk='/dev/mmcblk0'\n").encode()


def booted_rev2(pkg) -> bytes:
    """rev1's decision with the node's own settings (updater/node.py), as /init leaves it."""
    node = sub(pkg, "node")
    settings = node.NodeSettings(
        node=NODE,
        hostname="worker-01",
        machine_id=node.machine_id(NODE, "example"),
        persist=("/etc/ssh", "/var/lib/myservice"),
        planned=True,
        first_boot="/run/rackboot/first-boot.sh",
        first_boot_timeout=120,
    )
    decision = sub(pkg, "main").Decision(
        slot="b",
        partition_number=3,
        device="/dev/mmcblk0p3",
        mount="ro+overlay:tmpfs",
        action="installed",
        bytes_fetched=1234,
        seconds=5.5,
        image="example",
        version=2,
        sha256=H2,
        data_device="/dev/mmcblk0p4",
        data_blank=False,
        settings=settings,
    )
    return (decision.to_shell() + "disk='/dev/mmcblk0'\n").encode()


def first_boot_hook(formats):
    return formats.Hook(
        name="first-boot",
        file="first-boot.sh",
        size=len(FIRST_BOOT_SCRIPT),
        sha256=hashlib.sha256(FIRST_BOOT_SCRIPT).hexdigest(),
        timeout=300,
    )


def report_rev5(formats):
    return formats.Report(
        node=NODE,
        phase="hook",
        seconds=0.25,
        slot="b",
        version=2,
        time=1700000500.5,
        output="first boot of worker-01\n",
        hostname="worker-01",
        hook="first-boot",
    )


def confirm_rev1(root: Path) -> bytes:
    """The sector rackboot-mark-good writes, run on the booted sample pointed at a scratch card."""
    with tempfile.TemporaryDirectory() as tmp:
        card, booted = Path(tmp, "card"), Path(tmp, "booted")
        with open(card, "wb") as f:
            f.truncate(4 * MIB)
        booted.write_bytes((HERE / "booted.rev1.sh").read_bytes() + f"disk='{card}'\n".encode())
        subprocess.run(
            ["sh", str(root / "initramfs/rackboot-mark-good.sh")],
            check=True,
            capture_output=True,
            env={"RACKBOOT_BOOTED": str(booted), "PATH": os.environ["PATH"]},
        )
        with open(card, "rb") as f:
            f.seek(3 * MIB)
            return f.read(512)


def mbr_rev1(pkg) -> bytes:
    formats, layout_mod, mbr = sub(pkg, "formats"), sub(pkg, "layout"), sub(pkg, "mbr")
    return mbr.dump(layout_mod.decide(layout(formats), None, CARD, node=NODE).table)


# --- master ------------------------------------------------------------------------------


def plan(formats, rev: int, **extra):
    fields = {
        "node": "default",
        "layout": layout(formats),
        "image": "/images/example/2/manifest.json",
        "mount": "ro+overlay:tmpfs",
    }
    if rev >= 2:
        fields["pin"] = True
    if rev >= 3:
        fields["tries"] = 5
    return formats.Plan(**{**fields, **extra})


def manifest(formats, version: int, **extra):
    return formats.Manifest(
        image="example",
        version=version,
        size=64 * MIB,
        sha256=digest(f"example v{version}"),
        crc32="0badcafe",
        stream="rootfs.ext4.gz",
        stream_size=12345678,
        stream_sha256=digest(f"example v{version} stream"),
        label=f"v{version}",
        created=1700000000,
        fstype="ext4",
        kernel_release="6.1.0-28-arm64",
        **extra,
    )


def reports(pkg_by_rev) -> dict[str, object]:
    r1 = sub(pkg_by_rev[FIRST], "formats").Report(
        node=NODE, phase="boot", bytes=1234, seconds=5.5, slot="b", version=2, time=1700000100.25
    )
    r2 = sub(pkg_by_rev[HOOKS], "formats").Report(
        node=NODE, phase="hook", seconds=0.125, slot="b", version=2, time=1700000200.5, output="post-install ok\n"
    )
    r3 = sub(pkg_by_rev[CONFIRM], "formats").Report(node=NODE, phase="confirm", slot="b", version=2, time=1700000300.75)
    r4 = sub(pkg_by_rev[WAIT], "formats").Report(
        node=NODE, phase="wait", bytes=12345678, seconds=7.25, slot="b", version=2, time=1700000400.5
    )
    return {"rev1": r1, "rev2": r2, "rev3": r3, "rev4": r4}


def artefacts_rev1() -> bytes:
    """artefacts.json by builder/graph.py's write_manifest (unchanged since a489f1f), for files
    whose content is their name and a newline."""
    from rackboot import graph

    with tempfile.TemporaryDirectory() as tmp:
        out, arts, hashes = Path(tmp), [], {}
        for name, kind, filename in ARTEFACTS:
            (out / filename).write_bytes(f"{name}\n".encode())
            arts.append(graph.Artefact(name, kind, filename, {}, lambda _: None))
            hashes[name] = graph.sha256_file(out / filename)
        graph.write_manifest(out, arts, hashes)
        return (out / "artefacts.json").read_bytes()


ARTEFACTS = (
    ("kernel", "kernel", "vmlinuz"),
    ("initramfs", "initramfs", "initramfs.cpio.gz"),
    ("card-script", "uboot-script", "boot.scr"),
    ("sdcard", "sdcard", "sdcard.img"),
)


def main() -> None:
    os.chdir(REPO)
    ensure_key()
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = {rev: revision(rev, Path(tmp)) for rev in (FIRST, SIGNED, TRIAL, HOOKS, CONFIRM, WAIT, IDENTITY)}
        pkg = {rev: p for rev, (p, _) in pkgs.items()}
        f = {rev: sub(p, "formats") for rev, p in pkg.items()}

        write("slot-state.format1.rev1.bin", slot_state_area(pkg[FIRST], slot_states_rev1(f[FIRST])))
        write("slot-state.format1.rev2.bin", slot_state_area(pkg[TRIAL], slot_states_rev2(f[TRIAL])))
        write("booted.rev1.sh", booted_rev1(pkg[TRIAL]))
        write("booted.rev2.sh", booted_rev2(pkg[IDENTITY]))
        write("confirm.rev1.bin", confirm_rev1(pkgs[TRIAL][1]))
        write("mbr.rev1.bin", mbr_rev1(pkg[FIRST]))

        write("plan.format1.rev1.json", f[FIRST].dump(plan(f[FIRST], 1)))
        write("plan.format1.rev2.json", f[SIGNED].dump(plan(f[SIGNED], 2)))
        sign("plan.format1.rev2.json")
        write("plan.format1.rev3.json", f[TRIAL].dump(plan(f[TRIAL], 3)))
        sign("plan.format1.rev3.json")
        f4 = f[IDENTITY]
        write(
            "plan.format1.rev4.json",
            f4.dump(plan(f4, 3, node=NODE, hostname="worker-01", persist=("/etc/ssh", "/var/lib/myservice"))),
        )
        sign("plan.format1.rev4.json")
        write(
            "plan.format1.rev3.unsigned.json",
            f[TRIAL].dump(plan(f[TRIAL], 3, node=NODE, image=None, mount="ro+overlay:data", pin=False, tries=3)),
        )

        write("manifest.format1.rev1.json", f[FIRST].dump(manifest(f[FIRST], 1)))
        sign("manifest.format1.rev1.json")
        write("post-install.rev1.sh", HOOK_SCRIPT)
        hook = f[HOOKS].Hook(
            name="post-install",
            file="post-install.sh",
            size=len(HOOK_SCRIPT),
            sha256=hashlib.sha256(HOOK_SCRIPT).hexdigest(),
            timeout=120,
        )
        write("manifest.format1.rev2.hooks.json", f[HOOKS].dump(manifest(f[HOOKS], 2, hooks=(hook,))))
        sign("manifest.format1.rev2.hooks.json")
        write("first-boot.rev1.sh", FIRST_BOOT_SCRIPT)
        write("manifest.format1.rev3.first-boot.json", f4.dump(manifest(f4, 2, hooks=(first_boot_hook(f4),))))
        sign("manifest.format1.rev3.first-boot.json")
        write("report.rev5.json", f4.dump(report_rev5(f4)))
        write(
            "latest.format1.rev1.json",
            f[FIRST].dump(f[FIRST].Latest(image="example", version=2, manifest="/images/example/2/manifest.json")),
        )

        made = reports(pkg)
        for rev, report in made.items():
            write(f"report.{rev}.json", f[FIRST].dump(report))
        # rackboot serve's reports/<node>.jsonl: the report plus the time it arrived, one a line
        lines = [f[FIRST].dump({**r.to_dict(), "received": r.time + 0.5}) for r in made.values()]
        write("reports.rev1.jsonl", b"".join(lines))
    write("artefacts.rev1.json", artefacts_rev1())


if __name__ == "__main__":
    main()
