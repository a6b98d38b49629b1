"""`rackboot build` on the real Debian packages: artefacts, no-op rebuilds, bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rackboot import build, config, cpio
from rackboot.errors import RackbootError

from tests.helpers import quiet, write_config

pytestmark = pytest.mark.network


def rackboot(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rackboot", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def members(initramfs: Path) -> dict[str, cpio.Member]:
    return {m.name: m for m in cpio.read_members(gzip.decompress(initramfs.read_bytes()))}


def member_data(initramfs: Path, name: str) -> bytes:
    raw = gzip.decompress(initramfs.read_bytes())
    m = members(initramfs)[name]
    return raw[m.data_offset : m.data_offset + m.filesize]


def test_artefacts_json_describes_every_output(probe_build):
    doc = json.loads((probe_build / "artefacts.json").read_text())
    kinds = {e["kind"] for e in doc["artefacts"]}
    assert {"kernel", "initramfs", "uboot-script"} <= kinds
    for entry in doc["artefacts"]:
        data = (probe_build / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_initramfs_holds_init_console_busybox_and_modules_in_order(probe_build):
    m = members(probe_build / "initramfs.cpio.gz")
    assert m["dev/console"].mode & 0o170000 == 0o020000  # character device
    assert (m["dev/console"].rdevmajor, m["dev/console"].rdevminor) == (5, 1)
    assert m["init"].mode & 0o111
    assert "bin/busybox" in m
    order = member_data(probe_build / "initramfs.cpio.gz", "etc/rackboot/modules.order").decode().split()
    names = [Path(p).name.split(".ko")[0] for p in order]
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert all(p in m for p in order), "every module in the load order is in the archive"
    assert all(mem.uid == 0 and mem.gid == 0 for mem in m.values())


def test_noop_rebuild_rebuilds_nothing(tmp_path):
    cfg = config.load(write_config(tmp_path))
    build.build(cfg, log=quiet)
    lines = []
    build.build(cfg, log=lines.append)
    assert "rebuilt 0 of" in lines[-1]
    assert all("up to date" in line for line in lines[1:-1])


@pytest.mark.slow
def test_changed_module_list_rebuilds_only_the_initramfs_and_the_boot_area_and_card_holding_it(tmp_path):
    build.build(config.load(write_config(tmp_path)), log=quiet)
    lines = []
    build.build(config.load(write_config(tmp_path, initramfs={"modules": ["loop"]})), log=lines.append)
    rebuilt = [line.split()[0] for line in lines if "rebuilding" in line]
    assert rebuilt == ["initramfs", "boot-image", "sdcard", "sdcard-bmap"]  # boot-image: one boot area's FAT
    assert any("initramfs changed" in line for line in lines)
    assert any("boot-image " in line and "initramfs rebuilt" in line for line in lines)
    assert any("sdcard " in line and "boot-image rebuilt" in line for line in lines)


@pytest.mark.slow
def test_same_inputs_same_bytes_whatever_umask_and_mtimes(tmp_path):
    outputs = []
    for n, (umask, mtime) in enumerate([(0o022, 1_000_000), (0o077, 2_000_000)]):
        d = tmp_path / f"run{n}"
        d.mkdir()
        old = os.umask(umask)
        try:
            extra = d / "motd"
            extra.write_text("hello rack\n")
            os.utime(extra, (mtime, mtime))
            cfg = config.load(write_config(d, initramfs={"files": {"/etc/motd": "motd"}}))
            outputs.append(build.build(cfg, log=quiet))
        finally:
            os.umask(old)
    for name in ("initramfs.cpio.gz", "boot.scr.uimg", "Image.lzma"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def _boot_of(size_mib: int, boot_type: str = "0c") -> dict:
    return {
        "partitions": [
            {"name": "boot", "size_mib": size_mib, "type": boot_type},
            {"name": "a", "size_mib": 256, "type": "83"},
            {"name": "b", "size_mib": 256, "type": "83"},
            {"name": "data", "size_mib": "rest", "type": "83"},
        ]
    }


def _only_state(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != ".rackboot") if out.exists() else []


@pytest.mark.parametrize(
    "sections, pattern, status",
    [
        ({"initramfs": {"modles": ["x"]}}, r"\[initramfs\] modles: unknown key \(did you mean 'modules'\?\)", 2),
        pytest.param(
            {"initramfs": {"packages": ["busybox-static", "no-such-package-rackboot"]}},
            r"unknown Debian package 'no-such-package-rackboot'",
            1,
            marks=pytest.mark.slow,
        ),
        ({"initramfs": {"modules": ["virtio_nett"]}}, r"virtio_nett.*did you mean 'virtio_net'", 1),
        ({"master": {"port": 99999}}, r"\[master\] port: expected an integer from 1 to 65535, got 99999", 2),
        ({"kernel": {"cmdline": 'quiet" ; reset ; echo "'}}, r"\[kernel\] cmdline: .*U-Boot's boot script", 2),
        ({"layout": _boot_of(64, "05")}, r"\[layout\] partitions\[0\]\.type: .*FAT type", 2),
        ({"initramfs": {"binaries": ["/bin/../../etc/passwd"]}}, r"binaries\[0\]: .*must stay inside the sysroot", 2),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, sections, pattern, status):
    import re

    result = rackboot("build", "-c", write_config(tmp_path, **sections))
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr
    assert _only_state(tmp_path / "build") == []


def test_wrong_arch_binary_is_refused_by_name(tmp_path):
    local = tmp_path / "extra"
    (local / "usr/bin").mkdir(parents=True)
    shutil.copy("/bin/ls", local / "usr/bin/hostls")
    result = rackboot(
        "build",
        "-c",
        write_config(
            tmp_path,
            initramfs={"packages": ["busybox-static", "./extra"], "binaries": ["/bin/busybox", "/usr/bin/hostls"]},
        ),
    )
    assert result.returncode == 1
    assert "/usr/bin/hostls" in result.stderr and "arm64" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _only_state(tmp_path / "build") == []


def test_full_disk_is_one_line_and_leaves_no_half_artefact(tmp_path):
    out = tmp_path / "build"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(out)], check=True)
    try:
        result = rackboot("build", "-c", write_config(tmp_path))
        assert result.returncode == 1
        assert "no space left on device" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert _only_state(out) == []  # the kernel did not fit: no half-written Image, no temporaries
    finally:
        subprocess.run(["umount", str(out)])


def test_warm_cache_builds_without_network(tmp_path, probe_build):
    """The probe build warmed the cache; a new output directory needs no mirror."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    cfg = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "rackboot", "build", "-c", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "build/sdcard.img").is_file()


def _files(out: Path) -> dict[str, str]:
    """sha256 of every file in the output directory but the build's own state."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".rackboot" not in p.relative_to(out).parts
    }


@pytest.mark.slow
def test_a_build_that_fails_at_the_card_leaves_the_previous_build(tmp_path):
    """The new initramfs is built, then the card does not fit: TFTP and the card must still
    agree, artefacts.json must describe the files, and the old config rebuilds nothing."""
    good = write_config(tmp_path, layout=_boot_of(128))
    out = build.build(config.load(good), log=quiet)
    before = _files(out)
    bad = write_config(tmp_path, initramfs={"modules": ["loop"]}, layout=_boot_of(8))
    result = rackboot("build", "-c", bad)
    assert result.returncode == 1
    assert "boot partition of 8 MiB is too small" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _files(out) == before
    assert not (out / ".rackboot/stage").exists()
    lines = []
    build.build(config.load(write_config(tmp_path, layout=_boot_of(128))), log=lines.append)
    assert "rebuilt 0 of" in lines[-1]


@pytest.mark.slow
def test_switching_compression_leaves_only_the_new_initramfs(tmp_path):
    out = build.build(config.load(write_config(tmp_path, initramfs={"compression": "gzip"})), log=quiet)
    (out / ".Image.tmp-99999").write_bytes(b"a killed build's half kernel")
    build.build(config.load(write_config(tmp_path, initramfs={"compression": "xz"})), log=quiet)
    assert sorted(p.name for p in out.glob("initramfs*")) == ["initramfs.cpio.xz"]
    assert not (out / ".Image.tmp-99999").exists()
    doc = json.loads((out / "artefacts.json").read_text())
    assert set(_files(out)) == {e["path"] for e in doc["artefacts"]} | {"artefacts.json"}


def test_the_card_carries_the_boot_type_the_plan_carries(tmp_path):
    """[layout] boot type 0e went into the plan while the card said 0c: the updater refused the
    card's own boot partition and a new worker went to rescue."""
    from rackboot.initramfs.updater import layout, mbr
    from rackboot.master import plans

    cfg = config.load(write_config(tmp_path, layout=_boot_of(64, "0e")))
    out = build.build(cfg, log=quiet)
    card = (out / "sdcard.img").read_bytes()
    decision = layout.decide(plans.layout(cfg), mbr.parse(card[: mbr.SECTOR]), 1 << 30)
    assert decision.action == "repartition" and "boot" not in decision.changed and "boot" in decision.kept


def _stage_with_a_link_out(tmp_path, **files):
    """Stage a probe initramfs into a tree that already holds lib -> <outside> (as a package's
    absolute link, copied into the stage, would): every write must land inside the stage."""
    from types import SimpleNamespace

    from rackboot import initramfs_tree
    from rackboot.firmware.boards import board as board_profile
    from rackboot.sources import PackageCache

    cfg = config.load(write_config(tmp_path, initramfs={"modules": ["virtio_net"]}))
    inputs = build.Inputs(cfg)
    spec = initramfs_tree.spec(cfg, board_profile("qemu-virt", "arm64"))
    spec.files.update(files)
    cache = PackageCache(arch="arm64")
    sysroot = cache.sysroot(cache.resolve(spec.packages))
    outside = tmp_path / "outside"
    outside.mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "lib").symlink_to(outside)
    initramfs_tree.stage(stage, spec, sysroot=sysroot, kernel=SimpleNamespace(root=inputs.kernel.root))
    return stage, outside


def test_staging_never_writes_through_a_link_out_of_the_stage(tmp_path):
    extra = tmp_path / "extra"
    (extra / "firmware").mkdir(parents=True)
    (extra / "firmware/blob.bin").write_bytes(b"blob")
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    stage, outside = _stage_with_a_link_out(tmp_path, **{"/lib": extra, "/lib/one.txt": single})
    assert list(outside.iterdir()) == [], "modules or [initramfs] files were written out of the stage"
    inside = stage / str(outside).lstrip("/")  # where /lib points inside the initramfs
    assert (inside / "firmware/blob.bin").read_bytes() == b"blob"
    assert (inside / "one.txt").read_text() == "one file\n"
    assert list(inside.glob("modules/*/kernel/drivers/net/virtio_net.ko"))


def test_an_initramfs_files_target_that_climbs_out_is_refused(tmp_path):
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    with pytest.raises(RackbootError, match=r"\[initramfs\] files: /\.\./\.\./x: .*leads out of"):
        _stage_with_a_link_out(tmp_path, **{"/../../x": single})
    assert not (tmp_path.parent / "x").exists()  # where stage/../../x would be
