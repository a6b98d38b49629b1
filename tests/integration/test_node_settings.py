"""/init's node.sh keeping a node's settings on its card (rackboot/node.env on the data
partition) as /init runs it before switch_root: sh, in a mount namespace of its own with a
tmpfs /run as the initramfs has, against a real data partition (a file the kernel mounts
through a loop device), formatted by mke2fs as the initramfs's."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from rackboot.initramfs.updater import formats, node
from rackboot.initramfs.updater.main import Decision

NODE_SH = Path(node.__file__).resolve().parents[1] / "node.sh"
NODE = "52-54-00-00-00-07"


def decision(data: Path, *, hostname: str | None, planned: bool, blank: bool) -> str:
    settings = node.NodeSettings(node=NODE, hostname=hostname, planned=planned)
    return Decision(
        "a", 2, "/dev/vda2", formats.Mount.OVERLAY_TMPFS, formats.Action.INSTALLED,
        data_device=str(data), data_blank=blank, settings=settings,
    ).to_shell()  # fmt: skip


def node_settings(tmp_path: Path, shell: str) -> tuple[str, str]:
    """node.sh's node_settings on ``shell`` (a decision): its console, and $hostname after it."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("node.sh's tests mount a data partition in a mount namespace: they need root and unshare")
    (tmp_path / "decision").write_text(shell)
    script = (
        "mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p /run/rackboot || exit 1\n"
        'log() { echo "rackboot: $*"; }\n'
        f". {tmp_path / 'decision'}\n"
        f". {NODE_SH}\n"
        "node_settings\n"
        '[ -z "$data_dir" ] || umount "$data_dir"\n'
        'echo "hostname=$hostname"\n'
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    console, _, last = done.stdout.rstrip("\n").rpartition("\n")
    return console, last.removeprefix("hostname=")


def card_copy(data: Path) -> str:
    """rackboot/node.env as the data partition holds it (debugfs reads it unmounted)."""
    done = subprocess.run(["debugfs", "-R", "cat /rackboot/node.env", str(data)], capture_output=True, text=True)
    return done.stdout


def test_a_blank_cards_first_planned_boot_keeps_the_nodes_name_for_a_boot_without_a_plan(tmp_path):
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(16 << 20)  # blank: the updater flags it so, /init formats it
    console, name = node_settings(tmp_path, decision(data, hostname="rack-w07", planned=True, blank=True))
    assert f"rackboot: formatting the data partition {data}" in console and name == "rack-w07"
    assert card_copy(data) == "hostname='rack-w07'\npersist=''\n"
    # the next boot finds no master: the name comes from the card, as on any later boot
    console, name = node_settings(tmp_path, decision(data, hostname=None, planned=False, blank=False))
    assert console == "rackboot: no plan this boot: the node's settings as the card keeps them (hostname rack-w07)"
    assert name == "rack-w07"


def test_a_plan_with_nothing_to_keep_leaves_a_blank_data_partition_blank(tmp_path):
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    console, name = node_settings(tmp_path, decision(data, hostname=None, planned=True, blank=True))
    assert (console, name) == ("", "")
    assert data.read_bytes() == bytes(16 << 20)  # not formatted for nothing
