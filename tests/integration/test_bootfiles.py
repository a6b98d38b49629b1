"""Boot files kept current on a file-backed card: the host's updater against `rackboot serve`,
real FAT images from the card builder, boot manifests signed by the master's key."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from rackboot.firmware import sdcard
from rackboot.initramfs.updater import bootfiles, formats, mbr, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Layout, Partition, Plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import bootfiles as master_bootfiles
from rackboot.master import serve, signing

from tests.integration.signed_rack import sign
from tests.integration.updater_master import MAC, NODE, image_bytes, publish

MIB = 1 << 20
BOOT_MIB = 80  # two boot areas of 40 MiB
AREA = {"a": 4 * MIB, "b": 44 * MIB}
CARD_MIB = 512


def boot_files(build: int) -> dict[str, bytes]:
    return {"boot.scr": f"echo build {build}\n".encode(), "Image": bytes([build]) * (3 * MIB), "dtbs/x.dtb": b"dtb"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("boot")
    out = {}
    for build in (1, 2):
        out[build] = d / f"boot{build}.vfat"
        sdcard.boot_image(out[build], boot_files(build), boot_size_mib=BOOT_MIB, volume_id=0x7261636B, mtime=1)
    return out


@pytest.fixture
def master(tmp_path):
    root = tmp_path / "master"
    root.mkdir()
    server = serve.make_server(root, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, server
    server.shutdown()
    server.server_close()


def flashed(tmp_path: Path, fat: Path) -> str:
    """A card written with a build's sdcard.img, on a bigger medium."""
    card = tmp_path / "card.img"
    sdcard.card_image(card, fat, boot_size_mib=BOOT_MIB, disk_signature=0x7261636B)
    with open(card, "r+b") as f:
        f.truncate(CARD_MIB * MIB)
    return str(card)


def release(root: Path, key: Path, fat: Path) -> str:
    """v1 of the image and the boot files of ``fat``, in a signed plan; the boot manifest's path."""
    boot = master_bootfiles.publish_image(fat, root, key=key)
    manifest = publish(root, 1, image_bytes(1))
    sign(root, manifest, key)
    parts = (
        Partition("boot", 4, BOOT_MIB, "0c"),
        Partition("a", 4 + BOOT_MIB, 64, "83"),
        Partition("b", 68 + BOOT_MIB, 64, "83"),
        Partition("data", 132 + BOOT_MIB, "rest", "83"),
    )
    plan = Plan(node=NODE, layout=Layout(parts), image=manifest, boot=boot)
    (root / "plans").mkdir(exist_ok=True)
    (root / "plans" / f"{NODE}.json").write_bytes(formats.dump(plan))
    sign(root, f"/plans/{NODE}.json", key)
    return boot


def update(card: str, server, key: Path, log=None):
    master = MasterClient(server.url, read_timeout=5.0, retries=1, backoff=0.01)
    verifier = Verifier(str(signing.public_key_path(key)))
    return run(card, server.url, Identity(MAC), master=master, log=log or (lambda m: None), verifier=verifier)


def entry_1(card: str) -> tuple[int, int]:
    with open(card, "rb") as f:
        e = mbr.parse(f.read(512)).entry(1)
    assert e is not None and e.bootable and e.type == 0x0C
    return e.start * 512, e.sectors * 512


def area(card: str, name: str) -> bytes:
    with open(card, "rb") as f:
        f.seek(AREA[name])
        return f.read(40 * MIB)


def boot_build(fat: Path) -> str:
    return hashlib.sha256(fat.read_bytes()).hexdigest()[:16]


def reports(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / f"reports/{NODE}.jsonl").read_text().splitlines()]


def boot_stream_bytes(server) -> int:
    return sum(
        n for path, n in server.stats()["bytes_sent"].items() if path.startswith("/boot/") and path.endswith(".gz")
    )


def test_a_card_from_build_1_switches_to_build_2_then_skips_it(master, tmp_path, keys, images):
    root, server = master
    card = flashed(tmp_path, images[1])
    assert entry_1(card) == (AREA["a"], 40 * MIB) and area(card, "a") == images[1].read_bytes()
    boot = release(root, keys["master"], images[2])
    lines: list[str] = []
    first = update(card, server, keys["master"], lines.append)
    assert (first.slot, first.action) == ("a", "installed")
    assert entry_1(card) == (AREA["b"], 40 * MIB)
    assert area(card, "b") == images[2].read_bytes() and area(card, "a") == images[1].read_bytes()
    build = hashlib.sha256(images[2].read_bytes()).hexdigest()[:16]
    assert boot == f"/boot/{build}/boot.json"
    assert any(f"partition 1 is boot area b now, build {build}" in line for line in lines), lines
    with Disk(card, writable=False) as d:
        assert bootfiles.read_record(d) == bootfiles.BootRecord(
            44 * 2048, 40 * 2048, 40 * MIB, hashlib.sha256(images[2].read_bytes()).hexdigest(), build
        )
    sent = boot_stream_bytes(server)
    (report,) = [r for r in reports(root) if r["phase"] == "boot-files"]
    assert (
        report["bytes"] == sent > 0
        and report["error"] is None
        and report["output"] == f"switched: build {build}, area b"
    )
    assert first.bytes_fetched == server.stats()["bytes_sent"]["/images/example/1/rootfs.ext4.gz"]  # image bytes only

    second = update(card, server, keys["master"])
    assert (second.action, entry_1(card)) == ("up-to-date", (AREA["b"], 40 * MIB))
    assert boot_stream_bytes(server) == sent  # the record said area b holds the build: nothing fetched, nothing read
    assert len([r for r in reports(root) if r["phase"] == "boot-files"]) == 1  # up to date: nothing to report


def test_without_a_record_the_active_area_is_hashed_once_and_recorded(master, tmp_path, keys, images):
    root, server = master
    card = flashed(tmp_path, images[2])
    release(root, keys["master"], images[2])
    with Disk(card) as d:  # the card image records what area A holds; a torn record is as good as none
        assert bootfiles.read_record(d) == bootfiles.BootRecord(
            8192, 40 * 2048, 40 * MIB, hashlib.sha256(images[2].read_bytes()).hexdigest(), boot_build(images[2])
        )
        d.write(bootfiles.RECORD + 10, b"\xff")
        assert bootfiles.read_record(d) is None
    update(card, server, keys["master"])
    assert entry_1(card) == (AREA["a"], 40 * MIB) and boot_stream_bytes(server) == 0
    with Disk(card, writable=False) as d:
        record = bootfiles.read_record(d)
    assert record is not None and (record.start, record.sha256) == (
        8192,
        hashlib.sha256(images[2].read_bytes()).hexdigest(),
    )


@pytest.mark.parametrize("tamper", ["stream", "manifest"])
def test_a_tampered_boot_image_is_refused_and_the_card_keeps_its_area(master, tmp_path, keys, images, tamper):
    root, server = master
    card = flashed(tmp_path, images[1])
    boot = release(root, keys["master"], images[2])
    where = root / boot.lstrip("/")
    if tamper == "stream":  # one byte of the gzip stream: its sha256 no longer matches the signed manifest
        stream = where.with_name("boot.vfat.gz")
        data = bytearray(stream.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stream.write_bytes(bytes(data))
    else:  # the manifest itself, after signing: the signature check refuses it
        doc = json.loads(where.read_bytes())
        where.write_bytes(formats.dump({**doc, "sha256": hashlib.sha256(images[1].read_bytes()).hexdigest()}))
    decision = update(card, server, keys["master"])
    assert (decision.slot, decision.action) == ("a", "installed")  # the slot update goes on
    assert entry_1(card) == (AREA["a"], 40 * MIB) and area(card, "a") == images[1].read_bytes()
    errors = [r["error"] for r in reports(root) if r["phase"] == "error"]
    assert any(e.startswith("boot-files: ") for e in errors), errors
    if tamper == "manifest":
        assert any("signature" in e for e in errors), errors


def test_another_builds_boot_manifest_at_the_planned_path_is_refused(master, tmp_path, keys, images):
    """A boot manifest signed by the master, but of another build than the plan's, served at the
    plan's path: refused in one line, the card keeps its boot area, the good slot boots."""
    root, server = master
    card = flashed(tmp_path, images[1])
    old = release(root, keys["master"], images[1])
    assert update(card, server, keys["master"]).action == "installed"
    with Disk(card) as d:  # rackboot-mark-good in the booted system
        st = state.read(d)
        d.write(state.CONFIRM, f"{state.CONFIRM_WORD} a {st.slot('a').sha256}\n".encode().ljust(512, b"\0"))
    planned = release(root, keys["master"], images[2])
    for name in ("boot.json", "boot.json.sig"):  # build 1's signed manifest where the plan names build 2's
        (root / planned.lstrip("/")).with_name(name).write_bytes((root / old.lstrip("/")).with_name(name).read_bytes())
    before = len(reports(root))
    decision = update(card, server, keys["master"])
    assert (decision.slot, decision.action, decision.version) == ("a", "up-to-date", 1)
    assert entry_1(card) == (AREA["a"], 40 * MIB) and boot_stream_bytes(server) == 0
    errors = [r["error"] for r in reports(root)[before:] if r["phase"] == "error"]
    b1, b2 = boot_build(images[1]), boot_build(images[2])
    assert errors == [f"boot-files: boot manifest: {planned} is of build {b1}, not {b2} as the plan asked; refused"]
    with Disk(card, writable=False) as d:
        assert state.read(d).slot("a").state == "good"


def old_card(tmp_path: Path, files: dict[str, bytes]) -> tuple[str, bytes]:
    """A card flashed before boot areas: entry 1 and one FAT32 over the whole boot region."""
    card = tmp_path / "old.img"
    whole = tmp_path / "whole.vfat"
    sdcard.fat_image(whole, files, size_mib=BOOT_MIB, volume_id=1, label="RACKBOOT", mtime=1)
    with open(card, "wb") as f:
        f.write(mbr.dump(mbr.Mbr(7, (mbr.Entry(1, 0x0C, 8192, BOOT_MIB * 2048, bootable=True),))))
        f.seek(4 * MIB)
        f.write(whole.read_bytes())
        f.truncate(CARD_MIB * MIB)
    return str(card), whole.read_bytes()


def test_a_card_from_before_boot_areas_takes_the_free_upper_half_of_its_fat_as_area_b(master, tmp_path, keys, images):
    root, server = master
    card, fat = old_card(tmp_path, boot_files(1))
    release(root, keys["master"], images[2])
    lines: list[str] = []
    decision = update(card, server, keys["master"], lines.append)
    assert decision.action == "installed"
    assert any("no file of its FAT lies in the upper half, which becomes boot area b" in line for line in lines)
    assert entry_1(card) == (AREA["b"], 40 * MIB) and area(card, "b") == images[2].read_bytes()
    assert area(card, "a") == fat[: 40 * MIB]  # the old FAT's files, untouched until the next build
    (report,) = [r for r in reports(root) if r["phase"] == "boot-files"]
    assert report["output"].startswith("switched: build") and report["error"] is None


def test_a_card_from_before_boot_areas_with_files_in_the_upper_half_keeps_them_and_says_why(
    master, tmp_path, keys, images
):
    root, server = master
    card, fat = old_card(tmp_path, {**boot_files(1), "big": bytes(range(256)) * (180 * 1024)})  # 45 MiB
    release(root, keys["master"], images[2])
    decision = update(card, server, keys["master"])
    assert decision.action == "installed" and entry_1(card) == (4 * MIB, BOOT_MIB * MIB)
    with open(card, "rb") as f:
        f.seek(4 * MIB)
        assert f.read(BOOT_MIB * MIB) == fat
    (report,) = [r for r in reports(root) if r["phase"] == "boot-files"]
    assert "before boot areas" in report["error"] and "clusters of its FAT lie in the upper half" in report["error"]
    assert report["output"].startswith("kept: build")


def test_the_master_publishes_a_build_once_with_the_same_bytes(tmp_path, keys, images):
    first = master_bootfiles.publish_image(images[2], tmp_path / "m1", key=keys["master"])
    again = master_bootfiles.publish_image(images[2], tmp_path / "m1", key=keys["master"])
    other = master_bootfiles.publish_image(images[2], tmp_path / "m2", key=keys["master"])
    assert first == again == other
    d1, d2 = (tmp_path / m / first.lstrip("/") for m in ("m1", "m2"))
    for name in ("boot.json", "boot.json.sig", "boot.vfat.gz"):
        assert (d1.parent / name).read_bytes() == (d2.parent / name).read_bytes(), name
    manifest = bootfiles.parse_boot_manifest(d1.read_bytes())
    assert (manifest.size, manifest.sha256) == (40 * MIB, hashlib.sha256(images[2].read_bytes()).hexdigest())
    assert sorted(p.name for p in (tmp_path / "m1/boot").iterdir()) == [manifest.build]


def test_rackboot_plan_names_the_builds_boot_files_and_none_before_a_build(tmp_path, keys, images):
    from rackboot import config
    from rackboot.master import plans

    from tests.helpers import write_config

    cfg = config.load(write_config(tmp_path, master={"key": str(keys["master"])}))
    publish(cfg.master.directory, 1, image_bytes(1))
    before = formats.parse_plan(plans.assign(cfg, node="default", image="example", version=1).read_bytes())
    assert before.boot is None and not (cfg.master.directory / "boot").exists()
    cfg.output.directory.mkdir(parents=True)
    (cfg.output.directory / "boot.vfat").write_bytes(images[2].read_bytes())
    plan = formats.parse_plan(plans.assign(cfg, node="default", image="example", version=1).read_bytes())
    assert plan.boot == f"/boot/{boot_build(images[2])}/boot.json"
    signed = cfg.master.directory / plan.boot.lstrip("/")
    Verifier(str(signing.public_key_path(keys["master"]))).check(
        plan.boot, signed.read_bytes(), signed.with_name("boot.json.sig").read_bytes()
    )
