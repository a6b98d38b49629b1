"""A short power-cut torture run on an emulated worker, with the cuts no other e2e test
makes: a blank card cut while its node key is made and written, and a rotated master key
cut while the card keeps it. Each recovery boot must come up on a slot whose bytes on the
disk image are the image's, with MBR entry 1 on a boot area holding a build whole, the
node key whole and the one the master pinned, and the master's newest key kept on the
card. The other phases (layout, boot files, stream, delta, read-back, commit, first boot)
are cut by `make torture`, whose default run visits every phase several times (checked
in tests/unit/test_qemu_torture.py); tests/e2e/test_rsync.py cuts an rsync install."""

from __future__ import annotations

import re

import pytest
from rackboot.initramfs.updater import layout, state
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.formats import EXT_MAGIC_OFFSET
from rackboot.master import signing
from rackboot.qemu import torture

from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]

CUTS = [
    torture.Cut("node-key", 0.5, blank=True),  # no key or the whole key: the recovery's is the one pinned
    torture.Cut("key-chain", 0.0, blank=False),  # at the key record's write: the recovery takes the link again
]


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
    directory = tmp_path_factory.mktemp("torture")
    example.start(0, directory)  # the session's build (a no-op rebuild here), its keys as made
    work = directory / "torture"
    return example.cfg, work, torture.torture(example.cfg, work, CUTS, log=quiet)


def test_every_recovery_boot_comes_up_on_an_intact_slot(run):
    _, work, outcomes = run
    assert [o.verdict.survived for o in outcomes] == [True] * len(CUTS), [o.verdict.detail for o in outcomes]
    assert [o.version for o in outcomes] == [1, 2]  # every cycle had an update in progress
    for n, cut in enumerate(CUTS, start=1):
        log = (work / "logs" / f"{n:03}-cut.log").read_text(errors="replace")
        assert re.search(torture.MARKERS[cut.phase], log)  # its phase had begun when the power went
        assert "rackboot-mark-good" not in log  # the power went before the new system confirmed itself


def test_the_key_chain_cut_ends_with_the_rotated_key_on_the_card(run):
    cfg, work, outcomes = run
    newest = signing.read_public(signing.public_key_path(cfg.master.key))
    assert newest.n == 1 and torture.check_key_record(work / "worker-disk.img", newest) is None
    recovery = outcomes[-1].recovery_log.read_text(errors="replace")
    assert f"rackboot: {newest.name}" in recovery  # taken again from the chain, or from the card


def test_the_check_rejects_the_booted_slot_once_a_byte_of_it_changed(run):
    cfg, work, outcomes = run
    last = outcomes[-1]
    console = last.recovery_log.read_text(errors="replace").splitlines()
    disk = work / "worker-disk.img"
    manifests = torture.published(cfg.master.directory)
    assert torture.check(console, disk, manifests).survived
    with Disk(str(disk), writable=False) as d:  # the booted partition, as the MBR and slot state say
        entry = layout.read_table(d).entry(state.read(d).slot(last.verdict.slot).partition)
    # the ext4 magic: every slot has one, whether its bytes are the image's or its files were
    # rsynced (the check then mounts it), so the flipped byte always lands in something checked
    offset = entry.start * 512 + EXT_MAGIC_OFFSET
    with open(disk, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x80]))
    verdict = torture.check(console, disk, manifests)
    assert not verdict.survived and "bytes hash to" in verdict.detail
