"""The provisioning story on an emulated worker, as `make demo` tells it: a blank 1 GiB
card with only the SD image; boot 1 lays it out and installs v1, boot 2 fetches no
image bytes (these two are the session's, tests/e2e/conftest.py, whose card other modules
start from too), boot 3 installs v2 into the other slot, boot 4 boots v2 with the master
stopped. Before boot 3 the master key is rotated: v2 comes signed by key 1, which the
worker takes from the chain (its initramfs has key 0) and keeps for its offline boot. The
node follows the default plan and serve names it by a hostname pattern: every boot has
that name, the first from the blank card and the offline one included."""

from __future__ import annotations

import json
import shutil

import pytest
from rackboot import config, demo
from rackboot.initramfs.updater import mbr
from rackboot.master import keychain, plans, signing
from rackboot.qemu import harness

from tests.e2e.rack import example_config
from tests.helpers import quiet

pytestmark = [pytest.mark.e2e, pytest.mark.network]


@pytest.fixture(scope="module")
def story(example, tmp_path_factory):
    """Boots 1 and 2 are the session's; from its card, as `rackboot demo` goes on: the key
    rotated, v2 published, boot 3, the master stopped, boot 4."""
    work = tmp_path_factory.mktemp("story")
    disk = example.start(2, work)
    (work / "logs").mkdir()
    for n, log in enumerate(example.logs, start=1):
        shutil.copyfile(log, work / "logs" / f"boot{n}.log")
    cfg, rows = example.cfg, list(example.rows)
    assert cfg.master.key is not None
    keychain.rotate(cfg.master.key, cfg.master.directory, created=config.source_date_epoch())
    harness.publish_example(cfg, cfg.base / "rootfs", work, 2)
    plans.assign(cfg, node="default", image=harness.IMAGE)
    up = r"rackboot-demo: v2 is up"
    master = harness.MasterThread(cfg)
    try:
        rows.append(demo._boot(cfg, example.out, disk, work / "logs/boot3.log", up, master=master, offline=False))
    finally:
        master.stop()
    rows.append(demo._boot(cfg, example.out, disk, work / "logs/boot4.log", up, master=None, offline=True))
    for n, row in enumerate(rows, start=1):
        row.boot = n
    return cfg.base, work, rows


def test_each_boot_runs_the_version_it_should(story):
    _, _, rows = story
    assert [r.action for r in rows] == ["installed", "up-to-date", "installed", "offline"]


def test_only_installs_fetch_image_bytes(story):
    _, _, rows = story
    fetched = [r.bytes_fetched for r in rows]
    assert fetched[0] > 0 and fetched[2] > 0
    assert fetched[1] == 0 and fetched[3] == 0


def test_versions_alternate_slots_and_the_offline_boot_uses_the_card(story):
    _, work, _ = story
    logs = [(work / "logs" / f"boot{n}.log").read_text(errors="replace") for n in range(1, 5)]
    assert "repartitioning" in logs[0] and "installing example v1 into slot a" in logs[0]
    assert "repartitioning" not in logs[1] and "slot a already holds example v1" in logs[1]
    assert "installing example v2 into slot b" in logs[2]
    assert "master unreachable; booting from the card" in logs[3]  # the card's U-Boot script
    assert "booting slot b (offline)" in logs[3]
    assert all("rescue" not in log for log in logs)
    # openssl in the initramfs checked every plan against the key the demo made
    assert all("(signature verified)" in log for log in logs[:3])
    assert all("boot 1 of this root" in log for log in logs)  # tmpfs overlay: nothing persists


def test_the_worker_takes_the_rotated_key_and_its_offline_boot_still_uses_it(story):
    directory, work, _ = story
    logs = [(work / "logs" / f"boot{n}.log").read_text(errors="replace") for n in range(1, 5)]
    keys = directory / "keys"
    first, second = signing.read_public(keys / "master.key.0.pub"), signing.read_public(keys / "master.key.pub")
    assert second.n == 1 and (directory / "master/keys/1.json").is_file()
    assert all(f"rackboot: {first.name}: the initramfs's" in log for log in logs[:3])
    assert f"rackboot: {second.name} from /keys/1.json: signed by key 0, which it retires" in logs[2]
    assert "rackboot: master key 1: keeping it on the card" in logs[2]
    assert "image /images/example/2/manifest.json (signature verified)" in logs[2]  # checked with key 1
    # the master stopped: the card's own initramfs (key 0) boots, and trusts key 1 from the card
    assert "master unreachable; booting from the card" in logs[3]
    assert f"rackboot: {second.name}: kept on the card (the initramfs has key 0)" in logs[3]
    assert "rackboot: plan failed: master http://" in logs[3] and "booting slot b (offline)" in logs[3]


def test_the_node_has_its_name_from_the_blank_cards_first_boot_to_the_offline_boot(story):
    _, work, _ = story
    logs = [(work / "logs" / f"boot{n}.log").read_text(errors="replace") for n in range(1, 5)]
    for log in logs:  # the example image has no /etc/hostname: the tmpfs overlay's upper layer takes it
        assert "rackboot-demo: hostname worker-01, machine-id none" in log
        assert "rackboot-demo: /etc/hostname worker-01, /etc/hosts 127.0.1.1\tworker-01" in log
    # the first boot kept the name on the card (a blank data partition formatted for it), so
    # the boot without a master has it too
    assert "formatting the data partition /dev/vda4" in logs[0]
    assert all("formatting" not in log for log in logs[1:])
    assert "no plan this boot: the node's settings as the card keeps them (hostname worker-01)" in logs[3]


def test_card_is_laid_out_as_the_config_says(story):
    directory, work, _ = story
    cfg = config.load(directory / "rackboot.toml")
    with open(work / "worker-disk.img", "rb") as disk:
        table = mbr.parse(disk.read(512))
    sizes = [e.sectors * 512 >> 20 for e in table.entries]
    wanted = [p.size_mib for p in cfg.layout.partitions]
    assert sizes[:3] == [wanted[0] // 2, *wanted[1:3]]  # entry 1: boot area A, half the boot partition
    assert table.entries[-1].end * 512 == harness.DISK_MIB << 20  # data takes the rest


def test_master_got_a_report_for_every_online_boot(story):
    directory, _, _ = story
    lines = [
        json.loads(line)
        for f in sorted((directory / "master/reports").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    phases = [(r["phase"], r["slot"], r["version"]) for r in lines]
    assert phases == [
        ("plan", None, None),  # the blank card's first contact, before its first plan request
        ("layout", None, None),
        ("download", "a", 1),
        ("hook", "a", 1),
        ("commit", "a", 1),
        ("boot", "a", 1),
        ("confirm", "a", 1),
        ("boot", "a", 1),
        ("download", "b", 2),
        ("hook", "b", 2),
        ("commit", "b", 2),
        ("boot", "b", 2),
    ]
    assert all(r["error"] is None for r in lines)
    # the example's signed post-install hook ran in the worker's initramfs, on the new slot
    outputs = [r["output"] for r in lines if r["phase"] == "hook"]
    assert outputs == [
        f"example v{v} in slot {s}: ext4 superblock found on /dev/vda{n}\n" for v, s, n in ((1, "a", 2), (2, "b", 3))
    ]


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """One worker on a card whose root is overlaid on the data partition, one try per new
    slot: v1 installed, v1 again (up to date), v2 that never confirms itself, then back to
    v1. One build and four boots prove both the overlay's persistence and the fallback."""
    directory = tmp_path_factory.mktemp("trial")
    cfg = config.load(example_config(directory, mount="ro+overlay:data", tries=1))
    steps = [(1, False), (1, False), (2, False), (1, False)]
    rows = demo.story(cfg, directory / "demo", log=quiet, steps=steps, broken=frozenset({2}))
    logs = [(directory / "demo/logs" / f"boot{n}.log").read_text(errors="replace") for n in range(1, 5)]
    return rows, logs


def test_overlay_on_the_data_partition_is_formatted_once_and_keeps_writes(trial):
    rows, logs = trial
    assert [r.action for r in rows[:2]] == ["installed", "up-to-date"]
    first, second = logs[:2]
    assert "formatting the data partition /dev/vda4" in first
    assert "formatting" not in second and "cannot mount the data partition" not in second
    assert "v1 is up" in first and "boot 1 of this root" in first
    assert "boot 2 of this root" in second  # the first boot's write survived on the data partition


def test_a_version_that_never_confirms_itself_gives_way_to_the_last_good_one(trial):
    rows, logs = trial
    assert [r.action for r in rows[1:]] == ["up-to-date", "installed", "fallback"]
    assert "rackboot-mark-good: slot a (example v1) confirmed" in logs[0]
    assert "slot b is on trial: 0 more unconfirmed boots before slot a takes over" in logs[2]
    assert "rackboot-mark-good" not in logs[2]
    assert "slot b (example v2) never confirmed itself; back to slot a" in logs[3]
    assert rows[3].bytes_fetched == 0  # v2 is not fetched again while the plan still names it
