"""The first-boot hook as /init runs it (updater/node.py): chrooted into a real root (the
host's dash and its libraries), once per node and version thanks to the stamp on the
data partition, its output and the node's hostname reported to a real rackboot serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from rackboot.initramfs.updater import formats, node
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.main import Decision
from rackboot.master import serve

NODE = "52-54-00-00-00-01"
HOOK = b"""echo "v$RACKBOOT_VERSION $RACKBOOT_HOSTNAME $RACKBOOT_NODE $RACKBOOT_MACHINE_ID" >> /runs
echo "first boot of $RACKBOOT_IMAGE v$RACKBOOT_VERSION as $RACKBOOT_HOSTNAME in slot $RACKBOOT_SLOT"
"""


def small_root(root: Path) -> Path:
    """A root with /bin/sh (the host's dash) and the libraries it links: enough to chroot into."""
    if os.geteuid() != 0:
        pytest.fail("the first-boot tests chroot, which needs root")
    sh = Path("/bin/dash")
    libs = subprocess.run(["ldd", str(sh)], capture_output=True, text=True, check=True).stdout
    for path in [str(sh), *(word for word in libs.split() if word.startswith("/"))]:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (root / "bin/dash").rename(root / "bin/sh")
    (root / "run").mkdir()
    return root


@pytest.fixture
def master(tmp_path):
    (tmp_path / "master").mkdir()
    srv = serve.make_server(tmp_path / "master", "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield MasterClient(f"http://127.0.0.1:{srv.server_address[1]}"), tmp_path / "master"
    srv.shutdown()
    srv.server_close()


def decision_file(tmp_path: Path, version: int, script: bytes = HOOK, timeout: int = 30) -> dict[str, str]:
    path = tmp_path / "first-boot.sh"
    path.write_bytes(script)
    settings = node.NodeSettings(
        node=NODE,
        hostname="worker-01",
        machine_id=node.machine_id(NODE, "example"),
        planned=True,
        first_boot=str(path),
        first_boot_timeout=timeout,
    )
    decision = Decision(
        "b", 3, "/dev/vda3", "ro+overlay:tmpfs", formats.Action.INSTALLED, image="example", version=version
    )
    text = Decision(**{**decision.__dict__, "settings": settings}).to_shell()
    return node.read_shell(text)


def reports(master_dir: Path) -> list[dict]:
    path = master_dir / "reports" / f"{NODE}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_it_runs_once_per_version_in_the_root_and_reports(tmp_path, master):
    client, master_dir = master
    root, data = small_root(tmp_path / "root"), tmp_path / "data"
    lines: list[str] = []
    for version in (1, 1, 2, 2):
        node.first_boot(
            decision_file(tmp_path, version), root=str(root), state_dir=str(data), master=client, log=lines.append
        )
    mid = node.machine_id(NODE, "example")
    assert (root / "runs").read_text() == f"v1 worker-01 {NODE} {mid}\nv2 worker-01 {NODE} {mid}\n"
    assert sorted(os.listdir(data / node.STAMP_DIR)) == ["example-v1", "example-v2"]
    assert lines.count("first-boot hook of example v1 ran on this node before; not again") == 1
    assert os.listdir(root / "run") == []  # the script's directory is gone again
    sent = reports(master_dir)
    assert [(r["phase"], r["hook"], r["version"], r["hostname"], r["error"]) for r in sent] == [
        ("hook", "first-boot", 1, "worker-01", None),
        ("hook", "first-boot", 2, "worker-01", None),
    ]
    assert sent[0]["output"] == "first boot of example v1 as worker-01 in slot b\n"


def test_a_failing_hook_is_reported_once_and_the_boot_goes_on(tmp_path, master):
    client, master_dir = master
    root = small_root(tmp_path / "root")
    failing = b"echo about to fail; exit 3\n"
    for _ in range(2):
        result = node.first_boot(
            decision_file(tmp_path, 1, failing), root=str(root), state_dir=str(tmp_path / "data"), master=client,
            log=lambda _: None,
        )  # fmt: skip
    assert result is None  # the second boot: stamped, not run again
    [sent] = reports(master_dir)
    assert sent["error"] == "hook first-boot exited with status 3: about to fail"


def test_a_hook_that_hangs_is_killed_at_its_timeout(tmp_path, master):
    client, _ = master
    root = small_root(tmp_path / "root")
    result = node.first_boot(
        decision_file(tmp_path, 1, b"echo waiting; while :; do :; done\n", timeout=1),
        root=str(root), state_dir=str(tmp_path / "data"), master=client, log=lambda _: None,
    )  # fmt: skip
    assert result is not None and result.status is None and "timed out" in result.problem()


def test_without_a_data_partition_it_runs_every_boot_and_says_so(tmp_path):
    root = small_root(tmp_path / "root")
    lines: list[str] = []
    for _ in range(2):
        node.first_boot(decision_file(tmp_path, 1), root=str(root), state_dir="", master=None, log=lines.append)
    assert len((root / "runs").read_text().splitlines()) == 2
    assert "no data partition to remember the first-boot hook in: it runs on every boot" in lines


def test_no_hook_no_run(tmp_path):
    assert node.first_boot({"image": "example", "version": "1"}, root="/", state_dir="", master=None, log=print) is None
