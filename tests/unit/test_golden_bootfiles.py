"""The boot files' golden samples (tests/data/make_golden_bootfiles.py): today's code reads
them, its writers make them byte for byte, the signatures verify on the worker, and the
documents before them (plan rev4, no boot) still mean "leave the boot files"."""

from __future__ import annotations

from pathlib import Path

import pytest
from rackboot.initramfs.updater import bootfiles, formats
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.signature import Verifier
from rackboot.master import signing

from tests.data import make_golden_bootfiles as golden

DATA = Path(__file__).resolve().parents[1] / "data"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_plan_rev5_names_the_boot_manifest_and_is_written_byte_for_byte():
    plan = formats.parse_plan(sample("plan.format1.rev5.boot.json"))
    assert plan == golden.PLAN and plan.boot == f"/boot/{golden.BUILD}/boot.json"
    assert formats.dump(plan) == sample("plan.format1.rev5.boot.json")


@pytest.mark.parametrize("name", ["plan.format1.rev3.json", "plan.format1.rev4.json"])
def test_plans_before_rev5_leave_the_boot_files(name):
    assert formats.parse_plan(sample(name)).boot is None


def test_boot_manifest_rev1_is_read_and_written_byte_for_byte():
    manifest = bootfiles.parse_boot_manifest(sample("boot.format1.rev1.json"))
    assert manifest == golden.MANIFEST and manifest.size == 64 << 20
    assert formats.dump(manifest) == sample("boot.format1.rev1.json")
    newer = sample("boot.format1.rev1.json").replace(b'"format":1', b'"format":2')
    with pytest.raises(UpdaterError, match="^boot manifest: format: unsupported format 2"):
        bootfiles.parse_boot_manifest(newer)


def test_boot_record_rev1_is_read_and_written_byte_for_byte():
    raw = sample("boot-record.rev1.bin")
    assert len(raw) == 512 and bootfiles.decode_record(raw) == golden.RECORD
    assert bootfiles.encode_record(golden.RECORD) == raw


def test_report_rev7_with_phase_boot_files_is_read_and_written_byte_for_byte():
    report = formats.parse_report(sample("report.rev7.boot-files.json"))
    assert report == golden.REPORT and report.phase == "boot-files"
    assert formats.dump(report) == sample("report.rev7.boot-files.json")


@pytest.mark.parametrize("name", ["plan.format1.rev5.boot.json", "boot.format1.rev1.json"])
def test_signatures_verify_on_the_worker_and_are_remade_byte_for_byte(name):
    data, signature = sample(name), sample(name + ".sig")
    Verifier(str(DATA / "keys" / "test-master.key.pub")).check(name, data, signature)
    assert signing.sign(golden.KEY, data) == signature
