"""rackboot.master.publish against the real e2fsprogs: determinism, modules, atomicity, OS images."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from rackboot.errors import RackbootError
from rackboot.initramfs.updater import formats
from rackboot.master import plans, publish, signing

KVER = "6.1.0-50-arm64"
EPOCH = 1700000000


def make_tree(root: Path, *, reverse: bool = False, mtime: int = 1234567890) -> Path:
    """A small root filesystem; `reverse` creates entries in the other order."""
    files = {
        "etc/hostname": b"worker\n",
        "etc/os-release": b"ID=debian\n",
        "usr/bin/tool": bytes(range(256)) * 4000,
        "var/lib/empty": b"",
    }
    for rel in sorted(files, reverse=True) if reverse else sorted(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
    (root / "usr/bin/tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    os.link(root / "etc/hostname", root / "etc/hostname.hard")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    return root


def publish_tree(src: Path, master: Path, **kw) -> formats.Manifest:
    args = dict(
        image="example",
        version=None,
        label="v1",
        size_mib=None,
        kernel_release=None,
        modules_from=None,
        source_date_epoch=EPOCH,
    )
    args.update(kw)
    return publish.publish_directory(src, master, **args)


def version_dir(master: Path, version: int, image: str = "example") -> Path:
    return master / "images" / image / str(version)


def unpacked(master: Path, version: int, tmp_path: Path) -> Path:
    out = tmp_path / f"unpacked-{version}.ext4"
    with gzip.open(version_dir(master, version) / "rootfs.ext4.gz") as f:
        out.write_bytes(f.read())
    return out


def debugfs(fs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(fs)], capture_output=True, text=True, check=True).stdout


def test_publish_writes_stream_manifest_and_latest(tmp_path):
    master = tmp_path / "master"
    m = publish_tree(make_tree(tmp_path / "root"), master)
    vdir = version_dir(master, 1)
    names = {p.name for p in vdir.iterdir()}
    assert {"manifest.json", "rootfs.ext4.gz", "rootfs.ext4.index", "rootfs.ext4.pack"} <= names
    on_disk = (vdir / "manifest.json").read_bytes()
    assert on_disk == formats.dump(m) and formats.parse_manifest(on_disk) == m
    stream = (vdir / "rootfs.ext4.gz").read_bytes()
    raw = gzip.decompress(stream)
    assert (m.size, m.sha256, m.crc32) == (len(raw), hashlib.sha256(raw).hexdigest(), f"{zlib.crc32(raw):08x}")
    assert (m.stream_size, m.stream_sha256) == (len(stream), hashlib.sha256(stream).hexdigest())
    assert (m.version, m.label, m.created, m.fstype, m.compression) == (1, "v1", EPOCH, "ext4", "gzip")
    assert m.size % (1 << 20) == 0
    latest = formats.parse_latest((master / "images/example/latest.json").read_bytes())
    assert (latest.version, latest.manifest) == (1, "/images/example/1/manifest.json")
    # nothing but the versions and latest.json is left beside them
    assert sorted(p.name for p in (master / "images/example").iterdir()) == ["1", "latest.json"]


def test_filesystem_holds_the_tree_owned_by_root(tmp_path):
    master = tmp_path / "master"
    publish_tree(make_tree(tmp_path / "root"), master)
    fs = unpacked(master, 1, tmp_path)
    subprocess.run(["e2fsck", "-fn", str(fs)], check=True, capture_output=True)
    assert debugfs(fs, "cat /etc/hostname") == "worker\n"
    assert debugfs(fs, "stat /bin").count('Fast link dest: "usr/bin"') == 1
    listing = debugfs(fs, "ls -p /etc")
    hard = {line.split("/")[5]: line.split("/")[1] for line in listing.splitlines() if line.count("/") >= 6}
    assert hard["hostname"] == hard["hostname.hard"]  # hard link kept, one inode
    stat = debugfs(fs, "stat /usr/bin/tool")
    assert "Mode:  0755" in stat and "User:     0   Group:     0" in stat
    assert f"mtime: {EPOCH:#x}" in stat  # the input's mtime is gone


def test_two_publishes_of_the_same_tree_are_identical(tmp_path):
    a = make_tree(tmp_path / "a", mtime=1111111111)
    b = make_tree(tmp_path / "b", reverse=True, mtime=1222222222)
    ma = publish_tree(a, tmp_path / "m1")
    mb = publish_tree(b, tmp_path / "m2")
    assert ma == mb
    for name in ("manifest.json", "rootfs.ext4.gz"):
        assert (version_dir(tmp_path / "m1", 1) / name).read_bytes() == (
            version_dir(tmp_path / "m2", 1) / name
        ).read_bytes()


def test_the_same_tree_gives_the_same_bytes_in_every_version_of_an_image(tmp_path):
    """UUID and hash seed come from the image's name, not its version (block deltas: two
    versions differ only where their trees do); another name or epoch changes the bytes."""
    tree = make_tree(tmp_path / "root")
    m1 = publish_tree(tree, tmp_path / "m")
    m2 = publish_tree(tree, tmp_path / "m")
    m3 = publish_tree(tree, tmp_path / "m3", source_date_epoch=EPOCH + 1)
    m4 = publish_tree(tree, tmp_path / "m4", image="other")
    assert m2.version == 2 and m1.sha256 == m2.sha256 and m1.delta == m2.delta
    assert len({m1.sha256, m3.sha256, m4.sha256}) == 3


def test_missing_modules_are_refused(tmp_path):
    root = make_tree(tmp_path / "root")
    with pytest.raises(
        RackbootError,
        match=f"root filesystem {root} has no modules for kernel {KVER}; pass --modules-from or add lib/modules/{KVER}",
    ):
        publish_tree(root, tmp_path / "master", kernel_release=KVER)
    assert not (tmp_path / "master/images/example/1").exists()


def make_kernel_package(root: Path, prefix: str = "lib/modules") -> Path:
    mod = root / prefix / KVER / "kernel/drivers/net/virtio_net.ko"
    mod.parent.mkdir(parents=True)
    mod.write_bytes(b"\x7fELF fake module")
    (root / prefix / KVER / "modules.order").write_text("kernel/drivers/net/virtio_net.ko\n")
    return root


@pytest.mark.parametrize("usrmerge", [False, True])
def test_modules_from_are_copied_into_a_staged_root(tmp_path, usrmerge):
    root = make_tree(tmp_path / "root")
    if usrmerge:
        (root / "usr/lib").mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    pkg = make_kernel_package(tmp_path / "pkg", "usr/lib/modules" if usrmerge else "lib/modules")
    m = publish_tree(root, tmp_path / "master", kernel_release=KVER, modules_from=pkg)
    assert m.kernel_release == KVER
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # source untouched
    fs = unpacked(tmp_path / "master", 1, tmp_path)
    where = "/usr/lib/modules" if usrmerge else "/lib/modules"
    assert debugfs(fs, f"cat {where}/{KVER}/kernel/drivers/net/virtio_net.ko") == "\x7fELF fake module"
    assert KVER in debugfs(fs, "ls /lib/modules")  # through the usrmerge link too
    assert "virtio_net.ko" in debugfs(fs, f"cat {where}/{KVER}/modules.dep")  # indexed for modprobe


def test_root_that_has_modules_needs_no_package(tmp_path):
    root = make_tree(tmp_path / "root")
    make_kernel_package(root, "usr/lib/modules")
    m = publish_tree(root, tmp_path / "master", kernel_release=KVER)
    assert m.kernel_release == KVER


def test_modules_from_without_the_kernel_is_refused(tmp_path):
    pkg = make_kernel_package(tmp_path / "pkg")
    with pytest.raises(RackbootError, match="no lib/modules/6.1.0-99-arm64"):
        publish_tree(
            make_tree(tmp_path / "root"), tmp_path / "master", kernel_release="6.1.0-99-arm64", modules_from=pkg
        )


def test_existing_and_lower_versions_are_refused(tmp_path):
    tree, master = make_tree(tmp_path / "root"), tmp_path / "master"
    publish_tree(tree, master, version=5)
    with pytest.raises(RackbootError, match="version 5 is already published"):
        publish_tree(tree, master, version=5)
    with pytest.raises(RackbootError, match="version 3 is lower than the latest"):
        publish_tree(tree, master, version=3)
    assert publish_tree(tree, master, version=3, force=True).version == 3
    latest = formats.parse_latest((master / "images/example/latest.json").read_bytes())
    assert latest.version == 5  # a forced older version does not move latest back
    assert publish_tree(tree, master).version == 6


def test_a_directory_named_in_other_digits_is_no_version(tmp_path):
    """'²' passed isdigit and crashed int(); int() read Arabic-Indic '12' as version 12."""
    tree, master = make_tree(tmp_path / "root"), tmp_path / "master"
    publish_tree(tree, master, version=5)
    (master / "images/example/²").mkdir()
    (master / "images/example/\u0661\u0662").mkdir()
    assert publish_tree(tree, master).version == 6


def test_failed_publish_leaves_nothing(tmp_path):
    master = tmp_path / "master"
    with pytest.raises(RackbootError, match="mke2fs could not make a 1 MiB ext4 filesystem"):
        publish_tree(make_tree(tmp_path / "root"), master, size_mib=1)
    assert list((master / "images/example").iterdir()) == []


def test_bad_image_name_is_refused(tmp_path):
    with pytest.raises(RackbootError, match="image name 'Bad/name' is not valid"):
        publish_tree(make_tree(tmp_path / "root"), tmp_path / "master", image="Bad/name")


# --- OS images ------------------------------------------------------------------------------

MIB = 1 << 20


@pytest.fixture
def os_image(tmp_path) -> tuple[Path, bytes]:
    """A card image: p1 FAT-typed blank 4 MiB, p2 ext4 "rootfs" 8 MiB with modules for KVER."""
    root = make_tree(tmp_path / "osroot")
    make_kernel_package(root)
    part = tmp_path / "p2.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rootfs", "-d", str(root), str(part), "8M"], check=True)
    img = tmp_path / "os.img"
    with open(img, "wb") as f:
        f.truncate(14 * MIB)
    subprocess.run(
        ["sfdisk", "-q", str(img)],
        check=True,
        text=True,
        input="label: dos\nstart=2048, size=8192, type=c\nstart=10240, size=16384, type=83\n",
    )
    with open(img, "r+b") as f:
        f.seek(5 * MIB)
        f.write(part.read_bytes())
    return img, part.read_bytes()


@pytest.mark.parametrize("which", [2, "2", "rootfs", "type:83"])
def test_os_image_partition_is_published_as_is(tmp_path, os_image, which):
    img, part = os_image
    m = publish.publish_image(
        img, which, tmp_path / "master", image="raspios", label="bookworm", kernel_release=KVER, source_date_epoch=EPOCH
    )
    assert (m.size, m.sha256) == (len(part), hashlib.sha256(part).hexdigest())
    stream = (version_dir(tmp_path / "master", 1, "raspios") / "rootfs.ext4.gz").read_bytes()
    assert gzip.decompress(stream) == part and m.kernel_release == KVER


def test_os_image_without_the_kernels_modules_is_refused(tmp_path, os_image):
    img, _ = os_image
    with pytest.raises(RackbootError, match=f"partition 2 of {img} has no modules for kernel 6.1.0-99-arm64"):
        publish.publish_image(img, 2, tmp_path / "master", image="raspios", kernel_release="6.1.0-99-arm64")
    assert not (tmp_path / "master/images/raspios/1").exists()


def test_os_image_partition_must_exist_and_be_ext4(tmp_path, os_image):
    img, _ = os_image
    with pytest.raises(RackbootError, match=r"no partition '3'; it has: 1 \(type 0c.*2 \(type 83, label rootfs\)"):
        publish.publish_image(img, 3, tmp_path / "master", image="raspios")
    with pytest.raises(RackbootError, match="partition 1 of .* is not an ext4 filesystem"):
        publish.publish_image(img, 1, tmp_path / "master", image="raspios")


@pytest.mark.parametrize("which", ["²", "\u0662"])
def test_a_partition_number_is_ascii_digits(tmp_path, os_image, which):
    """'²' crashed int(); int() read Arabic-Indic '2' as partition 2."""
    img, _ = os_image
    with pytest.raises(RackbootError, match=r"has no partition .*; it has: 1 \(type 0c"):
        publish.publish_image(img, which, tmp_path / "master", image="raspios")


def test_file_without_mbr_is_refused(tmp_path):
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4096))
    with pytest.raises(RackbootError, match="blank.img: mbr: no 55aa boot signature"):
        publish.publish_image(blank, 2, tmp_path / "master", image="raspios")


# --- plans ----------------------------------------------------------------------------------


def test_write_plan_is_canonical_and_parses_back(tmp_path):
    plan = formats.parse_plan(
        b'{"format":1,"node":"52-54-00-12-34-56","image":"/images/example/1/manifest.json",'
        b'"mount":"ro","layout":{"repartition":"never","partitions":['
        b'{"name":"boot","start_mib":4,"size_mib":64,"type":"0c"},'
        b'{"name":"a","size_mib":64,"type":"83"},{"name":"b","size_mib":"rest","type":"83"}]}}'
    )
    path = plans.write_plan(tmp_path, "52-54-00-12-34-56", plan)
    assert path == tmp_path / "plans/52-54-00-12-34-56.json"
    written = replace(plan, serial=1)  # its first write
    assert path.read_bytes() == formats.dump(written) and formats.parse_plan(path.read_bytes()) == written
    plans.write_plan(tmp_path, "default", replace(plan, node="default"))
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == ["52-54-00-12-34-56.json", "default.json"]
    with pytest.raises(RackbootError, match="a plan for node '52-54-00-12-34-56' cannot be written as plans/default"):
        plans.write_plan(tmp_path, "default", plan)  # the worker would refuse it as another node's
    assert formats.parse_plan((tmp_path / "plans/default.json").read_bytes()).node == "default"
    with pytest.raises(RackbootError, match="node '../x' is not a MAC address"):
        plans.write_plan(tmp_path, "../x", plan)
    with pytest.raises(RackbootError, match="not the name a worker asks for \\(52-54-00-12-34-56\\)"):
        plans.write_plan(tmp_path, "52:54:00:12:34:56", plan)  # a spelling no worker asks for


# --- hooks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def master_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "master.key"
    signing.keygen(path)
    return path


def test_hooks_are_published_beside_the_manifest_and_pinned_by_its_signature(tmp_path, master_key):
    (tmp_path / "fix.sh").write_text("echo fixing\n")
    manifest = publish_tree(
        make_tree(tmp_path / "root"),
        tmp_path / "master",
        key=master_key,
        hooks={"post-install": tmp_path / "fix.sh"},
        hook_timeout=45,
    )
    (hook,) = manifest.hooks
    where = tmp_path / "master/images/example/1"
    assert (hook.name, hook.file, hook.timeout) == ("post-install", "post-install.sh", 45)
    assert (where / hook.file).read_bytes() == b"echo fixing\n"
    assert hook.sha256 == hashlib.sha256(b"echo fixing\n").hexdigest() and hook.size == 12
    stored = formats.parse_manifest((where / "manifest.json").read_bytes())
    assert stored.hooks == manifest.hooks
    public = f"{master_key}.pub"
    verified = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            public,
            "-rawin",
            "-in",
            str(where / "manifest.json"),
            "-sigfile",
            str(where / "manifest.json.sig"),
        ],
        capture_output=True,
    )
    assert verified.returncode == 0


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(hooks={"post-install": "fix.sh"}), r"hooks need the master's key \(\[master\] key\)"),
        (dict(hooks={"pre-boot": "fix.sh"}, key=True), "hook 'pre-boot' is not one of pre-install, post-install"),
        (dict(hooks={"pre-install": "missing.sh"}, key=True), "hook pre-install: cannot read .*missing.sh"),
        (dict(hooks={"pre-install": "empty.sh"}, key=True), "hook pre-install: .*empty.sh is 0 bytes"),
        (dict(hooks={"pre-install": "fix.sh"}, key=True, hook_timeout=0), "hook timeout 0 s is not between"),
    ],
)
def test_bad_hooks_are_refused_and_publish_nothing(tmp_path, master_key, kw, message):
    (tmp_path / "fix.sh").write_text("true\n")
    (tmp_path / "empty.sh").write_text("")
    kw["hooks"] = {name: tmp_path / path for name, path in kw["hooks"].items()}
    if kw.pop("key", False):
        kw["key"] = master_key
    with pytest.raises(RackbootError, match=message):
        publish_tree(make_tree(tmp_path / "root"), tmp_path / "master", **kw)
    assert not (tmp_path / "master/images/example/1").exists()


def test_a_systemd_root_gets_the_mark_good_unit_enabled(tmp_path):
    root = make_tree(tmp_path / "root")
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    publish_tree(root, tmp_path / "master")
    fs = unpacked(tmp_path / "master", 1, tmp_path)
    unit = debugfs(fs, "cat /usr/lib/systemd/system/rackboot-mark-good.service")
    assert "ExecStart=/usr/sbin/rackboot-mark-good" in unit and "WantedBy=multi-user.target" in unit
    link = debugfs(fs, "stat /etc/systemd/system/multi-user.target.wants/rackboot-mark-good.service")
    assert 'Fast link dest: "/usr/lib/systemd/system/rackboot-mark-good.service"' in link
    # a root without systemd gets the command alone
    publish_tree(make_tree(tmp_path / "plain"), tmp_path / "m2")
    plain = unpacked(tmp_path / "m2", 1, tmp_path / "m2")
    assert "rackboot-mark-good" in debugfs(plain, "ls /usr/sbin") and "systemd" not in debugfs(plain, "ls /usr/lib")


def test_sockets_fifos_and_devices_are_stamped_with_the_epoch_too(tmp_path):
    import socket

    root = make_tree(tmp_path / "root")
    (root / "run").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "run/control"))
    os.mkfifo(root / "run/queue")
    os.mknod(root / "run/null", 0o666 | 0o020000, os.makedev(1, 3))
    master = tmp_path / "master"
    publish_tree(root, master)
    fs = unpacked(master, 1, tmp_path)
    for name, kind in (("control", "socket"), ("queue", "FIFO"), ("null", "character special")):
        stat = debugfs(fs, f"stat /run/{name}")
        assert f"Type: {kind}" in stat, stat
        for field in ("ctime", "atime", "mtime", "crtime"):
            assert f"{field}: {EPOCH:#x}" in stat, (name, field, stat)


def test_a_killed_publications_leftovers_are_swept_by_the_next(tmp_path):
    master, tree = tmp_path / "master", make_tree(tmp_path / "root")
    image_dir = master / "images/example"
    (image_dir / ".publish-1-k1ll3d/out").mkdir(parents=True)
    (image_dir / ".publish-1-k1ll3d/rootfs.ext4").write_bytes(b"\0" * 4096)
    (image_dir / ".latest.json.tmp-99999").write_bytes(b"{")
    (image_dir / ".notes").write_text("not a publication's")
    assert publish_tree(tree, master).version == 1
    assert sorted(p.name for p in image_dir.iterdir()) == [".notes", "1", "latest.json"]


def test_concurrent_publications_of_one_image_take_turns(tmp_path):
    import threading

    master, tree = tmp_path / "master", make_tree(tmp_path / "root")
    versions, errors = [], []

    def one():
        try:
            versions.append(publish_tree(tree, master).version)
        except RackbootError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(versions) == [1, 2]
    assert formats.parse_latest((master / "images/example/latest.json").read_bytes()).version == 2


def test_a_killed_plan_writes_temporaries_are_swept_by_the_next(tmp_path):
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    for name in (".default.json.tmp-99999", ".default.json.sig.tmp-99999", "notes.txt"):
        (plan_dir / name).write_text("{")
    plan = formats.parse_plan(
        b'{"format":1,"node":"default","image":"/images/example/1/manifest.json",'
        b'"mount":"ro","layout":{"repartition":"never","partitions":['
        b'{"name":"boot","start_mib":4,"size_mib":64,"type":"0c"},'
        b'{"name":"a","size_mib":64,"type":"83"},{"name":"b","size_mib":"rest","type":"83"}]}}'
    )
    plans.write_plan(tmp_path, "default", plan)
    assert sorted(p.name for p in plan_dir.iterdir()) == ["default.json", "notes.txt"]
