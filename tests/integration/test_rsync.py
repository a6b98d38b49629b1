"""rsync mode on the host: rackboot publish keeps the tree and its file manifest, a real
`rsync --daemon` (master/rsyncd.py) serves it on loopback beside rackboot serve's HTTP,
and the updater formats a slot of a file-backed card, rsyncs into it and checks it
against the signed file manifest before it commits. A file changed on the rsync side, a
changed file manifest and a daemon that is not there are each refused with one line,
and the slot is not committed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

import pytest
from rackboot.initramfs.updater import delta, filemanifest, formats, slotindex
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.fetch import MasterClient
from rackboot.initramfs.updater.formats import Action, Method, Plan
from rackboot.initramfs.updater.main import Identity, run
from rackboot.initramfs.updater.signature import Verifier
from rackboot.initramfs.updater.state import read as read_state
from rackboot.master import filemanifest as published_files
from rackboot.master import plans, publish, rsyncd, serve, signing

from tests.helpers import write_config
from tests.integration.updater_master import MAC, NODE, layout

CARD = 256 << 20
IMAGE = "example"


def _need_root_and_rsync() -> None:
    if os.geteuid() != 0 or not shutil.which("rsync") or not shutil.which("mke2fs"):
        pytest.fail("the rsync mode tests need root (mount, chroot), rsync and e2fsprogs (make test installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_root(where: Path, version: int) -> Path:
    """A small root with what rsync mode must carry exactly: owners, a setuid file, a
    root-only file, hard links, absolute and relative symlinks, a device, a fifo, an xattr."""
    root = where / f"root-v{version}"
    for d in ("etc", "usr/bin", "usr/sbin", "dev", "var/empty"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/rackboot-release").write_text(f"v{version}\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o640)
    os.chown(root / "etc/shadow", 0, 42)
    (root / "usr/bin/tool").write_bytes(random.Random(1).randbytes(200_000))  # incompressible, in every version
    (root / "usr/bin/tool").chmod(0o4755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/mtab").symlink_to("/proc/self/mounts")
    os.mknod(root / "dev/null", 0o20666, os.makedev(1, 3))
    os.mkfifo(root / "dev/initctl", 0o600)
    os.chown(root / "var/empty", 1000, 1000)
    os.setxattr(root / "usr/bin/tool", "user.rackboot", b"kept")
    if version >= 2:
        (root / "etc/new-in-v2").write_text("added\n")
    return root


class Master:
    """rackboot's HTTP server and rsync daemon on loopback over one master tree."""

    def __init__(self, root: Path, key: Path):
        self.root, self.key = root, key
        self.http = serve.make_server(root, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.rsync = rsyncd.RsyncService(root, "127.0.0.1", _free_port(), log=False)
        self.rsync.start()

    def release(self, src: Path, version: int, *, method: Method = Method.RSYNC) -> str:
        manifest = publish.publish_directory(src, self.root, image=IMAGE, version=version, key=self.key)
        assert manifest.files is not None
        self.rsync.refresh()
        path = formats.manifest_path(IMAGE, version)
        plan = Plan(
            node=NODE,
            layout=layout(),
            image=path,
            method=method,
            rsync_port=self.rsync.port if method is Method.RSYNC else None,
        )
        plans.write_plan(self.root, NODE, plan, key=self.key)
        return path

    def close(self) -> None:
        self.rsync.stop()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def master(tmp_path, keys):
    _need_root_and_rsync()
    (tmp_path / "master").mkdir()
    m = Master(tmp_path / "master", keys["master"])
    yield m
    m.close()


@pytest.fixture
def card(tmp_path) -> str:
    path = tmp_path / "card.img"
    with open(path, "wb") as f:
        f.truncate(CARD)
    return str(path)


def update(card: str, master: Master, keys: dict, lines: list[str] | None = None):
    client = MasterClient(
        f"http://127.0.0.1:{master.http.server_address[1]}",
        connect_timeout=1.0,
        read_timeout=5.0,
        retries=1,
        backoff=0.01,
        report_timeout=0.5,
    )
    verifier = Verifier(str(signing.public_key_path(keys["master"])))
    log = lines.append if lines is not None else lambda m: None
    return run(card, client.url, Identity(MAC), master=client, log=log, verifier=verifier)


def slot_tree(card: str, number: int, where: Path) -> list[filemanifest.Entry]:
    """The slot's files as the file manifest lists them, read through a loop mount."""
    entry = layout().partitions[number - 1]
    offset, size = entry.start_mib << 20, int(entry.size_mib) << 20
    point = where / f"mnt{number}"
    point.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-o", f"ro,loop,offset={offset},sizelimit={size}", card, str(point)], check=True, capture_output=True
    )
    try:
        return filemanifest.scan(point, skip=frozenset([b"lost+found"]))
    finally:
        subprocess.run(["umount", str(point)], check=True)


def state(card: str):
    with Disk(card, writable=False) as disk:
        return read_state(disk)


def test_publish_keeps_the_tree_for_rsync_and_pins_its_file_manifest(tmp_path, master):
    master.release(make_root(tmp_path, 1), 1)
    version = master.root / "images" / IMAGE / "1"
    manifest = formats.parse_manifest((version / "manifest.json").read_bytes())
    assert manifest.files is not None and manifest.files.module == "example.1"
    listed = filemanifest.load((version / published_files.FILE).read_bytes())
    assert filemanifest.difference(listed, filemanifest.scan(version / ".tree")) is None
    kinds = {e.path: e.type for e in listed}
    assert kinds[b"usr/bin/tool"] == "f" and kinds[b"usr/bin/tool-again"] == "h" and kinds[b"dev/null"] == "c"
    assert b"usr/sbin/rackboot-mark-good" in kinds  # the staged root, as the image has it
    # HTTP never serves the tree (a dot name); rsync serves only published versions
    client = MasterClient(f"http://127.0.0.1:{master.http.server_address[1]}", retries=0)
    with pytest.raises(Exception, match="404"):
        client.get("/images/example/1/.tree/etc/rackboot-release")
    listing = subprocess.run(
        ["rsync", f"rsync://127.0.0.1:{master.rsync.port}/"], capture_output=True, text=True, check=True
    )
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["example.1"]


def test_rsync_installs_v1_then_v2_each_checked_against_the_signed_file_manifest(tmp_path, master, keys, card):
    master.release(make_root(tmp_path, 1), 1)
    lines: list[str] = []
    first = update(card, master, keys, lines)
    assert (first.action, first.slot, first.version) == (Action.INSTALLED, "a", 1), lines
    assert any("matches the signed file manifest" in line for line in lines), lines
    assert first.bytes_fetched > 200_000  # the incompressible tool came over rsync (and the file list over HTTP)
    st = state(card)
    assert st.primary == "a" and st.slot("a").state == "trial"
    published = filemanifest.load((master.root / "images/example/1" / published_files.FILE).read_bytes())
    assert filemanifest.difference(published, slot_tree(card, 2, tmp_path)) is None

    master.release(make_root(tmp_path, 2), 2)
    lines.clear()
    second = update(card, master, keys, lines)
    assert (second.action, second.slot, second.version) == (Action.INSTALLED, "b", 2), lines[-3:]
    # unchanged files came from slot a (rsync --copy-dest), not over the network
    assert any("unchanged files come from the good slot" in line for line in lines), lines
    assert second.bytes_fetched < first.bytes_fetched / 10
    tree = slot_tree(card, 3, tmp_path)
    assert b"etc/new-in-v2" in {e.path for e in tree}
    v2 = filemanifest.load((master.root / "images/example/2" / published_files.FILE).read_bytes())
    assert filemanifest.difference(v2, tree) is None


def test_a_file_changed_on_the_rsync_side_is_refused_and_not_committed(tmp_path, master, keys, card):
    master.release(make_root(tmp_path, 1), 1)
    assert update(card, master, keys).slot == "a"
    master.release(make_root(tmp_path, 2), 2)
    tampered = master.root / "images/example/2/.tree/etc/rackboot-release"
    tampered.write_text("v9\n")  # as long as the signed v2: only its sha256 tells
    lines: list[str] = []
    decision = update(card, master, keys, lines)
    assert (decision.action, decision.slot, decision.version) == (Action.REFUSED, "a", 1)
    assert decision.error is not None and "\n" not in decision.error
    assert "/etc/rackboot-release: sha256 is" in decision.error and "not committed" in decision.error
    assert state(card).slot("b").state == "bad"  # written, not verified: never bootable


def test_a_changed_file_manifest_is_refused_before_the_slot_is_touched(tmp_path, master, keys, card):
    master.release(make_root(tmp_path, 1), 1)
    assert update(card, master, keys).slot == "a"
    master.release(make_root(tmp_path, 2), 2)
    listing = master.root / "images/example/2" / published_files.FILE
    data = bytearray(listing.read_bytes())
    data[len(data) // 2] ^= 1  # same size, other bytes: not what was signed
    listing.write_bytes(data)
    before = Path(card).read_bytes()[(84 << 20) : (84 << 20) + (1 << 20)]
    decision = update(card, master, keys)
    assert (decision.action, decision.slot) == (Action.REFUSED, "a")
    assert "file manifest" in (decision.error or "") and "signed manifest says" in (decision.error or "")
    assert state(card).slot("b").state == "empty"
    assert Path(card).read_bytes()[(84 << 20) : (84 << 20) + (1 << 20)] == before


def test_no_rsync_daemon_falls_back_to_the_good_slot_with_one_line(tmp_path, master, keys, card):
    master.release(make_root(tmp_path, 1), 1)
    assert update(card, master, keys).slot == "a"
    master.release(make_root(tmp_path, 2), 2)
    master.rsync.stop()
    decision = update(card, master, keys)
    assert (decision.action, decision.slot) == (Action.FALLBACK, "a")
    assert decision.error is not None and "rsync" in decision.error and "\n" not in decision.error
    assert state(card).slot("b").state == "bad"


# --- rackboot serve runs the daemon -------------------------------------------------------


def _serve(tmp_path: Path, rsync_port: int) -> tuple[subprocess.Popen[bytes], Path]:
    (tmp_path / "master").mkdir(exist_ok=True)
    cfg = write_config(tmp_path, master={"directory": "master", "rsync_port": rsync_port})
    log = tmp_path / "serve.log"
    rackboot = Path(sys.executable).parent / "rackboot"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(rackboot), "serve", "-c", str(cfg), "--port", str(_free_port()), "--no-netboot"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _daemons(port: int) -> list[int]:
    """Pids of rsync daemons listening on ``port``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"rsync")
            and b"--daemon" in cmdline
            and f"--port={port}".encode() in cmdline
        ):
            pids.append(int(pid))
    return pids


def _wait(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_serve_runs_the_daemon_and_leaves_none_behind(tmp_path, how):
    _need_root_and_rsync()
    port = _free_port()
    proc, log = _serve(tmp_path, port)
    try:
        assert _wait(lambda: "rsync: daemon serves 0 published versions" in log.read_text()), log.read_text()
        assert len(_daemons(port)) == 1
        listing = subprocess.run(["rsync", f"rsync://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0 and listing.stdout == ""  # nothing published: no module
        proc.send_signal(how)
        proc.wait(timeout=30)
        assert _wait(lambda: not _daemons(port)), "an rsync daemon outlived rackboot serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_taken_rsync_port_with_one_line(tmp_path):
    _need_root_and_rsync()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc, log = _serve(tmp_path, port)
        assert proc.wait(timeout=60) != 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines == [f"rackboot: error: rsync port 127.0.0.1:{port}/tcp is taken by another program"]


def test_an_rsync_install_forgets_the_index_an_image_install_kept_in_the_slot(tmp_path, master, keys, card):
    """A slot that once held the image keeps its block index in its last sector; rsync's
    filesystem spans the partition, and the record must not outlive it naming the same image
    (mke2fs zeroes the partition's end)."""
    master.release(make_root(tmp_path, 1), 1)
    manifest = formats.parse_manifest((master.root / "images/example/1/manifest.json").read_bytes())
    entry = layout().partitions[1]  # slot a
    offset, capacity = entry.start_mib << 20, int(entry.size_mib) << 20
    stale = delta.BlockIndex(4096, array("H", [7]), [bytes(8)], window=delta.WINDOW)
    with Disk(card) as disk:
        slot = delta.Slot(disk, offset, capacity)
        assert slotindex.store(slot, 4096, manifest.sha256, stale, disk.fsync) is None
        assert slotindex.load(slot, manifest.sha256, where="slot a").body() == stale.body()
    first = update(card, master, keys)
    assert (first.action, first.slot, first.version) == (Action.INSTALLED, "a", 1)
    with Disk(card, writable=False) as disk, pytest.raises(UpdaterError, match="no kept index"):
        slotindex.load(delta.Slot(disk, offset, capacity), manifest.sha256, where="slot a")
