"""rsync mode's golden samples (tests/data/make_golden_rsync.py): today's code reads each
one, writes the same bytes, and the committed test key's signatures over them verify."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rackboot.initramfs.updater import filemanifest, formats
from rackboot.initramfs.updater.formats import Method
from rackboot.initramfs.updater.signature import Verifier

from tests.data import make_golden_rsync

DATA = Path(__file__).resolve().parents[1] / "data"
PUBLIC = DATA / "keys" / "test-master.key.pub"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_file_manifest_rev1_reads_and_is_what_the_writer_makes():
    listed = sample("files.format1.rev1.list")
    entries = filemanifest.parse(listed)
    assert {e.type for e in entries} == set(filemanifest.TYPES)
    assert filemanifest.dump(entries) == listed == make_golden_rsync.files_rev1()


def test_plan_rev6_says_rsync_and_the_port():
    plan = formats.parse_plan(sample("plan.format1.rev6.rsync.json"))
    assert (plan.method, plan.rsync_port, plan.tries) == (Method.RSYNC, 873, 5)
    assert formats.dump(plan) == sample("plan.format1.rev6.rsync.json")
    Verifier(str(PUBLIC)).check(
        "plan", sample("plan.format1.rev6.rsync.json"), sample("plan.format1.rev6.rsync.json.sig")
    )


def test_a_plan_without_a_method_is_the_image_method_and_keeps_its_bytes():
    for name in ("plan.format1.rev3.json", "plan.format1.rev3.unsigned.json"):
        plan = formats.parse_plan(sample(name))
        assert (plan.method, plan.rsync_port) == (Method.IMAGE, None)
        assert b"method" not in formats.dump(plan)


def test_manifest_rev4_pins_the_file_manifest():
    manifest = formats.parse_manifest(sample("manifest.format1.rev4.files.json"))
    listed = sample("files.format1.rev1.list")
    assert manifest.files == formats.FileList(
        file="files.list", size=len(listed), sha256=hashlib.sha256(listed).hexdigest(), module="example.2"
    )
    assert formats.dump(manifest) == sample("manifest.format1.rev4.files.json")
    Verifier(str(PUBLIC)).check(
        "manifest", sample("manifest.format1.rev4.files.json"), sample("manifest.format1.rev4.files.json.sig")
    )
    older = formats.parse_manifest(sample("manifest.format1.rev2.hooks.json"))
    assert older.files is None and b'"files"' not in formats.dump(older)
